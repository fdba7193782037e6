"""`--streaming`: image folders and webdataset tar shards read on the fly, split across processes, corrupt images
skipped and counted, and exact resume from the stream's saved state (position, shuffle buffer, generator)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch

from test_train_transfusion import (
    losses_by_step,
    png_bytes,
    read_log,
    run_main,
    run_until_checkpoint_fails,
    shape_rows,
    write_image_folder,
)
from transfusion_hf import training
from transfusion_hf.data.image_text import load_image_text_dataset
from transfusion_hf.data.streaming import StreamingLatentBatches


def write_tar_shards(folder: Path, num_shards: int = 2, per_shard: int = 8, corrupt: int = 0) -> list[str]:
    """webdataset shards: `{key}.png` + `{key}.txt` per sample; the first `corrupt` PNGs are cut off half-way."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = shape_rows(num_shards * per_shard)
    paths = []
    for shard in range(num_shards):
        path = folder / f"shard-{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for index in range(shard * per_shard, (shard + 1) * per_shard):
                image, caption = rows[index]
                data = png_bytes(image)
                if index < corrupt:
                    data = data[: len(data) // 2]
                for name, payload in ((f"{index:05d}.png", data), (f"{index:05d}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(str(path))
    return paths


def identity_encode(pixel_values: torch.Tensor) -> torch.Tensor:
    return pixel_values


def stream_batches(dataset, **kwargs) -> StreamingLatentBatches:
    # The collate function returns the captions: the test reads which rows each batch holds.
    return StreamingLatentBatches(
        dataset, identity_encode, lambda examples: [e["text"] for e in examples], 8, 3, **kwargs
    )


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return write_tar_shards(tmp_path_factory.mktemp("shards"), corrupt=1)


def webdataset_stream(shards: list[str]):
    return load_image_text_dataset(train_data_files=shards, image_column="png", caption_column="txt", streaming=True)


def test_webdataset_stream_skips_and_counts_corrupt_images(shards):
    batches = stream_batches(webdataset_stream(shards), shuffle_buffer_size=0)
    seen = list(batches)
    assert [len(batch) for batch in seen] == [3, 3, 3, 3, 3]  # 16 rows, 1 unreadable: batches stay full
    assert batches.num_skipped == 1
    expected = [caption for _, caption in shape_rows(16)][1:]
    assert sum(seen, []) == expected


def test_processes_read_disjoint_parts_of_the_stream(shards):
    parts = [
        sum(stream_batches(webdataset_stream(shards), process_index=rank, num_processes=2, seed=3), [])
        for rank in range(2)
    ]
    # 2 shards over 2 processes: one whole shard each; the second shard has no corrupt row.
    assert len(parts[0]) == 7 and len(parts[1]) == 8
    captions = [caption for _, caption in shape_rows(16)]
    assert sorted(parts[0] + parts[1]) == sorted(captions[1:])
    assert sorted(parts[1]) == sorted(captions[8:])


def test_shuffle_and_state_dict_resume_exactly(shards):
    """A stream restored from the state saved after batch 2 hands out the same next batches as an uninterrupted one,
    shuffle buffer included; another epoch is another order."""
    full = stream_batches(webdataset_stream(shards), shuffle_buffer_size=6, seed=1)
    reference = list(full)
    assert sorted(sum(reference, [])) != sum(reference, [])  # shuffled
    first = stream_batches(webdataset_stream(shards), shuffle_buffer_size=6, seed=1)
    iterator = iter(first)
    head = [next(iterator), next(iterator)]
    saved = first.state_dict()
    resumed = stream_batches(webdataset_stream(shards), shuffle_buffer_size=6, seed=1)
    resumed.load_state_dict(saved)
    assert head + list(resumed) == reference
    assert resumed.num_skipped == full.num_skipped == 1
    assert resumed.epoch == 1  # the next pass is the next epoch: the same rows in another order
    next_epoch = list(resumed)
    assert sorted(sum(next_epoch, [])) == sorted(sum(reference, [])) and next_epoch != reference


def test_a_process_without_rows_fails_clearly(shards):
    # 2 rows over 3 processes (every 3rd row each): the third process gets none.
    stream = webdataset_stream(shards).take(2)
    with pytest.raises(ValueError, match="Process 2 of 3 read no readable image-caption row"):
        list(stream_batches(stream, process_index=2, num_processes=3))


def test_resume_on_other_process_count_is_refused(shards):
    batches = stream_batches(webdataset_stream(shards))
    with pytest.raises(ValueError, match="num_processes=2"):
        batches.load_state_dict({"num_processes": 2, "states": [{}, {}]})


# ------------------------------------------------------------------------------------------------ training script
STREAM_ARGS = ["--streaming", "--shuffle_buffer_size", "8", "--logging_steps", "1", "--lr_warmup_steps", "2"]


def test_train_from_streamed_image_folder_counts_corrupt_images(tmp_path):
    folder = write_image_folder(tmp_path / "images", num=12, corrupt=True)
    out = tmp_path / "run"
    run_main(
        out, "--train_data_dir", str(folder), *STREAM_ARGS, "--max_train_steps", "3", "--checkpointing_steps", "0"
    )
    records = read_log(out)
    assert [record["step"] for record in records] == [1, 2, 3]
    assert records[-1]["skipped_images"] == 2  # 14 rows, 2 unreadable: one epoch of 3 full batches
    assert (out / "model_index.json").is_file()


def test_streaming_refuses_text_data(tmp_path):
    with pytest.raises(ValueError, match="--streaming with text-only data"):
        training.parse_args(["--dataset", "shapes", "--streaming", "--text_data_files", "a.txt"])


def test_streaming_resume_after_crash_is_exact(tmp_path, shards):
    """Webdataset shards: a run that dies at step 6 and resumes from checkpoint-3 logs the same losses as an
    uninterrupted one (the stream's position, shuffle buffer and generator are in the checkpoint)."""
    args = ["--train_data_files", *shards, "--image_column", "png", "--caption_column", "txt", *STREAM_ARGS,
            "--max_train_steps", "7", "--checkpointing_steps", "3"]  # fmt: skip
    # 15 readable rows / batch 4 = 4 batches per epoch: checkpoint 3 is mid-epoch, 6 is in the second epoch.
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    run_main(reference, *args)
    expected = losses_by_step(reference)
    assert sorted(expected) == list(range(1, 8))
    run_until_checkpoint_fails(crashed, 6, *args)
    run_main(crashed, *args, "--resume_from_checkpoint", "latest")
    assert losses_by_step(crashed) == expected
    skipped = [record["skipped_images"] for record in read_log(reference)]
    assert [record["skipped_images"] for record in read_log(crashed)] == skipped and skipped[3] == 1


@pytest.mark.slow  # two launches of two processes: about a minute
def test_two_processes_stream_disjoint_parts_and_resume_exactly(tmp_path):
    """Two real CPU processes (DDP over gloo) stream the built-in shapes (`to_iterable_dataset`, 2 shards: one each);
    a run resumed from checkpoint-2 (each process's stream state gathered into it) logs the same steps 3 and 4."""
    import shutil

    from launching import accelerate_launch
    from test_train_transfusion import CONFIGS, SCRIPT, SHAPES, TINY, subprocess_env

    reference, resumed = tmp_path / "reference", tmp_path / "resumed"

    def launch(out: Path, *extra: str) -> None:
        run = [str(SCRIPT), *TINY, *SHAPES[:-1], "128", *STREAM_ARGS, "--max_train_steps", "4",
               "--checkpointing_steps", "2", "--ddp_timeout", "120", "--output_dir", str(out), *extra]  # fmt: skip
        result = accelerate_launch(
            CONFIGS / "accelerate_cpu_2proc.yaml", run, dict(subprocess_env(), ACCELERATE_USE_CPU="1")
        )
        assert result.returncode == 0, result.stderr[-3000:]

    launch(reference)
    expected = losses_by_step(reference)
    assert sorted(expected) == [1, 2, 3, 4]
    state = torch.load(reference / "checkpoint-2" / "custom_checkpoint_1.pkl", weights_only=False)
    assert state["num_processes"] == 2 and len(state["states"]) == 2
    assert state["states"][0]["buffer"] != state["states"][1]["buffer"]  # each process buffers rows of its own part
    shutil.copytree(reference, resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    launch(resumed, "--resume_from_checkpoint", "latest")
    assert losses_by_step(resumed) == expected
