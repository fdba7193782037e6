"""The run's model: the recipe's fields with the flags applied, built from scratch or around a pretrained LLM (LoRA,
frozen text weights), the VAE and the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from ..configuration_transfusion import TransfusionConfig
from ..data.image_text import aspect_ratio_buckets_from_args
from ..modality_experts import freeze_text_weights
from ..modeling_transfusion import TransfusionForMixedModal
from ..processing_transfusion import add_special_tokens, special_token_ids
from ..recipes import load_recipe
from ..tokenization_transfusion import train_bpe_tokenizer
from .optimization import trainable_parameters

logger = logging.getLogger("transfusion_hf.training")


def first_line(error: Exception) -> str:
    """The first line of an error's message (hub errors append URLs and hints), for a one-line `error: ...`."""
    message = str(error).strip()
    return message.splitlines()[0] if message else type(error).__name__


def load_model_preset(name_or_path: str) -> dict:
    """The model fields of a recipe (`transfusion_hf.recipes`: a name, a retired alias, or a json path)."""
    try:
        return load_recipe(name_or_path).model  # parsed afresh on every call: the caller may change it
    except ValueError as error:
        raise ValueError(f"--{error}") from error  # the recipes' messages start with "recipe=..."


def warn_about_preset_limits(args: argparse.Namespace) -> None:
    """Say so before training when the recipe declares (its `warning`) that it does not draw this kind of data: `tiny`
    draws backgrounds only. `warning_except_dataset`, when given, names the built-in data set the recipe is made for
    (no warning there)."""
    recipe = load_recipe(args.recipe)
    if recipe.warning is None:
        return
    if recipe.warning_except_dataset is None or args.dataset_name != recipe.warning_except_dataset:
        logger.warning(f"--recipe {args.recipe}: {recipe.warning}")


def run_model_preset(args: argparse.Namespace) -> dict:
    """The run's model fields: those of `--recipe`, its backbone `text_config` updated by `--config_overrides`.

    transformers' `PretrainedConfig.update_from_string` parses the overrides (each value cast to the type of the field
    it replaces, unknown fields refused), as in its `run_clm.py`; a pretrained LLM brings its own config, so the two
    do not combine.
    """
    preset = load_model_preset(args.recipe)
    overrides = args.config_overrides
    if overrides is None:
        return preset
    if args.text_model_name_or_path is not None:
        raise ValueError(
            f"--config_overrides={overrides!r} changes a backbone trained from scratch; with "
            f"--text_model_name_or_path={args.text_model_name_or_path!r} the LLM's own config is used."
        )
    pairs = overrides.split(",")
    keys = [pair.partition("=")[0] for pair in pairs]
    if not all(pair.count("=") == 1 and key for pair, key in zip(pairs, keys)):
        raise ValueError(f"--config_overrides={overrides!r}: give comma-separated key=value pairs.")
    text_config = AutoConfig.for_model(**preset["text_config"])
    updated = {}
    for pair, key in zip(pairs, keys):
        try:
            text_config.update_from_string(pair)
        except ValueError as error:
            raise ValueError(f"--config_overrides={overrides!r}, field {key!r}: {first_line(error)}") from error
        updated[key] = getattr(text_config, key)
    return {**preset, "text_config": {**preset["text_config"], **updated}}


PRETRAINED_FLAG = "--pretrained_model_name_or_path"


def pretrained_pipeline_index(path: str) -> dict:
    """The `model_index.json` of a saved [`TransfusionPipeline`] folder (`--pretrained_model_name_or_path`).

    Raises:
        ValueError: one line naming the flag, when the folder is missing or holds no Transfusion pipeline.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(
            f"{PRETRAINED_FLAG}={path!r} is not a folder (give a TransfusionPipeline.save_pretrained one)."
        )
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ValueError(
            f"{PRETRAINED_FLAG}={path!r} has no model_index.json: not a saved pipeline (TransfusionPipeline."
            "save_pretrained, e.g. the --output_dir of a finished run)."
        )
    index = json.loads(index_file.read_text())
    class_name = index.get("_class_name")
    # A pipeline saved with its code names the class as [module, class].
    class_name = class_name[-1] if isinstance(class_name, list) else class_name
    if class_name != "TransfusionPipeline" or not (folder / "transformer").is_dir():
        raise ValueError(
            f"{PRETRAINED_FLAG}={path!r} is a {class_name} folder, not a TransfusionPipeline with a transformer."
        )
    return index


def pretrained_has_vae(path: str) -> bool:
    """Whether the saved pipeline at `path` has a VAE (else it works in pixel space)."""
    entry = pretrained_pipeline_index(path).get("vae")
    return isinstance(entry, list) and entry[0] is not None and (Path(path) / "vae").is_dir()


def build_vae(args: argparse.Namespace, device: torch.device | str = "cpu") -> tuple[AutoencoderKL | None, int, int]:
    """The frozen VAE on `device` (the accelerator: it encodes the data set, then decodes validation images), or None
    for pixel space; its downsampling factor and latent channels. With `--pretrained_model_name_or_path`, the saved
    pipeline's VAE (if it has one)."""
    pretrained = getattr(args, "pretrained_model_name_or_path", None)
    if pretrained is not None and pretrained_has_vae(pretrained):
        vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae")
    elif args.vae_name_or_path is None:
        return None, 1, 3
    else:
        vae = AutoencoderKL.from_pretrained(args.vae_name_or_path)
    vae.requires_grad_(False).eval().to(device)
    return vae, 2 ** (len(vae.config.block_out_channels) - 1), vae.config.latent_channels


def build_tokenizer(args: argparse.Namespace, captions: Iterable[str]) -> PreTrainedTokenizerBase:
    """The run's tokenizer: a saved pipeline's (`--pretrained_model_name_or_path`), a pretrained one, or a byte-level
    BPE learnt from the captions."""
    pretrained = getattr(args, "pretrained_model_name_or_path", None)
    if pretrained is not None:
        return AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer")
    source = args.tokenizer_name_or_path or args.text_model_name_or_path
    if source is None:
        # No pretrained tokenizer: a byte-level BPE learned from the captions (never meets an unknown character).
        return train_bpe_tokenizer(captions, vocab_size=args.tokenizer_vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(source)
    add_special_tokens(tokenizer)
    return tokenizer


# Flags that override the config field of the same name when given.
IMAGE_FIELD_FLAGS = (
    "patch_size",
    "patch_encoder",
    "prediction_type",
    "unet_block_out_channels",
    "unet_norm_num_groups",
    "unet_skip_connections",
    "image_attention",
    "patch_position_embedding_type",
)


def image_config_fields(args: argparse.Namespace, preset: dict, latent_channels: int, latent_size: int) -> dict:
    """The image and diffusion fields of the run's `TransfusionConfig`: the preset's, overridden by the flags."""
    fields = {key: value for key, value in preset.items() if key != "text_config"}
    fields.update(latent_channels=latent_channels, latent_size=latent_size)
    fields["diffusion_loss_weight"] = args.diffusion_loss_weight
    for name in IMAGE_FIELD_FLAGS:
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    for name in ("patch_position_embedding", "unet_linear_shortcut", "unet_output_shortcut"):  # true/false flags
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name) == "true"
    downsampling = args.resolution // latent_size  # the VAE's (1 in pixel space)
    buckets = aspect_ratio_buckets_from_args(args)
    if buckets:
        # Images of every bucket fit: the largest side, in latents (`--resolution` stays the default square size).
        largest = max(max(height, width) for height, width in buckets) // downsampling
        fields["max_latent_size"] = max(largest, latent_size)
    if args.patch_size is None and downsampling > 1 and "patch_size" in preset:
        # A recipe's patch size is measured in pixel space; on a VAE's latents the same image area (and so the same
        # number of image positions the recipe was tuned for) is a patch `downsampling` times smaller: the small
        # recipe's 8x8 pixel patches become 4x4 latent patches under a 2x VAE, 2x2 under a 4x one.
        fields["patch_size"] = max(1, preset["patch_size"] // downsampling)
    is_unet = fields.get("patch_encoder", "linear") == "unet"
    channels = fields.get("unet_block_out_channels")
    patch_size = fields.get("patch_size")
    if is_unet and channels and patch_size is not None and args.unet_block_out_channels is None:
        # A preset's U-Net is laid out for its own patch size (one level per halving); with a smaller patch keep its
        # finest log2(patch_size) + 1 levels, so `--recipe small --patch_size 2` needs no channel list.
        fields["unet_block_out_channels"] = channels[: patch_size.bit_length()]
    if args.unet_linear_shortcut is None:
        # The script's U-Nets take the linear shortcut unless the preset says otherwise: without it the U-Net names
        # the wrong colour in most captions and draws mixed colours (2 seeds, README "Why the U-Net's captions
        # fail"). The config class keeps False as its default, so U-Net checkpoints saved before it load unchanged.
        # A linear encoder (e.g. `--patch_encoder linear` on the small_unet preset) has no shortcut to take.
        fields["unet_linear_shortcut"] = is_unet and fields.get("unet_linear_shortcut", True)
    if args.unet_output_shortcut is None:
        # The output shortcut, for flow: without it the flow U-Net draws blobs of the right colour, with it characters
        # (glyph folder, 3,400 steps: t2i character 0.15 -> 0.80). With epsilon it draws tiled shapes (the paper's
        # recipe on the shapes, 2 seeds at 2,900 steps: 0.85 -> 0.49), as linear 8x8 epsilon does; v is unmeasured.
        # README "The U-Net's output shortcut".
        is_flow_unet = is_unet and fields.get("prediction_type") == "flow_prediction"
        fields["unet_output_shortcut"] = is_flow_unet and fields.get("unet_output_shortcut", True)
    return fields


def build_model(
    args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase, latent_channels: int, latent_size: int
) -> tuple[TransfusionForMixedModal, str | None]:
    """From scratch (a preset), from a pretrained LLM, or the transformer of a saved pipeline
    (`--pretrained_model_name_or_path`); returns the model and the base model id (for the card; None for a local
    pipeline folder)."""
    pretrained = getattr(args, "pretrained_model_name_or_path", None)
    if pretrained is not None:
        model = TransfusionForMixedModal.from_pretrained(
            pretrained, subfolder="transformer", attn_implementation=args.attn_implementation
        )
        return model, None
    preset = run_model_preset(args)
    text_config = preset.pop("text_config")
    image_fields = {
        **image_config_fields(args, preset, latent_channels, latent_size),
        **special_token_ids(tokenizer),
    }
    if args.modality_experts:
        image_fields["modality_experts"] = True
    if args.text_model_name_or_path is None:
        text_config["vocab_size"] = len(tokenizer)
        config = TransfusionConfig(text_config=text_config, **image_fields)
        config._attn_implementation = args.attn_implementation
        return TransfusionForMixedModal(config), None
    # Safetensors only (as `TransfusionForMixedModal.from_pretrained`): a pickle-only LLM is refused, not unpickled.
    language_model = AutoModelForCausalLM.from_pretrained(
        args.text_model_name_or_path, attn_implementation=args.attn_implementation, use_safetensors=True
    )
    if len(tokenizer) > language_model.get_input_embeddings().weight.shape[0]:
        language_model.resize_token_embeddings(len(tokenizer))
    return TransfusionForMixedModal.from_text_model(language_model, **image_fields), args.text_model_name_or_path


def apply_lora(args: argparse.Namespace, model: TransfusionForMixedModal, new_token_ids: list[int]) -> torch.nn.Module:
    """Wrap the backbone in LoRA adapters; image layers and the new special-token rows train fully."""
    from peft import LoraConfig, get_peft_model

    image_modules = ["image_encoder", "image_decoder"]
    if model.patch_position_embedding is not None:
        image_modules.append("patch_position_embedding")
    trainable_tokens = None
    if new_token_ids:
        trainable_tokens = {"embed_tokens": new_token_ids}
        # With untied output embeddings (Llama's default) the LM-head rows of the new tokens must train too, or the
        # model never learns to predict <boi>/<eoi>. Tied heads follow embed_tokens (peft).
        if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
            trainable_tokens["lm_head"] = new_token_ids
    lora_config = LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha or args.lora_rank,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        modules_to_save=image_modules,
        trainable_token_indices=trainable_tokens,
    )
    return get_peft_model(model, lora_config)


def prepare_model(
    args: argparse.Namespace,
    tokenizer: PreTrainedTokenizerBase,
    latent_channels: int,
    latent_size: int,
    accelerator: Accelerator,
) -> tuple[torch.nn.Module, str | None, list[torch.nn.Parameter]]:
    """Build the model with its gradient checkpointing, LoRA adapters or frozen text weights, and print its size.

    Returns:
        The model, the base model id (None from scratch) and the parameters trained only in their new special-token
        rows (`--freeze_text`; empty otherwise).
    """
    model, base_model = build_model(args, tokenizer, latent_channels, latent_size)
    if args.gradient_checkpointing:
        # `gradient_checkpointing_enable` is deprecated in transformers 5 (same behaviour, non-reentrant).
        model.activation_checkpointing_enable()
    new_token_ids = list(special_token_ids(tokenizer).values())
    row_trained = []
    if args.lora_rank:
        model = apply_lora(args, model, new_token_ids if base_model else [])
    elif args.freeze_text:
        # The new special-token rows train (input embeddings and LM head, as with LoRA): the model learns where an
        # image starts; text-only input never reads those rows, so its logits over the LLM's vocabulary stay exact.
        row_trained = freeze_text_weights(model, new_token_ids)
    accelerator.print(
        f"Model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
        f"({sum(p.numel() for p in trainable_parameters(model)) / 1e6:.2f}M trainable)."
    )
    return model, base_model, row_trained
