"""Tiny Transfusion configs for fast CPU tests (shared by the test modules; importable as `tiny_configs`)."""

from __future__ import annotations

import torch

from transfusion_hf import TransfusionConfig

VOCAB_SIZE = 96
# Special tokens at the end of the vocabulary (the config's defaults put them there too).
BOI_TOKEN_ID = VOCAB_SIZE - 3
EOI_TOKEN_ID = VOCAB_SIZE - 2
IMAGE_TOKEN_ID = VOCAB_SIZE - 1
# Ordinary text tokens are drawn from [TEXT_LOW, TEXT_HIGH).
TEXT_LOW, TEXT_HIGH = 3, VOCAB_SIZE - 3


def llama_text_config(**overrides) -> dict:
    """A 2-layer, 32-wide Llama backbone config as a dict."""
    text_config = {
        "model_type": "llama",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    text_config.update(overrides)
    return text_config


def qwen2_text_config(**overrides) -> dict:
    """The same sizes with a Qwen2 backbone (biased q/k/v projections)."""
    text_config = llama_text_config(model_type="qwen2")
    text_config.update(overrides)
    return text_config


def tiny_image_fields() -> dict:
    """The image fields of the tiny configs: 4-channel 4x4 latents, patch 2 (4 patches per image)."""
    return {
        "latent_channels": 4,
        "latent_size": 4,
        "patch_size": 2,
        "boi_token_id": BOI_TOKEN_ID,
        "eoi_token_id": EOI_TOKEN_ID,
        "image_token_id": IMAGE_TOKEN_ID,
        "timestep_embedding_dim": 32,
    }


def tiny_config(text_config: dict | None = None, **overrides) -> TransfusionConfig:
    """A tiny Transfusion config: 4-channel 4x4 latents, patch 2 (4 patches per image), Llama backbone.

    `overrides` go to `TransfusionConfig` (e.g. `patch_encoder="unet"`, `prediction_type="v_prediction"`).
    """
    fields = tiny_image_fields()
    patch_size = overrides.get("patch_size", fields["patch_size"])
    if overrides.get("patch_encoder") == "unet" and "unet_block_out_channels" not in overrides:
        if isinstance(patch_size, int) and patch_size > 0:  # narrow U-Net: 16 channels at every level
            fields["unet_block_out_channels"] = [16] * patch_size.bit_length()
    fields.update(overrides)
    return TransfusionConfig(text_config=text_config if text_config is not None else llama_text_config(), **fields)


def tiny_qwen2_config(**overrides) -> TransfusionConfig:
    """[`tiny_config`] with a Qwen2 backbone."""
    return tiny_config(text_config=qwen2_text_config(), **overrides)


def image_block(config: TransfusionConfig) -> list[int]:
    """`<boi> <image>*N <eoi>` for one image."""
    return [config.boi_token_id] + [config.image_token_id] * config.num_patches + [config.eoi_token_id]


def random_text(generator: torch.Generator, length: int) -> list[int]:
    return torch.randint(TEXT_LOW, TEXT_HIGH, (length,), generator=generator).tolist()


def mixed_row(config: TransfusionConfig, text_lengths: list[int], generator: torch.Generator) -> list[int]:
    """Text segments of the given lengths with one image block between consecutive segments."""
    row = random_text(generator, text_lengths[0])
    for length in text_lengths[1:]:
        row += image_block(config) + random_text(generator, length)
    return row


def pad_rows(rows: list[list[int]], pad_token_id: int = 0) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Right-pad rows to one length: `(input_ids, attention_mask)`."""
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, : len(row)] = torch.tensor(row)
        attention_mask[index, : len(row)] = 1
    return input_ids, attention_mask


def mixed_batch(
    config: TransfusionConfig, rows_text_lengths: list[list[int]], seed: int = 0
) -> dict[str, torch.Tensor]:
    """A right-padded batch of mixed rows, with random latents, timesteps and diffusion targets.

    `rows_text_lengths[r]` lists the text segment lengths of row `r`; the row holds `len(...) - 1` images.
    """
    generator = torch.Generator().manual_seed(seed)
    rows = [mixed_row(config, lengths, generator) for lengths in rows_text_lengths]
    input_ids, attention_mask = pad_rows(rows, pad_token_id=0)
    num_images = sum(len(lengths) - 1 for lengths in rows_text_lengths)
    shape = (num_images, config.latent_channels, config.latent_size, config.latent_size)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if num_images:
        batch["latents"] = torch.randn(shape, generator=generator)
        batch["timesteps"] = torch.randint(0, config.num_train_timesteps, (num_images,), generator=generator).float()
        batch["diffusion_targets"] = torch.randn(shape, generator=generator)
    return batch


def perturb_zero_init(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Give the zero-initialised output layers small random weights, so gradients reach every layer."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "_transfusion_zero_init", False):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * std)
    return model
