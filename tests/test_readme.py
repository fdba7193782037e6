"""The README's usage snippets run as written (on tiny random models)."""

import re
from pathlib import Path

import PIL.Image
import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def usage_snippets() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Use it") : text.index("\n## ", text.index("## Use it") + 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_readme_has_usage_snippets():
    assert len(usage_snippets()) >= 3


@pytest.mark.parametrize("index", range(3))
def test_readme_usage_snippet_runs(index, capsys):
    namespace: dict = {}
    exec(compile(usage_snippets()[index], f"README.md snippet {index}", "exec"), namespace)
    if index == 0:
        assert namespace["out"].loss is not None and namespace["out"].diffusion_predictions.shape == (1, 4, 4, 4)
    elif index == 1:  # processor -> VAE latents -> model
        assert type(namespace["processor"]).__name__ == "TransfusionProcessor"
        assert namespace["inputs"]["latents"].shape == (2, 4, 4, 4)
        assert torch.isfinite(namespace["out"].loss) and namespace["out"].diffusion_predictions.shape == (2, 4, 4, 4)
    else:
        assert len(namespace["images"]) == 2
        parts = namespace["parts"]
        assert isinstance(parts, list) and all(isinstance(part, (str, PIL.Image.Image)) for part in parts)
