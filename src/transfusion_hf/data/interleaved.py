"""Interleaved documents: texts and images in reading order, several images per document, for training.

A document is two aligned lists, the layout of OBELICS and most interleaved data sets on the Hub: `texts` and `images`
of the same length, where each position holds either a text (its image None) or an image (its text None). From a
`datasets` source (a Hub data set, or a local folder of parquet / json files), `images` is a list of `datasets.Image`;
from webdataset `.tar` shards, each sample is one `.json` file holding both lists, the images as base64-encoded files
(webdataset groups a sample's files by their extension, so a variable number of image files per sample cannot be read;
OpenFlamingo's MMC4 shards embed their images in the json the same way). Images given as URLs (OBELICS itself) must be
downloaded first (e.g. with img2dataset): no training run should depend on thousands of hosts being up.

Each image is encoded once into the latent cache (`latent_cache.cache_latents`), at the square `--resolution` or at its
aspect-ratio bucket. A cached document stores its texts (None at the images), the latents of all its images
concatenated flat and each image's `(C, h, w)`; [`document_example`] turns a cached row into the collator's
`{"segments": [...]}` document, in which each image is noised with its own t (the paper's interleaved training) or kept
clean as context, as the collator draws.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Callable
from itertools import zip_longest

import datasets
import numpy as np
import PIL.Image
import torch

from ..processing_transfusion import images_to_pixel_values
from .image_text import decode_image, group_by_bucket, resize_to_pixel_values, skip_or_raise, spread_rows

TEXTS_COLUMN = "texts"
IMAGES_COLUMN = "images"
# webdataset names a sample's columns by their file extension: the document is its `.json` file.
WEBDATASET_DOCUMENT_COLUMN = "json"


def is_interleaved(dataset: datasets.Dataset) -> bool:
    """Whether the rows of a data set loaded by `load_image_text_dataset` are interleaved documents."""
    return dataset.column_names is not None and IMAGES_COLUMN in dataset.column_names


def _is_image_list(feature) -> bool:
    return isinstance(feature, (datasets.List, datasets.LargeList)) and isinstance(feature.feature, datasets.Image)


def normalize_documents(
    dataset: datasets.Dataset, texts_column: str, images_column: str, from_webdataset: bool = False
) -> datasets.Dataset:
    """Give a data set of interleaved documents the columns `texts` (`list[str | None]`) and `images`
    (`list[datasets.Image(decode=False)]`, None at the texts), and no other.

    Args:
        dataset (`datasets.Dataset`): from `datasets.load_dataset`.
        texts_column (`str`): the column (or, from webdataset, the key of each sample's json) of the texts.
        images_column (`str`): the column (or json key) of the images.
        from_webdataset (`bool`): the documents are the samples' `.json` files, images base64-encoded.

    Raises:
        ValueError: a missing column or json key, or images stored as something other than images (URLs, paths).
    """
    if from_webdataset:
        if WEBDATASET_DOCUMENT_COLUMN not in dataset.column_names:
            raise ValueError(
                f"Interleaved webdataset shards need one `.json` file per sample holding `{texts_column}` and "
                f"`{images_column}`; the samples have the files {dataset.column_names}."
            )
        features = datasets.Features(
            {
                TEXTS_COLUMN: datasets.List(datasets.Value("string")),
                IMAGES_COLUMN: datasets.List(datasets.Image(decode=False)),
            }
        )

        def from_json(rows: dict, indices: list[int]) -> dict:
            output = {TEXTS_COLUMN: [], IMAGES_COLUMN: []}
            for index, document in zip(indices, rows[WEBDATASET_DOCUMENT_COLUMN]):
                for key in (texts_column, images_column):
                    if not isinstance(document, dict) or key not in document:
                        raise ValueError(f"sample {index} of the shards: its json has no `{key}` list.")
                output[TEXTS_COLUMN].append(document[texts_column])
                output[IMAGES_COLUMN].append([_base64_image(cell, index) for cell in document[images_column]])
            return output

        return dataset.map(
            from_json, with_indices=True, batched=True, remove_columns=dataset.column_names, features=features
        )
    for role, column in (("caption_column", texts_column), ("image_column", images_column)):
        if column not in dataset.column_names:
            raise ValueError(
                f"`{role}`={column!r} is not a column of the data set; available columns: {dataset.column_names}."
            )
    feature = dataset.features[images_column]
    if not _is_image_list(feature):
        raise ValueError(
            f"`image_column`={images_column!r} holds {feature}, not a list of images: interleaved documents need their "
            "images stored in the data set (`datasets.Image`); download URLs first (e.g. with img2dataset)."
        )
    dataset = dataset.cast_column(images_column, datasets.List(datasets.Image(decode=False)))
    dataset = dataset.select_columns([texts_column, images_column])
    renames = {old: new for old, new in ((texts_column, TEXTS_COLUMN), (images_column, IMAGES_COLUMN)) if old != new}
    return dataset.rename_columns(renames) if renames else dataset


def _base64_image(cell: str | None, index: int) -> dict | None:
    """A json image cell (base64 file bytes, or None at a text) as an undecoded `datasets.Image` value."""
    if cell is None:
        return None
    try:
        return {"bytes": base64.b64decode(cell, validate=True), "path": None}
    except (binascii.Error, TypeError) as error:
        raise ValueError(
            f"sample {index} of the shards: an image is not base64-encoded file bytes ({error})."
        ) from error


def check_document(texts: list, images: list, row: int) -> None:
    """Refuse a document whose lists do not align: same length, exactly one of text and image at each position.

    Raises:
        ValueError: naming the row, the position and the fields.
    """
    if len(texts) != len(images):
        raise ValueError(
            f"document {row}: `texts` has {len(texts)} entries and `images` {len(images)}; they must align (a text or "
            "an image at each position)."
        )
    for position, (text, image) in enumerate(zip(texts, images)):
        if (text is None) == (image is None):
            raise ValueError(
                f"document {row}, position {position}: exactly one of `texts` and `images` must be set, got text "
                f"{text!r} and {'an image' if image is not None else 'no image'}."
            )


def decode_documents(rows: dict, first_row: int, strict: bool) -> tuple[list[list[str | PIL.Image.Image]], int]:
    """Decode a batch of documents into lists of texts and images in reading order; a document with an unreadable
    image is skipped whole (logged, counted) or, with `strict`, raises [`CorruptImageError`].

    Returns:
        The decoded documents and the number skipped.
    """
    documents, skipped = [], 0
    for offset, (texts, images) in enumerate(zip(rows[TEXTS_COLUMN], rows[IMAGES_COLUMN])):
        check_document(texts, images, first_row + offset)
        try:
            document = [text if image is None else decode_image(image) for text, image in zip(texts, images)]
        except Exception as error:  # noqa: BLE001 - any decoder failure means the same: a bad file
            skip_or_raise(f"unreadable image in document {first_row + offset}: {error}", error, strict)
            skipped += 1
            continue
        documents.append(document)
    return documents, skipped


def document_features(latent_dtype: str) -> datasets.Features:
    """The cached columns of a document: its texts (None at the images), the flat latents of all its images and the
    `(C, h, w)` of each."""
    return datasets.Features(
        {
            TEXTS_COLUMN: datasets.List(datasets.Value("string")),
            "latents": datasets.List(datasets.Value(latent_dtype)),
            "latent_shapes": datasets.List(datasets.List(datasets.Value("int32"), length=3)),
        }
    )


@torch.no_grad()
def encode_documents(
    documents: list[list[str | PIL.Image.Image]],
    encode: Callable[[torch.Tensor], torch.Tensor],
    image_size: int,
    resize_mode: str,
    latent_dtype: str,
    aspect_ratio_buckets: list[tuple[int, int]] | None = None,
) -> dict[str, list]:
    """Encode every image of a batch of decoded documents: one `encode` call per size (the square `image_size`, or
    each bucket present), as [`document_features`] rows.

    Args:
        documents (`list[list[str | PIL.Image.Image]]`): from [`decode_documents`].
        encode (`Callable`): pixel values `(n, 3, H, W)` in [-1, 1] -> clean scaled latents `(n, C, h, w)`.
        image_size (`int`): pixel side of every image without buckets.
        resize_mode (`str`): `"crop"` or `"default"` (see `image_text.resize_to_pixel_values`).
        latent_dtype (`str`): the stored dtype.
        aspect_ratio_buckets (`list[tuple[int, int]]`, *optional*): each image is encoded at its bucket's size.
    """
    images = [part for document in documents for part in document if not isinstance(part, str)]
    encoded: list[np.ndarray | None] = [None] * len(images)
    if aspect_ratio_buckets is None:
        groups = {None: list(range(len(images)))} if images else {}
    else:
        groups = group_by_bucket(images, aspect_ratio_buckets)
    for bucket, members in groups.items():
        chosen = [images[index] for index in members]
        if bucket is None:
            pixel_values = images_to_pixel_values(chosen, image_size, resize_mode)
        else:
            pixel_values = resize_to_pixel_values(chosen, *aspect_ratio_buckets[bucket], resize_mode)
        latents = encode(pixel_values).float().cpu().numpy().astype(latent_dtype)
        for row, index in enumerate(members):
            encoded[index] = latents[row]
    output = {TEXTS_COLUMN: [], "latents": [], "latent_shapes": []}
    position = 0
    for document in documents:
        mine = encoded[position : position + sum(not isinstance(part, str) for part in document)]
        position += len(mine)
        output[TEXTS_COLUMN].append([part if isinstance(part, str) else None for part in document])
        output["latents"].append(np.concatenate([latents.reshape(-1) for latents in mine]) if mine else [])
        output["latent_shapes"].append([list(latents.shape) for latents in mine])
    return output


def document_example(row: dict) -> dict:
    """A cached document as the collator's `{"segments": [...]}` example: its texts, and its images' latents viewed
    in their shapes (no copy), each with `noised` unset (the collator draws it, see its `clean_image_probability`). A row
    that is not a document (no `texts`) comes back as it is.

    Args:
        row (`dict`): a row of the latent cache of an interleaved data set ([`document_features`]).
    """
    if row.get(TEXTS_COLUMN) is None:
        return row
    flat = torch.as_tensor(row["latents"])
    shapes = [[int(side) for side in shape] for shape in row["latent_shapes"]]
    segments, offset, image = [], 0, 0
    for text in row[TEXTS_COLUMN]:
        if text is not None:
            segments.append(text)
            continue
        size = math.prod(shapes[image])
        segments.append({"latents": flat[offset : offset + size].view(shapes[image])})
        offset, image = offset + size, image + 1
    return {"segments": segments}


def texts_before_images(parts: list) -> list[tuple[str, object]]:
    """Each image of a document (any part that is not a `str`) with the text just before it (`""` when none)."""
    pairs, text = [], ""
    for part in parts:
        if isinstance(part, str):
            text = part
        else:
            pairs.append((text, part))
    return pairs


def document_pairs(row: dict) -> list[dict]:
    """The (text, image) pairs of a cached document: each image with the text just before it (`""` when none), as
    caption examples `{"text", "latents"}` (validation prompts, captions and the text-conditioning gap)."""
    segments = document_example(row)["segments"]
    return [{"text": text, "latents": segment["latents"]} for text, segment in texts_before_images(segments)]


_NOTHING = object()  # a missing item of a shorter document (None could be an item)


def one_per_document(per_document: list[list], num: int) -> list:
    """Up to `num` items taken from the documents in turn (the first item of every document, then the second ones,
    ...), so that `num` documents spread over a data set give items from as many documents, not all the images of the
    first few.

    Args:
        per_document (`list[list]`): each document's items, in its order.
        num (`int`): the most items returned.
    """
    taken = [
        item for items in zip_longest(*per_document, fillvalue=_NOTHING) for item in items if item is not _NOTHING
    ]
    return taken[:num]


def head_pairs(rows: list[dict], num: int) -> list[dict]:
    """The caption examples of cached documents for validation prompts, captions and the text-conditioning gap: up to
    `num` [`document_pairs`], one per document in turn ([`one_per_document`]), each document's images with text before
    them first (an image with none has an empty caption: used only when there are not enough others)."""
    pairs = [document_pairs(row) for row in rows]
    ordered = [
        [pair for pair in items if pair["text"]] + [pair for pair in items if not pair["text"]] for items in pairs
    ]
    return one_per_document(ordered, num)


def captioned_images(
    dataset: datasets.Dataset, num: int, strict: bool = False
) -> tuple[list[PIL.Image.Image], list[str], int]:
    """Up to `num` captioned images from documents spread evenly over the data set (a sorted data set must not give
    one topic), one per document in turn ([`one_per_document`]): each image with the text just before it, as
    `examples/evaluate.py` scores them. An image with no text before it is left out (it has no caption); a document
    with an unreadable image is skipped.

    Args:
        dataset (`datasets.Dataset`): documents ([`normalize_documents`]).
        num (`int`): the most pairs returned.
        strict (`bool`): raise [`CorruptImageError`] on an unreadable image instead of skipping its document.

    Returns:
        The images, their captions, and the number of documents skipped.
    """
    per_document, skipped = [], 0
    for row in spread_rows(len(dataset), num):  # one at a time, so that a message names the document's own row
        documents, bad = decode_documents(dataset[row : row + 1], row, strict)
        skipped += bad
        per_document += [
            [(text, image) for text, image in texts_before_images(document) if text] for document in documents
        ]
    pairs = one_per_document(per_document, num)
    return [image for _, image in pairs], [text for text, _ in pairs], skipped


__all__ = [
    "IMAGES_COLUMN",
    "TEXTS_COLUMN",
    "captioned_images",
    "check_document",
    "decode_documents",
    "document_example",
    "document_features",
    "document_pairs",
    "encode_documents",
    "head_pairs",
    "is_interleaved",
    "normalize_documents",
    "one_per_document",
    "texts_before_images",
]
