"""Training at mixed aspect ratios with `--aspect_ratio_buckets`: one size per batch, the model's `max_latent_size`
from the buckets, exact resume, and bad buckets refused before any data is loaded."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from script_loading import reset_accelerate
from test_train_transfusion import ROOT, SCRIPT, TINY, losses_by_step
from test_train_transfusion import run_main as run_tiny
from transfusion_hf import TransfusionProcessor
from transfusion_hf.data.buckets import BucketBatchSampler
from transfusion_hf.pipeline_transfusion import TransfusionPipeline
from transfusion_hf.training import (
    build_accelerator,
    build_collator,
    build_dataloader,
    build_noiser,
    parse_args,
    prepare_training_data,
    resolve_checkpoint,
    set_loader_epoch,
)

# The tiny recipe at 4x4 patches (64 positions for a 32x32 image, 96 for the others), three canvases of shapes.
BUCKETS = ["--patch_size", "4", "--dataset_name", "shapes", "--shapes_num_samples", "30",
           "--aspect_ratio_buckets", "32x32,32x48,48x32", "--validation_steps", "0"]  # fmt: skip


def run_main(output_dir: Path, *args: str) -> Path:
    return run_tiny(output_dir, *BUCKETS, *args)


def test_training_at_mixed_aspect_ratios_resumes_exactly_and_draws_every_size(tmp_path):
    """30 shapes drawn at three sizes (10 each), batches of 4 from one bucket: 9 batches an epoch (3 short ones), so
    12 steps cross an epoch end. A run resumed from the step-6 checkpoint (mid-epoch) logs the losses of the
    uninterrupted run; the saved pipeline draws and captions at each size."""
    args = ["--max_train_steps", "12", "--checkpointing_steps", "6", "--logging_steps", "1", "--lr_warmup_steps", "2",
            "--validation_steps", "6"]  # fmt: skip
    reference = tmp_path / "reference"
    run_main(reference, *args)
    expected = losses_by_step(reference)
    assert sorted(expected) == list(range(1, 13))
    # Validation at step 6 and 12 read the pairs of every size (the text-conditioning gap, the captions).
    gaps = [json.loads(line) for line in (reference / "logs" / "validation_log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in gaps] == [6, 12]
    config = json.loads((reference / "transformer" / "config.json").read_text())
    assert (config["latent_size"], config["max_latent_size"]) == (32, 48)

    resumed = tmp_path / "resumed"
    run_main(resumed, *args, "--resume_from_checkpoint", str(reference / "checkpoint-6"))
    resumed_losses = losses_by_step(resumed)
    assert {step: resumed_losses[step] for step in range(7, 13)} == {step: expected[step] for step in range(7, 13)}

    pipe = TransfusionPipeline.from_pretrained(reference)
    pipe.set_progress_bar_config(disable=True)
    for height, width in ((32, 32), (32, 48), (48, 32)):
        image = pipe(["a small red circle in the top left"], height=height, width=width, num_inference_steps=1).images[
            0
        ]
        assert image.size == (width, height)
        assert len(pipe.caption([image], height=height, width=width, max_new_tokens=2)) == 1


def test_every_batch_holds_one_size(tmp_path):
    """The collated batches of a bucketed run: each one `latents` tensor (one size), all three sizes seen."""

    args = parse_args([*TINY, *BUCKETS, "--output_dir", str(tmp_path / "run")])
    try:
        accelerator = build_accelerator(args)
        data = prepare_training_data(args, None, accelerator)
        processor = TransfusionProcessor(data.tokenizer, image_size=32, num_image_tokens=64)
        collator = build_collator(args, processor, build_noiser(args, "flow_prediction"), 512, accelerator, 4)
        loader = build_dataloader(args, data, None, collator, accelerator)
        assert isinstance(loader.batch_sampler, BucketBatchSampler)
        set_loader_epoch(loader, 1)
        assert loader.batch_sampler.epoch == 1
        sizes = set()
        for batch in loader:
            assert isinstance(batch["latents"], torch.Tensor)
            sizes.add(tuple(batch["latents"].shape[-2:]))
        assert sizes == {(32, 32), (32, 48), (48, 32)}
    finally:
        reset_accelerate()


@pytest.mark.parametrize(
    ("buckets", "message"),
    [
        ("32x30", r"--aspect_ratio_buckets.*32x30"),  # not whole 4x4 patches
        ("32x32,16x48", r"--aspect_ratio_buckets.*at least 32"),  # the shapes need 32 px sides
        ("32by48", r"--aspect_ratio_buckets.*32by48"),
    ],
)
def test_bad_buckets_are_refused_in_a_second(tmp_path, buckets, message):
    argv = [*TINY, *(arg if arg != "32x32,32x48,48x32" else buckets for arg in BUCKETS)]
    started = time.time()
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *argv, "--output_dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]  # the tiny recipe's warning comes first
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-2000:]
    assert re.search(message, errors[0]), errors[0]
    assert time.time() - started < 60
    assert resolve_checkpoint(tmp_path / "run", "latest") is None
