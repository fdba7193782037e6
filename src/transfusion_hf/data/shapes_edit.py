"""The built-in image-editing task on the captioned shapes: (source image, instruction, target image) triples.

An edit changes exactly one attribute of the source's shape to another value and keeps the other three (and the
jitter, so the target is the source redrawn with one attribute changed):

- ``position``: ``move it to the {position}``, e.g. ``move it to the top left``;
- ``color``: ``make it {color}``, e.g. ``make it red``;
- ``size``: ``make it {size}``, i.e. ``make it large`` for a small shape, ``make it small`` for a large one.

There are 240 sources x (4 positions + 7 colours + 1 size) = 2,880 edits. The shape itself is never edited: it is the
attribute every held-out rule below keys on.

Held-out rule (fixed forever). An edit is keyed by (kind, new value, one attribute of the source, the source's
shape), with every attribute indexed by its position in `shapes` (`size_i`, `color_i`, `shape_i`, `position_i`):
the source attribute is its colour for position and size edits and its position for colour edits. The edit is held
out iff

    ``(new_value_i + source_attribute_i + 2 * source_shape_i) % 5 == 0``.

So an instruction is held out for some (source attribute, shape) contexts only: every instruction, every source
attribute value and every target value still appears in training, only these pairings are new; about a fifth of the
edits of each kind are held out (position 20%, colour 20%, size 20%). The training split also never shows a source
or a target whose full combination the shapes data set holds out (`ShapeSpec.is_held_out`), so the shapes' held-out
captions stay unseen; the held-out split takes its sources and targets from all 240 combinations.

Sampling is deterministic like `shapes.sample_specs` (SplitMix64 of `(seed, i)`, on its own salted stream): the kind
of sample `i` is uniform over the three kinds, then the edit uniform over the split's edits of that kind, then the
jitter (shared by source and target).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
from datasets import Dataset, Features, List, Value
from datasets import Image as ImageFeature

from .shapes import COLORS, MAX_JITTER, POSITIONS, SIZES, ShapeSpec, _png_bytes, _splitmix64, all_combinations
from .splits import SPLITS

EDIT_KINDS: tuple[str, ...] = ("position", "color", "size")
"""The edited attribute of each kind, in a fixed order."""

_VALUES = {"position": tuple(POSITIONS), "color": tuple(COLORS), "size": tuple(SIZES)}
_EDIT_STREAM = np.uint64(0x8CB92BA72F3D8DD7)
"""Salt of the edits' hash stream, apart from the shapes' streams."""


def edit_instruction(kind: str, value: str) -> str:
    """The instruction of an edit that sets attribute `kind` to `value`.

    Args:
        kind (`str`): one of `EDIT_KINDS`.
        value (`str`): the new value, one of that attribute's values.

    Returns:
        `str`: ``move it to the {value}`` or ``make it {value}``.
    """
    if kind not in EDIT_KINDS or value not in _VALUES[kind]:
        raise ValueError(f"Unknown edit {kind}={value!r}; kinds {list(EDIT_KINDS)}, values {_VALUES.get(kind)}.")
    return f"move it to the {value}" if kind == "position" else f"make it {value}"


@dataclass(frozen=True)
class ShapeEdit:
    """One edit of a drawn shape.

    Args:
        source (`ShapeSpec`): the shape before the edit.
        kind (`str`): the edited attribute, one of `EDIT_KINDS`.
        value (`str`): its new value (different from the source's).
    """

    source: ShapeSpec
    kind: str
    value: str

    def __post_init__(self) -> None:
        edit_instruction(self.kind, self.value)  # validates kind and value
        if getattr(self.source, self.kind) == self.value:
            raise ValueError(f"An edit must change the {self.kind}; the source already has {self.value!r}.")

    @property
    def target(self) -> ShapeSpec:
        """`ShapeSpec`: the source with the edited attribute set to its new value."""
        return replace(self.source, **{self.kind: self.value})

    @property
    def instruction(self) -> str:
        """`str`: the instruction (see `edit_instruction`)."""
        return edit_instruction(self.kind, self.value)

    @property
    def is_held_out(self) -> bool:
        """`bool`: whether the (instruction, source context) pairing is held out (rule in the module docstring)."""
        size_i, color_i, shape_i, position_i = self.source.index()
        context = position_i if self.kind == "color" else color_i
        return (_VALUES[self.kind].index(self.value) + context + 2 * shape_i) % 5 == 0


@lru_cache(maxsize=1)
def _all_edits() -> tuple[ShapeEdit, ...]:
    return tuple(
        ShapeEdit(source, kind, value)
        for source in all_combinations()
        for kind in EDIT_KINDS
        for value in _VALUES[kind]
        if getattr(source, kind) != value
    )


@lru_cache(maxsize=len(SPLITS))
def _split_edits(split: str) -> dict[str, tuple[ShapeEdit, ...]]:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {list(SPLITS)}.")
    if split == "all":
        edits = _all_edits()
    elif split == "held_out":
        edits = tuple(edit for edit in _all_edits() if edit.is_held_out)
    else:
        edits = tuple(
            edit
            for edit in _all_edits()
            if not edit.is_held_out and not edit.source.is_held_out and not edit.target.is_held_out
        )
    return {kind: tuple(edit for edit in edits if edit.kind == kind) for kind in EDIT_KINDS}


def split_edits(split: str = "train") -> list[ShapeEdit]:
    """Every edit of a split, by kind (`EDIT_KINDS` order), then in `shapes.all_combinations` order of the source.

    Args:
        split (`str`, *optional*, defaults to `"train"`): `"train"`, `"held_out"` or `"all"`.
    """
    return [edit for edits in _split_edits(split).values() for edit in edits]


def sample_edits(
    split: str = "train", num_samples: int = 10_000, seed: int = 0
) -> list[tuple[ShapeEdit, tuple[int, int]]]:
    """Draw edits of a split (kind uniform, then edit uniform within the kind) and a jitter for each, deterministically.

    Args:
        split (`str`, *optional*, defaults to `"train"`): `"train"`, `"held_out"` or `"all"`.
        num_samples (`int`, *optional*, defaults to 10000): how many.
        seed (`int`, *optional*, defaults to 0): sample `i` depends only on `(seed, i)`; a smaller `num_samples`
            gives a prefix of a larger one.

    Returns:
        `list[tuple[ShapeEdit, tuple[int, int]]]`: the edits and their (dx, dy) jitters (source and target share it).
    """
    by_kind = _split_edits(split)
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}.")
    key = _splitmix64(np.array([int(seed) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) ^ _EDIT_STREAM)[0]
    with np.errstate(over="ignore"):
        draws = _splitmix64(np.arange(4 * int(num_samples), dtype=np.uint64) + key).reshape(-1, 4)
    samples = []
    for kind_draw, edit_draw, dx, dy in draws.tolist():
        edits = by_kind[EDIT_KINDS[kind_draw % len(EDIT_KINDS)]]
        jitter = (dx % (2 * MAX_JITTER + 1) - MAX_JITTER, dy % (2 * MAX_JITTER + 1) - MAX_JITTER)
        samples.append((edits[edit_draw % len(edits)], jitter))
    return samples


def load_shapes_edit_dataset(split: str = "train", num_samples: int = 10_000, seed: int = 0) -> Dataset:
    """Build the shapes editing data set (32x32 images).

    Args:
        split (`str`, *optional*, defaults to `"train"`): `"train"`, `"held_out"` (edits never trained on) or `"all"`.
        num_samples (`int`, *optional*, defaults to 10000): number of rows.
        seed (`int`, *optional*, defaults to 0): fixes each row's edit and jitter (`sample_edits`).

    Returns:
        `datasets.Dataset`: columns `source_image` and `image` (the target; `datasets.Image`, decoded to RGB PIL
        images), `text` (the instruction), `edit_kind`, `source_caption` and `target_caption` (the shapes captions of
        the two images, for evaluation).
    """
    samples = sample_edits(split, num_samples, seed)
    features = Features(
        {
            "source_image": ImageFeature(),
            "text": Value("string"),
            "image": ImageFeature(),
            "edit_kind": Value("string"),
            "source_caption": Value("string"),
            "target_caption": Value("string"),
        }
    )
    return Dataset.from_dict(
        {
            "source_image": [{"bytes": _png_bytes(edit.source, jitter), "path": None} for edit, jitter in samples],
            "text": [edit.instruction for edit, _ in samples],
            "image": [{"bytes": _png_bytes(edit.target, jitter), "path": None} for edit, jitter in samples],
            "edit_kind": [edit.kind for edit, _ in samples],
            "source_caption": [edit.source.caption for edit, _ in samples],
            "target_caption": [edit.target.caption for edit, _ in samples],
        },
        features=features,
    )


def load_shapes_edit_documents(
    split: str = "train", num_samples: int = 10_000, seed: int = 0, with_captions: bool = False
) -> Dataset:
    """The edits of [`load_shapes_edit_dataset`] as interleaved documents (`data.interleaved`): `texts` and
    `images`, aligned, OBELICS's layout, e.g. to write with `to_parquet` and train with `--interleaved`.

    Args:
        split (`str`, *optional*, defaults to `"train"`): `"train"`, `"held_out"` or `"all"`.
        num_samples (`int`, *optional*, defaults to 10000): number of documents (the rows of the edit data set).
        seed (`int`, *optional*, defaults to 0): as in [`load_shapes_edit_dataset`].
        with_captions (`bool`, *optional*, defaults to `False`): each image follows its caption
            (`[caption, source, instruction, target]`); else `[source, instruction, target]`, the layout of
            `TransfusionPipeline.edit`.

    Returns:
        `datasets.Dataset`: columns `texts` (`list[str | None]`) and `images` (`list[datasets.Image | None]`).
    """
    samples = sample_edits(split, num_samples, seed)
    texts, images = [], []
    for edit, jitter in samples:
        source = {"bytes": _png_bytes(edit.source, jitter), "path": None}
        target = {"bytes": _png_bytes(edit.target, jitter), "path": None}
        if with_captions:
            texts.append([edit.source.caption, None, f"{edit.instruction}: {edit.target.caption}", None])
            images.append([None, source, None, target])
        else:
            texts.append([None, edit.instruction, None])
            images.append([source, None, target])
    features = Features({"texts": List(Value("string")), "images": List(ImageFeature())})
    return Dataset.from_dict({"texts": texts, "images": images}, features=features)


__all__ = [
    "EDIT_KINDS",
    "ShapeEdit",
    "edit_instruction",
    "load_shapes_edit_documents",
    "load_shapes_edit_dataset",
    "sample_edits",
    "split_edits",
]
