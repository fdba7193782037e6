.PHONY: install test test-slow style quality demo bench

PYTHON ?= python

install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[test]"

# The README's test command: fast CPU tests (slow and GPU tests are skipped by default).
test:
	$(PYTHON) -m pytest tests

test-slow:
	$(PYTHON) -m pytest tests -m "slow and not gpu"

style:
	ruff check --fix .
	ruff format .

quality:
	ruff check .
	ruff format --check .

# The README's main job: train on the built-in shapes on a CPU, then generate and score.
demo:
	$(PYTHON) examples/shapes_demo.py --output_dir outputs/shapes
