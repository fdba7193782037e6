"""torch.compile of the training step (issue 30): the forward and backward of `TransfusionForMixedModal` trace into one
graph with no graph break (`fullgraph=True`) for both patch encoders, padded and packed rows, with and without modality
experts, and give the eager loss and gradients; packed rows of one length reuse the compiled graph; with flex attention
one block mask per batch serves every layer; `--torch_compile` trains as the eager script does.

Backends: graph breaks happen in dynamo's capture, which is the same whatever the backend, so these tests compile with
"eager" (the captured graph run by PyTorch's eager kernels) or "aot_eager" (AOTAutograd's traced forward and backward
too). Inductor would add minutes of C++ code generation on these CPUs and check nothing more about breaks.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo.testing
import transformers.integrations.flex_attention as transformers_flex
import transformers.masking_utils as transformers_masking
from diffusers import FlowMatchEulerDiscreteScheduler
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from pipeline_components import get_tokenizer, perturb_
from script_loading import one_thread_and_fresh_accelerate  # noqa: F401 (autouse fixture)
from test_packing import collate, make_examples
from test_train_transfusion import SHAPES, read_log, run_main
from tiny_configs import llama_text_config, tiny_config
from transfusion_hf import TransfusionForMixedModal, training
from transfusion_hf.data.collator import TransfusionDataCollator
from transfusion_hf.noising import TransfusionNoiser
from transfusion_hf.processing_transfusion import TransfusionProcessor, special_token_ids


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles its own models from an empty dynamo cache (and leaves none behind)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def build_model(
    tokenizer,
    patch_encoder: str = "linear",
    modality_experts: bool = False,
    attn_implementation: str = "sdpa",
) -> TransfusionForMixedModal:
    """The tiny model of tests/test_packing.py, in training mode, optionally with modality experts."""
    text_config = llama_text_config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = tiny_config(
        text_config,
        patch_encoder=patch_encoder,
        modality_experts=modality_experts,
        **special_token_ids(tokenizer),
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    # Perturbed: the zero-initialised output layers would leave most gradients at zero.
    return perturb_(TransfusionForMixedModal(config), seed=1).train()


def training_batch(tokenizer, layout: str, packed: bool) -> dict[str, torch.Tensor]:
    padded = collate(tokenizer, layout, None)
    return collate(tokenizer, layout, 2 * padded["input_ids"].shape[1]) if packed else padded


def loss_and_gradients(
    model: torch.nn.Module, batch: dict, compiled: torch.nn.Module | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of `batch` and the gradient of every parameter of `model`, run through `compiled` when given."""
    model.zero_grad(set_to_none=True)
    output = (model if compiled is None else compiled)(**batch, use_cache=False)
    output.loss.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return output.loss.detach(), gradients


# (patch encoder, layout, packed, modality experts): each pair of encoder / packing / experts appears at least once.
CASES = {
    "linear-padded": ("linear", "mixed", False, False),
    "linear-packed-experts": ("linear", "mixed", True, True),
    "unet-padded-experts": ("unet", "mixed", False, True),
    "unet-packed": ("unet", "mixed", True, False),
    "text_only-packed-experts": ("linear", "text_only", True, True),
}


def assert_same_as_eager(model, batch, compiled_loss, compiled_gradients) -> None:
    """The compiled step's loss and every gradient equal the eager step's."""
    loss, gradients = loss_and_gradients(model, batch)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-6, atol=1e-6)
    assert compiled_gradients.keys() == gradients.keys()
    for name, gradient in gradients.items():
        torch.testing.assert_close(compiled_gradients[name], gradient, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_training_step_is_one_graph_with_the_eager_loss_and_gradients(tokenizer, case):
    patch_encoder, layout, packed, modality_experts = CASES[case]
    model = build_model(tokenizer, patch_encoder, modality_experts)
    batch = training_batch(tokenizer, layout, packed)
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    # fullgraph=True raises at the first graph break; the counter shows the one graph it compiled.
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    compiled_loss, compiled_gradients = loss_and_gradients(model, batch, compiled)
    assert counter.frame_count == 1
    assert_same_as_eager(model, batch, compiled_loss, compiled_gradients)


def test_compiled_backward_with_activation_checkpointing_matches_eager(tokenizer):
    """AOTAutograd traces the backward as well (aot_eager), here through checkpointed layers with modality experts on
    packed rows, with the dynamo option `--torch_compile` sets for activation checkpointing."""
    model = build_model(tokenizer, "unet", modality_experts=True)
    model.activation_checkpointing_enable()
    batch = training_batch(tokenizer, "mixed", packed=True)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        compiled_loss, compiled_gradients = loss_and_gradients(model, batch, compiled)
    assert counter.frame_count == 1
    assert_same_as_eager(model, batch, compiled_loss, compiled_gradients)


def test_compiled_step_checks_the_placeholders_in_the_graph(tokenizer):
    """The placeholder count (a `ValueError` in eager mode, which reads it on the host) is asserted inside the graph."""
    model = build_model(tokenizer)
    batch = training_batch(tokenizer, "mixed", packed=True)
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["input_ids"] == model.config.image_token_id, 5)
    with pytest.raises(ValueError, match="image placeholders"):
        model(**batch, use_cache=False)
    with pytest.raises(RuntimeError, match="number of image placeholders"):
        torch.compile(model, backend="eager", fullgraph=True)(**batch, use_cache=False)


def packing_collator(tokenizer, max_sequence_length: int) -> TransfusionDataCollator:
    processor = TransfusionProcessor(tokenizer, image_size=4, num_image_tokens=4)
    noiser = TransfusionNoiser(FlowMatchEulerDiscreteScheduler(), "flow_prediction", image_first_probability=0.5)
    return TransfusionDataCollator(processor, noiser, seed=3, max_sequence_length=max_sequence_length)


def test_packed_batches_of_one_row_length_compile_once(tokenizer):
    """Packed rows all have `max_sequence_length` tokens; only the numbers of rows and of images change with the data.
    The training forward marks those two dimensions dynamic (`mark_varying_dims_dynamic`), so one graph serves every
    batch: without the marks dynamo would compile again the first time each of them changes (3 graphs here)."""
    model = build_model(tokenizer)
    collator = packing_collator(tokenizer, max_sequence_length=40)
    examples = make_examples("mixed", count=35)
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    shapes = set()
    for start in range(0, len(examples), 7):
        batch = collator(examples[start : start + 7])
        training.training_forward(compiled, batch).loss.backward()
        shapes.add((*batch["input_ids"].shape, batch["latents"].shape[0]))
    assert {length for _, length, _ in shapes} == {40}
    assert len({rows for rows, _, _ in shapes}) > 1 and len({images for _, _, images in shapes}) > 1
    assert counter.frame_count == 1


def test_packed_rows_get_one_block_mask_shared_by_every_layer(tokenizer, monkeypatch):
    """With flex attention the block mask of a packed batch (documents and images) is built once per forward, by
    `build_transfusion_mask`, and every layer attends with that same `BlockMask`; the loss is the sdpa loss.

    Eager flex on CPU compiles its kernels with inductor (minutes): here the mask is built without compiling and the
    attention runs flex's reference implementation, which changes neither the mask nor the result."""
    built, used = [], []

    def counting_create_block_mask(*args, **kwargs):
        built.append(transformers_masking_create_block_mask(*args, **{**kwargs, "_compile": False}))
        return built[-1]

    def recording_flex_attention(query, key, value, training=False, **kwargs):
        used.append(kwargs["block_mask"])
        return flex_attention(query, key, value, **kwargs)

    transformers_masking_create_block_mask = transformers_masking.create_block_mask
    monkeypatch.setattr(transformers_masking, "create_block_mask", counting_create_block_mask)
    monkeypatch.setattr(transformers_flex, "compile_friendly_flex_attention", recording_flex_attention)
    model = build_model(tokenizer, attn_implementation="flex_attention").eval()
    batch = training_batch(tokenizer, "mixed", packed=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex without torch.compile warns that it is slow
        loss = model(**batch, use_cache=False).loss
    assert len(built) == 1 and isinstance(built[0], BlockMask)
    assert len(used) == model.config.text_config.num_hidden_layers
    assert all(mask is built[0] for mask in used)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        torch.testing.assert_close(loss, model(**batch, use_cache=False).loss, rtol=1e-5, atol=1e-5)


def test_flex_attention_forward_on_packed_rows_is_one_graph(tokenizer):
    """Flex attention on packed rows: the forward (block mask included) is one graph, with the option that
    `--torch_compile` sets for flex (transformers' `create_block_mask(_compile=True)` warns, and dynamo cannot trace
    `warnings.warn`); its loss is the sdpa loss. Forward only: flex attention has no backward on CPU."""
    model = build_model(tokenizer, modality_experts=True, attn_implementation="flex_attention")
    batch = training_batch(tokenizer, "mixed", packed=True)
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    with torch.no_grad(), torch._dynamo.config.patch(ignore_logging_functions={warnings.warn}):
        loss = torch.compile(model, backend=counter, fullgraph=True)(**batch, use_cache=False).loss
    assert counter.frame_count == 1
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        torch.testing.assert_close(loss, model(**batch, use_cache=False).loss, rtol=1e-5, atol=1e-5)


def test_torch_compile_flag_trains_with_the_eager_first_step_loss(tmp_path):
    """`--torch_compile` (aot_eager here, inductor by default) trains two steps with the eager run's losses, the step
    compiled as one graph without a break."""
    flags = (*SHAPES, "--max_train_steps", "2", "--logging_steps", "1", "--checkpointing_steps", "0")
    run_main(tmp_path / "eager", *flags)
    torch._dynamo.utils.counters.clear()
    run_main(tmp_path / "compiled", *flags, "--torch_compile", "--torch_compile_backend", "aot_eager")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert not torch._dynamo.utils.counters["graph_break"]
    eager, compiled = read_log(tmp_path / "eager"), read_log(tmp_path / "compiled")
    assert [record["step"] for record in compiled] == [1, 2]
    assert compiled[0]["loss"] == pytest.approx(eager[0]["loss"], rel=1e-6)
    assert compiled[1]["loss"] == pytest.approx(eager[1]["loss"], rel=1e-5)
    # The saved pipeline is the plain model (not the compiled wrapper).
    assert (tmp_path / "compiled" / "transformer" / "model.safetensors").is_file()


def test_torch_compile_flags():
    args = training.parse_args([*SHAPES, "--model_config", "tiny"])
    assert not args.torch_compile and training.torch_compile_plugin(args) is None
    # As in transformers' TrainingArguments, a backend or a mode turns compiling on.
    args = training.parse_args([*SHAPES, "--model_config", "tiny", "--torch_compile_backend", "aot_eager"])
    plugin = training.torch_compile_plugin(args)
    assert args.torch_compile and plugin.fullgraph and plugin.to_kwargs()["backend"] == "aot_eager"
    with pytest.raises(SystemExit):
        training.parse_args([*SHAPES, "--model_config", "tiny", "--torch_compile_backend", "no_such_backend"])
