"""Shared pytest set-up: make the helper modules in tests/ importable (`import tiny_configs`)."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The test models are tiny: one thread is as fast, and several threads on a busy machine spin-wait on each other
# (measured: the core suite went from 24 s to 87 s wall with 2 threads under load). An explicit OMP_NUM_THREADS wins.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)
