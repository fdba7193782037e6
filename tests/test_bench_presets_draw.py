"""Tests of benchmarks/bench_presets_draw.py: its argument checks (no data built), its verdicts, and one tiny
end-to-end run (image folder, a 2-step training subprocess, evaluation, table, json, samples grid)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import PIL.Image
import pytest

from transfusion_hf.data.glyphs import CHARACTERS
from transfusion_hf.evaluation.glyph_judge import GlyphJudge, JudgeTrainingConfig, load_glyph_judge

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
# A judge that trains in about a second: the end-to-end test checks the plumbing, not the judge's accuracy, and must
# not train (~20 s) the default judge where it is not cached yet.
TINY_JUDGE = JudgeTrainingConfig(num_images=256, epochs=1, num_test_images=64, widths=(4, 8, 16))
TINY_RUN = [
    "--presets", "tiny",
    "--num_samples", "64",
    "--max_train_steps", "2",
    "--images_per_caption", "2",
    "--num_inference_steps", "2",
    "--num_caption_images", "8",
]  # fmt: skip


@pytest.fixture(scope="module")
def presets_draw():
    """The benchmark script, imported as a module."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("bench_presets_draw")
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory) -> GlyphJudge:
    return load_glyph_judge(cache_dir=tmp_path_factory.mktemp("judge"), config=TINY_JUDGE)


def test_unknown_preset_fails_fast(presets_draw, tmp_path, capsys) -> None:
    work_dir = tmp_path / "work"
    with pytest.raises(SystemExit) as exit_info:
        presets_draw.main(["--presets", "tiny", "no_such_preset", "--work_dir", str(work_dir)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "no_such_preset" in error and "available presets" in error and "small" in error
    assert not work_dir.exists()  # nothing built


def test_large_preset_needs_include_large(presets_draw, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        presets_draw.main(["--presets", "paper_0.16b", "--work_dir", str(tmp_path / "work")])
    error = capsys.readouterr().err
    assert "paper_0.16b" in error and "--include_large" in error


def test_default_presets_skip_large_ones(presets_draw) -> None:
    parser = presets_draw.build_parser()
    checked, skipped = presets_draw.select_presets(parser, parser.parse_args([]))
    names = [preset.name for preset in checked]
    assert "tiny" in names and "paper_0.16b" not in names
    assert len(skipped) == 1 and skipped[0].startswith("paper_0.16b") and "too big" in skipped[0]
    assert all(preset.backbone_size <= presets_draw.CPU_BACKBONE_LIMIT for preset in checked)


def test_bad_training_flag_and_images_per_caption_fail_early(presets_draw, tmp_path, capsys) -> None:
    work_dir = tmp_path / "work"
    with pytest.raises(SystemExit):
        presets_draw.main(["--presets", "tiny", "--work_dir", str(work_dir), "--", "--no_such_flag"])
    assert "--no_such_flag" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        presets_draw.main(["--presets", "tiny", "--images_per_caption", "1", "--work_dir", str(work_dir)])
    assert "--images_per_caption must be >= 2" in capsys.readouterr().err
    assert not work_dir.exists()


def test_verdicts(presets_draw) -> None:
    assert presets_draw.CHANCE_CHARACTER_ACCURACY == 1 / len(CHARACTERS)
    real = {"seam_score": 1.0, "diversity_score": 1.0, "mean_image_score": 1.0, "t2i_character": 0.9}
    assert presets_draw.verdict(real)[0] == "draws"
    assert presets_draw.verdict({**real, "seam_score": 9.4})[0] == "mosaic"
    assert presets_draw.verdict({**real, "diversity_score": 0.01})[0] == "mean image"
    assert presets_draw.verdict({**real, "mean_image_score": 0.05})[0] == "mean image"
    assert presets_draw.verdict({**real, "t2i_character": 0.12, "sharpness_score": 13.0})[0] == "noise"


def test_the_check_fails_only_on_silent_failures(presets_draw) -> None:
    """A preset that does not draw fails the check unless the training script warned about it before training."""
    rows = [
        {"preset": "small", "verdict": "draws", "warned": False},
        {"preset": "shapes", "verdict": "mosaic", "warned": True},
        {"preset": "mine", "verdict": "mean image", "warned": False},
    ]
    assert presets_draw.outcome(rows) == {"all_draw": False, "silent_failures": ["mine"]}
    assert presets_draw.outcome(rows[:2]) == {"all_draw": False, "silent_failures": []}
    assert presets_draw.table_row({**rows[1], "train_minutes": 1.0})[-1] == "mosaic (warned)"


def test_tiny_end_to_end(presets_draw, tiny_judge, tmp_path, monkeypatch, capsys) -> None:
    # The training subprocess reads this (conftest only sets this process's threads): one thread is as fast for the
    # tiny model and does not fight other jobs for the cores.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    work_dir, output = tmp_path / "work", tmp_path / "presets_draw.json"
    result = presets_draw.main([*TINY_RUN, "--work_dir", str(work_dir), "--output", str(output)], judge=tiny_judge)
    printed = capsys.readouterr().out
    assert "| preset | prediction |" in printed and "| tiny |" in printed
    written = json.loads(output.read_text())
    assert written["rows"] == json.loads(json.dumps(result["rows"]))
    row = written["rows"][0]
    # The recorded verdict is the one its own metrics give (a 2-step run of the tiny recipe draws nothing).
    assert (row["verdict"], row["reason"]) == presets_draw.verdict(row["metrics"]) and row["steps"] == 2
    assert row["verdict"] != "draws"
    assert written["all_draw"] == (row["verdict"] == "draws")
    # The tiny preset declares that it does not draw: the training script warned, so a failure is not silent.
    assert row["warned"] is True and written["silent_failures"] == []
    assert "Not drawing without a warning: none." in printed
    assert row["metrics"]["num_t2i_images"] == 80 and Path(row["samples_grid"]).is_file()
    assert row["samples_grid"] in printed
    # The generic image folder: 64 PNGs with their captions, reused by the next run with the same settings.
    lines = (work_dir / "glyphs_folder" / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 64 and set(json.loads(lines[0])) == {"file_name", "text"}
    assert len(list((work_dir / "glyphs_folder").glob("*.png"))) == 64
    presets_draw.build_image_folder(work_dir, 64, 32)
    assert "Reusing" in capsys.readouterr().out
    # --merge joins the json files of invocations run side by side (here the one above) and, with --montage, draws
    # the first prompts of each preset in one image.
    merged_path, montage_path = tmp_path / "merged" / "presets_draw.json", tmp_path / "merged" / "montage.png"
    merged = presets_draw.main(
        ["--merge", str(tmp_path), "--output", str(merged_path), "--montage", str(montage_path)]
    )
    assert merged["rows"] == written["rows"] and merged["all_draw"] == written["all_draw"]
    assert json.loads(merged_path.read_text())["rows"] == written["rows"]
    grid, montage = PIL.Image.open(row["samples_grid"]), PIL.Image.open(montage_path)
    assert montage.size == (2 * grid.width, 3 * grid.height // row["samples_grid_lines"] + 24)


def test_prepare_only_builds_the_folder_and_nothing_else(presets_draw, tiny_judge, tmp_path) -> None:
    work_dir = tmp_path / "work"
    result = presets_draw.main([*TINY_RUN, "--work_dir", str(work_dir), "--prepare_only"], judge=tiny_judge)
    assert result == {"all_draw": True, "silent_failures": []}
    assert len(list((work_dir / "glyphs_folder").glob("*.png"))) == 64 and not (work_dir / "runs").exists()


def test_merge_needs_a_folder(presets_draw, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        presets_draw.main(["--merge", str(tmp_path / "missing")])
    assert "--merge=" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no presets_draw json"):
        presets_draw.main(["--merge", str(tmp_path)])
