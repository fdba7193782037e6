"""Image grids with a label under each image, for validation logs and the demo's outputs."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont


def make_grid(
    images: Sequence[PIL.Image.Image],
    labels: Sequence[str] | None = None,
    columns: int = 6,
    cell_size: int = 128,
    label_lines: int = 3,
) -> PIL.Image.Image:
    """Tile images in a grid, each scaled so that its longer side is `cell_size` (nearest neighbour, so small images
    stay crisp; the aspect ratio kept) with its label written under it.

    Args:
        images (`Sequence[PIL.Image.Image]`).
        labels (`Sequence[str]`, *optional*): one per image.
        columns (`int`): images per row.
        cell_size (`int`): pixel side of each image in the grid.
        label_lines (`int`): text lines reserved under each image.
    """
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images.")
    if not images:
        raise ValueError("`images` is empty.")
    font = PIL.ImageFont.load_default()
    line_height = 12
    label_height = label_lines * line_height + 4 if labels is not None else 0
    columns = min(columns, len(images))
    rows = (len(images) + columns - 1) // columns
    grid = PIL.Image.new("RGB", (columns * cell_size, rows * (cell_size + label_height)), "white")
    draw = PIL.ImageDraw.Draw(grid)
    characters_per_line = max(cell_size // 6, 8)
    for index, image in enumerate(images):
        x, y = (index % columns) * cell_size, (index // columns) * (cell_size + label_height)
        # Fit the longer side to the cell, keeping the aspect ratio (images of any size), centred in the cell.
        scale = cell_size / max(image.size)
        size = (max(round(image.size[0] * scale), 1), max(round(image.size[1] * scale), 1))
        offset = ((cell_size - size[0]) // 2, (cell_size - size[1]) // 2)
        grid.paste(image.convert("RGB").resize(size, PIL.Image.NEAREST), (x + offset[0], y + offset[1]))
        if labels is not None:
            lines = textwrap.wrap(labels[index], characters_per_line)[:label_lines]
            for line_index, line in enumerate(lines):
                draw.text((x + 2, y + cell_size + 2 + line_index * line_height), line, fill="black", font=font)
    return grid


__all__ = ["make_grid"]
