"""Held-out evaluation of image editing on the shapes (`data.shapes_edit`): edit a drawn source image by an
instruction never trained in its context, and judge the result with the shapes judge."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import PIL.Image
import torch

from ..data.shapes import ShapeSpec
from ..data.shapes_edit import EDIT_KINDS, load_shapes_edit_dataset
from .judge import judge_image_details

ATTRIBUTE_NAMES = tuple(item.name for item in fields(ShapeSpec))


@dataclass
class ShapesEditEvaluation:
    """Metrics and the material behind them.

    Args:
        metrics (`dict`): see [`edit_accuracy`].
        sources / instructions / images: the source images, the instructions and the edited images.
        target_captions (`list[str]`): the captions the edited images should read as.
    """

    metrics: dict
    sources: list[PIL.Image.Image] = field(default_factory=list)
    instructions: list[str] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)
    target_captions: list[str] = field(default_factory=list)


def edit_accuracy(
    images: Sequence[Any], sources: Sequence[ShapeSpec], targets: Sequence[ShapeSpec], kinds: Sequence[str]
) -> dict[str, float]:
    """Score edited images with the shapes judge.

    An edit is right when the judge reads the target's value of the edited attribute, the source's (= target's)
    value of the three others, and a clean background. An image where the judge finds no shape is wrong.

    Args:
        images (`Sequence`): the edited images (any format the judge takes).
        sources (`Sequence[ShapeSpec]`): what each source image shows.
        targets (`Sequence[ShapeSpec]`): what each edited image should show (the source with one attribute changed).
        kinds (`Sequence[str]`): the edited attribute of each, one of `EDIT_KINDS`.

    Returns:
        `dict[str, float]`: `edit_accuracy` (all of the above), `edited_attribute_accuracy` (the new value read),
        `kept_attributes_accuracy` (the three others read unchanged), `clean_background_rate`, and
        `edit_accuracy_<kind>` for each kind present.
    """
    if not len(images) == len(sources) == len(targets) == len(kinds):
        raise ValueError(
            f"Give one source, target and kind per image: {len(images)} images, {len(sources)} sources, "
            f"{len(targets)} targets, {len(kinds)} kinds."
        )
    if not images:
        raise ValueError("No image to score.")
    right, edited, kept, clean = [], [], [], []
    for image, source, target, kind in zip(images, sources, targets, kinds):
        changed = [name for name in ATTRIBUTE_NAMES if getattr(source, name) != getattr(target, name)]
        if changed != [kind]:
            raise ValueError(f"The edit {source.caption!r} -> {target.caption!r} does not change exactly the {kind}.")
        result = judge_image_details(image)
        read = result.spec if result is not None else None
        edited.append(read is not None and getattr(read, kind) == getattr(target, kind))
        kept.append(
            read is not None
            and all(getattr(read, name) == getattr(source, name) for name in ATTRIBUTE_NAMES if name != kind)
        )
        clean.append(result is not None and result.background_clean)
        right.append(edited[-1] and kept[-1] and clean[-1])
    metrics = {
        "edit_accuracy": sum(right) / len(right),
        "edited_attribute_accuracy": sum(edited) / len(edited),
        "kept_attributes_accuracy": sum(kept) / len(kept),
        "clean_background_rate": sum(clean) / len(clean),
    }
    for kind in EDIT_KINDS:
        of_kind = [ok for ok, edit_kind in zip(right, kinds) if edit_kind == kind]
        if of_kind:
            metrics[f"edit_accuracy_{kind}"] = sum(of_kind) / len(of_kind)
    return metrics


@torch.no_grad()
def evaluate_shapes_edit(
    pipeline,
    num_samples: int = 96,
    num_inference_steps: int = 25,
    guidance_scale: float = 3.0,
    batch_size: int = 48,
    seed: int = 0,
    split: str = "held_out",
) -> ShapesEditEvaluation:
    """Score a [`TransfusionPipeline`] trained on `--dataset shapes_edit` on edits of `split` (default the held-out
    edits, never trained in their context): `pipeline.edit(source, instruction)` for each, judged by [`edit_accuracy`].

    Args:
        pipeline: the trained pipeline (32x32 images).
        num_samples (`int`): edits to make (`data.shapes_edit.sample_edits`: the kinds drawn evenly).
        num_inference_steps, guidance_scale: sampling settings.
        batch_size (`int`): edits per pipeline call.
        seed (`int`): the edits drawn (`load_shapes_edit_dataset(seed=...)`) and the sampling noise.
        split (`str`): `"held_out"`, `"train"` or `"all"`.
    """
    dataset = load_shapes_edit_dataset(split, num_samples, seed)
    sources, instructions = list(dataset["source_image"]), list(dataset["text"])
    generator = torch.Generator().manual_seed(seed)
    images: list[Any] = []
    for start in range(0, len(sources), batch_size):
        end = start + batch_size
        images.extend(
            pipeline.edit(
                sources[start:end],
                instructions[start:end],
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generator,
            ).images
        )
    metrics = edit_accuracy(
        images,
        [ShapeSpec.from_caption(caption) for caption in dataset["source_caption"]],
        [ShapeSpec.from_caption(caption) for caption in dataset["target_caption"]],
        dataset["edit_kind"],
    )
    return ShapesEditEvaluation(metrics, sources, instructions, images, list(dataset["target_caption"]))


__all__ = ["ShapesEditEvaluation", "edit_accuracy", "evaluate_shapes_edit"]
