"""Shared pytest set-up: make the helper modules in tests/ importable (`import tiny_configs`)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
