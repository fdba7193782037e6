"""TransfusionPipeline: text-to-image, captions, interleaved text and images, with a prefix KV cache.

Sampling and guidance live here, never in the model (paper, section 3.4 "Inference"): text is sampled token by
token; when `<boi>` comes, the prompt is prefilled into the KV cache once and every denoising step runs only the
image positions against it; the clean image is then written into the cache and `<eoi>` lets text continue.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from transformers import DynamicCache, LogitsProcessorList
from transformers.cache_utils import DynamicLayer

from .hub import push_pipeline_to_hub
from .modeling_transfusion import TransfusionForMixedModal
from .processing_transfusion import ImageInput, TransfusionProcessor, images_to_pixel_values, pad_sequences

logger = logging.get_logger(__name__)
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt"]


class _ReservedDynamicLayer(DynamicLayer):
    """A `DynamicLayer` that keeps `reserve` free slots after its content (benchmark fix).

    The denoising loop appends the image positions to the prefix cache and crops them off again at every step. A plain
    `DynamicLayer` appends with `torch.cat`, which copies the whole prefix each time (22% of a step at a 1024-token
    prompt, and growing with it); here the new states are copied into the free slots and `crop` (inherited) only
    shortens the view, so a step costs the same whatever the prefix length, apart from attention itself. The layer
    is used under `no_grad` only: the slots are overwritten in place.
    """

    def __init__(self, reserve: int):
        super().__init__()
        self.reserve = reserve
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        new_length = length + key_states.shape[-2]
        buffer = self._key_buffer
        # The content must still be the head of the buffer (not replaced by a reorder, reset, ...) and fit in it.
        fits = (
            buffer is not None
            and self.keys.data_ptr() == buffer.data_ptr()
            and self.keys.dtype == key_states.dtype
            and buffer.shape[:2] == key_states.shape[:2]
            and buffer.shape[-1] == key_states.shape[-1]
            and new_length <= buffer.shape[-2]
        )
        if not fits:
            shape = (*key_states.shape[:2], new_length + self.reserve, key_states.shape[-1])
            self._key_buffer = key_states.new_empty(shape)
            self._value_buffer = value_states.new_empty((*shape[:3], value_states.shape[-1]))
            if length:
                self._key_buffer[..., :length, :] = self.keys
                self._value_buffer[..., :length, :] = self.values
        self._key_buffer[..., length:new_length, :] = key_states
        self._value_buffer[..., length:new_length, :] = value_states
        self.keys = self._key_buffer[..., :new_length, :]
        self.values = self._value_buffer[..., :new_length, :]
        return self.keys, self.values


def pixels_to_latents(vae: AutoencoderKL | None, pixel_values: torch.Tensor) -> torch.Tensor:
    """Pixel values `(n, 3, H, W)` in [-1, 1] -> clean latents `(n, C, h, w)` scaled for the model:
    `(z - shift_factor) * scaling_factor` with the VAE's mode, or the pixels themselves without a VAE.

    The training script encodes its data with this function too, so training and inference latents always agree.
    """
    if vae is None:
        return pixel_values
    latents = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist.mode()
    shift = vae.config.get("shift_factor") or 0.0
    return (latents - shift) * vae.config.scaling_factor


@dataclass
class TransfusionPipelineOutput(BaseOutput):
    """Output of text-to-image.

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` of shape `(batch_size, H, W, 3)` or `torch.Tensor` of shape
            `(batch_size, 3, H, W)`; latents `(batch_size, C, h, w)` for `output_type="latent"`).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class TransfusionPipeline(DiffusionPipeline):
    r"""Pipeline for Transfusion models: text-to-image (`__call__`), image-to-text (`caption`), and interleaved
    generation and image editing (`generate`).

    Args:
        transformer ([`TransfusionForMixedModal`]): the model.
        scheduler: any diffusers scheduler whose prediction type fits the model's (DDPM, DDIM, DPMSolverMultistep,
            Euler for `epsilon`/`v_prediction`; FlowMatchEuler for `flow_prediction`).
        vae ([`AutoencoderKL`], *optional*): without one, the model works in pixel space (`latent_channels=3`).
        tokenizer (*optional*): a transformers tokenizer or a [`TransfusionProcessor`]; needed for text prompts.
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae", "tokenizer"]

    def __init__(
        self, transformer: TransfusionForMixedModal, scheduler, vae: AutoencoderKL | None = None, tokenizer=None
    ):
        super().__init__()
        if isinstance(tokenizer, TransfusionProcessor):
            tokenizer = tokenizer.tokenizer
        scheduler = self._checked_scheduler(transformer, scheduler, vae)
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae, tokenizer=tokenizer)
        config = transformer.config
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.image_size = config.latent_size * self.vae_scale_factor
        if vae is None and config.latent_channels != 3:
            raise ValueError(
                f"Without a `vae` the model works in pixel space and needs latent_channels=3, got {config.latent_channels}."
            )
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.processor = None
        if tokenizer is not None:
            self.processor = TransfusionProcessor(
                tokenizer, image_size=self.image_size, num_image_tokens=config.num_patches
            )
            for name in ("boi_token_id", "eoi_token_id", "image_token_id"):
                if getattr(self.processor, name) != getattr(config, name):
                    raise ValueError(
                        f"The tokenizer's {name}={getattr(self.processor, name)} differs from the model's "
                        f"{name}={getattr(config, name)}."
                    )

    # ------------------------------------------------------------------------------------------- validation
    @staticmethod
    def _checked_scheduler(transformer: TransfusionForMixedModal, scheduler, vae):
        """Refuse a scheduler that predicts other units than the model; turn off DDPM/DDIM sample clipping."""
        model_type = transformer.config.prediction_type
        if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            scheduler_type = "flow_prediction"
        else:
            scheduler_type = scheduler.config.get("prediction_type", "epsilon")
        if scheduler_type != model_type:
            raise ValueError(
                f"The scheduler {type(scheduler).__name__} has prediction_type={scheduler_type!r} but the model "
                f"predicts {model_type!r}: build the scheduler with prediction_type={model_type!r}."
            )
        if scheduler.config.get("clip_sample", False) and vae is not None:
            # Clipping x0 to [-1, 1] is meant for pixels; on latents it ruins every sample.
            logger.warning(
                f"{type(scheduler).__name__} has clip_sample=True, which is wrong for latents: setting it to False."
            )
            scheduler = type(scheduler).from_config(scheduler.config, clip_sample=False)
        if scheduler_type == "flow_prediction" and scheduler.config.get("use_flow_sigmas") is False:
            # multistep solvers (DPMSolver, UniPC, DEIS) with prediction_type="flow_prediction" keep VP sigmas
            # and timesteps unless use_flow_sigmas=True: a perfect flow model then lands hundreds off x0.
            logger.warning(
                f"{type(scheduler).__name__} has prediction_type='flow_prediction' but use_flow_sigmas=False, "
                "which does not follow the flow-matching path: setting use_flow_sigmas=True."
            )
            scheduler = type(scheduler).from_config(scheduler.config, use_flow_sigmas=True)
        return scheduler

    def _require_processor(self, what: str) -> TransfusionProcessor:
        if self.processor is None:
            raise ValueError(f"`{what}` needs text, but this pipeline has no `tokenizer`: pass one when building it.")
        return self.processor

    def _check_length(self, length: int, what: str) -> None:
        limit = getattr(self.transformer.config.text_config, "max_position_embeddings", None)
        if limit is not None and length > limit:
            raise ValueError(
                f"{what} needs {length} positions, more than the model's context (max_position_embeddings={limit})."
            )

    # ----------------------------------------------------------------------------------------------- latents
    # No autograd: decoding to numpy/PIL cannot take tensors that require grad.
    @torch.no_grad()
    def encode_images(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """Images -> clean latents `(num_images, C, h, w)` scaled like the training data."""
        pixel_values = images_to_pixel_values(images, self.image_size).to(self.device)
        return pixels_to_latents(self.vae, pixel_values).to(self.transformer.dtype)

    # No autograd: decoding to numpy/PIL cannot take tensors that require grad.
    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, output_type: str = "pil"):
        """Latents -> images of `output_type` ("pil", "np", "pt", or "latent" to return them as they are)."""
        if output_type == "latent":
            return latents
        if self.vae is not None:
            shift = self.vae.config.get("shift_factor") or 0.0
            latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + shift
            latents = self.vae.decode(latents).sample
        return self.image_processor.postprocess(latents.float().clamp(-1, 1), output_type=output_type)

    # --------------------------------------------------------------------------------------------- denoising
    def _prefill(
        self, prefixes: list[list[int]], prefix_latents: torch.Tensor | None = None
    ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """Run left-padded prefixes once into a fresh cache. Returns the cache, their ids and their attention mask.

        `prefix_latents` are the clean latents (t = 0) of the images already inside the prefixes, in reading order.
        """
        pad = self.processor.tokenizer.pad_token_id if self.processor is not None else 0
        input_ids, attention_mask = pad_sequences(prefixes, pad, padding_side="left")
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        cache = DynamicCache(config=self.transformer.config.text_config)
        # Full-attention layers keep room for the image positions that every denoising step appends and crops.
        num_patches = self.transformer.config.num_patches
        cache.layers = [
            _ReservedDynamicLayer(num_patches) if type(layer) is DynamicLayer else layer for layer in cache.layers
        ]
        # a prefix holding images (interleaved generation, editing) needs their latents, or the model refuses
        # the placeholders.
        timesteps = None
        if prefix_latents is not None:
            prefix_latents = prefix_latents.to(self.device, self.transformer.dtype)
            timesteps = torch.zeros(prefix_latents.shape[0], device=self.device)
        self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            latents=prefix_latents,
            timesteps=timesteps,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return cache, input_ids, attention_mask

    def _predict(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        prefix_ids: torch.Tensor,
        prefix_mask: torch.Tensor,
        cache: DynamicCache | None,
    ) -> torch.Tensor:
        """One model evaluation of the image positions; with a cache only they are computed, then dropped again."""
        rows, num_patches = latents.shape[0], self.transformer.config.num_patches
        image_ids = torch.full((rows, num_patches), self.transformer.config.image_token_id, device=self.device)
        image_mask = torch.ones_like(image_ids)
        timesteps = timestep.reshape(-1).to(self.device).float().expand(rows)
        if cache is None:
            output = self.transformer(
                input_ids=torch.cat([prefix_ids, image_ids], dim=1),
                attention_mask=torch.cat([prefix_mask, image_mask], dim=1),
                latents=latents,
                timesteps=timesteps,
                use_cache=False,
                logits_to_keep=1,
            )
            return output.diffusion_predictions
        output = self.transformer(
            input_ids=image_ids,
            attention_mask=torch.cat([prefix_mask, image_mask], dim=1),
            latents=latents,
            timesteps=timesteps,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache.crop(-num_patches)
        return output.diffusion_predictions

    def _denoise(
        self,
        prefixes: list[list[int]],
        num_images: int,
        num_inference_steps: int,
        guidance_scale: float,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        use_kv_cache: bool,
        prefix_latents: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, DynamicCache | None, torch.Tensor, torch.Tensor]:
        """Sample `num_images` images after `prefixes` (conditional rows first, then unconditional rows with CFG).

        `prefix_latents`: clean latents of the images inside the prefixes, in reading order (needs the KV cache).

        Returns the final latents `(num_images, C, h, w)`, the prefix cache (None without caching), and the prefix ids
        and mask of all rows.
        """
        if prefix_latents is not None and not use_kv_cache:
            raise ValueError("Prefixes holding images are only supported with `use_kv_cache=True`.")
        # a scheduler swapped in after construction (`pipe.scheduler = ...`) gets the same checks as __init__.
        scheduler = self._checked_scheduler(self.transformer, self.scheduler, self.vae)
        if scheduler is not self.scheduler:
            self.scheduler = scheduler
        config = self.transformer.config
        do_cfg = guidance_scale > 1.0
        # set the timesteps before drawing the noise: `init_noise_sigma` of Euler-type schedulers depends on
        # them (e.g. 157 before vs 9.5 after for EulerDiscrete with timestep_spacing="leading" and 3 steps).
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        shape = (num_images, config.latent_channels, config.latent_size, config.latent_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` has shape {tuple(latents.shape)}, expected {shape}.")
        # Given latents are unit noise too and get the scheduler's scale like drawn ones (as in diffusers'
        # pipelines), so `latents=randn` and `generator=` agree for Euler-type schedulers.
        latents = latents.to(self.device, torch.float32) * getattr(self.scheduler, "init_noise_sigma", 1.0)
        self._check_length(max(len(prefix) for prefix in prefixes) + config.num_patches + 1, "The prompt")
        if use_kv_cache:
            cache, prefix_ids, prefix_mask = self._prefill(prefixes, prefix_latents)
        else:
            cache = None
            pad = self.processor.tokenizer.pad_token_id if self.processor is not None else 0
            prefix_ids, prefix_mask = (tensor.to(self.device) for tensor in pad_sequences(prefixes, pad, "left"))
        for timestep in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents, latents]) if do_cfg else latents
            if hasattr(self.scheduler, "scale_model_input"):
                model_input = self.scheduler.scale_model_input(model_input, timestep)
            prediction = self._predict(
                model_input.to(self.transformer.dtype), timestep, prefix_ids, prefix_mask, cache
            ).float()
            if do_cfg:
                conditional, unconditional = prediction.chunk(2)
                prediction = unconditional + guidance_scale * (conditional - unconditional)
            latents = self.scheduler.step(prediction, timestep, latents, generator=generator).prev_sample
        return latents, cache, prefix_ids, prefix_mask

    # ------------------------------------------------------------------------------------------ text-to-image
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = "",
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        use_kv_cache: bool = True,
    ) -> TransfusionPipelineOutput | tuple:
        r"""Text-to-image.

        Args:
            prompt (`str` or `list[str]`): the prompts; a list is one batch.
            negative_prompt (`str` or `list[str]`, *optional*): the unconditional branch of guidance (default: no
                text, as seen with caption dropout in training).
            height, width (`int`, *optional*): must equal the model's image size (`latent_size * vae scale`).
            num_inference_steps (`int`): denoising steps.
            guidance_scale (`float`): classifier-free guidance scale; 1 or less disables guidance.
            num_images_per_prompt (`int`): images per prompt.
            generator (`torch.Generator`, *optional*): for reproducible sampling.
            latents (`torch.Tensor` of shape `(batch_size * num_images_per_prompt, C, h, w)`, *optional*): the
                starting noise, standard normal (scaled by the scheduler's `init_noise_sigma` like drawn noise).
            output_type (`str`): `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`): return a [`TransfusionPipelineOutput`] instead of a tuple.
            use_kv_cache (`bool`): prefill the prompt once and reuse it at every step (same result, faster).
        """
        processor = self._require_processor("TransfusionPipeline.__call__")
        for name, value in (("height", height), ("width", width)):
            if value is not None and value != self.image_size:
                raise ValueError(
                    f"`{name}`={value} does not fit the latent grid: this model makes {self.image_size}x"
                    f"{self.image_size} images (latent_size={self.transformer.config.latent_size}, vae scale "
                    f"{self.vae_scale_factor})."
                )
        if guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be >= 0, got {guidance_scale}.")
        if num_inference_steps < 1 or num_images_per_prompt < 1:
            raise ValueError(
                f"`num_inference_steps`={num_inference_steps} and `num_images_per_prompt`={num_images_per_prompt} "
                "must be >= 1."
            )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = negative_prompt if negative_prompt is not None else ""
        negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
        if len(negatives) != len(prompts):
            raise ValueError(f"`negative_prompt` has {len(negatives)} entries for {len(prompts)} prompts.")
        prompts = [text for text in prompts for _ in range(num_images_per_prompt)]
        negatives = [text for text in negatives for _ in range(num_images_per_prompt)]
        # A prompt ends with <boi>: the image block starts right after it (paper, section 3.4).
        prefixes = [processor.encode_parts([text]) + [processor.boi_token_id] for text in prompts]
        if guidance_scale > 1.0:
            prefixes += [processor.encode_parts([text]) + [processor.boi_token_id] for text in negatives]
        latents, _, _, _ = self._denoise(
            prefixes, len(prompts), num_inference_steps, guidance_scale, generator, latents, use_kv_cache
        )
        images = self.decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return TransfusionPipelineOutput(images=images)

    # -------------------------------------------------------------------------------------------- captioning
    @torch.no_grad()
    def caption(
        self,
        images: ImageInput | Sequence[ImageInput],
        prompt: str | None = None,
        max_new_tokens: int = 32,
        **generate_kwargs,
    ) -> list[str]:
        """Image-to-text: the images enter as clean latents (t = 0) and the model writes what follows.

        Args:
            images: one or several images (PIL, numpy or tensors).
            prompt (`str`, *optional*): text placed after each image (e.g. a question).
            max_new_tokens (`int`): at most this many generated tokens per caption.
            generate_kwargs: passed to `transformers`' `generate` (`do_sample`, `num_beams`, ...).

        Returns:
            `list[str]`: one caption per image.
        """
        processor = self._require_processor("caption")
        # a batch `(B, C, H, W)` tensor or `(B, H, W, C)` array (this pipeline's own "pt"/"np" output) is B images.
        batched = isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4
        images = list(images) if isinstance(images, (list, tuple)) or batched else [images]
        latents = self.encode_images(images)
        sequences = [processor.encode_parts([None, prompt or ""]) for _ in images]
        self._check_length(len(sequences[0]) + max_new_tokens, "Captioning")
        input_ids, attention_mask = pad_sequences(sequences, processor.tokenizer.pad_token_id, padding_side="left")
        stop = [processor.tokenizer.eos_token_id, processor.boi_token_id]
        generate_kwargs.setdefault("do_sample", False)
        # never sample the bare image placeholder as text (it would reach the model without latents and raise).
        generate_kwargs.setdefault("suppress_tokens", [processor.image_token_id])
        output = self.transformer.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            latents=latents,
            timesteps=torch.zeros(len(images), device=self.device),
            max_new_tokens=max_new_tokens,
            eos_token_id=[token for token in stop if token is not None],
            pad_token_id=processor.tokenizer.pad_token_id,
            **generate_kwargs,
        )
        return processor.batch_decode(output[:, input_ids.shape[1] :])

    # ------------------------------------------------------------------------------------------- interleaved
    @torch.no_grad()
    def generate(
        self,
        parts: str | Sequence[str | ImageInput],
        max_new_tokens: int = 64,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        logits_processor: LogitsProcessorList | None = None,
        max_images: int = 4,
        generator: torch.Generator | None = None,
    ) -> list[str | PIL.Image.Image]:
        """Interleaved generation: text is sampled; on `<boi>` an image is denoised and written into the context, then
        `<eoi>` is appended and text continues (paper, section 3.4). Images given in `parts` enter as clean context,
        which gives image editing and image-conditioned generation.

        Args:
            parts (`str` or list of `str` and images): the context, in order.
            max_new_tokens (`int`): text tokens to generate at most (image positions not counted).
            num_inference_steps, guidance_scale: as in `__call__`, for every generated image.
            do_sample, temperature, top_k: text sampling (greedy by default).
            logits_processor (`LogitsProcessorList`, *optional*): transformers logits processors for the text steps.
            max_images (`int`): stop making images after this many.
            generator (`torch.Generator`, *optional*): for text sampling and image noise.

        Returns:
            The generated continuation as an ordered list of strings and PIL images.
        """
        processor = self._require_processor("generate")
        if guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be >= 0, got {guidance_scale}.")
        parts = [parts] if isinstance(parts, str) else list(parts)
        layout = [part if isinstance(part, str) else None for part in parts]
        context_images = [part for part in parts if not isinstance(part, str)]
        context_ids = processor.encode_parts(layout)
        self._check_length(len(context_ids) + 1, "The context")
        image_ids = [processor.image_token_id] * self.transformer.config.num_patches

        outputs: list[str | PIL.Image.Image] = []
        text_ids: list[int] = []
        num_images, new_tokens = 0, 0
        # keep the clean latents of every image in the context (given or generated, in order): re-prefilling the
        # context for an image needs them, as its placeholders cannot go through the model without latents.
        context_latents = self.encode_images(context_images) if context_images else None
        cache, next_logits = self._consume(context_ids, None, context_latents)
        while new_tokens < max_new_tokens:
            # the bare placeholder is not text; sampled, it would reach the model without latents and raise.
            next_logits[:, processor.image_token_id] = float("-inf")
            token = self._next_token(
                next_logits, context_ids, do_sample, temperature, top_k, logits_processor, generator
            )
            new_tokens += 1
            context_ids.append(token)
            if token == processor.tokenizer.eos_token_id:
                break
            if token != processor.boi_token_id:
                text_ids.append(token)
                cache, next_logits = self._consume([token], cache, None)
                continue
            if text_ids:
                outputs.append(processor.decode(text_ids))
                text_ids = []
            if num_images >= max_images:
                break
            self._check_length(len(context_ids) + len(image_ids) + 1, "The interleaved sequence")
            prefixes = [context_ids.copy()]
            if guidance_scale > 1.0:
                prefixes.append(processor.encode_parts([]) + [processor.boi_token_id])
            # The conditional row comes first, so the context images (all in row 0) are first in reading order.
            latents, _, _, _ = self._denoise(
                prefixes,
                1,
                num_inference_steps,
                guidance_scale,
                generator,
                None,
                use_kv_cache=True,
                prefix_latents=context_latents,
            )
            num_images += 1
            outputs.extend(self.decode_latents(latents.to(self.transformer.dtype), "pil"))
            # Write the clean image (t = 0) into the text cache once, then <eoi>: text continues after the image.
            block = [processor.boi_token_id] + image_ids + [processor.eoi_token_id]
            cache, next_logits = self._consume(block, cache, latents.to(self.transformer.dtype))
            context_ids.extend(block[1:])
            clean = latents.to(self.transformer.dtype)
            context_latents = clean if context_latents is None else torch.cat([context_latents, clean])
        if text_ids:
            outputs.append(processor.decode(text_ids))
        self.maybe_free_model_hooks()
        return outputs

    def _consume(
        self, ids: list[int], cache: DynamicCache | None, latents: torch.Tensor | None
    ) -> tuple[DynamicCache, torch.Tensor]:
        """Append ids (and the clean images among them) to the text cache; returns it and the next-token logits."""
        if cache is None:
            cache = DynamicCache(config=self.transformer.config.text_config)
        input_ids = torch.tensor([ids], device=self.device)
        timesteps = torch.zeros(latents.shape[0], device=self.device) if latents is not None else None
        output = self.transformer(
            input_ids=input_ids, latents=latents, timesteps=timesteps, cache=cache, use_cache=True, logits_to_keep=1
        )
        return cache, output.logits[:, -1, :].float()

    @staticmethod
    def _next_token(
        logits: torch.Tensor,
        context_ids: list[int],
        do_sample: bool,
        temperature: float,
        top_k: int | None,
        logits_processor: LogitsProcessorList | None,
        generator: torch.Generator | None,
    ) -> int:
        if logits_processor is not None:
            logits = logits_processor(torch.tensor([context_ids], device=logits.device), logits)
        if not do_sample:
            return int(logits.argmax(dim=-1))
        logits = logits / max(temperature, 1e-5)
        if top_k is not None:
            threshold = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1, None]
            logits = logits.masked_fill(logits < threshold, float("-inf"))
        probabilities = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probabilities.cpu(), 1, generator=generator))

    # --------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> TransfusionPipeline:
        """Load from a local folder or a Hub repo id (downloaded first: diffusers cannot resolve a third-party
        component class from a repo id by itself).

        Args:
            pretrained_model_name_or_path: a folder written by `save_pretrained`, or a repo id.
            kwargs: `revision`, `token`, `cache_dir`, `local_files_only` for the download; the rest goes to
                `DiffusionPipeline.from_pretrained` (`torch_dtype`, component overrides such as `scheduler=`).
        """
        path = str(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download

            download_keys = ("revision", "token", "cache_dir", "local_files_only", "force_download", "proxies")
            download_kwargs = {key: kwargs.pop(key) for key in download_keys if key in kwargs}
            # Weights travel as safetensors only: pickled files are never fetched, so never unpickled.
            path = snapshot_download(path, ignore_patterns=PICKLE_PATTERNS, **download_kwargs)
        kwargs.setdefault("use_safetensors", True)
        return super().from_pretrained(path, **kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: str | None = None,
        subfolder: str | None = None,
        *,
        revision: str | None = None,
        commit_description: str | None = None,
        **card_kwargs,
    ) -> str:
        """diffusers' `push_to_hub`, plus transformers' `revision` (branch, created if new) and `commit_description`,
        and the Transfusion model card. `card_kwargs` go to `transfusion_hf.hub.build_model_card` (`output_dir` of
        the run for metrics and samples, `base_model`, `datasets`, `license`, `tags`). Weights are safetensors only.
        """
        if not safe_serialization:
            raise ValueError("TransfusionPipeline.push_to_hub only pushes safetensors (safe_serialization=True).")
        return push_pipeline_to_hub(
            self,
            repo_id,
            commit_message=commit_message,
            commit_description=commit_description,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
            variant=variant,
            subfolder=subfolder,
            **card_kwargs,
        )


__all__ = ["TransfusionPipeline", "TransfusionPipelineOutput", "pixels_to_latents"]
