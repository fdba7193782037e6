"""The run's Accelerator: process-group settings, the refusal of launches that would not train as asked (FSDP on CPU),
and `accelerator.prepare`.
"""

from __future__ import annotations

import argparse
import logging
import os
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate import __version__ as accelerate_version
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    DistributedType,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    parse_flag_from_env,
    set_seed,
)

from ..data.streaming import StreamingLatentBatches
from .compilation import torch_compile_plugin
from .validation import DEFAULT_VALIDATION_STEPS

logger = logging.getLogger("transfusion_hf.training")


def accelerator_kwargs_handlers(args: argparse.Namespace) -> list:
    """The process-group timeout (`--ddp_timeout`) and, with text-only rows, DDP's search for unused parameters (a
    text-only batch leaves the image layers without gradients)."""
    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout))]
    if args.text_only_share:
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    return handlers


def build_accelerator(args: argparse.Namespace, kwargs_handlers: list | None = None) -> Accelerator:
    """The `Accelerator` both example scripts train with: `--gradient_accumulation_steps`, `--mixed_precision`,
    `--report_to` trackers logging to `--output_dir/logs`, a seedable sampler (a resumed run replays the same
    shuffled order) and, with `--torch_compile`, the compiled training step ([`torch_compile_plugin`]).

    Args:
        args (`argparse.Namespace`): the parsed flags.
        kwargs_handlers (`list`, *optional*): accelerate's kwargs handlers (process-group timeout, DDP options).
    """
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / "logs")
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=kwargs_handlers or [],
        dynamo_plugin=torch_compile_plugin(args),
    )


def setup_accelerator(args: argparse.Namespace) -> Accelerator:
    """The run's `Accelerator`, after refusing a launch that would not train as asked; seeds every generator, makes
    the logs folder and prints the distributed setup.

    Args:
        args (`argparse.Namespace`): the parsed flags.
    """
    accelerator = build_accelerator(args, accelerator_kwargs_handlers(args))
    check_fsdp_setup(args, accelerator)
    if args.validation_steps is None:
        args.validation_steps = DEFAULT_VALIDATION_STEPS
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > accelerator.num_processes:
        # `accelerate launch --multi_gpu` on a machine without GPUs starts processes that each train alone on
        # the whole data and overwrite each other's checkpoints. Stop instead.
        raise ValueError(
            f"{launched} processes were launched but Accelerate sees {accelerator.num_processes}: on CPU set "
            "ACCELERATE_USE_CPU=1 (e.g. ACCELERATE_USE_CPU=1 accelerate launch --config_file "
            "examples/configs/accelerate_cpu_2proc.yaml ...)."
        )
    set_seed(args.seed)
    Path(args.output_dir, "logs").mkdir(parents=True, exist_ok=True)
    accelerator.print(
        f"Distributed: num_processes={accelerator.num_processes} ({accelerator.distributed_type}), "
        f"device={accelerator.device}, mixed_precision={accelerator.mixed_precision}."
    )
    return accelerator


def check_fsdp_setup(args: argparse.Namespace, accelerator: Accelerator) -> None:
    """Refuse, before any data is loaded, an FSDP launch that would not shard, or flags FSDP cannot train.

    Args:
        args (`argparse.Namespace`): the parsed flags.
        accelerator (`Accelerator`): the run's accelerator, already set up (its `distributed_type` is final).
    """
    fsdp_requested = parse_flag_from_env("ACCELERATE_USE_FSDP")  # set by `accelerate launch` from an FSDP config
    if fsdp_requested and accelerator.distributed_type != DistributedType.FSDP:
        # accelerate (1.15) turns FSDP on only for GPU-like process groups: `AcceleratorState.__init__` sets
        # DistributedType.FSDP for MULTI_GPU, MULTI_XPU, ... but not MULTI_CPU, and gives no warning. The run would
        # then train unsharded (DDP) while its config says FSDP.
        raise ValueError(
            f"The launch asked for FSDP (ACCELERATE_USE_FSDP=true) but Accelerate set up "
            f"{accelerator.distributed_type} on {accelerator.device} with {accelerator.num_processes} process(es): "
            f"accelerate {accelerate_version} enables FSDP only on GPUs (and other accelerators), never on CPU "
            "processes. Use examples/configs/accelerate_cpu_2proc.yaml (DDP) on CPU."
        )
    if accelerator.distributed_type != DistributedType.FSDP:
        return
    if args.validation_steps is None:
        args.validation_steps = 0
    if args.lora_rank or args.use_ema or args.validation_steps or args.freeze_text:
        raise ValueError(
            "With FSDP, --lora_rank, --use_ema, --validation_steps and --freeze_text are not supported (sharded "
            f"weights): got lora_rank={args.lora_rank}, use_ema={args.use_ema}, validation_steps="
            f"{args.validation_steps}, freeze_text={args.freeze_text}."
        )
    if getattr(args, "torch_compile", False):
        # Not verified: FSDP runs only on GPUs here, and no GPU run has compiled FSDP2's per-layer hooks into the
        # step's one graph (`fullgraph=True`). Refused rather than failing at the first step, or training unchecked.
        raise ValueError(
            "With FSDP, --torch_compile is not supported: compiling the FSDP2-sharded step as one graph has not been "
            "verified. Train without --torch_compile, or without FSDP (one process or DDP)."
        )
    if args.text_only_share:
        # FSDP2 reduce-scatters the gradients of the parameters that got one in this process. A process whose batch
        # holds no image leaves the image layers without gradients while another process has them: the collectives
        # no longer match (measured on gloo: "Received data size doesn't match expected size", the run aborts).
        raise ValueError(
            f"With FSDP, text-only rows are not supported: got --text_only_share={args.text_only_share} (a batch "
            "without images leaves the image layers without gradients in one process only)."
        )


def log_fsdp_shard(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Log, from every process, how many parameter values it holds: with FSDP2 each parameter is a `DTensor` sharded
    on dim 0, and this process keeps only its `to_local()` part (about 1 / num_processes of the model)."""
    from torch.distributed.tensor import DTensor

    parameters = list(model.parameters())
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in parameters)
    total = sum(p.numel() for p in parameters)  # a DTensor's numel is its full (global) size
    sharded = sum(isinstance(p, DTensor) for p in parameters)
    logger.info(
        "FSDP: process %d holds %d of %d parameter values (%.1f%%); %d of %d parameters are DTensor shards.",
        accelerator.process_index,
        local,
        total,
        100 * local / max(total, 1),
        sharded,
        len(parameters),
    )


def prepare_with_accelerator(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    dataloader: torch.utils.data.DataLoader | StreamingLatentBatches,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[
    torch.nn.Module,
    torch.optim.Optimizer,
    torch.utils.data.DataLoader | StreamingLatentBatches,
    torch.optim.lr_scheduler.LRScheduler,
]:
    """`accelerator.prepare` the model, optimizer, schedule and (map-style only) the data loader; logs each
    process's shard under FSDP. Returns them in the same order."""
    if args.streaming:
        model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    else:
        model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    if accelerator.distributed_type == DistributedType.FSDP:
        log_fsdp_shard(accelerator, model)
    return model, optimizer, dataloader, lr_scheduler
