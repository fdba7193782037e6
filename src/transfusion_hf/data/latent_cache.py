"""A disk cache of the clean latents of an image-caption data set, encoded once, shared by every process and run.

The VAE is frozen, so each image is encoded once: every process encodes its own contiguous shard of the data set in
batches (on its accelerator), `datasets` writes the shard as an Arrow file, and all processes then read the
concatenated shards back memory-mapped. Resident memory therefore stays flat in the size of the data set, and a rerun,
a resumed run or another run with the same data and encoder reuses the files. The cache folder is named by a
fingerprint of everything the latents depend on: the data (its `datasets` fingerprint), the encoder (a hash of the
VAE's config and weights), the resolution, the crop, the flip and the stored dtype. Pixel-space training (no VAE) caches
the pixel tensors the same way.

Layout of `cache_dir/<fingerprint>/`: `latents-<rank>-of-<world>.arrow` (one per encoding process) and
`latents.json`, written last, which lists the shards: a folder without it is incomplete and is completed on the next
run.

With aspect-ratio buckets each image is encoded at the size of its bucket, so the latents differ in shape. `datasets`
stores a fixed-shape `Array3D` only (its dynamic dimension can be the first one alone), and nested lists read back
~15x slower than flat ones, so a bucketed cache stores each row's latents flat (`List(Value)`, read back as fast as
`Array3D`) with its `latent_shape` `(C, h, w)` and its `bucket` (index into the bucket list); [`unflatten_latents`]
views a row's latents in their shape again. Without buckets the cache is exactly what it was (same fingerprint).

An editing data set (a `source_image` column besides `image`, e.g. the built-in `shapes_edit`) stores the clean
source's latents as `source_latents` beside the target's `latents`; a row either of whose images is unreadable is
skipped as a whole (square path only: no buckets, no flip).

A data set of interleaved documents (`images` and `texts` lists, `data.interleaved`) stores each document's texts, the
flat latents of all its images and each image's shape (`interleaved.document_features`), square or bucketed; a
document with an unreadable image is skipped as a whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate import Accelerator, PartialState
from datasets.arrow_writer import ArrowWriter

from ..processing_transfusion import images_to_pixel_values
from .image_text import decode_rows, group_by_bucket, resize_to_pixel_values
from .interleaved import decode_documents, document_features, encode_documents, is_interleaved

logger = logging.getLogger(__name__)

# Bump when the stored content changes for the same inputs (pixel preprocessing, columns), so old caches are not read.
LATENT_CACHE_VERSION = 1
LATENT_DTYPES = ("float32", "float16")
MANIFEST_NAME = "latents.json"


@dataclass
class LatentCache:
    """What [`cache_latents`] returns.

    Args:
        dataset (`datasets.Dataset`): columns `text` (`str`) and `latents` (`torch.Tensor` of shape `(C, h, w)`), plus
            `flipped_latents` (the mirrored image) with `random_flip`, `source_latents` (the clean source) for an
            editing data set; memory-mapped, in torch format. With
            `aspect_ratio_buckets`, `latents` (and `flipped_latents`) are flat `(C * h * w,)` and the columns
            `latent_shape` (`(3,)`: `C, h, w`) and `bucket` (index into `aspect_ratio_buckets`) are added: see
            [`unflatten_latents`].
        path (`Path`): the cache folder of this fingerprint.
        num_rows (`int`): rows of the source data set.
        num_skipped (`int`): unreadable images skipped, over all processes (`num_rows - len(dataset)`).
        num_encoded (`int`): images this process encoded in this call (0 when the cache was complete).
        encode_seconds (`float`): wall time this process spent decoding and encoding them.
        aspect_ratio_buckets (`list[tuple[int, int]]`, *optional*): the `(height, width)` buckets the images were
            encoded at; None for the square path.
    """

    dataset: datasets.Dataset
    path: Path
    num_rows: int
    num_skipped: int
    num_encoded: int
    encode_seconds: float
    aspect_ratio_buckets: list[tuple[int, int]] | None = None

    @property
    def buckets(self) -> list[int] | None:
        """The bucket index of every row (what `buckets.BucketBatchSampler` groups by), None without buckets."""
        if self.aspect_ratio_buckets is None or "bucket" not in self.dataset.column_names:
            return None  # square, or interleaved documents (whose images each have their own bucket)
        # One small column read at once (`dataset["bucket"]` is a lazy column, read row by row).
        return self.dataset.select_columns(["bucket"]).with_format("numpy")[:]["bucket"].tolist()

    @property
    def reused(self) -> bool:
        """True when this process found every latent it needed already on disk."""
        return self.num_encoded == 0

    @property
    def images_per_second(self) -> float:
        """Encoding throughput of this process (decode, resize, encode and write), 0 when nothing was encoded."""
        return self.num_encoded / self.encode_seconds if self.num_encoded and self.encode_seconds > 0 else 0.0


def encoder_fingerprint(vae: torch.nn.Module | None) -> str:
    """A hash of the VAE's class, config and weights, or `"pixels"` without a VAE.

    The weights are hashed, not the model name: a local folder retrained under the same name must not reuse the
    latents of the old weights. Hashing 84M fp32 parameters (the SD VAE) takes well under a second.
    """
    if vae is None:
        return "pixels"
    hasher = hashlib.sha256(type(vae).__name__.encode())
    # Private keys (`_name_or_path`, `_use_default_values`, a list built from a set, so in random order) say where the
    # VAE came from, not what it computes.
    config = {key: value for key, value in dict(getattr(vae, "config", {})).items() if not key.startswith("_")}
    hasher.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        hasher.update(name.encode())
        # Raw bytes of any dtype (bf16 has no numpy type): reinterpret as uint8.
        hasher.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return hasher.hexdigest()[:16]


def latent_cache_fingerprint(
    dataset: datasets.Dataset,
    encoder: str,
    image_size: int,
    center_crop: bool,
    random_flip: bool,
    latent_dtype: str,
    aspect_ratio_buckets: list[tuple[int, int]] | None = None,
    interleaved: bool = False,
) -> str:
    """The cache key: a hash of the data set's `datasets` fingerprint (which follows its files, content and every
    transform such as `select`), the encoder ([`encoder_fingerprint`]) and the encoding options (the square
    `image_size`, or the buckets, which replace it, and the document layout)."""
    key = {
        "version": LATENT_CACHE_VERSION,
        # `_fingerprint` is the only handle `datasets` gives on a data set's identity (no public accessor).
        "data": dataset._fingerprint,
        "encoder": encoder,
        "image_size": image_size,
        "center_crop": center_crop,
        "random_flip": random_flip,
        "latent_dtype": latent_dtype,
    }
    if aspect_ratio_buckets is not None:
        # Only when given, so that the key of every square cache stays what it was (no cache is re-encoded).
        key["image_size"] = None
        key["aspect_ratio_buckets"] = [[int(height), int(width)] for height, width in aspect_ratio_buckets]
    if interleaved:
        key["interleaved"] = True  # only when set, like the buckets
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _shard_rows(num_rows: int, num_shards: int, index: int) -> range:
    """The rows of a contiguous shard, as `Dataset.shard(contiguous=True)` cuts them (the first
    `num_rows % num_shards` shards get one extra row)."""
    size, extra = divmod(num_rows, num_shards)
    start = index * size + min(index, extra)
    return range(start, start + size + (index < extra))


def _cache_features(
    dataset: datasets.Dataset,
    encode: Callable[[torch.Tensor], torch.Tensor],
    image_size: int,
    random_flip: bool,
    latent_dtype: str,
    aspect_ratio_buckets: list[tuple[int, int]] | None,
) -> dict:
    """The columns of the cache: documents ([`document_features`]), or captions with their latents: one fixed-shape
    `Array3D` when square, flat with their shape and bucket when bucketed (see the module docstring)."""
    if is_interleaved(dataset):
        return dict(document_features(latent_dtype))
    if aspect_ratio_buckets is None:
        with torch.no_grad():
            # The stored shape must be declared before the first batch (fixed-shape Arrow arrays read back zero-copy).
            probe = encode(torch.zeros(1, 3, image_size, image_size))
        array = datasets.Array3D(shape=tuple(probe.shape[1:]), dtype=latent_dtype)
    else:
        array = datasets.List(datasets.Value(latent_dtype))
    features = {"text": datasets.Value("string"), "latents": array}
    if SOURCE_IMAGE_COLUMN in dataset.column_names:
        features["source_latents"] = array
    if random_flip:
        features["flipped_latents"] = array
    if aspect_ratio_buckets is not None:
        features["latent_shape"] = datasets.List(datasets.Value("int32"), length=3)
        features["bucket"] = datasets.Value("int32")
    return features


def _encode_shard(
    dataset: datasets.Dataset,
    rank: int,
    world: int,
    path: Path,
    encode: Callable[[torch.Tensor], torch.Tensor],
    image_size: int,
    center_crop: bool,
    random_flip: bool,
    batch_size: int,
    strict: bool,
    latent_dtype: str,
    fingerprint: str,
    aspect_ratio_buckets: list[tuple[int, int]] | None = None,
) -> int:
    """Encode the shard `rank` of `world` into the Arrow file `path` (written to a temporary file and renamed by
    `datasets`, so a killed run never leaves a truncated shard); returns the number of images encoded."""
    resize_mode = "crop" if center_crop else "default"
    features = _cache_features(dataset, encode, image_size, random_flip, latent_dtype, aspect_ratio_buckets)
    array = features["latents"]
    has_source = SOURCE_IMAGE_COLUMN in dataset.column_names
    shard_rows = _shard_rows(len(dataset), world, rank)
    if not shard_rows:  # more processes than rows: an empty shard (`Dataset.shard` refuses to cut one)
        with ArrowWriter(features=datasets.Features(features), path=str(path)) as writer:
            writer.finalize()
        return 0
    shard = dataset.shard(num_shards=world, index=rank, contiguous=True)
    encoded = 0

    def encode_bucketed_batch(rows: dict, indices: list[int]) -> dict:
        nonlocal encoded
        images, captions, _ = decode_rows(rows["image"], rows["text"], shard_rows.start + indices[0], strict)
        output = {name: [None] * len(images) for name in features}
        output["text"] = captions
        for bucket, members in group_by_bucket(images, aspect_ratio_buckets).items():
            # The encoder takes one pixel size per call: one call per bucket present in this batch.
            height, width = aspect_ratio_buckets[bucket]
            pixel_values = resize_to_pixel_values([images[i] for i in members], height, width, resize_mode)
            with torch.no_grad():
                encoded_here = {"latents": encode(pixel_values).float().cpu().numpy().astype(latent_dtype)}
                if random_flip:
                    flipped = encode(torch.flip(pixel_values, dims=[-1]))
                    encoded_here["flipped_latents"] = flipped.float().cpu().numpy().astype(latent_dtype)
            for row, position in enumerate(members):
                for name, latents in encoded_here.items():
                    output[name][position] = latents[row].reshape(-1)
                output["latent_shape"][position] = list(encoded_here["latents"].shape[1:])
                output["bucket"][position] = bucket
        encoded += len(images)
        return output

    def encode_batch(rows: dict, indices: list[int]) -> dict:
        nonlocal encoded
        first_row = shard_rows.start + indices[0]
        if has_source:
            sources, images, captions = decode_edit_rows(rows, first_row, strict)
        else:
            images, captions, _ = decode_rows(rows["image"], rows["text"], first_row, strict)
        if not images:
            empty = np.zeros((0, *array.shape), dtype=latent_dtype)
            return {"text": [], **{name: empty for name in features if name != "text"}}
        pixel_values = images_to_pixel_values(images, image_size, resize_mode)
        with torch.no_grad():
            output = {"text": captions, "latents": encode(pixel_values).float().cpu().numpy().astype(latent_dtype)}
            if has_source:
                source_pixels = images_to_pixel_values(sources, image_size, resize_mode)
                output["source_latents"] = encode(source_pixels).float().cpu().numpy().astype(latent_dtype)
            if random_flip:
                flipped = encode(torch.flip(pixel_values, dims=[-1]))
                output["flipped_latents"] = flipped.float().cpu().numpy().astype(latent_dtype)
        encoded += len(images) + (len(sources) if has_source else 0)
        return output

    def encode_document_batch(rows: dict, indices: list[int]) -> dict:
        nonlocal encoded
        documents, _ = decode_documents(rows, shard_rows.start + indices[0], strict)
        encoded += sum(not isinstance(part, str) for document in documents for part in document)
        return encode_documents(documents, encode, image_size, resize_mode, latent_dtype, aspect_ratio_buckets)

    if is_interleaved(dataset):
        encode_function = encode_document_batch
    else:
        encode_function = encode_batch if aspect_ratio_buckets is None else encode_bucketed_batch
    shard.map(
        encode_function,
        with_indices=True,
        batched=True,
        batch_size=batch_size,
        # Rows leave the writer's buffer every batch: memory stays one batch, whatever the data set's size.
        writer_batch_size=batch_size,
        remove_columns=shard.column_names,
        features=datasets.Features(features),
        cache_file_name=str(path),
        load_from_cache_file=False,
        new_fingerprint=f"{fingerprint}-{rank}-of-{world}",
        desc=f"Encoding latents (process {rank} of {world})",
    )
    return encoded


SOURCE_IMAGE_COLUMN = "source_image"


def decode_edit_rows(rows: dict, first_row: int, strict: bool) -> tuple[list, list, list[str]]:
    """Decode the source and target images of a batch of edit rows, skipping (or, with `strict`, raising on) a row
    either of whose images is unreadable, so that sources, targets and instructions stay aligned."""
    sources, images, captions = [], [], []
    for offset, (source, target, text) in enumerate(zip(rows[SOURCE_IMAGE_COLUMN], rows["image"], rows["text"])):
        decoded_source, _, _ = decode_rows([source], [text], first_row + offset, strict)
        decoded_target, kept, _ = decode_rows([target], [text], first_row + offset, strict)
        if decoded_source and decoded_target:
            sources.append(decoded_source[0])
            images.append(decoded_target[0])
            captions.extend(kept)
    return sources, images, captions


def cache_latents(
    dataset: datasets.Dataset,
    encode: Callable[[torch.Tensor], torch.Tensor],
    image_size: int,
    cache_dir: str | os.PathLike,
    encoder: str,
    center_crop: bool = True,
    random_flip: bool = False,
    batch_size: int = 64,
    strict: bool = False,
    latent_dtype: str = "float32",
    state: PartialState | Accelerator | None = None,
    aspect_ratio_buckets: list[tuple[int, int]] | None = None,
) -> LatentCache:
    """Encode every image of `dataset` once into a fingerprinted disk cache and read it back memory-mapped.

    Each process encodes its contiguous shard (`dataset.shard(num_processes, process_index, contiguous=True)`) unless
    the cache already holds it; the processes then wait for each other and all read the concatenated shards. Every
    process must call this function (it synchronises them twice). In multi-node training `cache_dir` must be on a
    file system all nodes share. With `strict`, a corrupt image stops the process that meets it; the others then wait
    at the barrier until the launcher ends the job (as for any exception raised by one process alone).

    Args:
        dataset (`datasets.Dataset`): `image` and `text` columns (from [`load_image_text_dataset`]); with a
            `source_image` column (an editing data set) its latents are stored as `source_latents`; with `images` and
            `texts` (interleaved documents) see `interleaved.document_features`.
        encode (`Callable`): pixel values `(n, 3, S, S)` in [-1, 1] on the CPU -> clean scaled latents `(n, C, h, w)`
            on any device (e.g. `functools.partial(pixels_to_latents, vae)` with the VAE on the accelerator, or the
            identity in pixel space).
        image_size (`int`): pixel side `S` given to `encode` (unused with `aspect_ratio_buckets`).
        cache_dir (`str` or `os.PathLike`): parent folder of the caches.
        encoder (`str`): identity of `encode` for the fingerprint ([`encoder_fingerprint`] of the VAE).
        center_crop (`bool`): keep the aspect ratio and center-crop (else stretch).
        random_flip (`bool`): also store the latents of the mirrored image (`flipped_latents`).
        batch_size (`int`): images per `encode` call.
        strict (`bool`): raise [`CorruptImageError`] on the first unreadable image instead of skipping it.
        latent_dtype (`str`): the stored dtype: `"float32"`, or `"float16"` (half the disk and read bandwidth; read
            back as float32 tensors of the rounded values, like every float column in `datasets`' torch format).
        state (`PartialState` or `Accelerator`, *optional*): gives the process index and count and the barrier;
            defaults to accelerate's `PartialState()`.
        aspect_ratio_buckets (`list[tuple[int, int]]`, *optional*): `(height, width)` buckets (e.g. from
            `buckets.parse_aspect_ratio_buckets`): each image is resized and center-cropped (or stretched without
            `center_crop`) to the bucket closest to its aspect ratio (`buckets.assign_bucket`) instead of `image_size`
            square; the rows store flat latents, their `latent_shape` and `bucket` (see [`unflatten_latents`]).

    Returns:
        [`LatentCache`]: the memory-mapped data set and the counts.
    """
    if latent_dtype not in LATENT_DTYPES:
        raise ValueError(f"`latent_dtype` must be one of {LATENT_DTYPES}, got {latent_dtype!r}.")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    if SOURCE_IMAGE_COLUMN in dataset.column_names and (random_flip or aspect_ratio_buckets is not None):
        raise ValueError(
            f"A data set with a `{SOURCE_IMAGE_COLUMN}` column (edits) is cached square only: no `random_flip`, no "
            "`aspect_ratio_buckets`."
        )
    state = state if state is not None else PartialState()
    rank, world = state.process_index, state.num_processes
    if aspect_ratio_buckets is not None:
        aspect_ratio_buckets = [(int(height), int(width)) for height, width in aspect_ratio_buckets]
        if not aspect_ratio_buckets:
            raise ValueError("`aspect_ratio_buckets` is empty: give at least one (height, width), or None.")
    if is_interleaved(dataset) and random_flip:
        raise ValueError("Interleaved documents are cached without `random_flip` (a text may name a side).")
    fingerprint = latent_cache_fingerprint(
        dataset, encoder, image_size, center_crop, random_flip, latent_dtype, aspect_ratio_buckets,
        interleaved=is_interleaved(dataset),
    )  # fmt: skip
    folder = Path(cache_dir) / fingerprint
    manifest_path = folder / MANIFEST_NAME
    shard_path = folder / f"latents-{rank:05d}-of-{world:05d}.arrow"
    num_encoded, seconds = 0, 0.0
    if not manifest_path.is_file() and not shard_path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        num_encoded = _encode_shard(
            dataset,
            rank,
            world,
            shard_path,
            encode,
            image_size,
            center_crop,
            random_flip,
            batch_size,
            strict,
            latent_dtype,
            fingerprint,
            aspect_ratio_buckets,
        )
        seconds = time.perf_counter() - started
    # Every process takes both barriers whatever it found on disk, so none can wait for a barrier the others skip.
    state.wait_for_everyone()
    if state.is_main_process and not manifest_path.is_file():
        _write_manifest(folder, world, len(dataset), fingerprint)
    state.wait_for_everyone()
    manifest = json.loads(manifest_path.read_text())
    shards = [datasets.Dataset.from_file(str(folder / name)) for name in manifest["shards"]]
    cached = datasets.concatenate_datasets(shards) if len(shards) > 1 else shards[0]
    cached.set_format("torch")
    num_skipped = len(dataset) - len(cached)
    if num_skipped:
        what = "documents with an unreadable image" if is_interleaved(dataset) else "unreadable images"
        logger.warning("skipped %d %s of %d", num_skipped, what, len(dataset))
    return LatentCache(cached, folder, len(dataset), num_skipped, num_encoded, seconds, aspect_ratio_buckets)


LATENT_COLUMNS = ("latents", "flipped_latents", "source_latents")


def unflatten_latents(example: dict) -> dict:
    """View the flat latents of a row of a bucketed cache in their shape `(C, h, w)` (no copy); a row without
    `latent_shape` (a square cache, an in-memory example) comes back as it is.

    Args:
        example (`dict`): a row of `LatentCache.dataset`, with `latents` (and `flipped_latents`) `(C * h * w,)` and
            `latent_shape` `(3,)`.

    Returns:
        `dict`: a new dict with `latents` (and `flipped_latents`) of shape `(C, h, w)`, without `latent_shape`.
    """
    if example.get("latent_shape") is None:
        return example
    shape = [int(size) for size in example["latent_shape"]]
    unflattened = {key: value for key, value in example.items() if key != "latent_shape"}
    for key in LATENT_COLUMNS:
        if unflattened.get(key) is not None:
            unflattened[key] = unflattened[key].view(shape)
    return unflattened


def _write_manifest(folder: Path, world: int, num_rows: int, fingerprint: str) -> None:
    """Mark the cache complete: the list of shards, written atomically (a reader sees all of it or nothing)."""
    names = [f"latents-{rank:05d}-of-{world:05d}.arrow" for rank in range(world)]
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(f"The latent cache {folder} lacks the shards {missing} after every process wrote its own.")
    num_examples = sum(datasets.Dataset.from_file(str(folder / name)).num_rows for name in names)
    manifest = {"fingerprint": fingerprint, "num_rows": num_rows, "num_examples": num_examples, "shards": names}
    temporary = folder / f".{MANIFEST_NAME}.{os.getpid()}"
    temporary.write_text(json.dumps(manifest, indent=2))
    os.replace(temporary, folder / MANIFEST_NAME)


__all__ = [
    "LATENT_CACHE_VERSION",
    "LATENT_DTYPES",
    "LatentCache",
    "cache_latents",
    "encoder_fingerprint",
    "latent_cache_fingerprint",
    "unflatten_latents",
]
