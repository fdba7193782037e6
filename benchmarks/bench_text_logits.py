"""The LM head on text positions only (``skip_logits``, the training default) against every position, on CPU.

A training step with labels needs next-token logits only where a text loss is taken; image placeholders never take
one. ``TransfusionForMixedModal`` skips the logits by default when training with labels and runs the LM head on the
positions that are not image placeholders (``skip_logits=False`` restores logits at every position, the transformers
contract). On text-to-image data most positions are patches, and with an LLM's vocabulary the LM head is a large part
of a step and its fp32 logits the largest activation. This measures both on the paper's 0.16B body (recipe
``paper_0.16b``: Llama blocks, 768 x 16, linear patch encoder) with real vocabulary sizes (Llama 2: 32,000; Qwen2:
151,936), on caption-like rows ``<s> text <boi> <image>*256 <eoi> </s>`` (4 x 32 x 32 latents, patch 2).

Timing: both variants of one model stepped alternately (forward, backward, AdamW), medians and the paired ratio
(bench_common.alternate). Memory: the activations one training forward saves for its backward
(``torch.autograd.graph.saved_tensors_hooks``, each storage once, parameters left out).

    python benchmarks/bench_text_logits.py            # ~8 min, 1 thread, ~12 GB of memory
    python benchmarks/bench_text_logits.py --quick    # tiny smoke run (seconds)

Writes ``benchmarks/results/text_logits.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import bench_common as common
import bench_gpu

VARIANTS = {"every position": False, "text positions": True}  # name -> skip_logits
DEFAULTS = dict(vocab_sizes=[32000, 151936], batch_size=2, text_length=32, latent_size=32, rounds=3, steps=2)
QUICK = dict(vocab_sizes=[512], batch_size=2, text_length=8, latent_size=8, rounds=1, steps=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="paper_0.16b", help="a recipe name of transfusion_hf.recipes")
    parser.add_argument("--vocab_sizes", type=int, nargs="+", help="backbone vocabularies (default 32000 151936)")
    parser.add_argument("--batch_size", type=int, help="rows per step (default 2)")
    parser.add_argument("--text_length", type=int, help="text tokens before the image (default 32)")
    parser.add_argument("--latent_size", type=int, help="latent side; patch 2 -> (side/2)^2 patches (default 32)")
    parser.add_argument("--rounds", type=int, help="alternation rounds (default 3)")
    parser.add_argument("--steps", type=int, help="timed steps per variant per round (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a 2-layer 64-wide model, one small vocabulary")
    parser.add_argument("--output", default=str(common.RESULTS_DIR / "text_logits.json"))
    args = parser.parse_args(argv)
    common.fill_defaults(args, QUICK if args.quick else DEFAULTS)
    # bench_gpu.load_config's fields: the recipe's body (tiny with --quick), the vocabulary set per run.
    args.tiny, args.seq_len, args.vocab_size = args.quick, 0, args.vocab_sizes[0]
    return args


def trainer(args: argparse.Namespace, vocab_size: int, skip_logits: bool):
    """(model, batch, step function): the model, its AdamW optimizer and one caption-like batch."""
    config = bench_gpu.load_config(argparse.Namespace(**{**vars(args), "vocab_size": vocab_size}), "sdpa")
    model = common.build_our_model(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = common.make_our_batch(config, args.batch_size, args.text_length, torch.Generator().manual_seed(0))

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch, skip_logits=skip_logits).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    return model, batch, step


def saved_activations_mib(model: torch.nn.Module, batch: dict, skip_logits: bool) -> float:
    """MiB of the tensors one training forward saves for its backward (each storage once, parameters left out):
    the activation memory, exactly. The peak resident set would also count the gradients and AdamW states (most of
    it at this size) and the allocator's slack, which drowned the difference in a trial."""
    parameters = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch, skip_logits=skip_logits).loss
    del loss
    return sum(storages.values()) / 2**20


def run_vocabulary(args: argparse.Namespace, vocab_size: int) -> dict:
    """Time both variants alternately (same weights: one seed) and measure their activations; one row."""
    steps, activations = {}, {}
    for name, skip_logits in VARIANTS.items():
        model, batch, steps[name] = trainer(args, vocab_size, skip_logits)
        activations[name] = saved_activations_mib(model, batch, skip_logits)
    config = model.config
    times = common.alternate(steps, args.rounds, args.steps, args.warmup)
    every, text = times["every position"], times["text positions"]
    positions = common.our_sequence_length(args.text_length, config.num_patches)
    row = {
        "vocab_size": vocab_size,
        "positions_per_row": positions,
        # Every position but the image placeholders: <s>, the text, <boi>, <eoi>, </s>.
        "lm_head_positions_per_row": positions - config.num_patches,
        "ms_every_position": common.median(every) * 1e3,
        "ms_text_positions": common.median(text) * 1e3,
        "speedup_of_medians": common.median(every) / common.median(text),
        "speedup_paired": common.paired_ratio(every, text),
        "step_times_ms": {name: [value * 1e3 for value in values] for name, values in times.items()},
    }
    row["activations_mib_every_position"] = activations["every position"]
    row["activations_mib_text_positions"] = activations["text positions"]
    return row


def table(rows: list[dict]) -> str:
    headers = ["vocabulary", "LM head rows / positions", "ms/step every", "ms/step text", "speed-up (paired)"]
    headers += ["activations MiB every", "activations MiB text"]
    cells = [
        [
            row["vocab_size"],
            f"{row['lm_head_positions_per_row']} / {row['positions_per_row']}",
            row["ms_every_position"],
            row["ms_text_positions"],
            f"{row['speedup_of_medians']:.2f}x ({row['speedup_paired']:.2f}x)",
            row["activations_mib_every_position"],
            row["activations_mib_text_positions"],
        ]
        for row in rows
    ]
    return common.markdown_table(headers, cells)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = [run_vocabulary(args, vocab_size) for vocab_size in args.vocab_sizes]
    result = {
        "benchmark": "training step with the LM head on text positions only (skip_logits) vs every position",
        "memory_measured": "tensors one training forward saves for backward (unique storages, no parameters)",
        "args": {key: value for key, value in vars(args).items() if not key.startswith("_")},
        "environment": common.environment(args.threads),
        "total_seconds": round(time.perf_counter() - start, 1),
        "rows": rows,
    }
    settings = f"{args.rounds} rounds x {args.steps} timed steps per variant, medians; {args.threads} threads"
    return common.report(result, table(rows), settings, args.output)


if __name__ == "__main__":
    main()
