"""Text-only data mixed into training, as in the paper (one model trained on text-only data and image-caption pairs
together): load it with `datasets`, hold some rows out for a text LM loss, and add text-only rows to the image-caption
examples."""

from __future__ import annotations

from pathlib import Path

import datasets
import torch

# The `datasets` packaged builder of each local file type.
TEXT_FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_text_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    data_files: str | list[str] | None = None,
    split: str = "train",
    text_column: str = "text",
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """Load text-only data with `datasets.load_dataset`.

    Sources: a Hub data set id or a `datasets` builder name (`"text"`, `"json"`, ...) with optional `data_files`; a
    local file as `dataset_name`; or `data_files` alone (`.txt`: one document per line, `.jsonl`/`.json`, `.csv`,
    `.parquet`: the builder follows the extension).

    Returns:
        `datasets.Dataset` with one column, `text`, without empty rows.

    Raises:
        ValueError: no source, files of mixed or unknown types, or a missing column (listing the available ones).
    """
    if dataset_name is None and not data_files:
        raise ValueError("Give `dataset_name` (a data set id, builder name or local file) or `data_files`.")
    if dataset_name is not None and Path(dataset_name).is_file():
        dataset_name, data_files = None, [dataset_name]
    if dataset_name is None:
        files = [data_files] if isinstance(data_files, str) else list(data_files)
        builders = {TEXT_FILE_BUILDERS.get(Path(file).suffix.lower()) for file in files}
        if len(builders) != 1 or None in builders:
            raise ValueError(
                f"`data_files`={files!r}: give files of one type among {sorted(TEXT_FILE_BUILDERS)}, or name the "
                "`datasets` builder as `dataset_name`."
            )
        dataset_name = builders.pop()
    dataset = datasets.load_dataset(
        dataset_name, dataset_config_name, data_files=data_files, split=split, cache_dir=cache_dir
    )
    if text_column not in dataset.column_names:
        raise ValueError(
            f"`text_column`={text_column!r} is not a column of the text data set; available columns: "
            f"{dataset.column_names}."
        )
    dataset = dataset.select_columns([text_column])
    if text_column != "text":
        dataset = dataset.rename_column(text_column, "text")
    return dataset.filter(lambda text: isinstance(text, str) and bool(text.strip()), input_columns="text")


def text_only_rows(num_image_rows: int, share: float) -> int:
    """How many text-only rows make `share` of all rows next to `num_image_rows` image-caption rows."""
    if not 0 <= share < 1:
        raise ValueError(f"`text_only_share` must be in [0, 1), got {share!r}.")
    return round(share / (1 - share) * num_image_rows)


def text_only_examples(
    dataset: datasets.Dataset, num_image_rows: int, share: float, num_held_out: int = 0, seed: int = 0
) -> tuple[list[dict], list[str]]:
    """Text-only training examples for the collator, and held-out texts for a text LM loss.

    The rows are taken in a seeded random order: the first `num_held_out` are held out, the others give the training
    rows, cycled when there are fewer of them than `share` asks for.

    Args:
        dataset (`datasets.Dataset`): with a `text` column ([`load_text_dataset`]).
        num_image_rows (`int`): the image-caption examples they are mixed with.
        share (`float`): the fraction of all rows that are text-only, in [0, 1).
        num_held_out (`int`): rows kept out of training.
        seed (`int`): seed of the order.

    Returns:
        The training examples (`{"text": str}`, no latents: text-only for [`TransfusionDataCollator`]) and the
        held-out texts.
    """
    count = text_only_rows(num_image_rows, share)
    if num_held_out < 0:
        raise ValueError(f"`num_held_out` must be >= 0, got {num_held_out!r}.")
    if count and num_held_out >= len(dataset):
        raise ValueError(
            f"The text data set has {len(dataset)} non-empty rows: holding out {num_held_out} leaves none to train on."
        )
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out, train = order[:num_held_out], order[num_held_out:]
    picks = [train[index % len(train)] for index in range(count)]
    examples = [{"text": text} for text in dataset.select(picks)["text"]] if picks else []
    return examples, dataset.select(held_out)["text"] if held_out else []


__all__ = ["TEXT_FILE_BUILDERS", "load_text_dataset", "text_only_rows", "text_only_examples"]
