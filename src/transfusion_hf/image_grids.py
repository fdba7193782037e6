"""Images of any size in one batch: each image has its own latent grid `(H, W)`, and the images that share a grid
are encoded and decoded together (one call of the patch layers per grid), as diffusers' and transformers' image models
batch one resolution at a time.

`latents` are either one tensor `(num_images, C, H, W)` (every image the same size: one group, no copies) or a list of
`(C, H_i, W_i)` tensors in reading order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .masking_transfusion import image_block_ids


@dataclass
class ImageGroup:
    """The images of one call that share a patch grid.

    Args:
        grid (`tuple[int, int]`): the patch grid `(H // patch_size, W // patch_size)`.
        indices (`list[int]`, *optional*): the images' positions in `latents`; None when `latents` is one tensor (the
            group is all of it, in order).
        skips (`list[torch.Tensor]`, *optional*): the U-Net encoder's skips of these images, for the decoder.
    """

    grid: tuple[int, int]
    indices: list[int] | None = None
    skips: list[torch.Tensor] | None = field(default=None, repr=False)

    def index_tensor(self, device: torch.device) -> torch.LongTensor:
        """`indices` as a tensor (to select the group's timesteps)."""
        return torch.tensor(self.indices, dtype=torch.long, device=device)


def group_images_by_grid(latents: torch.Tensor | list[torch.Tensor], patch_size: int) -> list[ImageGroup]:
    """Group images by patch grid, groups in order of their first image.

    Args:
        latents (`torch.Tensor` or `list[torch.Tensor]`): the images, `(num_images, C, H, W)` or one `(C, H_i, W_i)`
            each.
        patch_size (`int`): the model's patch size.

    Returns:
        `list[ImageGroup]`: one group without `indices` for a tensor.
    """
    if isinstance(latents, torch.Tensor):
        return [ImageGroup((latents.shape[-2] // patch_size, latents.shape[-1] // patch_size))]
    groups: dict[tuple[int, int], ImageGroup] = {}
    for index, image in enumerate(latents):
        grid = (image.shape[-2] // patch_size, image.shape[-1] // patch_size)
        groups.setdefault(grid, ImageGroup(grid, []))
        groups[grid].indices.append(index)
    return list(groups.values())


def placeholder_block_lengths(input_ids: torch.LongTensor, image_token_id: int) -> list[int]:
    """The length of every run of image placeholders, in reading order (row by row, left to right).

    Args:
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): the ids.
        image_token_id (`int`): the placeholder id.
    """
    lengths: list[int] = []
    for row in image_block_ids(input_ids, image_token_id):  # the mask's numbering of the images of each row
        blocks = row[row >= 0]
        lengths.extend(torch.bincount(blocks).tolist() if blocks.numel() else [])
    return lengths


def stack_if_same_grid(images: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """One `(num_images, C, H, W)` tensor when every image has the same size (the fast path), else the list."""
    if len({tuple(image.shape) for image in images}) == 1:
        return torch.stack(images)
    return list(images)


__all__ = ["ImageGroup", "group_images_by_grid", "placeholder_block_lengths", "stack_if_same_grid"]
