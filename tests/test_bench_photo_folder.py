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
