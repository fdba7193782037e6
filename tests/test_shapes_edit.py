"""The built-in shapes editing data: determinism, disjoint splits, and edits that change exactly the named attribute."""

from __future__ import annotations

from collections import Counter
from dataclasses import fields

import numpy as np
import pytest

from transfusion_hf.data.shapes import ShapeSpec
from transfusion_hf.data.shapes_edit import (
    EDIT_KINDS,
    ShapeEdit,
    edit_instruction,
    load_shapes_edit_dataset,
    sample_edits,
    split_edits,
)
from transfusion_hf.evaluation.judge import judge_image


def test_loading_is_deterministic_and_a_prefix():
    first = load_shapes_edit_dataset("train", 40, seed=7)
    again = load_shapes_edit_dataset("train", 40, seed=7)
    longer = load_shapes_edit_dataset("train", 60, seed=7)
    other = load_shapes_edit_dataset("train", 40, seed=8)
    for column in ("text", "source_caption", "target_caption"):
        assert first[column] == again[column] == longer[column][:40]
    assert first["target_caption"] != other["target_caption"]
    for a, b in zip(first.select(range(5)), longer.select(range(5))):
        assert np.array_equal(np.asarray(a["source_image"]), np.asarray(b["source_image"]))
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))


def test_splits_are_disjoint_and_keep_the_shapes_held_out_combinations_unseen():
    train, held_out, every = (set(split_edits(split)) for split in ("train", "held_out", "all"))
    assert train and held_out and not train & held_out and train | held_out <= every
    assert len(every) == 240 * 12
    assert not any(edit.source.is_held_out or edit.target.is_held_out for edit in train)
    assert all(edit.is_held_out for edit in held_out)
    # About a fifth of every kind's edits are held out, and every held-out instruction is trained in other contexts.
    for kind in EDIT_KINDS:
        share = sum(edit.kind == kind for edit in held_out) / sum(edit.kind == kind for edit in every)
        assert 0.18 <= share <= 0.22, (kind, share)
    assert {edit.instruction for edit in held_out} <= {edit.instruction for edit in train}
    assert {edit.instruction for edit in every} == {edit.instruction for edit in train}  # all 15 instructions train


def test_sampled_edits_are_of_their_split_and_balanced_across_kinds():
    samples = sample_edits("held_out", 900, seed=1)
    assert all(edit.is_held_out for edit, _ in samples)
    counts = Counter(edit.kind for edit, _ in samples)
    assert all(250 <= counts[kind] <= 350 for kind in EDIT_KINDS), counts
    with pytest.raises(ValueError, match="Unknown split"):
        sample_edits("test", 3)


def test_every_edit_changes_exactly_the_named_attribute_in_the_drawn_images():
    dataset = load_shapes_edit_dataset("all", 60, seed=3)
    names = [field.name for field in fields(ShapeSpec)]
    for row in dataset:
        source, target = ShapeSpec.from_caption(row["source_caption"]), ShapeSpec.from_caption(row["target_caption"])
        kind = row["edit_kind"]
        changed = [name for name in names if getattr(source, name) != getattr(target, name)]
        assert changed == [kind]
        assert row["text"] == edit_instruction(kind, getattr(target, kind))
        # The images are what the captions say (read back by the judge).
        assert judge_image(row["source_image"]) == source
        assert judge_image(row["image"]) == target


def test_an_edit_must_change_its_attribute():
    spec = ShapeSpec("small", "red", "circle", "center")
    with pytest.raises(ValueError, match="must change the color"):
        ShapeEdit(spec, "color", "red")
    with pytest.raises(ValueError, match="Unknown edit"):
        ShapeEdit(spec, "shape", "square")
    assert ShapeEdit(spec, "size", "large").target == ShapeSpec("large", "red", "circle", "center")
    assert ShapeEdit(spec, "position", "top left").instruction == "move it to the top left"
