"""`--torch_compile`: the training step compiled as one graph (`torch.compile`) through Accelerate's
`TorchDynamoPlugin`, and the batch dimensions that change from batch to batch marked dynamic up front.
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch
from accelerate.utils import DynamoBackend, TorchDynamoPlugin

# The backends `--torch_compile_backend` takes: Accelerate's `DynamoBackend` names, lower case ("no" is the default).
TORCH_COMPILE_BACKENDS = [backend.value.lower() for backend in DynamoBackend if backend != DynamoBackend.NO]


def torch_compile_plugin(args: argparse.Namespace) -> TorchDynamoPlugin | None:
    """Accelerate's `TorchDynamoPlugin` for `--torch_compile` (None without it): `accelerator.prepare` then compiles the
    prepared model (after DDP and autocast). On one process with `fullgraph=True`, so a graph break fails the first
    step instead of silently splitting it into several graphs (tests/test_compile.py keeps the training step at one
    graph); with several processes DDP's forward breaks once before the model (see below), so without it.

    Sets two process-wide dynamo options that the compiled step needs, both only about tracing:

    - with `--gradient_checkpointing`: `skip_fwd_side_effects_in_bwd_under_checkpoint`. Inside a checkpointed layer,
      the modality routing (`modality_experts.py`) and the `kernels` package's wrapper of the attention module set a
      Python attribute, which dynamo refuses in a checkpoint unless told that the recomputation need not replay it:
      the traced recomputation reads the routing's index tensors from the graph, not from the attribute.
    - with `--attn_implementation flex_attention`: `warnings.warn` in `ignore_logging_functions`. transformers builds
      the block mask with `create_block_mask(..., _compile=True)`, whose deprecation warning is a Python call that
      dynamo cannot trace (the only break of a flex step).

    Args:
        args (`argparse.Namespace`): the parsed flags (`torch_compile`, `torch_compile_backend`, `torch_compile_mode`,
            `gradient_checkpointing`, `attn_implementation`); flags a script does not have count as off.
    """
    if not getattr(args, "torch_compile", False):
        return None
    if getattr(args, "gradient_checkpointing", False):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    if getattr(args, "attn_implementation", None) == "flex_attention":
        torch._dynamo.config.ignore_logging_functions.add(warnings.warn)
    # Several processes: accelerate compiles the DDP wrapper (dynamo's DDPOptimizer then splits the backward at the
    # gradient buckets, so their all-reduce overlaps it), and DDP's own forward breaks the graph once (its logger),
    # before the model is entered: fullgraph would refuse that break. The model inside stays one graph.
    single_process = int(os.environ.get("WORLD_SIZE", "1")) == 1
    return TorchDynamoPlugin(
        backend=args.torch_compile_backend or "inductor", mode=args.torch_compile_mode, fullgraph=single_process
    )


def mark_varying_dims_dynamic(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mark the first dimension of every tensor of a training batch as dynamic for torch.compile: the number of rows
    (`input_ids`, `labels`, ...) and the number of images (`latents`, `timesteps`, ...) change with the data, packed
    rows included (first-fit packing makes as many rows as the examples need).

    Without the mark, dynamo compiles the first batch's sizes, then once more for each of these dimensions the first
    time it changes; with it, one graph serves every batch of the run (tests/test_compile.py). The sequence length is
    left alone: packed rows have exactly `--max_sequence_length` tokens, a size the compiled kernels keep static. A
    hint only (`maybe_mark_dynamic`): eager mode ignores it, and a size of 1 may still be specialised.

    Args:
        batch (`dict[str, torch.Tensor]`): the collator's batch, changed in place and returned.
    """
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            torch._dynamo.maybe_mark_dynamic(value, 0)
    return batch


__all__ = ["TORCH_COMPILE_BACKENDS", "mark_varying_dims_dynamic", "torch_compile_plugin"]
