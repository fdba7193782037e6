"""Crash-safe checkpoints and resuming, and the final save of the pipeline."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from diffusers.training_utils import EMAModel

from ..data.collator import TransfusionDataCollator
from ..data.streaming import StreamingLatentBatches
from ..modeling_transfusion import TransfusionForMixedModal
from .components import TrainingComponents
from .optimization import trainable_parameters
from .validation import make_pipeline

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a checkpoint only gets its final name once fully written)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in root.iterdir() if (match := CHECKPOINT_PATTERN.match(path.name))]
    return [path for _, path in sorted(found)]


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | os.PathLike,
    step: int,
    total_limit: int | None = None,
    max_train_steps: int | None = None,
) -> Path:
    """Save the accelerator state atomically: write into a temporary folder, then rename it.

    A kill during the write leaves only a `.tmp-` folder that resume ignores, so the previous checkpoint stays usable.
    Older checkpoints beyond `total_limit` are removed after the new one exists. `max_train_steps`, the run's step
    target, is recorded beside the step, so that a resume with another target says so.

    Returns:
        The checkpoint folder `output_dir/checkpoint-{step}`.
    """
    # Not accelerate's `ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=...)`: it numbers the
    # folders by save count (`checkpoints/checkpoint_<iteration>`, not the step diffusers' examples and
    # `--resume_from_checkpoint checkpoint-N` name), deletes the oldest save BEFORE the new one is written (a kill in
    # between leaves one checkpoint fewer than asked) and writes straight into the final folder (a kill mid-write
    # leaves a half checkpoint that resume would pick). Here the old ones go only once the new one is complete.
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    temporary = root / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    # Every process writes files of its own (its RNG state; under FSDP its shards of the model and optimizer), and
    # `save_state` ends without a barrier: the main process must not rename the folder before they are all written
    # (measured with FSDP on CPU: process 1 found no `.tmp-checkpoint-N` folder left to write into).
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / "training_state.json").write_text(
            json.dumps({"global_step": step, "max_train_steps": max_train_steps})
        )
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        if total_limit is not None and total_limit > 0:
            for old in list_checkpoints(root)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_checkpoint(output_dir: str | os.PathLike, resume_from_checkpoint: str | None) -> Path | None:
    """`"latest"` -> the newest complete checkpoint of `output_dir` (None when there is none); a path -> that path."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not (path / "training_state.json").is_file():
        raise ValueError(f"`resume_from_checkpoint`={resume_from_checkpoint!r} is not a complete checkpoint folder.")
    return path


def training_state(checkpoint: Path) -> dict:
    """What `save_checkpoint` records beside the accelerator state: `global_step` and the run's `max_train_steps`
    (absent from older checkpoints)."""
    return json.loads((checkpoint / "training_state.json").read_text())


def checkpoint_step(checkpoint: Path) -> int:
    return int(training_state(checkpoint)["global_step"])


class LoopState:
    """Epoch and position inside it, saved with every checkpoint so a resumed run skips the batches already seen."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return {key: self.state[key] for key in ("global_step", "epoch", "batches_in_epoch", "micro_batches")}

    def load_state_dict(self, loaded: dict) -> None:
        self.state.update(loaded)


def truncate_log(log_path: Path, step: int) -> None:
    """Drop the records a killed run wrote after the checkpoint it resumes from, so each step is logged once."""
    if not log_path.is_file():
        return
    records = [line for line in log_path.read_text().splitlines() if line.strip()]
    kept = [line for line in records if json.loads(line).get("step", 0) <= step]
    log_path.write_text("".join(line + "\n" for line in kept))


def register_training_state(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model: torch.nn.Module,
    dataloader: torch.utils.data.DataLoader | StreamingLatentBatches,
) -> tuple[dict, EMAModel | None]:
    """The loop's state (step, epoch, position) and the EMA weights (`--use_ema`), registered with the stream's
    state for checkpointing. Returns the state dict and the EMA (None without)."""
    # The average of the trainable weights; `foreach` updates them all in a few fused kernels per step.
    ema = EMAModel(trainable_parameters(model), decay=args.ema_decay, foreach=True) if args.use_ema else None
    state = {
        "global_step": 0,
        "epoch": 0,
        "batches_in_epoch": 0,
        "micro_batches": 0,
        "skip_batches": 0,
        "last_checkpoint": None,
    }
    accelerator.register_for_checkpointing(LoopState(state))
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    if args.streaming:
        # The stream's position, shuffle buffer and generator: a resumed run draws the same next rows.
        accelerator.register_for_checkpointing(dataloader)
    return state, ema


def restore_checkpoint(
    args: argparse.Namespace,
    accelerator: Accelerator,
    state: dict,
    ema: EMAModel | None,
    collator: TransfusionDataCollator,
) -> None:
    """Resume from `--resume_from_checkpoint` when it names (or finds) a checkpoint: load every registered state,
    set where the data resumes and the collator's batch count, and drop the log records written after it."""
    checkpoint = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        if ema is not None:
            # Accelerate loads custom states onto the CPU: bring the averages back next to the weights.
            ema.to(accelerator.device)
        # A stream resumes from its own state; a map-style loader replays its sampler and skips the seen batches.
        state["skip_batches"] = 0 if args.streaming else state["batches_in_epoch"]
        collator.num_batches = state["micro_batches"]
        state["last_checkpoint"] = checkpoint
        saved = training_state(checkpoint)
        if accelerator.is_main_process:
            for log_name in ("train_log.jsonl", "validation_log.jsonl"):
                truncate_log(Path(args.output_dir) / "logs" / log_name, int(saved["global_step"]))
        accelerator.print(f"Resumed from {checkpoint} at step {saved['global_step']}.")
        recorded = saved.get("max_train_steps")
        if recorded is not None and recorded != args.max_train_steps:
            # Not refused: extending a run is legitimate. But a default that changed (e.g. the steps rule for several
            # image sizes) would otherwise move the learning-rate schedule without a word.
            logger.warning(
                f"The checkpoint's run trained toward --max_train_steps={recorded}, this one toward "
                f"{args.max_train_steps}: the learning-rate schedule follows the new target (pass --max_train_steps "
                f"{recorded} to continue the run as it was)."
            )
    elif args.resume_from_checkpoint is not None:
        accelerator.print(f"No checkpoint in {args.output_dir}: starting from scratch.")


def save_final(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model: torch.nn.Module,
    components: TrainingComponents,
    base_model: str | None,
    global_step: int,
    full_state_dict: dict | None = None,
) -> None:
    """Save the whole pipeline (model, VAE, scheduler, tokenizer) to `output_dir`, EMA weights when used.

    `full_state_dict`: the gathered weights under FSDP, where the wrapped model only holds this process's shard.
    """
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    if full_state_dict is not None:
        unwrapped = TransfusionForMixedModal(unwrapped.config)
        unwrapped.load_state_dict(full_state_dict)
    ema = components.ema
    if ema is not None:
        ema.copy_to(trainable_parameters(unwrapped))
    if args.lora_rank:
        unwrapped = unwrapped.merge_and_unload()
    pipeline = make_pipeline(unwrapped, components)
    pipeline.save_pretrained(args.output_dir)
    summary = {
        "global_step": global_step,
        "dataset": args.dataset_name or args.train_data_dir or args.train_data_files,
        "base_model": base_model,
        "num_parameters": unwrapped.num_parameters(),
        "train_batch_size": args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
        "learning_rate": args.learning_rate,
        "resolution": args.resolution,
        # The training loop's wall time (not the data encoding nor this save): benchmarks read it.
        "train_loop_seconds": None if components.clock.started is None else time.time() - components.clock.started,
    }
    (Path(args.output_dir) / "training_summary.json").write_text(json.dumps(summary, indent=2))
    if args.push_to_hub:
        from transfusion_hf.hub import push_pipeline_to_hub

        push_pipeline_to_hub(
            pipeline,
            args.hub_model_id,
            output_dir=args.output_dir,
            private=args.hub_private_repo,
            token=args.hub_token,
        )


def finish_training(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model: torch.nn.Module,
    components: TrainingComponents,
    base_model: str | None,
    global_step: int,
) -> None:
    """Save the final pipeline from the main process (gathering the FSDP shards first) and end the run on every
    process: all processes must call this."""
    accelerator.wait_for_everyone()
    # Under FSDP every process holds a shard: gathering the full weights is a collective, so all processes call it.
    is_fsdp = accelerator.distributed_type == DistributedType.FSDP
    full_state_dict = accelerator.get_state_dict(model) if is_fsdp else None
    if accelerator.is_main_process:
        save_final(args, accelerator, model, components, base_model, global_step, full_state_dict)
    # `end_training` destroys the process group: no process may do so while the main one is still saving.
    accelerator.wait_for_everyone()
    accelerator.end_training()
