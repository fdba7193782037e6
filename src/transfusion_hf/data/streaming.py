"""Streaming image-caption data or interleaved documents: rows read on the fly from a `datasets.IterableDataset` (a Hub
stream, an image folder, webdataset tar shards, a folder of parquet files), split across processes, shuffled through a
buffer, decoded and VAE-encoded batch by batch on the accelerator (each image at its aspect-ratio bucket when there are
buckets), with a `state_dict` that resumes a killed run exactly where it stopped."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from itertools import islice

import datasets
import numpy as np
import torch
from accelerate.utils import gather_object, send_to_device
from datasets.distributed import split_dataset_by_node

from .buckets import assign_bucket_index
from .image_text import decode_rows, encode_images
from .interleaved import (
    IMAGES_COLUMN,
    TEXTS_COLUMN,
    decode_documents,
    document_example,
    encode_documents,
    head_pairs,
)

logger = logging.getLogger(__name__)


class StreamingLatentBatches:
    """Collated training batches made on the fly from a stream of undecoded image-caption rows, or of interleaved
    documents (`interleaved=True`: rows with `texts` and `images` lists, `data.interleaved`).

    Each process reads its own part of the stream (`datasets.distributed.split_dataset_by_node`: whole shards when
    their number divides by the processes, else every `num_processes`-th row), draws rows through a shuffle buffer,
    decodes them (an unreadable image is skipped, counted in `num_skipped`, and replaced by the next row, so batches
    stay full; a document with an unreadable image is skipped whole), encodes a batch at a time with `encode` and collates
    it. With aspect-ratio buckets, image-caption pairs wait for a batch in their bucket, so every batch holds one bucket
    (one encoder call, as the cached path's batches); the end of a pass hands out what is left, one smaller batch per
    bucket. A document's images are encoded each at its bucket (one call per size present); its batch may mix sizes,
    which the collator passes as a list in reading order. An epoch is one pass over the stream; each process counts
    its own passes (`epoch`), since parts of different lengths end their passes at different steps.

    The shuffle buffer is kept here rather than with `IterableDataset.shuffle`: datasets' buffer does not save its
    content in `state_dict` (it refills on load), so a resumed run would draw other rows. This one saves the source
    position (datasets' own `state_dict`), the buffered rows and those waiting in other buckets (undecoded bytes) and
    the generator, at every batch.

    Args:
        dataset (`datasets.IterableDataset`): rows with `image` (undecoded) and `text` columns, or documents.
        encode (`Callable`): pixel values `(n, 3, H, W)` in [-1, 1] -> clean scaled latents `(n, C, h, w)`.
        collate_fn (`Callable`): a list of `{"text", "latents"[, "flipped_latents"]}` examples (documents:
            `{"segments": [...]}`) -> a batch of tensors.
        image_size (`int`): pixel side given to `encode` without buckets.
        batch_size (`int`): examples per batch (the last batch of an epoch, one per bucket with buckets, may be smaller).
        shuffle_buffer_size (`int`): rows in the shuffle buffer; 0 or 1 reads the stream in order.
        seed (`int`): seed of the shuffle (the epoch is mixed in).
        process_index (`int`), num_processes (`int`): this process's part of the stream.
        device (`torch.device`, *optional*): where the batches are sent.
        center_crop (`bool`), random_flip (`bool`), strict (`bool`): as in [`encode_latents`].
        aspect_ratio_buckets (`list[tuple[int, int]]`, *optional*): `(height, width)` sizes; each image is encoded at
            the one closest to its aspect ratio.
        interleaved (`bool`): the rows are documents.
    """

    def __init__(
        self,
        dataset: datasets.IterableDataset,
        encode: Callable[[torch.Tensor], torch.Tensor],
        collate_fn: Callable[[list[dict]], dict],
        image_size: int,
        batch_size: int,
        shuffle_buffer_size: int = 1000,
        seed: int = 0,
        process_index: int = 0,
        num_processes: int = 1,
        device: torch.device | str | None = None,
        center_crop: bool = True,
        random_flip: bool = False,
        strict: bool = False,
        aspect_ratio_buckets: list[tuple[int, int]] | None = None,
        interleaved: bool = False,
    ):
        if batch_size <= 0:
            raise ValueError(f"`batch_size` must be positive, got {batch_size}.")
        if shuffle_buffer_size < 0:
            raise ValueError(f"`shuffle_buffer_size` must be >= 0, got {shuffle_buffer_size}.")
        self.dataset = split_dataset_by_node(dataset, rank=process_index, world_size=num_processes)
        self.encode, self.collate_fn = encode, collate_fn
        self.image_size, self.batch_size = image_size, batch_size
        self.shuffle_buffer_size, self.seed = shuffle_buffer_size, seed
        self.process_index, self.num_processes = process_index, num_processes
        self.device, self.center_crop, self.random_flip, self.strict = device, center_crop, random_flip, strict
        self.aspect_ratio_buckets, self.interleaved = aspect_ratio_buckets, interleaved
        self.epoch = 0
        self.num_skipped = 0
        self.num_rows = 0  # rows drawn this epoch (decoded or skipped)
        self._snapshot: dict | None = None  # the state after the last batch handed out
        self._resume: dict | None = None  # a loaded state, used by the next `__iter__` of its epoch

    def set_epoch(self, epoch: int) -> None:
        """Ignored (kept so that a training loop can treat this like a `DataLoader`): the stream counts its own passes,
        which differ between processes when their parts differ in length, and restores the count with its state."""

    def _fresh_state(self) -> dict:
        return {"epoch": self.epoch, "source": None, "buffer": [], "rng": None, "num_rows": 0, "pending": []}

    def __iter__(self) -> Iterator[dict]:
        resumed, state = self._resume is not None, self._resume or self._fresh_state()
        self._resume = None
        yielded = False
        source = self.dataset
        source.set_epoch(self.epoch)
        if state["source"] is not None:
            source.load_state_dict(state["source"])
        rng = np.random.default_rng([self.seed, self.epoch, self.process_index])
        if state["rng"] is not None:
            rng.bit_generator.state = state["rng"]
        buffer, self.num_rows = list(state["buffer"]), state["num_rows"]
        # Decoded examples waiting for a batch, by group (`_add`: the bucket of a pair's image, else one group),
        # with their undecoded rows, which a checkpoint saves (a resumed run decodes them again).
        groups: dict[int | None, list[tuple[int, dict, object]]] = {}
        for index, row in state.get("pending", []):
            self._add(groups, index, row)
        rows = iter(source)
        while True:
            row = self._draw(rows, buffer, rng)
            if row is not None:
                self.num_rows += 1
                added, group = self._add(groups, self.num_rows - 1, row)
                if not added or len(groups[group]) < self.batch_size:
                    continue
                members = groups.pop(group)
            elif groups:
                # The end of the pass: what is left, one smaller batch per group, taken out one at a time so that a
                # checkpoint taken while one trains still holds the others.
                members = groups.pop(next(iter(groups)))
            else:
                if not yielded and not resumed:
                    raise ValueError(
                        f"Process {self.process_index} of {self.num_processes} read no readable image-caption row "
                        f"({self.num_rows} rows drawn): the stream has too few rows (or shards) for the processes."
                    )
                # The pass is over: a checkpoint now resumes at the start of the next one.
                self.epoch += 1
                self._snapshot = None
                return
            # The state right after this batch's rows: a checkpoint taken while the batch trains resumes after it.
            self._snapshot = {
                "epoch": self.epoch,
                "source": source.state_dict(),
                "buffer": list(buffer),
                "rng": rng.bit_generator.state,
                "num_rows": self.num_rows,
                "pending": [(index, raw) for waiting in groups.values() for index, raw, _ in waiting],
            }
            yield self._batch([example for _, _, example in members])
            yielded = True

    def _add(self, groups: dict, index: int, row: dict) -> tuple[bool, int | None]:
        """Decode the row and add it to the group it batches with; returns (whether it was readable, the group)."""
        decoded = self._decode(row, index)
        if not decoded:
            return False, None
        (example,) = decoded
        group = None
        if self.aspect_ratio_buckets is not None and not self.interleaved:
            # One bucket per batch, as the cached path draws them (`BucketBatchSampler`): one encoder call, no
            # padding between rows of different lengths. A document holds images of several buckets: never grouped.
            image = example["image"]
            group = assign_bucket_index(image.height, image.width, self.aspect_ratio_buckets)
        groups.setdefault(group, []).append((index, row, example))
        return True, group

    def _draw(self, rows: Iterator[dict], buffer: list[dict], rng: np.random.Generator) -> dict | None:
        """The next row through the buffer (swap a random buffered row for a new one), None at the end."""
        if self.shuffle_buffer_size <= 1:
            return next(rows, None)
        while len(buffer) < self.shuffle_buffer_size:
            row = next(rows, None)
            if row is None:
                break
            buffer.append(row)
        if not buffer:
            return None
        index = int(rng.integers(len(buffer)))
        buffer[index], buffer[-1] = buffer[-1], buffer[index]
        return buffer.pop()

    def _decode(self, row: dict, index: int) -> list:
        """The row decoded (a pair's `{"image", "text"}`, or a document's texts and images in reading order), or
        nothing when an image is unreadable (counted in `num_skipped`; `strict` raises)."""
        if self.interleaved:
            documents, skipped = decode_documents(
                {TEXTS_COLUMN: [row[TEXTS_COLUMN]], IMAGES_COLUMN: [row[IMAGES_COLUMN]]}, index, self.strict
            )
            self.num_skipped += skipped
            return documents
        images, captions, skipped = decode_rows([row["image"]], [row["text"]], index, self.strict)
        self.num_skipped += skipped
        return [{"image": image, "text": caption} for image, caption in zip(images, captions)]

    def _batch(self, examples: list) -> dict:
        if self.interleaved:
            rows = document_rows(examples, self.encode, self.image_size, self.center_crop, self.aspect_ratio_buckets)
            encoded = [document_example(row) for row in rows]
        else:
            images = [example["image"] for example in examples]
            captions = [example["text"] for example in examples]
            encoded = encode_images(
                images, captions, self.encode, self.image_size, self.center_crop, self.random_flip,
                aspect_ratio_buckets=self.aspect_ratio_buckets,
            )  # fmt: skip
        batch = self.collate_fn(encoded)
        return send_to_device(batch, self.device) if self.device is not None else batch

    def state_dict(self) -> dict:
        """Every process's position (gathered: accelerate writes a registered object's state on the main process
        only, so all processes must call this together, as `Accelerator.save_state` does)."""
        # A loaded state not yet iterated is the position (a checkpoint saved before the first batch keeps it).
        own = {**(self._resume or self._snapshot or self._fresh_state()), "num_skipped": self.num_skipped}
        states = gather_object([own]) if self.num_processes > 1 else [own]
        return {"num_processes": self.num_processes, "states": states}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict["num_processes"] != self.num_processes:
            raise ValueError(
                f"The checkpoint's stream was split across num_processes={state_dict['num_processes']}, this run has "
                f"{self.num_processes}: a streaming run resumes exactly only on as many processes."
            )
        state = dict(state_dict["states"][self.process_index])
        self.num_skipped = state.pop("num_skipped", 0)
        self.epoch = state["epoch"]
        self._resume, self._snapshot = state, None


def document_rows(
    documents: list[list],
    encode: Callable[[torch.Tensor], torch.Tensor],
    image_size: int,
    center_crop: bool = True,
    aspect_ratio_buckets: list[tuple[int, int]] | None = None,
) -> list[dict]:
    """Decoded documents encoded into rows as the latent cache stores them (`interleaved.document_features`), so that
    a streamed document trains exactly as a cached one (`interleaved.document_example` turns a row into the
    collator's example)."""
    resize_mode = "crop" if center_crop else "default"
    columns = encode_documents(documents, encode, image_size, resize_mode, "float32", aspect_ratio_buckets)
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def take_examples(
    dataset: datasets.IterableDataset,
    num: int,
    encode: Callable[[torch.Tensor], torch.Tensor],
    image_size: int,
    center_crop: bool = True,
    aspect_ratio_buckets: list[tuple[int, int]] | None = None,
    interleaved: bool = False,
) -> list[dict]:
    """The first `num` readable image-caption pairs of the stream, encoded (validation prompts, reference images and
    the conditioning gap); of documents, each image with the text before it, one per document in turn
    (`interleaved.head_pairs`)."""
    rows = list(islice(dataset, 4 * num))
    if interleaved:
        documents, _ = decode_documents(
            {TEXTS_COLUMN: [row[TEXTS_COLUMN] for row in rows], IMAGES_COLUMN: [row[IMAGES_COLUMN] for row in rows]},
            0,
            strict=False,
        )
        encoded = document_rows(documents, encode, image_size, center_crop, aspect_ratio_buckets)
        return head_pairs(encoded, num)
    images, captions, _ = decode_rows([row["image"] for row in rows], [row["text"] for row in rows])
    return encode_images(
        images[:num], captions[:num], encode, image_size, center_crop, aspect_ratio_buckets=aspect_ratio_buckets
    )


def take_captions(dataset: datasets.IterableDataset, num: int, interleaved: bool = False) -> Iterator[str]:
    """The captions of the first `num` rows (to train a tokenizer), without reading the images; of documents, every
    text of the first `num` documents."""
    column = TEXTS_COLUMN if interleaved else "text"
    for row in islice(dataset.select_columns([column]), num):
        texts = row[column] if interleaved else [row[column]]
        yield from (text if isinstance(text, str) else str(text) for text in texts if text is not None)


__all__ = ["StreamingLatentBatches", "document_rows", "take_captions", "take_examples"]
