"""Training throughput and peak memory: transfusion_hf against the peer (lucidrains' transfusion-pytorch 0.20.0).

One train step = forward with text labels and diffusion targets, backward, AdamW step, on a batch of sequences of
``text_length`` text tokens followed by one image of ``(latent_size / patch_size) ** 2`` patches (4-channel latents,
patch 2, linear patch embedding on both sides). Tokens are counted the same way for both: text + patches per
sequence; the positions each model actually runs (ours: ``<s> text <boi> image <eoi> </s>``, the peer:
``[sos] text [meta] "h,w" [som] image [eom] [eos]`` minus the shift) are reported next to it.

Two set-ups (``--setups``):

* ``dims``: same width, depth, heads (and per-head width) and feed-forward width on both sides. The peer's block has
  more parameters at the same width (time-conditioned adaptive norms, gated values, ...), so the counts are reported.
* ``params``: our width is scaled (depth, heads and the 8/3 feed-forward ratio kept) until our parameter count is
  the closest to the peer's at ``--dim``.

Timing: both models live in one process and are stepped alternately, one step each in turn (A B A B ..., the order
flipped every round), ``--steps`` timed steps each per round after ``--warmup`` untimed steps each. Reported: the
median step time of each model over all rounds (per-round medians in the json), and the speed-up as the median over
neighbouring step pairs of peer time / our time ("paired"), which holds up when the load of a shared machine drifts.

Memory (CPU, ``--memory``): torch's CPU allocator is invisible to ``tracemalloc``, and RSS deltas inside a process
that has already trained are meaningless, so every side is measured in a fresh subprocess: the peak resident set
after ``--memory_steps`` train steps (the kernel's ``VmHWM``, reset just before the first step so the import peak does
not count), and its growth over the resident set at that moment (model, optimizer and batch built). The growth is what training adds: gradients, AdamW states, activations and the
allocator's slack.

    python benchmarks/bench_training.py                 # both set-ups: ~2 min with --threads 1 on 2 busy cores,
                                                        # ~4 min per set-up with 2 threads there
    python benchmarks/bench_training.py --quick         # tiny smoke run (seconds)
    python benchmarks/bench_training.py --setups params --threads 1 --compile   # + our step compiled (fullgraph)
    python benchmarks/bench_training.py --setups params --threads 1 --dtype bfloat16   # both under bf16 autocast

Writes ``benchmarks/results/training.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import bench_common as common

DEFAULTS = dict(dim=256, depth=6, heads=8, batch_size=8, text_length=16, latent_size=16, rounds=3, steps=5)
QUICK = dict(dim=32, depth=2, heads=4, batch_size=2, text_length=8, latent_size=4, rounds=2, steps=1)
COMPILED = "ours (compiled)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, help="transformer width (default 256)")
    parser.add_argument("--depth", type=int, help="layers (default 6)")
    parser.add_argument("--heads", type=int, help="attention heads (default 8)")
    parser.add_argument("--batch_size", type=int, help="sequences per step (default 8)")
    parser.add_argument("--text_length", type=int, help="text tokens per sequence (default 16)")
    parser.add_argument("--latent_size", type=int, help="latent side; patch 2 -> (side/2)^2 patches (default 16)")
    parser.add_argument("--latent_channels", type=int, default=4)
    parser.add_argument("--patch_size", type=int, default=2)
    parser.add_argument("--text_vocab", type=int, default=256, help="text tokens (before the specials)")
    parser.add_argument("--rounds", type=int, help="alternation rounds (default 3)")
    parser.add_argument("--steps", type=int, help="timed steps per model per round (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--setups", nargs="+", default=["dims", "params"], choices=["dims", "params"])
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True, help="peak RSS subprocesses")
    parser.add_argument("--memory_steps", type=int, default=3)
    parser.add_argument("--no_peer", action="store_true", help="only our model (also automatic without the peer)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="autocast dtype of every side's step (fp32 weights); float32 = no autocast",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time our step under torch.compile(fullgraph=True) (inductor; compiled during the warm-up)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 step x 2 rounds: a smoke test")
    parser.add_argument("--output", default=str(common.RESULTS_DIR / "training.json"))
    parser.add_argument("--_memory_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    common.fill_defaults(args, QUICK if args.quick else DEFAULTS)
    if args.quick:
        args.warmup, args.memory_steps = min(args.warmup, 1), min(args.memory_steps, 1)
    return args


# ---------------------------------------------------------------------------------------------------- models
def our_config(args: argparse.Namespace, dim: int) -> common.TransfusionConfig:
    return common.build_our_config(
        dim,
        args.depth,
        args.heads,
        text_vocab=args.text_vocab,
        latent_channels=args.latent_channels,
        latent_size=args.latent_size,
        patch_size=args.patch_size,
        max_positions=max(512, args.text_length + 512),
    )


def our_parameters(args: argparse.Namespace, dim: int) -> int:
    """Our parameter count at width ``dim``, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return common.parameter_count(common.TransfusionForMixedModal(our_config(args, dim)))


def width_matching(args: argparse.Namespace, target: int) -> int:
    """Our width (a multiple of ``2 * heads``: even RoPE head size) whose parameter count is closest to ``target``."""
    step = 2 * args.heads
    low, high = 1, 4
    while our_parameters(args, high * step) < target:
        low, high = high, high * 2
    while high - low > 1:  # the count grows with the width: bisect on multiples of `step`
        middle = (low + high) // 2
        low, high = (middle, high) if our_parameters(args, middle * step) < target else (low, middle)
    return min((low * step, high * step), key=lambda width: abs(our_parameters(args, width) - target))


def build_peer(args: argparse.Namespace, peer):
    torch.manual_seed(0)
    return peer.build_peer_model(
        args.dim,
        args.depth,
        args.heads,
        args.dim // args.heads,
        args.text_vocab,
        args.latent_channels,
        args.latent_size,
        args.patch_size,
    )


def trainer(side: str, args: argparse.Namespace, dim: int, peer=None):
    """(model, step function) for one side (`peer`, `ours` or `ours (compiled)`), the step under `--dtype`'s autocast;
    the batch and the AdamW optimizer are built here too."""
    model, step = _trainer(side, args, dim, peer)
    dtype = getattr(torch, args.dtype)
    if dtype == torch.float32:
        return model, step

    def autocast_step():
        with torch.autocast("cpu", dtype=dtype):
            return step()

    return model, autocast_step


def _trainer(side: str, args: argparse.Namespace, dim: int, peer=None):
    generator = torch.Generator().manual_seed(0)
    if side == "peer":
        model = build_peer(args, peer)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batch = peer.make_peer_batch(
            args.batch_size, args.text_length, args.text_vocab, args.latent_channels, args.latent_size,
            generator=generator,
        )  # fmt: skip
        return model, lambda: peer.peer_train_step(model, optimizer, batch)
    config = our_config(args, dim)
    model = common.build_our_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = common.make_our_batch(config, args.batch_size, args.text_length, generator)
    # One graph for the whole forward (tests/test_compile.py keeps it so); the parameters stay the model's.
    forward = torch.compile(model, fullgraph=True) if side == COMPILED else model
    return model, lambda: common.our_train_step(forward, optimizer, batch)


# ---------------------------------------------------------------------------------------------------- memory
def memory_worker(spec: str) -> None:
    """Subprocess entry: build one side, train a few steps, print the peak RSS and its growth in MiB as json."""
    options = json.loads(spec)
    args = parse_args(options.pop("argv"))
    torch.set_num_threads(args.threads)
    _, step = trainer(options["side"], args, options["dim"], common.peer_module())
    before = common.reset_peak_rss()
    for _ in range(args.memory_steps):
        step()
    print(json.dumps({"rss_before_mib": before / 2**20, "peak_rss_mib": common.peak_rss() / 2**20}))


def measure_memory(side: str, args: argparse.Namespace, argv: list[str], dim: int) -> dict | None:
    spec = json.dumps({"side": side, "dim": dim, "argv": argv})
    command = [sys.executable, str(Path(__file__).resolve()), "--_memory_worker", spec]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        print(f"memory run for {side} failed:\n{result.stderr[-2000:]}", file=sys.stderr)
        return None
    memory = json.loads(result.stdout.strip().splitlines()[-1])
    memory["training_growth_mib"] = memory["peak_rss_mib"] - memory["rss_before_mib"]
    return {key: round(value, 1) for key, value in memory.items()}


# ------------------------------------------------------------------------------------------------------- run
def run_setup(setup: str, args: argparse.Namespace, argv: list[str], peer) -> list[dict]:
    """Time (and measure) ours against the peer for one set-up; returns one row per side."""
    sides = {}
    our_dim = args.dim
    if peer is not None:
        sides["peer"] = trainer("peer", args, args.dim, peer)
        if setup == "params":
            our_dim = width_matching(args, common.parameter_count(sides["peer"][0]))
    elif setup == "params":
        return []
    ours = {"ours": trainer("ours", args, our_dim)}
    if args.compile:
        ours[COMPILED] = trainer(COMPILED, args, our_dim)
    sides = {**ours, **sides}
    times = common.alternate({side: step for side, (_, step) in sides.items()}, args.rounds, args.steps, args.warmup)
    patches = (args.latent_size // args.patch_size) ** 2
    tokens = args.batch_size * (args.text_length + patches)
    rows = []
    for side, (model, _) in sides.items():
        step_time = common.median(times[side])
        positions = (
            peer.peer_sequence_length(args.text_length, args.latent_size, args.patch_size)
            if side == "peer"
            else common.our_sequence_length(args.text_length, patches)
        )
        row = {
            "setup": setup,
            "model": side,
            "width": args.dim if side == "peer" else our_dim,
            "depth": args.depth,
            "heads": args.heads,
            "parameters": common.parameter_count(model),
            "content_tokens_per_sequence": args.text_length + patches,
            "positions_per_sequence": positions,
            "batch_size": args.batch_size,
            "ms_per_step": step_time * 1e3,
            "tokens_per_s": tokens / step_time,
            "sequences_per_s": args.batch_size / step_time,
            "round_medians_ms": [value * 1e3 for value in common.round_medians(times[side], args.rounds)],
            "paired_speedup_vs_peer": common.paired_ratio(times["peer"], times[side])
            if side != "peer" and "peer" in times
            else None,
            "step_times_ms": [value * 1e3 for value in times[side]],
        }
        if args.memory and side != COMPILED:  # a compiled step's memory would count the compiler's too
            row["memory"] = measure_memory(side, args, argv, row["width"])
        rows.append(row)
    del sides
    return rows


def table(rows: list[dict]) -> str:
    headers = ["set-up", "model", "width x depth", "params (M)", "tokens/seq (positions)", "ms/step", "tokens/s"]
    headers += ["seq/s", "peak RSS MiB (growth)", "speed-up vs peer: medians (paired)"]
    body = []
    for row in rows:
        peer_row = next((other for other in rows if other["setup"] == row["setup"] and other["model"] == "peer"), None)
        ratio = ""
        if peer_row and row["model"] != "peer":
            ratio = f"{row['tokens_per_s'] / peer_row['tokens_per_s']:.2f}x ({row['paired_speedup_vs_peer']:.2f}x)"
        memory = row.get("memory")
        memory_cell = f"{memory['peak_rss_mib']:.0f} ({memory['training_growth_mib']:.0f})" if memory else "n/a"
        body.append(
            [
                row["setup"], row["model"], f"{row['width']} x {row['depth']}", row["parameters"] / 1e6,
                f"{row['content_tokens_per_sequence']} ({row['positions_per_sequence']})", row["ms_per_step"],
                row["tokens_per_s"], row["sequences_per_s"], memory_cell, ratio,
            ]
        )  # fmt: skip
    return common.markdown_table(headers, body)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args._memory_worker:
        memory_worker(args._memory_worker)
        return {}
    torch.set_num_threads(args.threads)
    peer = None if args.no_peer else common.peer_module()
    if peer is None and not args.no_peer:
        print("transfusion_pytorch is not installed: timing our model only (pip install transfusion-hf[bench])")
    start = time.perf_counter()
    rows = [row for setup in args.setups for row in run_setup(setup, args, argv, peer)]
    result = {
        "benchmark": "training step: forward (text CE + diffusion MSE), backward, AdamW",
        "autocast_dtype": args.dtype,
        "tokens_counted": "text + image patches per sequence (specials and the peer's meta tokens not counted)",
        "memory_measured": "peak RSS (VmHWM, reset before the first step) of a fresh subprocess over memory_steps "
        "steps, and its growth over the RSS just before the first step",
        "args": {key: value for key, value in vars(args).items() if not key.startswith("_")},
        "environment": common.environment(args.threads),
        "total_seconds": round(time.perf_counter() - start, 1),
        "rows": rows,
    }
    settings = f"{args.rounds} rounds x {args.steps} timed steps per model, medians; {args.threads} threads"
    return common.report(result, table(rows), settings, args.output)


if __name__ == "__main__":
    main()
