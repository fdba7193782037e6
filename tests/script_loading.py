"""The example scripts imported as modules, and the autouse fixture of the tests that run them in this process."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState


def load_script(path: Path, name: str | None = None) -> ModuleType:
    """Import a script file (not a package module) as a fresh module, named `name` (default: the file's stem)."""
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reset_accelerate() -> None:
    """Accelerate keeps its state in process-wide singletons: reset them so that the next `Accelerator` starts clean."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def one_thread_and_fresh_accelerate():
    """Tiny models run fastest on one thread (the CPUs are shared); Accelerate's state is reset after each test
    (import this fixture into a test module to apply it there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    reset_accelerate()
