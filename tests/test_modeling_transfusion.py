"""TransfusionForMixedModal: mask semantics end to end, backbone parity, cache, generation, losses, gradients,
serialization, backbones, patch encoders, training features (checkpointing, bf16, peft)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from transformers import AutoConfig, AutoModel, DynamicCache, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

from tiny_configs import (
    TEXT_HIGH,
    TEXT_LOW,
    image_block,
    llama_text_config,
    mixed_batch,
    mixed_row,
    pad_rows,
    perturb_zero_init,
    tiny_config,
    tiny_qwen2_config,
)
from transfusion_hf import TransfusionConfig, TransfusionForMixedModal, TransfusionOutput
from transfusion_hf.loss_transfusion import diffusion_loss


def make_model(
    config: TransfusionConfig | None = None, seed: int = 0, perturb: bool = True
) -> TransfusionForMixedModal:
    """A tiny model in eval mode; `perturb` gives the zero-initialised output layers random weights, so the image
    predictions depend on the inputs and gradients reach every layer."""
    torch.manual_seed(seed)
    model = TransfusionForMixedModal(config if config is not None else tiny_config())
    if perturb:
        perturb_zero_init(model, seed=seed)
    return model.eval()


def image_spans(input_ids: torch.LongTensor, config: TransfusionConfig) -> list[tuple[int, int]]:
    """(boi index, first index after the image placeholders) of each image of a 1D row."""
    ids = input_ids.tolist()
    boi_positions = [index for index, token in enumerate(ids) if token == config.boi_token_id]
    return [(boi, boi + 1 + config.num_patches) for boi in boi_positions]


def real_positions(batch: dict[str, torch.Tensor]) -> torch.BoolTensor:
    return batch["attention_mask"].bool()


# ============================================================================================ mask semantics
@pytest.mark.parametrize("patch_encoder", ["linear", "unet"])
@pytest.mark.parametrize("image_index", [0, 1, 2])
def test_perturbing_one_patch_changes_exactly_its_image_and_after(patch_encoder, image_index):
    config = tiny_config(patch_encoder=patch_encoder)
    model = make_model(config)
    batch = mixed_batch(config, [[3, 2, 1, 4], [5, 3]], seed=1)  # row 0: images 0, 1, 2; row 1: image 3
    batch.pop("diffusion_targets")
    perturbed = {key: value.clone() for key, value in batch.items()}
    # Change the LAST patch (bottom-right window, raster index 3) only: with the linear encoder only that position's
    # input changes, so earlier patches of the same image change only through bidirectional attention.
    perturbed["latents"][image_index, :, 2:4, 2:4] += 1.0
    with torch.no_grad():
        before = model(**batch, output_hidden_states=True)
        after = model(**perturbed, output_hidden_states=True)

    boi, image_end = image_spans(batch["input_ids"][0], config)[image_index]
    length = int(batch["attention_mask"][0].sum())
    hidden_change = (after.hidden_states[-1][0] - before.hidden_states[-1][0]).abs().amax(dim=-1)
    logits_change = (after.logits[0] - before.logits[0]).abs().amax(dim=-1)
    # Nothing up to and including `<boi>` moves (causal), bitwise.
    assert torch.equal(hidden_change[: boi + 1], torch.zeros(boi + 1))
    assert torch.equal(logits_change[: boi + 1], torch.zeros(boi + 1))
    # Every position of the image (all patches, bidirectional) and everything after it moves.
    assert (hidden_change[boi + 1 : length] > 1e-6).all(), hidden_change
    assert (logits_change[boi + 1 : length] > 1e-7).all(), logits_change
    # Image predictions: earlier images of the row are unchanged, this one and later ones change.
    prediction_change = (after.diffusion_predictions - before.diffusion_predictions).flatten(1).abs().amax(dim=1)
    assert torch.equal(prediction_change[:image_index], torch.zeros(image_index))
    assert (prediction_change[image_index:3] > 1e-7).all(), prediction_change
    # Rows are independent: row 1 (and its image 3) does not move at all.
    assert torch.equal(after.hidden_states[-1][1], before.hidden_states[-1][1])
    assert prediction_change[3] == 0
    assert image_end <= length


def test_without_block_mask_images_would_be_causal():
    """Sanity check of the test above: patch 0 does depend on patch 3 of the same image (bidirectional)."""
    config = tiny_config()
    model = make_model(config)
    batch = mixed_batch(config, [[2, 2]], seed=2)
    batch.pop("diffusion_targets")
    perturbed = {key: value.clone() for key, value in batch.items()}
    perturbed["latents"][0, :, 2:4, 2:4] += 1.0
    with torch.no_grad():
        before = model(**batch, output_hidden_states=True).hidden_states[-1]
        after = model(**perturbed, output_hidden_states=True).hidden_states[-1]
    first_patch = 3  # two text tokens, <boi>, then patch 0
    assert not torch.allclose(before[0, first_patch], after[0, first_patch], atol=1e-6)


# ============================================================================================ attention backends
def test_sdpa_and_eager_agree_on_mixed_input():
    config = tiny_config()
    model = make_model(config)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    assert eager.model.config._attn_implementation == "eager"
    assert model.model.config._attn_implementation == "sdpa"
    batch = mixed_batch(config, [[3, 2, 1, 4], [5], [2, 3]], seed=3)
    with torch.no_grad():
        out_sdpa = model(**batch, labels=batch["input_ids"])
        out_eager = eager(**batch, labels=batch["input_ids"])
    real = real_positions(batch)
    torch.testing.assert_close(out_eager.logits[real], out_sdpa.logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_eager.diffusion_predictions, out_sdpa.diffusion_predictions, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_eager.loss, out_sdpa.loss, atol=1e-5, rtol=1e-5)


def test_eager_config_builds_eager_backbone():
    model = make_model(tiny_config(attn_implementation="eager"))
    assert model.config._attn_implementation == "eager"
    assert model.model.config._attn_implementation == "eager"


def test_flex_attention_is_selectable():
    config = tiny_config(attn_implementation="flex_attention")
    model = make_model(config)
    assert model.config._attn_implementation == "flex_attention"
    assert model.model.config._attn_implementation == "flex_attention"
    if not torch.cuda.is_available():
        pytest.skip("flex_attention forward compiles for about a minute on CPU; checked on CUDA only")
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("sdpa")
    model.cuda()
    reference.cuda()
    batch = {k: v.cuda() for k, v in mixed_batch(config, [[3, 2, 4], [5, 2]], seed=4).items()}
    batch.pop("diffusion_targets")
    with torch.no_grad():
        flex, sdpa = model(**batch), reference(**batch)
    real = real_positions(batch)
    torch.testing.assert_close(flex.logits[real], sdpa.logits[real], atol=1e-4, rtol=1e-4)


FLASH_ERROR = r"flash_attention_2.*not supported.*bidirectional attention inside images"


def test_flash_attention_refused_at_init():
    config = tiny_config()
    config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match=FLASH_ERROR):
        TransfusionForMixedModal(config)


def test_flash_attention_in_text_config_refused_at_init():
    config = tiny_config()
    config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match=FLASH_ERROR):
        TransfusionForMixedModal(config)


def test_flash_attention_refused_by_from_pretrained(tmp_path):
    make_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=FLASH_ERROR):
        TransfusionForMixedModal.from_pretrained(tmp_path, attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match=r"flash_attention_3.*not supported.*bidirectional"):
        AutoModel.from_pretrained(tmp_path, attn_implementation="flash_attention_3")


def test_flash_attention_refused_by_set_attn_implementation():
    model = make_model()
    with pytest.raises(ValueError, match=FLASH_ERROR):
        model.set_attn_implementation("flash_attention_2")


def test_flash_attention_for_the_backbone_refused():
    model = make_model()
    with pytest.raises(ValueError, match=FLASH_ERROR):
        model.set_attn_implementation({"text_config": "flash_attention_2"})
    assert model.model.config._attn_implementation == "sdpa"
    # Set behind the model's back (no check there): mixed input is still refused rather than run plain causal.
    model.config.text_config._attn_implementation = "flash_attention_2"
    batch = mixed_batch(model.config, [[2, 2]], seed=5)
    with pytest.raises(ValueError, match=FLASH_ERROR):
        model(batch["input_ids"], latents=batch["latents"], timesteps=batch["timesteps"])


def test_no_private_transformers_method_overridden_for_the_flash_error():
    # The refusal lives in `__init__` and the public `set_attn_implementation` (see the tests above).
    ours = [cls for cls in TransfusionForMixedModal.__mro__ if cls.__module__.startswith("transfusion_hf")]
    assert len(ours) == 2 and all("_check_and_adjust_attn_implementation" not in vars(cls) for cls in ours)


# ============================================================================================ outputs (Llama's conventions)
def test_output_hidden_states_are_every_layer():
    config = tiny_config()
    model = make_model(config)
    batch = mixed_batch(config, [[3, 2, 1], [2, 3]], seed=8)
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"], output_hidden_states=True)
        plain = model(**batch, labels=batch["input_ids"])
    num_layers = config.text_config.num_hidden_layers
    assert isinstance(out.hidden_states, tuple) and len(out.hidden_states) == num_layers + 1
    shape = (*batch["input_ids"].shape, config.hidden_size)
    assert all(layer.shape == shape for layer in out.hidden_states)
    # Layers differ from one another (each is a layer's own output, not one tensor repeated).
    assert all(not torch.equal(a, b) for a, b in zip(out.hidden_states, out.hidden_states[1:]))
    # The first is the backbone's input: the image embeddings scattered in at the placeholders, text embeddings
    # elsewhere; the last is what the LM head reads (after the final norm).
    image_positions = batch["input_ids"] == config.image_token_id
    with torch.no_grad():
        image_embeds, _ = model.encode_images(batch["latents"], batch["timesteps"])
        text_embeds = model.get_input_embeddings()(batch["input_ids"])
    torch.testing.assert_close(out.hidden_states[0][image_positions], image_embeds.reshape(-1, config.hidden_size))
    torch.testing.assert_close(out.hidden_states[0][~image_positions], text_embeds[~image_positions])
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), out.logits)
    # Asking for them changes nothing else; not asking returns none.
    assert plain.hidden_states is None and plain.attentions is None
    torch.testing.assert_close(out.logits, plain.logits)
    torch.testing.assert_close(out.diffusion_predictions, plain.diffusion_predictions)


def test_return_dict_false_gives_the_dict_fields_as_a_tuple():
    config = tiny_config()
    model = make_model(config)
    batch = mixed_batch(config, [[3, 2, 1], [2, 3]], seed=9)
    kwargs = {"labels": batch["input_ids"], "output_hidden_states": True}
    with torch.no_grad():
        as_dict = model(**batch, **kwargs)
        as_tuple = model(**batch, **kwargs, return_dict=False)
    assert isinstance(as_tuple, tuple) and not isinstance(as_tuple, TransfusionOutput)
    expected = (
        as_dict.loss,
        as_dict.lm_loss,
        as_dict.diffusion_loss,
        as_dict.logits,
        as_dict.diffusion_predictions,
        as_dict.cache,
        as_dict.hidden_states,
    )
    assert len(as_tuple) == len(expected) == len(as_dict.to_tuple())
    for got, want in zip(as_tuple, expected):
        if isinstance(want, tuple):
            assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
        elif isinstance(want, torch.Tensor):
            assert torch.equal(got, want)
        else:
            assert type(got) is type(want)  # the cache
    # `config.return_dict=False` is the default of the call, as in every transformers model.
    model.config.return_dict = False
    try:
        with torch.no_grad():
            from_config = model(**batch, **kwargs)
            assert isinstance(model(**batch, **kwargs, return_dict=True), TransfusionOutput)
    finally:
        model.config.return_dict = True
    assert isinstance(from_config, tuple) and torch.equal(from_config[0], as_dict.loss)


def test_kwargs_reach_the_backbone_output_attentions_with_eager():
    config = tiny_config(attn_implementation="eager")
    model = make_model(config)
    batch = mixed_batch(config, [[3, 2]], seed=10)
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
    length = batch["input_ids"].shape[1]
    heads = config.text_config.num_attention_heads
    assert len(out.attentions) == config.text_config.num_hidden_layers
    assert all(layer.shape == (1, heads, length, length) for layer in out.attentions)
    # The weights show the Transfusion mask: the first patch attends to the last patch of its own image
    # (bidirectional), the last text token before <boi> attends to nothing after it (causal).
    boi = 3
    first_patch, last_patch = boi + 1, boi + config.num_patches
    for layer in out.attentions:
        assert (layer[0, :, first_patch, last_patch] > 0).all()
        assert (layer[0, :, boi - 1, boi:] == 0).all()
        torch.testing.assert_close(layer.sum(-1), torch.ones(1, heads, length))


def test_pixel_values_are_the_latents_of_a_pixel_space_model():
    config = tiny_config(latent_channels=3)
    model = make_model(config)
    batch = mixed_batch(config, [[3, 2, 1]], seed=11)
    batch.pop("diffusion_targets")
    with torch.no_grad():
        from_latents = model(**batch)
        pixel_values = batch.pop("latents")
        from_pixels = model(**batch, pixel_values=pixel_values)
    assert torch.equal(from_pixels.diffusion_predictions, from_latents.diffusion_predictions)
    assert torch.equal(from_pixels.logits, from_latents.logits)
    with pytest.raises(ValueError, match="Both `latents` and `pixel_values`"):
        model(**batch, pixel_values=pixel_values, latents=pixel_values)


def test_pixel_values_refused_by_a_latent_model():
    config = tiny_config()  # 4-channel VAE latents
    model = make_model(config)
    batch = mixed_batch(config, [[3, 2]], seed=12)
    with pytest.raises(ValueError, match=r"`pixel_values` has shape \(1, 3, 8, 8\).*vae\.encode\(pixel_values\)"):
        model(batch["input_ids"], pixel_values=torch.zeros(1, 3, 8, 8), timesteps=torch.zeros(1))


# ============================================================================================ text-only parity
def llama_twin(config: TransfusionConfig, model: TransfusionForMixedModal, cls=LlamaForCausalLM):
    """A plain causal LM with exactly the backbone's and LM head's weights."""
    text_model = cls(copy.deepcopy(config.text_config)).eval()
    missing, unexpected = text_model.load_state_dict(
        {k: v for k, v in model.state_dict().items() if k.startswith(("model.", "lm_head."))}
    )
    assert not missing and not unexpected
    return text_model


def text_batch(seed: int = 0) -> tuple[torch.LongTensor, torch.LongTensor]:
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randint(TEXT_LOW, TEXT_HIGH, (length,), generator=generator).tolist() for length in (9, 5, 7)]
    return pad_rows(rows)


def test_text_only_logits_equal_llama():
    config = tiny_config()
    torch.manual_seed(0)
    llama = LlamaForCausalLM(copy.deepcopy(config.text_config)).eval()
    model = TransfusionForMixedModal(config).eval()
    missing, unexpected = model.load_state_dict(llama.state_dict(), strict=False)
    assert not unexpected
    assert all(key.startswith(("image_encoder.", "image_decoder.", "patch_position_embedding.")) for key in missing)
    input_ids, attention_mask = text_batch()
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, llama(input_ids).logits)
        ours = model(input_ids, attention_mask=attention_mask).logits
        theirs = llama(input_ids, attention_mask=attention_mask).logits
    assert torch.equal(ours, theirs)


def test_text_only_greedy_generate_equals_llama():
    config = tiny_config()
    model = make_model(config)
    llama = llama_twin(config, model)
    input_ids, _ = text_batch(seed=1)
    input_ids = input_ids[:1, :9]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "eos_token_id": 2}
    assert torch.equal(model.generate(input_ids, **kwargs), llama.generate(input_ids, **kwargs))


def test_from_text_model_path(tmp_path):
    config = tiny_config()
    torch.manual_seed(0)
    llama = LlamaForCausalLM(copy.deepcopy(config.text_config)).eval()
    llama.save_pretrained(tmp_path)
    model = TransfusionForMixedModal.from_text_model(str(tmp_path), latent_size=4).eval()
    assert (model.config.boi_token_id, model.config.image_token_id) == (config.boi_token_id, config.image_token_id)
    input_ids, _ = text_batch(seed=3)
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, llama(input_ids).logits)


def test_from_text_model():
    config = tiny_config()
    torch.manual_seed(0)
    llama = LlamaForCausalLM(copy.deepcopy(config.text_config)).eval()
    model = TransfusionForMixedModal.from_text_model(
        llama,
        latent_size=4,
        patch_size=2,
        boi_token_id=config.boi_token_id,
        eoi_token_id=config.eoi_token_id,
        image_token_id=config.image_token_id,
    ).eval()
    assert isinstance(model.config, TransfusionConfig)
    assert model.config.text_config.model_type == "llama"
    assert model.config.num_patches == 4
    input_ids, attention_mask = text_batch(seed=2)
    with torch.no_grad():
        assert torch.equal(
            model(input_ids, attention_mask=attention_mask).logits,
            llama(input_ids, attention_mask=attention_mask).logits,
        )
    # The new image layers start as in a fresh model (zero-init output layer) and the model runs on mixed input.
    assert torch.count_nonzero(model.image_decoder.proj.weight) == 0
    batch = mixed_batch(model.config, [[2, 3]], seed=2)
    output = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(output.loss)


# ============================================================================================ generation
def test_generate_with_image_in_prompt():
    config = tiny_config()
    model = make_model(config)
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.tensor([mixed_row(config, [3, 2, 2], generator)])  # two images in the prompt
    latents = torch.randn(2, 4, 4, 4, generator=generator)
    timesteps = torch.zeros(2)
    output = model.generate(
        input_ids, latents=latents, timesteps=timesteps, max_new_tokens=3, do_sample=False, pad_token_id=0
    )
    assert output.shape == (1, input_ids.shape[1] + 3)
    assert torch.equal(output[:, : input_ids.shape[1]], input_ids)
    with torch.no_grad():
        logits = model(input_ids, latents=latents, timesteps=timesteps).logits
    assert output[0, input_ids.shape[1]] == logits[0, -1].argmax()
    # The continuation equals step-by-step argmax decoding without any cache.
    sequence = input_ids
    with torch.no_grad():
        for _ in range(3):
            next_token = (
                model(sequence, latents=latents, timesteps=timesteps, use_cache=False).logits[:, -1].argmax(-1)
            )
            sequence = torch.cat([sequence, next_token[:, None]], dim=1)
    assert torch.equal(output, sequence)


def test_generate_num_return_sequences_keeps_each_rows_images():
    """Expanded rows (num_return_sequences, beams) must keep their own images in reading order: the prefill sees
    each row's images repeated as a block, and with top_k=1 sampling every returned sequence equals the greedy one."""
    config = tiny_config()
    model = make_model(config)
    prefill_inputs = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: prefill_inputs.append(kwargs) if "latents" in kwargs else None, with_kwargs=True
    )
    generator = torch.Generator().manual_seed(5)
    rows = [mixed_row(config, [3, 2, 2], generator), mixed_row(config, [2, 1], generator)]  # 2 images, then 1
    latents = 3.0 * torch.randn(3, 4, 4, 4, generator=generator)
    timesteps = torch.tensor([0.0, 300.0, 600.0])
    length = max(len(row) for row in rows)
    input_ids = torch.tensor([[0] * (length - len(row)) + row for row in rows])  # left-padded
    attention_mask = torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows])
    batch = {"attention_mask": attention_mask, "latents": latents, "timesteps": timesteps}
    kwargs = {"max_new_tokens": 4, "pad_token_id": 0}
    greedy = model.generate(input_ids, do_sample=False, **batch, **kwargs)
    sampled = model.generate(input_ids, do_sample=True, top_k=1, num_return_sequences=3, **batch, **kwargs)
    expected_order = torch.tensor([0, 1, 0, 1, 0, 1, 2, 2, 2])  # row 0's (a, b) three times, then row 1's c
    assert torch.equal(prefill_inputs[-1]["latents"], latents[expected_order])
    assert torch.equal(prefill_inputs[-1]["timesteps"], timesteps[expected_order])
    assert torch.equal(sampled, greedy.repeat_interleave(3, dim=0))
    # Beam search goes through the same expansion.
    model.generate(input_ids, do_sample=False, num_beams=2, **batch, **kwargs)
    assert torch.equal(prefill_inputs[-1]["latents"], latents[torch.tensor([0, 1, 0, 1, 2, 2])])


def test_generate_with_image_without_cache():
    config = tiny_config()
    model = make_model(config)
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.tensor([mixed_row(config, [3, 2], generator)])
    latents = torch.randn(1, 4, 4, 4, generator=generator)
    kwargs = {
        "latents": latents,
        "timesteps": torch.zeros(1),
        "max_new_tokens": 3,
        "do_sample": False,
        "pad_token_id": 0,
    }
    assert torch.equal(model.generate(input_ids, use_cache=False, **kwargs), model.generate(input_ids, **kwargs))


def test_generate_batched_left_padded_with_images_matches_single_rows():
    config = tiny_config()
    model = make_model(config)
    generator = torch.Generator().manual_seed(6)
    rows = [mixed_row(config, [3, 2], generator), mixed_row(config, [1, 1, 2], generator)]
    latents = torch.randn(3, 4, 4, 4, generator=generator)
    length = max(len(row) for row in rows)
    input_ids = torch.tensor([[0] * (length - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows])
    kwargs = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    batched = model.generate(
        input_ids, attention_mask=attention_mask, latents=latents, timesteps=torch.zeros(3), **kwargs
    )
    for row, row_latents, new_tokens in zip(rows, (latents[:1], latents[1:]), batched[:, length:]):
        single = model.generate(
            torch.tensor([row]), latents=row_latents, timesteps=torch.zeros(len(row_latents)), **kwargs
        )
        assert torch.equal(single[0, len(row) :], new_tokens)


# ============================================================================================ KV cache
@pytest.mark.parametrize("patch_encoder", ["linear", "unet"])
def test_kv_cache_image_block_matches_uncached(patch_encoder):
    config = tiny_config(patch_encoder=patch_encoder)
    model = make_model(config)
    generator = torch.Generator().manual_seed(7)
    # Prefix with an earlier image, then text and <boi>; the new image is the cached chunk.
    prefix = mixed_row(config, [3, 2], generator) + [config.boi_token_id]
    num_patches = config.num_patches
    full_ids = torch.tensor([prefix + [config.image_token_id] * num_patches])
    latents = torch.randn(2, 4, 4, 4, generator=generator)
    timesteps = torch.tensor([0.0, 500.0])
    with torch.no_grad():
        reference = model(full_ids, latents=latents, timesteps=timesteps, output_hidden_states=True)
        cache = DynamicCache(config=model.config.text_config)
        model(torch.tensor([prefix]), latents=latents[:1], timesteps=timesteps[:1], cache=cache, use_cache=True)
        assert cache.get_seq_length() == len(prefix)
        image_ids = full_ids[:, len(prefix) :]
        for _ in range(2):  # two denoising steps on the same prefix: crop between them
            step = model(
                image_ids,
                latents=latents[1:],
                timesteps=timesteps[1:],
                cache=cache,
                use_cache=True,
                output_hidden_states=True,
            )
            torch.testing.assert_close(
                step.diffusion_predictions, reference.diffusion_predictions[1:], atol=1e-5, rtol=1e-5
            )
            assert len(step.hidden_states) == len(reference.hidden_states) == config.text_config.num_hidden_layers + 1
            for step_layer, reference_layer in zip(step.hidden_states, reference.hidden_states):
                torch.testing.assert_close(step_layer, reference_layer[:, len(prefix) :], atol=1e-5, rtol=1e-5)
            assert cache.get_seq_length() == len(prefix) + num_patches
            cache.crop(-num_patches)
            assert cache.get_seq_length() == len(prefix)
        # Write the clean image once more (no crop), then continue with <eoi> + text like the full forward.
        model(image_ids, latents=latents[1:], timesteps=timesteps[1:], cache=cache, use_cache=True)
        tail = [config.eoi_token_id, TEXT_LOW, TEXT_LOW + 1]
        continued = model(torch.tensor([tail]), cache=cache, use_cache=True)
        full_with_tail = model(
            torch.cat([full_ids, torch.tensor([tail])], dim=1), latents=latents, timesteps=timesteps
        )
    torch.testing.assert_close(continued.logits, full_with_tail.logits[:, -len(tail) :], atol=1e-5, rtol=1e-5)


def test_kv_cache_with_padding_mask():
    """The cached image chunk also works with a 2D mask over prefix + chunk (left-padded prefix)."""
    config = tiny_config()
    model = make_model(config)
    generator = torch.Generator().manual_seed(8)
    prefix = mixed_row(config, [4], generator) + [config.boi_token_id]
    image = [config.image_token_id] * config.num_patches
    padded_prefix = [0, 0] + prefix
    latents = torch.randn(1, 4, 4, 4, generator=generator)
    timesteps = torch.tensor([250.0])
    with torch.no_grad():
        reference = model(torch.tensor([prefix + image]), latents=latents, timesteps=timesteps)
        cache = DynamicCache(config=model.config.text_config)
        prefix_mask = torch.tensor([[0, 0] + [1] * len(prefix)])
        positions = (prefix_mask.cumsum(-1) - 1).clamp(min=0)
        model(torch.tensor([padded_prefix]), attention_mask=prefix_mask, position_ids=positions, cache=cache)
        full_mask = torch.cat([prefix_mask, torch.ones(1, len(image), dtype=torch.long)], dim=1)
        image_positions = torch.arange(len(prefix), len(prefix) + len(image))[None]
        step = model(
            torch.tensor([image]),
            attention_mask=full_mask,
            position_ids=image_positions,
            latents=latents,
            timesteps=timesteps,
            cache=cache,
        )
    torch.testing.assert_close(step.diffusion_predictions, reference.diffusion_predictions, atol=1e-5, rtol=1e-5)


# ============================================================================================ gradients
# Parameters upstream of a zero-initialised layer (DiT-style: the U-Net's residual `conv_2` and the decoder's output
# conv) get an exactly zero gradient at init. Nothing else may.
UNET_ZERO_GRAD_AT_INIT = (
    r"image_encoder\.(timestep_embedding|levels\.\d+\.\d+\.(norm_1|conv_1|time_proj|norm_2))\."
    r"|image_decoder\.(?!conv_out)"
)


def _zero_grad_names(model):
    return [name for name, parameter in model.named_parameters() if parameter.grad.abs().sum() == 0]


def _check_all_grads_finite(model):
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad, name
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name


@pytest.mark.parametrize("patch_encoder", ["linear", "unet"])
def test_every_trainable_parameter_gets_a_finite_gradient(patch_encoder):
    config = tiny_config(patch_encoder=patch_encoder)
    batch = mixed_batch(config, [[3, 2, 4], [5], [2, 3]], seed=9)

    # At init: every parameter gets a finite gradient tensor. With the linear layers all of them are non-zero (the
    # encoder is reached through the LM loss of the text after each image, the zero decoder still gets its own
    # gradient); with the U-Net, exactly the parameters upstream of a zero-initialised layer get zero.
    model = make_model(config, perturb=False).train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    _check_all_grads_finite(model)
    zero = _zero_grad_names(model)
    if patch_encoder == "linear":
        assert zero == []
    else:
        assert zero and all(re.match(UNET_ZERO_GRAD_AT_INIT, name) for name in zero), zero
        assert model.image_decoder.conv_out.weight.grad.abs().sum() > 0
        assert model.image_encoder.conv_in.weight.grad.abs().sum() > 0

    # With non-zero output layers (as after training), every parameter gets a non-zero gradient.
    model = make_model(config, perturb=True).train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    _check_all_grads_finite(model)
    assert _zero_grad_names(model) == []


def test_optimizer_steps_unblock_gradients_from_zero_init():
    """From the true init, three SGD steps make every U-Net gradient non-zero (one zero layer unblocks per step)."""
    config = tiny_config(patch_encoder="unet")
    batch = mixed_batch(config, [[3, 2, 4], [2, 3]], seed=10)
    model = make_model(config, perturb=False).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    _check_all_grads_finite(model)
    assert _zero_grad_names(model) == []


# ============================================================================================ losses
def hand_lm_loss(logits, input_ids, attention_mask, config):
    """Cross-entropy summed position by position: position i (a real text or <eoi> input) predicts token i + 1."""
    total, count = 0.0, 0
    for row in range(input_ids.shape[0]):
        length = int(attention_mask[row].sum())
        for i in range(length - 1):
            if int(input_ids[row, i]) in (config.boi_token_id, config.image_token_id):
                continue
            log_probs = torch.log_softmax(logits[row, i].double(), dim=-1)
            total += -float(log_probs[input_ids[row, i + 1]])
            count += 1
    return total / count, count


def test_lm_loss_excludes_image_and_boi_positions():
    config = tiny_config()
    model = make_model(config)
    batch = mixed_batch(config, [[3, 2, 4], [5], [2, 3]], seed=11)
    with torch.no_grad():
        output = model(**batch, labels=batch["input_ids"])
    expected, count = hand_lm_loss(output.logits, batch["input_ids"], batch["attention_mask"], config)
    # Row 0 (21 tokens, 2 images): 20 predictions minus 2 <boi> and 8 image inputs; row 1: 4; row 2: 10 - 1 - 4.
    assert count == 10 + 4 + 5
    torch.testing.assert_close(
        output.lm_loss.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=1e-5
    )
    # Labels at image positions and at padding do not matter; the label <boi> (predicted by the text before it) does.
    labels = batch["input_ids"].clone()
    labels[labels == config.image_token_id] = 7
    labels[batch["attention_mask"] == 0] = 9
    with torch.no_grad():
        assert torch.equal(model(**batch, labels=labels).lm_loss, output.lm_loss)
        labels[labels == config.boi_token_id] = 7
        assert not torch.equal(model(**batch, labels=labels).lm_loss, output.lm_loss)


def test_lm_loss_ignores_minus_100_labels():
    config = tiny_config()
    model = make_model(config)
    input_ids, attention_mask = text_batch(seed=12)
    labels = input_ids.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        output = model(input_ids, attention_mask=attention_mask, labels=labels)
        logits = output.logits
    total, count = 0.0, 0
    for row in range(3):
        for i in range(3, int(attention_mask[row].sum()) - 1):
            total += -float(torch.log_softmax(logits[row, i].double(), -1)[input_ids[row, i + 1]])
            count += 1
    torch.testing.assert_close(
        output.lm_loss.double(), torch.tensor(total / count, dtype=torch.float64), atol=1e-5, rtol=1e-5
    )
    assert output.diffusion_loss is None
    assert torch.equal(output.loss, output.lm_loss)


def loss_and_gradients(model: TransfusionForMixedModal, batch: dict, **kwargs) -> tuple[TransfusionOutput, dict]:
    model.zero_grad(set_to_none=True)
    output = model(**batch, **kwargs)
    output.loss.backward()
    return output, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layout", ["mixed", "text_only", "experts"])
def test_skip_logits_same_loss_and_gradients_with_the_lm_head_on_text_positions_only(layout):
    """Training with labels runs the LM head on the positions that are not image placeholders (by default), and the
    loss and every gradient are those of the logits of every position."""
    config = tiny_config(modality_experts=layout == "experts")
    model = make_model(config).train()
    if layout == "text_only":
        input_ids, attention_mask = text_batch(seed=14)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    else:
        batch = mixed_batch(config, [[3, 2, 4], [5], [2, 3]], seed=14)
    labels = batch["input_ids"].clone()
    labels[0, :2] = -100
    head_rows = []
    hook = model.lm_head.register_forward_hook(lambda _m, inputs, _o: head_rows.append(inputs[0].shape[:-1].numel()))
    full, full_gradients = loss_and_gradients(model, batch, labels=labels, skip_logits=False)
    skipped, skipped_gradients = loss_and_gradients(model, batch, labels=labels)
    hook.remove()
    assert full.logits.shape[:2] == batch["input_ids"].shape and skipped.logits is None
    placeholders = int((batch["input_ids"] == config.image_token_id).sum())
    assert head_rows == [batch["input_ids"].numel(), batch["input_ids"].numel() - placeholders]
    assert (placeholders > 0) == (layout != "text_only")
    torch.testing.assert_close(skipped.lm_loss, full.lm_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(skipped.loss, full.loss, rtol=1e-6, atol=1e-6)
    assert skipped_gradients.keys() == full_gradients.keys()
    for name, gradient in full_gradients.items():
        torch.testing.assert_close(skipped_gradients[name], gradient, rtol=1e-5, atol=1e-7, msg=name)


def test_skip_logits_default_only_when_training_with_labels():
    config = tiny_config()
    model = make_model(config)
    batch = mixed_batch(config, [[3, 2, 4], [2, 3]], seed=15)
    with torch.no_grad():
        evaluated = model(**batch, labels=batch["input_ids"])
        assert evaluated.logits is not None  # eval mode: every position's logits, as transformers returns them
        model.train()
        assert model(**batch).logits is not None  # no labels: the logits are the output
        trained = model(**batch, labels=batch["input_ids"])
        assert trained.logits is None
        torch.testing.assert_close(trained.lm_loss, evaluated.lm_loss, rtol=1e-6, atol=1e-6)
        # Asked for without labels: no LM head at all (a diffusion-only forward).
        diffusion_only = model(**batch, skip_logits=True)
        assert diffusion_only.logits is None and diffusion_only.lm_loss is None
        torch.testing.assert_close(diffusion_only.loss, 5.0 * evaluated.diffusion_loss)


def test_diffusion_loss_is_per_image_mean_then_mean_over_images():
    predictions = torch.zeros(2, 4, 4, 4)
    targets = torch.ones(2, 4, 4, 4)
    targets[1] *= 3.0
    targets[1, 0, 0, 0] = 0.0  # image 1 has mse (63 * 9) / 64
    expected = (1.0 + 63 * 9 / 64) / 2
    torch.testing.assert_close(diffusion_loss(predictions, targets), torch.tensor(expected))


def test_model_losses_and_total():
    config = tiny_config()
    model = make_model(config)
    batch = mixed_batch(config, [[3, 2, 4], [2, 3]], seed=13)
    with torch.no_grad():
        output = model(**batch, labels=batch["input_ids"])
    per_image = (output.diffusion_predictions - batch["diffusion_targets"]).pow(2).flatten(1).mean(1)
    assert per_image.shape == (3,)
    torch.testing.assert_close(output.diffusion_loss, per_image.mean())
    torch.testing.assert_close(output.loss, output.lm_loss + 5.0 * output.diffusion_loss)
    # The weight is read from the config.
    weighted = make_model(tiny_config(diffusion_loss_weight=0.5))
    with torch.no_grad():
        out = weighted(**batch, labels=batch["input_ids"])
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.diffusion_loss)


def test_diffusion_only_loss():
    config = tiny_config()
    model = make_model(config)
    batch = mixed_batch(config, [[1, 1]], seed=14)
    with torch.no_grad():
        output = model(**batch)
    assert output.lm_loss is None
    torch.testing.assert_close(output.loss, 5.0 * output.diffusion_loss)


# ============================================================================================ batching
def test_any_number_of_images_per_row_matches_rows_alone():
    config = tiny_config()
    model = make_model(config)
    rows_text_lengths = [[4], [2, 3], [1, 2, 1, 3], [3, 0, 2]]  # 0, 1, 3 and 2 images, different lengths
    batch = mixed_batch(config, rows_text_lengths, seed=15)
    with torch.no_grad():
        output = model(**batch, labels=batch["input_ids"])
    assert output.diffusion_predictions.shape == (6, 4, 4, 4)
    assert torch.isfinite(output.loss)
    first_image = 0
    for row, text_lengths in enumerate(rows_text_lengths):
        num_images = len(text_lengths) - 1
        length = int(batch["attention_mask"][row].sum())
        single = {"input_ids": batch["input_ids"][row : row + 1, :length]}
        if num_images:
            single["latents"] = batch["latents"][first_image : first_image + num_images]
            single["timesteps"] = batch["timesteps"][first_image : first_image + num_images]
        with torch.no_grad():
            alone = model(**single)
        torch.testing.assert_close(output.logits[row, :length], alone.logits[0], atol=1e-5, rtol=1e-5)
        if num_images:
            torch.testing.assert_close(
                output.diffusion_predictions[first_image : first_image + num_images],
                alone.diffusion_predictions,
                atol=1e-5,
                rtol=1e-5,
            )
        first_image += num_images


def test_image_only_and_adjacent_images():
    config = tiny_config()
    model = make_model(config)
    input_ids = torch.tensor([image_block(config) + image_block(config)])
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(16))
    with torch.no_grad():
        output = model(input_ids, latents=latents, timesteps=torch.tensor([1.0, 999.0]), labels=input_ids)
    assert output.diffusion_predictions.shape == (2, 4, 4, 4)
    assert torch.isfinite(output.lm_loss)  # only the <eoi> positions count


# ============================================================================================ serialization
def test_zero_init_layers_are_zero_after_init():
    for patch_encoder in ("linear", "unet"):
        model = make_model(tiny_config(patch_encoder=patch_encoder), perturb=False)
        flagged = [m for m in model.modules() if getattr(m, "_transfusion_zero_init", False)]
        assert flagged
        for module in flagged:
            assert torch.count_nonzero(module.weight) == 0
            assert module.bias is None or torch.count_nonzero(module.bias) == 0
        # Everything else is properly initialised (not left at zero).
        assert model.image_encoder.proj.weight.abs().sum() > 0
        assert model.patch_position_embedding.weight.abs().sum() > 0


@pytest.mark.parametrize("backbone", ["llama", "qwen2"])
@pytest.mark.parametrize("patch_encoder", ["linear", "unet"])
def test_save_and_from_pretrained_round_trip(tmp_path, patch_encoder, backbone):
    config = (tiny_config if backbone == "llama" else tiny_qwen2_config)(patch_encoder=patch_encoder)
    model = make_model(config)  # perturbed: the zero-init layers must be loaded, not re-initialised
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), TransfusionConfig)
    loaded = TransfusionForMixedModal.from_pretrained(tmp_path).eval()
    auto = AutoModel.from_pretrained(tmp_path).eval()
    assert type(auto) is TransfusionForMixedModal
    assert loaded.model.config._attn_implementation == "sdpa"
    assert (
        TransfusionForMixedModal.from_pretrained(
            tmp_path, attn_implementation="eager"
        ).model.config._attn_implementation
        == "eager"
    )
    batch = mixed_batch(config, [[3, 2, 4], [2, 3]], seed=17)
    with torch.no_grad():
        reference = model(**batch, labels=batch["input_ids"])
        for other in (loaded, auto):
            output = other(**batch, labels=batch["input_ids"])
            assert torch.equal(output.logits, reference.logits)
            assert torch.equal(output.diffusion_predictions, reference.diffusion_predictions)
            assert torch.equal(output.loss, reference.loss)


def test_tied_embeddings_round_trip(tmp_path):
    config = tiny_config(text_config=llama_text_config(tie_word_embeddings=True))
    model = make_model(config)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    model.save_pretrained(tmp_path)
    loaded = TransfusionForMixedModal.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    input_ids, attention_mask = text_batch(seed=18)
    with torch.no_grad():
        assert torch.equal(
            loaded(input_ids, attention_mask=attention_mask).logits,
            model(input_ids, attention_mask=attention_mask).logits,
        )


# ============================================================================================ variants
def test_qwen2_backbone_mixed_forward_and_text_parity():
    config = tiny_qwen2_config()
    model = make_model(config)
    assert type(model.model).__name__ == "Qwen2Model"
    batch = mixed_batch(config, [[3, 2, 4], [5], [2, 3]], seed=19)
    output = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(output.loss)
    output.loss.backward()
    qwen = llama_twin(config, model, cls=Qwen2ForCausalLM)
    input_ids, attention_mask = text_batch(seed=19)
    with torch.no_grad():
        assert torch.equal(
            model(input_ids, attention_mask=attention_mask).logits,
            qwen(input_ids, attention_mask=attention_mask).logits,
        )


def test_mistral_sliding_window_backbone():
    """A Mistral backbone with a short sliding window: text parity with MistralForCausalLM, and the mixed forward
    keeps the window (a far-away image does not reach the last text tokens directly through 2 layers)."""
    window = 4
    config = tiny_config(text_config=llama_text_config(model_type="mistral", sliding_window=window, head_dim=8))
    model = make_model(config)
    mistral = llama_twin(config, model, cls=MistralForCausalLM)
    input_ids, attention_mask = text_batch(seed=27)
    with torch.no_grad():
        ours = model(input_ids, attention_mask=attention_mask).logits
        assert torch.equal(ours, mistral(input_ids, attention_mask=attention_mask).logits)
    # Image 0 sits at positions 3..6 of a 20-token row; with 2 layers of window 4 a token sees at most 6 positions
    # back, so the last tokens cannot depend on the image's latents.
    batch = mixed_batch(config, [[2, 13]], seed=27)
    batch.pop("diffusion_targets")
    perturbed = {key: value.clone() for key, value in batch.items()}
    perturbed["latents"] += 1.0
    with torch.no_grad():
        before = model(**batch).logits[0]
        after = model(**perturbed).logits[0]
    change = (after - before).abs().amax(dim=-1)
    assert (change[3:7] > 0).all()
    assert torch.equal(change[-5:], torch.zeros(5))


@pytest.mark.parametrize(("patch_size", "latent_size"), [(2, 4), (4, 8), (1, 2)])
def test_unet_patch_encoder(patch_size, latent_size):
    config = tiny_config(patch_encoder="unet", patch_size=patch_size, latent_size=latent_size)
    assert config.num_patches == (latent_size // patch_size) ** 2
    model = make_model(config).train()
    batch = mixed_batch(config, [[2, 3, 1], [3, 2]], seed=20)
    output = model(**batch, labels=batch["input_ids"])
    assert output.diffusion_predictions.shape == (3, 4, latent_size, latent_size)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    assert model.image_encoder.conv_in.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow_prediction"])
def test_prediction_types_build_and_run(prediction_type):
    config = tiny_config(prediction_type=prediction_type)
    model = make_model(config)
    batch = mixed_batch(config, [[2, 3]], seed=21)
    if prediction_type == "flow_prediction":
        batch["timesteps"] = torch.rand(1) * config.num_train_timesteps  # fractional sigma * T
    output = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(output.loss)
    assert output.diffusion_predictions.shape == batch["latents"].shape


def test_no_patch_position_embedding():
    config = tiny_config(patch_position_embedding=False)
    model = make_model(config)
    assert model.patch_position_embedding is None
    batch = mixed_batch(config, [[2, 3]], seed=22)
    assert torch.isfinite(model(**batch, labels=batch["input_ids"]).loss)


# ============================================================================================ training features
def test_gradient_checkpointing_same_loss_and_gradients():
    config = tiny_config()
    batch = mixed_batch(config, [[3, 2, 4], [2, 3]], seed=23)
    reference = make_model(config).train()
    checkpointed = copy.deepcopy(reference)
    enable = (
        getattr(checkpointed, "activation_checkpointing_enable", None) or checkpointed.gradient_checkpointing_enable
    )
    enable()
    assert checkpointed.is_gradient_checkpointing
    losses = []
    for model in (reference, checkpointed):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)
    for (name, p_ref), (_, p_ckpt) in zip(reference.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(p_ckpt.grad, p_ref.grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("patch_encoder", ["linear", "unet"])
def test_bf16_forward_finite(patch_encoder):
    config = tiny_config(patch_encoder=patch_encoder)
    model = make_model(config).to(torch.bfloat16)
    batch = mixed_batch(config, [[3, 2, 4], [2, 3]], seed=24)  # float32 latents: cast inside
    output = model(**batch, labels=batch["input_ids"])
    assert output.logits.dtype == torch.bfloat16
    assert torch.isfinite(output.loss)
    output.loss.backward()
    assert all(torch.isfinite(p.grad.float()).all() for p in model.parameters())


def test_peft_lora_trains_lora_and_image_layers_only():
    peft = pytest.importorskip("peft")
    config = tiny_config()
    model = make_model(config, perturb=False)
    backbone_before = {k: v.clone() for k, v in model.model.state_dict().items()}
    lora = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            modules_to_save=["image_encoder", "image_decoder", "patch_position_embedding"],
        ),
    )
    lora.train()
    batch = mixed_batch(config, [[3, 2, 4], [2, 3]], seed=25)
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(5):
        loss = lora(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        if step == 0:
            trained = {name: p.grad for name, p in lora.named_parameters() if p.requires_grad}
            # Only LoRA matrices and the trainable copies of the image layers train; all of them get a gradient.
            assert all("lora_" in name or ".modules_to_save.default." in name for name in trained), list(trained)
            assert all(grad is not None and torch.isfinite(grad).all() for grad in trained.values())
            # (lora_A's gradient is zero until lora_B, zero at init, has moved: checked at the next step.)
            for module_name in ("image_encoder", "image_decoder", "patch_position_embedding", "lora_B"):
                assert any(module_name in n and g.abs().sum() > 0 for n, g in trained.items()), module_name
        if step == 1:
            assert all(p.grad.abs().sum() > 0 for n, p in lora.named_parameters() if "lora_A" in n)
            frozen = [p for p in lora.parameters() if not p.requires_grad]
            assert frozen and all(p.grad is None for p in frozen)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    # The frozen backbone weights did not move (peft renames a wrapped layer's weight to `base_layer.weight`).
    after = {k.replace(".base_layer.", "."): v for k, v in lora.get_base_model().model.state_dict().items()}
    for key, value in backbone_before.items():
        assert torch.equal(after[key], value), key


# ============================================================================================ input errors
@pytest.fixture(scope="module")
def model_and_batch():
    config = tiny_config()
    model = make_model(config)
    batch = mixed_batch(config, [[3, 2, 4], [2, 3]], seed=26)  # 3 images
    return model, batch


def test_error_placeholders_without_latents(model_and_batch):
    model, batch = model_and_batch
    with pytest.raises(ValueError, match=r"hold 12 image placeholders \(image_token_id=95\) but no `latents`"):
        model(batch["input_ids"])


def test_error_wrong_latents_shape(model_and_batch):
    model, batch = model_and_batch
    with pytest.raises(ValueError, match=r"`latents` has a latent grid of 8x8: each side must be a multiple of "
                       r"`patch_size`=2 and at most `max_latent_size`=4"):  # fmt: skip
        model(batch["input_ids"], latents=torch.zeros(3, 4, 8, 8), timesteps=torch.zeros(3))
    with pytest.raises(ValueError, match=r"`latents` has shape \(3, 3, 4, 4\), expected \(num_images, C, H, W\) with "
                       r"C = `latent_channels`=4"):  # fmt: skip
        model(batch["input_ids"], latents=torch.zeros(3, 3, 4, 4), timesteps=torch.zeros(3))
    with pytest.raises(ValueError, match=r"`latents` has shape \(3, 64\)"):
        model(batch["input_ids"], latents=torch.zeros(3, 64), timesteps=torch.zeros(3))


def test_error_wrong_timesteps_shape(model_and_batch):
    model, batch = model_and_batch
    with pytest.raises(ValueError, match=r"`timesteps` has shape \(3, 1\), expected \(3,\)"):
        model(batch["input_ids"], latents=batch["latents"], timesteps=torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"`timesteps` has shape None, expected \(3,\)"):
        model(batch["input_ids"], latents=batch["latents"])


def test_error_placeholder_count_mismatch(model_and_batch):
    model, batch = model_and_batch
    with pytest.raises(
        ValueError, match=r"hold 12 image placeholders but `latents` has 2 images of 4 patches \(8 expected\)"
    ):
        model(batch["input_ids"], latents=batch["latents"][:2], timesteps=batch["timesteps"][:2])
    truncated = batch["input_ids"].clone()
    truncated[0, 4] = TEXT_LOW  # one placeholder fewer
    with pytest.raises(ValueError, match=r"hold 11 image placeholders"):
        model(truncated, latents=batch["latents"], timesteps=batch["timesteps"])


def test_error_diffusion_targets_shape(model_and_batch):
    model, batch = model_and_batch
    with pytest.raises(ValueError, match=r"`diffusion_targets` has shape \(2, 4, 4, 4\), expected \(3, 4, 4, 4\)"):
        model(
            batch["input_ids"],
            latents=batch["latents"],
            timesteps=batch["timesteps"],
            diffusion_targets=batch["diffusion_targets"][:2],
        )


def test_error_diffusion_targets_without_images(model_and_batch):
    model, _ = model_and_batch
    input_ids, _ = text_batch()
    with pytest.raises(ValueError, match=r"`diffusion_targets` were given but the batch holds no images"):
        model(input_ids, diffusion_targets=torch.zeros(1, 4, 4, 4))


def test_error_labels_with_logits_to_keep(model_and_batch):
    model, batch = model_and_batch
    with pytest.raises(ValueError, match=r"logits_to_keep=0"):
        model(
            **{k: v for k, v in batch.items() if k != "diffusion_targets"}, labels=batch["input_ids"], logits_to_keep=1
        )
