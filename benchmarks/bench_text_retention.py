"""Does a pretrained LLM keep its text skill while it learns images? Dense fine-tuning vs LoRA vs modality experts
with the text weights frozen (`--modality_experts --freeze_text`, LMFusion), on the captioned shapes.

    python benchmarks/bench_text_retention.py          # about 40 minutes on 1 CPU thread
    python benchmarks/bench_text_retention.py --quick  # smoke run (under a minute)

1. Pretrains a small Llama on text found offline (the shapes training captions, and Python's own documentation: the
   reference topics of `pydoc_data.topics` and the docstrings of the standard library's sources, both shipped with
   every CPython) with a byte-level BPE tokenizer that has no image tokens, like a real LLM checkpoint, and saves both
   with `save_pretrained`.
2. Trains it on the shapes world through `examples/train_transfusion.py --text_model_name_or_path`, once per
   variant: (a) dense full fine-tune, (b) LoRA, (c) modality experts with the text frozen. Same data, steps, learning
   rate and seed for each.
3. Measures held-out text perplexity (reference topics never seen in pretraining) before and after, over the LLM's
   vocabulary and over all tokens (the new `<boi>`, `<eoi>`, `<image>`, `<pad>` included), the largest change of a
   text-only logit over the LLM's vocabulary, text-to-image and caption accuracy on the 48 held-out combinations
   (`transfusion_hf.evaluation`), and seconds per training step (the training loop alone).

Prints a markdown table and writes the numbers to `benchmarks/results/text_retention.json`.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import random
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    get_cosine_schedule_with_warmup,
)

from bench_common import environment, markdown_table, write_json
from transfusion_hf.data.shapes import sample_specs
from transfusion_hf.evaluation.shapes_benchmark import evaluate_shapes
from transfusion_hf.pipeline_transfusion import TransfusionPipeline

REPO_DIR = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO_DIR / "examples" / "train_transfusion.py"
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "text_retention.json"
# Extra flags of examples/train_transfusion.py per variant (everything else is shared).
VARIANTS = {
    "dense": ("(a) dense full fine-tune", []),
    "lora": ("(b) LoRA", ["--lora_rank", "{lora_rank}"]),
    "experts_frozen_text": ("(c) modality experts, text frozen", ["--modality_experts", "--freeze_text"]),
    "experts": ("modality experts, text trained too", ["--modality_experts"]),
}
DEFAULT_VARIANTS = ["dense", "lora", "experts_frozen_text"]
# Every 10th documentation topic (sorted by name) is held out of pretraining for the perplexity.
HELD_OUT_EVERY = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work_dir", default="outputs/text_retention", help="the LLM and one run folder per variant")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=DEFAULT_VARIANTS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    llm = parser.add_argument_group("the text LLM")
    llm.add_argument("--vocab_size", type=int, default=1024)
    llm.add_argument("--hidden_size", type=int, default=192)
    llm.add_argument("--num_layers", type=int, default=4)
    llm.add_argument("--num_heads", type=int, default=6)
    llm.add_argument("--num_caption_lines", type=int, default=4000, help="training captions in the text corpus")
    llm.add_argument("--pretrain_steps", type=int, default=1000)
    llm.add_argument("--pretrain_batch_size", type=int, default=16)
    llm.add_argument("--sequence_length", type=int, default=128)
    llm.add_argument("--pretrain_learning_rate", type=float, default=2e-3)
    images = parser.add_argument_group("image training and evaluation")
    images.add_argument("--train_steps", type=int, default=900)
    images.add_argument("--train_batch_size", type=int, default=32)
    images.add_argument("--learning_rate", type=float, default=1e-3)
    images.add_argument("--lora_rank", type=int, default=16)
    images.add_argument("--shapes_num_samples", type=int, default=8000)
    images.add_argument("--images_per_caption", type=int, default=1)
    images.add_argument("--num_inference_steps", type=int, default=25)
    images.add_argument("--num_caption_images", type=int, default=96)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and a few steps: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.vocab_size, args.hidden_size, args.num_layers, args.num_heads = 320, 32, 2, 4
        args.num_caption_lines, args.pretrain_steps, args.pretrain_batch_size, args.sequence_length = 50, 2, 2, 32
        args.train_steps, args.train_batch_size, args.shapes_num_samples = 2, 4, 32
        args.num_inference_steps, args.num_caption_images, args.lora_rank = 2, 4, 4
    for name in ("pretrain_steps", "train_steps", "sequence_length", "images_per_caption", "num_caption_images"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}.")
    return args


# ------------------------------------------------------------------------------------------------------ text
def text_corpus(num_caption_lines: int, with_docstrings: bool = True) -> tuple[list[str], list[str]]:
    """`(train, held_out)` documents. Train: the reference topics not held out, the standard library's docstrings,
    and `num_caption_lines` captions of the shapes training split (the language of the image task). Held out: every
    10th reference topic."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    held_out = [topics[name] for name in names[::HELD_OUT_EVERY]]
    train = [topics[name] for index, name in enumerate(names) if index % HELD_OUT_EVERY]
    if with_docstrings:
        train += standard_library_docstrings()
    train += [spec.caption for spec, _ in sample_specs("train", num_caption_lines, seed=1)]
    return train, held_out


def standard_library_docstrings(min_length: int = 80) -> list[str]:
    """Docstrings (modules, classes, functions) of the standard library's sources, tests excluded, in path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = {"test", "tests", "idle_test", "site-packages"}
    documents = []
    for path in sorted(root.rglob("*.py")):
        if skipped & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):  # a few sources are deliberately broken or not UTF-8
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node)
                if docstring and len(docstring) >= min_length:
                    documents.append(docstring)
    return documents


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with `<s>`, `</s>` and `<unk>` only: the training script adds `<boi>`, `<eoi>`,
    `<image>` and `<pad>` as it does for any pretrained LLM (`train_bpe_tokenizer` would already hold them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def token_blocks(tokenizer, documents: list[str], length: int) -> torch.LongTensor:
    """The documents as one stream (`<s> document </s>` each), cut into `(num_blocks, length)` blocks."""
    stream = []
    for document in documents:
        stream += [tokenizer.bos_token_id, *tokenizer(document)["input_ids"], tokenizer.eos_token_id]
    num_blocks = len(stream) // length
    return torch.tensor(stream[: num_blocks * length]).view(num_blocks, length)


@torch.no_grad()
def text_perplexity(
    model: torch.nn.Module, blocks: torch.LongTensor, vocab_size: int | None = None, batch_size: int = 16
) -> float:
    """exp of the mean next-token cross-entropy over `blocks`: over the first `vocab_size` logits (the LLM's own
    vocabulary), or over all of them when None."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size]
        logits = model(input_ids=ids).logits[:, :-1, :vocab_size].float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        total, count = total + loss.item(), count + ids[:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def max_logit_change(model: torch.nn.Module, llm: torch.nn.Module, blocks: torch.LongTensor) -> float:
    """Largest change of a text-only logit over the LLM's own vocabulary (0 when the text path is untouched)."""
    ids = blocks[:8]
    reference = llm.eval()(input_ids=ids).logits
    return (model.eval()(input_ids=ids).logits[..., : reference.shape[-1]] - reference).abs().max().item()


def pretrain_llm(args: argparse.Namespace, llm_dir: Path) -> dict[str, Any]:
    """Pretrain the text LLM on the training documents and save it (model + tokenizer) with `save_pretrained`."""
    train_documents, _ = text_corpus(args.num_caption_lines, with_docstrings=not args.quick)
    tokenizer = train_tokenizer(train_documents, args.vocab_size)
    train_blocks = token_blocks(tokenizer, train_documents, args.sequence_length)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=int(args.hidden_size * 8 / 3) // 8 * 8,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.pretrain_learning_rate, betas=(0.9, 0.95), weight_decay=0.1
    )
    schedule = get_cosine_schedule_with_warmup(optimizer, min(100, args.pretrain_steps // 10), args.pretrain_steps)
    order = random.Random(0)
    started = time.perf_counter()
    for step in range(1, args.pretrain_steps + 1):
        ids = train_blocks[order.sample(range(len(train_blocks)), args.pretrain_batch_size)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.pretrain_steps:
            print(f"pretraining step {step}/{args.pretrain_steps}: loss {loss.item():.3f}", flush=True)
    seconds = time.perf_counter() - started
    model.save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    return {
        "parameters": model.num_parameters(),
        "train_tokens": train_blocks.numel(),
        "train_epochs": args.pretrain_steps * args.pretrain_batch_size / len(train_blocks),
        "pretrain_minutes": seconds / 60,
        "pretrain_seconds_per_step": seconds / args.pretrain_steps,
    }


# -------------------------------------------------------------------------------------------------- images
def train_arguments(args: argparse.Namespace, variant: str, llm_dir: Path, run_dir: Path) -> list[str]:
    flags = [flag.format(lora_rank=args.lora_rank) for flag in VARIANTS[variant][1]]
    return [
        "--dataset", "shapes",
        "--shapes_num_samples", str(args.shapes_num_samples),
        "--text_model_name_or_path", str(llm_dir),
        # The image fields measured in the README (8x8 linear patches, flow: the demo's then); the LLM is the backbone.
        "--model_config", "small", "--patch_encoder", "linear",
        "--train_batch_size", str(args.train_batch_size),
        "--max_train_steps", str(args.train_steps),
        "--learning_rate", str(args.learning_rate),
        "--lr_warmup_steps", str(min(50, args.train_steps // 10)),
        "--timestep_sampling", "logit_normal",
        "--checkpointing_steps", "0",
        "--logging_steps", "25",
        "--num_inference_steps", str(args.num_inference_steps),
        "--report_to", "none",
        "--seed", "0",
        "--output_dir", str(run_dir),
        *flags,
    ]  # fmt: skip


def run_variant(args, variant: str, llm_dir: Path, held_out: torch.LongTensor, llm) -> dict[str, Any]:
    """Train one variant (the training script, in its own process), then score its saved pipeline on text and on the
    shapes."""
    run_dir = args.work_dir / "runs" / variant
    print(f"\n=== {VARIANTS[variant][0]} ===", flush=True)
    command = [sys.executable, str(TRAIN_SCRIPT), *train_arguments(args, variant, llm_dir, run_dir)]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    summary = json.loads((run_dir / "training_summary.json").read_text())
    timing = {"seconds": summary["train_loop_seconds"], "steps": summary["global_step"]}
    pipeline = TransfusionPipeline.from_pretrained(run_dir)
    pipeline.set_progress_bar_config(disable=True)
    model = pipeline.transformer
    started = time.perf_counter()
    evaluation = evaluate_shapes(
        pipeline,
        images_per_caption=args.images_per_caption,
        num_inference_steps=args.num_inference_steps,
        num_caption_images=args.num_caption_images,
    )
    return {
        "variant": variant,
        "name": VARIANTS[variant][0],
        "steps": timing["steps"],
        "seconds_per_step": timing["seconds"] / timing["steps"],
        "trainable_parameters": trainable_parameter_count(args, variant, llm_dir),
        "parameters": model.num_parameters(),
        "held_out_perplexity": text_perplexity(model, held_out, llm.config.vocab_size),
        "held_out_perplexity_all_tokens": text_perplexity(model, held_out),
        "max_text_logit_change": max_logit_change(model, llm, held_out),
        **evaluation.metrics,
        "eval_minutes": (time.perf_counter() - started) / 60,
    }


def trainable_parameter_count(args, variant: str, llm_dir: Path) -> int:
    """Parameters the variant trains (LoRA's before merging), from the training package's own model set-up."""
    from transfusion_hf.modality_experts import freeze_text_weights
    from transfusion_hf.processing_transfusion import add_special_tokens
    from transfusion_hf.training import apply_lora, build_model, parse_args

    script_args = parse_args(train_arguments(args, variant, llm_dir, args.work_dir / "unused"))
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    add_special_tokens(tokenizer, ("<boi>", "<eoi>", "<image>"))
    model, _ = build_model(script_args, tokenizer, latent_channels=3, latent_size=32)
    new_ids = [tokenizer.convert_tokens_to_ids(token) for token in ("<boi>", "<eoi>", "<image>")]
    if script_args.lora_rank:
        model = apply_lora(script_args, model, new_ids)
    if script_args.freeze_text:
        # Only the new rows of the embeddings and the LM head train: count those rows, not the whole matrices.
        row_trained = freeze_text_weights(model, new_ids)
        rows = sum(weight.shape[0] - len(new_ids) for weight in row_trained) * model.config.hidden_size
        return sum(p.numel() for p in model.parameters() if p.requires_grad) - rows
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------------- report
def table(before: float, rows: list[dict[str, Any]]) -> str:
    headers = (
        "variant",
        "trainable params",
        "held-out text ppl (before -> after)",
        "ppl, all tokens",
        "max text logit change",
        "t2i accuracy",
        "caption accuracy",
        "s / step",
    )
    lines = [
        (
            row["name"],
            f"{row['trainable_parameters'] / 1e6:.2f}M",
            f"{before:.2f} -> {row['held_out_perplexity']:.2f}",
            round(row["held_out_perplexity_all_tokens"], 2),
            row["max_text_logit_change"],
            round(row["t2i_accuracy"], 3),
            round(row["caption_accuracy"], 3),
            round(row["seconds_per_step"], 3),
        )
        for row in rows
    ]
    return markdown_table(headers, lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work_dir = Path(args.work_dir).resolve()
    llm_dir = args.work_dir / "llm"
    llm_info = pretrain_llm(args, llm_dir)
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    held_out = token_blocks(tokenizer, text_corpus(0, with_docstrings=False)[1], args.sequence_length)
    llm = AutoModelForCausalLM.from_pretrained(llm_dir)
    before = text_perplexity(llm, held_out)
    print(f"LLM: {llm_info['parameters'] / 1e6:.2f}M parameters, held-out text perplexity {before:.2f}", flush=True)
    rows = [run_variant(args, variant, llm_dir, held_out, llm) for variant in args.variants]
    print("\n" + table(before, rows))
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        "arguments": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "llm": {**llm_info, "held_out_perplexity": before, "held_out_tokens": held_out.numel()},
        "rows": rows,
        "environment": environment(args.threads),
    }
    write_json(result, args.output)
    return result


if __name__ == "__main__":
    main()
