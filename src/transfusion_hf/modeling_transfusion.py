"""Transfusion: one decoder transformer for next-token prediction and image diffusion (Zhou et al., 2024).

The backbone is any transformers decoder, built with `AutoModel.from_config(config.text_config)`: its attention,
RoPE, SDPA/flex kernels, gradient checkpointing and peft LoRA targets are used unchanged. Images enter through
`inputs_embeds` at their `<image>` placeholder positions, and the only change to the backbone's behaviour is the
attention mask (bidirectional inside each image), built with transformers' own `create_causal_mask`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import ModelOutput

from .configuration_transfusion import TransfusionConfig
from .hub import push_model_to_hub
from .image_layers import build_patch_layers
from .loss_transfusion import diffusion_loss, language_modeling_loss
from .masking_transfusion import build_transfusion_mask, image_block_ids


@dataclass
class TransfusionOutput(ModelOutput):
    """Output of [`TransfusionForMixedModal`].

    Args:
        loss (`torch.FloatTensor`, *optional*): `lm_loss + diffusion_loss_weight * diffusion_loss`.
        lm_loss (`torch.FloatTensor`, *optional*): next-token cross-entropy over text positions.
        diffusion_loss (`torch.FloatTensor`, *optional*): per-image MSE averaged over images.
        logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`).
        diffusion_predictions (`torch.FloatTensor` of shape `(num_images, C, H, W)`, *optional*): in the units of
            `config.prediction_type`.
        cache (`Cache`, *optional*): the KV cache, when `use_cache=True`.
        hidden_states (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*): the
            backbone's last hidden states, when `output_hidden_states=True`.
    """

    loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    diffusion_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    diffusion_predictions: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: torch.FloatTensor | None = None


def _refuse_flash_attention(attn_implementation: str | None) -> None:
    """Raise a `ValueError` saying why flash attention cannot be used (it takes no arbitrary mask)."""
    if isinstance(attn_implementation, str) and "flash" in attn_implementation:
        raise ValueError(
            f"attn_implementation={attn_implementation!r} is not supported: flash attention cannot express the "
            "bidirectional attention inside images. Use 'sdpa' (default), 'eager' or 'flex_attention'."
        )


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

    def _check_and_adjust_attn_implementation(
        self, attn_implementation: str | None, is_init_check: bool = False, allow_all_kernels: bool = False
    ) -> str:
        # With `_supports_flash_attn = False`, transformers' own refusal (raised here, at `__init__`,
        # `from_pretrained(attn_implementation=...)` and `set_attn_implementation`) reads "does not support Flash
        # Attention yet, please request support", so the explicit check in `__init__` was never reached. Say why.
        _refuse_flash_attention(attn_implementation)
        return super()._check_and_adjust_attn_implementation(
            attn_implementation, is_init_check=is_init_check, allow_all_kernels=allow_all_kernels
        )

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
        super().__init__(config)
        # The top-level implementation is checked by `_check_and_adjust_attn_implementation` above; the backbone's own
        # (a `text_config` set separately) is checked here, before the backbone is built.
        _refuse_flash_attention(config.text_config._attn_implementation)
        self.model = AutoModel.from_config(config.text_config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.image_encoder, self.image_decoder = build_patch_layers(config)
        self.patch_position_embedding = (
            nn.Embedding(config.num_patches, config.hidden_size) if config.patch_position_embedding else None
        )
        self.post_init()

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
        push. `card_kwargs` go to `transfusion_hf.hub.build_model_card` (`output_dir`, `base_model`, `datasets`, ...).
        """
        return push_model_to_hub(
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
    def from_text_model(cls, text_model: PreTrainedModel | str, **config_kwargs) -> TransfusionForMixedModal:
        """Start from a pretrained decoder LLM: its weights go into the backbone and LM head, image layers start
        fresh (paper, section 4.4 / LMFusion). Resize the LLM's embeddings for the special tokens beforehand.

        Args:
            text_model (`PreTrainedModel` or `str`): a causal LM (e.g. `LlamaForCausalLM`) or its path / repo id.
            config_kwargs: the image fields of [`TransfusionConfig`] (`latent_size`, `boi_token_id`, ...).
        """
        if isinstance(text_model, str):
            text_model = AutoModelForCausalLM.from_pretrained(text_model)
        config = TransfusionConfig(text_config=text_model.config.to_dict(), **config_kwargs)
        model = cls(config)
        missing, unexpected = model.load_state_dict(text_model.state_dict(), strict=False)
        backbone_missing = [key for key in missing if key.startswith(("model.", "lm_head."))]
        if unexpected or backbone_missing:
            raise ValueError(
                f"The text model's weights do not fit the backbone: unexpected {unexpected[:5]}, "
                f"missing {backbone_missing[:5]}."
            )
        return model.to(text_model.dtype)

    # ------------------------------------------------------------------------------------------------- images
    def encode_images(
        self, latents: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Embed noisy latents as transformer inputs.

        Args:
            latents (`torch.Tensor` of shape `(num_images, C, H, W)`).
            timesteps (`torch.Tensor` of shape `(num_images,)`).

        Returns:
            `(num_images, num_patches, hidden_size)` embeddings and the U-Net skips (or None).
        """
        embeds, skips = self.image_encoder(latents, timesteps)
        if self.patch_position_embedding is not None:
            embeds = embeds + self.patch_position_embedding.weight[None].to(embeds.dtype)
        return embeds, skips

    def _check_image_inputs(
        self, input_ids: torch.LongTensor, latents: torch.Tensor | None, timesteps: torch.Tensor | None
    ) -> int:
        """Validate `latents`/`timesteps` against the placeholders; returns the number of images."""
        config = self.config
        num_placeholders = int((input_ids == config.image_token_id).sum())
        if latents is None:
            if num_placeholders:
                raise ValueError(
                    f"`input_ids` hold {num_placeholders} image placeholders (image_token_id="
                    f"{config.image_token_id}) but no `latents` were given."
                )
            return 0
        expected = (config.latent_channels, config.latent_size, config.latent_size)
        if latents.dim() != 4 or tuple(latents.shape[1:]) != expected:
            raise ValueError(f"`latents` has shape {tuple(latents.shape)}, expected (num_images, *{expected}).")
        num_images = latents.shape[0]
        if timesteps is None or timesteps.shape != (num_images,):
            shape = None if timesteps is None else tuple(timesteps.shape)
            raise ValueError(f"`timesteps` has shape {shape}, expected ({num_images},): one per image.")
        if num_placeholders != num_images * config.num_patches:
            raise ValueError(
                f"`input_ids` hold {num_placeholders} image placeholders but `latents` has {num_images} images of "
                f"{config.num_patches} patches ({num_images * config.num_patches} expected)."
            )
        return num_images

    # ------------------------------------------------------------------------------------------------ forward
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
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> TransfusionOutput | tuple:
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
                Compute logits for the last `logits_to_keep` positions only (0 = all).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if input_ids is None:
            if inputs_embeds is None or latents is not None:
                raise ValueError("`input_ids` are required: they locate the image placeholders.")
            hidden_inputs = inputs_embeds
        else:
            hidden_inputs = self.get_input_embeddings()(input_ids)
        num_images = self._check_image_inputs(input_ids, latents, timesteps) if input_ids is not None else 0

        skips = None
        mask = attention_mask
        if num_images:
            # `set_attn_implementation({"text_config": "flash_attention_2"})` reaches the backbone only;
            # flash would silently drop the image blocks (plain causal attention), so refuse mixed input then.
            _refuse_flash_attention(self.model.config._attn_implementation)
            image_positions = input_ids == self.config.image_token_id
            image_embeds, skips = self.encode_images(latents, timesteps)
            # Reading order of `image_positions` (row-major) is the order of `latents`.
            hidden_inputs = hidden_inputs.masked_scatter(
                image_positions[..., None], image_embeds.reshape(-1, image_embeds.shape[-1]).to(hidden_inputs.dtype)
            )
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
        outputs = self.model(
            inputs_embeds=hidden_inputs,
            attention_mask=mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        logits = self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))

        predictions = None
        if num_images:
            image_hidden = hidden_states[image_positions].reshape(num_images, self.config.num_patches, -1)
            predictions = self.image_decoder(image_hidden, timesteps, skips)

        loss, lm_loss, diff_loss = self._compute_losses(
            logits, labels, input_ids, attention_mask, predictions, diffusion_targets, diffusion_loss_weights
        )
        output = TransfusionOutput(
            loss=loss,
            lm_loss=lm_loss,
            diffusion_loss=diff_loss,
            logits=logits,
            diffusion_predictions=predictions,
            cache=outputs.cache if use_cache is not False else None,
            hidden_states=hidden_states if output_hidden_states else None,
        )
        return output if return_dict else output.to_tuple()

    def _compute_losses(
        self,
        logits: torch.Tensor,
        labels: torch.LongTensor | None,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        predictions: torch.Tensor | None,
        diffusion_targets: torch.Tensor | None,
        diffusion_loss_weights: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        lm_loss = diff_loss = None
        if labels is not None:
            if input_ids is None or logits.shape[1] != input_ids.shape[1]:
                raise ValueError("`labels` need `input_ids` and logits for every position (logits_to_keep=0).")
            no_loss_inputs = (self.config.boi_token_id, self.config.image_token_id)
            mask_2d = attention_mask[:, -input_ids.shape[1] :] if attention_mask is not None else None
            lm_loss = language_modeling_loss(logits, labels, input_ids, no_loss_inputs, mask_2d)
        if diffusion_targets is not None:
            if predictions is None:
                raise ValueError("`diffusion_targets` were given but the batch holds no images (`latents`).")
            diff_loss = diffusion_loss(predictions, diffusion_targets, diffusion_loss_weights)
        if lm_loss is None and diff_loss is None:
            return None, None, None
        zero = logits.new_zeros((), dtype=torch.float32)
        total = (lm_loss if lm_loss is not None else zero) + self.config.diffusion_loss_weight * (
            diff_loss if diff_loss is not None else zero
        )
        return total, lm_loss, diff_loss

    # --------------------------------------------------------------------------------------------- generation
    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        # `generate` (num_return_sequences > 1, beams) repeat_interleaves every tensor kwarg on dim 0,
        # but `latents` / `timesteps` are per image, not per row: a row with images (a, b) expanded twice got (a, a)
        # and (b, b). Repeat each row's own images as a block instead, matching the expanded rows' reading order.
        latents = model_kwargs.pop("latents", None)
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
            index = torch.tensor(index, dtype=torch.long, device=latents.device)
            latents = latents.index_select(0, index)
            if timesteps is not None and timesteps.shape[:1] == (starts[-1],):
                timesteps = timesteps.index_select(0, index.to(timesteps.device))
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


__all__ = ["TransfusionOutput", "TransfusionPreTrainedModel", "TransfusionForMixedModal"]
