"""The training-recipe fixes: U-Net patch layers from diffusers' blocks with fan-in init, U-Net skip selection, causal
image attention, min-SNR-gamma weights, logit-normal timesteps, clean-image prediction and its error tracker, and the
training script's early checks of the new flags."""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from pipeline_components import get_tokenizer
from tiny_configs import (
    IMAGE_TOKEN_ID,
    image_block,
    llama_text_config,
    mixed_batch,
    pad_rows,
    perturb_zero_init,
    random_text,
    tiny_config,
)
from transfusion_hf import TransfusionConfig, TransfusionForMixedModal, training
from transfusion_hf.data.collator import TransfusionDataCollator
from transfusion_hf.image_layers import TransfusionTimestepEmbedding, sinusoidal_timestep_features
from transfusion_hf.loss_transfusion import diffusion_loss
from transfusion_hf.masking_transfusion import build_transfusion_mask
from transfusion_hf.noising import TransfusionNoiser
from transfusion_hf.pipeline_transfusion import TransfusionPipeline
from transfusion_hf.processing_transfusion import TransfusionProcessor
from transfusion_hf.recipes import load_recipe
from transfusion_hf.training import CleanImageErrorTracker
from transfusion_hf.training.model_setup import load_model_preset

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_transfusion.py"
PREDICTION_TYPES = ["epsilon", "v_prediction", "flow_prediction"]


def make_model(config: TransfusionConfig, seed: int = 0, perturb: bool = False) -> TransfusionForMixedModal:
    torch.manual_seed(seed)
    model = TransfusionForMixedModal(config)
    if perturb:
        perturb_zero_init(model, seed=seed)
    return model.eval()


def small_unet_config(**overrides) -> TransfusionConfig:
    """The image layers of the default recipe `small` (pixel space, 32x32, patch 8, a 8 -> 64 channel U-Net), on a
    64-wide, 2-layer backbone."""
    fields = {key: value for key, value in load_recipe("small").model.items() if key != "text_config"}
    assert fields["patch_encoder"] == "unet" and fields["unet_block_out_channels"] == [8, 16, 32, 64]
    fields.update(latent_channels=3, latent_size=32)
    if overrides.get("patch_encoder") == "linear":  # the preset's U-Net shortcuts have nothing to attach to
        fields.update(unet_linear_shortcut=False, unet_output_shortcut=False)
    fields.update(overrides)
    return tiny_config(text_config=llama_text_config(hidden_size=64, intermediate_size=128), **fields)


def ddpm(prediction_type: str = "epsilon") -> DDPMScheduler:
    """The training script's DDPM (squaredcos_cap_v2, no clipping)."""
    return DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False, prediction_type=prediction_type)


def scheduler_for(prediction_type: str):
    return FlowMatchEulerDiscreteScheduler() if prediction_type == "flow_prediction" else ddpm(prediction_type)


def random_images(num: int, seed: int = 0, shape=(4, 4, 4), scale: float = 1.0) -> torch.Tensor:
    return torch.randn((num, *shape), generator=torch.Generator().manual_seed(seed)) * scale


# ============================================================================================ U-Net initialisation
def test_unet_encoder_keeps_the_signal_at_every_level():
    """Before the fan-in init, N(0, 0.02) convs shrank the features level by level (std 0.062, 0.0023, 1.7e-4,
    2.5e-5) and the image tokens reached the transformer at std ~0.001. (Without the linear shortcut, which would
    carry the signal on its own.)"""
    config = small_unet_config(unet_linear_shortcut=False)
    model = make_model(config)
    latents = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 0.5
    timesteps = torch.tensor([0.0, 300.0, 600.0, 999.0])
    with torch.no_grad():
        tokens, skips = model.image_encoder(latents, timesteps)
        outputs = model(**image_only_inputs(config, latents, timesteps), output_hidden_states=True)
        hidden_states = outputs.hidden_states[0]  # the backbone's input embeddings
    assert [tuple(skip.shape[1:]) for skip in skips] == [(8, 32, 32), (16, 16, 16), (32, 8, 8), (64, 4, 4)]
    stds = [float(skip.std()) for skip in skips]
    assert all(0.05 <= std <= 5.0 for std in stds), stds
    assert tokens.shape == (4, 16, 64)
    assert float(tokens.std()) > 0.05, float(tokens.std())
    # What the backbone actually receives at the image positions (tokens + patch position embedding).
    image_positions = image_only_inputs(config, latents, timesteps)["input_ids"] == config.image_token_id
    assert float(hidden_states[image_positions].std()) > 0.05
    # Comparable to the linear encoder's tokens on the same input (same order of magnitude).
    linear = make_model(small_unet_config(patch_encoder="linear", unet_linear_shortcut=False))
    with torch.no_grad():
        linear_tokens, _ = linear.image_encoder(latents, timesteps)
    assert 0.1 < float(tokens.std()) / float(linear_tokens.std()) < 10


def test_unet_layers_keep_fan_in_init_and_output_layers_start_at_zero():
    config = small_unet_config()
    model = make_model(config)
    for part in (model.image_encoder, model.image_decoder):
        for name, layer in part.named_modules():
            if not isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)) or name == "shortcut":
                continue  # the shortcut is initialised as the linear encoder's projection (tested below)
            if getattr(layer, "_transfusion_zero_init", False):
                # The U-Net's last conv, and the output shortcut (the linear decoder's projection, as it starts).
                assert name in ("conv_out", "shortcut.proj") and part is model.image_decoder, name
                assert not layer.weight.any() and not layer.bias.any(), name
                continue
            assert getattr(layer, "_transfusion_default_init", False), name
            # PyTorch's kaiming_uniform(a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)): std 1/sqrt(3 fan_in),
            # not transformers' 0.02.
            fan_in = layer.weight[0].numel()
            expected = (3 * fan_in) ** -0.5
            assert 0.8 * expected < float(layer.weight.detach().std()) < 1.2 * expected, (
                name,
                float(layer.weight.detach().std()),
            )
            assert float(layer.weight.detach().abs().max()) <= fan_in**-0.5 + 1e-6, name


def test_unet_decoder_is_zero_at_init_but_gets_gradients():
    config = small_unet_config()
    model = make_model(config).train()
    latents = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 0.5
    inputs = image_only_inputs(config, latents, torch.tensor([100.0, 700.0]))
    output = model(**inputs, diffusion_targets=torch.randn_like(latents))
    assert torch.count_nonzero(output.diffusion_predictions) == 0
    output.loss.backward()
    conv_out = model.image_decoder.conv_out
    assert conv_out.weight.grad.abs().sum() > 0 and conv_out.bias.grad.abs().sum() > 0
    # One optimizer step later the decoder's output (and the gradients upstream of conv_out) are live.
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.zero_grad()
    output = model(**inputs, diffusion_targets=torch.randn_like(latents))
    assert torch.count_nonzero(output.diffusion_predictions) > 0
    output.loss.backward()
    assert model.image_decoder.levels[0][0].conv1.weight.grad.abs().sum() > 0


def test_timestep_features_are_unchanged_by_the_move_to_diffusers():
    """diffusers' `get_timestep_embedding` gives the features of the earlier hand-written code (cosines first), so
    linear-encoder checkpoints keep their behaviour."""
    timesteps = torch.tensor([0.0, 0.5, 1.0, 37.0, 500.0, 999.0, 1000.0])
    dim, max_period = 32, 10000.0
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    angles = timesteps[:, None] * frequencies[None]
    expected = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    torch.testing.assert_close(sinusoidal_timestep_features(timesteps, dim), expected)
    embedding = TransfusionTimestepEmbedding(dim, 48)
    assert [name for name, _ in embedding.named_parameters()] == [
        "linear_1.weight",
        "linear_1.bias",
        "linear_2.weight",
        "linear_2.bias",
    ]
    with torch.no_grad():
        hand = embedding.linear_2(torch.nn.functional.silu(embedding.linear_1(expected)))
        torch.testing.assert_close(embedding(timesteps), hand)


def test_unet_save_and_load_is_bit_exact(tmp_path):
    """`_init_weights` must not overwrite loaded U-Net weights with a fresh fan-in init."""
    config = small_unet_config()
    model = make_model(config, seed=0, perturb=True)
    model.save_pretrained(tmp_path)
    torch.manual_seed(123)  # a fresh init now would differ from the saved weights
    loaded = TransfusionForMixedModal.from_pretrained(tmp_path)
    fresh = make_model(config, seed=123)
    saved, restored = model.state_dict(), loaded.state_dict()
    image_keys = [key for key in saved if key.startswith(("image_encoder.", "image_decoder."))]
    assert len(image_keys) > 40
    for key in image_keys:
        assert torch.equal(restored[key], saved[key]), key
    assert not torch.equal(fresh.state_dict()["image_encoder.conv_in.weight"], saved["image_encoder.conv_in.weight"])


def test_unet_linear_shortcut_adds_the_raw_patch_projection(tmp_path):
    """`unet_linear_shortcut=True`: each token is the U-Net's plus one linear projection of its raw patch (initialised
    as the linear encoder's projection), saved and loaded with the model; refused without the U-Net."""
    from transfusion_hf.image_layers import patchify

    config = small_unet_config(unet_linear_shortcut=True)
    model = make_model(config, seed=0)
    encoder = model.image_encoder
    assert encoder.shortcut.in_features == 3 * 8 * 8 and encoder.shortcut.out_features == config.hidden_size
    assert make_model(small_unet_config(unet_linear_shortcut=False), seed=0).image_encoder.shortcut is None
    latents, timesteps = random_images(2, shape=(3, 32, 32)), torch.tensor([0, 500])
    with torch.no_grad():
        tokens, _ = encoder(latents, timesteps)
        shortcut, encoder.shortcut = encoder.shortcut, None
        unet_tokens, _ = encoder(latents, timesteps)
        encoder.shortcut = shortcut
        expected = unet_tokens + shortcut(patchify(latents, 8))
    torch.testing.assert_close(tokens, expected)
    assert (tokens - unet_tokens).abs().mean() > 0.01  # the projection is not negligible at init
    # Not PyTorch's fan-in init (flagged for the U-Net's layers): transformers' N(0, initializer_range), as for the
    # linear encoder's projection.
    assert not getattr(shortcut, "_transfusion_default_init", False)
    std = config.text_config.initializer_range
    assert abs(shortcut.weight.std().item() - std) < 0.2 * std
    model.save_pretrained(tmp_path)
    loaded = TransfusionForMixedModal.from_pretrained(tmp_path)
    assert loaded.config.unet_linear_shortcut is True
    assert torch.equal(loaded.image_encoder.shortcut.weight, shortcut.weight)
    with pytest.raises(ValueError, match=r"`unet_linear_shortcut`=True needs `patch_encoder`='unet', got 'linear'"):
        small_unet_config(patch_encoder="linear", unet_linear_shortcut=True)
    with pytest.raises(ValueError, match="`unet_linear_shortcut` must be a bool, got 'yes'"):
        small_unet_config(unet_linear_shortcut="yes")


def test_unet_output_shortcut_adds_the_linear_decoder(tmp_path):
    """`unet_output_shortcut=True`: the decoder's output is the U-Net's plus the linear decoder's projection of each
    hidden state to its patch, zero at initialisation (the model's output starts unchanged) but trained; saved and
    loaded with the model; refused without the U-Net."""
    from transfusion_hf.image_layers import TransfusionLinearPatchDecoder

    config = small_unet_config(unet_output_shortcut=True)
    model = make_model(config, seed=0)
    decoder = model.image_decoder
    assert isinstance(decoder.shortcut, TransfusionLinearPatchDecoder)
    assert decoder.shortcut.proj.out_features == 3 * 8 * 8 and not decoder.shortcut.proj.weight.any()
    assert make_model(small_unet_config(unet_output_shortcut=False), seed=0).image_decoder.shortcut is None
    hidden = torch.randn(2, 16, config.hidden_size, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([0, 500])
    skips = [torch.randn(2, c, 32 >> level, 32 >> level) for level, c in enumerate(config.unet_block_out_channels)]
    perturb_zero_init(model, seed=1)
    with torch.no_grad():
        output = decoder(hidden, timesteps, skips)
        shortcut, decoder.shortcut = decoder.shortcut, None
        unet_output = decoder(hidden, timesteps, skips)
        decoder.shortcut = shortcut
        expected = unet_output + shortcut(hidden, timesteps)
    torch.testing.assert_close(output, expected)
    assert (output - unet_output).abs().mean() > 1e-3
    # Each token writes only its own 8x8 window: token 5 is row 1, column 1 of the 4x4 patch grid (raster order).
    with torch.no_grad():
        single = torch.zeros_like(hidden)
        single[:, 5] = hidden[:, 5]
        drawn = shortcut(single, timesteps) - shortcut(torch.zeros_like(hidden), timesteps)  # without the bias
    window = torch.zeros(32, 32, dtype=torch.bool)
    window[8:16, 8:16] = True
    assert drawn[:, :, window].abs().min() > 0 and drawn[:, :, ~window].abs().max() == 0
    model.save_pretrained(tmp_path)
    loaded = TransfusionForMixedModal.from_pretrained(tmp_path)
    assert loaded.config.unet_output_shortcut is True
    assert torch.equal(loaded.image_decoder.shortcut.proj.weight, shortcut.proj.weight)
    with pytest.raises(ValueError, match=r"`unet_output_shortcut`=True needs `patch_encoder`='unet', got 'linear'"):
        small_unet_config(patch_encoder="linear", unet_output_shortcut=True)
    with pytest.raises(ValueError, match="`unet_output_shortcut` must be a bool, got 1"):
        small_unet_config(unet_output_shortcut=1)


def image_only_inputs(config: TransfusionConfig, latents: torch.Tensor, timesteps: torch.Tensor) -> dict:
    """One `<text> <boi> <image>*N <eoi>` row per image."""
    generator = torch.Generator().manual_seed(0)
    rows = [random_text(generator, 3) + image_block(config) for _ in range(latents.shape[0])]
    input_ids, attention_mask = pad_rows(rows)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "latents": latents, "timesteps": timesteps}


# ============================================================================================ U-Net skips
@pytest.mark.parametrize(
    ("skip_connections", "used_levels"),
    [("none", []), ("fine", [0]), ("coarse", [1, 2, 3]), ("all", [0, 1, 2, 3])],
)
def test_unet_decoder_reads_only_the_selected_skips(skip_connections, used_levels):
    config = small_unet_config(unet_skip_connections=skip_connections)
    model = make_model(config, perturb=True)  # non-zero conv_out: the output depends on its inputs
    latents = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 0.5
    timesteps = torch.tensor([200.0, 800.0])
    with torch.no_grad():
        tokens, skips = model.image_encoder(latents, timesteps)
        reference = model.image_decoder(tokens, timesteps, skips)
        for level in range(4):
            perturbed = list(skips)
            perturbed[level] = skips[level] + torch.randn_like(skips[level])
            change = (model.image_decoder(tokens, timesteps, perturbed) - reference).abs().max()
            if level in used_levels:
                assert change > 1e-4, (skip_connections, level)
            else:
                assert change == 0, (skip_connections, level)
        # Sanity: the decoder does read the transformer's hidden states.
        assert (model.image_decoder(tokens + 1.0, timesteps, skips) - reference).abs().max() > 1e-4


def test_unet_skip_levels_set_the_decoder_widths():
    for skip_connections, finest, deepest in (
        ("none", 16, 64),
        ("fine", 16 + 8, 64),
        ("coarse", 16, 64 + 64),
        ("all", 16 + 8, 64 + 64),
    ):
        decoder = make_model(small_unet_config(unet_skip_connections=skip_connections)).image_decoder
        # The last up level (full resolution, 8 channels) takes the 16-channel upsampled map (+ the level-0 skip);
        # the first takes the 64 channels of `proj` (+ the level-3 skip).
        assert decoder.levels[-1][0].conv1.in_channels == finest, skip_connections
        assert decoder.levels[0][0].conv1.in_channels == deepest, skip_connections


@pytest.mark.parametrize(
    ("field", "value"), [("unet_skip_connections", "some"), ("image_attention", "bidirectional_images")]
)
def test_invalid_new_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config(**{field: value})


def test_new_config_fields_defaults_and_round_trip(tmp_path):
    config = tiny_config()
    # "fine": the documented default (the full-resolution skip only).
    assert config.unet_skip_connections == "fine" and config.image_attention == "bidirectional"
    config = tiny_config(patch_encoder="unet", unet_skip_connections="none", image_attention="causal")
    config.save_pretrained(tmp_path)
    loaded = TransfusionConfig.from_pretrained(tmp_path)
    assert loaded.unet_skip_connections == "none" and loaded.image_attention == "causal"


# ============================================================================================ causal image attention
def allowed_pattern(mask: torch.Tensor) -> torch.BoolTensor:
    """(batch, q, kv) booleans from an sdpa (bool) or eager (additive float) 4D mask."""
    assert mask.dim() == 4 and mask.shape[1] == 1, mask.shape
    return mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_causal_image_mask_is_a_plain_causal_mask(attn_implementation):
    config = tiny_config()
    text_config = copy.deepcopy(config.text_config)
    text_config._attn_implementation = attn_implementation
    generator = torch.Generator().manual_seed(4)
    rows = [
        random_text(generator, 2) + image_block(config) + random_text(generator, 1) + image_block(config),
        random_text(generator, 3) + image_block(config) + image_block(config) + random_text(generator, 2),
        random_text(generator, 4),
    ]
    input_ids, attention_mask = pad_rows(rows)
    length = input_ids.shape[1]
    real = attention_mask.bool()
    embeds = torch.zeros(*input_ids.shape, 32)
    for padding in (None, attention_mask):
        causal = torch.ones(length, length, dtype=torch.bool).tril()[None].expand(len(rows), -1, -1)
        if padding is not None:
            causal = causal & attention_mask[:, None, :].bool()
        mask = build_transfusion_mask(
            text_config, embeds, input_ids, IMAGE_TOKEN_ID, attention_mask=padding, bidirectional_images=False
        )
        allowed = allowed_pattern(mask)
        assert torch.equal(allowed[real], causal[real])
        # The default (bidirectional) mask adds exactly the later patches of the same image, and nothing else.
        bidirectional = allowed_pattern(
            build_transfusion_mask(text_config, embeds, input_ids, IMAGE_TOKEN_ID, attention_mask=padding)
        )
        extra = bidirectional & ~causal
        assert (bidirectional | causal).equal(bidirectional)
        assert extra.any()
        query_images = input_ids[:, :, None] == IMAGE_TOKEN_ID
        key_images = input_ids[:, None, :] == IMAGE_TOKEN_ID
        assert not (extra & ~(query_images & key_images)).any()


@pytest.mark.parametrize("image_attention", ["bidirectional", "causal"])
def test_causal_image_attention_first_patch_ignores_later_patches(image_attention):
    # Linear patch layers: patch k's input and output are exactly its own 2x2 window (a U-Net mixes windows).
    config = tiny_config(image_attention=image_attention)
    model = make_model(config, perturb=True)
    batch = mixed_batch(config, [[3, 2], [2, 4]], seed=5)
    batch.pop("diffusion_targets")
    perturbed = {key: value.clone() for key, value in batch.items()}
    perturbed["latents"][:, :, :, 2:] += 1.0  # patches 1 and 3 (right column)
    perturbed["latents"][:, :, 2:, :] += 1.0  # patches 2 and 3 (bottom row)
    with torch.no_grad():
        before = model(**batch).diffusion_predictions
        after = model(**perturbed).diffusion_predictions
    first_patch_change = (after[:, :, :2, :2] - before[:, :, :2, :2]).abs().max()
    if image_attention == "causal":
        assert first_patch_change == 0
    else:
        assert first_patch_change > 1e-6
    # Later patches change either way.
    assert (after[:, :, 2:, 2:] - before[:, :, 2:, 2:]).abs().max() > 1e-6


# ============================================================================================ min-SNR-gamma
def snr_of(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    alphas_cumprod = scheduler.alphas_cumprod[timesteps].double()
    return alphas_cumprod / (1 - alphas_cumprod)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_gamma_weights_match_the_formula(prediction_type):
    scheduler = ddpm(prediction_type)
    gamma = 5.0
    noiser = TransfusionNoiser(scheduler, prediction_type, snr_gamma=gamma)
    assert noiser.snr_weighting == "min_snr"
    timesteps = torch.tensor([0, 10, 100, 250, 500, 750, 999])
    snr = snr_of(scheduler, timesteps)
    clipped = snr.clamp(max=gamma)
    expected = clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)
    weights = noiser.loss_weights(timesteps)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-4, atol=1e-7)
    # Low noise (SNR > gamma) is down-weighted; high noise keeps epsilon's weight 1 / v's SNR / (SNR + 1).
    assert weights[0] < 1e-3 and weights[1] < 1.0
    if prediction_type == "epsilon":
        assert weights[-1] == pytest.approx(1.0)
    assert weights.shape == timesteps.shape and torch.isfinite(weights).all()
    # add_noise carries them; without snr_gamma there are none.
    latents = random_images(len(timesteps))
    noised = noiser.add_noise(latents, timesteps, torch.Generator().manual_seed(0))
    torch.testing.assert_close(noised.loss_weights, weights)
    plain = TransfusionNoiser(scheduler, prediction_type)
    assert plain.loss_weights(timesteps) is None
    assert plain.add_noise(latents, timesteps, torch.Generator().manual_seed(0)).loss_weights is None


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_truncated_min_snr_weights_match_the_formula(prediction_type):
    """`truncated_min_snr`: clean-image weight clip(SNR, 1, gamma); the SNR divided by is floored at 0.01."""
    scheduler = ddpm(prediction_type)
    gamma = 5.0
    noiser = TransfusionNoiser(scheduler, prediction_type, snr_gamma=gamma, snr_weighting="truncated_min_snr")
    timesteps = torch.tensor([0, 10, 100, 250, 500, 750, 900, 950, 999])
    snr = snr_of(scheduler, timesteps)
    clean_weight = snr.clamp(min=1.0, max=gamma)
    floored = snr.clamp(min=0.01)
    expected = clean_weight / floored if prediction_type == "epsilon" else clean_weight / (floored + 1)
    weights = noiser.loss_weights(timesteps)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-4, atol=1e-7)
    assert torch.isfinite(weights).all()
    min_snr = TransfusionNoiser(scheduler, prediction_type, snr_gamma=gamma).loss_weights(timesteps)
    # Same as min-SNR at low noise (SNR >= gamma), larger at high noise (SNR < 1).
    torch.testing.assert_close(weights[:2], min_snr[:2])
    high_noise = snr < 1
    assert high_noise[-4:].all() and (weights[high_noise] > min_snr[high_noise]).all()
    if prediction_type == "epsilon":
        # Capped at 1 / 0.01 instead of 1 / SNR ~ 4e8 at t = 999.
        assert float(weights.max()) == pytest.approx(100.0)
    # gamma below 1: the clean-image weight is 1 everywhere.
    low_gamma = TransfusionNoiser(scheduler, prediction_type, snr_gamma=0.5, snr_weighting="truncated_min_snr")
    expected = 1 / floored if prediction_type == "epsilon" else 1 / (floored + 1)
    torch.testing.assert_close(low_gamma.loss_weights(timesteps).double(), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("snr_weighting", ["min_snr", "truncated_min_snr"])
def test_normalized_snr_weights_average_one_and_keep_their_shape(prediction_type, snr_weighting):
    """`normalize_snr_weights`: the same weights divided by their mean over the schedule. Unnormalised, the
    truncated epsilon weights average ~12, so they multiplied the paper's lambda by ~12 against the LM loss."""
    scheduler = ddpm(prediction_type)
    options = {"snr_gamma": 5.0, "snr_weighting": snr_weighting}
    raw = TransfusionNoiser(scheduler, prediction_type, **options)
    normalized = TransfusionNoiser(scheduler, prediction_type, normalize_snr_weights=True, **options)
    every_timestep = torch.arange(1000)
    raw_weights, weights = raw.loss_weights(every_timestep), normalized.loss_weights(every_timestep)
    assert float(weights.mean()) == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(weights, raw_weights / raw_weights.mean())
    if prediction_type == "epsilon" and snr_weighting == "truncated_min_snr":
        assert float(raw_weights.mean()) > 10  # what the normalisation is for
    clean = random_images(4, seed=5)
    timesteps = torch.tensor([0, 300, 600, 900])
    noised = normalized.add_noise(clean, timesteps, torch.Generator().manual_seed(0))
    torch.testing.assert_close(noised.loss_weights, normalized.loss_weights(timesteps))


def test_normalize_snr_weights_needs_snr_gamma():
    with pytest.raises(ValueError, match="normalize_snr_weights.*snr_gamma"):
        TransfusionNoiser(ddpm("epsilon"), "epsilon", normalize_snr_weights=True)


@pytest.mark.parametrize("snr_weighting", ["min_snr", "truncated_min_snr"])
def test_weighted_loss_is_the_clean_image_error_times_the_clean_weight(snr_weighting):
    """epsilon MSE = SNR * x0 MSE and v MSE = (SNR + 1) * x0 MSE, so the weighted MSE is min(SNR, gamma) * x0 MSE
    (min_snr) or clip(SNR, 1, gamma) * x0 MSE (truncated, where SNR >= 0.01)."""
    gamma = 5.0
    timesteps = torch.tensor([20, 300, 600, 900])  # SNR >= 0.024: the floor does not apply
    clean = random_images(4, seed=6)
    for prediction_type in ("epsilon", "v_prediction"):
        noiser = TransfusionNoiser(
            ddpm(prediction_type), prediction_type, snr_gamma=gamma, snr_weighting=snr_weighting
        )
        noised = noiser.add_noise(clean, timesteps, torch.Generator().manual_seed(1))
        predictions = noised.targets + 0.1 * random_images(4, seed=7)
        per_image_mse = (predictions - noised.targets).pow(2).flatten(1).mean(1)
        x0_error = (noiser.predict_clean(noised.latents, predictions, timesteps) - clean).pow(2).flatten(1).mean(1)
        snr = snr_of(noiser.scheduler, timesteps).float()
        clean_weight = snr.clamp(max=gamma) if snr_weighting == "min_snr" else snr.clamp(min=1.0, max=gamma)
        torch.testing.assert_close(noised.loss_weights * per_image_mse, clean_weight * x0_error, rtol=1e-3, atol=1e-6)


def test_weighted_diffusion_loss():
    predictions, targets = random_images(3, seed=8), random_images(3, seed=9)
    weights = torch.tensor([0.5, 2.0, 0.0])
    per_image = (predictions - targets).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(diffusion_loss(predictions, targets, weights), (weights * per_image).mean())
    torch.testing.assert_close(diffusion_loss(predictions, targets, None), per_image.mean())
    torch.testing.assert_close(diffusion_loss(predictions, targets, torch.ones(3)), per_image.mean())
    for wrong in (torch.ones(2), torch.ones(3, 1), torch.ones(1)):
        with pytest.raises(ValueError, match="diffusion_loss_weights"):
            diffusion_loss(predictions, targets, wrong)


def test_model_applies_diffusion_loss_weights():
    config = tiny_config()
    model = make_model(config, perturb=True)
    batch = mixed_batch(config, [[3, 2, 4], [2, 3]], seed=10)  # 3 images
    weights = torch.tensor([0.2, 1.0, 3.0])
    with torch.no_grad():
        plain = model(**batch, labels=batch["input_ids"])
        weighted = model(**batch, labels=batch["input_ids"], diffusion_loss_weights=weights)
    expected = diffusion_loss(plain.diffusion_predictions, batch["diffusion_targets"], weights)
    torch.testing.assert_close(weighted.diffusion_loss, expected)
    assert not torch.allclose(weighted.diffusion_loss, plain.diffusion_loss)
    torch.testing.assert_close(weighted.loss, weighted.lm_loss + config.diffusion_loss_weight * expected)
    torch.testing.assert_close(weighted.lm_loss, plain.lm_loss)
    with pytest.raises(ValueError, match="diffusion_loss_weights"):
        model(**batch, diffusion_loss_weights=torch.ones(2))


@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_collator_adds_loss_weights_only_with_snr_gamma(snr_gamma):
    tokenizer = get_tokenizer()
    processor = TransfusionProcessor(tokenizer, image_size=4, num_image_tokens=4)
    noiser = TransfusionNoiser(ddpm("epsilon"), "epsilon", snr_gamma=snr_gamma)
    collator = TransfusionDataCollator(processor, noiser, seed=0)
    latents = random_images(5, seed=11, shape=(4, 4, 4))
    examples = [{"text": f"caption number {index}", "latents": latents[index]} for index in range(5)]
    batch = collator(examples)
    if snr_gamma is None:
        assert "diffusion_loss_weights" not in batch
        return
    weights = batch["diffusion_loss_weights"]
    assert weights.shape == (5,)
    torch.testing.assert_close(weights, noiser.loss_weights(batch["timesteps"]))


# ============================================================================================ noiser checks
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prediction_type": "flow_prediction", "snr_gamma": 5.0}, "snr_gamma"),
        ({"prediction_type": "epsilon", "snr_gamma": 0.0}, "snr_gamma"),
        ({"prediction_type": "v_prediction", "snr_gamma": -1.0}, "snr_gamma"),
        ({"prediction_type": "epsilon", "snr_gamma": 5.0, "snr_weighting": "max_snr"}, "snr_weighting"),
        ({"prediction_type": "epsilon", "snr_weighting": "truncated_min_snr"}, "snr_weighting"),
        ({"prediction_type": "epsilon", "timestep_sampling": "logit_normal"}, "timestep_sampling"),
        ({"prediction_type": "v_prediction", "timestep_sampling": "logit_normal"}, "timestep_sampling"),
        ({"prediction_type": "flow_prediction", "timestep_sampling": "cosmap"}, "timestep_sampling"),
        ({"prediction_type": "flow_prediction", "timestep_sampling": "logit_normal", "logit_std": 0.0}, "logit_std"),
        ({"prediction_type": "flow_prediction", "timestep_sampling": "logit_normal", "logit_std": -1}, "logit_std"),
        ({"prediction_type": "epsilon", "timestep_sampling": "importance"}, "timestep_sampling.*snr_gamma"),
        ({"prediction_type": "flow_prediction", "timestep_sampling": "importance"}, "timestep_sampling.*snr_gamma"),
        (
            {
                "prediction_type": "epsilon",
                "snr_gamma": 5.0,
                "timestep_sampling": "importance",
                "importance_exponent": 0,
            },
            "importance_exponent",
        ),
        ({"prediction_type": "epsilon", "snr_gamma": 5.0, "importance_exponent": 0.5}, "importance_exponent"),
    ],
)
def test_invalid_noiser_options_name_the_field(kwargs, field):
    prediction_type = kwargs.pop("prediction_type")
    with pytest.raises(ValueError, match=field):
        TransfusionNoiser(scheduler_for(prediction_type), prediction_type, **kwargs)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_predict_clean_inverts_the_targets(prediction_type):
    noiser = TransfusionNoiser(scheduler_for(prediction_type), prediction_type)
    clean = random_images(8, seed=12, scale=2.0)
    if prediction_type == "flow_prediction":
        timesteps = torch.tensor([0.0, 0.5, 10.0, 250.0, 500.5, 750.0, 999.0, 1000.0])
    elif prediction_type == "epsilon":
        timesteps = torch.tensor([0, 1, 10, 250, 500, 750, 850, 900])  # alpha is tiny near 999
    else:
        timesteps = torch.tensor([0, 1, 10, 250, 500, 750, 900, 999])
    noised = noiser.add_noise(clean, timesteps, torch.Generator().manual_seed(13))
    recovered = noiser.predict_clean(noised.latents, noised.targets, timesteps)
    assert recovered.dtype == torch.float32 and recovered.shape == clean.shape
    torch.testing.assert_close(recovered, clean, atol=1e-4, rtol=0)
    # A wrong prediction does not give the clean image back.
    wrong = noiser.predict_clean(noised.latents, noised.targets + 1.0, timesteps)
    assert (wrong - clean)[3:].abs().amin() > 1e-3


def test_logit_normal_timesteps():
    noiser = TransfusionNoiser(FlowMatchEulerDiscreteScheduler(), "flow_prediction", timestep_sampling="logit_normal")
    uniform = TransfusionNoiser(FlowMatchEulerDiscreteScheduler(), "flow_prediction")
    limits = torch.full((4000,), 1000)
    timesteps = noiser.sample_timesteps(limits, torch.Generator().manual_seed(14))
    assert timesteps.dtype.is_floating_point
    assert (timesteps > 0).all() and (timesteps < 1000).all()
    middle = ((timesteps >= 250) & (timesteps <= 750)).float().mean()
    uniform_middle = (
        ((uniform.sample_timesteps(limits, torch.Generator().manual_seed(14)) - 500).abs() <= 250).float().mean()
    )
    # sigmoid(N(0, 1)) lands in [0.25, 0.75] with probability 2 * Phi(logit(0.75)) - 1 = 0.73 (uniform: 0.5).
    assert 0.68 < middle < 0.78, middle
    assert 0.45 < uniform_middle < 0.55, uniform_middle
    assert abs(float(timesteps.mean()) - 500) < 15
    again = noiser.sample_timesteps(limits, torch.Generator().manual_seed(14))
    assert torch.equal(timesteps, again)
    assert not torch.equal(timesteps, noiser.sample_timesteps(limits, torch.Generator().manual_seed(15)))
    # logit_mean shifts them; image-first limits still cap them.
    later = TransfusionNoiser(
        FlowMatchEulerDiscreteScheduler(), "flow_prediction", timestep_sampling="logit_normal", logit_mean=1.0
    ).sample_timesteps(limits, torch.Generator().manual_seed(14))
    assert float(later.mean()) > float(timesteps.mean()) + 100
    capped = noiser.sample_timesteps(torch.full((500,), 500), torch.Generator().manual_seed(16))
    assert (capped > 0).all() and (capped < 500).all()
    # Through __call__ (and so the collator) the draws are reproducible too.
    clean = random_images(6, seed=17)
    image_first = torch.tensor([False, True, False, False, True, False])
    first = noiser(clean, image_first, torch.Generator().manual_seed(18))
    second = noiser(clean, image_first, torch.Generator().manual_seed(18))
    assert torch.equal(first.timesteps, second.timesteps) and torch.equal(first.latents, second.latents)
    assert (first.timesteps[image_first] <= 500).all()


@pytest.mark.parametrize(
    ("prediction_type", "normalize", "exponent"),
    [("epsilon", False, 1.0), ("epsilon", True, 1.0), ("v_prediction", False, 1.0), ("epsilon", False, None)],
)
def test_importance_timesteps_keep_the_expected_weighted_loss(prediction_type, normalize, exponent):
    """`timestep_sampling="importance"`: t drawn in proportion to w(t)^a within each image's range (w the SNR weight),
    each image reweighted by w(t)^(1 - a) * sum(w^a) / range. The expected loss is that of uniform t weighted by w(t);
    with a = 1 the weights of a batch no longer vary (the truncated epsilon weights give uniform times an effective
    batch of ~17%)."""
    options = {"snr_gamma": 5.0, "snr_weighting": "truncated_min_snr", "normalize_snr_weights": normalize}
    scheduler = ddpm(prediction_type)
    noiser = TransfusionNoiser(
        scheduler, prediction_type, timestep_sampling="importance", importance_exponent=exponent, **options
    )
    every_weight = TransfusionNoiser(scheduler, prediction_type, **options).loss_weights(torch.arange(1000)).double()
    count = 60000
    clean = torch.zeros(count, 1, 1, 1)
    image_first = torch.arange(count) % 5 == 0  # limit 500 for these
    noised = noiser(clean, image_first, torch.Generator().manual_seed(21))
    timesteps = noised.timesteps
    assert timesteps.dtype == torch.long
    assert (timesteps[image_first] <= 500).all() and (timesteps >= 0).all()
    assert (timesteps <= 999).all() and int(timesteps[~image_first].max()) > 990
    # The weight of each image: w(t)^(1 - a) times the mean of w^a over its range (a = 1: one weight per range).
    exponent = 0.5 if exponent is None else exponent
    assert noiser.importance_exponent == exponent
    powered = every_weight**exponent
    range_mean = torch.where(image_first, powered[:501].mean(), powered.mean())
    torch.testing.assert_close(noised.loss_weights, (every_weight[timesteps] ** (1 - exponent) * range_mean).float())
    if exponent == 1.0:
        assert len(noised.loss_weights[~image_first].unique()) == 1
    # The draws follow w^a: the share of full-range images above t = 750 is that of the mass of w^a there.
    above = float((timesteps[~image_first] > 750).double().mean())
    assert above == pytest.approx(float(powered[751:].sum() / powered.sum()), abs=0.01)

    # Any per-timestep loss has the same expectation as under uniform times weighted by w(t).
    def per_timestep_loss(t):
        return torch.sqrt(t.double() / 1000) + 0.5

    importance_mean = float((noised.loss_weights.double() * per_timestep_loss(timesteps)).mean())
    per_range = [
        (every_weight[: limit + 1] * per_timestep_loss(torch.arange(limit + 1))).mean() for limit in (999, 500)
    ]
    assert importance_mean == pytest.approx(float(0.8 * per_range[0] + 0.2 * per_range[1]), rel=0.02)
    # Reproducible with the generator, different with another seed.
    again = noiser(clean[:64], image_first[:64], torch.Generator().manual_seed(21))
    assert torch.equal(again.timesteps, timesteps[:64])
    assert not torch.equal(
        noiser(clean[:64], image_first[:64], torch.Generator().manual_seed(22)).timesteps, again.timesteps
    )


# ============================================================================================ clean-image error tracker
def implied_mean_image_predictions(noiser, noisy, timesteps, mean_image):
    """Predictions, in the units of the prediction type, whose implied x0 is `mean_image` for every image."""
    if noiser.prediction_type == "flow_prediction":
        sigmas = (timesteps.float() / noiser.num_train_timesteps)[:, None, None, None]
        return (noisy - mean_image) / sigmas
    alphas_cumprod = noiser.scheduler.alphas_cumprod[timesteps.long()][:, None, None, None]
    alpha, sigma = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
    if noiser.prediction_type == "v_prediction":
        return (alpha * noisy - mean_image) / sigma
    return (noisy - alpha * mean_image) / sigma


def tracker_batch(noiser, timesteps, seed=19):
    clean = random_images(len(timesteps), seed=seed)
    noised = noiser.add_noise(clean, timesteps, torch.Generator().manual_seed(seed))
    batch = {"latents": noised.latents, "timesteps": noised.timesteps, "diffusion_targets": noised.targets}
    return batch, clean


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_clean_image_error_tracker(prediction_type):
    noiser = TransfusionNoiser(scheduler_for(prediction_type), prediction_type)
    tracker = CleanImageErrorTracker(noiser, num_buckets=4)
    names = ["x0_error_ratio/t0-250", "x0_error_ratio/t250-500", "x0_error_ratio/t500-750", "x0_error_ratio/t750-1000"]
    timesteps = torch.tensor([5, 100, 240, 260, 400, 490, 510, 600, 740, 760, 800, 900])
    if prediction_type == "flow_prediction":
        timesteps = timesteps.float() + 0.5
    batch, clean = tracker_batch(noiser, timesteps)

    # Perfect predictions (the targets): ~0 in every bucket.
    tracker.update(batch, batch["diffusion_targets"])
    ratios = tracker.compute()
    assert sorted(ratios) == sorted(names)
    assert all(ratio < 1e-6 for ratio in ratios.values()), ratios
    # compute() reset the tracker.
    assert tracker.compute() == {}

    # Predictions that imply the batch's mean image: ~1 in every bucket (over two batches).
    mean_image = clean.mean(0, keepdim=True)
    predictions = implied_mean_image_predictions(noiser, batch["latents"], batch["timesteps"], mean_image)
    tracker.update(batch, predictions)
    tracker.update(batch, predictions)
    ratios = tracker.compute()
    assert sorted(ratios) == sorted(names)
    for name, ratio in ratios.items():
        assert ratio == pytest.approx(1.0, abs=1e-3), (name, ratio)

    # In between: halfway to the mean image gives a quarter of its error.
    halfway = implied_mean_image_predictions(noiser, batch["latents"], batch["timesteps"], (clean + mean_image) / 2)
    tracker.update(batch, halfway)
    for ratio in tracker.compute().values():
        assert ratio == pytest.approx(0.25, abs=1e-3)


def test_clean_image_error_tracker_is_a_median_robust_to_zero_snr_images():
    """An epsilon model's implied x0 at t = 999 divides by sqrt(alpha_bar) ~ 5e-5: one such image must not swamp its
    bucket (the ratio is a median over images)."""
    noiser = TransfusionNoiser(ddpm("epsilon"), "epsilon")
    tracker = CleanImageErrorTracker(noiser)
    batch, _ = tracker_batch(noiser, torch.tensor([100, 200, 760, 800, 999]))
    predictions = batch["diffusion_targets"].clone()
    predictions[-1] += 0.01
    tracker.update(batch, predictions)
    ratios = tracker.compute()
    assert ratios["x0_error_ratio/t750-1000"] < 1e-6, ratios
    # The t = 999 image alone is way off (what a mean would have reported).
    alone = noiser.predict_clean(batch["latents"][-1:], predictions[-1:], batch["timesteps"][-1:])
    clean = noiser.predict_clean(batch["latents"][-1:], batch["diffusion_targets"][-1:], batch["timesteps"][-1:])
    assert float((alone - clean).pow(2).mean()) > 1e4


def test_clean_image_error_tracker_omits_empty_buckets_and_single_images():
    noiser = TransfusionNoiser(ddpm("v_prediction"), "v_prediction")
    tracker = CleanImageErrorTracker(noiser, num_buckets=4)
    batch, _ = tracker_batch(noiser, torch.tensor([10, 200, 800, 999]))
    tracker.update(batch, torch.zeros_like(batch["diffusion_targets"]))
    ratios = tracker.compute()
    assert sorted(ratios) == ["x0_error_ratio/t0-250", "x0_error_ratio/t750-1000"]
    assert all(ratio > 0 for ratio in ratios.values())
    # A batch of one image has no mean image to compare with; no predictions (text-only batch) is skipped.
    one, _ = tracker_batch(noiser, torch.tensor([300]))
    tracker.update(one, one["diffusion_targets"])
    tracker.update(batch, None)
    assert tracker.compute() == {}
    # A batch of identical images has no baseline either (it used to report ratios of 1e4-1e7).
    same = noiser.add_noise(
        torch.ones(4, 3, 8, 8), torch.tensor([10, 200, 800, 900]), torch.Generator().manual_seed(0)
    )
    same_batch = {"latents": same.latents, "timesteps": same.timesteps, "diffusion_targets": same.targets}
    tracker.update(same_batch, same.targets + 1e-3)
    assert tracker.compute() == {}
    # Other bucket counts name their own ranges.
    tracker = CleanImageErrorTracker(noiser, num_buckets=2)
    tracker.update(batch, batch["diffusion_targets"])
    assert sorted(tracker.compute()) == ["x0_error_ratio/t0-500", "x0_error_ratio/t500-1000"]


# ============================================================================================ training script flags
BASE = ["--dataset_name", "shapes", "--report_to", "none"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model_config", "tiny", "--snr_gamma", "5", "--prediction_type", "flow_prediction"], "snr_gamma"),
        (["--snr_gamma", "5", "--snr_weighting", "truncated_min_snr", "--prediction_type", "flow_prediction"], "snr"),
        (["--model_config", "tiny", "--snr_gamma", "0", "--prediction_type", "epsilon"], "snr_gamma"),
        (["--model_config", "tiny", "--prediction_type", "epsilon", "--normalize_snr_weights", "true"], "snr_gamma"),
        (
            ["--model_config", "tiny", "--timestep_sampling", "logit_normal", "--prediction_type", "epsilon"],
            "timestep",
        ),
        (
            ["--timestep_sampling", "logit_normal", "--logit_std", "0", "--prediction_type", "flow_prediction"],
            "logit_std",
        ),
        (["--model_config", "tiny", "--prediction_type", "epsilon", "--timestep_sampling", "importance"], "snr_gamma"),
        (
            [
                "--model_config",
                "tiny",
                "--prediction_type",
                "epsilon",
                "--snr_gamma",
                "5",
                "--importance_exponent",
                "1",
            ],
            "importance_exponent.*no effect",
        ),
        (
            ["--model_config", "tiny", "--prediction_type", "epsilon", "--inference_scheduler", "flow_euler"],
            "inference",
        ),
        (
            ["--prediction_type", "flow_prediction", "--inference_scheduler", "EulerDiscreteScheduler"],
            "inference_scheduler=EulerDiscreteScheduler.*does not fit.*flow_prediction",
        ),
        (["--model_config", "no_such_preset"], "--recipe=.no_such_preset."),
        (["--recipe", "/nonexistent/model.json"], "--recipe=./nonexistent/model.json."),
    ],
)
def test_bad_flag_combinations_fail_in_parse_args(monkeypatch, flags, message):
    # Nothing may be loaded before the check: any data loading would fail the test with another error.
    def no_loading(*args, **kwargs):
        raise AssertionError("data loaded before the arguments were checked")

    monkeypatch.setattr(training.data, "load_dataset_from_args", no_loading)
    with pytest.raises(ValueError, match=message):
        training.parse_args(BASE + flags)


@pytest.mark.parametrize("preset", ["tiny", "small", "paper_0.16b"])
def test_parse_args_checks_the_noising_flags_against_the_presets_prediction_type(preset):
    """Without --prediction_type, the preset's prediction type decides which noising flags are allowed."""
    prediction_type = load_model_preset(preset).get("prediction_type", "epsilon")
    flow_only, ddpm_only = ["--timestep_sampling", "logit_normal"], ["--snr_gamma", "5"]
    allowed, refused = (flow_only, ddpm_only) if prediction_type == "flow_prediction" else (ddpm_only, flow_only)
    training.parse_args(BASE + ["--model_config", preset] + allowed)
    with pytest.raises(ValueError, match=refused[0].removeprefix("--")):
        training.parse_args(BASE + ["--model_config", preset] + refused)


@pytest.mark.parametrize(
    ("flags", "warns"),
    [
        (["--model_config", "tiny", "--prediction_type", "epsilon"], True),
        (["--model_config", "tiny", "--prediction_type", "epsilon", "--snr_gamma", "5"], False),
        (["--model_config", "tiny", "--prediction_type", "v_prediction"], False),
        (["--model_config", "small"], False),
    ],
)
def test_plain_epsilon_warns_before_training(caplog, flags, warns):
    """Plain epsilon draws shapes that ignore the prompt at small scale (README): say so at parse time, and only
    then (epsilon with SNR weighting, v and flow stay quiet)."""
    with caplog.at_level("WARNING", logger="transfusion_hf.training"):
        training.parse_args(BASE + flags)
    messages = [record.getMessage() for record in caplog.records if record.name == "transfusion_hf.training"]
    fix = "--snr_gamma 20 --snr_weighting truncated_min_snr --timestep_sampling importance"
    assert any("Plain epsilon prediction" in message and fix in message for message in messages) == warns


def test_good_flag_combinations_parse():
    args = training.parse_args(BASE + ["--model_config", "small", "--prediction_type", "epsilon", "--snr_gamma", "5"])
    assert args.snr_gamma == 5.0 and args.timestep_sampling == "uniform" and args.snr_weighting == "min_snr"
    args = training.parse_args(
        BASE + ["--prediction_type", "v_prediction", "--snr_gamma", "5", "--snr_weighting", "truncated_min_snr"]
    )
    noiser = training.build_noiser(args, "v_prediction")
    assert noiser.snr_gamma == 5.0 and noiser.snr_weighting == "truncated_min_snr"
    args = training.parse_args(
        BASE + ["--prediction_type", "flow_prediction", "--timestep_sampling", "logit_normal", "--logit_mean", "0.5"]
    )
    noiser = training.build_noiser(args, "flow_prediction")
    assert noiser.timestep_sampling == "logit_normal" and noiser.logit_mean == 0.5 and noiser.logit_std == 1.0
    assert noiser.snr_gamma is None
    for bad_choice in (
        ["--unet_skip_connections", "some"],
        ["--snr_weighting", "max_snr"],
        ["--image_attention", "x"],
    ):
        with pytest.raises(SystemExit):  # argparse choices
            training.parse_args(BASE + bad_choice)


@pytest.mark.parametrize("num_steps", [10, 25, 50, 100, 250, 500, 995])
def test_epsilon_inference_scheduler_starts_at_the_top_at_every_step_count(num_steps):
    """The cosine schedule's t = 999 has alpha_bar ~ 2e-9 (zero SNR). The saved epsilon sampler starts at the same
    t = 995 (alpha_bar 4e-5: pure noise to 0.6%) whatever the step count; the "leading" spacing it had started at 951
    at 25 steps, 901 at 100 and 751 at 250, from pure noise all the same (issue 26: 250 steps drew worse than 25)."""
    for vae in (None, "some/vae"):
        args = argparse.Namespace(inference_scheduler=None, vae_name_or_path=vae)
        for prediction_type in ("epsilon", "v_prediction", "flow_prediction"):
            train_scheduler = training.training_scheduler(prediction_type)
            scheduler = training.inference_scheduler(args, train_scheduler)
            flow_euler = prediction_type == "flow_prediction" and vae is not None
            expected = "FlowMatchEuler" if flow_euler else "DPMSolverMultistep"
            assert type(scheduler).__name__.startswith(expected)
            scheduler.set_timesteps(num_steps)
            timesteps = scheduler.timesteps.tolist()
            assert len(set(timesteps)) == len(timesteps) == num_steps
            if prediction_type == "epsilon":
                assert scheduler.config.prediction_type == "epsilon" and timesteps[0] == 995
                assert float(train_scheduler.alphas_cumprod[int(timesteps[0])]) > 1e-5
            elif prediction_type == "v_prediction":
                assert timesteps[0] == 999  # v is defined at zero SNR (it is -x0 there)
            else:
                assert timesteps[0] == (1000 if vae is not None else 999)  # sigma 1 of the flow schedule


def test_pixel_space_epsilon_and_v_sample_stochastic_and_clamped():
    """In pixel space the saved sampler is stochastic: DPM-Solver++ SDE clamping x0 to [-1, 1] for epsilon / v (0.18
    -> 0.42 for the paper's recipe, README), FlowMatchEuler's stochastic_sampling for flow (0.91 -> 0.98 for the
    demo); a chosen DDPM clips; with a VAE the deterministic samplers, unclamped."""
    for prediction_type in ("epsilon", "v_prediction"):
        train_scheduler = training.training_scheduler(prediction_type)
        args = training.parse_args(BASE + ["--prediction_type", prediction_type])
        scheduler = training.inference_scheduler(args, train_scheduler)
        config = scheduler.config
        assert type(scheduler).__name__ == "DPMSolverMultistepScheduler"
        assert config.algorithm_type == "sde-dpmsolver++" and config.thresholding and config.sample_max_value == 1.0
        args.inference_scheduler = "ddpm"
        ddpm = training.inference_scheduler(args, train_scheduler)
        assert ddpm.config.clip_sample is True and ddpm.config.clip_sample_range == 1.0
        args.inference_scheduler, args.vae_name_or_path = None, "some/vae"
        latent = training.inference_scheduler(args, train_scheduler)
        assert latent.config.thresholding is False and latent.config.algorithm_type == "dpmsolver++"
    # Flow in pixel space: DPM-Solver++ SDE on flow sigmas, unclamped (issue 26: FlowMatchEuler's stochastic form
    # re-noises the posterior mean and collapses the samples of one prompt); with a VAE, FlowMatchEuler.
    args = training.parse_args(BASE)
    flow_training = training.training_scheduler("flow_prediction")
    flow = training.inference_scheduler(args, flow_training)
    assert type(flow).__name__ == "DPMSolverMultistepScheduler" and flow.config.algorithm_type == "sde-dpmsolver++"
    assert flow.config.use_flow_sigmas and flow.config.prediction_type == "flow_prediction"
    assert flow.config.thresholding is False
    args.vae_name_or_path = "some/vae"
    latent_flow = training.inference_scheduler(args, flow_training)
    assert type(latent_flow).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert latent_flow.config.stochastic_sampling is False


@pytest.mark.parametrize(
    ("flag", "prediction_type", "expected"),
    [
        ("ddpm", "epsilon", "DDPMScheduler"),
        ("ddim", "v_prediction", "DDIMScheduler"),
        ("dpm", "flow_prediction", "DPMSolverMultistepScheduler"),
        ("euler", "epsilon", "EulerDiscreteScheduler"),
        ("flow_euler", "flow_prediction", "FlowMatchEulerDiscreteScheduler"),
        ("UniPCMultistepScheduler", "flow_prediction", "UniPCMultistepScheduler"),
        ("HeunDiscreteScheduler", "v_prediction", "HeunDiscreteScheduler"),
    ],
)
def test_inference_scheduler_flag_takes_the_short_names_and_the_pipelines_classes(flag, prediction_type, expected):
    """The flag's short names still work, and every class of `TransfusionPipeline._compatibles` is a choice; the
    scheduler is set up for the prediction type (flow sigmas for a solver on a flow model)."""
    args = training.parse_args(
        BASE + ["--model_config", "tiny", "--prediction_type", prediction_type, "--inference_scheduler", flag]
    )
    train_scheduler = training.training_scheduler(prediction_type)
    scheduler = training.inference_scheduler(args, train_scheduler)
    assert type(scheduler).__name__ == expected
    assert TransfusionPipeline.scheduler_prediction_type(scheduler) == prediction_type
    if prediction_type == "flow_prediction" and "use_flow_sigmas" in scheduler.config:
        assert scheduler.config.use_flow_sigmas is True
    if prediction_type != "flow_prediction":
        assert scheduler.config.beta_schedule == "squaredcos_cap_v2"  # the training schedule, whatever the class


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--model_config", "small"], True),  # the preset's field
        (["--model_config", "tiny", "--patch_encoder", "unet"], True),  # the script's default for a U-Net
        (["--model_config", "tiny", "--patch_encoder", "unet", "--unet_linear_shortcut", "false"], False),
        (["--model_config", "small", "--unet_linear_shortcut", "false"], False),
        (["--model_config", "small", "--patch_encoder", "linear"], False),  # no U-Net, no shortcut, no error
        (["--model_config", "tiny"], False),
    ],
)
def test_unet_linear_shortcut_is_the_scripts_default_for_a_unet(flags, expected):
    """Without the shortcut the U-Net names the wrong colour in most captions (2 seeds, README), so the script's
    U-Nets take it unless told otherwise; the config class keeps False so older U-Net checkpoints load unchanged."""
    args = training.parse_args(BASE + flags)
    model, _ = training.build_model(args, get_tokenizer(), latent_channels=3, latent_size=8)
    assert model.config.unet_linear_shortcut is expected
    assert (model.config.patch_encoder == "unet" and model.image_encoder.shortcut is not None) is expected
    assert TransfusionConfig().unet_linear_shortcut is False


def test_default_preset_is_the_unet_that_draws():
    """The script's default preset is the U-Net one that draws the glyph folder and the shapes (README, "One preset
    for the demo and the default"): U-Net 8x8 patches of 8 -> 64 channels with both shortcuts, rectified flow."""
    args = training.parse_args(BASE)
    assert args.recipe == "small"
    model, _ = training.build_model(args, get_tokenizer(), latent_channels=3, latent_size=32)
    config = model.config
    assert (config.patch_encoder, config.patch_size, config.prediction_type) == ("unet", 8, "flow_prediction")
    assert config.unet_linear_shortcut and config.unet_output_shortcut and config.unet_skip_connections == "fine"
    assert (config.unet_block_out_channels, config.unet_norm_num_groups) == ([8, 16, 32, 64], 4)


@pytest.mark.parametrize(
    ("old_name", "what_changed"),
    [("small_unet", "--unet_block_out_channels 16 32 64 128"), ("shapes", "--patch_encoder linear")],
)
def test_retired_presets_load_their_successor_with_a_warning(caplog, old_name, what_changed):
    """A retired preset name still trains (the default preset), says once what changed and how to get the old
    recipe back, and the run records the new name."""
    assert load_model_preset(old_name) == load_model_preset("small")
    with caplog.at_level("WARNING", logger="transfusion_hf.training"):
        args = training.parse_args(BASE + ["--model_config", old_name])
    assert args.recipe == "small"  # what the run saves and logs
    warned = [record.getMessage() for record in caplog.records if f"--recipe {old_name}" in record.getMessage()]
    assert len(warned) == 1 and "now loads small" in warned[0] and what_changed in warned[0]


def test_the_former_shapes_recipe_is_one_flag_away():
    """`--model_config small --patch_encoder linear` is the retired `shapes` preset: linear 8x8 patches, flow."""
    args = training.parse_args(BASE + ["--model_config", "small", "--patch_encoder", "linear"])
    model, _ = training.build_model(args, get_tokenizer(), latent_channels=3, latent_size=32)
    config = model.config
    assert (config.patch_encoder, config.patch_size, config.prediction_type) == ("linear", 8, "flow_prediction")
    assert not config.unet_linear_shortcut and not config.unet_output_shortcut


@pytest.mark.parametrize(
    ("flags", "channels"),
    [
        ([], [8, 16, 32, 64]),
        (["--patch_size", "4"], [8, 16, 32]),
        (["--patch_size", "2"], [8, 16]),
        (["--patch_size", "2", "--unet_block_out_channels", "8", "8"], [8, 8]),  # the flag wins
    ],
)
def test_smaller_patch_keeps_the_presets_finest_unet_levels(flags, channels):
    """A U-Net preset is laid out for its own patch size; `--patch_size` alone must not need a channel list."""
    args = training.parse_args(BASE + flags)
    model, _ = training.build_model(args, get_tokenizer(), latent_channels=3, latent_size=32)
    assert model.config.unet_block_out_channels == channels
    assert len(model.image_encoder.levels) == len(channels)


def test_larger_patch_than_the_unet_preset_fails_before_any_data():
    with pytest.raises(ValueError, match=r"unet_block_out_channels.*\[8, 16, 32, 64\]"):
        training.parse_args(BASE + ["--patch_size", "16"])


@pytest.mark.parametrize(
    ("flags", "warning"),
    [
        (["--model_config", "tiny"], "a smoke-test recipe"),
        (["--model_config", "tiny", "--dataset_name", "glyphs"], "a smoke-test recipe"),
        (["--model_config", "small", "--dataset_name", "glyphs"], None),
        (["--dataset_name", "glyphs"], None),
        (["--model_config", "paper_0.16b"], None),
    ],
)
def test_presets_warn_where_they_do_not_draw(caplog, flags, warning):
    """No preset may silently draw mosaics or noise (issue 10): a preset's `_warning` is said before any data is
    loaded."""
    with caplog.at_level("WARNING", logger="transfusion_hf.training"):
        args = training.parse_args(BASE + flags)
    warned = [record.getMessage() for record in caplog.records if "--recipe" in record.getMessage()]
    if warning is None:
        assert warned == []
    else:
        assert len(warned) == 1 and warning in warned[0] and f"--recipe {args.recipe}:" in warned[0]


@pytest.mark.parametrize(("dataset", "warns"), [("shapes", False), ("glyphs", True)])
def test_a_preset_warning_can_spare_the_data_it_is_made_for(caplog, tmp_path, dataset, warns):
    """A preset json (the user's own too) may name, in `_warning.except_dataset`, the built-in data set where its
    warning does not apply."""
    preset = load_model_preset("small") | {
        "patch_encoder": "linear",
        "_warning": {"text": "draws mosaics off the flat shapes", "except_dataset": "shapes"},
    }
    path = tmp_path / "linear_8x8.json"
    path.write_text(json.dumps(preset))
    flags = ["--dataset_name", dataset, "--report_to", "none", "--model_config", str(path)]
    with caplog.at_level("WARNING", logger="transfusion_hf.training"):
        training.parse_args(flags)
    warned = [record.getMessage() for record in caplog.records if "draws mosaics" in record.getMessage()]
    assert warned == ([f"--recipe {path}: draws mosaics off the flat shapes"] if warns else [])


def test_new_model_flags_reach_the_config():
    args = training.parse_args(
        BASE
        + ["--model_config", "tiny", "--patch_encoder", "unet", "--unet_skip_connections", "none"]
        + ["--image_attention", "causal", "--patch_position_embedding", "false"]
    )
    model, _ = training.build_model(args, get_tokenizer(), latent_channels=3, latent_size=8)
    config = model.config
    assert config.unet_skip_connections == "none" and config.image_attention == "causal"
    assert config.patch_position_embedding is False and model.patch_position_embedding is None
    # Without the flags, the preset's fields and the config defaults hold.
    args = training.parse_args(BASE + ["--model_config", "small"])
    assert (
        args.unet_skip_connections is None and args.image_attention is None and args.patch_position_embedding is None
    )
    model, _ = training.build_model(args, get_tokenizer(), latent_channels=3, latent_size=8)
    preset = load_model_preset("small")
    assert model.config.unet_skip_connections == preset["unet_skip_connections"]
    assert model.config.image_attention == "bidirectional" and model.patch_position_embedding is not None
