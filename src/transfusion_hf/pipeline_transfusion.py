"""TransfusionPipeline: text-to-image, captions, interleaved text and images, with a prefix KV cache.

Sampling and guidance live here, never in the model (paper, section 3.4 "Inference"): text is sampled token by
token; when `<boi>` comes, the prompt is prefilled into the KV cache once and every denoising step runs only the
image positions against it; the clean image is then written into the cache and `<eoi>` lets text continue.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor

# diffusers' own `retrieve_timesteps` (custom `timesteps` / `sigmas`): PixArt-alpha's is marked "Copied from" Stable
# Diffusion's and is the same code; the Stable Diffusion module would also import CLIP's image processors (and warn
# where torchvision is missing) for a function that needs none of them.
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import retrieve_timesteps
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor
from transformers import DynamicCache, LogitsProcessorList

# Loaded from a folder with `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`, this file goes into
# diffusers' module cache with the modules it imports, but diffusers 0.42 does not copy the modules those import in
# turn: so this file imports them too (the `noqa` lines; tests/test_remote_code.py checks that none is missing).
from .cache_transfusion import ReservedDynamicCache
from .configuration_transfusion import TransfusionConfig  # noqa: F401
from .generation_transfusion import sample_next_token
from .image_grids import group_images_by_grid  # noqa: F401
from .image_layers import build_patch_layers  # noqa: F401
from .latents_transfusion import latents_to_pixels, pixels_to_latents
from .loss_transfusion import diffusion_loss  # noqa: F401
from .masking_transfusion import build_transfusion_mask  # noqa: F401
from .modality_experts import add_modality_experts  # noqa: F401
from .modeling_transfusion import TransfusionForMixedModal, import_hub_module
from .processing_transfusion import ImageInput, TransfusionProcessor, images_to_pixel_values, pad_sequences
from .remote_code_transfusion import TransfusionRemoteCodeMixin
from .scheduling_transfusion import TransfusionSchedulerMixin

logger = logging.get_logger(__name__)
# What `callback_on_step_end` takes, as in diffusers: `fn(pipe, step, timestep, callback_kwargs) -> dict` or its
# callback classes.
StepEndCallback = (
    Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | PipelineCallback | MultiPipelineCallbacks
)


@dataclass
class TransfusionPipelineOutput(ImagePipelineOutput):
    """Output of text-to-image: diffusers' `ImagePipelineOutput`, whose `images` may also be a tensor here.

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`): the images, as PIL images, `(batch_size, H, W,
            3)` arrays or `(batch_size, 3, H, W)` tensors; latents `(batch_size, C, h, w)` for `output_type="latent"`.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class TransfusionPipeline(TransfusionRemoteCodeMixin, DiffusionPipeline, TransfusionSchedulerMixin):
    r"""Pipeline for Transfusion models: text-to-image (`__call__`), image-to-text (`caption`), and interleaved
    generation and image editing (`generate`).

    The scheduler choice (`_compatibles`, `scheduler_from_config`, ...) comes from [`TransfusionSchedulerMixin`];
    saving the code beside the weights and loading from a folder or repo id, from [`TransfusionRemoteCodeMixin`] (first
    among the bases: it overrides `DiffusionPipeline`'s saving and loading).

    Args:
        transformer ([`TransfusionForMixedModal`]): the model.
        scheduler ([`SchedulerMixin`]): a diffusers scheduler whose prediction type is the model's; those known to
            sample right are listed, per prediction type, in `_compatibles` (see [`compatible_schedulers`] and
            [`scheduler_from_config`]).
        vae ([`AutoencoderKL`], *optional*): without one, the model works in pixel space (`latent_channels=3`).
        tokenizer (*optional*): a transformers tokenizer or a [`TransfusionProcessor`]; needed for text prompts.
    """

    # The VAE encodes the context images before the transformer runs and decodes after it; with
    # `enable_model_cpu_offload()` each moves to the accelerator when its forward (or encode/decode) runs.
    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae", "tokenizer"]
    # What `callback_on_step_end` may ask for: the latents after the step (a callback may return new ones) and the
    # (guided) model prediction of the step.
    _callback_tensor_inputs = ["latents", "noise_pred"]
    # Picks each text token of `generate`; an attribute, so a subclass (or a test) can wrap it.
    _next_token = staticmethod(sample_next_token)

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

    def check_inputs(
        self,
        height: int | None,
        width: int | None,
        guidance_scale: float,
        num_inference_steps: int,
        num_images_per_prompt: int = 1,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> None:
        """Validate the call arguments before any work, naming the bad argument and its value."""
        self.latent_grid(height, width)
        if guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be >= 0, got {guidance_scale}.")
        if num_inference_steps < 1 or num_images_per_prompt < 1:
            raise ValueError(
                f"`num_inference_steps`={num_inference_steps} and `num_images_per_prompt`={num_images_per_prompt} "
                "must be >= 1."
            )
        unknown = [
            name for name in callback_on_step_end_tensor_inputs or [] if name not in self._callback_tensor_inputs
        ]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has {unknown}, which this pipeline does not have: use names "
                f"from {self._callback_tensor_inputs}."
            )

    def latent_grid(self, height: int | None, width: int | None) -> tuple[int, int]:
        """The latent size `(h, w)` of images of `height x width` pixels (default: the model's square size),
        refused with the argument's name unless each side is a multiple of the patch (times the VAE's scale) and at
        most the model's `max_latent_size` (times the VAE's scale)."""
        config, scale = self.transformer.config, self.vae_scale_factor
        unit, largest = config.patch_size * scale, config.max_latent_side * scale
        for name, value in (("height", height), ("width", width)):
            if value is not None and (not isinstance(value, int) or value <= 0 or value % unit or value > largest):
                raise ValueError(
                    f"`{name}`={value} does not fit the latent grid: this model makes images whose sides are "
                    f"multiples of {unit} pixels (patch_size={config.patch_size}, vae scale {scale}) up to {largest} "
                    f"(max_latent_size={config.max_latent_side}); its default size is {self.image_size}."
                )
        return ((height or self.image_size) // scale, (width or self.image_size) // scale)

    def num_image_tokens(self, grid: tuple[int, int]) -> int:
        """Placeholders of an image of latent size `grid`."""
        return self.transformer.config.num_patches_for(*grid)

    # ------------------------------------------------------------------------------------- call state (diffusers)
    @property
    def num_timesteps(self) -> int:
        """Scheduler steps of the current (or last) denoising loop."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` in a `callback_on_step_end` to skip the remaining steps of the current image,
        as in diffusers' pipelines."""
        return self._interrupt

    # ----------------------------------------------------------------------------------------------- latents
    # No autograd: decoding to numpy/PIL cannot take tensors that require grad.
    @torch.no_grad()
    def encode_images(
        self, images: ImageInput | Sequence[ImageInput], height: int | None = None, width: int | None = None
    ) -> torch.Tensor:
        """Images -> clean latents `(num_images, C, h, w)` scaled like the training data, on the execution device.
        The images are resized and center-cropped to `height x width` pixels (default: the model's square size)."""
        device = self._execution_device
        grid = self.latent_grid(height, width)
        size = (grid[0] * self.vae_scale_factor, grid[1] * self.vae_scale_factor)
        pixel_values = images_to_pixel_values(images, size).to(device)
        return pixels_to_latents(self.vae, pixel_values).to(device, self.transformer.dtype)

    # No autograd: decoding to numpy/PIL cannot take tensors that require grad.
    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, output_type: str = "pil"):
        """Latents -> images of `output_type` ("pil", "np", "pt", or "latent" to return them as they are)."""
        if output_type == "latent":
            return latents
        pixels = latents_to_pixels(self.vae, latents)
        return self.image_processor.postprocess(pixels.float().clamp(-1, 1), output_type=output_type)

    def prepare_latents(
        self,
        num_images: int,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        device: torch.device,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """The starting noise `(num_images, C, h, w)` in float32 (`grid` = `(h, w)`, default the model's square
        size), scaled by the scheduler's `init_noise_sigma`.

        Call after the scheduler's timesteps are set: `init_noise_sigma` of Euler-type schedulers depends on them
        (e.g. 157 before vs 9.5 after for EulerDiscrete with timestep_spacing="leading" and 3 steps).
        """
        config = self.transformer.config
        grid = grid or (config.latent_size, config.latent_size)
        shape = (num_images, config.latent_channels, *grid)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` has shape {tuple(latents.shape)}, expected {shape}.")
        # Given latents are unit noise too and get the scheduler's scale like drawn ones (as in diffusers'
        # pipelines), so `latents=randn` and `generator=` agree for Euler-type schedulers.
        return latents.to(device, torch.float32) * getattr(self.scheduler, "init_noise_sigma", 1.0)

    def prepare_extra_step_kwargs(self, generator: torch.Generator | list[torch.Generator] | None) -> dict:
        """`scheduler.step` keyword arguments: the generator, for the schedulers whose step takes one (diffusers'
        pipelines check the signature the same way; UniPC, DEIS, PNDM take none)."""
        if "generator" in inspect.signature(self.scheduler.step).parameters:
            return {"generator": generator}
        return {}

    # --------------------------------------------------------------------------------------------- denoising
    def _prefill(
        self,
        prefixes: list[list[int]],
        prefix_latents: torch.Tensor | list[torch.Tensor] | None = None,
        device: torch.device | None = None,
        reserve: int | None = None,
    ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """Run left-padded prefixes once into a fresh cache. Returns the cache, their ids and their attention mask.

        `prefix_latents` are the clean latents (t = 0) of the images already inside the prefixes, in reading order;
        `reserve` the positions of the image each step appends (default: one of the model's square size).
        """
        device = device or self._execution_device
        pad = self.processor.tokenizer.pad_token_id if self.processor is not None else 0
        input_ids, attention_mask = pad_sequences(prefixes, pad, padding_side="left")
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        # Full-attention layers keep room for the image positions that every denoising step appends and crops.
        reserve = reserve or self.transformer.config.num_patches
        cache = ReservedDynamicCache(self.transformer.config.text_config, reserve=reserve)
        # a prefix holding images (interleaved generation, editing) needs their latents, or the model refuses
        # the placeholders.
        timesteps = None
        if prefix_latents is not None:
            if isinstance(prefix_latents, list):
                prefix_latents = [image.to(device, self.transformer.dtype) for image in prefix_latents]
            else:
                prefix_latents = prefix_latents.to(device, self.transformer.dtype)
            timesteps = torch.zeros(len(prefix_latents), device=device)
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
        rows, num_patches = latents.shape[0], self.num_image_tokens(tuple(latents.shape[-2:]))
        device = prefix_ids.device
        image_ids = torch.full((rows, num_patches), self.transformer.config.image_token_id, device=device)
        image_mask = torch.ones_like(image_ids)
        timesteps = timestep.reshape(-1).to(device).float().expand(rows)
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
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Sample `num_images` images after `prefixes` (conditional rows first, then unconditional rows with CFG).

        `prefix_latents`: clean latents of the images inside the prefixes, in reading order (needs the KV cache).
        `grid`: the latent size `(h, w)` of the images to make (default: the model's square size).
        The other arguments are those of `__call__`. Returns the final latents `(num_images, C, h, w)`.
        """
        if prefix_latents is not None and not use_kv_cache:
            raise ValueError("Prefixes holding images are only supported with `use_kv_cache=True`.")
        # a scheduler swapped in after construction (`pipe.scheduler = ...`) gets the same checks as __init__.
        scheduler = self._checked_scheduler(self.transformer, self.scheduler, self.vae)
        if scheduler is not self.scheduler:
            self.scheduler = scheduler
        device = self._execution_device
        do_cfg = guidance_scale > 1.0
        # After the timesteps are set: `init_noise_sigma` (in `prepare_latents`) depends on them.
        custom = timesteps is not None or sigmas is not None
        timesteps, _ = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps=timesteps, sigmas=sigmas
        )
        distinct = len(torch.unique(timesteps))
        if not custom and distinct < len(timesteps):
            # A schedule cut below zero SNR (`lambda_min_clipped`) has fewer distinct timesteps than 1000: asking for
            # more repeats some, and a multistep solver then divides by a zero step (NaN). Take each once.
            logger.warning(
                f"num_inference_steps={num_inference_steps} exceeds the {distinct} distinct timesteps of this "
                f"{type(self.scheduler).__name__} schedule; sampling {distinct} steps."
            )
            timesteps, _ = retrieve_timesteps(self.scheduler, distinct, device)
        self._num_timesteps = len(timesteps)
        self._interrupt = False
        latents = self.prepare_latents(num_images, generator, latents, device, grid)
        num_patches = self.num_image_tokens(tuple(latents.shape[-2:]))
        self._check_length(max(len(prefix) for prefix in prefixes) + num_patches + 1, "The prompt")
        if use_kv_cache:
            cache, prefix_ids, prefix_mask = self._prefill(prefixes, prefix_latents, device, reserve=num_patches)
        else:
            cache = None
            pad = self.processor.tokenizer.pad_token_id if self.processor is not None else 0
            prefix_ids, prefix_mask = (tensor.to(device) for tensor in pad_sequences(prefixes, pad, "left"))
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator)
        for i, t in enumerate(self.progress_bar(timesteps)):
            if self.interrupt:
                continue
            model_input = torch.cat([latents, latents]) if do_cfg else latents
            if hasattr(self.scheduler, "scale_model_input"):
                model_input = self.scheduler.scale_model_input(model_input, t)
            noise_pred = self._predict(model_input.to(self.transformer.dtype), t, prefix_ids, prefix_mask, cache)
            noise_pred = noise_pred.float()
            if do_cfg:
                conditional, unconditional = noise_pred.chunk(2)
                noise_pred = unconditional + guidance_scale * (conditional - unconditional)
            latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs).prev_sample
            if callback_on_step_end is not None:
                tensors = {"latents": latents, "noise_pred": noise_pred}
                callback_kwargs = {name: tensors[name] for name in callback_on_step_end_tensor_inputs or []}
                callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                latents = self._callback_latents(callback_outputs, latents)
        return latents

    @staticmethod
    def _callback_latents(callback_outputs: Any, latents: torch.Tensor) -> torch.Tensor:
        """The latents a step callback hands back (diffusers: its returned dict may hold new `"latents"`)."""
        if not isinstance(callback_outputs, dict):
            raise ValueError(
                f"`callback_on_step_end` must return a dict (of the tensors it changes), got "
                f"{type(callback_outputs).__name__}."
            )
        new_latents = callback_outputs.get("latents", latents)
        if not isinstance(new_latents, torch.Tensor) or new_latents.shape != latents.shape:
            shape = tuple(new_latents.shape) if isinstance(new_latents, torch.Tensor) else type(new_latents).__name__
            raise ValueError(
                f"`callback_on_step_end` returned latents of shape {shape}, expected {tuple(latents.shape)}."
            )
        return new_latents.to(latents.device, latents.dtype)

    @staticmethod
    def _callback_tensor_names(callback_on_step_end, callback_on_step_end_tensor_inputs: list[str]) -> list[str]:
        """diffusers' callback objects (`PipelineCallback`, `MultiPipelineCallbacks`) declare their own inputs."""
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            return callback_on_step_end.tensor_inputs
        return callback_on_step_end_tensor_inputs

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
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        callback_on_step_end: StepEndCallback | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
    ) -> TransfusionPipelineOutput | tuple:
        r"""Text-to-image.

        Args:
            prompt (`str` or `list[str]`): the prompts; a list is one batch.
            negative_prompt (`str` or `list[str]`, *optional*): the unconditional branch of guidance (default: no
                text, as seen with caption dropout in training).
            height, width (`int`, *optional*): the image size in pixels, any aspect ratio: multiples of the patch
                (`patch_size * vae scale`) up to `max_latent_size * vae scale` (default: `latent_size * vae scale`).
            num_inference_steps (`int`): denoising steps (ignored when `timesteps` or `sigmas` are given).
            guidance_scale (`float`): classifier-free guidance scale; 1 or less disables guidance.
            num_images_per_prompt (`int`): images per prompt.
            generator (`torch.Generator`, *optional*): for reproducible sampling.
            latents (`torch.Tensor` of shape `(batch_size * num_images_per_prompt, C, h, w)`, *optional*): the
                starting noise, standard normal (scaled by the scheduler's `init_noise_sigma` like drawn noise).
            output_type (`str`): `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`): return a [`TransfusionPipelineOutput`] instead of a tuple.
            use_kv_cache (`bool`): prefill the prompt once and reuse it at every step (same result, faster).
            timesteps (`list[int]`, *optional*): custom timesteps, for schedulers whose `set_timesteps` takes them
                (DDPM, Euler, DPMSolverMultistep, FlowMatchEuler, ...; others raise), through diffusers'
                `retrieve_timesteps`.
            sigmas (`list[float]`, *optional*): custom sigmas, likewise (Euler, FlowMatchEuler, UniPC, ...).
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*): called after
                every scheduler step as `callback_on_step_end(pipe, step_index, timestep, callback_kwargs)`, where
                `callback_kwargs` holds the tensors named in `callback_on_step_end_tensor_inputs`; it returns a dict,
                whose `"latents"` (same shape) replace the latents. Set `pipe._interrupt = True` in it to stop early.
            callback_on_step_end_tensor_inputs (`list[str]`): names from `_callback_tensor_inputs`: `"latents"`
                `(batch_size * num_images_per_prompt, C, h, w)` after the step, `"noise_pred"` (same shape) the guided
                model prediction of the step.
        """
        processor = self._require_processor("TransfusionPipeline.__call__")
        tensor_inputs = self._callback_tensor_names(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self.check_inputs(height, width, guidance_scale, num_inference_steps, num_images_per_prompt, tensor_inputs)
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
        latents = self._denoise(
            prefixes,
            len(prompts),
            num_inference_steps,
            guidance_scale,
            generator,
            latents,
            use_kv_cache,
            timesteps=timesteps,
            sigmas=sigmas,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=tensor_inputs,
            grid=self.latent_grid(height, width),
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
        height: int | None = None,
        width: int | None = None,
        **generate_kwargs,
    ) -> list[str]:
        """Image-to-text: the images enter as clean latents (t = 0) and the model writes what follows.

        Args:
            images: one or several images (PIL, numpy or tensors).
            prompt (`str`, *optional*): text placed after each image (e.g. a question).
            max_new_tokens (`int`): at most this many generated tokens per caption.
            height, width (`int`, *optional*): the size the images are resized (and center-cropped) to, as in
                `__call__` (default: the model's square size).
            generate_kwargs: passed to `transformers`' `generate` (`do_sample`, `num_beams`, ...).

        Returns:
            `list[str]`: one caption per image.
        """
        processor = self._require_processor("caption")
        # a batch `(B, C, H, W)` tensor or `(B, H, W, C)` array (this pipeline's own "pt"/"np" output) is B images.
        batched = isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4
        images = list(images) if isinstance(images, (list, tuple)) or batched else [images]
        latents = self.encode_images(images, height, width)
        num_tokens = self.num_image_tokens(tuple(latents.shape[-2:]))
        sequences = [processor.encode_parts([num_tokens, prompt or ""]) for _ in images]
        self._check_length(len(sequences[0]) + max_new_tokens, "Captioning")
        input_ids, attention_mask = pad_sequences(sequences, processor.tokenizer.pad_token_id, padding_side="left")
        stop = [processor.tokenizer.eos_token_id, processor.boi_token_id]
        generate_kwargs.setdefault("do_sample", False)
        # never sample the bare image placeholder as text (it would reach the model without latents and raise).
        generate_kwargs.setdefault("suppress_tokens", [processor.image_token_id])
        device = self._execution_device
        output = self.transformer.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            latents=latents,
            timesteps=torch.zeros(len(images), device=device),
            max_new_tokens=max_new_tokens,
            eos_token_id=[token for token in stop if token is not None],
            pad_token_id=processor.tokenizer.pad_token_id,
            **generate_kwargs,
        )
        self.maybe_free_model_hooks()
        return processor.batch_decode(output[:, input_ids.shape[1] :])

    # ------------------------------------------------------------------------------------------------ editing
    @torch.no_grad()
    def edit(
        self,
        images: ImageInput | Sequence[ImageInput],
        instructions: str | Sequence[str],
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        height: int | None = None,
        width: int | None = None,
    ) -> TransfusionPipelineOutput | tuple:
        """Image editing: each source image enters as clean context (t = 0), then its instruction, then `<boi>` and
        the edited image is denoised, as in editing training (`[bos] <boi> source <eoi> instruction <boi> target`).
        Guidance contrasts the instruction with none (the source kept), the instruction dropout of training.

        Args:
            images: the source images (PIL, numpy or tensors; one or a list).
            instructions (`str` or `list[str]`): one per image, or one for all.
            num_inference_steps, guidance_scale, generator, output_type, return_dict: as in `__call__`.
            latents (`torch.Tensor` of shape `(num_images, C, h, w)`, *optional*): the starting noise.
            height, width (`int`, *optional*): the size the sources are resized (and center-cropped) to and the
                edited images are made at (default: the model's square size).

        Returns:
            [`TransfusionPipelineOutput`] with one edited image per source (or a tuple with `return_dict=False`).
        """
        processor = self._require_processor("edit")
        self.check_inputs(height, width, guidance_scale, num_inference_steps, 1, [])
        batched = isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4
        images = list(images) if isinstance(images, (list, tuple)) or batched else [images]
        instructions = [instructions] * len(images) if isinstance(instructions, str) else list(instructions)
        if len(instructions) != len(images):
            raise ValueError(f"`instructions` has {len(instructions)} entries for {len(images)} images.")
        grid = self.latent_grid(height, width)
        sources = self.encode_images(images, height, width)
        num_tokens = self.num_image_tokens(grid)
        prefixes = [processor.encode_parts([num_tokens, text]) + [processor.boi_token_id] for text in instructions]
        prefix_latents = sources
        if guidance_scale > 1.0:
            # Unconditional rows keep the source and drop the instruction; their images follow the conditional ones.
            prefixes += [processor.encode_parts([num_tokens, ""]) + [processor.boi_token_id] for _ in images]
            prefix_latents = torch.cat([sources, sources])
        edited = self._denoise(
            prefixes,
            len(images),
            num_inference_steps,
            guidance_scale,
            generator,
            latents,
            use_kv_cache=True,
            prefix_latents=prefix_latents,
            grid=grid,
        )
        output = self.decode_latents(edited, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (output,)
        return TransfusionPipelineOutput(images=output)

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
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        callback_on_step_end: StepEndCallback | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        height: int | None = None,
        width: int | None = None,
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
            timesteps, sigmas, callback_on_step_end, callback_on_step_end_tensor_inputs: as in `__call__`, for every
                generated image (the step index restarts at 0 for each image; `"latents"` are `(1, C, h, w)`).
            height, width (`int`, *optional*): the size of the generated images and of the context images (resized and
                center-cropped), as in `__call__`.

        Returns:
            The generated continuation as an ordered list of strings and PIL images.
        """
        processor = self._require_processor("generate")
        tensor_inputs = self._callback_tensor_names(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self.check_inputs(height, width, guidance_scale, num_inference_steps, 1, tensor_inputs)
        device = self._execution_device
        grid = self.latent_grid(height, width)
        image_ids = [processor.image_token_id] * self.num_image_tokens(grid)
        parts = [parts] if isinstance(parts, str) else list(parts)
        layout = [part if isinstance(part, str) else len(image_ids) for part in parts]
        context_images = [part for part in parts if not isinstance(part, str)]
        context_ids = processor.encode_parts(layout)
        self._check_length(len(context_ids) + 1, "The context")

        outputs: list[str | PIL.Image.Image] = []
        text_ids: list[int] = []
        num_images, new_tokens = 0, 0
        # keep the clean latents of every image in the context (given or generated, in order): re-prefilling the
        # context for an image needs them, as its placeholders cannot go through the model without latents.
        context_latents = self.encode_images(context_images, height, width) if context_images else None
        cache, next_logits = self._consume(context_ids, None, context_latents, device)
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
                cache, next_logits = self._consume([token], cache, None, device)
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
            latents = self._denoise(
                prefixes,
                1,
                num_inference_steps,
                guidance_scale,
                generator,
                None,
                use_kv_cache=True,
                prefix_latents=context_latents,
                timesteps=timesteps,
                sigmas=sigmas,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=tensor_inputs,
                grid=grid,
            )
            num_images += 1
            outputs.extend(self.decode_latents(latents.to(self.transformer.dtype), "pil"))
            # Write the clean image (t = 0) into the text cache once, then <eoi>: text continues after the image.
            block = [processor.boi_token_id] + image_ids + [processor.eoi_token_id]
            cache, next_logits = self._consume(block, cache, latents.to(self.transformer.dtype), device)
            context_ids.extend(block[1:])
            clean = latents.to(self.transformer.dtype)
            context_latents = clean if context_latents is None else torch.cat([context_latents, clean])
        if text_ids:
            outputs.append(processor.decode(text_ids))
        self.maybe_free_model_hooks()
        return outputs

    def _consume(
        self, ids: list[int], cache: DynamicCache | None, latents: torch.Tensor | None, device: torch.device
    ) -> tuple[DynamicCache, torch.Tensor]:
        """Append ids (and the clean images among them) to the text cache; returns it and the next-token logits."""
        if cache is None:
            cache = DynamicCache(config=self.transformer.config.text_config)
        input_ids = torch.tensor([ids], device=device)
        timesteps = torch.zeros(len(latents), device=device) if latents is not None else None
        output = self.transformer(
            input_ids=input_ids, latents=latents, timesteps=timesteps, cache=cache, use_cache=True, logits_to_keep=1
        )
        return cache, output.logits[:, -1, :].float()

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
        and the Transfusion model card. `card_kwargs` go to `transfusion_hf.modelcard_transfusion.build_model_card`
        (`output_dir` of the run for metrics and samples, `base_model`, `datasets`, `license`, `tags`). Weights are
        safetensors only. Needs transfusion_hf installed (not only the code saved beside the weights).
        """
        if not safe_serialization:
            raise ValueError("TransfusionPipeline.push_to_hub only pushes safetensors (safe_serialization=True).")
        return import_hub_module("TransfusionPipeline.push_to_hub").push_pipeline_to_hub(
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


__all__ = ["TransfusionPipeline", "TransfusionPipelineOutput"]
