"""Accuracy metrics for the captioned-shapes data set, in both directions.

- `text_to_image_accuracy`: the judge (`judge_image_details`) reads each generated image back and compares it with the
  caption that prompted it.
- `caption_accuracy`: generated captions are compared with reference captions, as whole strings and per attribute.

Both return plain dicts of Python floats/ints so they can be logged or dumped to JSON directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transfusion_hf.data.shapes import ShapeSpec, normalize_caption
from transfusion_hf.evaluation.judge import judge_image_details

ATTRIBUTES: tuple[str, ...] = ("size", "color", "shape", "position")


def _check_lengths(
    predicted_name: str, predicted: Sequence[Any], reference_name: str, reference: Sequence[Any]
) -> int:
    if len(predicted) != len(reference):
        raise ValueError(f"Length mismatch: {len(predicted)} {predicted_name} but {len(reference)} {reference_name}.")
    if len(predicted) == 0:
        raise ValueError(f"Cannot compute an accuracy over 0 {predicted_name}.")
    return len(predicted)


def _parse_references(captions: Sequence[str]) -> list[ShapeSpec]:
    # References come from the data set, so one that does not parse is a caller bug, not a model error.
    return [ShapeSpec.from_caption(caption) for caption in captions]


def _attribute_scores(predictions: Sequence[ShapeSpec | None], references: Sequence[ShapeSpec]) -> dict[str, float]:
    # A missing prediction (no shape found / unparseable caption) counts as wrong on every attribute.
    total = len(references)
    scores = {
        name: sum(
            pred is not None and getattr(pred, name) == getattr(ref, name)
            for pred, ref in zip(predictions, references)
        )
        / total
        for name in ATTRIBUTES
    }
    return scores


def text_to_image_accuracy(
    images: Sequence[Any], captions: Sequence[str], value_range: tuple[float, float] | None = None
) -> dict[str, float | int]:
    """Scores generated images against the captions that prompted them, using the rule-based judge.

    Args:
        images (`Sequence`): Images in any format `judge_image_details` accepts (PIL, `(H, W, 3)` numpy, `(3, H, W)`
            tensor); a batched `(N, 3, H, W)` tensor or `(N, H, W, 3)` array works too, as it iterates per image.
        captions (`Sequence[str]`): One valid caption per image.
        value_range (`tuple[float, float]`, *optional*): (low, high) of floating-point images; inferred when `None`.

    Returns:
        `dict[str, float | int]`: `accuracy` (share of images whose four attributes all match on a clean
        background: what a person would accept), per-attribute accuracies `size`, `color`, `shape`, `position`,
        `background` (share of clean backgrounds, `JudgeResult.background_clean`), `attributes` (the four match,
        background aside) and `num_images`.

    Raises:
        ValueError: If the lengths differ, the inputs are empty or a caption does not parse.
    """
    total = _check_lengths("images", images, "captions", captions)
    references = _parse_references(captions)
    details = [judge_image_details(image, value_range) for image in images]
    predictions = [None if detail is None else detail.spec for detail in details]
    clean = [detail is not None and detail.background_clean for detail in details]
    right = [pred == ref for pred, ref in zip(predictions, references)]
    return {
        "accuracy": sum(is_right and is_clean for is_right, is_clean in zip(right, clean)) / total,
        **_attribute_scores(predictions, references),
        "background": sum(clean) / total,
        "attributes": sum(right) / total,
        "num_images": total,
    }


def _try_parse(caption: str) -> ShapeSpec | None:
    try:
        return ShapeSpec.from_caption(caption)
    except ValueError:
        return None


def caption_accuracy(predicted_captions: Sequence[str], reference_captions: Sequence[str]) -> dict[str, float | int]:
    """Scores generated captions against reference captions.

    Args:
        predicted_captions (`Sequence[str]`): Generated captions; any string.
        reference_captions (`Sequence[str]`): One valid reference caption per prediction.

    Returns:
        `dict[str, float | int]`: `accuracy` (exact match after `normalize_caption`: strip, lower-case, collapse
        whitespace), per-attribute accuracies `size`, `color`, `shape`, `position` (a prediction that does not
        parse counts as wrong on all four), and `num_captions`.

    Raises:
        ValueError: If the lengths differ, the inputs are empty or a reference caption does not parse.
    """
    total = _check_lengths("predicted captions", predicted_captions, "reference captions", reference_captions)
    references = _parse_references(reference_captions)
    exact = sum(
        normalize_caption(pred) == normalize_caption(ref) for pred, ref in zip(predicted_captions, reference_captions)
    )
    return {
        "accuracy": exact / total,
        **_attribute_scores([_try_parse(caption) for caption in predicted_captions], references),
        "num_captions": total,
    }
