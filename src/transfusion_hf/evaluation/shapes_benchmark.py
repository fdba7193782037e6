"""Held-out evaluation of a pipeline on the captioned shapes: text-to-image and captioning accuracy."""

from __future__ import annotations

from dataclasses import dataclass, field

import PIL.Image
import torch

from ..data.shapes import draw_shape, held_out_captions, sample_specs
from ..visualization import make_grid
from .batched import caption_images, generate_images
from .metrics import caption_accuracy, text_to_image_accuracy


@dataclass
class ShapesEvaluation:
    """Metrics and the material behind them.

    Args:
        metrics (`dict`): `t2i_accuracy`, `caption_accuracy` and the per-attribute scores (`t2i_color`, ...).
        prompts / images: the held-out prompts and the generated images.
        reference_captions / predicted_captions: for the held-out drawn images.
        caption_images: the drawn held-out images that were captioned.
    """

    metrics: dict
    prompts: list[str] = field(default_factory=list)
    images: list[PIL.Image.Image] = field(default_factory=list)
    caption_images: list[PIL.Image.Image] = field(default_factory=list)
    reference_captions: list[str] = field(default_factory=list)
    predicted_captions: list[str] = field(default_factory=list)


@torch.no_grad()
def held_out_text_to_image(
    pipeline,
    images_per_caption: int = 2,
    num_inference_steps: int = 25,
    guidance_scale: float = 3.0,
    batch_size: int = 48,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
) -> tuple[list[str], list[PIL.Image.Image], dict]:
    """Draw `images_per_caption` images for each of the 48 held-out captions and judge them: the text-to-image half
    of [`evaluate_shapes`], also used alone to compare samplers on one model (benchmarks/bench_samplers.py). The
    images are `height x width` pixels (default: the pipeline's size); the judge reads positions on that canvas.

    Returns:
        The prompts (each caption `images_per_caption` times in a row), the images, and the judge's scores
        (`accuracy` and one per attribute, see `text_to_image_accuracy`).
    """
    prompts = [caption for caption in held_out_captions() for _ in range(images_per_caption)]
    generator = torch.Generator().manual_seed(seed)
    images = generate_images(
        pipeline, prompts, batch_size, num_inference_steps, guidance_scale, generator, height, width
    )
    return prompts, images, text_to_image_accuracy(images, prompts)


def held_out_samples_grid(
    prompts: list[str], images: list[PIL.Image.Image], images_per_caption: int
) -> PIL.Image.Image:
    """The first image of each held-out prompt, 8 per row, the prompt under it (the demo's `samples.png`, whose
    layout benchmarks/ablations.py crops rows from).

    Args:
        prompts, images: as returned by [`held_out_text_to_image`] (each caption `images_per_caption` times in a row).
        images_per_caption (`int`).
    """
    first = slice(None, None, images_per_caption)
    return make_grid(images[first], prompts[first], columns=8)


@torch.no_grad()
def evaluate_shapes(
    pipeline,
    images_per_caption: int = 2,
    num_inference_steps: int = 25,
    guidance_scale: float = 3.0,
    batch_size: int = 48,
    num_caption_images: int = 96,
    seed: int = 0,
    image_sizes: list[tuple[int, int]] | None = None,
) -> ShapesEvaluation:
    """Score a [`TransfusionPipeline`] on the 48 held-out combinations, never seen in training.

    Args:
        pipeline: the trained pipeline.
        images_per_caption (`int`): images generated per held-out caption.
        num_inference_steps, guidance_scale: sampling settings.
        batch_size (`int`): prompts per pipeline call.
        num_caption_images (`int`): held-out drawings (random jitter, fixed seed) to caption.
        seed (`int`): sampling seed.
        image_sizes (`list[tuple[int, int]]`, *optional*): `(height, width)` pixel sizes (a model trained at mixed
            aspect ratios): every size is scored on its own (`t2i_accuracy_32x48`, `caption_accuracy_32x48`, ...)
            and the headline metrics are their means; the images and captions of all sizes are returned in order.
    """
    if image_sizes:
        return evaluate_shapes_at_sizes(
            pipeline, image_sizes, images_per_caption, num_inference_steps, guidance_scale, batch_size,
            num_caption_images, seed,
        )  # fmt: skip
    return evaluate_shapes_at_size(
        pipeline, images_per_caption, num_inference_steps, guidance_scale, batch_size, num_caption_images, seed
    )


def evaluate_shapes_at_size(
    pipeline,
    images_per_caption: int,
    num_inference_steps: int,
    guidance_scale: float,
    batch_size: int,
    num_caption_images: int,
    seed: int,
    height: int | None = None,
    width: int | None = None,
) -> ShapesEvaluation:
    """[`evaluate_shapes`] at one image size (default: the pipeline's)."""
    prompts, images, t2i = held_out_text_to_image(
        pipeline, images_per_caption, num_inference_steps, guidance_scale, batch_size, seed, height, width
    )
    specs = sample_specs("held_out", num_caption_images, seed=seed + 12345)
    canvas = {"height": height, "width": width} if height and width else {}
    drawn = [draw_shape(spec, jitter, **canvas) for spec, jitter in specs]
    references = [spec.caption for spec, _ in specs]
    predicted = caption_images(pipeline, drawn, batch_size, max_new_tokens=24, height=height, width=width)
    captions = caption_accuracy(predicted, references)
    metrics = {"t2i_accuracy": t2i["accuracy"], "caption_accuracy": captions["accuracy"]}
    for name in ("size", "color", "shape", "position"):
        metrics[f"t2i_{name}"] = t2i[name]
        metrics[f"caption_{name}"] = captions[name]
    # What a person would also look at: a clean background (the judge's `background_clean`); `t2i_accuracy` needs it.
    metrics.update(t2i_background=t2i["background"], t2i_attributes=t2i["attributes"])
    metrics.update(num_t2i_images=len(images), num_captioned_images=len(drawn))
    return ShapesEvaluation(metrics, prompts, images, drawn, references, predicted)


def evaluate_shapes_at_sizes(
    pipeline,
    image_sizes: list[tuple[int, int]],
    images_per_caption: int,
    num_inference_steps: int,
    guidance_scale: float,
    batch_size: int,
    num_caption_images: int,
    seed: int,
) -> ShapesEvaluation:
    """[`evaluate_shapes`] at each of `image_sizes`: per-size metrics suffixed `_{height}x{width}`, the headline ones
    (accuracies and per-attribute scores) the mean over sizes, counts summed."""
    runs = {
        f"{height}x{width}": evaluate_shapes_at_size(
            pipeline,
            images_per_caption,
            num_inference_steps,
            guidance_scale,
            batch_size,
            num_caption_images,
            seed,
            height,
            width,
        )  # fmt: skip
        for height, width in image_sizes
    }
    metrics: dict = {}
    for name in next(iter(runs.values())).metrics:
        values = [run.metrics[name] for run in runs.values()]
        metrics[name] = sum(values) if name.startswith("num_") else sum(values) / len(values)
        for size, run in runs.items():
            metrics[f"{name}_{size}"] = run.metrics[name]
    combined = ShapesEvaluation(metrics)
    for run in runs.values():
        combined.prompts += run.prompts
        combined.images += run.images
        combined.caption_images += run.caption_images
        combined.reference_captions += run.reference_captions
        combined.predicted_captions += run.predicted_captions
    return combined


__all__ = ["ShapesEvaluation", "evaluate_shapes", "held_out_samples_grid", "held_out_text_to_image"]
