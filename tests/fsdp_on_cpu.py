"""Run a training script under `accelerate launch` with FSDP on CPU processes (gloo), for tests.

    ACCELERATE_USE_CPU=1 accelerate launch --config_file examples/configs/accelerate_fsdp_cpu_2proc.yaml \
        tests/fsdp_on_cpu.py examples/train_transfusion.py <its arguments>

torch's FSDP2 (`fully_shard`) shards, all-gathers and reduce-scatters over gloo on CPU, but accelerate 1.15 never
selects it there: `AcceleratorState.__init__` sets `DistributedType.FSDP` only when the process group is MULTI_GPU,
MULTI_XPU, ... (not MULTI_CPU), and otherwise keeps the FSDP plugin aside and trains with DDP. This wrapper does, for a
MULTI_CPU process group, what that branch does for a GPU one (the same three assignments), then runs the script as
`__main__`. Everything else (wrapping, sharded checkpoints, the gathered final state dict) is accelerate's own code.
No library option does this (accelerate 1.15 has no flag for FSDP on CPU).
"""

from __future__ import annotations

import runpy
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_accelerator_state_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs) -> None:
    _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # accelerate/state.py, the MULTI_GPU branch of `AcceleratorState.__init__`.
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin
        # Every later `AcceleratorState()` copies PartialState's fields back in: keep them in agreement.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def allow_fsdp_on_cpu() -> None:
    """From now on in this process, an `Accelerator` with an FSDP plugin on CPU processes runs FSDP."""
    AcceleratorState.__init__ = _init_with_fsdp_on_cpu


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: fsdp_on_cpu.py SCRIPT [ARGS...]")
    allow_fsdp_on_cpu()
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
