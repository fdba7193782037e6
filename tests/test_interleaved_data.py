"""Interleaved documents from real `datasets` sources: a local parquet folder in OBELICS's layout (`texts` and
`images` lists) and webdataset shards (one json per sample, images base64-encoded), cached once, trained end to end
with `--interleaved`; malformed documents and unreadable images are refused or counted, and bad flags are refused
before any data is loaded."""

from __future__ import annotations

import base64
import io
import json
import tarfile
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from script_loading import one_thread_and_fresh_accelerate, reset_accelerate  # noqa: F401 (autouse fixture)
from test_train_editing import QUICK, TINY, run_main
from transfusion_hf import TransfusionProcessor, training
from transfusion_hf.data.image_text import CorruptImageError, load_image_text_dataset
from transfusion_hf.data.interleaved import document_example, document_pairs
from transfusion_hf.data.latent_cache import cache_latents
from transfusion_hf.data.shapes_edit import load_shapes_edit_documents


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_documents(folder: Path, num: int = 8, with_captions: bool = True) -> Path:
    """The built-in edits as documents in a parquet folder (a `datasets` source like a Hub repo's)."""
    folder.mkdir(parents=True, exist_ok=True)
    load_shapes_edit_documents(num_samples=num, with_captions=with_captions).to_parquet(str(folder / "train.parquet"))
    return folder


def write_shards(folder: Path, documents: list[tuple[list, list]], texts_key: str = "texts") -> list[str]:
    """webdataset shards: one `KEY.json` per sample holding the texts and the base64-encoded images."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "shard-000.tar"
    with tarfile.open(path, "w") as tar:
        for index, (texts, images) in enumerate(documents):
            cells = [None if image is None else base64.b64encode(image).decode() for image in images]
            data = json.dumps({texts_key: texts, "images": cells}).encode()
            info = tarfile.TarInfo(f"doc{index:04d}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return [str(path)]


def identity_half(pixels: torch.Tensor) -> torch.Tensor:
    """A stand-in encoder: pixels at half resolution (deterministic, shape-preserving per image)."""
    return pixels[:, :, ::2, ::2].clone()


def test_a_parquet_folder_and_webdataset_shards_give_the_same_documents(tmp_path):
    red, blue = png_bytes((255, 0, 0)), png_bytes((0, 0, 255), (32, 48))
    documents = [(["a red square", None, "then blue", None], [None, red, None, blue]), ([None, "alone"], [red, None])]
    shards = write_shards(tmp_path / "shards", documents)
    from_shards = load_image_text_dataset(
        train_data_files=shards, image_column="images", caption_column="texts", interleaved=True
    )
    rows = [
        {"texts": texts, "images": [None if i is None else {"bytes": i, "path": None} for i in images]}
        for texts, images in documents
    ]
    features = datasets.Features(
        {"texts": datasets.List(datasets.Value("string")), "docs": datasets.List(datasets.Image())}
    )
    folder = tmp_path / "parquet"
    folder.mkdir()
    table = datasets.Dataset.from_list([{"texts": r["texts"], "docs": r["images"]} for r in rows], features=features)
    table.to_parquet(str(folder / "train.parquet"))
    from_parquet = load_image_text_dataset(
        dataset_name=str(folder), image_column="docs", caption_column="texts", interleaved=True
    )
    for loaded in (from_shards, from_parquet):
        assert loaded.column_names == ["texts", "images"] and len(loaded) == 2
        assert loaded[0]["texts"] == ["a red square", None, "then blue", None]
        assert [None if cell is None else cell["bytes"] for cell in loaded[0]["images"]] == [None, red, None, blue]

    # Cached square and in buckets (the 48x32 (height x width) image goes to its own bucket); a document's latents come back in its
    # reading order, each image with the text before it as a caption pair.
    square = cache_latents(from_shards, identity_half, 32, tmp_path / "cache", "half")
    document = document_example(square.dataset[0])["segments"]
    assert [part if isinstance(part, str) else tuple(part["latents"].shape) for part in document] == [
        "a red square",
        (3, 16, 16),
        "then blue",
        (3, 16, 16),
    ]
    assert document[1]["latents"][0].mean() == 1.0 and document[3]["latents"][2].mean() == 1.0  # red, then blue
    assert [pair["text"] for pair in document_pairs(square.dataset[1])] == [""]
    bucketed = cache_latents(
        from_parquet, identity_half, 32, tmp_path / "cache", "half", aspect_ratio_buckets=[(32, 32), (48, 32)]
    )
    shapes = [
        tuple(part["latents"].shape)
        for part in document_example(bucketed.dataset[0])["segments"]
        if not isinstance(part, str)
    ]
    assert shapes == [(3, 16, 16), (3, 24, 16)] and bucketed.buckets is None
    assert bucketed.path != square.path


def test_malformed_documents_and_unreadable_images(tmp_path):
    red = png_bytes((255, 0, 0))
    misaligned = write_shards(tmp_path / "bad", [(["a", None], [red, red])])
    loaded = load_image_text_dataset(
        train_data_files=misaligned, image_column="images", caption_column="texts", interleaved=True
    )
    with pytest.raises(ValueError, match=r"document 0, position 0: exactly one of `texts` and `images`"):
        cache_latents(loaded, identity_half, 32, tmp_path / "cache", "half")
    no_key = write_shards(tmp_path / "nokey", [(["a"], [None])], texts_key="text")
    with pytest.raises(ValueError, match="its json has no `texts` list"):
        load_image_text_dataset(
            train_data_files=no_key, image_column="images", caption_column="texts", interleaved=True
        )
    # URLs instead of images (OBELICS as published): refused, naming the column and what to do.
    urls = tmp_path / "urls"
    urls.mkdir()
    datasets.Dataset.from_dict({"texts": [[None, "a"]], "images": [["http://x/1.jpg", None]]}).to_parquet(
        str(urls / "t.parquet")
    )
    with pytest.raises(ValueError, match=r"`image_column`='images' holds .* not a list of images: .*download"):
        load_image_text_dataset(
            dataset_name=str(urls), image_column="images", caption_column="texts", interleaved=True
        )
    # A truncated PNG: its document is skipped and counted, or raises with strict.
    broken = write_shards(tmp_path / "broken", [(["a", None], [None, red]), (["b", None], [None, red[:40]])])
    loaded = load_image_text_dataset(
        train_data_files=broken, image_column="images", caption_column="texts", interleaved=True
    )
    cache = cache_latents(loaded, identity_half, 32, tmp_path / "cache2", "half")
    assert (len(cache.dataset), cache.num_skipped) == (1, 1)
    with pytest.raises(CorruptImageError, match="unreadable image in document 1"):
        cache_latents(loaded, identity_half, 32, tmp_path / "cache3", "half", strict=True)


def test_training_on_interleaved_documents_end_to_end(tmp_path):
    """`--interleaved` on a parquet folder: the log counts the documents; a batch of the run's own parts holds both
    images of each `[caption, image, instruction, image]` document, each noised with its own t (the paper) or, with
    `--clean_image_probability 1`, the first clean (the last part of a document is always noised); validation draws
    from the documents' caption pairs."""
    folder = write_documents(tmp_path / "docs")
    out = tmp_path / "run"
    flags = ["--dataset_name", str(folder), "--interleaved", "--patch_size", "4"]
    run_main(out, *flags, "--max_train_steps", "2", "--validation_steps", "2")
    assert (out / "validation" / "step-000002.png").is_file()
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(entry["loss"]) for entry in log if "loss" in entry)
    for probability, all_clean in (("0", False), ("1", True)):
        args = training.parse_args([*TINY, *QUICK, *flags, "--clean_image_probability", probability,
                                    "--output_dir", str(tmp_path / "again")])  # fmt: skip
        accelerator = training.build_accelerator(args)
        data = training.prepare_training_data(args, None, accelerator)
        assert (
            len(data.examples) == 8
            and data.head[0]["text"] == load_shapes_edit_documents(num_samples=1, with_captions=True)[0]["texts"][0]
        )
        processor = TransfusionProcessor(data.tokenizer, image_size=32, num_image_tokens=64)
        noiser = training.build_noiser(args, "flow_prediction")
        collator = training.build_collator(args, processor, noiser, 512, accelerator, patch_size=4)
        batch = collator([data.examples[index] for index in range(4)])
        reset_accelerate()
        assert batch["latents"].shape == (8, 3, 32, 32)  # two images per document, in reading order
        assert (batch["input_ids"] == processor.image_token_id).sum() == 8 * 64
        if all_clean:
            assert [target is None for target in batch["diffusion_targets"]] == [True, False] * 4
            assert (batch["timesteps"][0::2] == 0).all()
            run_main(tmp_path / "clean", *flags, "--clean_image_probability", "1", "--max_train_steps", "1")
        else:
            assert batch["diffusion_targets"].shape == (8, 3, 32, 32) and len(set(batch["timesteps"].tolist())) == 8


def test_training_on_webdataset_document_shards(tmp_path):
    documents = load_shapes_edit_documents(num_samples=8, with_captions=True)
    shards = write_shards(
        tmp_path / "shards",
        [(row["texts"], [None if cell is None else cell["bytes"] for cell in row["images"]])
         for row in documents.cast_column("images", datasets.List(datasets.Image(decode=False)))],
    )  # fmt: skip
    out = tmp_path / "run"
    run_main(out, "--train_data_files", *shards, "--interleaved", "--patch_size", "4", "--max_train_steps", "1")
    assert (out / "transformer" / "config.json").is_file()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dataset", "shapes", "--interleaved"], "--interleaved does not support --dataset_name='shapes'"),
        (["--train_data_dir", "DOCS", "--interleaved"], "--interleaved does not support --train_data_dir"),
        (["--dataset_name", "DOCS", "--interleaved", "--random_flip"], "--interleaved does not support --random_flip"),
        (["--dataset", "shapes", "--clean_image_probability", "0.5"], "applies to interleaved documents only"),
        (["--dataset_name", "DOCS", "--interleaved", "--clean_image_probability", "2"], r"must be in \[0, 1\], got 2"),
    ],
)
def test_bad_interleaved_flags_are_refused_before_loading(tmp_path, flags, message):
    flags = [str(tmp_path) if flag == "DOCS" else flag for flag in flags]
    with pytest.raises(ValueError, match=message):
        training.parse_args([*TINY, *QUICK, *flags, "--output_dir", str(tmp_path / "out")])


def test_the_clean_image_probability_defaults_to_the_measured_value(tmp_path):
    from transfusion_hf.data.collator import DEFAULT_CLEAN_IMAGE_PROBABILITY

    folder = write_documents(tmp_path / "docs", num=2)
    args = training.parse_args([*TINY, *QUICK, "--dataset_name", str(folder), "--interleaved",
                                "--output_dir", str(tmp_path / "out")])  # fmt: skip
    assert training.clean_image_probability_from_args(args) == DEFAULT_CLEAN_IMAGE_PROBABILITY == 0.5


def test_documents_with_images_of_two_buckets_train(tmp_path):
    """`--aspect_ratio_buckets` with documents: each image is cached at its own bucket, a batch holds both sizes as a
    list of latents in reading order, and the model trains on it."""
    square, tall = png_bytes((255, 0, 0)), png_bytes((0, 0, 255), (32, 48))
    documents = [(["a red square", None, "a tall blue one", None], [None, square, None, tall])] * 4
    shards = write_shards(tmp_path / "shards", documents)
    flags = ["--train_data_files", *shards, "--interleaved", "--patch_size", "4",
             "--aspect_ratio_buckets", "32x32,48x32", "--clean_image_probability", "0"]  # fmt: skip
    run_main(tmp_path / "run", *flags, "--max_train_steps", "1")
    args = training.parse_args([*TINY, *QUICK, *flags, "--output_dir", str(tmp_path / "again")])
    accelerator = training.build_accelerator(args)
    data = training.prepare_training_data(args, None, accelerator)
    processor = TransfusionProcessor(data.tokenizer, image_size=32, num_image_tokens=64)
    collator = training.build_collator(
        args, processor, training.build_noiser(args, "flow_prediction"), 512, accelerator, patch_size=4
    )
    batch = collator([data.examples[index] for index in range(2)])
    reset_accelerate()
    assert [tuple(latents.shape) for latents in batch["latents"]] == [(3, 32, 32), (3, 48, 32)] * 2
    assert (batch["input_ids"] == processor.image_token_id).sum() == 2 * (64 + 96)


def test_spread_documents_give_one_image_each_in_turn(tmp_path):
    """A data set sorted by topic, several captioned images per document: the evaluation's and the training head's
    pairs come one per document in turn from documents spread over the whole set, not all from the first few."""
    from transfusion_hf.data.interleaved import captioned_images, head_pairs, one_per_document

    assert one_per_document([[1, 2, 3], [4], [], [5, 6]], 5) == [1, 4, 5, 2, 6]
    assert one_per_document([[None, 1], [2]], 3) == [None, 2, 1]
    red, blue = png_bytes((255, 0, 0)), png_bytes((0, 0, 255))
    documents = [([f"cat {i}.{j}" if k % 2 == 0 else None for j in range(3) for k in range(2)],
                  [None if k % 2 == 0 else red for _ in range(3) for k in range(2)]) for i in range(10)]  # fmt: skip
    documents += [([text.replace("cat", "dog") if text else None for text in texts], [blue if image else None
                   for image in images]) for texts, images in documents]  # fmt: skip
    dataset = load_image_text_dataset(train_data_files=write_shards(tmp_path / "sorted", documents),
                                      image_column="images", caption_column="texts", interleaved=True)  # fmt: skip
    images, captions, skipped = captioned_images(dataset, 6)
    assert skipped == 0 and len(images) == 6
    assert [caption.split(".")[0] for caption in captions] == ["cat 0", "cat 4", "cat 8", "dog 1", "dog 5", "dog 9"]
    assert [image.getpixel((0, 0)) for image in images] == [(255, 0, 0)] * 3 + [(0, 0, 255)] * 3
    # The training head: an image with text before it comes first, one with none (an empty caption) only after.
    cache = cache_latents(load_image_text_dataset(
        train_data_files=write_shards(tmp_path / "first", [([None, "then", None], [red, None, blue])] * 2),
        image_column="images", caption_column="texts", interleaved=True), identity_half, 32, tmp_path / "cache", "h")  # fmt: skip
    assert [pair["text"] for pair in head_pairs(list(cache.dataset), 3)] == ["then", "then", ""]


def test_spread_rows_stay_in_range_on_large_data_sets():
    from transfusion_hf.data.image_text import spread_rows

    assert spread_rows(10, 4) == [0, 3, 6, 9] and spread_rows(3, 8) == [0, 1, 2]
    for num_rows in (2**24 + 4, 50_000_003, 2**28 - 1):  # float32 rounded the last one past the end
        rows = spread_rows(num_rows, 256)
        assert rows[0] == 0 and rows[-1] == num_rows - 1 and len(rows) == 256
