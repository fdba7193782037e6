"""The training data: the latent cache or the stream, text-only rows, the tokenizer learnt from the captions, the
collator and the batches.
"""

from __future__ import annotations

import argparse
from functools import partial
from itertools import chain
from pathlib import Path
from typing import NamedTuple

import datasets
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from transformers import PreTrainedTokenizerBase

from ..data.buckets import BucketBatchSampler
from ..data.collator import DEFAULT_CLEAN_IMAGE_PROBABILITY, TransfusionDataCollator
from ..data.image_text import aspect_ratio_buckets_from_args, load_dataset_from_args, spread_rows
from ..data.interleaved import TEXTS_COLUMN, head_pairs
from ..data.latent_cache import cache_latents, encoder_fingerprint, unflatten_latents
from ..data.streaming import StreamingLatentBatches, take_captions, take_examples
from ..data.text import load_text_dataset, text_only_examples
from ..latents_transfusion import pixels_to_latents
from ..noising import TransfusionNoiser
from ..processing_transfusion import TransfusionProcessor
from .model_setup import build_tokenizer
from .validation import CONDITIONING_GAP_PAIRS

# With --streaming the BPE tokenizer learns from the captions of the stream's first rows.
STREAMING_TOKENIZER_ROWS = 10000


def prepare_examples(
    args: argparse.Namespace, vae: AutoencoderKL | None, image_size: int, accelerator
) -> tuple[datasets.Dataset, list[int] | None]:
    """Load the data set and encode every image once (the VAE is frozen) into the latent cache: each process encodes
    its shard on its device, then all read every latent back memory-mapped (`text`, `latents` columns, torch format).
    A rerun, a resumed run, or another run on the same data, VAE, resolution, crop and flip reuses the cache. With
    `--aspect_ratio_buckets` each image is encoded at the size of its bucket; returns the bucket of every row (else
    None)."""
    dataset = load_dataset_from_args(args)
    default_cache_dir = Path(args.cache_dir or datasets.config.HF_DATASETS_CACHE) / "transfusion_latents"
    cache = cache_latents(
        dataset,
        partial(pixels_to_latents, vae),
        image_size,
        args.latent_cache_dir or default_cache_dir,
        encoder_fingerprint(vae),
        center_crop=args.center_crop,
        random_flip=args.random_flip,
        batch_size=args.encode_batch_size,
        strict=args.strict_data,
        latent_dtype=args.latent_dtype,
        state=accelerator,
        aspect_ratio_buckets=aspect_ratio_buckets_from_args(args),
    )
    if TEXTS_COLUMN in cache.dataset.column_names:
        counts = (
            f"{len(cache.dataset)} interleaved documents ({cache.num_skipped} with an unreadable image skipped) from "
            f"{cache.num_rows} rows"
        )
    else:
        counts = (
            f"{len(cache.dataset)} images ({cache.num_skipped} unreadable images skipped) from {cache.num_rows} rows"
        )
    if cache.reused:
        accelerator.print(f"Read the latents of {counts} from the cache {cache.path}.")
    else:
        accelerator.print(f"Encoded {counts}.")
        accelerator.print(
            f"Encoding: {cache.num_encoded} images in {cache.encode_seconds:.1f} s ({cache.images_per_second:.1f} "
            f"images/s) on the main process of {accelerator.num_processes}; cache {cache.path}."
        )
    if not len(cache.dataset):
        raise ValueError("No readable image-caption pair in the data set.")
    buckets = cache.buckets
    if buckets is not None:
        sizes = aspect_ratio_buckets_from_args(args)
        counts = torch.bincount(torch.as_tensor(buckets), minlength=len(sizes)).tolist()
        accelerator.print(
            "Aspect-ratio buckets: " + ", ".join(f"{h}x{w} {n} images" for (h, w), n in zip(sizes, counts)) + "."
        )
    return cache.dataset, buckets


def prepare_text_examples(args: argparse.Namespace, num_image_rows: int, accelerator) -> tuple[list[dict], list[str]]:
    """The text-only training rows (`--text_only_share` of all rows) and the held-out texts, or nothing without text
    data."""
    if args.text_dataset_name is None and not args.text_data_files:
        return [], []
    dataset = load_text_dataset(
        args.text_dataset_name,
        args.text_dataset_config_name,
        data_files=args.text_data_files,
        split=args.text_dataset_split,
        text_column=args.text_column,
        cache_dir=args.cache_dir,
    )
    examples, held_out = text_only_examples(
        dataset, num_image_rows, args.text_only_share, args.num_text_validation_rows, seed=args.seed
    )
    accelerator.print(
        f"Text-only data: {len(examples)} training rows ({args.text_only_share:.0%} of all rows) from "
        f"{len(dataset)} texts, {len(held_out)} held out for eval/text_lm_loss."
    )
    return examples, held_out


def text_validation_batches(texts: list[str], processor, noiser, context: int, args) -> list[dict]:
    """The held-out texts as padded text-only batches, collated once (no random draw touches a text-only row)."""
    collator = TransfusionDataCollator(processor, noiser, max_length=context)
    size = args.train_batch_size
    return [collator([{"text": text} for text in texts[start : start + size]]) for start in range(0, len(texts), size)]


class TrainingData(NamedTuple):
    """The training data and what is learnt from it before the model exists.

    `head`: the first few image examples (validation prompts and captions); `examples`: the encoded map-style data
    set, or `stream`: the streamed one (the other is None); `text_examples` and `held_out_texts`: the text-only
    training rows and validation texts (empty when streaming); `tokenizer`: pretrained, or learnt from the captions;
    `buckets`: the aspect-ratio bucket of every row of `examples` (`--aspect_ratio_buckets`), else None.
    """

    head: list[dict]
    examples: datasets.Dataset | None
    stream: datasets.IterableDataset | None
    text_examples: list[dict]
    held_out_texts: list[str]
    tokenizer: PreTrainedTokenizerBase
    buckets: list[int] | None = None


def prepare_training_data(
    args: argparse.Namespace, vae: AutoencoderKL | None, accelerator: Accelerator
) -> TrainingData:
    """Open the stream (`--streaming`) or encode the data set into the latent cache, load the text-only data, and
    build the tokenizer.

    Args:
        args (`argparse.Namespace`): the parsed flags.
        vae (`AutoencoderKL` or None): the frozen VAE, None in pixel space.
        accelerator (`Accelerator`): the run's accelerator (the encoding is shared among its processes).
    """
    num_head = max(CONDITIONING_GAP_PAIRS, args.num_validation_captions)
    if args.streaming:
        stream = load_dataset_from_args(args, streaming=True)
        # Validation prompts and captions use the stream's first rows (of documents: each image with the text before
        # it); the tokenizer learns from its first captions.
        head = take_examples(
            stream, num_head, partial(pixels_to_latents, vae), args.resolution, args.center_crop,
            aspect_ratio_buckets_from_args(args), args.interleaved,
        )  # fmt: skip
        if not head:
            raise ValueError("No readable image-caption pair in the first rows of the stream.")
        text_examples, held_out_texts = [], []
        tokenizer = build_tokenizer(args, take_captions(stream, STREAMING_TOKENIZER_ROWS, args.interleaved))
        return TrainingData(head, None, stream, text_examples, held_out_texts, tokenizer)
    examples, buckets = prepare_examples(args, vae, args.resolution, accelerator)
    # Validation prompts, captions and the text-conditioning gap use a few training examples, spread evenly over the
    # data set (a folder sorted by class must not give 64 pairs of one caption): keep only those in memory.
    spread = spread_rows(len(examples), num_head)
    if TEXTS_COLUMN in examples.column_names:
        # Interleaved documents: each image with the text before it serves as a caption pair, one per document in turn.
        head = head_pairs(list(examples.select(spread)), num_head)
        texts = (text for document in examples[TEXTS_COLUMN] for text in document if text)
        if not head:
            raise ValueError(f"None of the {len(spread)} documents spread over the data set holds an image.")
    else:
        head = [unflatten_latents(row) for row in examples.select(spread)]
        texts = iter(examples["text"])
    text_examples, held_out_texts = prepare_text_examples(args, len(examples), accelerator)
    # The captions are a lazy column of the memory-mapped cache; the text-only rows are a small list.
    tokenizer = build_tokenizer(args, chain(texts, (example["text"] for example in text_examples)))
    return TrainingData(head, examples, None, text_examples, held_out_texts, tokenizer, buckets)


def build_collator(
    args: argparse.Namespace,
    processor: TransfusionProcessor,
    noiser: TransfusionNoiser,
    context: int,
    accelerator: Accelerator,
    patch_size: int | None = None,
) -> TransfusionDataCollator:
    """The training collator, seeded per process, truncating to the model's `context` (packing to
    `--max_sequence_length` when given); with the model's `patch_size`, images of any size take their own number of
    placeholders."""
    # Latents are memory-mapped and collation is cheap: no worker processes, so the collator's batch counter is exact.
    return TransfusionDataCollator(
        processor,
        noiser,
        seed=args.seed * 1000 + accelerator.process_index,
        max_length=context,
        max_sequence_length=args.max_sequence_length,
        patch_size=patch_size,
        clean_image_probability=clean_image_probability_from_args(args),
    )


def clean_image_probability_from_args(args: argparse.Namespace) -> float:
    """`--clean_image_probability`, or its default ([`DEFAULT_CLEAN_IMAGE_PROBABILITY`]) when not given."""
    value = getattr(args, "clean_image_probability", None)
    return DEFAULT_CLEAN_IMAGE_PROBABILITY if value is None else value


def set_loader_epoch(dataloader, epoch: int) -> None:
    """Select the epoch whose shuffled order the loader yields next. Accelerate's `set_epoch` reaches a batch
    sampler (the aspect-ratio buckets' [`BucketBatchSampler`]) only in a single process: with several it is wrapped
    in a `BatchSamplerShard`, and a resumed epoch's loader in a `SkipBatchSampler`, which do not pass it on.

    Args:
        dataloader: the prepared loader (or its `skip_first_batches` copy), or `StreamingLatentBatches`.
        epoch (`int`): the epoch.
    """
    if hasattr(dataloader, "set_epoch"):  # accelerate's loaders and the stream; a plain DataLoader has none
        dataloader.set_epoch(epoch)
    sampler = getattr(dataloader, "batch_sampler", None)
    while sampler is not None and not isinstance(sampler, BucketBatchSampler):
        sampler = getattr(sampler, "batch_sampler", None)
    if sampler is not None:
        sampler.set_epoch(epoch)


def build_dataloader(
    args: argparse.Namespace,
    data: TrainingData,
    vae: AutoencoderKL | None,
    collator: TransfusionDataCollator,
    accelerator: Accelerator,
) -> torch.utils.data.DataLoader | StreamingLatentBatches:
    """The training batches: this process's part of the stream, encoded on the fly, or a shuffling loader (no
    worker processes, see `build_collator`) over the cached image rows and the text-only rows."""
    if args.streaming:
        # Each process reads its own part of the stream: not prepared by Accelerate, which would dispatch or slice
        # the batches of an iterable again; the batches are sent to the device here.
        return StreamingLatentBatches(
            data.stream,
            partial(pixels_to_latents, vae),
            collator,
            args.resolution,
            args.train_batch_size,
            shuffle_buffer_size=args.shuffle_buffer_size,
            seed=args.seed,
            process_index=accelerator.process_index,
            num_processes=accelerator.num_processes,
            device=accelerator.device,
            center_crop=args.center_crop,
            random_flip=args.random_flip,
            strict=args.strict_data,
            aspect_ratio_buckets=aspect_ratio_buckets_from_args(args),
            interleaved=args.interleaved,
        )
    examples, text_examples = data.examples, data.text_examples
    dataset = torch.utils.data.ConcatDataset([examples, text_examples]) if text_examples else examples
    if data.buckets is None:
        return torch.utils.data.DataLoader(
            dataset, batch_size=args.train_batch_size, shuffle=True, collate_fn=collator
        )
    # One aspect-ratio bucket per batch, so every batch is one latents tensor of one size (SDXL-style buckets). The
    # text-only rows join the buckets in turn, so they mix into the image batches as without buckets.
    num_buckets = len(aspect_ratio_buckets_from_args(args))
    keys = list(data.buckets) + [index % num_buckets for index in range(len(text_examples))]
    sampler = BucketBatchSampler(keys, args.train_batch_size, seed=args.seed)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collator)
