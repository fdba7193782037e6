"""A griffe extension for the API reference: render the transformers / diffusers docstring convention cleanly.

The package writes its docstrings as transformers and diffusers do, ``name (`type`, *optional*): description`` with
``[`ClassName`]`` references. griffe's Google parser reads the text in brackets as the type, markdown included, so the
reference's Type column would show ``[`TransfusionForMixedModal`]`` and ``*optional*`` literally. Before parsing,
this extension rewrites (in memory only) each entry's type to plain text, ``name (TransfusionForMixedModal, optional):``
(griffe then drops the ``, optional``), and every ``[`ClassName`]`` to ``ClassName`` in code font. It changes nothing
else: an entry griffe cannot read still warns, and fails ``mkdocs build --strict``.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

# Google sections whose entries are `name (type): description`.
ENTRY_SECTIONS = re.compile(
    r"^(?P<indent>\s*)(?:Args|Arguments|Parameters|Params|Attributes|Other Parameters|Keyword Args|Keyword Arguments)"
    r"\s*:\s*$"
)
HF_REFERENCE = re.compile(r"\[`([^`\]]+)`\]")


def plain_type(text: str) -> str:
    """``[`A`] or `list[int]`, *optional*, defaults to `4``` -> ``A or list[int], optional, defaults to 4``."""
    return HF_REFERENCE.sub(r"\1", text).replace("`", "").replace("*", "")


def rewrite_entry(line: str) -> str:
    """The type of one ``name (type): description`` line in plain text; any other line as it is."""
    head, colon, tail = line.partition(":")
    if not colon or "(" not in head or not head.rstrip().endswith(")"):
        return line
    start, end = head.index("("), head.rindex(")")
    kind = plain_type(head[start + 1 : end])
    if kind.strip() == "optional":  # `name (*optional*)`: no type to show, the signature's is used
        return f"{head[:start].rstrip()}{head[end + 1 :]}{colon}{tail}"
    return f"{head[: start + 1]}{kind}{head[end:]}{colon}{tail}"


def rewrite_docstring(text: str) -> str:
    """Plain-text entry types in the entry sections, ``[`Name`]`` -> ``Name`` in code font everywhere."""
    lines, section_indent, entry_indent = text.split("\n"), None, None
    for index, line in enumerate(lines):
        header = ENTRY_SECTIONS.match(line)
        if header is not None:
            section_indent, entry_indent = len(header.group("indent")), None
            continue
        if section_indent is None or not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= section_indent:  # the section ended
            section_indent = None
            continue
        entry_indent = indent if entry_indent is None else entry_indent
        if indent == entry_indent:
            lines[index] = rewrite_entry(line)
    return HF_REFERENCE.sub(r"`\1`", "\n".join(lines))


class HFDocstrings(Extension):
    """Rewrite every docstring of the package before griffe parses it (parsing is lazy: at rendering)."""

    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite_docstring(obj.docstring.value)
