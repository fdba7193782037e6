"""Tests for the built-in glyphs data set, its judge and the label-free image-quality scores."""

from __future__ import annotations

import argparse
import itertools
import logging

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image

from transfusion_hf.data import glyphs
from transfusion_hf.data.glyphs import (
    BACKGROUND_COLORS,
    CHARACTERS,
    FOREGROUND_COLORS,
    GlyphSpec,
    all_combinations,
    draw_glyph,
    held_out_captions,
    load_glyphs_dataset,
    render_glyphs,
    sample_specs,
    train_captions,
)
from transfusion_hf.data.image_text import add_data_arguments, load_dataset_from_args, load_image_text_dataset
from transfusion_hf.evaluation import glyph_judge
from transfusion_hf.evaluation.glyph_judge import (
    GlyphClassifier,
    GlyphJudge,
    JudgeTrainingConfig,
    classifier_accuracy,
    glyph_caption_accuracy,
    glyph_text_to_image_accuracy,
    judge_cache_path,
    judge_glyph,
    load_glyph_judge,
    nearest_color,
    split_colors_batch,
)
from transfusion_hf.evaluation.glyphs_benchmark import evaluate_glyphs
from transfusion_hf.evaluation.image_quality import (
    diversity_score,
    mean_image_score,
    sharpness_score,
    tile_seam_score,
)

# A small judge that trains in a few seconds on one thread; the default one (6k images) is tested under -m slow.
SMALL_JUDGE = JudgeTrainingConfig(
    num_images=2000, epochs=5, learning_rate=6e-3, num_test_images=1000, widths=(8, 16, 32)
)


@pytest.fixture(scope="module")
def small_judge(tmp_path_factory) -> GlyphJudge:
    return load_glyph_judge(cache_dir=tmp_path_factory.mktemp("judge"), config=SMALL_JUDGE)


@pytest.fixture(scope="module")
def renders() -> tuple[list[GlyphSpec], np.ndarray]:
    return render_glyphs("all", 400, seed=101)


@pytest.fixture(scope="module")
def reference_renders() -> np.ndarray:
    return render_glyphs("all", 400, seed=202)[1]


def _mosaic(pixels: np.ndarray, patch: int, seed: int = 0) -> np.ndarray:
    # Every patch position takes its tile from a random other image: what independent per-patch generation gives.
    rng = np.random.default_rng(seed)
    mosaic = pixels.copy()
    for y, x in itertools.product(range(0, pixels.shape[1], patch), range(0, pixels.shape[2], patch)):
        mosaic[:, y : y + patch, x : x + patch] = pixels[rng.permutation(len(pixels)), y : y + patch, x : x + patch]
    return mosaic


# ------------------------------------------------------------------------------------------- captions, split


def test_caption_format_and_round_trip() -> None:
    assert GlyphSpec("A", "red", "blue").caption == "a red letter A on a blue background"
    assert GlyphSpec("7", "green", "yellow").caption == "a green digit 7 on a yellow background"
    for spec in all_combinations():
        assert GlyphSpec.from_caption(spec.caption) == spec
    assert GlyphSpec.from_caption("  A Red LETTER a on a BLUE   background ") == GlyphSpec("A", "red", "blue")


@pytest.mark.parametrize(
    ("caption", "message"),
    [
        ("a red letter Q on a blue background", "character 'Q'"),
        ("a purple letter A on a blue background", "color 'purple'"),
        ("a red letter A on a green background", "background 'green'"),
        ("a red digit A on a blue background", "kind 'digit'"),
        ("a blue letter A on a blue background", "equals background"),
        ("a red letter A", "expected"),
    ],
)
def test_bad_captions_name_the_field(caption: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GlyphSpec.from_caption(caption)


def test_combinations_and_held_out_split() -> None:
    combinations = all_combinations()
    assert len(combinations) == 200 == len(set(combinations))
    held_out, train = held_out_captions(), train_captions()
    assert len(held_out) == 40 and len(train) == 160
    assert not set(held_out) & set(train)
    assert set(held_out) | set(train) == {spec.caption for spec in combinations}
    rule = [
        spec.caption
        for spec in combinations
        if (
            CHARACTERS.index(spec.character)
            + 2 * FOREGROUND_COLORS.index(spec.color)
            + BACKGROUND_COLORS.index(spec.background)
        )
        % 5
        == 0
    ]
    assert held_out == rule
    # Pinned: changing the split must be a deliberate, visible act.
    assert held_out[:3] == [
        "a red letter A on a blue background",
        "a green letter A on a black background",
        "a blue letter A on a yellow background",
    ]
    # Compositional split: every attribute pair still occurs in training.
    train_specs = [GlyphSpec.from_caption(caption) for caption in train]
    for first, second in itertools.combinations(("character", "color", "background"), 2):
        seen = {(getattr(s, first), getattr(s, second)) for s in train_specs}
        every = {(getattr(s, first), getattr(s, second)) for s in combinations}
        assert seen == every, (first, second)


# --------------------------------------------------------------------------------------------------- rendering


def test_dataset_is_deterministic_prefix_stable_and_split() -> None:
    small = load_glyphs_dataset("train", num_samples=12, seed=3)
    assert isinstance(small, Dataset) and small.column_names == ["image", "text"]
    again = load_glyphs_dataset("train", num_samples=12, seed=3)
    larger = load_glyphs_dataset("train", num_samples=20, seed=3)
    for index in range(12):
        pixels = np.asarray(small[index]["image"])
        assert np.array_equal(pixels, np.asarray(again[index]["image"]))
        assert np.array_equal(pixels, np.asarray(larger[index]["image"]))
    assert small["text"] == larger["text"][:12] == [spec.caption for spec in sample_specs("train", 12, seed=3)]
    other = load_glyphs_dataset("train", num_samples=12, seed=4)
    assert not np.array_equal(np.asarray(small[0]["image"]), np.asarray(other[0]["image"]))
    image = small[0]["image"]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (32, 32)
    assert set(small["text"]) <= set(train_captions())
    assert set(load_glyphs_dataset("held_out", num_samples=12)["text"]) <= set(held_out_captions())
    assert load_glyphs_dataset("all", num_samples=2, resolution=48)[0]["image"].size == (48, 48)


def test_render_with_explicit_specs_matches_drawn_rows() -> None:
    specs, pixels = render_glyphs("held_out", 6, seed=9)
    again, pixels_again = render_glyphs(specs=specs, seed=9)
    assert again == specs and np.array_equal(pixels, pixels_again)
    spec = GlyphSpec("K", "white", "black")
    assert np.array_equal(np.asarray(draw_glyph(spec, 5)), np.asarray(draw_glyph(spec, np.random.default_rng(5))))


def test_renders_are_smooth_and_varied(renders) -> None:
    """Unlike the flat shapes: anti-aliased, shaded and noisy, so hundreds of distinct colours per image."""
    _, pixels = renders
    distinct = [len(np.unique(image.reshape(-1, 3), axis=0)) for image in pixels[:50]]
    assert min(distinct) > 200
    # Shaded backgrounds: the corners of one image differ.
    corners = pixels[:, [0, 0, -1, -1], [0, -1, 0, -1]].astype(np.float32)
    assert np.median(np.abs(corners - corners.mean(axis=1, keepdims=True)).max(axis=(1, 2))) > 5
    assert len({image.tobytes() for image in pixels}) == len(pixels)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "test"}, "split 'test'"),
        ({"num_samples": -1}, "num_samples"),
        ({"resolution": 4}, "resolution"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_glyphs_dataset(**{"num_samples": 1, **kwargs})


@pytest.fixture
def no_fonts(monkeypatch):
    def clear() -> None:
        for cached in (glyphs.available_fonts, glyphs._font, glyphs._upright):
            cached.cache_clear()

    monkeypatch.setattr(glyphs, "FONT_DIRS", ())
    monkeypatch.delenv("TRANSFUSION_HF_FONT_DIR", raising=False)
    clear()
    yield
    monkeypatch.undo()
    clear()


def test_falls_back_to_pil_font_with_a_warning(no_fonts, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="transfusion_hf.data.glyphs"):
        image = draw_glyph(GlyphSpec("A", "black", "white"), 0)
    assert "No DejaVu TrueType font" in caplog.text
    assert glyphs.font_signature() == "pil-default"
    assert np.asarray(image).min() < 128  # the character is drawn


def test_registered_as_builtin_dataset() -> None:
    dataset = load_image_text_dataset(dataset_name="glyphs", glyphs_num_samples=4, glyphs_resolution=16)
    assert len(dataset) == 4 and dataset.column_names == ["image", "text"]
    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    args = parser.parse_args(["--dataset", "glyphs", "--glyphs_num_samples", "3", "--resolution", "24"])
    args.seed = 0
    dataset = load_dataset_from_args(args)
    assert len(dataset) == 3 and set(dataset["text"]) <= set(train_captions())


# ------------------------------------------------------------------------------------------------------ judge


def test_colors_are_read_from_pixels(renders) -> None:
    """No learning involved: measured 1.000 on 4000 renders."""
    specs, pixels = renders
    split = split_colors_batch(pixels)
    colors = [nearest_color(c, b, FOREGROUND_COLORS) for c, b in zip(split["color_rgb"], split["background_rgb"])]
    backgrounds = [nearest_color(b, allowed=BACKGROUND_COLORS) for b in split["background_rgb"]]
    assert np.mean([c == s.color for c, s in zip(colors, specs)]) >= 0.99
    assert np.mean([b == s.background for b, s in zip(backgrounds, specs)]) >= 0.99
    assert split["glyph_fraction"].max() < 0.5 and split["contrast"].min() > glyph_judge.MIN_CONTRAST


def test_judge_reads_fresh_renders(small_judge, renders) -> None:
    """The small test judge (2000 images): measured 0.99 on characters; all three attributes as often."""
    print(f"small judge: {small_judge.metrics}")
    assert small_judge.metrics["character_accuracy"] >= 0.97
    specs, pixels = renders
    scores = glyph_text_to_image_accuracy(list(pixels), [spec.caption for spec in specs], judge=small_judge)
    assert scores["num_images"] == 400 and scores["no_glyph"] == 0
    assert scores["character"] >= 0.97 and scores["colors"] >= 0.99 and scores["accuracy"] >= 0.97
    # Any input format; the spec round trip.
    image = draw_glyph(GlyphSpec("R", "yellow", "black"), 1)
    as_tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1
    assert judge_glyph(image, judge=small_judge) == GlyphSpec("R", "yellow", "black")
    assert judge_glyph(as_tensor, value_range=(-1, 1), judge=small_judge) == GlyphSpec("R", "yellow", "black")
    assert judge_glyph(image.resize((64, 64)), judge=small_judge) == GlyphSpec("R", "yellow", "black")


def test_judge_rejects_flat_and_scores_wrong_prompts(small_judge, renders) -> None:
    flat = np.full((32, 32, 3), 128, dtype=np.uint8)
    assert judge_glyph(flat, judge=small_judge) is None
    details = small_judge.judge_details(flat)
    assert details.character is None and details.spec is None
    specs, pixels = renders
    wrong = [GlyphSpec(CHARACTERS[(CHARACTERS.index(s.character) + 1) % 10], s.color, s.background) for s in specs]
    scores = glyph_text_to_image_accuracy(list(pixels[:100]), [s.caption for s in wrong[:100]], judge=small_judge)
    assert scores["character"] <= 0.05 and scores["colors"] >= 0.99 and scores["accuracy"] <= 0.05
    with pytest.raises(ValueError, match="Length mismatch"):
        glyph_text_to_image_accuracy(list(pixels[:2]), [specs[0].caption], judge=small_judge)


def test_caption_accuracy() -> None:
    references = ["a red letter A on a blue background", "a green digit 7 on a yellow background"]
    predicted = ["A red letter A on a blue background ", "a green digit 4 on a yellow background"]
    scores = glyph_caption_accuracy(predicted, references)
    assert scores["accuracy"] == 0.5 and scores["character"] == 0.5 and scores["colors"] == 1.0
    scores = glyph_caption_accuracy(["gibberish", references[1]], references)
    assert scores["accuracy"] == scores["character"] == scores["color"] == 0.5


def _fake_training(calls: list):
    def train(config):
        calls.append(config)
        return GlyphClassifier(widths=config.widths).eval(), {"character_accuracy": 0.5, "train_seconds": 0.0}

    return train


def test_judge_cache_is_reused_and_versioned(tmp_path, monkeypatch) -> None:
    calls: list = []
    monkeypatch.setattr(glyph_judge, "train_glyph_classifier", _fake_training(calls))
    first = load_glyph_judge(cache_dir=tmp_path, config=SMALL_JUDGE)
    path = judge_cache_path(tmp_path, SMALL_JUDGE)
    assert path.is_file() and len(calls) == 1
    assert f"-v{glyph_judge.JUDGE_VERSION}-" in path.name and SMALL_JUDGE.key in path.name
    second = load_glyph_judge(cache_dir=tmp_path, config=SMALL_JUDGE)
    assert len(calls) == 1  # loaded, not trained
    for name, tensor in first.classifier.state_dict().items():
        assert torch.equal(tensor, second.classifier.state_dict()[name])
    load_glyph_judge(cache_dir=tmp_path, config=SMALL_JUDGE, retrain=True)
    assert len(calls) == 2
    path.write_bytes(b"truncated")  # e.g. written by a foreign tool: warned about, retrained, rewritten
    load_glyph_judge(cache_dir=tmp_path, config=SMALL_JUDGE)
    assert len(calls) == 3 and torch.load(path, weights_only=True)["version"] == glyph_judge.JUDGE_VERSION
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_judge_cache_is_written_atomically(tmp_path, monkeypatch, caplog) -> None:
    """A failure while writing leaves no file under the cache name (and no temporary file) behind; the judge still
    comes back, with a warning."""
    monkeypatch.setattr(glyph_judge, "train_glyph_classifier", _fake_training([]))
    real_save = torch.save

    def crashing_save(payload, file, *args, **kwargs):
        real_save(payload, file, *args, **kwargs)
        file.flush()
        # The bytes are on disk, but only under the temporary name.
        assert not judge_cache_path(tmp_path, SMALL_JUDGE).exists()
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with caplog.at_level(logging.WARNING, logger="transfusion_hf.evaluation.glyph_judge"):
        judge = load_glyph_judge(cache_dir=tmp_path, config=SMALL_JUDGE)
    assert isinstance(judge, GlyphJudge) and "could not cache" in caplog.text and "disk full" in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_default_cache_dir(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TRANSFUSION_HF_CACHE", str(tmp_path / "cache"))
    assert glyph_judge.default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("TRANSFUSION_HF_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert glyph_judge.default_cache_dir() == tmp_path / "transfusion_hf"


@pytest.mark.slow
def test_default_judge_accuracy(tmp_path) -> None:
    """The default judge (6000 renders x 3 epochs, ~20 s on one core): measured 0.999 on 5000 fresh renders."""
    judge = load_glyph_judge(cache_dir=tmp_path)
    print(f"default judge: {judge.metrics}")
    assert judge.metrics["character_accuracy"] >= 0.97
    assert classifier_accuracy(judge.classifier, 3000, seed=31) >= 0.97


# ---------------------------------------------------------------------------------------------- image quality


def test_seam_score_separates_mosaics(renders) -> None:
    """Measured: renders 1.01, 8x8 mosaics 9.5, the mean image 1.06."""
    _, pixels = renders
    real = tile_seam_score(pixels)
    mosaic = tile_seam_score(_mosaic(pixels, 8))
    assert 0.9 < real < 1.1 and mosaic > 3.0
    assert tile_seam_score(_mosaic(pixels, 4), patch_size=4) > 3.0
    assert tile_seam_score(np.zeros((2, 32, 32, 3), dtype=np.uint8)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="patch_size"):
        tile_seam_score(pixels[:2], patch_size=32)


def test_diversity_and_mean_image_scores_flag_collapse(renders, reference_renders) -> None:
    """Measured: renders 1.00 / 1.00; one image repeated 0 / 0.89; the mean image 0 / 0.003 (sharpness 0.08)."""
    _, pixels = renders
    mean = np.repeat(reference_renders.astype(np.float32).mean(axis=0, keepdims=True), len(pixels), axis=0)
    mean = np.rint(mean).astype(np.uint8)
    one = np.repeat(pixels[:1], len(pixels), axis=0)
    assert 0.9 < diversity_score(pixels, reference_renders) < 1.1
    assert 0.9 < mean_image_score(pixels, reference_renders) < 1.1
    assert 0.9 < sharpness_score(pixels, reference_renders) < 1.1
    assert diversity_score(one, reference_renders) == pytest.approx(0.0)
    assert diversity_score(mean, reference_renders) == pytest.approx(0.0, abs=0.01)
    assert mean_image_score(mean, reference_renders) < 0.05 and sharpness_score(mean, reference_renders) < 0.3
    assert mean_image_score(one, reference_renders) > 0.5  # one real image is not the mean


def test_grouped_scores_flag_the_per_caption_mean() -> None:
    """Per caption: real renders score ~1; each caption's mean render (a blurred glyph in the right colours) ~0."""
    captions = held_out_captions()[:10]
    labels = [caption for caption in captions for _ in range(3)]
    reference_labels = [caption for caption in captions for _ in range(8)]
    _, generated = render_glyphs(specs=[GlyphSpec.from_caption(c) for c in labels], seed=1)
    _, reference = render_glyphs(specs=[GlyphSpec.from_caption(c) for c in reference_labels], seed=2)
    label_array = np.array(reference_labels)
    caption_means = np.stack([reference[label_array == c].astype(np.float32).mean(axis=0) for c in labels])
    caption_means = np.rint(caption_means).astype(np.uint8)
    assert 0.75 < mean_image_score(generated, reference, labels, reference_labels) < 1.25
    assert 0.75 < diversity_score(generated, reference, labels, reference_labels) < 1.25
    assert mean_image_score(caption_means, reference, labels, reference_labels) < 0.05
    assert diversity_score(caption_means, reference, labels, reference_labels) < 0.05
    with pytest.raises(ValueError, match="no reference images"):
        mean_image_score(generated, reference[:8], labels, reference_labels[:8])


# ------------------------------------------------------------------------------------------------- benchmark


class _RenderingPipeline:
    """Stands in for a perfect pipeline: draws the prompted glyph, captions with a fixed guess."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, prompts, num_inference_steps, guidance_scale, generator):
        self.calls += 1
        seed = int(torch.randint(0, 2**31, (1,), generator=generator))
        specs = [GlyphSpec.from_caption(prompt) for prompt in prompts]
        _, pixels = render_glyphs(specs=specs, seed=seed)
        return argparse.Namespace(images=[Image.fromarray(image) for image in pixels])

    def caption(self, images, max_new_tokens):
        return ["a red letter A on a black background"] * len(images)


def test_evaluate_glyphs_with_a_perfect_pipeline(small_judge) -> None:
    pipeline = _RenderingPipeline()
    evaluation = evaluate_glyphs(pipeline, images_per_caption=2, num_caption_images=40, judge=small_judge)
    metrics = evaluation.metrics
    assert pipeline.calls == 2 and metrics["num_t2i_images"] == 80 and metrics["num_captioned_images"] == 40
    assert metrics["t2i_accuracy"] >= 0.95 and metrics["t2i_no_glyph"] == 0
    assert 0.9 < metrics["seam_score"] < 1.15 and metrics["patch_size"] == 8
    assert 0.7 < metrics["diversity_score"] < 1.3 and 0.7 < metrics["mean_image_score"] < 1.3
    expected = np.mean([c == "a red letter A on a black background" for c in evaluation.reference_captions])
    assert metrics["caption_accuracy"] == pytest.approx(expected)
    assert set(evaluation.prompts) == set(held_out_captions()) and len(evaluation.reference_images) == 320
    with pytest.raises(ValueError, match="images_per_caption"):
        evaluate_glyphs(pipeline, images_per_caption=1, judge=small_judge)
