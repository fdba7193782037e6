"""Modality-specific weights with one shared attention (`modality_experts=True`): routing, frozen-text training,
save/load, the Hub, the pipeline's prefix KV cache, gradient checkpointing and bf16, on Llama, Qwen2 and Mistral."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from hub_fixtures import local_hub  # noqa: F401
from pipeline_components import get_dummy_components, get_generator
from tiny_configs import (
    BOI_TOKEN_ID,
    EOI_TOKEN_ID,
    IMAGE_TOKEN_ID,
    llama_text_config,
    mixed_batch,
    perturb_zero_init,
    qwen2_text_config,
    tiny_config,
    tiny_image_fields,
)
from transfusion_hf import TransfusionConfig, TransfusionForMixedModal, TransfusionPipeline
from transfusion_hf.modality_experts import (
    ModalityRouting,
    add_modality_experts,
    copy_text_weights_to_image_experts,
    freeze_text_weights,
    image_expert_pairs,
)

BACKBONES = {
    "llama": llama_text_config,
    "qwen2": qwen2_text_config,
    "mistral": lambda: llama_text_config(model_type="mistral"),
}
SPECIAL_IDS = [BOI_TOKEN_ID, EOI_TOKEN_ID, IMAGE_TOKEN_ID]
# Per layer: q, k, v, o projections, the MLP, the two norms; and the backbone's final norm.
ROUTED_PER_LAYER = {
    "input_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "post_attention_layernorm",
    "mlp",
}


def experts_model(backbone: str = "llama", seed: int = 0, **overrides) -> TransfusionForMixedModal:
    torch.manual_seed(seed)
    config = tiny_config(text_config=BACKBONES[backbone](), modality_experts=True, **overrides)
    return perturb_zero_init(TransfusionForMixedModal(config), seed).eval()


def dense_twin(model: TransfusionForMixedModal) -> TransfusionForMixedModal:
    """The same weights without image copies (they are not loaded: strict=False drops them)."""
    config = copy.deepcopy(model.config)
    config.modality_experts = False
    dense = TransfusionForMixedModal(config).eval()
    missing, unexpected = dense.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(".image_expert." in key for key in unexpected)
    return dense


def perturb_image_experts(model: torch.nn.Module, seed: int = 1, scale: float = 0.2) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, expert in image_expert_pairs(model):
            for parameter in expert.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


def text_only_ids(seed: int = 3, rows: int = 2, length: int = 9) -> torch.LongTensor:
    return torch.randint(3, BOI_TOKEN_ID, (rows, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------- structure
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_text_keys_unchanged_and_image_copies_start_equal(backbone):
    model = experts_model(backbone)
    dense_keys = set(dense_twin(model).state_dict())
    keys = set(model.state_dict())
    assert dense_keys <= keys, "the text modules keep their state-dict keys (a pretrained LLM still loads)"
    expert_keys = keys - dense_keys
    assert expert_keys and all(".image_expert." in key for key in expert_keys)
    routed = {name for name, _, _ in image_expert_pairs(model)}
    layers = model.config.text_config.num_hidden_layers
    assert routed == {f"model.layers.{i}.{name}" for i in range(layers) for name in ROUTED_PER_LAYER} | {"model.norm"}
    for _, text_module, expert in image_expert_pairs(model):
        text_state = text_module.state_dict()
        for name, value in expert.state_dict().items():
            assert torch.equal(value, text_state[name]), name


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_copies_equal_to_the_text_weights_give_the_dense_model(backbone, attn_implementation):
    """Routing itself changes nothing: with image copies equal to the text weights, logits and image predictions are
    the dense model's (same weights, no copies)."""
    model = experts_model(backbone)
    dense = dense_twin(model)
    for module in (model, dense):
        module.set_attn_implementation(attn_implementation)
    batch = mixed_batch(model.config, [[3, 4], [5, 2, 3]])
    with torch.no_grad():
        expected, output = dense(**batch), model(**batch, output_hidden_states=True)
    assert len(output.hidden_states) == model.config.text_config.num_hidden_layers + 1
    torch.testing.assert_close(output.logits, expected.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(output.diffusion_predictions, expected.diffusion_predictions, rtol=0, atol=1e-6)


def test_image_positions_use_the_copies_and_text_positions_the_originals():
    model = experts_model()
    batch = mixed_batch(model.config, [[3, 4], [5, 2, 3]])
    image_positions = batch["input_ids"] == IMAGE_TOKEN_ID
    text_ids = text_only_ids()
    with torch.no_grad():
        before, text_before = model(**batch), model(input_ids=text_ids)
        last = model.model.layers[-1]
        # The last layer's MLP acts on each position after attention: its image copy reaches the image positions and
        # nothing else, its text module the text positions and nothing else.
        original = last.mlp.image_expert.up_proj.weight.clone()
        last.mlp.image_expert.up_proj.weight.add_(0.3)
        after_image_change, text_after = model(**batch), model(input_ids=text_ids)
        last.mlp.image_expert.up_proj.weight.copy_(original)
        last.mlp.up_proj.weight.add_(0.3)
        after_text_change = model(**batch)
    assert not torch.allclose(after_image_change.diffusion_predictions, before.diffusion_predictions)
    assert torch.equal(after_image_change.logits[~image_positions], before.logits[~image_positions])
    assert torch.equal(text_after.logits, text_before.logits), "a text-only row never reads an image copy"
    assert torch.equal(after_text_change.diffusion_predictions, before.diffusion_predictions)
    assert not torch.allclose(after_text_change.logits[~image_positions], before.logits[~image_positions])


def test_attention_is_shared_across_modalities():
    """One softmax over the whole sequence: text after an image reads the image copies' keys and values, image
    positions read the text's."""
    model = experts_model()
    batch = mixed_batch(model.config, [[3, 4]])
    after_image = slice(3 + model.config.num_patches + 2, None)  # the text after <eoi>
    with torch.no_grad():
        before = model(**batch)
        model.model.layers[0].self_attn.v_proj.image_expert.weight.add_(0.3)
        changed_image_values = model(**batch)
        model.model.layers[0].self_attn.v_proj.weight.add_(0.3)
        changed_text_values = model(**batch)
    assert torch.equal(changed_image_values.logits[0, :3], before.logits[0, :3]), "causal: text before is unchanged"
    assert not torch.allclose(changed_image_values.logits[0, after_image], before.logits[0, after_image])
    assert not torch.allclose(changed_text_values.diffusion_predictions, changed_image_values.diffusion_predictions)


# ----------------------------------------------------------------------------------------- frozen-text training
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_frozen_text_training_keeps_the_llm_logits_exactly(backbone):
    """From a pretrained LLM with the text frozen: after AdamW steps on mixed batches (weight decay on), text-only
    input gives the LLM's logits over its vocabulary bit for bit, and only the image weights and new rows moved."""
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(TransfusionConfig(**_fields(backbone)).text_config).eval()
    model = TransfusionForMixedModal.from_text_model(llm, **tiny_image_fields(), modality_experts=True)
    perturb_zero_init(model)
    row_trained = freeze_text_weights(model, SPECIAL_IDS)
    start = {name: value.clone() for name, value in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad and all(p is not r for r in row_trained)]
    optimizer = torch.optim.AdamW(
        [{"params": trainable, "weight_decay": 0.1}, {"params": row_trained, "weight_decay": 0.0}], lr=1e-2
    )
    model.train()
    for step in range(3):
        batch = mixed_batch(model.config, [[3, 4], [5, 2, 3]], seed=step)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()

    text_ids = text_only_ids()
    with torch.no_grad():
        expected, logits = llm(input_ids=text_ids).logits, model(input_ids=text_ids).logits
    kept = [token for token in range(expected.shape[-1]) if token not in SPECIAL_IDS]
    assert torch.equal(logits[..., kept], expected[..., kept])

    changed = {name for name, value in model.state_dict().items() if not torch.equal(value, start[name])}
    image_parts = ("image_encoder.", "image_decoder.", "patch_position_embedding.")
    assert changed - {"model.embed_tokens.weight", "lm_head.weight"} == {
        name for name in start if ".image_expert." in name or name.startswith(image_parts)
    }, "every image weight trained, and nothing of the text path"
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows_changed = (model.state_dict()[name] != start[name]).any(dim=1).nonzero().squeeze(1).tolist()
        assert set(rows_changed) <= set(SPECIAL_IDS) and rows_changed, name


def _fields(backbone: str) -> dict:
    return {"text_config": BACKBONES[backbone](), **tiny_image_fields()}


def test_from_text_model_starts_the_copies_from_the_llm():
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(TransfusionConfig(**_fields("llama")).text_config)
    model = TransfusionForMixedModal.from_text_model(llm, **tiny_image_fields(), modality_experts=True)
    up = llm.model.layers[1].mlp.up_proj.weight
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, up)
    assert torch.equal(model.model.layers[1].mlp.image_expert.up_proj.weight, up)


def test_freeze_text_weights_refuses_a_model_without_experts():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="modality_experts=True"):
        freeze_text_weights(TransfusionForMixedModal(tiny_config()), SPECIAL_IDS)
    with pytest.raises(ValueError, match=r"\[500\] are outside the vocabulary"):
        freeze_text_weights(experts_model(), [500])


def test_bad_config_and_backbone_errors():
    with pytest.raises(ValueError, match="`modality_experts` must be a bool, got 'yes'"):
        tiny_config(modality_experts="yes")
    with pytest.raises(ValueError, match="decoder layers in `.layers`"):
        add_modality_experts(torch.nn.Linear(2, 2))
    model = experts_model()
    with pytest.raises(ValueError, match="already has modality experts"):
        add_modality_experts(model.model)
    with pytest.raises(ValueError, match="bool tensor"):
        ModalityRouting.from_image_positions(torch.zeros(2, 3, dtype=torch.long))


# ----------------------------------------------------------------------------------------------- save / load
def test_save_load_round_trip(tmp_path):
    model = perturb_image_experts(experts_model())
    model.save_pretrained(tmp_path)
    loaded = TransfusionForMixedModal.from_pretrained(tmp_path).eval()
    assert loaded.config.modality_experts
    auto = AutoModel.from_pretrained(tmp_path).eval()
    batch = mixed_batch(model.config, [[3, 4], [5, 2, 3]])
    with torch.no_grad():
        expected = model(**batch)
        for candidate in (loaded, auto):
            output = candidate(**batch)
            assert torch.equal(output.logits, expected.logits)
            assert torch.equal(output.diffusion_predictions, expected.diffusion_predictions)


def test_a_dense_checkpoint_loads_with_copies_of_its_text_weights(tmp_path):
    torch.manual_seed(0)
    dense = perturb_zero_init(TransfusionForMixedModal(tiny_config())).eval()
    dense.save_pretrained(tmp_path)
    model, info = TransfusionForMixedModal.from_pretrained(tmp_path, modality_experts=True, output_loading_info=True)
    assert info["missing_keys"] and all(".image_expert." in key for key in info["missing_keys"])
    batch = mixed_batch(dense.config, [[3, 4]])
    with torch.no_grad():
        expected, output = dense(**batch), model.eval()(**batch)
    torch.testing.assert_close(output.diffusion_predictions, expected.diffusion_predictions, rtol=0, atol=1e-6)
    copy_text_weights_to_image_experts(model)  # idempotent: already copies
    with torch.no_grad():
        assert torch.equal(model(**batch).diffusion_predictions, output.diffusion_predictions)


def test_push_to_hub_and_load_by_repo_id(local_hub):  # noqa: F811 (the fixture imported above)
    model = perturb_image_experts(experts_model())
    model.push_to_hub("experts-model")
    loaded = TransfusionForMixedModal.from_pretrained(f"{local_hub.user}/experts-model").eval()
    batch = mixed_batch(model.config, [[3, 4]])
    with torch.no_grad():
        assert torch.equal(loaded(**batch).diffusion_predictions, model(**batch).diffusion_predictions)


# ------------------------------------------------------------------------------------------ pipeline, KV cache
def experts_pipeline() -> TransfusionPipeline:
    components = get_dummy_components()
    dense = components["transformer"]
    config = copy.deepcopy(dense.config)
    config.modality_experts = True
    model = TransfusionForMixedModal(config)
    model.load_state_dict(dense.state_dict(), strict=False)
    copy_text_weights_to_image_experts(model)
    components["transformer"] = perturb_image_experts(model).eval()
    pipe = TransfusionPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_with_the_kv_cache_equals_without(tmp_path):
    """The prefix is prefilled once (text weights), each denoising step runs only image positions (image copies):
    the same latents as recomputing the whole sequence (mixed routing) at every step."""
    pipe = experts_pipeline()
    prompts = ["a small red circle in the top left", "a large blue square"]
    kwargs = {"num_inference_steps": 3, "guidance_scale": 2.0, "output_type": "latent"}
    cached = pipe(prompts, generator=get_generator(0), use_kv_cache=True, **kwargs).images
    uncached = pipe(prompts, generator=get_generator(0), use_kv_cache=False, **kwargs).images
    torch.testing.assert_close(cached, uncached, rtol=0, atol=1e-5)

    pipe.save_pretrained(tmp_path)
    loaded = TransfusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.transformer.config.modality_experts
    assert torch.equal(loaded(prompts, generator=get_generator(0), **kwargs).images, cached)
    image = pipe(prompts[0], num_inference_steps=2, generator=get_generator(0)).images[0]
    assert len(loaded.caption(image, max_new_tokens=4)) == 1
    parts = loaded.generate([prompts[0], image, "a"], max_new_tokens=4, num_inference_steps=2)
    assert isinstance(parts, list)


# ------------------------------------------------------------------------------ gradient checkpointing, bf16
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(use_reentrant):
    """The replay during backward recomputes each layer: it must route image positions as the first pass did."""
    model = perturb_image_experts(experts_model())
    batch = mixed_batch(model.config, [[3, 4], [5, 2, 3]])

    def loss_and_gradients() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    model.train()
    expected_loss, expected_grads = loss_and_gradients()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    loss, grads = loss_and_gradients()
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-6)
    assert grads.keys() == expected_grads.keys()
    assert any(".image_expert." in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_bf16_forward_and_backward(backbone):
    model = perturb_image_experts(experts_model(backbone))
    batch = mixed_batch(model.config, [[3, 4], [5, 2, 3]])
    with torch.no_grad():
        reference = model(**batch)
    model = model.to(torch.bfloat16).train()
    for key in ("latents", "diffusion_targets"):
        batch[key] = batch[key].to(torch.bfloat16)
    output = model(**batch, labels=batch["input_ids"])
    output.loss.backward()
    assert output.diffusion_predictions.dtype == torch.bfloat16
    torch.testing.assert_close(
        output.diffusion_predictions.float(), reference.diffusion_predictions, rtol=0.1, atol=0.05
    )
    assert model.model.layers[0].mlp.image_expert.up_proj.weight.grad is not None
