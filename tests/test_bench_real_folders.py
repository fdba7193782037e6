"""The real-looking folders (benchmarks/bench_real_folders.py): crops of real photographs and handwritten digits,
captioned by class."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_real_folders.py"
spec = importlib.util.spec_from_file_location("bench_real_folders", SCRIPT)
folders = importlib.util.module_from_spec(spec)
spec.loader.exec_module(folders)


@pytest.fixture(params=["photos", "digits"])
def world(request):
    pytest.importorskip({"photos": "skimage", "digits": "sklearn"}[request.param])
    return folders.WORLDS[request.param]()


def test_photo_crops_are_deterministic_32px_rgb_and_differ_by_seed():
    pytest.importorskip("skimage")
    photos = folders.PhotoWorld()
    images, labels = photos.sample("folder", 4, seed=3)
    again, _ = photos.sample("folder", 4, seed=3)
    assert images.shape == (4 * len(photos.classes), 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again) and list(labels[:8]) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert not np.array_equal(images, photos.sample("folder", 4, seed=4)[0])
    # Crops of one photograph vary (the diversity score's reference is not zero).
    assert folders.pairwise_spread(images[labels == 0]) > 0.02


def test_digit_splits_never_share_a_scan():
    """The training folder and every scored split are disjoint: no score reads an image the model trained on."""
    pytest.importorskip("sklearn")
    digits = folders.DigitWorld()
    scans, _ = digits.scans()
    assert scans.shape == (1797, 32, 32, 3) and scans.dtype == np.uint8

    def keys(images):
        return {image.tobytes() for image in images}

    train = keys(digits.sample("folder", 1000)[0])
    assert len(train) > 1200  # every training scan (a few scans of one writer may repeat exactly)
    for split in ("judge_test", "reference", "caption"):
        held_out, labels = digits.sample(split, 1000)
        assert not keys(held_out) & train, split
        assert set(labels.tolist()) == set(range(10))
    assert not keys(digits.sample("reference", 1000)[0]) & keys(digits.sample("caption", 1000)[0])
    # The judge's scans are training scans, shifted.
    judge, judge_labels = digits.sample("judge", 5)
    assert judge.shape == (50, 32, 32, 3) and list(judge_labels[:5]) == [0] * 5


def test_the_folder_is_a_diffusers_image_folder(world, tmp_path):
    written = folders.write_folder(world, tmp_path / "folder", num_images=2 * len(world.classes))
    records = [json.loads(line) for line in (tmp_path / "folder" / "metadata.jsonl").read_text().splitlines()]
    assert written == len(records) == 2 * len(world.classes) and records[0]["text"] == world.caption(0)
    assert {record["text"] for record in records} == {world.caption(label) for label in range(len(world.classes))}
    assert all((tmp_path / "folder" / record["file_name"]).is_file() for record in records)


def test_bad_arguments_are_refused_before_any_work(tmp_path):
    with pytest.raises(SystemExit):
        folders.main(["--work_dir", str(tmp_path)])  # neither --prepare nor --evaluate
    with pytest.raises(SystemExit):
        folders.main(["--prepare", "--num_images", "3", "--work_dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        folders.main(["--folder", "nope", "--prepare", "--work_dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        folders.main(["--evaluate", str(tmp_path / "no_pipeline"), "--work_dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_evaluate_scores_a_saved_pipeline_end_to_end(world, tmp_path):
    """A tiny random pixel-space pipeline through the benchmark's scoring: every class prompted, the judge's reading,
    the captions of real held-out images, the diversity against real images, and the grid."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from pipeline_components import get_tokenizer, get_transformer
    from transfusion_hf import TransfusionPipeline

    tokenizer = get_tokenizer()
    transformer = get_transformer(tokenizer, "flow_prediction", latent_channels=3, latent_size=32, patch_size=8)
    pipeline = TransfusionPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), tokenizer=tokenizer
    )
    pipeline.save_pretrained(tmp_path / "run")
    judge, accuracy = folders.train_judge(world, tmp_path / "judge.pt", num_per_class=16, steps=3)
    assert 0 <= accuracy <= 1 and (tmp_path / "judge.pt").is_file()
    assert folders.train_judge(world, tmp_path / "judge.pt")[1] == accuracy  # loaded, not trained again
    result = folders.evaluate(world, tmp_path / "run", judge, images_per_class=2, guidance_scale=2.0, steps=2)
    assert set(result["t2i_per_class"]) == set(world.classes)
    # The overall score is the mean over classes of equal size.
    assert result["t2i_accuracy"] == pytest.approx(np.mean(list(result["t2i_per_class"].values())))
    assert result["diversity_ratio"] > 0 and set(result["diversity_ratio_per_class"]) == set(world.classes)
    # A random model's captions name no class: 0, not a fluke of the scoring.
    assert result["caption_accuracy"] < 0.5
    assert Path(result["samples_grid"]).is_file() and Path(result["samples_grid"]).name == f"{world.name}_samples.png"


def test_captions_are_read_as_whole_words():
    assert folders.caption_names("a handwritten one", "one")
    assert folders.caption_names("a  handwritten one\n", "one")
    assert not folders.caption_names("a handwritten someone", "one")
    assert not folders.caption_names("a handwritten nine", "one")
    assert folders.caption_names("a photo of brick wall", "brick wall")
    assert not folders.caption_names("a photo of brick", "brick wall")
