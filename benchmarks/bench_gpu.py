"""GPU training throughput and MFU of the paper's 0.16B Transfusion model: SDPA vs flex attention (optionally compiled).

Model: the recipe ``paper_0.16b`` of ``transfusion_hf.recipes`` (Llama blocks, 16 layers, width 768, 12 heads, linear patch
encoder, patch 2) with 4-channel ``--latent_size`` latents. Every sequence is ``--seq_len`` positions:
``<s>`` then ``--num_images`` times (text, ``<boi> <image>*N <eoi>``), more text, ``</s>``; the text is spread evenly
between the images. A train step is forward (text CE + diffusion MSE) under bf16 autocast (fp32 master weights),
backward and a fused AdamW step.

Reported per variant (attention implementation x ``torch.compile``): median step time over ``--steps`` steps after
``--warmup`` (compilation happens there), tokens/s (all positions), peak allocated memory, and the model FLOPs
utilisation::

    MFU = (6 * N_body + 6 * N_head * f + 12 * layers * width * seq_len) * tokens/s / peak bf16 dense FLOPS

with ``N_body`` the parameters without the input embedding table (its lookup costs no FLOPs) and the LM head,
``N_head`` the LM head's, counted on the fraction ``f`` of positions that are not image placeholders (the step runs
it there only: ``skip_logits``, the training default), the attention term as in PaLM (appendix B; the full ``seq_len x seq_len`` score matrix, forward + backward)
and the peak from the device name (H100 SXM / H200: 989e12; override with ``--peak_tflops``). Before timing, flex
attention's output is checked against SDPA on the same batch (the Transfusion mask in both kernels; on CPU, where
flex attention has no backward, that forward check is all it gets).

    bash benchmarks/run_gpu.sh                                   # on the GPU machine: installs what is missing, runs
    python benchmarks/bench_gpu.py                               # sdpa + flex_attention, bf16, 4096 tokens
    python benchmarks/bench_gpu.py --compile                     # + the torch.compile'd variants
    python benchmarks/bench_gpu.py --compile flex_attention      # sdpa, flex, compiled flex (issue 30's table)
    python benchmarks/bench_gpu.py --dry_run                     # CPU smoke test (tiny model, float32, 1 step)

Writes ``benchmarks/results/gpu.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import bench_common as common

REPO = Path(__file__).resolve().parent.parent
# Peak dense bf16 tensor FLOPS (no sparsity) by a substring of torch.cuda.get_device_name(), most specific first.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
)
TINY = dict(seq_len=256, num_images=2, latent_size=8, batch_size=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config", default="paper_0.16b", help="a recipe name of transfusion_hf.recipes or a json path"
    )
    parser.add_argument("--seq_len", type=int, default=4096)
    parser.add_argument("--num_images", type=int, default=4)
    parser.add_argument("--latent_size", type=int, default=32, help="latent side; patch 2 -> 256 patches at 32")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--vocab_size", type=int, default=32000, help="backbone vocabulary (Llama 2 tokenizer size)")
    parser.add_argument(
        "--attn", nargs="+", choices=["sdpa", "flex_attention"], help="default: both (sdpa only with --dry_run)"
    )
    parser.add_argument(
        "--compile",
        nargs="*",
        choices=["sdpa", "flex_attention"],
        help="also time the torch.compile'd variants: of every --attn (no value) or of the ones named (e.g. "
        "`--compile flex_attention`: sdpa, flex and compiled flex, one compilation)",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first (compiles)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="autocast dtype")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--peak_tflops", type=float, help="peak dense TFLOPS of the device (default: by its name)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer 64-wide model and 256-token sequences")
    parser.add_argument("--dry_run", action="store_true", help="= --device cpu --tiny --dtype float32, 1 step")
    parser.add_argument(
        "--output", help="json path (default results/gpu.json, results/gpu_dry_run.json for --dry_run)"
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.tiny, args.dtype, args.steps, args.warmup = "cpu", True, "float32", 1, 1
    if args.output is None:
        args.output = str(common.RESULTS_DIR / ("gpu_dry_run.json" if args.dry_run else "gpu.json"))
    if args.attn is None:
        args.attn = ["sdpa"] if args.dry_run else ["sdpa", "flex_attention"]
    if args.tiny:
        for name, value in TINY.items():
            setattr(args, name, value)
    return args


# ---------------------------------------------------------------------------------------------------- model
def load_config(args: argparse.Namespace, attn_implementation: str) -> common.TransfusionConfig:
    from transfusion_hf.recipes import load_recipe

    raw = {
        key: value
        for key, value in load_recipe(args.config).model.items()
        if key not in ("latent_channels", "latent_size")
    }
    text = dict(raw.pop("text_config"))
    if args.tiny:
        text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        text["num_key_value_heads"] = 4
    text.update(vocab_size=args.vocab_size, max_position_embeddings=max(text["max_position_embeddings"], args.seq_len))
    config = common.TransfusionConfig(
        text_config=text, latent_channels=4, latent_size=args.latent_size, **{**raw, "patch_encoder": "linear"}
    )
    config._attn_implementation = attn_implementation
    return config


def make_batch(config, args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    """``batch_size`` rows of exactly ``seq_len`` positions: text and ``num_images`` image blocks, evenly spread."""
    block = config.num_patches + 2
    text_total = args.seq_len - 2 - args.num_images * block
    if text_total < 0:
        raise ValueError(f"{args.num_images} images of {config.num_patches} patches do not fit {args.seq_len} tokens")
    generator = torch.Generator().manual_seed(0)
    chunks = [text_total // (args.num_images + 1)] * (args.num_images + 1)
    chunks[-1] += text_total - sum(chunks)
    text_vocab = config.vocab_size - 3  # the last three ids are <boi>, <eoi>, <image> (config defaults)
    image_block = [config.boi_token_id] + [config.image_token_id] * config.num_patches + [config.eoi_token_id]
    rows = []
    for _ in range(args.batch_size):
        row = [1]  # Llama's <s>
        for index, length in enumerate(chunks):
            row += torch.randint(3, text_vocab, (length,), generator=generator).tolist()
            row += image_block if index < args.num_images else [2]  # ... and </s> at the end
        rows.append(row)
    input_ids = torch.tensor(rows, dtype=torch.long)
    images = args.batch_size * args.num_images
    shape = (images, config.latent_channels, config.latent_size, config.latent_size)
    batch = {
        "input_ids": input_ids,
        "labels": input_ids,
        "latents": torch.randn(shape, generator=generator),
        "timesteps": torch.rand(images, generator=generator) * config.num_train_timesteps,
        "diffusion_targets": torch.randn(shape, generator=generator),
    }
    return {key: value.to(device) for key, value in batch.items()}


def model_flops_per_token(model, config, seq_len: int, head_fraction: float = 1.0) -> tuple[int, float]:
    """(N, training FLOPs per token): ``6 N`` with the LM head counted on ``head_fraction`` of the positions (the
    training step runs it on the positions that are not image placeholders: ``skip_logits``), plus PaLM's attention
    term ``12 * layers * width * seq_len``."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    params = sum(parameter.numel() for parameter in model.parameters()) - embedding.numel()
    body = params - (0 if head is embedding else head.numel())  # a tied head went out with the embedding table
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    attention = 12 * text.num_hidden_layers * text.num_attention_heads * head_dim * seq_len
    return body + head.numel(), 6 * body + 6 * head.numel() * head_fraction + attention


def peak_flops(args: argparse.Namespace, device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", args.peak_tflops * 1e12 if args.peak_tflops else None
    name = torch.cuda.get_device_name(device)
    if args.peak_tflops:
        return name, args.peak_tflops * 1e12
    return name, next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


# --------------------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_variant(args: argparse.Namespace, attn: str, compiled: bool, device: torch.device):
    config = load_config(args, attn)
    model = common.build_our_model(config).to(device).train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    if compiled and attn == "flex_attention":
        # transformers builds the block mask with `create_block_mask(_compile=True)`, whose deprecation warning dynamo
        # cannot trace; ignored while tracing, the step is one graph (as `--torch_compile` in the training script).
        torch._dynamo.config.ignore_logging_functions.add(warnings.warn)
    # fullgraph: a graph break fails loudly instead of timing a split step (tests/test_compile.py keeps it at one).
    forward = torch.compile(model, fullgraph=True) if compiled else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def step(batch: dict) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            # No KV cache: training needs none, and under compile the backbone's DynamicCache fails with flex attention.
            loss = forward(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    return model, config, step


def check_flex(args: argparse.Namespace, device: torch.device) -> float | None:
    """Max abs difference of the last hidden states (all positions), flex vs SDPA, same weights and batch (eval, no
    grad). Not the diffusion predictions: the image head starts at zero, so they are zero for both."""
    if "flex_attention" not in args.attn:
        return None
    config = load_config(args, "sdpa")
    model = common.build_our_model(config).to(device).eval()
    batch = make_batch(config, argparse.Namespace(**{**vars(args), "batch_size": 1}), device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    with torch.no_grad(), autocast:
        reference = model(**batch, output_hidden_states=True).hidden_states.float()
        model.set_attn_implementation("flex_attention")
        flex = model(**batch, output_hidden_states=True).hidden_states.float()
    difference = (reference - flex).abs().max().item()
    del model
    return difference


def time_variant(args: argparse.Namespace, attn: str, compiled: bool, device: torch.device, peak: float | None):
    model, config, step = build_variant(args, attn, compiled, device)
    batch = make_batch(config, args, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.warmup):
        loss = step(batch)
    synchronize(device)
    warmup_seconds = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step(batch)
        synchronize(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    head_fraction = (batch["input_ids"] != config.image_token_id).float().mean().item()
    params, flops_per_token = model_flops_per_token(model, config, args.seq_len, head_fraction)
    tokens_per_s = args.batch_size * args.seq_len / seconds
    row = {
        "attention": attn,
        "compiled": compiled,
        "ms_per_step": seconds * 1e3,
        "tokens_per_s": tokens_per_s,
        "model_tflops_per_s": flops_per_token * tokens_per_s / 1e12,
        "mfu": flops_per_token * tokens_per_s / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "warmup_seconds": warmup_seconds,
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "parameters_in_flops": params,
        "lm_head_position_fraction": head_fraction,
        "last_loss": float(loss),
        "step_times_ms": [value * 1e3 for value in times],
    }
    del model, step, batch
    _free(device)
    return row


def run_variant(args: argparse.Namespace, attn: str, compiled: bool, device: torch.device, peak: float | None):
    """`time_variant`, halving the batch on out-of-memory; any other failure becomes an error row, so one command
    always reports every variant it could run."""
    batch_size = args.batch_size
    while True:
        variant_args = argparse.Namespace(**{**vars(args), "batch_size": batch_size})
        try:
            row = time_variant(variant_args, attn, compiled, device, peak)
            return {**row, "batch_size": batch_size}
        except torch.OutOfMemoryError:
            _free(device)
            if batch_size == 1:
                return {"attention": attn, "compiled": compiled, "batch_size": 0, "error": "out of memory at batch 1"}
            print(f"{attn} compiled={compiled}: out of memory at batch {batch_size}, retrying with {batch_size // 2}")
            batch_size //= 2
        except Exception as error:  # noqa: BLE001 - reported in the table and the json, then the next variant runs
            _free(device)
            print(f"{attn} compiled={compiled} failed: {type(error).__name__}: {error}", file=sys.stderr)
            return {"attention": attn, "compiled": compiled, "batch_size": batch_size, "error": repr(error)[:500]}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def table(rows: list[dict]) -> str:
    headers = ["attention", "compiled", "batch", "ms/step", "tokens/s", "model TFLOP/s", "MFU", "peak mem GiB"]
    body = []
    for row in rows:
        if "error" in row:
            body.append([row["attention"], "yes" if row["compiled"] else "no", row["batch_size"], row["error"][:80]])
            body[-1] += [""] * (len(headers) - len(body[-1]))
            continue
        body.append(
            [
                row["attention"],
                "yes" if row["compiled"] else "no",
                row["batch_size"],
                row["ms_per_step"],
                row["tokens_per_s"],
                row["model_tflops_per_s"],
                f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a",
                f"{row['peak_memory_gib']:.1f}" if row["peak_memory_gib"] is not None else "n/a",
            ]
        )
    return common.markdown_table(headers, body)


def timed_variants(args: argparse.Namespace, device: torch.device) -> list[tuple[str, bool]]:
    """(attention, compiled) pairs to time: every `--attn` eager, then the compiled ones `--compile` asks for (all of
    `--attn` when it names none). Flex attention is left out on CPU, where it has no backward."""
    compiled_attn = [] if args.compile is None else [attn for attn in args.attn if attn in (args.compile or args.attn)]
    variants = [(attn, False) for attn in args.attn] + [(attn, True) for attn in compiled_attn]
    if device.type == "cpu" and "flex_attention" in args.attn:
        print("flex attention has no backward on CPU: checked in a forward pass only, not timed")
        variants = [(attn, compiled) for attn, compiled in variants if attn != "flex_attention"]
    return variants


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: run with --dry_run (or --device cpu --tiny) for a CPU smoke test.")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device_name, peak = peak_flops(args, device)
    try:
        flex_difference = check_flex(args, device)
    except Exception as error:  # noqa: BLE001 - the timing below reports flex attention's own failure, if any
        print(f"flex vs sdpa check failed: {type(error).__name__}: {error}", file=sys.stderr)
        flex_difference = repr(error)[:500]
        _free(device)
    rows = [run_variant(args, attn, compiled, device, peak) for attn, compiled in timed_variants(args, device)]
    result = {
        "benchmark": "training step tokens/s and MFU, bf16 autocast, paper 0.16B config",
        "device": device_name,
        "peak_flops": peak,
        "flex_vs_sdpa_max_abs_difference": flex_difference,
        "args": vars(args),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "rows": rows,
    }
    patches = (args.latent_size // 2) ** 2
    parameters = next((row["parameters"] for row in rows if "parameters" in row), 0)
    print(f"{device_name}: batch of {args.seq_len}-token sequences ({args.num_images} images x {patches} patches), "
          f"{parameters / 1e6:.0f}M parameters, {args.dtype}, median of {args.steps} steps\n")  # fmt: skip
    print(table(rows))
    if isinstance(flex_difference, float):
        print(f"\nflex vs sdpa, max abs difference of the last hidden states: {flex_difference:.2e}")
    print(f"Wrote {common.write_json(result, args.output)}")
    return result


if __name__ == "__main__":
    main()
