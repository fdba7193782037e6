"""The documentation site: the quickstart's code runs, `mkdocs build --strict` passes, README's links resolve.

Code blocks of docs/quickstart.md fenced as ```python run in order in one namespace; a block right after an
`<!-- skip ... -->` comment (e.g. one that needs a trained pipeline or the network) is shown but not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "docs" / "quickstart.md"
FENCE = re.compile(r"^```(?P<info>[^`]*)$")
SKIP = re.compile(r"^<!--\s*skip\b.*-->$")
# A markdown link or image, `[text](target)` / `![alt](target)`, with an optional "title".
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?(?P<target>[^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def python_blocks(path: Path) -> list[tuple[int, str, bool]]:
    """`(first code line, code, skipped)` of every top-level ```python block of a markdown file."""
    lines = path.read_text().splitlines()
    blocks, index = [], 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if match is None:
            index += 1
            continue
        info, start = match.group("info").strip(), index + 1
        end = start
        while end < len(lines) and lines[end] != "```":
            end += 1
        if end == len(lines):
            raise AssertionError(f"{path}:{index + 1}: unclosed code fence")
        if info == "python":
            previous = next((line.strip() for line in reversed(lines[:index]) if line.strip()), "")
            blocks.append((start + 1, "\n".join(lines[start:end]), bool(SKIP.match(previous))))
        index = end + 1
    return blocks


def test_python_blocks_parser(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n```python\nx = 1\n```\n\n<!-- skip: needs a GPU -->\n```python\nraise RuntimeError\n```\n"
        "```bash\nexit 1\n```\n```python title\ny = 2\n```\n"
    )
    assert python_blocks(page) == [(4, "x = 1", False), (9, "raise RuntimeError", True)]


def test_quickstart_runs(tmp_path, monkeypatch):
    blocks = python_blocks(QUICKSTART)
    runnable = [(line, code) for line, code, skipped in blocks if not skipped]
    # Build, save and load, generate, caption, interleave, scheduler, model, processor: the page's main blocks.
    assert len(runnable) >= 8, f"only {len(runnable)} runnable python blocks in {QUICKSTART}"
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the page's tempfile.mkdtemp() lands in tmp_path
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__quickstart__"}
    for line, code in runnable:
        # Padded so that a traceback names the line of the markdown file.
        exec(compile("\n" * (line - 1) + code, str(QUICKSTART), "exec"), namespace)
    assert len(namespace["images"]) == 1 and namespace["images"][0].size == (32, 32)
    assert len(namespace["captions"]) == 2 and all(isinstance(caption, str) for caption in namespace["captions"])
    assert namespace["parts"] and all(isinstance(part, str) or hasattr(part, "size") for part in namespace["parts"])


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    pytest.importorskip("material")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml")]
    result = subprocess.run(
        [*command, "--site-dir", str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "api" / "pipeline" / "index.html").is_file()


def test_readme_links_resolve():
    readme = ROOT / "README.md"
    text = re.sub(r"```.*?```", "", readme.read_text(), flags=re.DOTALL)  # links inside code blocks are code
    targets = [match.group("target") for match in LINK.finditer(text)]
    relative = [target for target in targets if not re.match(r"^(?:[a-z][a-z0-9+.-]*:|#)", target)]
    assert relative, "no relative links found in README.md"
    missing = [target for target in relative if not (ROOT / target.split("#")[0]).exists()]
    assert not missing, f"README.md links to missing files: {missing}"
