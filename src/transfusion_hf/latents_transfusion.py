"""Pixels <-> the model's latents with a diffusers `AutoencoderKL` (or the pixels themselves, in pixel space).

The training script encodes its data and the pipeline encodes and decodes images with these functions, so training
and inference latents always agree.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from diffusers.utils.torch_utils import get_module_execution_device


def pixels_to_latents(vae: AutoencoderKL | None, pixel_values: torch.Tensor) -> torch.Tensor:
    """Pixel values -> clean latents scaled for the model: `(z - shift_factor) * scaling_factor` with the VAE's mode,
    or the pixels themselves without a VAE.

    Args:
        vae (`AutoencoderKL`, *optional*): the frozen VAE; None in pixel space.
        pixel_values (`torch.Tensor` of shape `(num_images, 3, H, W)`): in [-1, 1].

    Returns:
        `torch.Tensor` of shape `(num_images, C, H / vae scale, W / vae scale)`, on the VAE's execution device.
    """
    if vae is None:
        return pixel_values
    # The execution device, not `vae.device`: under `enable_model_cpu_offload` the weights wait on the CPU and the
    # offload hook moves them to the accelerator, but it leaves the inputs where they are.
    device = get_module_execution_device(vae)
    latents = vae.encode(pixel_values.to(device, vae.dtype)).latent_dist.mode()
    shift = vae.config.get("shift_factor") or 0.0
    return (latents - shift) * vae.config.scaling_factor


def latents_to_pixels(vae: AutoencoderKL | None, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of [`pixels_to_latents`]: scaled latents -> pixel values, with the VAE's decoder.

    Args:
        vae (`AutoencoderKL`, *optional*): the VAE; None in pixel space.
        latents (`torch.Tensor` of shape `(num_images, C, h, w)`): as the model makes them.

    Returns:
        `torch.Tensor` of shape `(num_images, 3, h * vae scale, w * vae scale)`, about [-1, 1] (not clamped).
    """
    if vae is None:
        return latents
    shift = vae.config.get("shift_factor") or 0.0
    latents = latents.to(get_module_execution_device(vae), vae.dtype) / vae.config.scaling_factor + shift
    return vae.decode(latents).sample


__all__ = ["latents_to_pixels", "pixels_to_latents"]
