"""Transfusion: one decoder transformer for next-token prediction and image diffusion (Zhou et al., 2024).

The backbone is any transformers decoder, built with `AutoModel.from_config(config.text_config)`: its attention,
RoPE, SDPA/flex kernels, gradient checkpointing and peft LoRA targets are used unchanged. Images enter through
`inputs_embeds` at their `<image>` placeholder positions, and the only change to the backbone's behaviour is the
attention mask (bidirectional inside each image), built with transformers' own `create_causal_mask`. With
`config.modality_experts`, image positions also get their own copy of each layer's weights (`modality_experts.py`).
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_utils import slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, can_return_tuple

from .configuration_transfusion import TransfusionConfig
from .image_grids import ImageGroup, group_images_by_grid, placeholder_block_lengths
from .image_layers import TransfusionPatchPositionEmbedding, build_patch_layers
from .loss_transfusion import diffusion_loss, language_modeling_loss
from .masking_transfusion import build_transfusion_mask, image_block_ids
from .modality_experts import (
    IMAGE_EXPERT_NAME,
    ModalityRouting,
    add_modality_experts,
    copy_text_weights_to_image_experts,
)


def import_hub_module(caller: str) -> ModuleType:
    """`transfusion_hf.hub` (push and model-card code), imported by name when a push runs.

    Not `from .hub import ...`: transformers and diffusers read a module's imports as text (function bodies too) to copy
    modules beside the weights and to check the packages that `trust_remote_code=True` needs; the model and the
    pipeline load and run without the Hub code. Code loaded from beside the weights without the package installed
    gets one line saying what to do instead.

    Args:
        caller (`str`): the method that pushes, named in the error.
    """
    try:
        return importlib.import_module("transfusion_hf.hub")
    except ModuleNotFoundError as error:
        if error.name != "transfusion_hf":
            raise
        raise ImportError(
            f"{caller} writes the Transfusion model card with transfusion_hf, which is not installed: `pip install "
            "transfusion-hf`, or push the folder of `save_pretrained` with `huggingface_hub.upload_folder`."
        ) from error


@dataclass
class TransfusionOutput(ModelOutput):
    """Output of [`TransfusionForMixedModal`].

    Args:
        loss (`torch.FloatTensor`, *optional*): `lm_loss + diffusion_loss_weight * diffusion_loss`.
        lm_loss (`torch.FloatTensor`, *optional*): next-token cross-entropy over text positions.
        diffusion_loss (`torch.FloatTensor`, *optional*): per-image MSE averaged over images.
        logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`, *optional*): the
            next-token logits; None with `skip_logits` (by default when training with `labels`).
        diffusion_predictions (`torch.FloatTensor` of shape `(num_images, C, H, W)`, *optional*): in the units of
            `config.prediction_type`.
        cache (`Cache`, *optional*): the KV cache, when `use_cache=True`.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): the backbone's hidden states, when
            `output_hidden_states=True`: the input embeddings (images already scattered in) and the output of every
            layer, `num_hidden_layers + 1` tensors of shape `(batch_size, sequence_length, hidden_size)`; the last
            one is after the final norm (the states the LM head and the image decoder read).
        attentions (`tuple(torch.FloatTensor)`, *optional*): the backbone's attention weights, one tensor of shape
            `(batch_size, num_heads, sequence_length, past_length + sequence_length)` per layer, when
            `output_attentions=True` (eager attention only: the fused kernels do not return them).
    """

    loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    diffusion_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    diffusion_predictions: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def _refuse_flash_attention(attn_implementation: str | None) -> None:
    """Raise a `ValueError` saying why flash attention cannot be used (it takes no arbitrary mask)."""
    if isinstance(attn_implementation, str) and "flash" in attn_implementation:
        raise ValueError(
            f"attn_implementation={attn_implementation!r} is not supported: flash attention cannot express the "
            "bidirectional attention inside images. Use 'sdpa' (default), 'eager' or 'flex_attention'."
        )


def _requested_implementations(attn_implementation: str | dict | None) -> list[str | None]:
    """Every implementation named in `set_attn_implementation`'s argument (a string, or nested per-sub-config
    dicts such as `{"text_config": "eager"}`)."""
    if isinstance(attn_implementation, dict):
        return [name for value in attn_implementation.values() for name in _requested_implementations(value)]
    return [attn_implementation]


class TransfusionPreTrainedModel(PreTrainedModel):
    config: TransfusionConfig
    config_class = TransfusionConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flex_attn = True
    # Flash attention kernels take no arbitrary mask, so they cannot express the bidirectional image blocks.
    _supports_flash_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False

    def set_attn_implementation(self, attn_implementation: str | dict, allow_all_kernels: bool = False) -> None:
        """transformers' `set_attn_implementation`, refusing flash attention (for the model or `text_config`)
        with the reason, before transformers' own generic "does not support Flash Attention yet" error."""
        for implementation in _requested_implementations(attn_implementation):
            _refuse_flash_attention(implementation)
        super().set_attn_implementation(attn_implementation, allow_all_kernels=allow_all_kernels)

    def _init_weights(self, module: nn.Module) -> None:
        # Output layers of the image path start at zero (DiT), flagged on the leaf layer because modules without
        # direct parameters are skipped by the init pass.
        if getattr(module, "_transfusion_zero_init", False):
            init.zeros_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
            return
        if getattr(module, "_transfusion_default_init", False):
            # U-Net layers keep PyTorch's fan-in initialisation, as diffusers' blocks do (`mark_default_init`).
            # Through `transformers.initialization`, so weights loaded by `from_pretrained` are never overwritten.
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                init.uniform_(module.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
            return
        super()._init_weights(module)


class TransfusionForMixedModal(TransfusionPreTrainedModel, GenerationMixin):
    """Transfusion model: a decoder LLM backbone, a language modeling head, and image patch encoder/decoder.

    Sequences hold text tokens and `<boi> <image>*N <eoi>` blocks. Text positions get next-token logits; the hidden
    states at image positions are decoded into diffusion predictions (noise, velocity or flow).
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TransfusionConfig):
        # Before `PreTrainedModel.__init__`, whose own refusal (`_supports_flash_attn = False`) only says "does not
        # support Flash Attention yet". `from_pretrained(attn_implementation=...)` and `from_config` set the config
        # before building the model, so they reach this check too; `set_attn_implementation` is checked above.
        _refuse_flash_attention(config._attn_implementation)
        _refuse_flash_attention(config.text_config._attn_implementation)
        super().__init__(config)
        self.model = AutoModel.from_config(config.text_config)
        if config.modality_experts:
            add_modality_experts(self.model)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.image_encoder, self.image_decoder = build_patch_layers(config)
        self.patch_position_embedding = (
            TransfusionPatchPositionEmbedding(config) if config.patch_position_embedding else None
        )
        self.post_init()
        if config.modality_experts:
            # The init pass draws the image copies independently: start them as copies of the text weights (LMFusion).
            copy_text_weights_to_image_experts(self)

    # ----------------------------------------------------------------------------------------------- embeddings
    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
        **card_kwargs,
    ) -> str:
        """transformers' `push_to_hub` (same arguments and behaviour), writing the Transfusion model card on every
        push. `card_kwargs` go to `transfusion_hf.modelcard_transfusion.build_model_card` (`output_dir`,
        `base_model`, `datasets`, ...). Needs transfusion_hf installed (not only the code saved beside the weights).
        """
        return import_hub_module("TransfusionForMixedModal.push_to_hub").push_model_to_hub(
            self,
            repo_id,
            commit_message=commit_message,
            commit_description=commit_description,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
            max_shard_size=max_shard_size,
            tags=tags,
            **card_kwargs,
        )

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike | None, *model_args, **kwargs
    ) -> TransfusionForMixedModal | tuple[TransfusionForMixedModal, dict]:
        """transformers' `from_pretrained`; in addition, image copies missing from the checkpoint (a model saved
        without `modality_experts`, loaded with `modality_experts=True`) start from the loaded text weights instead
        of random ones. Weights load from safetensors only (`use_safetensors=True` unless passed): a checkpoint that
        holds only a pickle (`pytorch_model.bin`) is refused instead of unpickled, as the pipeline does."""
        kwargs.setdefault("use_safetensors", True)
        return_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        if model.config.modality_experts:
            missing = {key for key in loading_info["missing_keys"] if f".{IMAGE_EXPERT_NAME}." in key}
            copy_text_weights_to_image_experts(model, names=missing)
        return (model, loading_info) if return_loading_info else model

    @classmethod
    def from_text_model(cls, text_model: PreTrainedModel | str, **config_kwargs) -> TransfusionForMixedModal:
        """Start from a pretrained decoder LLM: its weights go into the backbone and LM head, image layers start
        fresh (paper, section 4.4 / LMFusion). Resize the LLM's embeddings for the special tokens beforehand. With
        `modality_experts=True` the image copies start from the LLM's weights.

        Args:
            text_model (`PreTrainedModel` or `str`): a causal LM (e.g. `LlamaForCausalLM`) or its path / repo id.
            config_kwargs: the image fields of [`TransfusionConfig`] (`latent_size`, `boi_token_id`, ...).
        """
        if isinstance(text_model, str):
            # Safetensors only, as `from_pretrained`: an LLM that ships only a pickle is refused, not unpickled.
            text_model = AutoModelForCausalLM.from_pretrained(text_model, use_safetensors=True)
        config = TransfusionConfig(text_config=text_model.config.to_dict(), **config_kwargs)
        model = cls(config)
        missing, unexpected = model.load_state_dict(text_model.state_dict(), strict=False)
        expert_keys = {key for key in missing if f".{IMAGE_EXPERT_NAME}." in key}
        backbone_missing = [
            key for key in missing if key.startswith(("model.", "lm_head.")) and key not in expert_keys
        ]
        if unexpected or backbone_missing:
            raise ValueError(
                f"The text model's weights do not fit the backbone: unexpected {unexpected[:5]}, "
                f"missing {backbone_missing[:5]}."
            )
        copy_text_weights_to_image_experts(model)
        return model.to(text_model.dtype)

    # ------------------------------------------------------------------------------------------------- images
    def encode_images(
        self, latents: torch.Tensor | list[torch.Tensor], timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, list[ImageGroup]]:
        """Embed noisy latents as transformer inputs, one encoder call per group of images with the same grid.

        Args:
            latents (`torch.Tensor` of shape `(num_images, C, H, W)`, or a list of `(C, H_i, W_i)` tensors): the
                noisy latents.
            timesteps (`torch.Tensor` of shape `(num_images,)`): their timesteps.

        Returns:
            The embeddings `(total_patches, hidden_size)`: every image's patches in raster order, the images in order;
            and the [`ImageGroup`]s (with their U-Net skips), which [`decode_images`] takes back.
        """
        groups = group_images_by_grid(latents, self.config.patch_size)
        group_embeds = []
        for group in groups:
            group_latents = latents if group.indices is None else torch.stack([latents[i] for i in group.indices])
            group_timesteps = timesteps if group.indices is None else timesteps[group.index_tensor(timesteps.device)]
            embeds, group.skips = self.image_encoder(group_latents, group_timesteps)
            if self.patch_position_embedding is not None:
                embeds = embeds + self.patch_position_embedding(group.grid)[None].to(embeds.dtype)
            group_embeds.append(embeds)
        if len(groups) == 1 and groups[0].indices is None:
            return group_embeds[0].flatten(0, 1), groups
        per_image: list[torch.Tensor] = [None] * sum(len(group.indices) for group in groups)
        for group, embeds in zip(groups, group_embeds):
            for slot, index in enumerate(group.indices):
                per_image[index] = embeds[slot]
        return torch.cat(per_image), groups

    def decode_images(
        self, image_hidden: torch.Tensor, timesteps: torch.Tensor, groups: list[ImageGroup]
    ) -> torch.Tensor | list[torch.Tensor]:
        """The image decoder on the backbone's hidden states at the image positions, one call per group.

        Args:
            image_hidden (`torch.Tensor` of shape `(total_patches, hidden_size)`): in the order of [`encode_images`].
            timesteps (`torch.Tensor` of shape `(num_images,)`): the images' timesteps.
            groups (`list[ImageGroup]`): from [`encode_images`].

        Returns:
            The predictions in the form of the latents: `(num_images, C, H, W)`, or a list of `(C, H_i, W_i)`.
        """
        if len(groups) == 1 and groups[0].indices is None:
            group = groups[0]
            hidden = image_hidden.reshape(-1, group.grid[0] * group.grid[1], image_hidden.shape[-1])
            return self.image_decoder(hidden, timesteps, group.skips, grid=group.grid)
        grids = [None] * sum(len(group.indices) for group in groups)
        for group in groups:
            for index in group.indices:
                grids[index] = group.grid
        per_image_hidden = image_hidden.split([rows * columns for rows, columns in grids])
        predictions: list[torch.Tensor] = [None] * len(grids)
        for group in groups:
            hidden = torch.stack([per_image_hidden[index] for index in group.indices])
            output = self.image_decoder(
                hidden, timesteps[group.index_tensor(timesteps.device)], group.skips, grid=group.grid
            )
            for slot, index in enumerate(group.indices):
                predictions[index] = output[slot]
        return predictions

    def _check_image_inputs(
        self,
        input_ids: torch.LongTensor,
        latents: torch.Tensor | list[torch.Tensor] | None,
        timesteps: torch.Tensor | None,
    ) -> tuple[int, int]:
        """Validate `latents`/`timesteps` against the placeholders; returns the number of images and of their
        patches."""
        config = self.config
        num_images = 0 if latents is None else len(latents)
        images = latents if isinstance(latents, list) else [] if latents is None else [latents]
        patches = []  # per image (a list) or per image of the one tensor
        for index, image in enumerate(images):
            per_image = isinstance(latents, list)
            name = f"latents[{index}]" if per_image else "latents"
            if image.dim() != (3 if per_image else 4) or image.shape[-3] != config.latent_channels:
                expected = "(C, H, W)" if per_image else "(num_images, C, H, W)"
                raise ValueError(
                    f"`{name}` has shape {tuple(image.shape)}, expected {expected} with C = `latent_channels`="
                    f"{config.latent_channels}."
                )
            config.check_latent_grid(image.shape[-2], image.shape[-1], name)
            patches.append((image.shape[-2] // config.patch_size) * (image.shape[-1] // config.patch_size))
        if latents is not None and (timesteps is None or timesteps.shape != (num_images,)):
            shape = None if timesteps is None else tuple(timesteps.shape)
            raise ValueError(f"`timesteps` has shape {shape}, expected ({num_images},): one per image.")
        # Kept as `num_images * patches` for one tensor: a compiled step keeps the image count symbolic.
        expected_placeholders = sum(patches) if isinstance(latents, list) else num_images * (patches or [0])[0]
        mixed = len(set(patches)) > 1
        placeholder_count = (input_ids == config.image_token_id).sum()
        if torch.compiler.is_compiling():
            # Reading the count in Python (`.item()`) would break the graph: a compiled step checks it inside the
            # graph, failing with this reason (a RuntimeError) instead of the ValueErrors below.
            torch._assert_async(
                placeholder_count == expected_placeholders,
                "`input_ids` hold a number of image placeholders other than the patches of `latents`",
            )
            return num_images, expected_placeholders
        num_placeholders = int(placeholder_count)
        if latents is None and num_placeholders:
            raise ValueError(
                f"`input_ids` hold {num_placeholders} image placeholders (image_token_id="
                f"{config.image_token_id}) but no `latents` were given."
            )
        if num_placeholders != expected_placeholders:
            raise ValueError(
                f"`input_ids` hold {num_placeholders} image placeholders but `latents` has {num_images} images of "
                f"{patches if mixed else (patches or [0])[0]} patches ({expected_placeholders} expected)."
            )
        if mixed or (patches and patches[0] != config.num_patches):
            # Images of other grids than the default: each placeholder block must match its image, in reading order
            # (the right total alone could still split an image's patches over two blocks).
            per_image = patches if isinstance(latents, list) else patches * num_images
            block_lengths = placeholder_block_lengths(input_ids, config.image_token_id)
            if block_lengths != per_image:
                raise ValueError(
                    f"The image placeholder blocks of `input_ids` have {block_lengths} positions but the images of "
                    f"`latents` have {per_image} patches, in reading order."
                )
        return num_images, expected_placeholders

    def _latents_from_pixel_values(
        self, latents: torch.Tensor | None, pixel_values: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The images as latents: a pixel-space model (no VAE) takes the `pixel_values` of `TransfusionProcessor`
        as they are; a model on VAE latents refuses them, saying how to encode them."""
        if pixel_values is None:
            return latents
        if latents is not None:
            raise ValueError("Both `latents` and `pixel_values` were given: pass the images once.")
        config = self.config
        images = pixel_values if isinstance(pixel_values, list) else [pixel_values]
        if config.latent_channels != 3 or any(image.dim() not in (3, 4) or image.shape[-3] != 3 for image in images):
            shape = [tuple(image.shape) for image in images] if isinstance(pixel_values, list) else images[0].shape
            raise ValueError(
                f"`pixel_values` has shape {tuple(shape)}, but this model takes `latents` with "
                f"{config.latent_channels} channels. A model on VAE latents needs the pixels encoded first: "
                "`latents = (vae.encode(pixel_values).latent_dist.mode() - shift_factor) * scaling_factor`."
            )
        if isinstance(pixel_values, list):
            return [image.to(self.dtype) for image in pixel_values]
        return pixel_values.to(self.dtype)

    def _embed_inputs(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        latents: torch.Tensor | None,
        timesteps: torch.Tensor | None,
        cache: Cache | None,
        position_ids: torch.LongTensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, ModalityRouting | None, list[ImageGroup] | None]:
        """Token embeddings with the images scattered in at their placeholders, and the attention mask.

        Returns:
            `(inputs_embeds, mask, image_routing, image_groups)`: embeddings `(batch_size, sequence_length,
            hidden_size)`; the 2D `attention_mask`, or the Transfusion block mask when there are images; the flat
            indices of the placeholder and text positions as a [`ModalityRouting`] (None without images); the images
            grouped by grid, with their U-Net skips (None without images).
        """
        if input_ids is None:
            if inputs_embeds is None or latents is not None:
                raise ValueError("`input_ids` are required: they locate the image placeholders.")
            return inputs_embeds, attention_mask, None, None
        hidden_inputs = self.get_input_embeddings()(input_ids)
        num_images, num_image_positions = self._check_image_inputs(input_ids, latents, timesteps)
        if not num_images:
            if cache is None and attention_mask is None and position_ids is not None:
                # Packed sequences (positions restarting per sequence, no 2D mask): transformers finds their
                # boundaries only when it builds the mask without a cache, and the backbone makes itself an empty
                # one whenever `use_cache` is on. Built here without it, as for mixed input, they never leak.
                mask = build_transfusion_mask(
                    self.model.config, hidden_inputs, input_ids, self.config.image_token_id, position_ids=position_ids
                )
                return hidden_inputs, mask, None, None
            return hidden_inputs, attention_mask, None, None
        # `set_attn_implementation` refuses flash attention, but the backbone's own (e.g. `model.model.
        # set_attn_implementation`, which Llama allows) would silently drop the image blocks: refuse mixed input.
        _refuse_flash_attention(self.model.config._attn_implementation)
        # Indices of static size (known from `latents`), not a boolean mask: `masked_scatter` and `x[mask]` have
        # data-dependent shapes, which break a compiled graph and cost a host sync in eager mode.
        image_routing = ModalityRouting.from_image_positions(
            input_ids == self.config.image_token_id, num_image_positions
        )
        patch_embeds, image_groups = self.encode_images(latents, timesteps)
        # Reading order of the placeholders (row-major) is the order of `latents`.
        patch_embeds = patch_embeds.to(hidden_inputs.dtype)
        hidden_inputs = hidden_inputs.flatten(0, 1).index_copy(0, image_routing.image_index, patch_embeds)
        hidden_inputs = hidden_inputs.unflatten(0, image_routing.shape)
        mask = build_transfusion_mask(
            self.model.config,
            hidden_inputs,
            input_ids,
            self.config.image_token_id,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
            bidirectional_images=self.config.image_attention == "bidirectional",
        )
        return hidden_inputs, mask, image_routing, image_groups

    # ------------------------------------------------------------------------------------------------ forward
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        diffusion_targets: torch.Tensor | None = None,
        diffusion_loss_weights: torch.Tensor | None = None,
        cache: Cache | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        pixel_values: torch.Tensor | None = None,
        skip_logits: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> TransfusionOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Text tokens and `<boi> <image>*N <eoi>` blocks (N = `config.num_patches`).
            attention_mask (`torch.Tensor` of shape `(batch_size, past_length + sequence_length)`, *optional*):
                1 for real tokens, 0 for padding.
            latents (`torch.Tensor` of shape `(num_images, latent_channels, latent_size, latent_size)`, *optional*):
                The noisy latents of every image of the batch in reading order (row by row, left to right).
            timesteps (`torch.Tensor` of shape `(num_images,)`, *optional*):
                The diffusion time of each image in `[0, num_train_timesteps]` (0 = clean).
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Text targets, usually `input_ids`; shifted inside; `-100` is ignored.
            diffusion_targets (`torch.Tensor` of shape `(num_images, C, H, W)`, *optional*):
                Targets of the image head in the units of `config.prediction_type` (see `transfusion_hf.noising`).
            diffusion_loss_weights (`torch.Tensor` of shape `(num_images,)`, *optional*):
                Per-image weights of the diffusion MSE (min-SNR-gamma, from `transfusion_hf.noising`).
            cache (`Cache`, *optional*):
                KV cache of the prefix; the new positions are `input_ids`.
            logits_to_keep (`int` or `torch.Tensor`, *optional*):
                Compute logits for the last `logits_to_keep` positions only (0 = all). With `labels` it must be 0,
                unless the logits are skipped (`skip_logits`), which computes the loss's own.
            pixel_values (`torch.Tensor` of shape `(num_images, 3, latent_size, latent_size)`, *optional*):
                Images in [-1, 1] as [`TransfusionProcessor`] returns them, for a pixel-space model (no VAE,
                `latent_channels=3`): they are its latents. Give `latents` or `pixel_values`, not both.
            skip_logits (`bool`, *optional*):
                Return no `logits` and run the LM head only where the text loss needs it: on the positions that are
                not image placeholders (most of a sequence in text-to-image data), never on all `batch_size x
                sequence_length` (the fp32 logits are the largest activation of a step with a large vocabulary).
                The loss is the same. Default (None): on when training with `labels` (Liger Kernel's convention,
                whose `skip_logits` the `Trainer` also passes), off otherwise.
            kwargs (`TransformersKwargs`, *optional*):
                Passed to the backbone, as in Llama: `output_hidden_states`, `output_attentions` (eager attention),
                ... `return_dict=False` returns a tuple of the non-None fields of [`TransfusionOutput`].
        """
        latents = self._latents_from_pixel_values(latents, pixel_values)
        hidden_inputs, mask, image_routing, image_groups = self._embed_inputs(
            input_ids, inputs_embeds, attention_mask, latents, timesteps, cache, position_ids
        )
        if self.config.modality_experts and image_routing is not None:
            # Follows this call's own `input_ids`: with a prefix cache a denoising step holds image positions only.
            kwargs["modality_routing"] = image_routing
        outputs = self.model(
            inputs_embeds=hidden_inputs,
            attention_mask=mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if skip_logits is None:
            skip_logits = self.training and labels is not None
        logits = None if skip_logits else self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))

        predictions = None
        if image_routing is not None:
            image_hidden = hidden_states.flatten(0, 1).index_select(0, image_routing.image_index)
            predictions = self.decode_images(image_hidden, timesteps, image_groups)

        lm_loss = None
        if labels is not None:
            lm_loss = self._text_loss(hidden_states, logits, labels, input_ids, attention_mask, image_routing)
        loss, lm_loss, diff_loss = self._compute_losses(
            hidden_states, lm_loss, predictions, diffusion_targets, diffusion_loss_weights
        )
        return TransfusionOutput(
            loss=loss,
            lm_loss=lm_loss,
            diffusion_loss=diff_loss,
            logits=logits,
            diffusion_predictions=predictions,
            cache=outputs.cache if use_cache is not False else None,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def _text_loss(
        self,
        hidden_states: torch.Tensor,
        logits: torch.Tensor | None,
        labels: torch.LongTensor,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        image_routing: ModalityRouting | None,
    ) -> torch.Tensor:
        """Next-token loss from `logits` of every position, or, when they were skipped (None), from the LM head run on
        the positions that are not image placeholders (static count: a compiled step keeps one graph)."""
        if input_ids is None:
            raise ValueError("`labels` need `input_ids`: they say which positions are text.")
        no_loss_inputs = (self.config.boi_token_id, self.config.image_token_id)
        mask_2d = attention_mask[:, -input_ids.shape[1] :] if attention_mask is not None else None
        if logits is not None:
            if logits.shape[1] != input_ids.shape[1]:
                raise ValueError("`labels` need logits for every position (logits_to_keep=0) or skip_logits=True.")
            return language_modeling_loss(logits, labels, input_ids, no_loss_inputs, mask_2d)
        text_index = image_routing.text_index if image_routing is not None else None
        text_hidden = hidden_states if text_index is None else hidden_states.flatten(0, 1).index_select(0, text_index)
        return language_modeling_loss(
            self.lm_head(text_hidden), labels, input_ids, no_loss_inputs, mask_2d, position_index=text_index
        )

    def _compute_losses(
        self,
        hidden_states: torch.Tensor,
        lm_loss: torch.Tensor | None,
        predictions: torch.Tensor | None,
        diffusion_targets: torch.Tensor | None,
        diffusion_loss_weights: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        diff_loss = None
        if diffusion_targets is not None:
            if predictions is None:
                raise ValueError("`diffusion_targets` were given but the batch holds no images (`latents`).")
            diff_loss = diffusion_loss(predictions, diffusion_targets, diffusion_loss_weights)
        if lm_loss is None and diff_loss is None:
            return None, None, None
        zero = hidden_states.new_zeros((), dtype=torch.float32)
        total = (lm_loss if lm_loss is not None else zero) + self.config.diffusion_loss_weight * (
            diff_loss if diff_loss is not None else zero
        )
        return total, lm_loss, diff_loss

    # --------------------------------------------------------------------------------------------- generation
    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        # `generate` (num_return_sequences > 1, beams) repeat_interleaves every tensor kwarg on dim 0,
        # but `latents` / `timesteps` are per image, not per row: a row with images (a, b) expanded twice got (a, a)
        # and (b, b). Repeat each row's own images as a block instead, matching the expanded rows' reading order.
        # A pixel-space model's `pixel_values` (the processor's output) are its latents: from here on they are.
        latents = self._latents_from_pixel_values(
            model_kwargs.pop("latents", None), model_kwargs.pop("pixel_values", None)
        )
        timesteps = model_kwargs.pop("timesteps", None)
        if expand_size > 1 and latents is not None and input_ids is not None:
            images_per_row = (image_block_ids(input_ids, self.config.image_token_id).amax(dim=1) + 1).tolist()
            starts = [0]
            for count in images_per_row:
                starts.append(starts[-1] + count)
            index = [
                image
                for row, count in enumerate(images_per_row)
                for _ in range(expand_size)
                for image in range(starts[row], starts[row] + count)
            ]
            if isinstance(latents, list):  # images of several sizes
                latents = [latents[image] for image in index]
            else:
                latents = latents.index_select(0, torch.tensor(index, dtype=torch.long, device=latents.device))
            if timesteps is not None and timesteps.shape[:1] == (starts[-1],):
                timesteps = timesteps.index_select(0, torch.tensor(index, dtype=torch.long, device=timesteps.device))
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if latents is not None:
            model_kwargs["latents"] = latents
        if timesteps is not None:
            model_kwargs["timesteps"] = timesteps
        return input_ids, model_kwargs

    def prepare_inputs_for_generation(self, input_ids, cache=None, is_first_iteration=False, **kwargs):
        latents = kwargs.pop("latents", None)
        timesteps = kwargs.pop("timesteps", None)
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, cache=cache, is_first_iteration=is_first_iteration, **kwargs
        )
        # Images in the prompt are embedded once, during the prefill; later steps see them through the cache.
        past_length = cache.get_seq_length() if cache is not None else 0
        if past_length == 0 and latents is not None:
            model_inputs["latents"] = latents
            model_inputs["timesteps"] = timesteps
        return model_inputs


# `save_pretrained` copies this file and every module it imports (relative imports, recursively) beside the weights
# and names it in config.json's `auto_map`: `AutoModel.from_pretrained(repo_or_dir, trust_remote_code=True)` then
# loads the model where transfusion_hf is not installed. Where it is, `AutoModel` keeps the registered class.
TransfusionForMixedModal.register_for_auto_class("AutoModel")

__all__ = ["TransfusionOutput", "TransfusionPreTrainedModel", "TransfusionForMixedModal"]
