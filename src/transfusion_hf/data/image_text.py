"""Image-caption data for training: load from the Hub, a local image folder, or the built-in shapes or glyphs, then
encode every image once into clean latents (the VAE is frozen, so encoding it at every step would only burn compute):
into memory here ([`encode_latents`]), or into a disk cache shared by processes and runs (`latent_cache`).

Images are encoded at the square `--resolution`, or, with `--aspect_ratio_buckets`, each at the size of its bucket
(`buckets.assign_bucket`): the latents then differ in shape from row to row, and each row records its bucket."""

from __future__ import annotations

import argparse
import io
import logging
import os
from collections.abc import Callable

import datasets
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor

from ..processing_transfusion import images_to_pixel_values
from .buckets import BUCKETS_FLAG, assign_bucket_index, parse_aspect_ratio_buckets

logger = logging.getLogger(__name__)
# Data sets generated in this package, not loaded by `datasets`.
BUILTIN_DATASETS = ("shapes", "glyphs", "shapes_edit")
# Built-in data sets whose rows are edits: a clean `source_image`, the instruction (`text`) and the target (`image`).
EDITING_DATASETS = ("shapes_edit",)


class CorruptImageError(ValueError):
    """An image of the data set cannot be decoded (raised with `strict=True`)."""


def load_image_text_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    split: str = "train",
    image_column: str = "image",
    caption_column: str = "text",
    cache_dir: str | None = None,
    shapes_num_samples: int = 20000,
    seed: int = 0,
    glyphs_num_samples: int = 20000,
    glyphs_resolution: int = 32,
    train_data_files: list[str] | None = None,
    streaming: bool = False,
    shapes_image_sizes: list[tuple[int, int]] | None = None,
    interleaved: bool = False,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load an image-caption data set, or a data set of interleaved documents, with `datasets`.

    Exactly one source: `dataset_name="shapes"` (the built-in captioned shapes), `dataset_name="shapes_edit"` (the
    built-in shapes editing triples, `shapes_num_samples` rows: a `source_image` column besides `image`, the target,
    and `text`, the instruction; `data.shapes_edit`), `dataset_name="glyphs"` (the
    built-in rendered characters, `glyphs_num_samples` rows at `glyphs_resolution` px; for both, `split` is `"train"`,
    `"held_out"`, the combinations never trained on, or `"all"`), another `dataset_name` (a
    Hub data set, e.g. `"lambdalabs/naruto-blip-captions"`), `train_data_dir` (a folder of images with a
    `metadata.jsonl` holding `file_name` and `text`, the diffusers convention, read by the `imagefolder` builder), or
    `train_data_files` (webdataset `.tar` shards, read by the `webdataset` builder: pass the columns, e.g.
    `image_column="jpg"`, `caption_column="txt"`).

    `shapes_image_sizes` (a list of `(height, width)`) draws the built-in shapes on canvases of those sizes, split
    evenly among the rows (`shapes.load_shapes_dataset(image_sizes=...)`); default 32x32.

    `interleaved=True` reads documents of several texts and images instead of pairs (`data.interleaved`): from a
    Hub data set or a local folder of parquet / json files, `image_column` is a list of images and `caption_column`
    the aligned list of texts (OBELICS's layout); from webdataset shards both are keys of each sample's `.json`, the
    images base64-encoded. Not with the built-in data sets nor an image folder.

    `streaming=True` returns a `datasets.IterableDataset` read on the fly (the built-in data sets are converted with
    `to_iterable_dataset`, one shard per 64 rows so that processes can split them by shard).

    Images are left undecoded (`Image(decode=False)`), so that a corrupt file can be counted and skipped later
    instead of crashing the data loader.

    Returns:
        `datasets.Dataset` with the columns `image` and `text` (and `source_image` for an editing data set), or
        `images` and `texts` for interleaved documents.

    Raises:
        ValueError: a missing column, naming it and listing the available ones.
    """
    sources = (dataset_name, train_data_dir, train_data_files)
    if sum(source is not None for source in sources) != 1:
        raise ValueError(
            f"Give exactly one of `dataset_name`={dataset_name!r}, `train_data_dir`={train_data_dir!r} and "
            f"`train_data_files`={train_data_files!r}."
        )
    if interleaved:
        return load_documents(
            dataset_name, dataset_config_name, train_data_dir, train_data_files, split, image_column, caption_column,
            cache_dir, streaming,
        )  # fmt: skip
    if dataset_name == "shapes":
        from .shapes import load_shapes_dataset

        dataset = load_shapes_dataset(
            split=split, num_samples=shapes_num_samples, seed=seed, image_sizes=shapes_image_sizes
        )
        image_column, caption_column = "image", "text"
    elif dataset_name == "shapes_edit":
        from .shapes_edit import load_shapes_edit_dataset

        dataset = load_shapes_edit_dataset(split=split, num_samples=shapes_num_samples, seed=seed)
        image_column, caption_column = "image", "text"
    elif dataset_name == "glyphs":
        from .glyphs import load_glyphs_dataset

        dataset = load_glyphs_dataset(
            split=split, num_samples=glyphs_num_samples, seed=seed, resolution=glyphs_resolution
        )
        image_column, caption_column = "image", "text"
    elif dataset_name is not None:
        dataset = datasets.load_dataset(
            dataset_name, dataset_config_name, split=split, cache_dir=cache_dir, streaming=streaming
        )
    elif train_data_dir is not None:
        dataset = datasets.load_dataset(
            "imagefolder", data_dir=train_data_dir, split=split, cache_dir=cache_dir, streaming=streaming
        )
    else:
        dataset = datasets.load_dataset(
            "webdataset",
            data_files={split: list(train_data_files)},
            split=split,
            cache_dir=cache_dir,
            streaming=streaming,
        )
    if streaming and isinstance(dataset, datasets.Dataset):
        dataset = dataset.to_iterable_dataset(num_shards=max(1, min(len(dataset) // 64, 1024)))
    for role, column in (("image_column", image_column), ("caption_column", caption_column)):
        # A stream whose features are unknown until read has no `column_names`: its columns are checked when read.
        if dataset.column_names is not None and column not in dataset.column_names:
            raise ValueError(
                f"`{role}`={column!r} is not a column of the data set; available columns: {dataset.column_names}."
            )
    # Cast before selecting: a stream's `select_columns` applies (decodes) the features of every row it reads.
    # An editing data set keeps its clean source images beside the targets.
    image_columns = [image_column] + (["source_image"] if dataset_name in EDITING_DATASETS else [])
    for column in image_columns:
        if dataset.features is not None and isinstance(dataset.features[column], datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    dataset = dataset.select_columns([*image_columns, caption_column])
    # Only the columns whose name changes: a stream refuses to rename a column to itself.
    renames = {old: new for old, new in ((image_column, "image"), (caption_column, "text")) if old != new}
    if renames:
        dataset = dataset.rename_columns(renames)
    return dataset


def load_documents(
    dataset_name: str | None,
    dataset_config_name: str | None,
    train_data_dir: str | None,
    train_data_files: list[str] | None,
    split: str,
    image_column: str,
    caption_column: str,
    cache_dir: str | None,
    streaming: bool,
) -> datasets.Dataset:
    """The interleaved branch of [`load_image_text_dataset`] (same arguments): the documents with the columns `texts`
    and `images` (`data.interleaved.normalize_documents`), a `datasets.IterableDataset` with `streaming`."""
    from .interleaved import normalize_documents

    if dataset_name in BUILTIN_DATASETS or train_data_dir is not None:
        given = f"`dataset_name`={dataset_name!r}" if dataset_name in BUILTIN_DATASETS else None
        given = given or f"`train_data_dir`={train_data_dir!r}"
        raise ValueError(
            f"Interleaved documents are read from a Hub data set, a local folder of parquet / json files "
            f"(`dataset_name`) or webdataset shards (`train_data_files`), not {given}."
        )
    if train_data_files is not None:
        dataset = datasets.load_dataset(
            "webdataset",
            data_files={split: list(train_data_files)},
            split=split,
            cache_dir=cache_dir,
            streaming=streaming,
        )
        return normalize_documents(dataset, caption_column, image_column, from_webdataset=True)
    dataset = datasets.load_dataset(
        dataset_name, dataset_config_name, split=split, cache_dir=cache_dir, streaming=streaming
    )
    return normalize_documents(dataset, caption_column, image_column)


def check_image_text_source(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    cache_dir: str | None = None,
    train_data_files: list[str] | None = None,
    split: str | None = None,
) -> None:
    """Check that the source of [`load_image_text_dataset`] exists and can be reached, without loading it.

    `datasets.load_dataset_builder` resolves the data files (a listing of the folder, or a few Hub API calls) and
    reads no data, so a training script can call this in its argument check and fail in seconds, not after loading.
    With `split`, a built-in data set's split is checked too.

    Raises:
        ValueError: one line naming the source (`dataset_name` or `train_data_dir`, or `dataset_split`) and the reason.
    """
    if dataset_name in BUILTIN_DATASETS:
        from .splits import SPLITS

        if split is not None and split not in SPLITS:
            raise ValueError(f"`dataset_split`={split!r}: the built-in {dataset_name} have the splits {list(SPLITS)}.")
        return
    if train_data_files is not None:
        missing = [path for path in train_data_files if not os.path.isfile(path)]
        if missing:
            raise ValueError(f"`train_data_files`: no such file {missing[0]!r} (of {len(train_data_files)} given).")
        return
    if train_data_dir is not None:
        if not os.path.isdir(train_data_dir):
            raise ValueError(f"`train_data_dir`={train_data_dir!r} is not a folder.")
        name, kwargs, role = "imagefolder", {"data_dir": train_data_dir}, f"`train_data_dir`={train_data_dir!r}"
    elif dataset_name is not None:
        name, kwargs, role = dataset_name, {"name": dataset_config_name}, f"`dataset_name`={dataset_name!r}"
    else:
        return  # no source at all: `load_image_text_dataset` names both options
    try:
        datasets.load_dataset_builder(name, cache_dir=cache_dir, **kwargs)
    except (OSError, ValueError) as error:
        # OSError covers a missing folder or repo, no network, a gated repo (datasets' and huggingface_hub's errors);
        # ValueError an unknown config name. The first line of the message says which.
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{role} cannot be loaded: {reason}") from error


def decode_image(value) -> PIL.Image.Image:
    """Decode one `image` cell (a PIL image, or the `{"bytes", "path"}` dict of an undecoded `datasets.Image`)."""
    if isinstance(value, PIL.Image.Image):
        return value
    if isinstance(value, dict):
        source = io.BytesIO(value["bytes"]) if value.get("bytes") else value.get("path")
        image = PIL.Image.open(source)
        image.load()  # force the decode now, so a truncated file fails here
        return image
    raise TypeError(f"unsupported image cell of type {type(value).__name__}")


def spread_rows(num_rows: int, num: int) -> list[int]:
    """Up to `num` row indices spread evenly over `num_rows` rows, first and last included: the rows a validation or
    an evaluation reads, so that a data set sorted by class or topic does not give one class.

    Args:
        num_rows (`int`): rows in the data set.
        num (`int`): rows wanted (fewer come back when the data set is smaller).
    """
    # float64: float32 rounds `num_rows - 1` above 2**24 rows, sometimes up, past the last row.
    return torch.linspace(0, num_rows - 1, min(num_rows, num), dtype=torch.float64).round().long().unique().tolist()


def skip_or_raise(message: str, error: Exception, strict: bool) -> None:
    """An unreadable image: raise [`CorruptImageError`] with `message` when `strict`, else log that it is skipped (the
    caller counts it)."""
    if strict:
        raise CorruptImageError(message) from error
    logger.warning("skipping %s", message)


def decode_rows(
    cells: list, captions: list, first_row: int = 0, strict: bool = False
) -> tuple[list[PIL.Image.Image], list[str], int]:
    """Decode a batch of `image` cells, skipping (and logging) the unreadable ones.

    Args:
        cells (`list`): `image` cells (see [`decode_image`]).
        captions (`list`): the caption of each cell.
        first_row (`int`): data set row of `cells[0]`, for the messages.
        strict (`bool`): raise [`CorruptImageError`] on the first unreadable image instead of skipping it.

    Returns:
        The decoded images, their captions (as `str`) and the number of skipped cells.
    """
    images, kept_captions, skipped = [], [], 0
    for offset, (cell, caption) in enumerate(zip(cells, captions)):
        try:
            images.append(decode_image(cell))
        except Exception as error:  # noqa: BLE001 - any decoder failure means the same: a bad file
            where = cell.get("path") if isinstance(cell, dict) else None
            skip_or_raise(
                f"unreadable image at row {first_row + offset} ({where or 'in memory'}): {error}", error, strict
            )
            skipped += 1
            continue
        kept_captions.append(caption if isinstance(caption, str) else str(caption))
    return images, kept_captions, skipped


@torch.no_grad()
def encode_latents(
    dataset: datasets.Dataset,
    encode: Callable[[torch.Tensor], torch.Tensor],
    image_size: int,
    center_crop: bool = True,
    random_flip: bool = False,
    batch_size: int = 64,
    strict: bool = False,
    caption_prefix: str = "",
    aspect_ratio_buckets: list[tuple[int, int]] | None = None,
) -> tuple[list[dict], int]:
    """Decode, resize and encode every image once, into memory (for small data; [`cache_latents`] writes a disk cache
    and reads it back memory-mapped, flat in the data set's size).

    Args:
        dataset (`datasets.Dataset`): with `image` and `text` columns (from [`load_image_text_dataset`]).
        encode (`Callable`): pixel values `(n, 3, H, W)` in [-1, 1] -> clean scaled latents `(n, C, h, w)`
            (the VAE, or the identity in pixel space).
        image_size (`int`): pixel side given to `encode` (unused with `aspect_ratio_buckets`).
        center_crop (`bool`): keep the aspect ratio and center-crop (else stretch).
        random_flip (`bool`): also store the latents of the mirrored image; the collator picks one at random.
        strict (`bool`): raise [`CorruptImageError`] on the first unreadable image instead of skipping it.
        aspect_ratio_buckets (`list[tuple[int, int]]`, *optional*): `(height, width)` buckets; each image is encoded
            at the size of its bucket ([`assign_bucket`]) instead of `image_size` square.

    Returns:
        The examples (`{"text": str, "latents": Tensor(C, h, w)}`, plus `"flipped_latents"` with `random_flip` and
        `"bucket"`, the index of the image's bucket, with `aspect_ratio_buckets`) and the number of skipped images.
    """
    examples: list[dict] = []
    skipped = 0
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        images, captions, skipped_here = decode_rows(rows["image"], rows["text"], start, strict)
        skipped += skipped_here
        examples += encode_images(
            images, captions, encode, image_size, center_crop, random_flip, caption_prefix, aspect_ratio_buckets
        )
    if skipped:
        logger.warning("skipped %d unreadable images of %d", skipped, len(dataset))
    return examples, skipped


@torch.no_grad()
def encode_images(
    images: list[PIL.Image.Image],
    captions: list[str],
    encode: Callable[[torch.Tensor], torch.Tensor],
    image_size: int,
    center_crop: bool = True,
    random_flip: bool = False,
    caption_prefix: str = "",
    aspect_ratio_buckets: list[tuple[int, int]] | None = None,
) -> list[dict]:
    """Resize and encode one batch of decoded images (see [`encode_latents`] for the arguments).

    Returns:
        One example per image: `{"text": str, "latents": Tensor(C, h, w)}` on the CPU, plus `"flipped_latents"` with
        `random_flip` and `"bucket"` (`int`, index into `aspect_ratio_buckets`) with buckets.
    """
    if not images:
        return []
    resize_mode = "crop" if center_crop else "default"
    examples = [{"text": caption_prefix + caption} for caption in captions]
    if aspect_ratio_buckets is None:
        groups = {None: list(range(len(images)))}
    else:
        groups = group_by_bucket(images, aspect_ratio_buckets)
    for bucket, members in groups.items():
        # The encoder takes one pixel size per call: one call per bucket present in this batch.
        if bucket is None:
            pixel_values = images_to_pixel_values(images, image_size, resize_mode)
        else:
            height, width = aspect_ratio_buckets[bucket]
            pixel_values = resize_to_pixel_values([images[i] for i in members], height, width, resize_mode)
        latents = encode(pixel_values).float().cpu()
        flipped = encode(torch.flip(pixel_values, dims=[-1])).float().cpu() if random_flip else None
        for row, index in enumerate(members):
            examples[index]["latents"] = latents[row]
            if flipped is not None:
                examples[index]["flipped_latents"] = flipped[row]
            if bucket is not None:
                examples[index]["bucket"] = bucket
    return examples


def group_by_bucket(images: list[PIL.Image.Image], buckets: list[tuple[int, int]]) -> dict[int, list[int]]:
    """The positions of `images` in each bucket ([`assign_bucket_index`] of each image's size).

    Returns:
        `dict[int, list[int]]`: bucket index -> positions in `images`, buckets in order of first appearance.
    """
    groups: dict[int, list[int]] = {}
    for position, image in enumerate(images):
        groups.setdefault(assign_bucket_index(image.height, image.width, buckets), []).append(position)
    return groups


def resize_to_pixel_values(
    images: list[PIL.Image.Image], height: int, width: int, resize_mode: str = "crop"
) -> torch.Tensor:
    """Resize decoded images to `height x width` pixel values in [-1, 1], as `images_to_pixel_values` does at a
    square size (diffusers' `VaeImageProcessor`; `"crop"` resizes to cover and center-crops, `"default"` stretches).

    Args:
        images (`list[PIL.Image.Image]`): decoded images of any mode and size.
        height (`int`): output height in pixels.
        width (`int`): output width in pixels.
        resize_mode (`str`): `"crop"` or `"default"`.

    Returns:
        `torch.Tensor` of shape `(len(images), 3, height, width)`.
    """
    processor = VaeImageProcessor(vae_scale_factor=1, do_resize=True, do_normalize=True)
    return processor.preprocess(
        [image.convert("RGB") for image in images], height=height, width=width, resize_mode=resize_mode
    )


def add_data_arguments(parser: argparse.ArgumentParser, aspect_ratio_buckets: bool = False) -> argparse._ArgumentGroup:
    """The data options shared by the scripts (`train_transfusion.py`, `train_vae.py`, `evaluate.py`); returns the
    group so a script can add its own. `aspect_ratio_buckets` adds `--aspect_ratio_buckets` (the training script's:
    a script that works at the square `--resolution` does not take it, rather than accept and ignore it)."""
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset_name",
        default=None,
        help="Hub data set id, or 'shapes' / 'glyphs' for the built-in data, 'shapes_edit' for the built-in editing "
        "task (source image, instruction, target image; see transfusion_hf.data.shapes_edit).",
    )
    data.add_argument("--dataset", dest="dataset_name", help="Alias of --dataset_name (e.g. --dataset shapes).")
    data.add_argument("--dataset_config_name", default=None)
    data.add_argument("--dataset_split", default="train")
    data.add_argument("--train_data_dir", default=None, help="Image folder with metadata.jsonl (file_name, text).")
    data.add_argument(
        "--train_data_files",
        nargs="+",
        default=None,
        help="webdataset .tar shards (e.g. with --image_column jpg --caption_column txt).",
    )
    data.add_argument(
        "--image_column", default=None, help="Column of the images (default 'image'; 'images' with --interleaved)."
    )
    data.add_argument(
        "--caption_column", default=None, help="Column of the captions (default 'text'; 'texts' with --interleaved)."
    )
    data.add_argument("--cache_dir", default=None)
    data.add_argument("--resolution", type=int, default=32)
    if aspect_ratio_buckets:
        data.add_argument(
            BUCKETS_FLAG,
            default=None,
            help="Aspect-ratio buckets as HxW (height x width, pixels), e.g. 32x32,32x48,48x32: each image is encoded "
            "at the bucket closest to its aspect ratio (resize + center crop) instead of --resolution square, and each "
            "batch holds one bucket (a batch of --interleaved documents may mix them). Each side a multiple of "
            "patch_size x the VAE's downsampling. Built-in shapes are drawn at these sizes, split evenly. The sizes "
            "share the recipe's steps, so each size beyond the first adds half of them (docs/research/image_sizes.md; "
            "--max_train_steps overrides). Default: square --resolution.",
        )
    data.add_argument("--center_crop", action=argparse.BooleanOptionalAction, default=True)
    data.add_argument("--random_flip", action="store_true", help="Also train on the mirrored images.")
    data.add_argument("--max_train_samples", type=int, default=None)
    data.add_argument("--shapes_num_samples", type=int, default=20000, help="Rows of the built-in shapes (and edits).")
    data.add_argument("--glyphs_num_samples", type=int, default=20000, help="Rows of the built-in glyphs.")
    data.add_argument("--strict_data", action="store_true", help="Fail on an unreadable image instead of skipping.")
    return data


def data_columns_from_args(args: argparse.Namespace) -> tuple[str, str]:
    """The image and caption columns [`load_dataset_from_args`] reads: `--image_column` and `--caption_column`, by
    default `image` and `text`, or `images` and `texts` for interleaved documents (`--interleaved`)."""
    interleaved = getattr(args, "interleaved", False)
    image_column = getattr(args, "image_column", None) or ("images" if interleaved else "image")
    caption_column = getattr(args, "caption_column", None) or ("texts" if interleaved else "text")
    return image_column, caption_column


def aspect_ratio_buckets_from_args(
    args: argparse.Namespace, multiple: int = 1, max_side: int | None = None
) -> list[tuple[int, int]] | None:
    """The parsed `--aspect_ratio_buckets` ([`parse_aspect_ratio_buckets`]), or None without it (square
    `--resolution`).

    Args:
        args (`argparse.Namespace`): the parsed flags (a namespace without the flag means no buckets).
        multiple (`int`): each side must be a multiple of it (`patch_size * vae_scale_factor`).
        max_side (`int`, *optional*): each side must be at most this (`max_latent_size * vae_scale_factor`).

    Raises:
        ValueError: one line naming `--aspect_ratio_buckets` and its value.
    """
    value = getattr(args, BUCKETS_FLAG.lstrip("-"), None)
    return None if value is None else parse_aspect_ratio_buckets(value, multiple, max_side)


def check_dataset_from_args(
    args: argparse.Namespace, bucket_multiple: int = 1, max_bucket_side: int | None = None
) -> None:
    """[`check_image_text_source`] with the options of [`add_data_arguments`]: the source and the split
    [`load_dataset_from_args`] will read, checked without loading (every script that takes those flags calls it),
    `--max_train_samples` (positive), and `--aspect_ratio_buckets`: each side a positive multiple of
    `bucket_multiple` (`patch_size * vae_scale_factor`, when the script knows it) and at most `max_bucket_side`, and
    large enough for the built-in shapes."""
    if args.max_train_samples is not None and args.max_train_samples <= 0:
        raise ValueError(f"--max_train_samples must be positive, got {args.max_train_samples}.")
    buckets = aspect_ratio_buckets_from_args(args, bucket_multiple, max_bucket_side)
    if getattr(args, "interleaved", False):
        check_interleaved_args(args)
    if args.dataset_name in EDITING_DATASETS:
        for flag, given in (
            (BUCKETS_FLAG, buckets is not None),
            ("--random_flip", getattr(args, "random_flip", False)),
        ):
            if given:
                raise ValueError(
                    f"--dataset_name={args.dataset_name} does not support {flag}: its source and target images are "
                    "32x32 and an instruction may name a side, which a mirror would falsify."
                )
        if getattr(args, "streaming", False):
            raise ValueError(f"--dataset_name={args.dataset_name} does not support --streaming (it is cached).")
    if buckets is not None:
        if args.dataset_name == "shapes":
            from .shapes import MIN_CANVAS_SIZE

            small = [f"{height}x{width}" for height, width in buckets if min(height, width) < MIN_CANVAS_SIZE]
            if small:
                raise ValueError(
                    f"{BUCKETS_FLAG}={args.aspect_ratio_buckets!r}: the built-in shapes are drawn at the bucket sizes "
                    f"and need both sides of at least {MIN_CANVAS_SIZE} px (the shapes keep their pixel sizes); "
                    f"too small: {', '.join(small)}."
                )
    check_image_text_source(
        args.dataset_name,
        args.dataset_config_name,
        args.train_data_dir,
        args.cache_dir,
        args.train_data_files,
        split=args.dataset_split,
    )


def check_interleaved_args(args: argparse.Namespace) -> None:
    """`--interleaved` reads a Hub data set, a local folder of parquet / json files or webdataset shards (cached, or
    with `--streaming`): refuse the other sources and `--random_flip` (a text may name a side, which a mirror
    falsifies)."""
    for flag, given in (
        ("--dataset_name", args.dataset_name in BUILTIN_DATASETS),
        ("--train_data_dir", args.train_data_dir is not None),
        ("--random_flip", getattr(args, "random_flip", False)),
    ):
        if given:
            value = getattr(args, flag.lstrip("-"))
            raise ValueError(
                f"--interleaved does not support {flag}={value!r}: interleaved documents are read from a Hub data set, "
                "a local folder of parquet / json files (--dataset_name) or webdataset shards (--train_data_files), "
                "not mirrored."
            )


def load_dataset_from_args(
    args: argparse.Namespace, streaming: bool = False
) -> datasets.Dataset | datasets.IterableDataset:
    """[`load_image_text_dataset`] with the options of [`add_data_arguments`] (and `args.seed`), truncated to
    `--max_train_samples`; an `IterableDataset` with `streaming=True`."""
    image_column, caption_column = data_columns_from_args(args)
    dataset = load_image_text_dataset(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_data_dir=args.train_data_dir,
        split=args.dataset_split,
        image_column=image_column,
        caption_column=caption_column,
        cache_dir=args.cache_dir,
        shapes_num_samples=args.shapes_num_samples,
        seed=args.seed,
        # getattr: a script may build its namespace without the glyphs options; glyphs render at the training size.
        glyphs_num_samples=getattr(args, "glyphs_num_samples", 20000),
        glyphs_resolution=getattr(args, "resolution", 32),
        train_data_files=getattr(args, "train_data_files", None),
        streaming=streaming,
        # The built-in shapes are drawn at the bucket sizes (their images would otherwise all be 32x32 squares).
        shapes_image_sizes=aspect_ratio_buckets_from_args(args) if args.dataset_name == "shapes" else None,
        interleaved=getattr(args, "interleaved", False),
    )
    if args.max_train_samples is not None and streaming:
        dataset = dataset.take(args.max_train_samples)
    elif args.max_train_samples is not None:
        dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))
    return dataset


__all__ = [
    "BUILTIN_DATASETS",
    "EDITING_DATASETS",
    "CorruptImageError",
    "aspect_ratio_buckets_from_args",
    "check_dataset_from_args",
    "check_image_text_source",
    "check_interleaved_args",
    "add_data_arguments",
    "data_columns_from_args",
    "load_dataset_from_args",
    "load_documents",
    "load_image_text_dataset",
    "decode_image",
    "decode_rows",
    "skip_or_raise",
    "spread_rows",
    "encode_images",
    "encode_latents",
    "group_by_bucket",
    "resize_to_pixel_values",
]
