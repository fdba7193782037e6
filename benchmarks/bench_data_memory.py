#!/usr/bin/env python
"""Peak resident memory of data preparation + a few training steps against the size of the data set.

Writes image folders (diffusers layout: PNG files + metadata.jsonl) of rendered glyphs, e.g. 2,000 and 20,000 images
of 64x64, then runs `examples/train_transfusion.py` on each in a subprocess with the same flags: the tiny preset, a
small random `AutoencoderKL` (64x64 -> 32x32x4 latents), a fresh latent cache, a few steps. The peak RSS of each child
comes from `os.wait4` (the kernel's `ru_maxrss` of that process alone). The latents go through the disk cache
(`transfusion_hf.data.latent_cache`) and are read back memory-mapped, so memory should not grow with the data set:
the target is a ratio of at most 1.25 between the largest and the smallest. Also reports the encoding throughput
(decode + resize + VAE + write, images/s) that the training script prints.

    OMP_NUM_THREADS=1 python benchmarks/bench_data_memory.py              # 2,000 and 20,000 images of 64x64
    python benchmarks/bench_data_memory.py --quick                        # a smoke run of a few seconds
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import PIL.Image
import torch
from diffusers import AutoencoderKL

from bench_common import RESULTS_DIR, environment, markdown_table, write_json
from transfusion_hf.data.glyphs import render_glyphs

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_transfusion.py"
THROUGHPUT = re.compile(r"\(([\d.]+) images/s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="Images per folder (2000 20000).")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="Training steps after the data preparation.")
    parser.add_argument("--train_batch_size", type=int, default=8)
    parser.add_argument("--encode_batch_size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the training runs.")
    parser.add_argument("--work_dir", default=None, help="Where the folders and caches go (default: a temp folder).")
    parser.add_argument("--output", default=str(RESULTS_DIR / "data_memory.json"))
    parser.add_argument("--quick", action="store_true", help="Smoke run: 16 and 32 images of 32x32, one step.")
    args = parser.parse_args(argv)
    if args.quick:
        args.resolution, args.steps, args.train_batch_size = 32, 1, 4
    args.sizes = args.sizes or ([16, 32] if args.quick else [2000, 20000])
    return args


def write_image_folder(folder: Path, num_images: int, resolution: int, chunk: int = 1000) -> Path:
    """`num_images` glyph renders as PNG files and a metadata.jsonl (`file_name`, `text`), rendered `chunk` at a time
    so that this process stays small too."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "metadata.jsonl").open("w") as metadata:
        for start in range(0, num_images, chunk):
            count = min(chunk, num_images - start)
            # Seed per chunk: the first images of the large folder are the images of the small one.
            specs, pixels = render_glyphs("train", count, seed=start, resolution=resolution)
            for offset, (spec, image) in enumerate(zip(specs, pixels)):
                name = f"{start + offset:06d}.png"
                PIL.Image.fromarray(image).save(folder / name)
                metadata.write(json.dumps({"file_name": name, "text": spec.caption}) + "\n")
    return folder


def save_tiny_vae(folder: Path, resolution: int) -> Path:
    """A random AutoencoderKL with one 2x downsampling (64x64 images -> 32x32x4 latents), saved like a real one."""
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=resolution,
    )
    vae.save_pretrained(folder)
    return folder


def run_training(args: argparse.Namespace, data: Path, vae: Path, work: Path) -> dict:
    """One training run in a child process; returns its peak RSS, wall time and printed encoding throughput."""
    flags = [
        "--train_data_dir", str(data), "--resolution", str(args.resolution), "--vae_name_or_path", str(vae),
        "--model_config", "tiny", "--max_train_steps", str(args.steps), "--train_batch_size", str(args.train_batch_size),
        "--encode_batch_size", str(args.encode_batch_size), "--checkpointing_steps", "0", "--report_to", "none",
        "--cache_dir", str(work / "datasets_cache"), "--latent_cache_dir", str(work / "latent_cache"),
        "--output_dir", str(work / "run"),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    log = work / "train.log"
    started = time.perf_counter()
    with log.open("w") as handle:
        process = subprocess.Popen(
            [sys.executable, str(SCRIPT), *flags], stdout=handle, stderr=subprocess.STDOUT, env=env
        )
        # wait4 reports the resources of this child alone (RUSAGE_CHILDREN would give the largest child so far).
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    output = log.read_text()
    if process.returncode != 0:
        raise RuntimeError(f"training on {data} failed ({process.returncode}):\n{output[-3000:]}")
    throughput = THROUGHPUT.search(output)
    cache_bytes = sum(path.stat().st_size for path in (work / "latent_cache").rglob("*.arrow"))
    return {
        "peak_rss_mb": usage.ru_maxrss / 1024,  # kilobytes on Linux
        "seconds": seconds,
        "encode_images_per_s": float(throughput.group(1)) if throughput else None,
        "latent_cache_mb": cache_bytes / 2**20,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    work_root = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_data_memory_"))
    try:
        vae = save_tiny_vae(work_root / "vae", args.resolution)
        rows = []
        for size in args.sizes:
            work = work_root / f"n{size}"
            data = write_image_folder(work / "images", size, args.resolution)
            rows.append({"images": size, **run_training(args, data, vae, work)})
            print(f"{size} images: {rows[-1]}", flush=True)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_root, ignore_errors=True)
    ratio = max(row["peak_rss_mb"] for row in rows) / min(row["peak_rss_mb"] for row in rows)
    table = markdown_table(
        ["images", "peak RSS (MB)", "encoding (images/s)", "latent cache (MB)", "prep + steps (s)"],
        [
            [row["images"], row["peak_rss_mb"], row["encode_images_per_s"], row["latent_cache_mb"], row["seconds"]]
            for row in rows
        ],
    )
    print(table)
    print(f"peak RSS, largest / smallest data set: {ratio:.3f}x (target <= 1.25x)")
    result = {
        "arguments": vars(args),
        "rows": rows,
        "peak_rss_ratio": ratio,
        "environment": environment(args.threads),
    }
    write_json(result, args.output)
    return result


if __name__ == "__main__":
    main()
