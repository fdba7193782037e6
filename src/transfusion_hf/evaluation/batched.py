"""Batched text-to-image and captioning calls shared by the built-in benchmarks (shapes, glyphs)."""

from __future__ import annotations

from collections.abc import Sequence

import PIL.Image
import torch


def generate_images(
    pipeline,
    prompts: Sequence[str],
    batch_size: int,
    num_inference_steps: int,
    guidance_scale: float,
    generator: torch.Generator,
    height: int | None = None,
    width: int | None = None,
) -> list[PIL.Image.Image]:
    """One image per prompt, `batch_size` prompts per pipeline call, all drawn from the one `generator`, of
    `height x width` pixels (default: the pipeline's)."""
    images: list[PIL.Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        images.extend(
            pipeline(
                list(prompts[start : start + batch_size]),
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generator,
                **({"height": height, "width": width} if height or width else {}),
            ).images
        )
    return images


def caption_images(
    pipeline,
    images: Sequence[PIL.Image.Image],
    batch_size: int,
    max_new_tokens: int,
    height: int | None = None,
    width: int | None = None,
) -> list[str]:
    """One caption per image, `batch_size` images per `pipeline.caption` call, the images read at `height x width`
    pixels (default: the pipeline's)."""
    captions: list[str] = []
    size = {"height": height, "width": width} if height or width else {}
    for start in range(0, len(images), batch_size):
        batch = list(images[start : start + batch_size])
        captions.extend(pipeline.caption(batch, max_new_tokens=max_new_tokens, **size))
    return captions


__all__ = ["generate_images", "caption_images"]
