"""Aspect-ratio buckets (`transfusion_hf.data.buckets`): the flag's parsing, the bucket of an image, the batch sampler
(deterministic, every row once, one bucket per batch, resume), and the encoding of each image at its bucket's size,
in memory and in the latent cache."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
from collections import Counter
from functools import partial

import datasets
import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard, skip_first_batches
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from pipeline_components import get_vae
from transfusion_hf.data.buckets import (
    BucketBatchSampler,
    assign_bucket,
    assign_bucket_index,
    format_aspect_ratio_buckets,
    parse_aspect_ratio_buckets,
)
from transfusion_hf.data.image_text import (
    add_data_arguments,
    aspect_ratio_buckets_from_args,
    check_dataset_from_args,
    encode_latents,
    load_dataset_from_args,
    load_image_text_dataset,
    resize_to_pixel_values,
)
from transfusion_hf.data.latent_cache import (
    LATENT_CACHE_VERSION,
    cache_latents,
    encoder_fingerprint,
    latent_cache_fingerprint,
    unflatten_latents,
)
from transfusion_hf.data.shapes import draw_shape, sample_specs
from transfusion_hf.pipeline_transfusion import pixels_to_latents
from transfusion_hf.processing_transfusion import images_to_pixel_values

BUCKETS = [(32, 32), (32, 48), (48, 32)]


def identity(pixel_values: torch.Tensor) -> torch.Tensor:
    """Pixel-space "encoding": the latents are the pixel values."""
    return pixel_values


# ------------------------------------------------------------------------------------------------------- parsing
def test_parse_and_format_round_trip() -> None:
    assert parse_aspect_ratio_buckets("32x32,32x48,48x32", multiple=16, max_side=64) == BUCKETS
    assert parse_aspect_ratio_buckets(" 32X32 , 32x48,48x32 ") == BUCKETS
    assert parse_aspect_ratio_buckets(["32x32", (32, 48), (48, 32)]) == BUCKETS
    assert format_aspect_ratio_buckets(BUCKETS) == "32x32,32x48,48x32"
    assert parse_aspect_ratio_buckets(format_aspect_ratio_buckets(BUCKETS)) == BUCKETS


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "at least one bucket"),
        ("32x32,", "'' is not HxW"),
        ("32", "'32' is not HxW"),
        ("32x32x3", "is not HxW"),
        ("32xa", "is not HxW"),
        ("-32x32", "is not HxW"),
        ("0x32", "height 0 of 0x32 is not a positive multiple of 16"),
        ("32x40", "width 40 of 32x40 is not a positive multiple of 16"),
        ("32x96", "width 96 of 32x96 is above the largest side 64"),
        ("32x48,32x48", "32x48 is given twice"),
        ("32x32,64x64", "64x64 has the aspect ratio of 32x32"),
        ("32x32,32x64,16x32", "16x32 has the aspect ratio of 32x64"),
    ],
)
def test_a_bad_bucket_list_is_one_error_naming_the_flag_and_the_value(value: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"--aspect_ratio_buckets={value!r}: ")) as error:
        parse_aspect_ratio_buckets(value, multiple=16, max_side=64)
    assert reason in str(error.value) and "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------------------ assigning
def test_assign_bucket_by_closest_log_ratio() -> None:
    for bucket in BUCKETS:
        assert assign_bucket(*bucket, BUCKETS) == bucket
        assert assign_bucket(bucket[0] * 10, bucket[1] * 10, BUCKETS) == bucket  # only the ratio counts
    assert assign_bucket(100, 160, BUCKETS) == (32, 48)  # 0.625: nearer 2/3 than 1
    assert assign_bucket(160, 100, BUCKETS) == (48, 32)
    assert assign_bucket(100, 120, BUCKETS) == (32, 32)  # 0.83: log distance 0.18 to 1, 0.22 to 2/3
    assert assign_bucket(100, 1000, BUCKETS) == (32, 48)  # far outside: the most extreme bucket
    # The geometric mean of 1 and 2/3 is equally far from both in log-ratio: the larger area wins the tie.
    assert assign_bucket(6, 6, [(32, 48), (64, 64)]) == (64, 64)
    assert assign_bucket(2 * 36, 3 * 36, [(64, 64), (32, 48)]) == (32, 48)
    assert assign_bucket(1, 1, [(64, 96), (32, 32)]) == (32, 32)
    # sqrt(1 * 2/3) is irrational: take a tie that is exact in integers, 2 x 3 between 1:1 and 4:9.
    assert assign_bucket(2, 3, [(32, 32), (32, 72)]) == (32, 72)  # area 2304 > 1024
    assert assign_bucket(2, 3, [(48, 48), (32, 72)]) == (48, 48)  # area 2304 = 2304: the first listed
    # Mirrored buckets tie exactly for a square image (same area): the first listed.
    assert assign_bucket(32, 32, [(32, 48), (48, 32)]) == (32, 48)
    assert assign_bucket(32, 32, [(48, 32), (32, 48)]) == (48, 32)
    assert assign_bucket_index(40, 70, BUCKETS) == 1
    with pytest.raises(ValueError, match="no aspect ratio"):
        assign_bucket(0, 32, BUCKETS)
    with pytest.raises(ValueError, match="No buckets"):
        assign_bucket(32, 32, [])


# -------------------------------------------------------------------------------------------------------- sampler
def mixed_buckets(num_rows: int = 103, seed: int = 0) -> list[int]:
    """An uneven bucket index for each row (about 60% / 30% / 10%)."""
    draws = np.random.default_rng(seed).random(num_rows)
    return np.digitize(draws, [0.6, 0.9]).tolist()


def check_epoch(batches: list[list[int]], buckets: list, batch_size: int, drop_last: bool) -> None:
    """One bucket per batch; dense: every batch full except at most one per bucket (none with `drop_last`)."""
    short = Counter()
    for batch in batches:
        assert len({buckets[i] for i in batch}) == 1, batch
        assert 0 < len(batch) <= batch_size
        if len(batch) < batch_size:
            short[buckets[batch[0]]] += 1
    assert all(count == 1 for count in short.values())
    if drop_last:
        assert not short


@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_batches_hold_one_bucket_and_every_row_once(drop_last: bool) -> None:
    buckets = mixed_buckets()
    sampler = BucketBatchSampler(buckets, batch_size=8, drop_last=drop_last, seed=3)
    batches = list(sampler)
    check_epoch(batches, buckets, 8, drop_last)
    assert len(batches) == len(sampler)
    rows = [index for batch in batches for index in batch]
    assert len(rows) == len(set(rows))
    counts = Counter(buckets)
    if drop_last:
        assert len(rows) == sum(count - count % 8 for count in counts.values())
        assert sampler.batch_size == 8
    else:
        assert sorted(rows) == list(range(len(buckets)))
        assert len(batches) == sum(-(-count // 8) for count in counts.values())
        assert sampler.batch_size is None  # batches of varying size (see the class docstring)
    # The short batch of a bucket may come anywhere in the epoch, not only last: the order of batches is shuffled.
    assert {len(batch) for batch in batches[:-1]} != {8} or drop_last


def test_sampler_is_deterministic_in_seed_and_epoch() -> None:
    buckets = mixed_buckets()
    first, again = BucketBatchSampler(buckets, 8, seed=1), BucketBatchSampler(buckets, 8, seed=1)
    assert list(first) == list(again) == first.batches(0)
    first.set_epoch(1)
    assert list(first) == first.batches(1) == again.batches(1) != again.batches(0)
    assert BucketBatchSampler(buckets, 8, seed=2).batches(0) != first.batches(0)
    # The rows in a bucket are shuffled too, not only the order of the batches.
    assert sorted(map(sorted, first.batches(0))) != sorted(map(sorted, first.batches(1)))
    ordered = BucketBatchSampler(buckets, 8, shuffle=False).batches(5)
    first_seen = {bucket: buckets.index(bucket) for bucket in buckets}  # buckets in order of first appearance
    assert [i for batch in ordered for i in batch] == sorted(range(len(buckets)), key=lambda i: first_seen[buckets[i]])


def test_sampler_resume_skips_to_the_tail_of_the_uninterrupted_order() -> None:
    buckets = mixed_buckets()
    sampler = BucketBatchSampler(buckets, 8, seed=4)
    uninterrupted = sampler.batches(2)
    for skip in (0, 1, 5, len(uninterrupted), len(uninterrupted) + 3):
        sampler.set_epoch(2, skip_batches=skip)
        assert list(sampler) == uninterrupted[skip:] and len(sampler) == len(uninterrupted[skip:])
    sampler.set_epoch(3)  # a new epoch starts from its first batch
    assert list(sampler) == sampler.batches(3)
    with pytest.raises(ValueError, match="skip_batches"):
        sampler.set_epoch(0, skip_batches=-1)
    # Accelerate's resume (what the training script calls) skips the same batches of a loader over the sampler.
    loader = torch.utils.data.DataLoader(range(len(buckets)), batch_sampler=sampler, collate_fn=list)
    sampler.set_epoch(2)
    assert list(skip_first_batches(loader, 5)) == uninterrupted[5:]


def test_sampler_accepts_any_bucket_keys_and_checks_the_batch_size() -> None:
    keys = [(32, 48), (32, 32), None, (32, 48), None, (32, 32), (32, 48)]
    batches = BucketBatchSampler(keys, 2, seed=0).batches(0)
    check_epoch(batches, keys, 2, drop_last=False)
    assert sorted(i for batch in batches for i in batch) == list(range(len(keys)))
    assert BucketBatchSampler(torch.tensor([0, 1, 0, 1]), 2).batches(0) != []  # a column read in torch format
    assert list(BucketBatchSampler([], 4)) == [] and len(BucketBatchSampler([], 4)) == 0
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="batch_size"):
            BucketBatchSampler(keys, bad)


@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_sharded_by_accelerate_keeps_one_bucket_per_batch(drop_last: bool) -> None:
    """Two processes of `accelerator.prepare`: each takes whole batches, none is lost to a short one mid-epoch."""
    buckets = mixed_buckets()
    # Several seeds: a sampler that reported a fixed batch size would lose 7 to 23 of the 103 rows at seeds 0 to 4
    # (Accelerate skips every pair of batches whose second one is short), depending on where the short ones fall.
    for seed in range(5):
        sampler = BucketBatchSampler(buckets, 8, drop_last=drop_last, seed=seed)
        shards = [list(BatchSamplerShard(sampler, num_processes=2, process_index=rank)) for rank in range(2)]
        assert len(shards[0]) == len(shards[1])
        for shard in shards:
            check_epoch(shard, buckets, 8, drop_last)
        seen = {index for shard in shards for batch in shard for index in batch}
        expected = {index for batch in sampler.batches(0) for index in batch}
        # Without drop_last every row is trained on (a batch may repeat to even out the processes); with it, at
        # most the last odd batch is left out.
        assert seen == expected if not drop_last else len(expected - seen) <= 8


# -------------------------------------------------------------------------------------------------------- encoding
def test_resize_to_pixel_values_at_a_square_size_is_the_square_path() -> None:
    images = [draw_shape(spec, jitter, 32, 48) for spec, jitter in sample_specs("all", 4, seed=0)]
    for mode in ("crop", "default"):
        assert torch.equal(resize_to_pixel_values(images, 16, 16, mode), images_to_pixel_values(images, 16, mode))


def test_images_are_encoded_at_their_buckets_size() -> None:
    dataset = load_image_text_dataset(dataset_name="shapes", shapes_num_samples=12, shapes_image_sizes=BUCKETS)
    examples, skipped = encode_latents(dataset, identity, 32, batch_size=5, aspect_ratio_buckets=BUCKETS)
    assert skipped == 0 and len(examples) == 12
    for (spec, jitter), example, row in zip(sample_specs("train", 12, seed=0), examples, dataset, strict=True):
        height, width = BUCKETS[example["bucket"]]
        drawn = draw_shape(spec, jitter, height, width)
        assert Image.open(io.BytesIO(row["image"]["bytes"])).size == (width, height)
        # The shapes are drawn at the bucket sizes: encoded as they are, no resampling.
        expected = torch.from_numpy(np.array(drawn)).permute(2, 0, 1).float() / 127.5 - 1
        assert example["text"] == spec.caption and torch.allclose(example["latents"], expected)
    assert Counter(example["bucket"] for example in examples) == {0: 4, 1: 4, 2: 4}  # split evenly
    # Without buckets: the square path, as before (every image 32x32, no bucket).
    square, _ = encode_latents(dataset, identity, 32, batch_size=5)
    assert all(example["latents"].shape == (3, 32, 32) and "bucket" not in example for example in square)


def test_an_image_of_any_size_is_center_cropped_to_its_bucket() -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 40, 3), dtype=np.uint8))  # 70 x 40
    dataset = datasets.Dataset.from_dict({"image": [image, image.transpose(Image.Transpose.TRANSPOSE)]})
    dataset = dataset.add_column("text", ["tall", "wide"])
    examples, _ = encode_latents(dataset, identity, 32, aspect_ratio_buckets=BUCKETS, random_flip=True)
    assert [example["bucket"] for example in examples] == [2, 1]  # 70:40 is nearest 48:32, 40:70 nearest 32:48
    expected = VaeImageProcessor(vae_scale_factor=1).preprocess(image, height=48, width=32, resize_mode="crop")[0]
    assert examples[0]["latents"].shape == (3, 48, 32) and torch.equal(examples[0]["latents"], expected)
    assert torch.equal(examples[0]["flipped_latents"], expected.flip(-1))
    assert examples[1]["latents"].shape == (3, 32, 48)


# ------------------------------------------------------------------------------------------------------------ cache
@pytest.mark.parametrize("latent_dtype", ["float32", "float16"])
def test_bucketed_cache_equals_a_fresh_encoding(tmp_path, latent_dtype: str) -> None:
    vae = get_vae(0)
    encode = partial(pixels_to_latents, vae)
    dataset = load_image_text_dataset(dataset_name="shapes", shapes_num_samples=9, shapes_image_sizes=BUCKETS)
    options = {"random_flip": True, "batch_size": 4, "aspect_ratio_buckets": BUCKETS}
    cache = cache_latents(
        dataset, encode, 32, tmp_path, encoder_fingerprint(vae), latent_dtype=latent_dtype, **options
    )
    fresh, _ = encode_latents(dataset, encode, 32, **options)
    assert cache.aspect_ratio_buckets == BUCKETS and cache.buckets == [example["bucket"] for example in fresh]
    assert set(cache.dataset.column_names) == {"text", "latents", "flipped_latents", "latent_shape", "bucket"}
    dtype = getattr(torch, latent_dtype)
    shapes = set()
    for index, expected in enumerate(fresh):
        row = unflatten_latents(cache.dataset[index])
        assert row["text"] == expected["text"] and int(row["bucket"]) == expected["bucket"]
        assert "latent_shape" not in row
        for key in ("latents", "flipped_latents"):
            assert torch.equal(row[key], expected[key].to(dtype).float())
        shapes.add(tuple(row["latents"].shape))
    assert shapes == {(4, 16, 16), (4, 16, 24), (4, 24, 16)}  # the test VAE halves each side
    # A sampler over the cache's buckets batches rows of one latent shape.
    for batch in BucketBatchSampler(cache.buckets, 2, seed=0):
        assert len({tuple(cache.dataset[i]["latent_shape"].tolist()) for i in batch}) == 1
    # Read again: reused, not re-encoded.
    again = cache_latents(
        dataset, encode, 32, tmp_path, encoder_fingerprint(vae), latent_dtype=latent_dtype, **options
    )
    assert again.reused and again.path == cache.path


def test_square_cache_key_is_unchanged_and_buckets_change_it(tmp_path) -> None:
    dataset = load_image_text_dataset(dataset_name="shapes", shapes_num_samples=4)
    # The key of a square cache, computed as it was before buckets existed: old caches stay valid.
    key = {
        "version": LATENT_CACHE_VERSION,
        "data": dataset._fingerprint,
        "encoder": "pixels",
        "image_size": 32,
        "center_crop": True,
        "random_flip": False,
        "latent_dtype": "float32",
    }
    before = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    assert latent_cache_fingerprint(dataset, "pixels", 32, True, False, "float32") == before
    square = cache_latents(dataset, identity, 32, tmp_path, "pixels")
    assert square.path.name == before and square.buckets is None
    assert square.dataset.features["latents"] == datasets.Array3D(shape=(3, 32, 32), dtype="float32")
    keys = {
        latent_cache_fingerprint(dataset, "pixels", 32, True, False, "float32", buckets)
        for buckets in (BUCKETS, BUCKETS[:2], BUCKETS[::-1])
    }
    assert len(keys) == 3 and before not in keys
    # With buckets the square size is not part of the key.
    assert latent_cache_fingerprint(dataset, "pixels", 64, True, False, "float32", BUCKETS) in keys
    with pytest.raises(ValueError, match="empty"):
        cache_latents(dataset, identity, 32, tmp_path, "pixels", aspect_ratio_buckets=[])


# ------------------------------------------------------------------------------------------------------------- flags
def parse_flags(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_data_arguments(parser, aspect_ratio_buckets=True)  # the training script's data flags
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--streaming", action="store_true")
    return parser.parse_args(list(flags))


def test_the_flag_defaults_to_the_square_path_and_is_checked_before_loading() -> None:
    args = parse_flags("--dataset", "shapes")
    assert args.aspect_ratio_buckets is None and aspect_ratio_buckets_from_args(args) is None
    check_dataset_from_args(args)
    args = parse_flags("--dataset", "shapes", "--aspect_ratio_buckets", "32x32,32x48,48x32")
    check_dataset_from_args(args, bucket_multiple=16, max_bucket_side=64)
    assert aspect_ratio_buckets_from_args(args, 16, 64) == BUCKETS
    assert aspect_ratio_buckets_from_args(argparse.Namespace()) is None  # a script without the flag
    bad = {
        ("--aspect_ratio_buckets", "32x40"): "--aspect_ratio_buckets='32x40': the width 40",
        ("--aspect_ratio_buckets", "32x128"): "above the largest side 64",
        ("--aspect_ratio_buckets", "16x32"): "at least 32 px",  # the shapes keep their pixel sizes
    }
    # A stream encodes each image at its bucket too (tests/test_streaming_documents.py).
    check_dataset_from_args(
        parse_flags("--dataset", "shapes", "--aspect_ratio_buckets", "32x48", "--streaming"), 16, 64
    )
    for flags, message in bad.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            check_dataset_from_args(parse_flags("--dataset", "shapes", *flags), bucket_multiple=16, max_bucket_side=64)


def test_the_built_in_shapes_are_drawn_at_the_bucket_sizes() -> None:
    args = parse_flags("--dataset", "shapes", "--shapes_num_samples", "30", "--aspect_ratio_buckets", "32x48,48x32")
    dataset = load_dataset_from_args(args)
    sizes = Counter(Image.open(io.BytesIO(row["image"]["bytes"])).size for row in dataset)
    assert sizes == {(48, 32): 15, (32, 48): 15}  # PIL sizes are (width, height)
    plain = load_dataset_from_args(parse_flags("--dataset", "shapes", "--shapes_num_samples", "30"))
    assert dataset["text"] == plain["text"]  # the same combinations, only the canvas differs
