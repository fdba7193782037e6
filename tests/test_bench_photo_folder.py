"""The second real-looking folder (benchmarks/bench_photo_folder.py): crops of real photographs, captioned by class."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("skimage")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_photo_folder.py"
spec = importlib.util.spec_from_file_location("bench_photo_folder", SCRIPT)
photo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(photo)


def test_crops_are_deterministic_32px_rgb_and_differ_by_class():
    images, labels = photo.sample_crops(4, seed=3)
    again, _ = photo.sample_crops(4, seed=3)
    assert images.shape == (4 * len(photo.CLASSES), 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again) and list(labels[:8]) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert not np.array_equal(images, photo.sample_crops(4, seed=4)[0])
    # Crops of one photograph vary (the diversity score's reference is not zero).
    assert photo.pairwise_spread(images[labels == 0]) > 0.02


def test_the_folder_is_a_diffusers_image_folder(tmp_path):
    photo.write_folder(tmp_path / "folder", num_images=16)
    records = [json.loads(line) for line in (tmp_path / "folder" / "metadata.jsonl").read_text().splitlines()]
    assert len(records) == 16 and records[0]["text"] == "a photo of brick wall"
    assert {record["text"] for record in records} == {f"a photo of {name}" for name in photo.CLASSES}
    assert all((tmp_path / "folder" / record["file_name"]).is_file() for record in records)


def test_bad_arguments_are_refused_before_any_work(tmp_path):
    with pytest.raises(SystemExit):
        photo.main(["--work_dir", str(tmp_path)])  # neither --prepare nor --evaluate
    with pytest.raises(SystemExit):
        photo.main(["--prepare", "--num_images", "3", "--work_dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_evaluate_scores_a_saved_pipeline_end_to_end(tmp_path):
    """A tiny random pixel-space pipeline through the benchmark's scoring: every class prompted, the judge's reading,
    the captions of real crops, the diversity against real crops, and the grid."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from pipeline_components import get_tokenizer, get_transformer
    from transfusion_hf import TransfusionPipeline

    tokenizer = get_tokenizer()
    transformer = get_transformer(tokenizer, "flow_prediction", latent_channels=3, latent_size=32, patch_size=8)
    pipeline = TransfusionPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), tokenizer=tokenizer
    )
    pipeline.save_pretrained(tmp_path / "run")
    judge, accuracy = photo.train_judge(tmp_path / "judge.pt", num_per_class=16, steps=3)
    assert 0 <= accuracy <= 1 and (tmp_path / "judge.pt").is_file()
    assert photo.train_judge(tmp_path / "judge.pt")[1] == accuracy  # loaded, not trained again
    result = photo.evaluate(tmp_path / "run", judge, images_per_class=2, guidance_scale=2.0, steps=2)
    assert set(result["t2i_per_class"]) == set(photo.CLASSES)
    # The overall score is the mean over classes of equal size.
    assert result["t2i_accuracy"] == pytest.approx(np.mean(list(result["t2i_per_class"].values())))
    assert result["diversity_ratio"] > 0 and set(result["diversity_ratio_per_class"]) == set(photo.CLASSES)
    # A random model's captions name no class: 0, not a fluke of the scoring.
    assert result["caption_accuracy"] < 0.5
    assert Path(result["samples_grid"]).is_file()
