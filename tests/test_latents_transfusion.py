"""pixels_to_latents / latents_to_pixels: the VAE's scaling and shift, both ways; identity in pixel space."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from transfusion_hf.latents_transfusion import latents_to_pixels, pixels_to_latents


def shifted_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=8,
        scaling_factor=2.0,
        shift_factor=0.5,
    ).eval()


def test_scaling_and_shift_both_ways():
    vae = shifted_vae()
    pixels = torch.rand((2, 3, 8, 8), generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        latents = pixels_to_latents(vae, pixels)
        assert latents.shape == (2, 4, 4, 4)
        torch.testing.assert_close(latents, (vae.encode(pixels).latent_dist.mode() - 0.5) * 2.0)
        decoded = latents_to_pixels(vae, latents)
        assert decoded.shape == (2, 3, 8, 8)
        torch.testing.assert_close(decoded, vae.decode(latents / 2.0 + 0.5).sample)


def test_pixel_space_is_the_identity():
    pixels = torch.rand(1, 3, 4, 4)
    assert pixels_to_latents(None, pixels) is pixels and latents_to_pixels(None, pixels) is pixels
