"""The built-in "glyphs" data set: characters rendered from TrueType fonts, with smooth, natural-looking statistics.

Where the captioned shapes (`transfusion_hf.data.shapes`) are flat, aliased and palette-exact, every glyph image is
anti-aliased, blurred, shaded and noisy, so a model that only learns the mean image, or tiles its output from
independent 8x8 patches, shows it (see `transfusion_hf.evaluation.glyph_judge` and `.image_quality`).

Every image is ``resolution x resolution`` RGB (32 by default) and shows one character. Its caption is

    ``a {color} letter {character} on a {background} background``  (for the letters) or
    ``a {color} digit {character} on a {background} background``   (for the digits),

e.g. ``a red letter A on a blue background`` or ``a green digit 7 on a yellow background``.

Attributes (the order of each tuple below is part of the format and never changes):

- character: ``A E H K O R S T 4 7`` (``CHARACTERS``): upper-case letters and digits that stay distinct at 32 px
  under the jitter below (no ``O``/``0``, ``S``/``5``, ``I``/``1`` or ``M``/``W`` pairs).
- color (foreground): ``red``, ``green``, ``blue``, ``yellow``, ``white``, ``black`` (``FOREGROUND_COLORS``).
- background: ``blue``, ``yellow``, ``white``, ``black`` (``BACKGROUND_COLORS``); never the foreground colour.

That makes 10 x (6 x 4 - 4) = 200 combinations.

Rendering (all lengths scale with the resolution; ranges are uniform unless said otherwise):

- font: one of the DejaVu faces found on the machine (Sans, Sans Bold, Sans Condensed Bold, Serif, Serif Bold,
  Sans Mono, Sans Mono Bold); when none is found, PIL's built-in ``ImageFont.load_default(size=...)`` (logged once).
- the character is drawn (anti-aliased by FreeType) on a canvas 4x the resolution, with a stroke of 0 to 3.5 % of
  the canvas (thin to bold strokes), then warped by one affine map: rotation +-18 deg, scale 0.8-1.1, horizontal
  shear +-0.25, translation +-8 % per axis (sampled at 2x the resolution); then box-downsampled and
  gaussian-blurred (sigma 0.25-0.85 px at 32 px).
- background: the palette colour shaded towards black or white by a linear gradient in a random direction (up to
  28 %), plus a faint random tint (up to 8 %); foreground: the palette colour with its own, weaker (up to 15 %)
  shading gradient.
- pixel noise: gaussian, sigma 1.5-5 on the [0, 255] scale.

Held-out rule (compositional generalisation split, fixed forever): index the character in ``CHARACTERS``
(``char_i`` in 0..9), the colour in ``FOREGROUND_COLORS`` (``color_i`` in 0..5) and the background in
``BACKGROUND_COLORS`` (``background_i`` in 0..3). A combination is held out iff

    ``(char_i + 2 * color_i + background_i) % 5 == 0``.

For every (color, background) pair exactly two characters satisfy this, so exactly 40 of the 200 combinations (20%)
are held out: every colour pair twice, every character 3 to 5 times. Every single attribute value, and every *pair*
of attribute values, still appears in training; only the full triples of the held-out captions are new.

Sampling: row ``i`` of ``load_glyphs_dataset`` is drawn by its own ``numpy.random.default_rng([seed, i])``, so it
depends only on ``(seed, i)`` and a smaller ``num_samples`` yields a prefix of a larger one. Pixels are identical
for the same seed, fonts and Pillow/FreeType versions (a different rasteriser may move anti-aliased edges by a
level or two).
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .shapes import normalize_caption
from .splits import SPLITS, split_combinations

logger = logging.getLogger(__name__)

IMAGE_SIZE: int = 32
"""Default side of every image, in pixels."""

RENDER_VERSION: str = "1"
"""Bump whenever rendering changes (anything that moves pixels for a given seed), so that caches derived from renders,
such as the glyph judge's weights, are rebuilt."""

CHARACTERS: tuple[str, ...] = ("A", "E", "H", "K", "O", "R", "S", "T", "4", "7")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 35),
    "green": (45, 170, 70),
    "blue": (40, 85, 215),
    "yellow": (240, 205, 45),
    "white": (240, 240, 235),
    "black": (25, 25, 30),
}
"""Colour name -> palette RGB. Slightly muted rather than pure primaries, like paint rather than a test pattern."""
FOREGROUND_COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "white", "black")
BACKGROUND_COLORS: tuple[str, ...] = ("blue", "yellow", "white", "black")

FONT_DIRS: tuple[str, ...] = (
    "/usr/share/fonts/truetype/dejavu",
    "/usr/share/fonts/dejavu",
    "/usr/share/fonts/TTF",
    "/usr/share/fonts/truetype",
    "/usr/local/share/fonts",
    "/Library/Fonts",
    "C:/Windows/Fonts",
)
"""Where `available_fonts` looks for the ``FONT_FILES``, in this order; ``$TRANSFUSION_HF_FONT_DIR`` goes first."""
FONT_FILES: tuple[str, ...] = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSansCondensed-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
)

SUPERSAMPLING: int = 4
"""The character is drawn at this multiple of the resolution, warped at half of it, then box-downsampled."""
_FONT_SIZE = 0.72  # em size as a share of the canvas: a cap height of about half the image before scaling

_KIND = {character: "digit" if character.isdigit() else "letter" for character in CHARACTERS}


@dataclass(frozen=True)
class GlyphSpec:
    """What one glyph image shows.

    Args:
        character (`str`): One of `CHARACTERS` (upper case).
        color (`str`): Foreground colour, one of `FOREGROUND_COLORS`.
        background (`str`): Background colour, one of `BACKGROUND_COLORS`; never equal to `color`.
    """

    character: str
    color: str
    background: str

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("character", self.character, CHARACTERS),
            ("color", self.color, FOREGROUND_COLORS),
            ("background", self.background, BACKGROUND_COLORS),
        ):
            if value not in allowed:
                raise ValueError(f"Unknown {name} {value!r}; expected one of {list(allowed)}.")
        if self.color == self.background:
            raise ValueError(f"color {self.color!r} equals background {self.background!r}; the glyph would vanish.")

    @property
    def kind(self) -> str:
        """`str`: ``"letter"`` or ``"digit"``."""
        return _KIND[self.character]

    @property
    def caption(self) -> str:
        """`str`: The caption, ``a {color} {letter|digit} {character} on a {background} background``."""
        return f"a {self.color} {self.kind} {self.character} on a {self.background} background"

    @classmethod
    def from_caption(cls, caption: str) -> GlyphSpec:
        """Parses a caption of the form ``a {color} {letter|digit} {character} on a {background} background``.

        Case and surrounding/repeated whitespace are ignored (the character is unambiguous in either case, as every
        character of `CHARACTERS` is upper case or a digit); the kind word must match the character.

        Args:
            caption (`str`): The caption to parse.

        Returns:
            `GlyphSpec`: The parsed attributes.

        Raises:
            ValueError: If the caption does not follow the format or names an unknown attribute value.
        """
        words = normalize_caption(caption).split(" ")
        if len(words) != 8 or words[0] != "a" or words[4:6] != ["on", "a"] or words[7] != "background":
            raise ValueError(
                f"Cannot parse caption {caption!r}: expected "
                "'a {color} {letter|digit} {character} on a {background} background'."
            )
        try:
            spec = cls(character=words[3].upper(), color=words[1], background=words[6])
        except ValueError as err:
            raise ValueError(f"Cannot parse caption {caption!r}: {err}") from None
        if words[2] != spec.kind:
            raise ValueError(
                f"Cannot parse caption {caption!r}: kind {words[2]!r} but {spec.character!r} is a {spec.kind}."
            )
        return spec

    def index(self) -> tuple[int, int, int]:
        """Returns ``(char_i, color_i, background_i)``, the indices used by the held-out rule.

        Returns:
            `tuple[int, int, int]`: Position of each value in `CHARACTERS`, `FOREGROUND_COLORS`, `BACKGROUND_COLORS`.
        """
        return (
            CHARACTERS.index(self.character),
            FOREGROUND_COLORS.index(self.color),
            BACKGROUND_COLORS.index(self.background),
        )

    @property
    def is_held_out(self) -> bool:
        """`bool`: Whether this combination is in the held-out split (see the module docstring for the rule)."""
        char_i, color_i, background_i = self.index()
        return (char_i + 2 * color_i + background_i) % 5 == 0


@lru_cache(maxsize=1)
def _all_combinations() -> tuple[GlyphSpec, ...]:
    return tuple(
        GlyphSpec(character, color, background)
        for character in CHARACTERS
        for color in FOREGROUND_COLORS
        for background in BACKGROUND_COLORS
        if color != background
    )


def all_combinations() -> list[GlyphSpec]:
    """Returns all 200 combinations, characters outermost, then colours and backgrounds (skipping equal colours).

    Returns:
        `list[GlyphSpec]`: The combinations in a fixed order.
    """
    return list(_all_combinations())


def _split_combinations(split: str) -> tuple[GlyphSpec, ...]:
    return split_combinations(_all_combinations(), split)


def train_captions() -> list[str]:
    """Returns the 160 captions of the training split, in `all_combinations` order.

    Returns:
        `list[str]`: Captions whose combination is not held out.
    """
    return [spec.caption for spec in _split_combinations("train")]


def held_out_captions() -> list[str]:
    """Returns the 40 held-out captions, in `all_combinations` order.

    Returns:
        `list[str]`: Captions that never appear in the training split.
    """
    return [spec.caption for spec in _split_combinations("held_out")]


# ------------------------------------------------------------------------------------------------------ fonts


@lru_cache(maxsize=1)
def available_fonts() -> tuple[str, ...]:
    """Finds the TrueType faces used for rendering.

    Each of `FONT_FILES` is looked up in ``$TRANSFUSION_HF_FONT_DIR`` (when set) and then `FONT_DIRS`; the first hit
    per file wins. An empty result means PIL's built-in font is used instead (a warning is logged once).

    Returns:
        `tuple[str, ...]`: Paths of the faces found, in `FONT_FILES` order.
    """
    directories = [os.environ["TRANSFUSION_HF_FONT_DIR"]] if os.environ.get("TRANSFUSION_HF_FONT_DIR") else []
    directories += FONT_DIRS
    found = []
    for name in FONT_FILES:
        for directory in directories:
            path = Path(directory) / name
            if path.is_file():
                found.append(str(path))
                break
    if not found:
        logger.warning(
            "No DejaVu TrueType font found in %s: rendering glyphs with PIL's built-in font "
            "(ImageFont.load_default); images differ from those of a machine with DejaVu fonts.",
            directories,
        )
    return tuple(found)


def font_signature() -> str:
    """Names the fonts in use, so that anything derived from renders (e.g. a cached judge) can be keyed by it.

    Returns:
        `str`: The comma-joined file names of `available_fonts`, or ``"pil-default"``.
    """
    fonts = available_fonts()
    return ",".join(Path(path).name for path in fonts) if fonts else "pil-default"


@lru_cache(maxsize=64)
def _font(index: int, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    fonts = available_fonts()
    if not fonts:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(fonts[index], size=size)


# --------------------------------------------------------------------------------------------------- rendering


def _check_resolution(resolution: int) -> int:
    if not isinstance(resolution, (int, np.integer)) or resolution < 8:
        raise ValueError(f"resolution must be an integer >= 8, got {resolution!r}.")
    return int(resolution)


@lru_cache(maxsize=1024)
def _upright(character: str, font_index: int, stroke: int, canvas_size: int) -> Image.Image:
    # Only a few hundred (character, font, stroke) canvases exist per resolution: caching them skips FreeType for
    # most rows. Callers must not modify the returned image (`transform` below makes a new one).
    canvas = Image.new("L", (canvas_size, canvas_size), 0)
    centre = canvas_size / 2
    font = _font(font_index, round(_FONT_SIZE * canvas_size))
    ImageDraw.Draw(canvas).text(
        (centre, centre), character, fill=255, font=font, anchor="mm", stroke_width=stroke, stroke_fill=255
    )
    return canvas


def _coverage(character: str, rng: np.random.Generator, resolution: int) -> np.ndarray:
    """The character's soft coverage in [0, 1], shape `(resolution, resolution)`: drawn, warped, downsampled, blurred."""
    canvas_size = resolution * SUPERSAMPLING
    font_index = int(rng.integers(max(len(available_fonts()), 1)))
    stroke = int(round(rng.uniform(0.0, 0.035) * canvas_size))
    canvas = _upright(character, font_index, stroke, canvas_size)
    centre = canvas_size / 2
    # One affine map about the canvas centre: output point p comes from input point A^-1 (p - c - t) + c, which is
    # the inverse map PIL's transform expects. Rotation, then shear and scale, all about the centre.
    angle = math.radians(rng.uniform(-18.0, 18.0))
    scale = rng.uniform(0.8, 1.1)
    shear = rng.uniform(-0.25, 0.25)
    shift = rng.uniform(-0.08, 0.08, size=2) * canvas_size
    cos, sin = math.cos(angle), math.sin(angle)
    forward = scale * np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, shear], [0.0, 1.0]])
    inverse = np.linalg.inv(forward)
    offset = np.array([centre, centre]) - inverse @ (np.array([centre, centre]) + shift)
    # The warp writes a canvas of half the side (a quarter of the pixels, the costliest step), each output pixel
    # sampling the drawn canvas at twice its coordinates; the box filter below then averages 2x2 of them.
    k = 2.0
    coefficients = (k * inverse[0, 0], k * inverse[0, 1], offset[0], k * inverse[1, 0], k * inverse[1, 1], offset[1])
    warped_size = (canvas_size // 2, canvas_size // 2)
    warped = canvas.transform(warped_size, Image.Transform.AFFINE, coefficients, resample=Image.Resampling.BILINEAR)
    small = warped.resize((resolution, resolution), Image.Resampling.BOX)
    sigma = rng.uniform(0.25, 0.85) * resolution / IMAGE_SIZE
    small = small.filter(ImageFilter.GaussianBlur(radius=sigma))
    return np.asarray(small, dtype=np.float32) / 255.0


@lru_cache(maxsize=8)
def _pixel_coordinates(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution - 0.5
    return coords[None, :, None], coords[:, None, None]


def _gradient(rng: np.random.Generator, resolution: int) -> np.ndarray:
    """A linear ramp in a random direction over the image, from 0 at one side to 1 at the other, `(res, res, 1)`."""
    angle = rng.uniform(0.0, 2.0 * math.pi)
    cos, sin = math.cos(angle), math.sin(angle)
    xs, ys = _pixel_coordinates(resolution)
    # Pixel centres span +-(res - 1) / (2 res) per axis, so the ramp spans +-half_range: map that onto [0, 1].
    half_range = (abs(cos) + abs(sin)) * (resolution - 1) / (2 * resolution)
    return (cos * xs + sin * ys) * np.float32(0.5 / half_range) + np.float32(0.5)


def _shaded(color: str, rng: np.random.Generator, resolution: int, strength: float, tint: float) -> np.ndarray:
    """The palette colour shaded towards black or white along a gradient (plus a faint tint), `(res, res, 3)`."""
    base = np.array(COLORS[color], dtype=np.float32)
    if tint > 0:
        base = (1.0 - tint) * base + tint * rng.uniform(0.0, 255.0, size=3).astype(np.float32)
    target = np.float32(255.0 if rng.random() < 0.5 else 0.0)
    amount = np.float32(rng.uniform(0.0, strength)) * _gradient(rng, resolution)
    return base[None, None, :] * (1.0 - amount) + target * amount


def render_glyph(spec: GlyphSpec, rng: np.random.Generator, resolution: int = IMAGE_SIZE) -> np.ndarray:
    """Renders one glyph as a pixel array (see the module docstring for what is randomised).

    Args:
        spec (`GlyphSpec`): What to draw.
        rng (`numpy.random.Generator`): Source of every random choice (font, warp, blur, shading, noise).
        resolution (`int`, *optional*, defaults to 32): Side of the image, in pixels.

    Returns:
        `np.ndarray`: `uint8` array of shape `(resolution, resolution, 3)`.

    Raises:
        ValueError: If `resolution` is not an integer >= 8.
    """
    resolution = _check_resolution(resolution)
    coverage = _coverage(spec.character, rng, resolution)[:, :, None]
    background = _shaded(spec.background, rng, resolution, strength=0.28, tint=float(rng.uniform(0.0, 0.08)))
    foreground = _shaded(spec.color, rng, resolution, strength=0.15, tint=0.0)
    pixels = background * (1.0 - coverage) + foreground * coverage
    pixels += rng.normal(0.0, rng.uniform(1.5, 5.0), size=pixels.shape).astype(np.float32)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def draw_glyph(
    spec: GlyphSpec, rng: np.random.Generator | int | None = None, resolution: int = IMAGE_SIZE
) -> Image.Image:
    """Renders one glyph as a PIL image.

    Args:
        spec (`GlyphSpec`): What to draw.
        rng (`numpy.random.Generator` or `int`, *optional*): Source of the random rendering choices, or a seed for
            `numpy.random.default_rng`; `None` draws fresh entropy.
        resolution (`int`, *optional*, defaults to 32): Side of the image, in pixels.

    Returns:
        `PIL.Image.Image`: An RGB image of size `(resolution, resolution)`.
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    return Image.fromarray(render_glyph(spec, rng, resolution))


def _sample_row(seed: int, index: int) -> tuple[np.random.Generator, int]:
    # One generator per row keyed by (seed, row): rows are independent of how many are drawn and of their order.
    # Its first draw picks the combination (modulo the split's size, a bias of ~1e-17), always over the same range,
    # so the rendering randomness that follows is the same whichever split, or explicit spec, the row gets.
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, index])
    return rng, int(rng.integers(2**62))


def _check_num_samples(num_samples: int) -> int:
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}.")
    return int(num_samples)


def sample_specs(split: str = "train", num_samples: int = 10_000, seed: int = 0) -> list[GlyphSpec]:
    """The combinations that `load_glyphs_dataset` / `render_glyphs` draw for these arguments, without rendering.

    Args:
        split (`str`, *optional*, defaults to `"train"`): `"train"` (160 combinations), `"held_out"` (40) or `"all"`.
        num_samples (`int`, *optional*, defaults to 10000): How many rows.
        seed (`int`, *optional*, defaults to 0): Row `i` depends only on `(seed, i)`.

    Returns:
        `list[GlyphSpec]`: One combination per row, drawn uniformly with replacement.

    Raises:
        ValueError: If `split` is unknown or `num_samples` is negative.
    """
    combinations = _split_combinations(split)
    return [combinations[_sample_row(seed, i)[1] % len(combinations)] for i in range(_check_num_samples(num_samples))]


def render_glyphs(
    split: str = "train",
    num_samples: int = 10_000,
    seed: int = 0,
    resolution: int = IMAGE_SIZE,
    specs: Sequence[GlyphSpec] | None = None,
) -> tuple[list[GlyphSpec], np.ndarray]:
    """Renders rows of the glyphs data set straight to one array (no PNG round trip), e.g. to train a judge.

    Args:
        split (`str`, *optional*, defaults to `"train"`): `"train"`, `"held_out"` or `"all"`; ignored with `specs`.
        num_samples (`int`, *optional*, defaults to 10000): Number of rows; ignored with `specs`.
        seed (`int`, *optional*, defaults to 0): Row `i` depends only on `(seed, i)`.
        resolution (`int`, *optional*, defaults to 32): Side of every image, in pixels.
        specs (`Sequence[GlyphSpec]`, *optional*): Render exactly these combinations (row `i` still uses the
            rendering randomness of `(seed, i)`) instead of drawing them.

    Returns:
        `tuple[list[GlyphSpec], np.ndarray]`: The combinations and a `uint8` array of shape
        `(num_rows, resolution, resolution, 3)`.

    Raises:
        ValueError: If `split` is unknown, `num_samples` is negative or `resolution` is invalid.
    """
    resolution = _check_resolution(resolution)
    if specs is None:
        combinations = _split_combinations(split)
        count = _check_num_samples(num_samples)
    else:
        specs = list(specs)
        count = len(specs)
    chosen: list[GlyphSpec] = []
    pixels = np.empty((count, resolution, resolution, 3), dtype=np.uint8)
    for i in range(count):
        rng, drawn = _sample_row(seed, i)
        spec = specs[i] if specs is not None else combinations[drawn % len(combinations)]
        chosen.append(spec)
        pixels[i] = render_glyph(spec, rng, resolution)
    return chosen, pixels


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # compress_level=0 (stored): the images are noisy, so compressing only shrinks them from ~3.2 to ~2.1 kB (at 32
    # px) and would be the slowest step of building the data set after the rendering itself.
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def load_glyphs_dataset(
    split: str = "train", num_samples: int = 10_000, seed: int = 0, resolution: int = IMAGE_SIZE
) -> Dataset:
    """Builds the glyphs data set.

    Args:
        split (`str`, *optional*, defaults to `"train"`): `"train"` (160 combinations), `"held_out"` (40) or `"all"`.
        num_samples (`int`, *optional*, defaults to 10000): Number of rows.
        seed (`int`, *optional*, defaults to 0): Fixes which combination and rendering each row gets.
        resolution (`int`, *optional*, defaults to 32): Side of every image, in pixels.

    Returns:
        `datasets.Dataset`: Columns `image` (`datasets.Image`, decoded to a `resolution x resolution` RGB
        `PIL.Image.Image`) and `text` (the caption).

    Raises:
        ValueError: If `split` is unknown, `num_samples` is negative or `resolution` is invalid.
    """
    specs, pixels = render_glyphs(split, num_samples, seed, resolution)
    features = Features({"image": ImageFeature(), "text": Value("string")})
    return Dataset.from_dict(
        {
            "image": [{"bytes": _png_bytes(image), "path": None} for image in pixels],
            "text": [spec.caption for spec in specs],
        },
        features=features,
    )


__all__ = [
    "BACKGROUND_COLORS",
    "CHARACTERS",
    "COLORS",
    "FONT_DIRS",
    "FONT_FILES",
    "FOREGROUND_COLORS",
    "IMAGE_SIZE",
    "RENDER_VERSION",
    "SPLITS",
    "GlyphSpec",
    "all_combinations",
    "available_fonts",
    "draw_glyph",
    "font_signature",
    "held_out_captions",
    "load_glyphs_dataset",
    "render_glyph",
    "render_glyphs",
    "sample_specs",
    "train_captions",
]
