"""Text-to-image latency for one image: TransfusionPipeline (with / without the prefix KV cache) against the peer.

Both sides denoise one ``(4, latent_size, latent_size)`` latent (patch 2) for a ``--prompt_length`` token prompt, with
``--steps`` Euler steps of a flow-matching model and classifier-free guidance ``--cfg``, i.e. the same number of
model evaluations per guidance branch:

* ours: ``TransfusionPipeline(prompt, num_inference_steps=steps, guidance_scale=cfg, output_type="latent")`` with
  `FlowMatchEulerDiscreteScheduler`; every step is one batched forward of 2 rows (conditional + unconditional) over
  the image positions against the prefilled prompt cache (``use_kv_cache=True``, one prefill forward first), or over
  the whole prompt + image (``use_kv_cache=False``);
* the peer: its fastest path, ``sample_many`` with the image forced at the start and the Euler solver: 2 cache
  prefills, then 2 batch-1 forwards of the image positions per step (see README_peer.md).

Same width, depth, heads and feed-forward width on both sides (as in ``bench_training.py``'s ``dims`` set-up). Neither
side decodes latents to pixels. ``--device cuda --dtype bfloat16`` runs both sides on a GPU under the same bf16
autocast (timings synchronise the device); ``--preset paper`` is the GPU measurement of issue 30: the paper's 0.16B
width and depth (768 x 16, 12 heads), a 256x256 image's VAE latent (4 x 32 x 32, 256 patches), 50 steps, guidance.
The three candidates are timed in turn, one image each (A B C A B C ..., the order flipped every round; ``--images`` images each per round) after one untimed image each. Reported: the median seconds
per image, and the peer's speed ratio both as a ratio of medians and as the median over neighbouring pairs of peer
time / our time ("paired"), which holds up when the load of a shared machine drifts.

    python benchmarks/bench_sampling.py             # ~1-4 minutes on 2 CPU cores (quiet - busy)
    python benchmarks/bench_sampling.py --quick     # tiny smoke run
    python benchmarks/bench_sampling.py --preset paper --device cuda --dtype bfloat16 --output \
        benchmarks/results/sampling_gpu.json        # on a GPU: seconds per 256x256 image at 0.16B

Writes ``benchmarks/results/sampling.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

import bench_common as common

DEFAULTS = dict(dim=256, depth=6, heads=8, prompt_length=16, latent_size=16, steps=25, rounds=5, images=1)
PEER = "peer (sample_many, Euler)"
QUICK = dict(dim=32, depth=2, heads=4, prompt_length=8, latent_size=4, steps=2, rounds=1, images=1)
# The paper's 0.16B transformer (recipe `paper_0.16b`: width 768, 16 layers, 12 heads) on a 256x256 image's VAE
# latent (8x down-sampling: 4 x 32 x 32, patch 2 -> 256 patches), 50 steps: the GPU sampling figure of issue 30.
PAPER = dict(dim=768, depth=16, heads=12, prompt_length=32, latent_size=32, steps=50, rounds=3, images=1)
PRESETS = {"default": DEFAULTS, "quick": QUICK, "paper": PAPER}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, help="transformer width (default 256)")
    parser.add_argument("--depth", type=int, help="layers (default 6)")
    parser.add_argument("--heads", type=int, help="attention heads (default 8)")
    parser.add_argument("--prompt_length", type=int, help="prompt text tokens (default 16)")
    parser.add_argument("--latent_size", type=int, help="latent side; patch 2 -> (side/2)^2 patches (default 16)")
    parser.add_argument("--steps", type=int, help="denoising (Euler) steps (default 25)")
    parser.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale")
    parser.add_argument("--rounds", type=int, help="alternation rounds (default 5)")
    parser.add_argument("--images", type=int, help="timed images per candidate per round (default 1)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed images per candidate first (>= 1: the first one also counts the transformer calls)",
    )
    parser.add_argument("--text_vocab", type=int, default=256)
    parser.add_argument("--no_peer", action="store_true", help="only our pipeline (also automatic without the peer)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 steps, 1 round: a smoke test")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="sizes and steps to start from (default: `default`; `--quick` = `quick`; `paper`: 0.16B, 32x32x4 latents, "
        "50 steps); any size flag given wins",
    )
    parser.add_argument("--device", default="cpu", help="where both sides run (e.g. cuda)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="autocast dtype for both sides (fp32 weights); float32 = no autocast",
    )
    parser.add_argument("--output", default=str(common.RESULTS_DIR / "sampling.json"))
    args = parser.parse_args(argv)
    if args.quick and args.preset not in (None, "quick"):
        parser.error(f"--quick and --preset {args.preset} ask for different sizes: give one")
    common.fill_defaults(args, PRESETS[args.preset or ("quick" if args.quick else "default")])
    return args


def timed(function: Callable[[], torch.Tensor], device: torch.device, dtype: torch.dtype) -> Callable[[], None]:
    """``function`` under the autocast of ``dtype`` (none for float32), waiting for the device before it returns, so
    that wall-clock time measures the work and not only its launch on a GPU."""

    def run() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


def build_candidates(args: argparse.Namespace, peer) -> tuple[dict, dict]:
    """Timed callables per candidate, and what to count their transformer calls on."""
    config = common.build_our_config(
        args.dim,
        args.depth,
        args.heads,
        text_vocab=args.text_vocab,
        latent_size=args.latent_size,
        max_positions=max(512, args.prompt_length + 512),
        prediction_type="flow_prediction",
    )
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = common.build_our_model(config)
    pipe = common.build_our_pipeline(model, common.build_word_tokenizer(args.text_vocab)).to(device)
    prompt_ids = torch.randint(0, args.text_vocab, (args.prompt_length,), generator=torch.Generator().manual_seed(0))
    prompt = common.prompt_text(prompt_ids.tolist())

    def ours(use_kv_cache: bool):
        def sample() -> torch.Tensor:
            return pipe(
                prompt,
                num_inference_steps=args.steps,
                guidance_scale=args.cfg,
                generator=torch.Generator().manual_seed(0),
                output_type="latent",
                use_kv_cache=use_kv_cache,
            ).images

        return sample

    candidates = {
        "ours (KV cache)": timed(ours(True), device, dtype),
        "ours (no cache)": timed(ours(False), device, dtype),
    }
    backbones = {"ours (KV cache)": model.model, "ours (no cache)": model.model}
    parameters = {"ours (KV cache)": common.parameter_count(model), "ours (no cache)": common.parameter_count(model)}
    if peer is not None:
        torch.manual_seed(0)
        peer_model = (
            peer.build_peer_model(
                args.dim, args.depth, args.heads, args.dim // args.heads, args.text_vocab, 4, args.latent_size, 2
            )
            .to(device)
            .eval()
        )
        candidates[PEER] = timed(
            lambda: peer.peer_sample_image(peer_model, prompt_ids, args.steps, args.cfg), device, dtype
        )
        backbones[PEER] = peer_model.transformer
        parameters[PEER] = peer.peer_parameter_count(peer_model)
    return candidates, {"backbones": backbones, "parameters": parameters}


def measure(args: argparse.Namespace, peer) -> list[dict]:
    candidates, info = build_candidates(args, peer)
    with torch.no_grad():
        # The first untimed image of each candidate also counts its transformer calls.
        calls = {name: common.count_forward_calls(info["backbones"][name], run) for name, run in candidates.items()}
        times = common.alternate(candidates, args.rounds, args.images, max(args.warmup - 1, 0))
    rows_per_call = {"ours (KV cache)": 2, "ours (no cache)": 2, PEER: 1}
    fastest_ours = min(common.median(times[name]) for name in candidates if name.startswith("ours"))
    rows = []
    for name in candidates:
        seconds = common.median(times[name])
        rows.append(
            {
                "candidate": name,
                "parameters": info["parameters"][name],
                "transformer_calls": calls[name],
                "rows_per_call": rows_per_call[name] if args.cfg > 1 else 1,
                "s_per_image": seconds,
                "ms_per_step": seconds / args.steps * 1e3,
                "slowdown_vs_fastest_ours": seconds / fastest_ours,
                "paired_peer_over_this": common.paired_ratio(times[PEER], times[name]) if PEER in times else None,
                "round_medians_s": common.round_medians(times[name], args.rounds),
                "image_times_s": times[name],
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    peer_row = next((row for row in rows if row["candidate"].startswith("peer")), None)
    headers = ["candidate", "params (M)", "transformer calls (rows each)", "s/image", "ms/step"]
    headers += ["peer time / this: medians (paired)"]
    body = [
        [
            row["candidate"],
            row["parameters"] / 1e6,
            f"{row['transformer_calls']} ({row['rows_per_call']})",
            row["s_per_image"],
            row["ms_per_step"],
            f"{peer_row['s_per_image'] / row['s_per_image']:.2f}x ({row['paired_peer_over_this']:.2f}x)"
            if peer_row
            else "n/a",
        ]
        for row in rows
    ]
    return common.markdown_table(headers, body)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    torch.set_num_threads(args.threads)
    peer = None if args.no_peer else common.peer_module()
    if peer is None and not args.no_peer:
        print("transfusion_pytorch is not installed: timing our pipeline only (pip install transfusion-hf[bench])")
    start = time.perf_counter()
    rows = measure(args, peer)
    result = {
        "benchmark": "text-to-image latency, one image, Euler flow-matching steps with classifier-free guidance",
        "args": vars(args),
        "patches": (args.latent_size // 2) ** 2,
        "environment": common.environment(args.threads),
        "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
        "total_seconds": round(time.perf_counter() - start, 1),
        "rows": rows,
    }
    settings = (
        f"{args.prompt_length}-token prompt, {result['patches']} patches, {args.steps} steps, cfg {args.cfg}; "
        f"median of {args.rounds} rounds x {args.images} images; {args.device} ({args.dtype}); {args.threads} threads"
    )
    return common.report(result, table(rows), settings, args.output)


if __name__ == "__main__":
    main()
