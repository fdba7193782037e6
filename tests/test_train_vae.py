"""examples/train_vae.py on tiny settings: flags are refused before any data is read, the training images are read
lazily a batch at a time (never the whole data set in memory), and an unreadable image is skipped and counted.

The end-to-end VAE -> Transfusion run is `test_train_vae_then_use_it` in test_train_transfusion.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from accelerate import Accelerator

from script_loading import (
    load_script,
    one_thread_and_fresh_accelerate,  # noqa: F401 (autouse fixture)
)
from transfusion_hf.data.shapes import draw_shape, sample_specs

ROOT = Path(__file__).resolve().parents[1]
VAE_SCRIPT = ROOT / "examples" / "train_vae.py"
SHAPES = ["--dataset_name", "shapes", "--shapes_num_samples", "64"]
# Two blocks of 8 channels: a step takes milliseconds.
TINY_VAE = ["--block_out_channels", "8", "8", "--norm_num_groups", "4", "--report_to", "none"]


train_vae = load_script(VAE_SCRIPT)


def write_image_folder(folder: Path, num: int, corrupt: int = 0) -> Path:
    """The diffusers image-folder layout (PNG files and metadata.jsonl), plus `corrupt` unreadable files."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (spec, jitter) in enumerate(sample_specs("train", num, 0)):
        draw_shape(spec, jitter).save(folder / f"{index:03d}.png")
        lines.append({"file_name": f"{index:03d}.png", "text": spec.caption})
    for index in range(corrupt):
        (folder / f"zz_broken_{index}.png").write_bytes(b"this is not an image" * 10)
        lines.append({"file_name": f"zz_broken_{index}.png", "text": "a broken file"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--norm_num_groups", "5"], r"--norm_num_groups=5 does not divide --block_out_channels \[32, 64\]"),
        (
            ["--resolution", "30", "--block_out_channels", "32", "64", "64"],
            r"--resolution=30 is not a multiple of the downsampling 4",
        ),
        (["--block_out_channels", "32", "0"], r"--block_out_channels must be positive, got \[32, 0\]"),
        (["--train_batch_size", "0"], r"--train_batch_size must be positive, got 0"),
        (["--learning_rate", "-1"], r"--learning_rate must be positive, got -1.0"),
        (["--num_eval_images", "-1"], r"--num_eval_images must be >= 0, got -1"),
        (["--num_statistics_images", "0"], r"--num_statistics_images must be positive, got 0"),
        (["--max_train_samples", "0"], r"--max_train_samples must be positive, got 0"),
        (["--min_lr_ratio", "2"], r"--min_lr_ratio must be in \[0, 1\], got 2.0"),
        (["--train_data_dir", "elsewhere"], r"exactly one data source: .*--train_data_dir='elsewhere'"),
        (["--dataset_split", "nope"], r"`dataset_split`='nope': the built-in shapes have the splits"),
    ],
)
def test_bad_flag_fails_before_any_data_is_read(flags, message, monkeypatch, tmp_path):
    def no_data(*args, **kwargs):
        raise AssertionError("the data set was opened before the flags were checked")

    monkeypatch.setattr(train_vae, "load_dataset_from_args", no_data)
    with pytest.raises(ValueError, match=message):
        train_vae.main([*SHAPES, "--output_dir", str(tmp_path / "vae"), "--report_to", "none", *flags])
    assert not (tmp_path / "vae").exists()  # not even the Accelerator was set up


@pytest.mark.parametrize(
    ("resolution", "channels"),
    [(16, [32]), (24, [32]), (32, [32, 64]), (48, [32, 64]), (64, [32, 64, 64]), (256, [32, 64, 64])],
)
def test_default_vae_keeps_16x16_latents_up_to_4x(resolution, channels, monkeypatch):
    """Without --block_out_channels the VAE downsamples as much as keeps 16x16 latents, at most 4x (a 32 px image
    gets 2x: 4x lost the textures of 32 px photos); given channels win."""
    monkeypatch.setattr(train_vae, "check_dataset_from_args", lambda *args, **kwargs: None)
    args = train_vae.parse_args([*SHAPES, "--resolution", str(resolution), "--report_to", "none"])
    assert args.block_out_channels == channels
    assert resolution // 2 ** (len(channels) - 1) >= min(16, resolution)
    given = train_vae.parse_args([*SHAPES, "--resolution", "32", "--block_out_channels", "32", "64", "64"])
    assert given.block_out_channels == [32, 64, 64]


def test_missing_image_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"`train_data_dir`=.*missing.* is not a folder"):
        train_vae.main(["--train_data_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "vae")])


def test_bad_flag_exits_with_status_2(tmp_path):
    """The command line prints one `error: ...` line naming the flag, no traceback, and exits with status 2."""
    result = subprocess.run(
        [sys.executable, str(VAE_SCRIPT), *SHAPES, "--norm_num_groups", "5", "--output_dir", str(tmp_path / "vae")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --norm_num_groups=5 does not divide")
    assert "Traceback" not in result.stderr and not (tmp_path / "vae").exists()


def test_training_data_is_lazy(tmp_path):
    """The training rows are a `datasets.Dataset` with a transform (nothing decoded up front); reading a slice decodes
    just that slice into [-1, 1] pixels. Only the held-out images are in memory."""
    assert not hasattr(train_vae, "load_pixels")  # the old reader held every image in one tensor
    args = train_vae.parse_args([*SHAPES, "--output_dir", str(tmp_path), "--num_statistics_images", "20"])
    data = train_vae.prepare_data(args, Accelerator(cpu=True))
    assert isinstance(data.train, datasets.Dataset) and data.train.format["type"] == "custom"
    assert len(data.train) == 52 and data.held_out and data.eval_pixels.shape == (12, 3, 32, 32)
    assert isinstance(data.statistics, datasets.Dataset) and len(data.statistics) == 20
    # The table holds the undecoded PNG bytes; pixels exist only for what is read.
    assert isinstance(data.train.features["image"], datasets.Image) and not data.train.features["image"].decode
    batch = data.train[:3]
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["valid"].all()
    assert -1 <= batch["pixel_values"].min() < batch["pixel_values"].max() <= 1
    assert batch["row"].tolist() == [12, 13, 14]  # row numbers of the whole data set (the first 12 are held out)


def test_image_folder_with_a_corrupt_image_end_to_end(tmp_path, monkeypatch, caplog):
    """An image folder with unreadable files: they are skipped, logged by row and file, and counted once each (in the
    training log and in vae_metrics.json) although every epoch meets them; no decode ever holds more than a batch."""
    decoded_batch_sizes = []

    def recording(images, *args, **kwargs):
        decoded_batch_sizes.append(len(images))
        return images_to_pixel_values(images, *args, **kwargs)

    images_to_pixel_values = train_vae.images_to_pixel_values
    monkeypatch.setattr(train_vae, "images_to_pixel_values", recording)
    folder = write_image_folder(tmp_path / "images", num=18, corrupt=2)
    out = tmp_path / "vae"
    # 20 rows: 4 held out, 16 training rows = 4 batches of 4; 10 steps are 2.5 epochs.
    train_vae.main(["--train_data_dir", str(folder), *TINY_VAE, "--train_batch_size", "4", "--max_train_steps", "10",
                    "--logging_steps", "5", "--random_flip", "--output_dir", str(out)])  # fmt: skip
    assert decoded_batch_sizes and max(decoded_batch_sizes) <= 4  # never more than one batch decoded at once
    records = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [5, 10] and records[-1]["skipped_images"] == 2
    metrics = json.loads((out / "vae_metrics.json").read_text())
    assert metrics["skipped_images"] == 2 and metrics["num_eval_images"] == 4 and metrics["held_out"]
    assert metrics["global_step"] == 10 and metrics["scaling_factor"] == pytest.approx(1 / metrics["latent_std"])
    assert "skipping unreadable image at row 18" in caplog.text and "zz_broken_1.png" in caplog.text
    assert (out / "reconstructions.png").is_file() and (out / "config.json").is_file()
