"""The built-in "captioned shapes" data set: tiny procedurally drawn images with exact captions.

Every image is 32x32 RGB (by default; see "Canvas" below) on a black background and holds one filled shape, drawn without anti-aliasing so that
every pixel is either black or exactly one palette colour. Its caption is

    ``a {size} {color} {shape} in the {position}``, e.g. ``a small red circle in the top left``.

Attributes (the order of each tuple/dict below is part of the format and never changes):

- size: ``small`` (8 px across), ``large`` (16 px across)
- color: ``red``, ``green``, ``blue``, ``yellow``, ``magenta``, ``cyan``, ``white``, ``orange`` (see ``COLORS``)
- shape: ``circle``, ``square``, ``triangle`` (pointing up)
- position: ``top left``, ``top right``, ``bottom left``, ``bottom right``, ``center``, with centres
  (8, 8), (24, 8), (8, 24), (24, 24), (16, 16) in (x, y) pixels; each sample is shifted by an integer jitter of
  at most 1 px per axis. A large shape in a corner that is jittered towards the border loses its outermost pixel
  row/column to the image edge.

Canvas: `draw_shape`, `shape_mask` and `load_shapes_dataset` also draw on a canvas of any ``height x width`` with both
sides at least `MIN_CANVAS_SIZE` (32) px, e.g. 32x48 or 48x32 for training at mixed aspect ratios. The shapes keep
their pixel sizes (8 / 16 px); the positions are relative to the canvas: the centres above are fractions (1/4, 1/2,
3/4) of the 32x32 canvas, and on a ``height x width`` canvas the centre ``(x, y)`` moves to ``(x * width / 32,
y * height / 32)``, rounded half up to whole pixels (`position_center`): on 32x48 (height x width) ``top right`` is
centred at (36, 8). The default 32x32 canvas draws exactly the images it always drew.

Geometry (pixel ``(x, y)`` is painted when its centre ``(x + 0.5, y + 0.5)`` lies inside the continuous shape; all
tests are done in integer arithmetic on doubled coordinates, so they are exact):

- square: side ``s`` -> ``s x s`` pixels (fill ratio of the bounding box 1.0).
- circle: diameter ``s`` -> 52 px (small) / 208 px (large) (fill ratio ~0.81).
- triangle: base ``s``, height ``s``, apex up; row widths grow 2, 2, 4, 4, ... up to ``s`` (40 / 144 px, fill
  ratio 0.625 / 0.5625), so its top half holds under a third of its pixels.

Held-out rule (compositional generalisation split, fixed forever): index every attribute by its position in the
tuples above (``size_i`` in 0..1, ``color_i`` in 0..7, ``shape_i`` in 0..2, ``position_i`` in 0..4). A combination is
held out iff

    ``(size_i + color_i + 2 * shape_i + position_i) % 5 == 0``.

For every (size, color, shape) exactly one position satisfies this, so exactly 48 of the 240 combinations (20%) are
held out: each size 24 times, each color 6 times, each shape 16 times and each position 9 or 10 times. Every single
attribute value, and every *pair* of attribute values, still appears in training; only the full 4-tuples of the
held-out captions are new.

Sampling: ``load_shapes_dataset`` draws sample ``i`` from a counter-based hash (SplitMix64) of ``(seed, i)``, not
from a library RNG, so the data set for a given seed is identical across NumPy/Python versions, and a smaller
``num_samples`` yields a prefix of a larger one. With several canvas sizes (``image_sizes``) the size of sample ``i``
comes from a second hash stream of the same seed (`sample_image_sizes`): every block of ``len(image_sizes)``
consecutive samples holds each size once, in a hashed order, so the sizes are split evenly and the combinations and
jitters are those drawn without sizes.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from .splits import SPLITS, split_combinations

IMAGE_SIZE: int = 32
"""Side of the default (square) canvas, in pixels."""

MIN_CANVAS_SIZE: int = IMAGE_SIZE
"""Smallest canvas side, in pixels: a large shape in a corner (centred a quarter of the side in) fits from 32 px on."""

MAX_JITTER: int = 1
"""Largest per-axis shift, in pixels, that ``load_shapes_dataset`` applies to a shape's centre."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
    "orange": (255, 128, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, int] = {"small": 8, "large": 16}
"""Size name -> extent in pixels (side of the square, diameter of the circle, base and height of the triangle)."""
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (8, 8),
    "top right": (24, 8),
    "bottom left": (8, 24),
    "bottom right": (24, 24),
    "center": (16, 16),
}
"""Position name -> (x, y) centre in pixels before jitter, on the default 32x32 canvas (see `position_center`)."""


_COLOR_NAMES = tuple(COLORS)
_SIZE_NAMES = tuple(SIZES)
_POSITION_NAMES = tuple(POSITIONS)


def normalize_caption(caption: str) -> str:
    """Lower-cases a caption, strips it and collapses runs of whitespace to one space.

    Args:
        caption (`str`): Any caption.

    Returns:
        `str`: The normalised caption.
    """
    return " ".join(caption.lower().split())


@dataclass(frozen=True)
class ShapeSpec:
    """The four attributes of one drawn shape.

    Args:
        size (`str`): One of `SIZES`.
        color (`str`): One of `COLORS`.
        shape (`str`): One of `SHAPES`.
        position (`str`): One of `POSITIONS`.
    """

    size: str
    color: str
    shape: str
    position: str

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("size", self.size, _SIZE_NAMES),
            ("color", self.color, _COLOR_NAMES),
            ("shape", self.shape, SHAPES),
            ("position", self.position, _POSITION_NAMES),
        ):
            if value not in allowed:
                raise ValueError(f"Unknown {name} {value!r}; expected one of {list(allowed)}.")

    @property
    def caption(self) -> str:
        """`str`: The caption, ``a {size} {color} {shape} in the {position}``."""
        return f"a {self.size} {self.color} {self.shape} in the {self.position}"

    @classmethod
    def from_caption(cls, caption: str) -> ShapeSpec:
        """Parses a caption of the form ``a {size} {color} {shape} in the {position}``.

        Case and surrounding/repeated whitespace are ignored (see `normalize_caption`); anything else must match.

        Args:
            caption (`str`): The caption to parse.

        Returns:
            `ShapeSpec`: The parsed attributes.

        Raises:
            ValueError: If the caption does not follow the format or names an unknown attribute value.
        """
        words = normalize_caption(caption).split(" ")
        if len(words) < 7 or words[0] != "a" or words[4:6] != ["in", "the"]:
            raise ValueError(
                f"Cannot parse caption {caption!r}: expected 'a {{size}} {{color}} {{shape}} in the {{position}}'."
            )
        try:
            return cls(size=words[1], color=words[2], shape=words[3], position=" ".join(words[6:]))
        except ValueError as err:
            raise ValueError(f"Cannot parse caption {caption!r}: {err}") from None

    def index(self) -> tuple[int, int, int, int]:
        """Returns the attribute indices ``(size_i, color_i, shape_i, position_i)`` used by the held-out rule.

        Returns:
            `tuple[int, int, int, int]`: Position of each attribute value in `SIZES`, `COLORS`, `SHAPES`, `POSITIONS`.
        """
        return (
            _SIZE_NAMES.index(self.size),
            _COLOR_NAMES.index(self.color),
            SHAPES.index(self.shape),
            _POSITION_NAMES.index(self.position),
        )

    @property
    def is_held_out(self) -> bool:
        """`bool`: Whether this combination is in the held-out split (see the module docstring for the rule)."""
        size_i, color_i, shape_i, position_i = self.index()
        return (size_i + color_i + 2 * shape_i + position_i) % 5 == 0


def all_combinations() -> list[ShapeSpec]:
    """Returns all 240 attribute combinations, sizes outermost, then colors, shapes and positions.

    Returns:
        `list[ShapeSpec]`: The combinations in a fixed order.
    """
    return list(_all_combinations())


@lru_cache(maxsize=1)
def _all_combinations() -> tuple[ShapeSpec, ...]:
    return tuple(
        ShapeSpec(size, color, shape, position)
        for size in _SIZE_NAMES
        for color in _COLOR_NAMES
        for shape in SHAPES
        for position in _POSITION_NAMES
    )


def _split_combinations(split: str) -> tuple[ShapeSpec, ...]:
    return split_combinations(_all_combinations(), split)


def train_captions() -> list[str]:
    """Returns the 192 captions of the training split, in `all_combinations` order.

    Returns:
        `list[str]`: Captions whose combination is not held out.
    """
    return [spec.caption for spec in _split_combinations("train")]


def held_out_captions() -> list[str]:
    """Returns the 48 held-out captions, in `all_combinations` order.

    Returns:
        `list[str]`: Captions that never appear in the training split.
    """
    return [spec.caption for spec in _split_combinations("held_out")]


def check_canvas_size(height: int, width: int) -> None:
    """Raises unless ``height x width`` is a canvas the shapes can be drawn on.

    Args:
        height (`int`): Canvas height in pixels.
        width (`int`): Canvas width in pixels.

    Raises:
        ValueError: If a side is not an integer of at least `MIN_CANVAS_SIZE`.
    """
    for name, side in (("height", height), ("width", width)):
        if isinstance(side, bool) or not isinstance(side, (int, np.integer)) or side < MIN_CANVAS_SIZE:
            raise ValueError(
                f"Canvas {name} must be an integer of at least {MIN_CANVAS_SIZE} px (the shapes keep their pixel "
                f"sizes, so a large one in a corner needs it), got {side!r}."
            )


def position_center(position: str, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> tuple[int, int]:
    """Returns the nominal centre of a position on a canvas: `POSITIONS` scaled by the canvas, rounded half up.

    Args:
        position (`str`): One of `POSITIONS`.
        height (`int`, *optional*, defaults to `IMAGE_SIZE`): Canvas height in pixels.
        width (`int`, *optional*, defaults to `IMAGE_SIZE`): Canvas width in pixels.

    Returns:
        `tuple[int, int]`: (x, y) centre in pixels before jitter; `POSITIONS[position]` on the 32x32 canvas.
    """
    x, y = POSITIONS[position]
    # floor(x * width / 32 + 1/2) in integers, so that no canvas size meets a float rounding edge.
    return (2 * x * width + IMAGE_SIZE) // (2 * IMAGE_SIZE), (2 * y * height + IMAGE_SIZE) // (2 * IMAGE_SIZE)


def shape_mask(
    spec: ShapeSpec, jitter: tuple[int, int] = (0, 0), height: int = IMAGE_SIZE, width: int = IMAGE_SIZE
) -> np.ndarray:
    """Returns the pixels covered by a shape.

    Args:
        spec (`ShapeSpec`): What to draw (the color is ignored).
        jitter (`tuple[int, int]`, *optional*, defaults to `(0, 0)`): Integer (dx, dy) shift of the centre in pixels.
        height (`int`, *optional*, defaults to `IMAGE_SIZE`): Canvas height in pixels (at least `MIN_CANVAS_SIZE`).
        width (`int`, *optional*, defaults to `IMAGE_SIZE`): Canvas width in pixels (at least `MIN_CANVAS_SIZE`).

    Returns:
        `np.ndarray`: Boolean mask of shape `(height, width)`, indexed `[y, x]`.
    """
    check_canvas_size(height, width)
    dx, dy = (int(j) for j in jitter)
    cx, cy = position_center(spec.position, height, width)
    extent = SIZES[spec.size]
    # Doubled coordinates of pixel centres relative to the shape centre: odd integers, so every test below is exact.
    u = (2 * np.arange(width) + 1 - 2 * (cx + dx))[None, :]
    v = (2 * np.arange(height) + 1 - 2 * (cy + dy))[:, None]
    if spec.shape == "square":
        return (np.abs(u) < extent) & (np.abs(v) < extent)
    if spec.shape == "circle":
        return u * u + v * v < extent * extent
    # Triangle, apex up: depth below the apex is t = (v + extent) / 2; a row reaches |u| / 2 <= (t + 0.5) / 2.
    return (np.abs(v) < extent) & (2 * np.abs(u) <= v + extent + 1)


def draw_shape(
    spec: ShapeSpec, jitter: tuple[int, int] = (0, 0), height: int = IMAGE_SIZE, width: int = IMAGE_SIZE
) -> Image.Image:
    """Draws one shape on a black background, without anti-aliasing.

    Args:
        spec (`ShapeSpec`): What to draw.
        jitter (`tuple[int, int]`, *optional*, defaults to `(0, 0)`): Integer (dx, dy) shift of the centre in pixels;
            pixels pushed past the border are dropped.
        height (`int`, *optional*, defaults to `IMAGE_SIZE`): Canvas height in pixels (at least `MIN_CANVAS_SIZE`).
        width (`int`, *optional*, defaults to `IMAGE_SIZE`): Canvas width in pixels (at least `MIN_CANVAS_SIZE`).

    Returns:
        `PIL.Image.Image`: An RGB image of `height` x `width` pixels (PIL's `size` is `(width, height)`).
    """
    mask = shape_mask(spec, jitter, height, width)
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[mask] = COLORS[spec.color]
    return Image.fromarray(pixels)


_NUM_IMAGES_PER_CANVAS = len(SIZES) * len(COLORS) * len(SHAPES) * len(POSITIONS) * (2 * MAX_JITTER + 1) ** 2


@lru_cache(maxsize=16 * _NUM_IMAGES_PER_CANVAS)
def _png_bytes(spec: ShapeSpec, jitter: tuple[int, int], height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> bytes:
    # Only 240 x 9 distinct images exist per canvas, so caching their PNG encodings makes large data sets nearly free
    # to build (room for 16 canvas sizes).
    buffer = io.BytesIO()
    draw_shape(spec, jitter, height, width).save(buffer, format="PNG")
    return buffer.getvalue()


_U64 = np.uint64


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # SplitMix64 finaliser: a fixed, well-mixed 64-bit hash we own, so sampling never changes with library versions.
    with np.errstate(over="ignore"):
        z = x + _U64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        return z ^ (z >> _U64(31))


def _sample_draws(seed: int, num_samples: int) -> np.ndarray:
    key = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    counters = np.arange(3 * num_samples, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _splitmix64(counters + key).reshape(num_samples, 3)


def sample_specs(
    split: str = "train", num_samples: int = 10_000, seed: int = 0
) -> list[tuple[ShapeSpec, tuple[int, int]]]:
    """Draws combinations of a split uniformly (with replacement) and a jitter for each, deterministically.

    Args:
        split (`str`, *optional*, defaults to `"train"`): `"train"` (192 combinations), `"held_out"` (48) or `"all"`.
        num_samples (`int`, *optional*, defaults to 10000): How many samples to draw.
        seed (`int`, *optional*, defaults to 0): Sample `i` depends only on `(seed, i)`.

    Returns:
        `list[tuple[ShapeSpec, tuple[int, int]]]`: `num_samples` pairs of (combination, (dx, dy) jitter).

    Raises:
        ValueError: If `split` is unknown or `num_samples` is negative.
    """
    combinations = _split_combinations(split)
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}.")
    draws = _sample_draws(int(seed), int(num_samples))
    # 2**64 modulo 240 leaves a bias of ~1e-17: uniform for every practical purpose.
    choice = (draws[:, 0] % _U64(len(combinations))).astype(np.int64)
    jitter = (draws[:, 1:] % _U64(2 * MAX_JITTER + 1)).astype(np.int64) - MAX_JITTER
    return [
        (combinations[c], (int(dx), int(dy))) for c, (dx, dy) in zip(choice.tolist(), jitter.tolist(), strict=True)
    ]


_SIZE_STREAM = _U64(0xD1B54A32D192ED03)
"""Salt of the hash stream that picks canvas sizes, apart from the stream of combinations and jitters."""


def sample_image_sizes(
    image_sizes: Sequence[tuple[int, int]], num_samples: int = 10_000, seed: int = 0
) -> list[tuple[int, int]]:
    """Picks a canvas size for each sample, deterministically and split evenly.

    Every block of `len(image_sizes)` consecutive samples gets each size once, in an order hashed from `(seed,
    block)`: the sizes are as even as they can be in every prefix, and sample `i` depends only on `(seed, i)`.

    Args:
        image_sizes (`Sequence[tuple[int, int]]`): The canvas sizes, each `(height, width)` in pixels.
        num_samples (`int`, *optional*, defaults to 10000): How many samples.
        seed (`int`, *optional*, defaults to 0): The seed of `sample_specs`; its size stream is a separate one.

    Returns:
        `list[tuple[int, int]]`: The `(height, width)` of each sample.

    Raises:
        ValueError: If `image_sizes` is empty or holds a canvas the shapes cannot be drawn on, or `num_samples` is
            negative.
    """
    sizes = [tuple(size) for size in image_sizes]
    if not sizes:
        raise ValueError("image_sizes is empty: give at least one (height, width).")
    for size in sizes:
        if len(size) != 2:
            raise ValueError(f"Each of image_sizes is a (height, width) pair, got {size!r}.")
        check_canvas_size(*size)
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}.")
    num_sizes = len(sizes)
    num_blocks = -(-int(num_samples) // num_sizes)
    key = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        draws = _splitmix64(np.arange(num_blocks * num_sizes, dtype=np.uint64) + _splitmix64(key ^ _SIZE_STREAM))
    # Sorting a block's hashes gives a uniformly random permutation of the sizes for that block.
    order = np.argsort(draws.reshape(num_blocks, num_sizes), axis=1, kind="stable").reshape(-1)[:num_samples]
    return [(int(sizes[i][0]), int(sizes[i][1])) for i in order.tolist()]


def load_shapes_dataset(
    split: str = "train",
    num_samples: int = 10_000,
    seed: int = 0,
    image_sizes: Sequence[tuple[int, int]] | None = None,
) -> Dataset:
    """Builds the captioned-shapes data set.

    Args:
        split (`str`, *optional*, defaults to `"train"`): `"train"` (192 combinations), `"held_out"` (48) or `"all"`.
        num_samples (`int`, *optional*, defaults to 10000): Number of rows.
        seed (`int`, *optional*, defaults to 0): Fixes which combination, jitter (and canvas size) each row gets.
        image_sizes (`Sequence[tuple[int, int]]`, *optional*): Canvas sizes `(height, width)`, each side at least
            `MIN_CANVAS_SIZE`; each row gets one of them (`sample_image_sizes`), so the images are of mixed sizes.
            The combinations and jitters stay those drawn without it. Defaults to the 32x32 canvas.

    Returns:
        `datasets.Dataset`: Columns `image` (`datasets.Image`, decoded to an RGB `PIL.Image.Image`, 32x32 unless
        `image_sizes` is given) and `text` (the caption).

    Raises:
        ValueError: If `split` is unknown, `num_samples` is negative or a canvas size is too small.
    """
    samples = sample_specs(split, num_samples, seed)
    canvases = (
        [(IMAGE_SIZE, IMAGE_SIZE)] * len(samples)
        if image_sizes is None
        else sample_image_sizes(image_sizes, num_samples, seed)
    )
    features = Features({"image": ImageFeature(), "text": Value("string")})
    return Dataset.from_dict(
        {
            "image": [
                {"bytes": _png_bytes(spec, jitter, *canvas), "path": None}
                for (spec, jitter), canvas in zip(samples, canvases, strict=True)
            ],
            "text": [spec.caption for spec, _ in samples],
        },
        features=features,
    )


__all__ = [
    "COLORS",
    "IMAGE_SIZE",
    "MAX_JITTER",
    "MIN_CANVAS_SIZE",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "ShapeSpec",
    "all_combinations",
    "check_canvas_size",
    "draw_shape",
    "held_out_captions",
    "load_shapes_dataset",
    "normalize_caption",
    "position_center",
    "sample_image_sizes",
    "sample_specs",
    "shape_mask",
    "train_captions",
]
