"""FSDP exercised, not only configured (issue 11): examples/train_transfusion.py with FSDP2 on two CPU processes over
gloo, checked against DDP on the same two processes, resumed from its sharded checkpoint, and its gathered final save
loaded into a plain pipeline.

accelerate 1.15 never selects FSDP on CPU processes (it trains with DDP instead, see tests/fsdp_on_cpu.py): the script
refuses such a launch, and these runs go through tests/fsdp_on_cpu.py, which lifts that one gate; torch's `fully_shard`
and accelerate's FSDP code (wrapping, sharded checkpoints, the gathered state dict) then run for real.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import accelerate
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from launching import accelerate_launch
from test_train_transfusion import CONFIGS, ROOT, SCRIPT, SHAPES, TINY, read_log, subprocess_env, train_transfusion
from transfusion_hf import TransfusionConfig, TransfusionForMixedModal, training
from transfusion_hf.pipeline_transfusion import TransfusionPipeline

SHIM = ROOT / "tests" / "fsdp_on_cpu.py"
FSDP_CPU_CONFIG = CONFIGS / "accelerate_fsdp_cpu_2proc.yaml"
# A learning rate of 1e-2 from the first step moves every weight by about 1e-2 per step (AdamW): a gradient reduced
# wrongly (or not at all) across the shards shows far above the tolerances below. Two micro-steps per step run FSDP's
# `set_requires_gradient_sync(False)` path too.
RUN = [*TINY, *SHAPES[:-1], "32", "--max_train_steps", "4", "--checkpointing_steps", "2", "--logging_steps", "1",
       "--learning_rate", "1e-2", "--lr_warmup_steps", "1", "--gradient_accumulation_steps", "2"]  # fmt: skip
PER_PROCESS = {
    "distcp": ["__0_0.distcp", "__1_0.distcp"],
    "random_states": ["random_states_0.pkl", "random_states_1.pkl"],
}


def launch(config: Path, output_dir: Path, *args: str, fsdp_on_cpu: bool = True) -> subprocess.CompletedProcess:
    """`ACCELERATE_USE_CPU=1 accelerate launch --config_file CONFIG [tests/fsdp_on_cpu.py] train_transfusion.py` with
    the arguments of RUN, in two real processes."""
    run = [*([str(SHIM)] if fsdp_on_cpu else []), str(SCRIPT), *RUN, "--output_dir", str(output_dir), *args]
    return accelerate_launch(config, run, dict(subprocess_env(), ACCELERATE_USE_CPU="1"), timeout=600)


def sharded_checkpoint_weights(checkpoint: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The model weights of an FSDP checkpoint (torch.distributed.checkpoint shards), merged into full tensors by
    accelerate's `merge_fsdp_weights` (the `accelerate merge-weights` command)."""
    from accelerate.utils import merge_fsdp_weights

    merged = tmp_path / f"{checkpoint.name}-merged"
    merge_fsdp_weights(str(checkpoint / "pytorch_model_fsdp_0"), str(merged))
    return load_file(merged / "model.safetensors")


def shards_by_file(folder: Path) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """What each file of a torch.distributed.checkpoint folder holds, read from its metadata: for each file (one per
    process), the number of values of each tensor it holds; and the full size of each tensor. With FSDP2 every
    process saves exactly the part of each parameter it holds."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(folder)).read_metadata()
    tensors = {
        name: entry for name, entry in metadata.state_dict_metadata.items() if isinstance(entry, TensorStorageMetadata)
    }
    held = defaultdict(dict)
    for index, storage in metadata.storage_data.items():
        if index.fqn in tensors:
            [chunk] = [chunk for chunk in tensors[index.fqn].chunks if tuple(chunk.offsets) == tuple(index.offset)]
            held[storage.relative_path][index.fqn] = math.prod(chunk.sizes)
    return dict(held), {name: math.prod(entry.size) for name, entry in tensors.items()}


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("fsdp") / "run"
    result = launch(FSDP_CPU_CONFIG, out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_fsdp_cpu_config_matches_the_gpu_config():
    """The CPU test config is accelerate_fsdp.yaml's FSDP settings on two CPU processes in fp32."""
    from accelerate.commands.config.config_args import load_config_from_file

    cpu = load_config_from_file(str(FSDP_CPU_CONFIG))
    gpu = load_config_from_file(str(CONFIGS / "accelerate_fsdp.yaml"))
    assert cpu.distributed_type == gpu.distributed_type == "FSDP"
    assert cpu.use_cpu and cpu.num_processes == 2 and cpu.mixed_precision == "no"
    assert cpu.fsdp_config == gpu.fsdp_config and cpu.fsdp_config["fsdp_version"] == 2


# ------------------------------------------------------------------------------------------------ refusals
def refuse_what_fsdp_cannot_train():
    """Run by `debug_launcher` in two real processes (gloo): a real FSDP accelerator, and the flags the script
    refuses with it."""
    from accelerate import Accelerator

    from fsdp_on_cpu import allow_fsdp_on_cpu

    allow_fsdp_on_cpu()
    os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
    accelerator = Accelerator(cpu=True)
    assert accelerator.is_fsdp2 and accelerator.num_processes == 2
    training.check_fsdp_setup(training.parse_args([*TINY, *SHAPES]), accelerator)  # accepted
    # (flags, attributes set after parsing, message): --lora_rank and --freeze_text need a pretrained LLM, whose
    # config `parse_args` loads; only `check_fsdp_setup` is under test here.
    refused = [
        ((), {"lora_rank": 4}, "With FSDP, --lora_rank, --use_ema, --validation_steps and --freeze_text"),
        ((), {"freeze_text": True}, "freeze_text=True"),
        (("--use_ema",), {}, "got lora_rank=0, use_ema=True, validation_steps=0"),
        (("--validation_steps", "5"), {}, "got lora_rank=0, use_ema=False, validation_steps=5"),
        (
            ("--text_data_files", "docs.txt"),
            {},
            r"text-only rows are not supported: got --text_only_share=0.5 \(a batch",
        ),
        (("--torch_compile",), {}, "With FSDP, --torch_compile is not supported"),
    ]
    for flags, attributes, message in refused:
        args = training.parse_args([*TINY, *SHAPES, *flags])
        vars(args).update(attributes)
        with pytest.raises(ValueError, match=message):
            training.check_fsdp_setup(args, accelerator)


def test_flags_fsdp_cannot_train_are_refused():
    from accelerate import debug_launcher

    AcceleratorState._reset_state(reset_partial_state=True)  # the processes are forked from this one
    GradientState._reset_state()
    debug_launcher(refuse_what_fsdp_cannot_train, num_processes=2)


def test_fsdp_request_without_fsdp_is_refused(tmp_path, monkeypatch):
    """A launch that asked for FSDP but runs without it (here one process, no GPU) stops before loading data."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    try:
        with pytest.raises(ValueError, match=r"asked for FSDP \(ACCELERATE_USE_FSDP=true\) but Accelerate set up "
                                             r"DistributedType.NO on cpu with 1 process\(es\)"):  # fmt: skip
            train_transfusion.main([*TINY, *SHAPES, "--output_dir", str(tmp_path / "run")])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert not (tmp_path / "run" / "logs").exists()


def test_accelerate_runs_ddp_for_fsdp_on_cpu_and_the_script_stops(tmp_path):
    """What accelerate 1.15 does with accelerate_fsdp_cpu_2proc.yaml, without tests/fsdp_on_cpu.py: two processes
    over gloo as MULTI_CPU (DDP), not FSDP. The script says so and stops. If this test fails because the run
    succeeds, accelerate now runs FSDP on CPU: drop tests/fsdp_on_cpu.py."""
    result = launch(FSDP_CPU_CONFIG, tmp_path / "run", fsdp_on_cpu=False)
    assert result.returncode != 0
    assert "but Accelerate set up DistributedType.MULTI_CPU on cpu" in result.stderr
    assert f"with 2 process(es): accelerate {accelerate.__version__} enables FSDP only on GPUs" in result.stderr


# ---------------------------------------------------------------------------------------------- FSDP runs
@pytest.mark.slow
def test_fsdp_shards_matches_ddp_and_saves_full_weights(fsdp_run, tmp_path):
    """Two FSDP processes each hold half of the model and write sharded checkpoints; they train exactly as DDP does;
    the final save holds the full weights and loads into a pipeline that generates."""
    out, _ = fsdp_run
    # The checkpoints are sharded: one file of model and optimizer state per process, and each its RNG state.
    for checkpoint in (out / "checkpoint-2", out / "checkpoint-4"):
        for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
            assert sorted(path.name for path in (checkpoint / folder).glob("*.distcp")) == PER_PROCESS["distcp"]
        assert sorted(path.name for path in checkpoint.glob("random_states_*")) == PER_PROCESS["random_states"]
    # Each process holds (and saved) its own part of every parameter (DTensor shards on dim 0): about half of the
    # model, the two parts together exactly the whole.
    held, sizes = shards_by_file(out / "checkpoint-4" / "pytorch_model_fsdp_0")
    assert sorted(held) == PER_PROCESS["distcp"]
    first, second = (held[name] for name in PER_PROCESS["distcp"])
    assert all(first.get(name, 0) + second.get(name, 0) == size for name, size in sizes.items())
    assert all(name in first and name in second for name, size in sizes.items() if size > 1)
    total = sum(sizes.values())
    assert 0.4 * total < sum(first.values()) < 0.6 * total

    # The final save gathered the FULL weights: every parameter at the shape of a model built from the saved config.
    saved = load_file(out / "transformer" / "model.safetensors")
    reference = TransfusionForMixedModal(TransfusionConfig.from_pretrained(out / "transformer"))
    assert {name: tuple(t.shape) for name, t in saved.items()} == {
        name: tuple(t.shape) for name, t in reference.state_dict().items()
    }
    assert sum(tensor.numel() for tensor in saved.values()) == total

    # FSDP computes what DDP computes on the same two processes (same batches, noise and reductions).
    ddp_out = tmp_path / "ddp"
    ddp = launch(CONFIGS / "accelerate_cpu_2proc.yaml", ddp_out, fsdp_on_cpu=False)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    # Two DDP processes: the effective batch of two, an unsharded checkpoint.
    assert json.loads((ddp_out / "training_summary.json").read_text())["train_batch_size"] == 4 * 2 * 2
    assert (ddp_out / "checkpoint-2" / "model.safetensors").is_file()
    assert not (ddp_out / "checkpoint-2" / "pytorch_model_fsdp_0").exists()
    fsdp_losses, ddp_losses = [[record["loss"] for record in read_log(folder)] for folder in (out, ddp_out)]
    assert len(fsdp_losses) == 4 and fsdp_losses == pytest.approx(ddp_losses, rel=1e-5)
    ddp_saved = load_file(ddp_out / "transformer" / "model.safetensors")
    at_step_2 = sharded_checkpoint_weights(out / "checkpoint-2", tmp_path)
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, ddp_saved[name], atol=1e-5, rtol=1e-4, msg=name)
    # ... and the comparison has teeth: steps 3 and 4 moved the weights far beyond that tolerance. (The checkpoint of
    # step 2, merged from its shards, holds every parameter at full shape.)
    assert {name: t.shape for name, t in at_step_2.items()} == {name: t.shape for name, t in saved.items()}
    assert max((saved[name] - at_step_2[name]).abs().max() for name in saved) > 1e-3

    # The saved folder is a plain pipeline.
    pipe = TransfusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    loaded = pipe.transformer.state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in saved.items())


@pytest.mark.slow
def test_fsdp_resume_from_the_sharded_checkpoint_is_exact(fsdp_run, tmp_path):
    """A run resumed from the sharded checkpoint of step 2 logs the same losses at steps 3 and 4 and saves the same
    weights as the uninterrupted run."""
    out, _ = fsdp_run
    resumed = tmp_path / "resumed"
    (resumed / "logs").mkdir(parents=True)
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    result = launch(FSDP_CPU_CONFIG, resumed, "--resume_from_checkpoint", "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    # It resumed at step 2: it logged steps 3 and 4 only, as the uninterrupted run did.
    assert [(r["step"], r["loss"]) for r in read_log(resumed)] == [(r["step"], r["loss"]) for r in read_log(out)][2:]
    saved, resumed_saved = (load_file(folder / "transformer" / "model.safetensors") for folder in (out, resumed))
    assert all(torch.equal(saved[name], resumed_saved[name]) for name in saved)
