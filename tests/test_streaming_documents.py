"""`--streaming` with interleaved documents and with `--aspect_ratio_buckets`: documents read on the fly from a parquet
folder or webdataset shards collate exactly as the same documents from the latent cache, each image is encoded at its
bucket (a batch of documents may mix sizes: a list of latents; image-caption pairs batch by bucket), a resumed stream
hands out the same batches, and the training script trains from both."""

from __future__ import annotations

import io
import tarfile
from itertools import islice
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from pipeline_components import get_tokenizer
from script_loading import one_thread_and_fresh_accelerate  # noqa: F401 (autouse fixture)
from test_interleaved_data import identity_half, png_bytes, write_documents, write_shards
from test_train_editing import run_main
from test_train_transfusion import read_log
from transfusion_hf.data.collator import TransfusionDataCollator
from transfusion_hf.data.image_text import load_image_text_dataset
from transfusion_hf.data.interleaved import document_example
from transfusion_hf.data.latent_cache import cache_latents
from transfusion_hf.data.streaming import StreamingLatentBatches, take_captions, take_examples
from transfusion_hf.noising import TransfusionNoiser
from transfusion_hf.processing_transfusion import TransfusionProcessor

BUCKETS = [(32, 32), (48, 32)]  # (height, width)


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


def collator(tokenizer, seed: int = 3) -> TransfusionDataCollator:
    """The training collator (patch 4: a 16x16 latent takes 16 placeholders), clean draws at the default share."""
    processor = TransfusionProcessor(tokenizer, image_size=32, num_image_tokens=64)
    return TransfusionDataCollator(
        processor, TransfusionNoiser(FlowMatchEulerDiscreteScheduler(), "flow_prediction"), seed=seed, patch_size=4
    )


def load_documents(source: Path | list[str], streaming: bool):
    where = {"train_data_files": source} if isinstance(source, list) else {"dataset_name": str(source)}
    return load_image_text_dataset(**where, image_column="images", caption_column="texts", interleaved=True,
                                   streaming=streaming)  # fmt: skip


def stream(dataset, collate_fn, batch_size: int = 4, **kwargs) -> StreamingLatentBatches:
    return StreamingLatentBatches(dataset, identity_half, collate_fn, 32, batch_size, interleaved=True, **kwargs)


def assert_same_batch(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key, value in first.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, second[key]), key
        elif isinstance(value, list):  # images of several sizes, or targets with None at the clean images
            pairs = zip(value, second[key], strict=True)
            assert all(a is b is None or torch.equal(a, b) for a, b in pairs), key


def test_streamed_documents_collate_as_cached_ones(tmp_path, tokenizer):
    folder = write_documents(tmp_path / "docs", num=8)
    streamed = list(stream(load_documents(folder, streaming=True), collator(tokenizer), shuffle_buffer_size=0))
    cache = cache_latents(load_documents(folder, streaming=False), identity_half, 32, tmp_path / "cache", "half")
    reference = collator(tokenizer)
    assert len(streamed) == 2
    for index, batch in enumerate(streamed):
        rows = [document_example(cache.dataset[row]) for row in range(4 * index, 4 * index + 4)]
        assert_same_batch(batch, reference(rows))
    # Validation pairs: each image with the text before it; the tokenizer reads every text of the documents.
    head = take_examples(load_documents(folder, streaming=True), 3, identity_half, 32, interleaved=True)
    assert len(head) == 3 and all(pair["latents"].shape == (3, 16, 16) for pair in head)
    texts = list(take_captions(load_documents(folder, streaming=True), 2, interleaved=True))
    assert texts == [text for row in cache.dataset.select(range(2)) for text in row["texts"] if text is not None]


def test_streamed_documents_in_buckets_resume_exactly(tmp_path):
    """Webdataset shards of documents with a square and a tall image: each image at its bucket, in reading order; a
    stream restored from the state saved after its first batch hands out the rest as an uninterrupted one (shuffle
    buffer included); an unreadable image skips its document, counted."""
    square, tall = png_bytes((255, 0, 0)), png_bytes((0, 0, 255), (32, 48))
    documents = [([f"doc {index}", None, "tall", None], [None, square, None, tall]) for index in range(9)]
    documents[4] = (["broken", None], [None, square[:40]])
    shards = write_shards(tmp_path / "shards", documents)

    def shapes(examples: list[dict]) -> list:
        return [[part if isinstance(part, str) else tuple(part["latents"].shape) for part in example["segments"]]
                for example in examples]  # fmt: skip

    def batches():
        return stream(load_documents(shards, streaming=True), shapes, 3, shuffle_buffer_size=4, seed=1,
                      aspect_ratio_buckets=BUCKETS)  # fmt: skip

    full = batches()
    reference = list(full)
    assert [len(batch) for batch in reference] == [3, 3, 2] and full.num_skipped == 1
    assert {tuple(document[1:]) for batch in reference for document in batch} == {((3, 16, 16), "tall", (3, 24, 16))}
    order = [document[0] for batch in reference for document in batch]
    assert sorted(order) == sorted(f"doc {index}" for index in range(9) if index != 4) and order != sorted(order)
    first = batches()
    head = next(iter(first))
    resumed = batches()
    resumed.load_state_dict(first.state_dict())
    assert [head, *resumed] == reference


def write_pair_shards(folder: Path, sizes: list[tuple[int, int]]) -> list[str]:
    """webdataset shards of image-caption pairs, one `(width, height)` per sample."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pairs-000.tar"
    with tarfile.open(path, "w") as tar:
        for index, size in enumerate(sizes):
            for name, payload in ((f"{index:04d}.png", png_bytes((index * 20, 0, 0), size)),
                                  (f"{index:04d}.txt", f"image {index}".encode())):  # fmt: skip
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return [str(path)]


def test_streamed_pairs_batch_by_bucket_and_resume_exactly(tmp_path):
    """Each pair is encoded at its bucket and waits for a batch of its bucket; the end of the pass hands out what is
    left, one batch per bucket; a stream restored after any batch (pairs waiting in the other bucket, or leftovers of
    the end of the pass still to come) hands out the rest as an uninterrupted one, in order and shuffled."""
    square, tall = (32, 32), (32, 48)  # (width, height)
    sizes = [square, tall, tall, square, tall, square, square, tall, tall, square]
    shards = write_pair_shards(tmp_path / "pairs", sizes)

    def batches(**kwargs):
        pairs = load_image_text_dataset(train_data_files=shards, image_column="png", caption_column="txt",
                                        streaming=True)  # fmt: skip
        summary = lambda examples: [(example["text"], example["bucket"], tuple(example["latents"].shape))  # noqa: E731
                                    for example in examples]  # fmt: skip
        return StreamingLatentBatches(pairs, identity_half, summary, 32, 2, aspect_ratio_buckets=BUCKETS, **kwargs)

    in_order = list(batches(shuffle_buffer_size=0))
    # Buckets (height, width) 32x32 -> latents 16x16, 48x32 -> 24x16; five pairs of each: one left over in each.
    assert [[text for text, _, _ in batch] for batch in in_order] == [
        ["image 1", "image 2"], ["image 0", "image 3"], ["image 5", "image 6"], ["image 4", "image 7"], ["image 8"],
        ["image 9"],
    ]  # fmt: skip
    for batch in in_order:
        assert len({(bucket, shape) for _, bucket, shape in batch}) == 1
        assert batch[0][1:] in ((0, (3, 16, 16)), (1, (3, 24, 16)))
    for kwargs in ({"shuffle_buffer_size": 0}, {"shuffle_buffer_size": 4, "seed": 0}):
        reference = list(batches(**kwargs))
        texts = [text for batch in reference for text, _, _ in batch]
        assert sorted(texts) == sorted(f"image {index}" for index in range(10))
        assert all(len({bucket for _, bucket, _ in batch}) == 1 for batch in reference)
        waiting = []
        for stop in range(1, len(reference)):
            first = batches(**kwargs)
            head = list(islice(first, stop))
            waiting.append(len(first.state_dict()["states"][0]["pending"]))
            resumed = batches(**kwargs)
            resumed.load_state_dict(first.state_dict())
            # Saved again before its first batch (a checkpoint right after resuming), the stream keeps its position.
            again = batches(**kwargs)
            again.load_state_dict(resumed.state_dict())
            assert [*head, *again] == reference, (kwargs, stop)
        assert max(waiting) > 0 and waiting[-1] == 1  # the last stop: one leftover batch still to come
    assert texts != sorted(texts)  # the shuffled pass


def test_the_script_trains_from_streamed_documents_and_buckets(tmp_path):
    square, tall = png_bytes((255, 0, 0)), png_bytes((0, 0, 255), (32, 48))
    shards = write_shards(
        tmp_path / "shards", [(["a red square", None, "a tall blue one", None], [None, square, None, tall])] * 6
    )
    out = tmp_path / "documents"
    run_main(out, "--train_data_files", *shards, "--interleaved", "--streaming", "--patch_size", "4",
             "--aspect_ratio_buckets", "32x32,48x32", "--max_train_steps", "2")  # fmt: skip
    assert [record["step"] for record in read_log(out)] == [1, 2]
    assert (out / "transformer" / "config.json").is_file()
    # Image-caption pairs in buckets (the built-in shapes drawn at the bucket sizes), streamed.
    out = tmp_path / "pairs"
    run_main(out, "--dataset_name", "shapes", "--shapes_num_samples", "16", "--streaming", "--patch_size", "4",
             "--aspect_ratio_buckets", "32x32,48x32", "--max_train_steps", "2")  # fmt: skip
    assert [record["step"] for record in read_log(out)] == [1, 2]
