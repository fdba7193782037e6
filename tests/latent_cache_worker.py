"""One process of the two-process latent-cache test (tests/test_data_cache.py), started by `accelerate launch`.

    worker.py IMAGE_FOLDER CACHE_DIR OUTPUT_DIR

Builds the latent cache of the image folder in pixel space (the encode function counts the images it is given),
calls it a second time (which must reuse it), then runs one epoch of a data loader prepared by Accelerate exactly as
examples/train_transfusion.py builds it (`set_seed`, shuffled, seedable sampler), and writes what this process encoded and saw to
OUTPUT_DIR/rank-<index>.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed

from transfusion_hf.data.image_text import load_image_text_dataset
from transfusion_hf.data.latent_cache import cache_latents


def main(folder: str, cache_dir: str, output_dir: str) -> None:
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    # As in the training script: the seedable sampler takes its seed from torch's, and the processes' shuffles must
    # agree for their shares of each epoch to be disjoint.
    set_seed(0)
    dataset = load_image_text_dataset(train_data_dir=folder)
    encoded_images = []

    def encode(pixel_values: torch.Tensor) -> torch.Tensor:
        encoded_images.append(len(pixel_values))
        return pixel_values

    first = cache_latents(dataset, encode, 8, cache_dir, "pixels", batch_size=4, state=accelerator)
    calls_first = list(encoded_images)
    second = cache_latents(dataset, encode, 8, cache_dir, "pixels", batch_size=4, state=accelerator)
    loader = torch.utils.data.DataLoader(
        second.dataset, batch_size=3, shuffle=True, collate_fn=lambda rows: [row["text"] for row in rows]
    )
    loader = accelerator.prepare(loader)
    loader.set_epoch(0)
    seen = [caption for batch in loader for caption in batch]
    record = {
        "rank": accelerator.process_index,
        "num_processes": accelerator.num_processes,
        "first_num_encoded": first.num_encoded,
        "first_encode_calls": calls_first,
        "second_num_encoded": second.num_encoded,
        "second_encode_calls": encoded_images[len(calls_first) :],
        "num_examples": len(second.dataset),
        "seen": seen,
    }
    Path(output_dir, f"rank-{accelerator.process_index}.json").write_text(json.dumps(record))
    accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:4])
