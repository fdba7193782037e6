"""Aspect-ratio buckets (as in SDXL and the diffusers training scripts): a few image sizes of about the same area and
different shapes; each training image is resized and center-cropped to the bucket whose aspect ratio is closest to
its own, so that a portrait stays a portrait, and every batch draws its images from one bucket, so that they share one
latent shape.

The buckets are given as ``"32x32,32x48,48x32"`` (height x width, in pixels, like `--resolution`); each side must be
a multiple of what one latent patch covers (`patch_size * vae_scale_factor`) and at most the largest image the model
places (`max_latent_size * vae_scale_factor`).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Sequence

import numpy as np
import torch

BUCKETS_FLAG = "--aspect_ratio_buckets"


def parse_aspect_ratio_buckets(
    value: str | Sequence[str | tuple[int, int]],
    multiple: int = 1,
    max_side: int | None = None,
    flag: str = BUCKETS_FLAG,
) -> list[tuple[int, int]]:
    """Parse and check a list of buckets.

    Args:
        value (`str` or `Sequence`): ``"HxW,HxW,..."`` (spaces allowed), or a sequence of ``"HxW"`` strings or
            `(height, width)` pairs.
        multiple (`int`, *optional*, defaults to 1): each side must be a positive multiple of it (`patch_size *
            vae_scale_factor`: one latent patch).
        max_side (`int`, *optional*): each side must be at most this (`max_latent_size * vae_scale_factor`); no bound
            when `None`.
        flag (`str`, *optional*, defaults to `"--aspect_ratio_buckets"`): the option named in the error.

    Returns:
        `list[tuple[int, int]]`: the buckets as `(height, width)`, in the given order.

    Raises:
        ValueError: one message naming `flag` and the value: a malformed or repeated bucket, a side that is not a
            positive multiple of `multiple` or exceeds `max_side`, or no bucket at all.
    """
    if isinstance(value, str):
        items: list = [item.strip() for item in value.split(",")]
    else:
        items = list(value)

    def fail(reason: str) -> ValueError:
        return ValueError(f"{flag}={value!r}: {reason}.")

    if not items or items == [""]:
        raise fail("give at least one bucket, as HxW (height x width), e.g. 32x32,32x48,48x32")
    buckets: list[tuple[int, int]] = []
    for item in items:
        if isinstance(item, str):
            parts = item.lower().split("x")
            if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
                raise fail(f"{item!r} is not HxW (height x width in pixels, e.g. 32x48)")
            bucket = (int(parts[0]), int(parts[1]))
        else:
            pair = tuple(item) if isinstance(item, (tuple, list)) else ()
            if len(pair) != 2 or not all(
                isinstance(side, (int, np.integer)) and not isinstance(side, bool) for side in pair
            ):
                raise fail(f"{item!r} is not a (height, width) pair of integers")
            bucket = (int(pair[0]), int(pair[1]))
        for name, side in zip(("height", "width"), bucket):
            if side <= 0 or side % multiple:
                raise fail(f"the {name} {side} of {bucket[0]}x{bucket[1]} is not a positive multiple of {multiple}")
            if max_side is not None and side > max_side:
                raise fail(f"the {name} {side} of {bucket[0]}x{bucket[1]} is above the largest side {max_side}")
        if bucket in buckets:
            raise fail(f"{bucket[0]}x{bucket[1]} is given twice")
        # The closest aspect ratio picks the bucket (the larger on a tie): a smaller bucket of a ratio already listed
        # would never be used.
        same = [f"{h}x{w}" for h, w in buckets if h * bucket[1] == w * bucket[0]]
        if same:
            raise fail(f"{bucket[0]}x{bucket[1]} has the aspect ratio of {same[0]}; give one bucket per aspect ratio")
        buckets.append(bucket)
    return buckets


def format_aspect_ratio_buckets(buckets: Sequence[tuple[int, int]]) -> str:
    """The flag's form of a list of buckets, e.g. ``"32x32,32x48,48x32"`` (the inverse of
    [`parse_aspect_ratio_buckets`])."""
    return ",".join(f"{height}x{width}" for height, width in buckets)


def assign_bucket_index(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> int:
    """The index of the bucket whose aspect ratio is closest to that of a `height x width` image (see
    [`assign_bucket`])."""
    if height <= 0 or width <= 0:
        raise ValueError(f"An image of {height}x{width} pixels has no aspect ratio.")
    if not buckets:
        raise ValueError("No buckets to assign the image to.")
    best, best_key = 0, None
    for index, (bucket_height, bucket_width) in enumerate(buckets):
        # |log(h / w) - log(H / W)| = log(max(p, q) / min(p, q)) with p = h * W and q = w * H: compared exactly as
        # the fraction (big, small) in integers, so mirrored buckets (32x48 and 48x32 for a square image) tie exactly.
        p, q = height * bucket_width, width * bucket_height
        big, small = max(p, q), min(p, q)
        area = bucket_height * bucket_width
        if best_key is None:
            best, best_key = index, (big, small, area)
            continue
        best_big, best_small, best_area = best_key
        closer = big * best_small < best_big * small
        tie = big * best_small == best_big * small
        if closer or (tie and area > best_area):
            best, best_key = index, (big, small, area)
    return best


def assign_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket for a `height x width` image: the one whose aspect ratio is closest in log-ratio,
    `|log(height / width) - log(H / W)|`; on a tie the larger area, then the one listed first.

    Args:
        height (`int`): image height in pixels.
        width (`int`): image width in pixels.
        buckets (`Sequence[tuple[int, int]]`): the buckets, `(height, width)` each.

    Returns:
        `tuple[int, int]`: the chosen bucket `(height, width)`.
    """
    return tuple(buckets[assign_bucket_index(height, width, buckets)])


def bucket_log_ratio_error(height: int, width: int, bucket: tuple[int, int]) -> float:
    """How far a `height x width` image is from a bucket's shape: `|log(height / width) - log(H / W)|` (0: the same
    aspect ratio, log(1.5) ~ 0.41: a square image in a 32x48 bucket)."""
    return abs(math.log(height / width) - math.log(bucket[0] / bucket[1]))


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of row indices whose rows all share one bucket (pass it as a `DataLoader`'s `batch_sampler`).

    Every epoch each bucket's rows are shuffled and cut into batches of `batch_size` (all full except possibly the
    last of each bucket, which `drop_last` drops), and the order of all the batches is shuffled. Everything depends
    only on `(seed, epoch)`: each process of a distributed run builds the same order.

    With Accelerate (`accelerator.prepare(dataloader)` over several processes) each process takes whole batches of
    this order, so a batch still holds one bucket. Its `BatchSamplerShard` drops every group of batches whose last
    batch is short (it assumes only the epoch's last batch can be), so with `drop_last=False` this sampler reports
    `batch_size = None` (Accelerate's "batches of varying size"), which shards every batch; with `drop_last=True`
    every batch is full and `batch_size` is the batch size. A prepared loader does not pass `set_epoch` down to a
    sampler inside `BatchSamplerShard`: call this sampler's `set_epoch` yourself.

    Args:
        buckets (`Sequence[Hashable]` or `torch.Tensor`): the bucket of every row (any hashable key: an index into
            the bucket list, a `(height, width)` pair, `None` for text-only rows, ...).
        batch_size (`int`): rows per batch.
        drop_last (`bool`, *optional*, defaults to `False`): drop the last, short batch of each bucket.
        shuffle (`bool`, *optional*, defaults to `True`): shuffle the rows within buckets and the order of the
            batches; without it, buckets come in order of first appearance and rows in index order.
        seed (`int`, *optional*, defaults to 0): with the epoch, fixes the order.
    """

    def __init__(
        self,
        buckets: Sequence[Hashable] | torch.Tensor,
        batch_size: int,
        drop_last: bool = False,
        shuffle: bool = True,
        seed: int = 0,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        keys = buckets.tolist() if isinstance(buckets, (torch.Tensor, np.ndarray)) else list(buckets)
        groups: dict[Hashable, list[int]] = {}
        for index, key in enumerate(keys):
            groups.setdefault(tuple(key) if isinstance(key, list) else key, []).append(index)
        self.groups: dict[Hashable, np.ndarray] = {key: np.array(rows, dtype=np.int64) for key, rows in groups.items()}
        self.num_rows = len(keys)
        self.nominal_batch_size = batch_size
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.skip_batches = 0

    @property
    def batch_size(self) -> int | None:
        """Rows of every batch when all are full (`drop_last=True`), else `None` (varying sizes, see the class)."""
        return self.nominal_batch_size if self.drop_last else None

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch whose order the next iteration yields, and how many of its first batches to skip.

        Args:
            epoch (`int`): the epoch.
            skip_batches (`int`, *optional*, defaults to 0): batches of this epoch already trained on (resume); the
                iteration then yields the rest of the uninterrupted order. Every call resets it (Accelerate's
                loaders call `set_epoch(epoch)` each epoch), so give it with the resumed epoch only.
        """
        if skip_batches < 0:
            raise ValueError(f"skip_batches must be >= 0, got {skip_batches}.")
        self.epoch = int(epoch)
        self.skip_batches = int(skip_batches)

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """Every batch of an epoch, in order, without any skip.

        Args:
            epoch (`int`, *optional*): defaults to the epoch of the last `set_epoch`.

        Returns:
            `list[list[int]]`: the row indices of each batch.
        """
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed & 0xFFFFFFFFFFFFFFFF, epoch & 0xFFFFFFFFFFFFFFFF])
        size = self.nominal_batch_size
        batches: list[list[int]] = []
        for rows in self.groups.values():  # in order of first appearance: the same in every process
            rows = rng.permutation(rows) if self.shuffle else rows
            stop = len(rows) - len(rows) % size if self.drop_last else len(rows)
            batches += [rows[start : start + size].tolist() for start in range(0, stop, size)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches)).tolist()]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()[self.skip_batches :]

    def __len__(self) -> int:
        size = self.nominal_batch_size
        whole = sum(len(rows) // size if self.drop_last else -(-len(rows) // size) for rows in self.groups.values())
        return max(0, whole - self.skip_batches)


__all__ = [
    "BUCKETS_FLAG",
    "BucketBatchSampler",
    "assign_bucket",
    "assign_bucket_index",
    "bucket_log_ratio_error",
    "format_aspect_ratio_buckets",
    "parse_aspect_ratio_buckets",
]
