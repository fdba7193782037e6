"""Sequence packing: training throughput in real (non-pad) tokens/s, packed rows against one padded row per pair.

The same batches of (caption, image) pairs, with captions of mixed length (log-uniform word counts, so most are short
and a few long, as in caption data), are collated twice by `TransfusionDataCollator`: padded to the longest sequence
of the batch (the default), and packed into rows of ``--max_sequence_length`` tokens (``max_sequence_length=``). Both
hold the same sequences and noised images (the draws come before packing), so they give the same loss (checked on the
first batch, printed and saved); only the positions computed differ. One train step = forward, backward, AdamW, on a
model of the recipe (``transfusion_hf.recipes``, pixel space 32x32, sdpa).

Timing: two models of the same initialisation, one per layout, stepped alternately in one process (A B A B ..., the
order flipped every round: ``bench_common.alternate``), both on the same sequence of batches, after ``--warmup``
untimed steps each. Reported: the median of real tokens / step time, the positions computed per step, and the speed-up
as the median over neighbouring steps (same batch) of padded time / packed time.

    OMP_NUM_THREADS=1 python benchmarks/bench_packing.py          # small preset, 3 rounds x 8 steps: ~4 min on
                                                                  # 2 busy cores
    python benchmarks/bench_packing.py --quick                    # tiny smoke run (seconds)

Writes ``benchmarks/results/packing.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import bench_common as common
from transfusion_hf import TransfusionConfig, TransfusionForMixedModal
from transfusion_hf.data.collator import TransfusionDataCollator
from transfusion_hf.noising import TransfusionNoiser
from transfusion_hf.processing_transfusion import TransfusionProcessor, special_token_ids
from transfusion_hf.recipes import load_recipe

DEFAULTS = dict(preset="small", batch_size=16, max_words=192, max_sequence_length=512, rounds=3, steps=8, batches=8)
QUICK = dict(preset="tiny", batch_size=4, max_words=24, max_sequence_length=512, rounds=2, steps=1, batches=2)
TEXT_VOCAB = 256
IMAGE_SIZE = 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", help="recipe of transfusion_hf.recipes (default small)")
    parser.add_argument("--batch_size", type=int, help="pairs per step (default 16)")
    parser.add_argument("--min_words", type=int, default=2, help="fewest caption words")
    parser.add_argument("--max_words", type=int, help="most caption words (default 192)")
    parser.add_argument("--max_sequence_length", type=int, help="tokens per packed row (default 512)")
    parser.add_argument("--batches", type=int, help="distinct batches, cycled (default 8)")
    parser.add_argument("--rounds", type=int, help="alternation rounds (default 3)")
    parser.add_argument("--steps", type=int, help="timed steps per layout per round (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per layout first")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny preset and sizes: a smoke test")
    parser.add_argument("--output", default=str(common.RESULTS_DIR / "packing.json"))
    args = parser.parse_args(argv)
    common.fill_defaults(args, QUICK if args.quick else DEFAULTS)
    return args


def build_model(preset_name: str, tokenizer) -> TransfusionForMixedModal:
    """A model of the preset in pixel space (3-channel 32x32 "latents"), with the tokenizer's special ids."""
    preset = {
        key: value
        for key, value in load_recipe(preset_name).model.items()
        if key not in ("latent_channels", "latent_size")
    }
    text_config = {
        **preset.pop("text_config"),
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    config = TransfusionConfig(
        text_config=text_config, latent_channels=3, latent_size=IMAGE_SIZE, **special_token_ids(tokenizer), **preset
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return TransfusionForMixedModal(config)


def make_examples(args: argparse.Namespace, count: int) -> list[dict]:
    """Pairs whose captions have log-uniform word counts in [min_words, max_words] (words of the word tokenizer: one
    token each)."""
    generator = torch.Generator().manual_seed(args.seed)
    low, high = math.log(args.min_words), math.log(args.max_words + 1)
    examples = []
    for _ in range(count):
        words = int(math.exp(low + (high - low) * torch.rand((), generator=generator).item()))
        ids = torch.randint(0, TEXT_VOCAB, (words,), generator=generator).tolist()
        latents = torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        examples.append({"text": common.prompt_text(ids), "latents": latents})
    return examples


def collate_both(args: argparse.Namespace, processor) -> dict[str, list[dict]]:
    """The same batches, padded and packed (one collator each, same seed: the same draws)."""
    noiser = TransfusionNoiser(FlowMatchEulerDiscreteScheduler(), "flow_prediction")
    collators = {
        "padded": TransfusionDataCollator(processor, noiser, seed=args.seed),
        "packed": TransfusionDataCollator(
            processor, noiser, seed=args.seed, max_sequence_length=args.max_sequence_length
        ),
    }
    examples = make_examples(args, args.batches * args.batch_size)
    chunks = [examples[start : start + args.batch_size] for start in range(0, len(examples), args.batch_size)]
    return {name: [collator(chunk) for chunk in chunks] for name, collator in collators.items()}


def real_tokens(batch: dict, pad_token_id: int) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int((batch["input_ids"] != pad_token_id).sum())


def train_step(model: TransfusionForMixedModal, optimizer: torch.optim.Optimizer, batches) -> None:
    model.train()
    optimizer.zero_grad(set_to_none=True)
    model(**next(batches), use_cache=False).loss.backward()
    optimizer.step()


def run(args: argparse.Namespace) -> dict:
    tokenizer = common.build_word_tokenizer(TEXT_VOCAB)
    reference = build_model(args.preset, tokenizer)
    processor = TransfusionProcessor(tokenizer, image_size=IMAGE_SIZE, num_image_tokens=reference.config.num_patches)
    batches = collate_both(args, processor)
    with torch.no_grad():
        losses = {name: reference(**batches[name][0], use_cache=False).loss.item() for name in batches}
    steps = {}
    for name in batches:
        model = build_model(args.preset, tokenizer)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        cycle = itertools.cycle(batches[name])
        steps[name] = lambda model=model, optimizer=optimizer, cycle=cycle: train_step(model, optimizer, cycle)
    times = common.alternate(steps, args.rounds, args.steps, args.warmup)
    # Step i of each layout ran batch i (mod the number of batches), warm-up steps first.
    order = [(args.warmup + index) % args.batches for index in range(len(times["padded"]))]
    tokens = [real_tokens(batches["padded"][index], tokenizer.pad_token_id) for index in order]
    rows = []
    for name in batches:
        shapes = [tuple(batch["input_ids"].shape) for batch in batches[name]]
        rows.append(
            {
                "layout": name,
                "rows_per_step": common.median([shape[0] for shape in shapes]),
                "positions_per_step": common.median([shape[0] * shape[1] for shape in shapes]),
                "real_tokens_per_step": common.median(tokens),
                "ms_per_step": common.median(times[name]) * 1e3,
                "real_tokens_per_s": common.median([count / seconds for count, seconds in zip(tokens, times[name])]),
                "first_batch_loss": losses[name],
                "step_times_ms": [value * 1e3 for value in times[name]],
            }
        )
    return {
        "rows": rows,
        "paired_speedup_packed_vs_padded": common.paired_ratio(times["padded"], times["packed"]),
        "first_batch_loss_difference": abs(losses["packed"] - losses["padded"]),
        "parameters": common.parameter_count(reference),
        "num_patches": reference.config.num_patches,
    }


def table(result: dict) -> str:
    headers = ["layout", "rows x length / step", "positions / step", "real tokens / step", "ms / step"]
    headers += ["real tokens/s", "speed-up (paired)"]
    body = []
    for row in result["rows"]:
        speedup = f"{result['paired_speedup_packed_vs_padded']:.2f}x" if row["layout"] == "packed" else "1.00x"
        positions_per_row = row["positions_per_step"] / max(row["rows_per_step"], 1)
        body.append(
            [row["layout"], f"{row['rows_per_step']:g} x {positions_per_row:.0f}", row["positions_per_step"],
             row["real_tokens_per_step"], row["ms_per_step"], row["real_tokens_per_s"], speedup]
        )  # fmt: skip
    return common.markdown_table(headers, body)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = {
        "benchmark": "training step (forward, backward, AdamW): packed rows vs one padded row per pair",
        "tokens_counted": "real tokens: every non-pad position (text, specials and image patches)",
        "args": vars(args),
        **run(args),
        "environment": common.environment(args.threads),
    }
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    print(table(result))
    print(f"\n{args.preset} preset ({result['parameters'] / 1e6:.1f}M parameters, {result['num_patches']} patches per "
          f"image), {args.batch_size} pairs per step, captions of {args.min_words}-{args.max_words} words "
          f"(log-uniform); {args.rounds} rounds x {args.steps} timed steps per layout, medians; {args.threads} "
          f"threads; first-batch loss difference {result['first_batch_loss_difference']:.1e}; "
          f"{result['total_seconds']} s")  # fmt: skip
    print(f"Wrote {common.write_json(result, Path(args.output))}")
    return result


if __name__ == "__main__":
    main()
