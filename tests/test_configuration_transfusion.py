"""TransfusionConfig: defaults, sub-config handling, serialization and every validation error."""

from __future__ import annotations

import re

import pytest
from transformers import AutoConfig, LlamaConfig, Qwen2Config

from tiny_configs import (
    BOI_TOKEN_ID,
    EOI_TOKEN_ID,
    IMAGE_TOKEN_ID,
    VOCAB_SIZE,
    llama_text_config,
    qwen2_text_config,
    tiny_config,
    tiny_qwen2_config,
)
from transfusion_hf import TransfusionConfig


def test_tiny_config_fields():
    config = tiny_config()
    assert isinstance(config.text_config, LlamaConfig)
    assert config.num_patches == 4
    assert config.hidden_size == 32
    assert config.vocab_size == VOCAB_SIZE
    assert (config.boi_token_id, config.eoi_token_id, config.image_token_id) == (
        BOI_TOKEN_ID,
        EOI_TOKEN_ID,
        IMAGE_TOKEN_ID,
    )
    assert config.diffusion_loss_weight == 5.0
    assert config.prediction_type == "epsilon"
    assert config.patch_encoder == "linear"


def test_bare_config_defaults_to_llama_and_special_tokens_at_vocab_end():
    config = TransfusionConfig()
    vocab_size = config.text_config.vocab_size
    assert config.text_config.model_type == "llama"
    assert (config.boi_token_id, config.eoi_token_id, config.image_token_id) == (
        vocab_size - 3,
        vocab_size - 2,
        vocab_size - 1,
    )
    assert config.num_patches == (8 // 2) ** 2


def test_special_token_defaults_follow_text_vocab():
    config = TransfusionConfig(text_config=llama_text_config(vocab_size=50), latent_size=4)
    assert (config.boi_token_id, config.eoi_token_id, config.image_token_id) == (47, 48, 49)


def test_qwen2_text_config():
    config = tiny_qwen2_config()
    assert isinstance(config.text_config, Qwen2Config)
    assert config.text_config.model_type == "qwen2"


def test_text_config_object_is_accepted():
    text_config = LlamaConfig(**{k: v for k, v in llama_text_config().items() if k != "model_type"})
    config = TransfusionConfig(text_config=text_config, latent_size=4)
    assert isinstance(config.text_config, LlamaConfig)
    assert config.hidden_size == 32


@pytest.mark.parametrize(
    ("patch_size", "channels"), [(1, [64]), (2, [64, 128]), (4, [64, 128, 256]), (8, [64, 128, 256, 256])]
)
def test_unet_default_channels(patch_size, channels):
    config = TransfusionConfig(
        text_config=llama_text_config(), latent_size=8, patch_size=patch_size, patch_encoder="unet"
    )
    assert config.unet_block_out_channels == channels


def test_tie_word_embeddings_follows_text_config():
    assert tiny_config().tie_word_embeddings is False
    assert tiny_config(text_config=llama_text_config(tie_word_embeddings=True)).tie_word_embeddings is True


def test_save_and_auto_config_round_trip(tmp_path):
    config = tiny_qwen2_config(patch_encoder="unet", prediction_type="v_prediction", diffusion_loss_weight=2.5)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, TransfusionConfig)
    assert isinstance(loaded.text_config, Qwen2Config)
    for name in (
        "latent_channels",
        "latent_size",
        "patch_size",
        "patch_encoder",
        "unet_block_out_channels",
        "boi_token_id",
        "eoi_token_id",
        "image_token_id",
        "prediction_type",
        "diffusion_loss_weight",
        "timestep_embedding_dim",
    ):
        assert getattr(loaded, name) == getattr(config, name), name
    assert loaded.text_config.to_dict() == config.text_config.to_dict()


def test_dict_round_trip():
    config = tiny_config(patch_position_embedding=False)
    again = TransfusionConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    assert again.patch_position_embedding is False


# ------------------------------------------------------------------------------------------------- validation
# Each case: the overrides, and a pattern naming the field and the offending value.
INVALID_CASES = {
    "patch_size_not_dividing_latent_size": ({"latent_size": 4, "patch_size": 3}, r"`patch_size`=3.*`latent_size`=4"),
    "unknown_patch_encoder": ({"patch_encoder": "conv"}, r"`patch_encoder`.*'conv'"),
    "unknown_prediction_type": ({"prediction_type": "sample"}, r"`prediction_type`.*'sample'"),
    "boi_outside_vocab": ({"boi_token_id": VOCAB_SIZE}, rf"`boi_token_id`={VOCAB_SIZE}.*vocab_size={VOCAB_SIZE}"),
    "eoi_negative": ({"eoi_token_id": -1}, r"`eoi_token_id`=-1"),
    "image_outside_vocab": ({"image_token_id": 1000}, r"`image_token_id`=1000"),
    "duplicate_special_ids": (
        {"eoi_token_id": IMAGE_TOKEN_ID},
        rf"distinct.*'eoi_token_id': {IMAGE_TOKEN_ID}.*'image_token_id': {IMAGE_TOKEN_ID}",
    ),
    "unet_patch_not_power_of_two": (
        {"patch_encoder": "unet", "latent_size": 6, "patch_size": 3, "unet_block_out_channels": [16, 16]},
        r"`patch_size`=3 must be a power of two",
    ),
    "unet_wrong_number_of_levels": (
        {"patch_encoder": "unet", "patch_size": 2, "unet_block_out_channels": [16, 16, 16]},
        r"`unet_block_out_channels`=\[16, 16, 16\].*2 entries.*`patch_size`=2",
    ),
    "unet_channels_not_multiple_of_8": (
        {"patch_encoder": "unet", "patch_size": 2, "unet_block_out_channels": [16, 12]},
        r"`unet_block_out_channels`=\[16, 12\].*multiples of `unet_norm_num_groups`=8",
    ),
    "negative_loss_weight": ({"diffusion_loss_weight": -1.0}, r"`diffusion_loss_weight`.*-1\.0"),
    "zero_latent_size": ({"latent_size": 0}, r"`latent_size`.*0"),
    "non_integer_patch_size": ({"patch_size": 1.5}, r"`patch_size`.*1\.5"),
    "zero_timesteps": ({"num_train_timesteps": 0}, r"`num_train_timesteps`.*0"),
    "unet_non_integer_patch_size": ({"patch_encoder": "unet", "patch_size": 1.5}, r"`patch_size`.*1\.5"),
    "missing_loss_weight": ({"diffusion_loss_weight": None}, r"`diffusion_loss_weight`.*None"),
}


@pytest.mark.parametrize("case", sorted(INVALID_CASES))
def test_invalid_config_names_field_and_value(case):
    overrides, pattern = INVALID_CASES[case]
    with pytest.raises(ValueError, match=pattern):
        tiny_config(**overrides)


def test_invalid_special_token_in_small_vocab_names_vocab_size():
    with pytest.raises(ValueError, match=re.escape("`image_token_id`=95 is outside the vocabulary") + r".*50"):
        TransfusionConfig(text_config=llama_text_config(vocab_size=50), latent_size=4, image_token_id=95)


def test_qwen2_backbone_also_validated():
    with pytest.raises(ValueError, match=r"`prediction_type`.*'x0'"):
        TransfusionConfig(text_config=qwen2_text_config(), latent_size=4, prediction_type="x0")
