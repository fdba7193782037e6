"""Held-out evaluation of a pipeline on the glyphs: text-to-image and captioning accuracy, plus image-quality checks
(patch seams, collapse to the mean, diversity, sharpness) against real renders of the same captions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch

from ..data.glyphs import GlyphSpec, held_out_captions, render_glyphs
from .batched import caption_images, generate_images
from .glyph_judge import GlyphJudge, glyph_caption_accuracy, glyph_text_to_image_accuracy
from .image_quality import diversity_score, mean_image_score, sharpness_score, tile_seam_score

_REFERENCE_SEED_OFFSET = 54_321  # real renders for the quality checks, distinct from the captioned renders
_CAPTION_SEED_OFFSET = 12_345


@dataclass
class GlyphsEvaluation:
    """Metrics and the material behind them.

    Args:
        metrics (`dict`): `t2i_accuracy` (character, colour and background all right), `t2i_character`,
            `t2i_color`, `t2i_background`, `t2i_no_glyph`; `caption_accuracy` (exact match), `caption_character`,
            `caption_color`, `caption_background`; `seam_score` (with `reference_seam_score` for real renders),
            `diversity_score` (samples of one prompt vs real renders of one caption), `mean_image_score` (distance to
            each caption's mean real render), `global_mean_image_score`, `sharpness_score`; counts.
        prompts / images: the held-out prompts and the generated images.
        reference_images: real renders of the held-out captions (`reference_per_caption` each), for the quality
            checks.
        caption_images / reference_captions / predicted_captions: the held-out renders that were captioned.
    """

    metrics: dict
    prompts: list[str] = field(default_factory=list)
    images: list[PIL.Image.Image] = field(default_factory=list)
    reference_images: list[PIL.Image.Image] = field(default_factory=list)
    caption_images: list[PIL.Image.Image] = field(default_factory=list)
    reference_captions: list[str] = field(default_factory=list)
    predicted_captions: list[str] = field(default_factory=list)


def _patch_pixels(pipeline: Any, default: int = 8) -> int:
    # A patch of the transformer covers patch_size latent pixels, each vae_scale_factor image pixels wide.
    transformer = getattr(pipeline, "transformer", None)
    patch_size = getattr(getattr(transformer, "config", None), "patch_size", None)
    scale = getattr(pipeline, "vae_scale_factor", None)
    if isinstance(patch_size, int) and isinstance(scale, int):
        return patch_size * scale
    return default


@torch.no_grad()
def evaluate_glyphs(
    pipeline: Any,
    images_per_caption: int = 2,
    num_inference_steps: int = 25,
    guidance_scale: float = 3.0,
    batch_size: int = 40,
    num_caption_images: int = 80,
    reference_per_caption: int = 8,
    patch_size: int | None = None,
    seed: int = 0,
    judge: GlyphJudge | None = None,
) -> GlyphsEvaluation:
    """Score a [`TransfusionPipeline`] on the 40 held-out glyph combinations, never seen in training.

    Args:
        pipeline: the trained pipeline (called with a list of prompts; `pipeline.caption(images)` for captioning).
        images_per_caption (`int`): images generated per held-out caption (>= 2 for the diversity score).
        num_inference_steps, guidance_scale: sampling settings.
        batch_size (`int`): prompts (or images to caption) per pipeline call.
        num_caption_images (`int`): held-out renders (fixed seed) to caption.
        reference_per_caption (`int`): real renders per held-out caption for the quality checks (>= 2).
        patch_size (`int`, *optional*): pixel side of the suspected tiles for the seam score; by default one
            transformer patch (`patch_size * vae_scale_factor`), or 8 when the pipeline does not say.
        seed (`int`): sampling seed.
        judge (`GlyphJudge`, *optional*): defaults to `default_glyph_judge()` (trained on first use, then cached).

    Returns:
        `GlyphsEvaluation`: the metrics, the prompts and images, and the captioning material.

    Raises:
        ValueError: If `images_per_caption` or `reference_per_caption` is below 2.
    """
    if images_per_caption < 2:
        raise ValueError(f"images_per_caption must be >= 2 (diversity needs two samples), got {images_per_caption}.")
    if reference_per_caption < 2:
        raise ValueError(f"reference_per_caption must be >= 2, got {reference_per_caption}.")
    prompts = [caption for caption in held_out_captions() for _ in range(images_per_caption)]
    generator = torch.Generator().manual_seed(seed)
    images = generate_images(pipeline, prompts, batch_size, num_inference_steps, guidance_scale, generator)
    t2i = glyph_text_to_image_accuracy(images, prompts, judge=judge)

    # Real renders of the same captions at the generated size: what the quality scores are relative to.
    resolution = images[0].size[0]
    reference_labels = [caption for caption in held_out_captions() for _ in range(reference_per_caption)]
    _, reference = render_glyphs(
        specs=[GlyphSpec.from_caption(caption) for caption in reference_labels],
        seed=seed + _REFERENCE_SEED_OFFSET,
        resolution=resolution,
    )
    generated = np.stack([np.asarray(image.convert("RGB")) for image in images])
    tile = patch_size or _patch_pixels(pipeline)
    quality = {
        "seam_score": tile_seam_score(generated, tile),
        "reference_seam_score": tile_seam_score(reference, tile),
        "diversity_score": diversity_score(generated, reference, prompts, reference_labels),
        "mean_image_score": mean_image_score(generated, reference, prompts, reference_labels),
        "global_mean_image_score": mean_image_score(generated, reference),
        "sharpness_score": sharpness_score(generated, reference),
    }

    specs, drawn_pixels = render_glyphs(
        "held_out", num_caption_images, seed=seed + _CAPTION_SEED_OFFSET, resolution=resolution
    )
    drawn = [PIL.Image.fromarray(pixels) for pixels in drawn_pixels]
    references = [spec.caption for spec in specs]
    predicted = caption_images(pipeline, drawn, batch_size, max_new_tokens=32)
    captions = glyph_caption_accuracy(predicted, references)

    metrics: dict[str, float | int] = {"t2i_accuracy": t2i["accuracy"], "caption_accuracy": captions["accuracy"]}
    for name in ("character", "color", "background", "colors"):
        metrics[f"t2i_{name}"] = t2i[name]
        metrics[f"caption_{name}"] = captions[name]
    metrics["t2i_no_glyph"] = t2i["no_glyph"]
    metrics.update(quality)
    metrics.update(num_t2i_images=len(images), num_captioned_images=len(drawn), patch_size=tile)
    return GlyphsEvaluation(
        metrics=metrics,
        prompts=prompts,
        images=images,
        reference_images=[PIL.Image.fromarray(pixels) for pixels in reference],
        caption_images=drawn,
        reference_captions=references,
        predicted_captions=predicted,
    )


__all__ = ["GlyphsEvaluation", "evaluate_glyphs"]
