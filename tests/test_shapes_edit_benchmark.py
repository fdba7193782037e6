"""Image editing at inference: `TransfusionPipeline.edit` and the held-out shapes editing benchmark, whose scoring is
checked on images whose answer is known (the true targets score 1, the unedited sources 0)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pipeline_components import get_dummy_components  # noqa: E402
from transfusion_hf import TransfusionPipeline  # noqa: E402
from transfusion_hf.data.shapes import ShapeSpec, draw_shape  # noqa: E402
from transfusion_hf.data.shapes_edit import EDIT_KINDS, load_shapes_edit_dataset, sample_edits  # noqa: E402
from transfusion_hf.evaluation.shapes_edit_benchmark import edit_accuracy, evaluate_shapes_edit  # noqa: E402


@pytest.fixture(scope="module")
def pipe() -> TransfusionPipeline:
    pipeline = TransfusionPipeline(**get_dummy_components("flow_prediction", pixel_space=True))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_true_targets_score_one_and_sources_zero():
    samples = sample_edits("held_out", 30, seed=2)
    sources = [edit.source for edit, _ in samples]
    targets = [edit.target for edit, _ in samples]
    kinds = [edit.kind for edit, _ in samples]
    target_images = [draw_shape(edit.target, jitter) for edit, jitter in samples]
    source_images = [draw_shape(edit.source, jitter) for edit, jitter in samples]
    perfect = edit_accuracy(target_images, sources, targets, kinds)
    assert perfect["edit_accuracy"] == perfect["kept_attributes_accuracy"] == 1.0
    assert all(perfect[f"edit_accuracy_{kind}"] == 1.0 for kind in EDIT_KINDS)
    unedited = edit_accuracy(source_images, sources, targets, kinds)
    assert unedited["edit_accuracy"] == unedited["edited_attribute_accuracy"] == 0.0
    assert unedited["kept_attributes_accuracy"] == 1.0  # the source keeps the others, it just did not edit
    # Another attribute changed too: the edited one is right, the kept ones are not.
    recoloured = [replace_other(edit.target, edit.kind) for edit, _ in samples]
    wrong = edit_accuracy([draw_shape(spec) for spec in recoloured], sources, targets, kinds)
    assert wrong["edit_accuracy"] == wrong["kept_attributes_accuracy"] == 0.0
    assert wrong["edited_attribute_accuracy"] == 1.0
    # A speckled background makes an otherwise right edit wrong; a blank image is wrong.
    speckled = np.asarray(target_images[0]).copy()
    speckled[::3, ::3] = 200
    blank = np.zeros((32, 32, 3), np.uint8)
    scores = edit_accuracy([speckled, blank], sources[:2], targets[:2], kinds[:2])
    assert scores["edit_accuracy"] == 0.0 and scores["clean_background_rate"] == 0.0


def replace_other(spec: ShapeSpec, kind: str) -> ShapeSpec:
    """The spec with its shape changed (never an edited attribute)."""
    shape = "square" if spec.shape != "square" else "circle"
    return ShapeSpec(spec.size, spec.color, shape, spec.position)


def test_edit_reads_the_source_and_is_reproducible(pipe):
    rows = load_shapes_edit_dataset("held_out", 2, seed=0)
    sources = list(rows["source_image"])

    def edit(images, seed=0):
        generator = torch.Generator().manual_seed(seed)
        return pipe.edit(images, "make it red", num_inference_steps=2, generator=generator, output_type="np").images

    first, again = edit(sources), edit(sources)
    assert first.shape == (2, 4, 4, 3)
    np.testing.assert_array_equal(first, again)
    other = edit([sources[1], sources[1]])
    assert not np.allclose(first[0], other[0])  # the source is in the context: another one changes the result
    np.testing.assert_allclose(first[1], other[1], atol=1e-6)  # same source, same noise row: same edit
    with pytest.raises(ValueError, match="`instructions` has 3 entries for 2 images"):
        pipe.edit(sources, ["a", "b", "c"])


def test_evaluate_shapes_edit_returns_every_metric(pipe):
    evaluation = evaluate_shapes_edit(pipe, num_samples=6, num_inference_steps=2, batch_size=4)
    assert len(evaluation.images) == len(evaluation.instructions) == len(evaluation.target_captions) == 6
    expected = {"edit_accuracy", "edited_attribute_accuracy", "kept_attributes_accuracy", "clean_background_rate"}
    assert expected <= set(evaluation.metrics)
    assert all(0.0 <= value <= 1.0 for value in evaluation.metrics.values())
    assert {key for key in evaluation.metrics if key.startswith("edit_accuracy_")} <= {
        f"edit_accuracy_{kind}" for kind in EDIT_KINDS
    }
