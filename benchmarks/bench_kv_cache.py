"""Per-denoising-step time of TransfusionPipeline against prompt length, with and without the prefix KV cache.

With the cache, the prompt (and `<boi>`) is prefilled once and every denoising step runs only the image positions
against it, so a step should cost about the same for any prompt length; without it every step re-runs the whole
prompt. Classifier-free guidance is on (conditional and unconditional rows in one batch).

A step is timed inside the pipeline's own loop, from one `scheduler.step` call to the next (so the one-off prefill
and noise drawing are excluded). Cached and uncached runs alternate, and the median of all step times over the
repeats is reported (robust to load spikes on a shared machine).

    python benchmarks/bench_kv_cache.py            # 1-3 minutes on 2 CPU threads
    python benchmarks/bench_kv_cache.py --repeats 3 --lengths 16 64
    python benchmarks/bench_kv_cache.py --quick    # tiny smoke run (seconds)
    python benchmarks/bench_kv_cache.py --threads 1   # on a shared, oversubscribed CPU (2 threads spin-wait there)

Writes a markdown table to stdout and the numbers to `benchmarks/results/kv_cache.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler

from transfusion_hf import TransfusionConfig, TransfusionForMixedModal
from transfusion_hf.pipeline_transfusion import TransfusionPipeline
from transfusion_hf.processing_transfusion import special_token_ids
from transfusion_hf.tokenization_transfusion import train_bpe_tokenizer

CAPTIONS = ["a small red circle in the top left", "a large blue square in the center", "a green star"]


def build_pipeline(hidden_size: int, num_layers: int, num_heads: int, latent_size: int) -> TransfusionPipeline:
    tokenizer = train_bpe_tokenizer(CAPTIONS * 10, vocab_size=300)
    config = TransfusionConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": 4 * hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_heads,
            "max_position_embeddings": 2048,
            "pad_token_id": tokenizer.pad_token_id,
        },
        latent_channels=4,
        latent_size=latent_size,
        patch_size=2,
        **special_token_ids(tokenizer),
    )
    torch.manual_seed(0)
    model = TransfusionForMixedModal(config).eval()
    # Perturb the weights (the image output layers start at zero), so the cached/uncached comparison is informative.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    # The VAE only fixes the image size here: outputs stay latents, so it never runs.
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
    )
    pipe = TransfusionPipeline(
        transformer=model, scheduler=DDIMScheduler(clip_sample=False), vae=vae, tokenizer=tokenizer
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_of_length(pipe: TransfusionPipeline, length: int) -> str:
    """A prompt of exactly `length` tokens: a word that is one token, repeated (byte-level BPE splits at spaces)."""
    tokenizer = pipe.processor.tokenizer
    for word in ("circle", "square", "the", "a"):
        if len(tokenizer(word, add_special_tokens=False).input_ids) == 1:
            prompt = " ".join([word] * length)
            assert len(tokenizer(prompt, add_special_tokens=False).input_ids) == length
            return prompt
    raise RuntimeError("no single-token word in the tokenizer")


def time_steps(
    pipe: TransfusionPipeline, prompt: str, steps: int, use_kv_cache: bool
) -> tuple[list[float], torch.Tensor]:
    """Seconds of each full denoising step (model + scheduler) inside one pipeline call, and the final latents."""
    stamps: list[float] = []
    step = pipe.scheduler.step

    def timed_step(*args, **kwargs):
        stamps.append(time.perf_counter())
        return step(*args, **kwargs)

    pipe.scheduler.step = timed_step
    try:
        latents = pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=3.0,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            use_kv_cache=use_kv_cache,
        ).images
    finally:
        del pipe.scheduler.step
    return [later - earlier for earlier, later in zip(stamps, stamps[1:])], latents


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per call (steps - 1 are timed)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--num_heads", type=int, default=8)
    parser.add_argument("--latent_size", type=int, default=16, help="16x16 latents, patch 2: 64 image positions")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "kv_cache.json"))
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, lengths 4 and 8, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.steps, args.repeats = [4, 8], 2, 1
        args.hidden_size, args.num_layers, args.num_heads, args.latent_size = 32, 1, 4, 4

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipe = build_pipeline(args.hidden_size, args.num_layers, args.num_heads, args.latent_size)
    num_patches = pipe.transformer.config.num_patches
    prompts = {length: prompt_of_length(pipe, length) for length in args.lengths}

    with torch.inference_mode():
        for use_kv_cache in (True, False):  # warm-up
            time_steps(pipe, prompts[args.lengths[0]], 2, use_kv_cache)
        times: dict[int, dict[bool, list[float]]] = {length: {True: [], False: []} for length in args.lengths}
        max_difference: dict[int, float] = {}
        for repeat in range(args.repeats):
            for length in args.lengths:
                # Alternate which path goes first, so drift in machine load hits both alike.
                order = (True, False) if repeat % 2 == 0 else (False, True)
                latents = {}
                for use_kv_cache in order:
                    seconds, latents[use_kv_cache] = time_steps(pipe, prompts[length], args.steps, use_kv_cache)
                    times[length][use_kv_cache].extend(seconds)
                max_difference[length] = (latents[True] - latents[False]).abs().max().item()

    rows = []
    for length in args.lengths:
        cached = statistics.median(times[length][True]) * 1000
        uncached = statistics.median(times[length][False]) * 1000
        rows.append(
            {
                "prompt_tokens": length,
                "sequence_positions": length + 2 + num_patches,  # <s> prompt <boi> image
                "cached_ms_per_step": round(cached, 3),
                "uncached_ms_per_step": round(uncached, 3),
                "speedup": round(uncached / cached, 2),
                "cached_steps_ms": [round(value * 1000, 3) for value in times[length][True]],
                "uncached_steps_ms": [round(value * 1000, 3) for value in times[length][False]],
                "max_abs_latent_difference": max_difference[length],
            }
        )
    first, last = rows[0], rows[-1]
    result = {
        "description": "TransfusionPipeline per-denoising-step time vs prompt length, CFG on (2 rows per image)",
        "model": {
            "hidden_size": args.hidden_size,
            "num_layers": args.num_layers,
            "num_heads": args.num_heads,
            "latent": f"4x{args.latent_size}x{args.latent_size}, patch 2",
            "image_positions": num_patches,
            "parameters": sum(parameter.numel() for parameter in pipe.transformer.parameters()),
        },
        "steps_per_call": args.steps,
        "repeats": args.repeats,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "rows": rows,
        "cached_growth_ratio": round(last["cached_ms_per_step"] / first["cached_ms_per_step"], 2),
        "uncached_growth_ratio": round(last["uncached_ms_per_step"] / first["uncached_ms_per_step"], 2),
        "growth_ratio_lengths": [first["prompt_tokens"], last["prompt_tokens"]],
        "total_seconds": round(time.perf_counter() - start, 1),
    }

    print(
        f"Per-denoising-step time, CFG on, {num_patches} image positions, hidden {args.hidden_size}, "
        f"{args.num_layers} layers, {args.threads} threads, median of {args.repeats} x {args.steps - 1} steps\n"
    )
    print("| prompt tokens | cached ms/step | uncached ms/step | speedup | max abs diff |")
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['prompt_tokens']} | {row['cached_ms_per_step']:.2f} | {row['uncached_ms_per_step']:.2f} | "
            f"{row['speedup']:.2f}x | {row['max_abs_latent_difference']:.1e} |"
        )
    print(
        f"\nGrowth {first['prompt_tokens']} -> {last['prompt_tokens']} tokens: cached x{result['cached_growth_ratio']}, "
        f"uncached x{result['uncached_growth_ratio']} (total {result['total_seconds']} s, "
        f"load average {result['load_average'][0]:.1f})"
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {output}")


if __name__ == "__main__":
    main()
