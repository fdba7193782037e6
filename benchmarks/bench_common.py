"""Helpers shared by the benchmark scripts: our model and batches, the peer's availability, A/B timing, output.

Token layout of our side (the peer adds its own specials after its text vocabulary instead):
ids ``0 .. text_vocab - 1`` are text, then ``<pad> <s> </s> <boi> <eoi> <image>``. A training sequence is
``<s> text <boi> <image>*N <eoi> </s>``: ``text_length + N + 4`` positions for ``text_length + N`` content tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from transfusion_hf import TransfusionConfig, TransfusionForMixedModal

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
if str(BENCH_DIR) not in sys.path:  # the peer wrapper lives next to this file
    sys.path.insert(0, str(BENCH_DIR))

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<boi>", "<eoi>", "<image>")


# ------------------------------------------------------------------------------------------------------- peer
def fill_defaults(args: argparse.Namespace, defaults: dict[str, Any]) -> argparse.Namespace:
    """Set every flag left at None to its value in `defaults` (the benchmark's full or `--quick` sizes)."""
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def peer_module():
    """The peer wrapper (``peer_transfusion_pytorch``) when ``transfusion_pytorch`` is importable, else None."""
    try:
        import transfusion_pytorch  # noqa: F401
    except ImportError:
        return None
    import peer_transfusion_pytorch

    return peer_transfusion_pytorch


# -------------------------------------------------------------------------------------------------- our side
def special_ids(text_vocab: int) -> dict[str, int]:
    """Ids of our special tokens, right after the text vocabulary."""
    names = ("pad", "bos", "eos", "boi", "eoi", "image")
    return {name: text_vocab + index for index, name in enumerate(names)}


def feed_forward_size(dim: int) -> int:
    """The peer's GEGLU inner width, ``int(dim * 4 * 2 / 3)``; our SwiGLU MLP gets the same at equal dimensions."""
    return int(dim * 4 * 2 / 3)


def build_our_config(
    dim: int,
    depth: int,
    heads: int,
    *,
    text_vocab: int = 256,
    intermediate_size: int | None = None,
    latent_channels: int = 4,
    latent_size: int = 16,
    patch_size: int = 2,
    max_positions: int = 4096,
    prediction_type: str = "epsilon",
    attn_implementation: str = "sdpa",
) -> TransfusionConfig:
    """A Llama-backbone Transfusion config with the linear patch encoder (``intermediate_size`` defaults to the
    peer's feed-forward width)."""
    ids = special_ids(text_vocab)
    config = TransfusionConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": text_vocab + len(SPECIAL_TOKENS),
            "hidden_size": dim,
            "intermediate_size": intermediate_size or feed_forward_size(dim),
            "num_hidden_layers": depth,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "max_position_embeddings": max_positions,
            "pad_token_id": ids["pad"],
            "bos_token_id": ids["bos"],
            "eos_token_id": ids["eos"],
        },
        latent_channels=latent_channels,
        latent_size=latent_size,
        patch_size=patch_size,
        patch_encoder="linear",
        boi_token_id=ids["boi"],
        eoi_token_id=ids["eoi"],
        image_token_id=ids["image"],
        prediction_type=prediction_type,
    )
    config._attn_implementation = attn_implementation
    return config


def build_our_model(config: TransfusionConfig, seed: int = 0) -> TransfusionForMixedModal:
    torch.manual_seed(seed)
    return TransfusionForMixedModal(config)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


def our_sequence_length(text_length: int, num_patches: int) -> int:
    """Positions of ``<s> text <boi> <image>*N <eoi> </s>``."""
    return text_length + num_patches + 4


def make_our_batch(
    config: TransfusionConfig, batch_size: int, text_length: int, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """A random training batch of ``<s> text <boi> <image>*N <eoi> </s>`` rows with noisy latents and targets."""
    text_vocab = config.vocab_size - len(SPECIAL_TOKENS)
    ids = special_ids(text_vocab)

    def column(token: int, width: int = 1) -> torch.Tensor:
        return torch.full((batch_size, width), token, dtype=torch.long)

    text = torch.randint(0, text_vocab, (batch_size, text_length), generator=generator)
    input_ids = torch.cat(
        [
            column(ids["bos"]),
            text,
            column(ids["boi"]),
            column(ids["image"], config.num_patches),
            column(ids["eoi"]),
            column(ids["eos"]),
        ],
        dim=1,
    )
    shape = (batch_size, config.latent_channels, config.latent_size, config.latent_size)
    return {
        "input_ids": input_ids,
        "labels": input_ids,
        "latents": torch.randn(shape, generator=generator),
        "timesteps": torch.rand(batch_size, generator=generator) * config.num_train_timesteps,
        "diffusion_targets": torch.randn(shape, generator=generator),
    }


def our_train_step(model: TransfusionForMixedModal, optimizer: torch.optim.Optimizer, batch: dict) -> torch.Tensor:
    """Forward with labels and diffusion targets, backward, AdamW step. Returns the loss tensor (no sync)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return loss.detach()


def build_word_tokenizer(text_vocab: int = 256):
    """A word-level tokenizer whose words ``w0 .. w{text_vocab-1}`` are the text ids ``0 .. text_vocab - 1``, then our
    specials: prompts of an exact length and the same ids as the peer's text tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{index}": index for index in range(text_vocab)}
    vocab.update({token: text_vocab + index for index, token in enumerate(SPECIAL_TOKENS)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<boi>", "<eoi>", "<image>"],
    )


def prompt_text(ids: Sequence[int]) -> str:
    """The prompt string of ``build_word_tokenizer`` for these text ids."""
    return " ".join(f"w{index}" for index in ids)


def build_our_pipeline(model: TransfusionForMixedModal, tokenizer):
    """TransfusionPipeline with a flow-matching Euler scheduler (the model must predict ``flow_prediction``).

    A tiny `AutoencoderKL` only fixes the image size (4-channel latents need a VAE); with ``output_type="latent"``
    it never runs, so only the denoising is timed, as on the peer's side.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    from transfusion_hf import TransfusionPipeline

    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=model.config.latent_channels,
        norm_num_groups=32,
    )
    pipe = TransfusionPipeline(
        transformer=model.eval(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, tokenizer=tokenizer
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_forward_calls(module: torch.nn.Module, function: Callable[[], object]) -> int:
    """How many times ``module`` runs its forward while ``function()`` runs."""
    calls = 0

    def hook(*_: object) -> None:
        nonlocal calls
        calls += 1

    handle = module.register_forward_hook(hook)
    try:
        function()
    finally:
        handle.remove()
    return calls


# ---------------------------------------------------------------------------------------------------- timing
def alternate(
    candidates: dict[str, Callable[[], object]], rounds: int, steps: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Time the candidates call by call in turn (A B A B ..., the order reversed every round), ``steps`` calls each
    per round, after ``warmup`` untimed calls each. Neighbouring calls of different candidates see about the same
    machine load, which is what ``paired_ratio`` relies on.

    Returns the seconds of every timed call, per candidate, in call order.
    """
    for _ in range(warmup):
        for function in candidates.values():
            function()
    names = list(candidates)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for _ in range(steps):
            for name in order:
                start = time.perf_counter()
                candidates[name]()
                times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(slower: Sequence[float], faster: Sequence[float]) -> float:
    """Median over neighbouring calls of ``slower[i] / faster[i]``: robust to load that drifts during the run."""
    return statistics.median(a / b for a, b in zip(slower, faster))


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def round_medians(values: Sequence[float], rounds: int) -> list[float]:
    """Median of each round's share of ``values`` (they were recorded round by round, equal counts per round)."""
    per_round = len(values) // max(rounds, 1)
    return [statistics.median(values[index * per_round : (index + 1) * per_round]) for index in range(rounds)]


# ---------------------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> int:
    """Reset the kernel's high-water mark of this process to its current RSS (Linux ``clear_refs`` 5), so the peak
    read later belongs to training, not to the imports; returns the current RSS in bytes."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # the peak then falls back to the whole life of the process (ru_maxrss)
    rss = _status_kib("VmRSS")
    return rss * 1024 if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss() -> int:
    """The peak RSS of this process in bytes since the last `reset_peak_rss` (else since it started)."""
    peak = _status_kib("VmHWM")
    return (peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ---------------------------------------------------------------------------------------------------- output
def environment(threads: int) -> dict[str, Any]:
    """Machine, library versions and load, for the json."""
    import diffusers
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "diffusers": diffusers.__version__,
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "load_average_at_end": [round(value, 2) for value in os.getloadavg()],
    }
    from importlib.metadata import PackageNotFoundError, version

    try:
        info["transfusion_pytorch"] = version("transfusion-pytorch")
    except PackageNotFoundError:
        info["transfusion_pytorch"] = None
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; numbers are right-aligned."""
    align = ["---:" if rows and isinstance(rows[0][index], (int, float)) else "---" for index in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def report(result: dict, table: str, settings: str, output: str | os.PathLike) -> dict:
    """Print a benchmark's table and one line of its settings with the run's seconds and load average, then write its
    json to `output`; returns `result`."""
    print(table)
    load = result["environment"]["load_average_at_end"][0]
    print(f"\n{settings}; {result['total_seconds']} s; load average {load}")
    print(f"Wrote {write_json(result, output)}")
    return result


def write_json(data: dict, output: str | os.PathLike) -> Path:
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
