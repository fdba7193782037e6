"""The latent cache (`transfusion_hf.data.latent_cache`): written once and reused, invalidated by what the latents
depend on, equal to a fresh encoding, sharded over two real processes; and the training script's checks of its
arguments before any data is loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from hub_server import LocalHub
from launching import accelerate_launch
from pipeline_components import get_vae
from script_loading import load_script
from transfusion_hf import training
from transfusion_hf.data.image_text import CorruptImageError, encode_latents, load_image_text_dataset
from transfusion_hf.data.latent_cache import cache_latents, encoder_fingerprint
from transfusion_hf.data.shapes import draw_shape, sample_specs
from transfusion_hf.pipeline_transfusion import pixels_to_latents
from transfusion_hf.training.model_setup import load_model_preset

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_transfusion.py"
CONFIGS = ROOT / "examples" / "configs"
WORKER = Path(__file__).resolve().parent / "latent_cache_worker.py"
NUM_ROWS = 20


def shapes(num: int = NUM_ROWS) -> datasets.Dataset:
    return load_image_text_dataset(dataset_name="shapes", shapes_num_samples=num)


class CountingEncoder:
    """`pixels_to_latents` with a VAE, recording the number of images of every call."""

    def __init__(self, seed: int = 0):
        self.vae = get_vae(seed)
        self.calls: list[int] = []

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(pixel_values))
        return pixels_to_latents(self.vae, pixel_values)

    @property
    def fingerprint(self) -> str:
        return encoder_fingerprint(self.vae)


def write_image_folder(folder: Path, num: int, corrupt: int = 0) -> Path:
    """Shape images with unique captions (`image <i>: ...`) and a metadata.jsonl; `corrupt` unreadable files last."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (spec, jitter) in enumerate(sample_specs("train", num, seed=0)):
        draw_shape(spec, jitter).save(folder / f"{index:03d}.png")
        lines.append({"file_name": f"{index:03d}.png", "text": f"image {index}: {spec.caption}"})
    for index in range(corrupt):
        (folder / f"corrupt{index}.png").write_bytes(b"not a png" * 10)
        lines.append({"file_name": f"corrupt{index}.png", "text": f"corrupt {index}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def captions(folder: Path) -> list[str]:
    """The captions of an image folder, in row order."""
    return [json.loads(line)["text"] for line in (folder / "metadata.jsonl").read_text().splitlines()]


def snapshot(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}


# ----------------------------------------------------------------------------------------------------- the cache
def test_cache_is_written_once_then_reused(tmp_path):
    dataset, encoder = shapes(), CountingEncoder()
    first = cache_latents(dataset, encoder, 8, tmp_path, encoder.fingerprint, batch_size=8)
    assert first.num_encoded == NUM_ROWS and not first.reused and first.num_skipped == 0
    assert encoder.calls == [1, 8, 8, 4]  # the shape probe, then the batches
    assert sorted(snapshot(first.path)) == ["latents-00000-of-00001.arrow", "latents.json"]
    written = snapshot(first.path)

    encoder.calls.clear()
    second = cache_latents(dataset, encoder, 8, tmp_path, encoder.fingerprint, batch_size=8)
    assert encoder.calls == [] and second.reused and second.num_encoded == 0
    assert second.path == first.path and snapshot(second.path) == written  # nothing rewritten
    # Read back memory-mapped from the shard file, not copied into memory.
    assert second.dataset.cache_files == [{"filename": str(first.path / "latents-00000-of-00001.arrow")}]
    assert len(second.dataset) == NUM_ROWS and second.dataset[0]["latents"].shape == (4, 4, 4)


@pytest.mark.parametrize("latent_dtype", ["float32", "float16"])
def test_cached_latents_equal_a_fresh_encoding(tmp_path, latent_dtype):
    dataset, encoder = shapes(), CountingEncoder()
    cache = cache_latents(
        dataset, encoder, 8, tmp_path, encoder.fingerprint, random_flip=True, batch_size=8, latent_dtype=latent_dtype
    )
    fresh, skipped = encode_latents(dataset, encoder, 8, random_flip=True, batch_size=8)
    assert skipped == 0 and len(cache.dataset) == len(fresh) == NUM_ROWS
    dtype = getattr(torch, latent_dtype)
    for index, expected in enumerate(fresh):
        row = cache.dataset[index]
        assert row["text"] == expected["text"]
        # Stored in `latent_dtype`, read back as float32 (datasets' torch format).
        assert row["latents"].dtype == torch.float32
        assert torch.equal(row["latents"], expected["latents"].to(dtype).float())
        assert torch.equal(row["flipped_latents"], expected["flipped_latents"].to(dtype).float())
    # Mirrored latents differ (a centered circle is symmetric, most shapes are not).
    assert sum(not torch.equal(row["latents"], row["flipped_latents"]) for row in cache.dataset) > NUM_ROWS // 2


CHANGES = {
    "resolution": {"image_size": 16},
    "vae": {"encoder_seed": 1},
    "stretch": {"center_crop": False},
    "flip": {"random_flip": True},
    "dtype": {"latent_dtype": "float16"},
    "data": {"num_rows": NUM_ROWS - 1},
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_what_the_latents_depend_on_invalidates_the_cache(tmp_path, change):
    def build(image_size=8, encoder_seed=0, num_rows=NUM_ROWS, **options):
        encoder = CountingEncoder(encoder_seed)
        cache = cache_latents(shapes(num_rows), encoder, image_size, tmp_path, encoder.fingerprint, **options)
        return cache, encoder.calls

    first, _ = build()
    again, calls = build()
    assert again.path == first.path and calls == []
    changed, calls = build(**CHANGES[change])
    assert changed.path != first.path and changed.num_encoded == len(changed.dataset) and calls
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([first.path.name, changed.path.name])


def test_encoder_fingerprint_follows_the_weights_not_the_name(tmp_path):
    vae = get_vae(0)
    vae.save_pretrained(tmp_path / "vae")
    from diffusers import AutoencoderKL

    reloaded = AutoencoderKL.from_pretrained(tmp_path / "vae")  # other `_name_or_path`, same weights
    assert encoder_fingerprint(reloaded) == encoder_fingerprint(vae) == encoder_fingerprint(get_vae(0))
    assert encoder_fingerprint(get_vae(1)) != encoder_fingerprint(vae)
    with torch.no_grad():
        reloaded.encoder.conv_in.bias[0] += 1e-3
    assert encoder_fingerprint(reloaded) != encoder_fingerprint(vae)
    assert encoder_fingerprint(None) == "pixels"


def test_corrupt_images_are_skipped_and_counted_also_when_reused(tmp_path, caplog):
    dataset = load_image_text_dataset(train_data_dir=str(write_image_folder(tmp_path / "images", 6, corrupt=2)))
    for run in range(2):
        caplog.clear()
        cache = cache_latents(dataset, lambda pixels: pixels, 8, tmp_path / "cache", "pixels")
        assert (len(cache.dataset), cache.num_skipped, cache.num_rows, cache.reused) == (6, 2, 8, run == 1)
        assert "skipped 2 unreadable images of 8" in caplog.text
        assert ("skipping unreadable image at row 6" in caplog.text) == (run == 0)  # named when encoded
    assert cache.dataset["text"][:] == [captions(tmp_path / "images")[index] for index in range(6)]


def test_strict_data_fails_and_leaves_no_partial_cache(tmp_path):
    dataset = load_image_text_dataset(train_data_dir=str(write_image_folder(tmp_path / "images", 6, corrupt=1)))
    with pytest.raises(CorruptImageError, match=r"unreadable image at row 6 \(.*corrupt0\.png\)"):
        cache_latents(dataset, lambda pixels: pixels, 8, tmp_path / "cache", "pixels", batch_size=4, strict=True)
    assert not [path for path in (tmp_path / "cache").rglob("*") if path.is_file()]
    cache = cache_latents(dataset, lambda pixels: pixels, 8, tmp_path / "cache", "pixels", batch_size=4)
    assert len(cache.dataset) == 6 and cache.num_skipped == 1


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="latent_dtype"):
        cache_latents(shapes(2), lambda pixels: pixels, 8, tmp_path, "pixels", latent_dtype="bfloat16")
    with pytest.raises(ValueError, match="batch_size"):
        cache_latents(shapes(2), lambda pixels: pixels, 8, tmp_path, "pixels", batch_size=0)


# ------------------------------------------------------------------------------------------------ two processes
def test_two_processes_encode_their_own_shard_and_see_every_example_once(tmp_path):
    """`accelerate launch` with two real CPU processes (gloo): each encodes only its contiguous half, a second call
    encodes nothing, and one epoch of the Accelerate-prepared loader shows every example exactly once overall."""
    num = 24  # a multiple of 2 processes x batch 3: no batch is padded with repeated examples
    folder = write_image_folder(tmp_path / "images", num)
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    worker = [str(WORKER), str(folder), str(tmp_path / "cache"), str(tmp_path)]
    result = accelerate_launch(CONFIGS / "accelerate_cpu_2proc.yaml", worker, env)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    rows = captions(folder)
    [cache_folder] = list((tmp_path / "cache").iterdir())
    for rank, record in enumerate(records):
        assert record["num_processes"] == 2 and record["num_examples"] == num
        assert record["first_num_encoded"] == num // 2 and record["first_encode_calls"] == [1, 4, 4, 4]
        assert record["second_num_encoded"] == 0 and record["second_encode_calls"] == []
        # The shard this process wrote holds its contiguous half of the rows, in order.
        shard = datasets.Dataset.from_file(str(cache_folder / f"latents-{rank:05d}-of-00002.arrow"))
        assert shard["text"][:] == rows[rank * num // 2 : (rank + 1) * num // 2]
        assert len(record["seen"]) == num // 2
    assert sorted(records[0]["seen"] + records[1]["seen"]) == sorted(rows)  # every example once, none twice


# ---------------------------------------------------------------------------------------- the training script
@pytest.fixture(scope="module")
def train_transfusion():
    return load_script(SCRIPT, "train_transfusion_data")


@pytest.fixture
def no_data_loading(train_transfusion, monkeypatch):
    """Any data loading or encoding fails the test: the checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("data loaded before the arguments were checked")

    monkeypatch.setattr(training.data, "load_dataset_from_args", refuse)
    monkeypatch.setattr(training.data, "cache_latents", refuse)


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vae")
    get_vae(0).save_pretrained(folder)  # 2x downsampling, 4 latent channels
    return folder


TINY = ["--model_config", "tiny", "--report_to", "none"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--patch_size", "3"], r"`patch_size`=3 must divide `latent_size`=32"),
        (["--resolution", "64"], r"--patch_size=2 at 64x64 pixels gives 1024 image positions.*512"),
        (["--patch_encoder", "unet", "--patch_size", "4", "--unet_block_out_channels", "32"], "unet_block_out"),
        (
            ["--vae_name_or_path", "{vae}", "--resolution", "31"],
            r"--resolution=31 is not a multiple of the VAE's downsampling 2",
        ),
        (["--vae_name_or_path", "{vae}", "--patch_size", "3"], r"`patch_size`=3 must divide `latent_size`=16"),
        (["--vae_name_or_path", "{tmp}/no_vae"], r"--vae_name_or_path='.*no_vae' cannot be loaded"),
        (["--encode_batch_size", "0"], r"--encode_batch_size must be positive, got 0"),
        (["--ddp_timeout", "0"], r"--ddp_timeout must be positive, got 0"),
        (
            ["--unet_linear_shortcut", "true"],
            r"`unet_linear_shortcut`=True needs `patch_encoder`='unet', got 'linear'",
        ),
        (
            ["--unet_output_shortcut", "true"],
            r"`unet_output_shortcut`=True needs `patch_encoder`='unet', got 'linear'",
        ),
    ],
)
def test_bad_model_flags_fail_before_any_data(
    train_transfusion, no_data_loading, vae_folder, tmp_path, flags, message
):
    flags = [flag.format(vae=vae_folder, tmp=tmp_path) for flag in flags]
    with pytest.raises(ValueError, match=message):
        training.parse_args(["--dataset_name", "shapes", *TINY, *flags])


def test_good_model_flags_pass(train_transfusion, no_data_loading, vae_folder):
    args = training.parse_args(["--dataset", "shapes", *TINY, "--vae_name_or_path", str(vae_folder)])
    assert args.encode_batch_size == 64 and args.latent_dtype == "float32" and args.latent_cache_dir is None
    training.parse_args(["--dataset", "shapes", *TINY, "--resolution", "64", "--patch_size", "4"])
    args = training.parse_args(
        ["--dataset", "shapes", *TINY, "--model_config", "small", "--unet_linear_shortcut", "true"]
    )
    preset = load_model_preset(args.recipe)
    assert training.image_config_fields(args, preset, 3, 32)["unet_linear_shortcut"] is True


def test_a_vae_scales_the_recipes_patch_to_the_same_image_positions(no_data_loading, vae_folder):
    """The recipe's patch size is in pixels: on a 2x VAE's latents the small recipe's 8x8 pixel patches become 4x4
    latent patches (the same 16 image positions at 32 px), its U-Net keeps its finest 3 levels; --patch_size wins."""
    small = load_model_preset("small")
    args = training.parse_args(["--dataset", "shapes", "--report_to", "none", "--vae_name_or_path", str(vae_folder)])
    fields = training.image_config_fields(args, small, 4, 16)
    assert fields["patch_size"] == 4 and fields["latent_size"] // fields["patch_size"] == 32 // small["patch_size"]
    assert fields["unet_block_out_channels"] == small["unet_block_out_channels"][:3]
    flags = ["--dataset", "shapes", "--report_to", "none", "--vae_name_or_path", str(vae_folder), "--patch_size", "2"]
    assert training.image_config_fields(training.parse_args(flags), small, 4, 16)["patch_size"] == 2
    # Pixel space keeps the recipe's own patch.
    pixel = training.parse_args(["--dataset", "shapes", "--report_to", "none"])
    assert training.image_config_fields(pixel, small, 3, 32)["patch_size"] == small["patch_size"]


@pytest.mark.parametrize(
    ("flags", "linear_shortcut", "output_shortcut"),
    [
        (["--model_config", "small"], True, True),  # a flow U-Net: both by default
        (["--model_config", "small", "--unet_output_shortcut", "false"], True, False),
        (["--model_config", "small", "--prediction_type", "epsilon"], True, False),  # tiles with epsilon
        (
            ["--model_config", "small", "--prediction_type", "epsilon", "--unet_output_shortcut", "true"],
            True,
            True,
        ),
        (["--patch_encoder", "unet"], True, True),  # a U-Net on a (flow) preset that says nothing
        (["--patch_encoder", "unet", "--unet_output_shortcut", "false"], True, False),
        ([], False, False),  # linear patches: no shortcut to take
    ],
)
def test_unet_shortcut_defaults(train_transfusion, no_data_loading, flags, linear_shortcut, output_shortcut):
    args = training.parse_args(["--dataset", "shapes", *TINY, *flags])
    fields = training.image_config_fields(args, load_model_preset(args.recipe), 3, 32)
    assert (fields["unet_linear_shortcut"], fields["unet_output_shortcut"]) == (linear_shortcut, output_shortcut)


def test_missing_data_source_is_named(train_transfusion, no_data_loading, tmp_path):
    with pytest.raises(ValueError, match=r"^`train_data_dir`='.*missing' is not a folder\.$"):
        training.parse_args(["--train_data_dir", str(tmp_path / "missing"), *TINY])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^`train_data_dir`='.*empty' cannot be loaded: "):
        training.parse_args(["--train_data_dir", str(tmp_path / "empty"), *TINY])
    with pytest.raises(ValueError, match=r"^`dataset_name`='.*empty' cannot be loaded: "):
        training.parse_args(["--dataset_name", str(tmp_path / "empty"), *TINY])


def test_unreachable_hub_dataset_is_one_line(tmp_path):
    """A real process against a local Hub that does not hold the data set: exit code 2, one line naming it, before
    the run folder is even created."""
    with LocalHub() as hub:
        env = hub.subprocess_env(hf_home=tmp_path / "hf")
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]))
        result = subprocess.run(
            [
                sys.executable,
                str(SCRIPT),
                "--dataset_name",
                "someone/no-such-dataset",
                *TINY,
                "--output_dir",
                str(tmp_path / "run"),
            ],  # fmt: skip
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            cwd=ROOT,
        )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: `dataset_name`='someone/no-such-dataset' cannot be loaded:")
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_training_runs_reuse_the_cache(train_transfusion, tmp_path):
    """Two runs on the same data: the second reads the latents the first wrote (the cache files are untouched) and
    trains to the same losses."""

    def run(name: str) -> list[float]:
        try:
            train_transfusion.main(["--dataset_name", "shapes", "--shapes_num_samples", "16", *TINY,
                                    "--train_batch_size", "4", "--max_train_steps", "2", "--checkpointing_steps", "0",
                                    "--logging_steps", "1", "--latent_cache_dir", str(tmp_path / "cache"),
                                    "--output_dir", str(tmp_path / name)])  # fmt: skip
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
        log = (tmp_path / name / "logs" / "train_log.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in log]

    def cache_files() -> dict[str, tuple[int, int]]:
        """Every file of the cache, with its inode and modification time: a file written again changes them."""
        return {
            str(path.relative_to(tmp_path)): (path.stat().st_ino, path.stat().st_mtime_ns)
            for path in (tmp_path / "cache").rglob("*")
            if path.is_file()
        }

    first = run("first")
    [cache_folder] = list((tmp_path / "cache").iterdir())
    manifest = json.loads((cache_folder / "latents.json").read_text())
    assert (manifest["num_rows"], manifest["num_examples"]) == (16, 16)
    written = cache_files()
    assert sorted(Path(name).name for name in written) == ["latents-00000-of-00001.arrow", "latents.json"]
    second = run("second")
    assert cache_files() == written
    assert second == first and len(first) == 2
