"""A rule-based judge that reads size, color, shape and position back from a captioned-shapes image.

The judge is meant for images produced by a generative model, so every step is chosen to tolerate slight colour
deviations, a few stray pixels and soft edges:

1. Foreground = pixels whose brightest channel is at least half of full scale. The brightest channel (rather than
   luminance) is used because every palette colour has one channel at 255, even pure blue.
2. Keep the largest 8-connected foreground component, which drops isolated stray pixels.
3. Bounding box of that component, ignoring outer rows/columns of fewer than 2 px: those are spurs (stray pixels
   stuck to an edge) and would otherwise stretch the box.
4. Measurements, in the frame of the data set: images whose short side is 32 px (32x32, 32x48, 48x32, ...) are
   measured as drawn, others are rescaled uniformly so that their short side is 32 px (a 64x64 sample of a model
   trained on 32x32 shapes upscaled to 64 px reads as that 32x32 drawing, a 64x96 one as a 32x48 drawing); pass
   `scale` when the short side of the drawing was not 32 px (e.g. `scale=1.0` for `draw_shape` on a 48x64 canvas):
   - position: the nominal centre nearest to the centre of the bounding box; the centres scale with the canvas as
     `data.shapes.position_center` places them (`POSITIONS` on 32x32), since the data set draws them so;
   - size: ``large`` when the longer bounding-box side is at least 12 px (drawn: 8 vs 15-16, on any canvas);
   - shape: ``triangle`` when the skewness of the pixel rows is below -0.2 (drawn: about -0.55, as its mass sits
     low; circle and square: 0), else ``square`` when the bounding box is at least 85% (small) / 90% (large)
     filled (drawn: 1.0), else ``circle`` (drawn: 0.81);
   - color: each pixel is divided by its brightest channel (so dim or soft-edged pixels keep their hue), the
     per-channel median is taken and the nearest palette colour (Euclidean in RGB) wins.
5. No component of at least 12 px (in the frame) means no shape: the judge returns `None`.
6. Background: every pixel farther than 1 px from the shape (soft edges excluded). The data set draws it black; a
   person sees a speckled or tinted one at once, so the judge reads it too: `background_level` is the mean brightest
   channel there, `background_speckle` the share of its pixels at least `SPECKLE_LEVEL` bright, and the background
   is clean when both stay under `CLEAN_BACKGROUND_MAX_LEVEL` / `CLEAN_BACKGROUND_MAX_SPECKLE` (drawn images: 0 and
   0). A text-to-image sample counts as right only with a clean background (`metrics.text_to_image_accuracy`).

Accepted image formats (anything else raises `TypeError`/`ValueError`):

- `PIL.Image.Image` in any mode (converted to RGB);
- `numpy.ndarray` of shape `(H, W, 3)`: `uint8` in [0, 255], or floating point in [0, 1] or [-1, 1];
- `torch.Tensor` of shape `(3, H, W)`: `uint8` in [0, 255], or floating point in [0, 1] or [-1, 1].

For floating-point inputs the range is `value_range` when given; otherwise it is inferred as [-1, 1] when the
minimum is below -0.25 (a black background sits at -1) and [0, 1] otherwise. Pass `value_range` explicitly when
in doubt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from transfusion_hf.data.shapes import COLORS, IMAGE_SIZE, POSITIONS, SHAPES, SIZES, ShapeSpec

FOREGROUND_THRESHOLD: float = 127.5
"""A pixel is foreground when its brightest channel, in [0, 255], is at least this."""

MIN_AREA: int = 12
"""Smallest component, in pixels of the frame (short side 32 px), that counts as a shape (the smallest drawn shape has
40)."""

LARGE_EXTENT: float = 12.0
"""Longer bounding-box side, in pixels of the frame, from which a shape is ``large`` (midway between 8 and 16)."""

TRIANGLE_MAX_SKEW: float = -0.2
"""Below this skewness of its pixel rows a shape is a ``triangle`` (drawn: about -0.55; circle and square: 0)."""

SQUARE_FILL_RATIO: dict[str, float] = {"small": 0.85, "large": 0.9}
"""Per size, from this share of its bounding box filled a (symmetric) shape is a ``square``, below it a ``circle``.
Drawn squares fill 1.0 and circles 0.81, but soft edges round a small square's corners (down to ~0.86) and a large
circle clipped by the image border fills up to ~0.87 of its box, hence a lower bar for small shapes."""

SPECKLE_LEVEL: float = 64.0
"""A background pixel whose brightest channel, in [0, 255], is at least this is a speckle (a quarter of full scale)."""

CLEAN_BACKGROUND_MAX_LEVEL: float = 16.0
"""Largest mean brightest channel of a clean background (drawn: 0; gaussian pixel noise of sigma 10 reads 8, of
sigma 20 reads 17: dirty; so does a uniform tint of 7% of full scale)."""

CLEAN_BACKGROUND_MAX_SPECKLE: float = 0.01
"""Largest share of speckles in a clean background (about 9 of the ~900 background pixels of a small shape)."""

_PALETTE_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[name] for name in _PALETTE_NAMES], dtype=np.float32)
_POSITION_NAMES = tuple(POSITIONS)
# Nominal centres as fractions (x / width, y / height) of the canvas: the data set scales them with it.
_POSITION_FRACTIONS = np.array([POSITIONS[name] for name in _POSITION_NAMES], dtype=np.float32) / IMAGE_SIZE
_SMALL, _LARGE = SIZES
_CIRCLE, _SQUARE, _TRIANGLE = SHAPES


@dataclass(frozen=True)
class JudgeResult:
    """What the judge read from one image, with the measurements behind it (all in the frame: the image rescaled to a
    short side of 32 px, or by the `scale` given to the judge).

    Args:
        spec (`ShapeSpec`): The attributes read back.
        center (`tuple[float, float]`): (x, y) centre of the shape's bounding box, in pixels.
        extent (`float`): Longer side of the bounding box, in pixels.
        area (`float`): Number of pixels of the shape.
        fill_ratio (`float`): Share of the bounding box covered by the shape.
        vertical_skew (`float`): Skewness of the rows of the shape's pixels (negative: mass sits low).
        color_rgb (`tuple[float, float, float]`): Median brightness-normalised colour, in [0, 255].
        background_level (`float`): Mean brightest channel of the background, in [0, 255] (drawn: 0).
        background_speckle (`float`): Share of background pixels at least `SPECKLE_LEVEL` bright (drawn: 0).
    """

    spec: ShapeSpec
    center: tuple[float, float]
    extent: float
    area: float
    fill_ratio: float
    vertical_skew: float
    color_rgb: tuple[float, float, float]
    background_level: float = 0.0
    background_speckle: float = 0.0

    @property
    def background_clean(self) -> bool:
        """Whether a person would call the background clean: dark and without speckles."""
        return (
            self.background_level <= CLEAN_BACKGROUND_MAX_LEVEL
            and self.background_speckle <= CLEAN_BACKGROUND_MAX_SPECKLE
        )


def background_statistics(brightest: np.ndarray, shape_mask: np.ndarray) -> tuple[float, float]:
    """Mean level and speckle share of the pixels farther than 1 px (8-connected) from the shape.

    Args:
        brightest (`np.ndarray` of shape `(H, W)`): the brightest channel of each pixel, in [0, 255].
        shape_mask (`np.ndarray` of shape `(H, W)`, bool): the shape's pixels.
    """
    padded = np.pad(shape_mask, 1)
    height, width = shape_mask.shape
    near = np.zeros_like(shape_mask)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            near |= padded[dy : dy + height, dx : dx + width]
    background = brightest[~near]
    if background.size == 0:
        return 0.0, 0.0
    return float(background.mean()), float((background >= SPECKLE_LEVEL).mean())


def to_rgb_array(image: Any, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Converts an image in any accepted format (see the module docstring) to a float array in [0, 255].

    Args:
        image (`PIL.Image.Image`, `np.ndarray` of shape `(H, W, 3)` or `torch.Tensor` of shape `(3, H, W)`):
            The image.
        value_range (`tuple[float, float]`, *optional*): (low, high) of floating-point inputs; inferred when `None`.

    Returns:
        `np.ndarray`: Float32 array of shape `(H, W, 3)` with values clipped to [0, 255].

    Raises:
        TypeError: If `image` is of an unsupported type.
        ValueError: If `image` has an unsupported shape.
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"Expected a tensor of shape (3, H, W), got {tuple(image.shape)}.")
        array = image.detach().to("cpu").permute(1, 2, 0)
        array = array.numpy() if array.dtype == torch.uint8 else array.float().numpy()
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"Expected an array of shape (H, W, 3), got {image.shape}.")
        array = image
    else:
        raise TypeError(f"Unsupported image type {type(image).__name__}; expected PIL image, numpy array or tensor.")
    if array.dtype == np.uint8:
        return array.astype(np.float32)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"Expected uint8 or floating-point pixels, got {array.dtype}.")
    array = np.asarray(array, dtype=np.float32)
    if value_range is None:
        value_range = (-1.0, 1.0) if array.size and float(array.min()) < -0.25 else (0.0, 1.0)
    low, high = value_range
    return np.clip((array - low) * (255.0 / (high - low)), 0.0, 255.0)


def _largest_component(mask: np.ndarray) -> np.ndarray | None:
    # Union-find over horizontal runs rather than pixels: a blob in a 32x32 image has only a few dozen runs, so this
    # stays fast in pure Python. Runs touch (8-connectivity) when they are in adjacent rows and their column ranges
    # overlap or meet diagonally.
    height, width = mask.shape
    padded = np.zeros((height, width + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    run_rows, run_starts = np.nonzero(edges == 1)
    run_ends = np.nonzero(edges == -1)[1]  # exclusive; row-major order pairs every end with its start
    if len(run_rows) == 0:
        return None
    rows, starts, ends = run_rows.tolist(), run_starts.tolist(), run_ends.tolist()
    parent = list(range(len(rows)))

    def find(run: int) -> int:
        while parent[run] != run:
            parent[run] = parent[parent[run]]
            run = parent[run]
        return run

    previous_row_runs: list[int] = []
    current_row_runs: list[int] = []
    for run, row in enumerate(rows):
        if current_row_runs and rows[current_row_runs[0]] != row:
            previous_row_runs = current_row_runs if rows[current_row_runs[0]] == row - 1 else []
            current_row_runs = []
        current_row_runs.append(run)
        for other in previous_row_runs:
            if starts[run] <= ends[other] and starts[other] <= ends[run]:
                parent[find(other)] = find(run)
    sizes: dict[int, int] = {}
    for run in range(len(rows)):
        root = find(run)
        sizes[root] = sizes.get(root, 0) + ends[run] - starts[run]
    best = max(sizes, key=sizes.__getitem__)
    component = np.zeros_like(mask, dtype=bool)
    for run in range(len(rows)):
        if find(run) == best:
            component[rows[run], starts[run] : ends[run]] = True
    return component


def _robust_span(counts: np.ndarray, min_count: int) -> tuple[int, int]:
    # Outer rows/columns with fewer than `min_count` pixels are spurs (stray pixels stuck to an edge) and would
    # otherwise stretch the bounding box; fall back to the plain extent when every line is thin.
    lines = np.flatnonzero(counts >= min_count)
    if len(lines) == 0:
        lines = np.flatnonzero(counts)
    return int(lines[0]), int(lines[-1]) + 1


def _skewness(values: np.ndarray, weights: np.ndarray) -> float:
    total = weights.sum()
    if total <= 0:
        return 0.0
    centred = values - (weights * values).sum() / total
    variance = (weights * centred**2).sum() / total
    return float((weights * centred**3).sum() / total / variance**1.5) if variance > 0 else 0.0


def _classify_shape(size: str, fill_ratio: float, vertical_skew: float) -> str:
    # The apex-up triangle is the only shape whose mass is lopsided vertically; its skewness survives blur and
    # noise far better than its fill ratio, which a blurred small triangle shares with a circle.
    if vertical_skew < TRIANGLE_MAX_SKEW:
        return _TRIANGLE
    return _SQUARE if fill_ratio >= SQUARE_FILL_RATIO[size] else _CIRCLE


def _nearest_color(pixels: np.ndarray) -> tuple[str, tuple[float, float, float]]:
    # Dividing by the brightest channel maps soft-edge pixels (e.g. half-intensity orange) onto their full colour.
    normalised = pixels * (255.0 / np.maximum(pixels.max(axis=1, keepdims=True), 1.0))
    median = np.median(normalised, axis=0)
    distances = np.linalg.norm(_PALETTE - median[None, :], axis=1)
    return _PALETTE_NAMES[int(np.argmin(distances))], (float(median[0]), float(median[1]), float(median[2]))


def judge_image_details(
    image: Any, value_range: tuple[float, float] | None = None, scale: float | None = None
) -> JudgeResult | None:
    """Reads the shape in an image back, with the measurements behind the decision.

    Args:
        image (`PIL.Image.Image`, `np.ndarray` of shape `(H, W, 3)` or `torch.Tensor` of shape `(3, H, W)`):
            The image, of any size; see the module docstring for accepted dtypes and ranges.
        value_range (`tuple[float, float]`, *optional*): (low, high) of floating-point inputs; inferred when `None`.
        scale (`float`, *optional*): Frame pixels per image pixel. Defaults to `IMAGE_SIZE / min(H, W)`: an image
            whose short side is 32 px is measured as drawn, a larger one as an upscaled drawing.

    Returns:
        `JudgeResult` or `None`: `None` when no shape (foreground component of at least `MIN_AREA` px) is found.
    """
    rgb = to_rgb_array(image, value_range)
    height, width = rgb.shape[:2]
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}.")
    mask = _largest_component(rgb.max(axis=2) >= FOREGROUND_THRESHOLD)
    # One scale for both axes: the shapes keep their pixel sizes on any canvas, so only the whole drawing may have been
    # resized (a square one exactly as before: 32 / side), never stretched along one axis.
    scale = IMAGE_SIZE / min(height, width) if scale is None else float(scale)
    area = 0 if mask is None else int(mask.sum())
    if mask is None or area * scale * scale < MIN_AREA:
        return None
    min_count = max(2, round(2 / scale))
    x0, x1 = _robust_span(mask.sum(axis=0), min_count)
    y0, y1 = _robust_span(mask.sum(axis=1), min_count)
    box_rows = mask[y0:y1, x0:x1].sum(axis=1)
    fill_ratio = float(box_rows.sum()) / ((x1 - x0) * (y1 - y0))
    vertical_skew = _skewness(np.arange(len(box_rows), dtype=np.float64), box_rows.astype(np.float64))
    center = ((x0 + x1) / 2 * scale, (y0 + y1) / 2 * scale)
    extent = max(x1 - x0, y1 - y0) * scale
    # The nominal centres on this canvas, in frame pixels (on 32x32 exactly `POSITIONS`).
    centres = _POSITION_FRACTIONS * np.array([width * scale, height * scale], dtype=np.float32)
    position_i = int(np.argmin(np.linalg.norm(centres - np.array(center, dtype=np.float32), axis=1)))
    color, color_rgb = _nearest_color(rgb[mask])
    background_level, background_speckle = background_statistics(rgb.max(axis=2), mask)
    size = _LARGE if extent >= LARGE_EXTENT else _SMALL
    spec = ShapeSpec(
        size=size,
        color=color,
        shape=_classify_shape(size, fill_ratio, vertical_skew),
        position=_POSITION_NAMES[position_i],
    )
    return JudgeResult(
        spec=spec,
        center=center,
        extent=extent,
        area=area * scale * scale,
        fill_ratio=fill_ratio,
        vertical_skew=vertical_skew,
        color_rgb=color_rgb,
        background_level=background_level,
        background_speckle=background_speckle,
    )


def judge_image(
    image: Any, value_range: tuple[float, float] | None = None, scale: float | None = None
) -> ShapeSpec | None:
    """Reads size, color, shape and position back from an image.

    Args:
        image (`PIL.Image.Image`, `np.ndarray` of shape `(H, W, 3)` or `torch.Tensor` of shape `(3, H, W)`):
            The image, of any size; see the module docstring for accepted dtypes and ranges.
        value_range (`tuple[float, float]`, *optional*): (low, high) of floating-point inputs; inferred when `None`.
        scale (`float`, *optional*): Frame pixels per image pixel; see `judge_image_details`.

    Returns:
        `ShapeSpec` or `None`: The attributes read back, or `None` when no shape is found.
    """
    result = judge_image_details(image, value_range, scale)
    return None if result is None else result.spec
