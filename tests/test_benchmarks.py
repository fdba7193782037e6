"""Smoke tests of the benchmark scripts: each runs its `--quick` (tiny) configuration in-process and writes its json.

The peer (transfusion-pytorch, the `bench` extra) is compared only where it is importable; without it the scripts
time our side alone, which is what CI runs. The GPU script runs its CPU `--dry_run`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
HAS_PEER = importlib.util.find_spec("transfusion_pytorch") is not None


@pytest.fixture(scope="module")
def bench():
    """Import a script of benchmarks/ by name."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_training_quick(bench, tmp_path):
    output = tmp_path / "training.json"
    result = bench("bench_training").main(
        ["--quick", "--setups", "dims", "--no-memory", "--threads", "1", "--output", str(output)]
    )
    rows = {row["model"]: row for row in result["rows"]}
    assert set(rows) == ({"ours", "peer"} if HAS_PEER else {"ours"})
    ours = rows["ours"]
    assert ours["tokens_per_s"] > 0 and ours["content_tokens_per_sequence"] == 8 + 4
    assert ours["positions_per_sequence"] == 8 + 4 + 4
    assert json.loads(output.read_text())["rows"][0]["model"] == "ours"


def test_training_memory_in_a_fresh_process(bench, tmp_path):
    """The peak RSS of a side is measured in a subprocess: it comes back as numbers, not `n/a`."""
    argv = ["--quick", "--setups", "dims", "--no_peer", "--threads", "1", "--memory_steps", "1"]
    result = bench("bench_training").main([*argv, "--output", str(tmp_path / "memory.json")])
    memory = result["rows"][0]["memory"]
    assert memory["peak_rss_mib"] >= memory["rss_before_mib"] > 0 and memory["training_growth_mib"] >= 0


@pytest.mark.parametrize("flags", [["--dtype", "bfloat16"], pytest.param(["--compile"], marks=pytest.mark.slow)])
def test_training_under_autocast_and_compiled(bench, tmp_path, flags):
    """`--dtype bfloat16` runs every side under CPU autocast; `--compile` adds our step compiled as one graph (about a
    minute of compilation on a busy CPU, hence slow)."""
    argv = ["--quick", "--setups", "dims", "--no-memory", "--threads", "1", "--output", str(tmp_path / "t.json")]
    result = bench("bench_training").main([*argv, *flags])
    rows = {row["model"]: row for row in result["rows"]}
    expected = {"ours"} | ({"ours (compiled)"} if "--compile" in flags else set()) | ({"peer"} if HAS_PEER else set())
    assert set(rows) == expected and all(row["ms_per_step"] > 0 for row in rows.values())
    assert result["autocast_dtype"] == ("bfloat16" if "--dtype" in flags else "float32")
    if HAS_PEER:
        assert all(rows[name]["paired_speedup_vs_peer"] > 0 for name in expected - {"peer"})


def test_training_width_matching(bench):
    training = bench("bench_training")
    args = training.parse_args(["--quick"])
    target = training.our_parameters(args, 48)
    assert training.width_matching(args, target) == 48


def test_text_logits_quick(bench, tmp_path, capsys):
    """Both LM head variants timed, and their activations measured, on caption-like rows."""
    output = tmp_path / "text_logits.json"
    result = bench("bench_text_logits").main(["--quick", "--output", str(output)])
    (row,) = result["rows"]
    # <s> 8 text <boi> 16 patches <eoi> </s>: the LM head runs on the 12 positions that are not patches.
    assert (row["vocab_size"], row["positions_per_row"], row["lm_head_positions_per_row"]) == (512, 28, 12)
    assert row["ms_every_position"] > 0 and row["ms_text_positions"] > 0
    # Cross-entropy saves the fp32 log-softmax of the logits for backward: 28 x 512 a row, or 12 x 512 without the
    # patches' (plus the gathered hidden states, a little).
    saved = row["activations_mib_every_position"] - row["activations_mib_text_positions"]
    assert saved == pytest.approx(2 * (28 - 12) * 512 * 4 / 2**20, rel=0.2)
    assert "| 512 | 12 / 28 |" in capsys.readouterr().out
    assert json.loads(output.read_text())["rows"][0]["vocab_size"] == 512


def test_sampling_quick(bench, tmp_path):
    output = tmp_path / "sampling.json"
    result = bench("bench_sampling").main(["--quick", "--threads", "1", "--output", str(output)])
    rows = {row["candidate"]: row for row in result["rows"]}
    # Cached: 1 prefill + 1 forward per step; uncached: 1 forward per step (2 rows each, guidance on).
    assert rows["ours (KV cache)"]["transformer_calls"] == 1 + 2
    assert rows["ours (no cache)"]["transformer_calls"] == 2
    if HAS_PEER:
        assert rows["peer (sample_many, Euler)"]["transformer_calls"] == 2 + 2 * 2
    assert output.exists()


def test_sampling_bf16_autocast_and_presets(bench, tmp_path):
    sampling = bench("bench_sampling")
    # The GPU figure of issue 30: the paper's 0.16B width and depth, a 256x256 image's 32x32 latent, 50 steps.
    paper = sampling.parse_args(["--preset", "paper", "--device", "cuda", "--dtype", "bfloat16", "--steps", "20"])
    assert (paper.dim, paper.depth, paper.heads, paper.latent_size, paper.steps) == (768, 16, 12, 32, 20)
    with pytest.raises(SystemExit):
        sampling.parse_args(["--quick", "--preset", "paper"])
    # Both sides under one bf16 autocast: what `--device cuda --dtype bfloat16` runs, on CPU.
    result = sampling.main(["--quick", "--threads", "1", "--dtype", "bfloat16", "--output", str(tmp_path / "s.json")])
    assert all(row["s_per_image"] > 0 for row in result["rows"]) and result["device"] == "cpu"


def test_kv_cache_table(bench, tmp_path, capsys):
    output = tmp_path / "kv_cache.json"
    bench("bench_kv_cache").main(["--quick", "--threads", "1", "--output", str(output)])
    assert "| prompt tokens |" in capsys.readouterr().out
    assert [row["prompt_tokens"] for row in json.loads(output.read_text())["rows"]] == [4, 8]


def test_gpu_dry_run(bench, tmp_path):
    output = tmp_path / "gpu.json"
    result = bench("bench_gpu").main(["--dry_run", "--output", str(output)])
    row = result["rows"][0]
    assert row["attention"] == "sdpa" and row["tokens_per_s"] > 0
    assert row["parameters_in_flops"] < row["parameters"]
    assert json.loads(output.read_text())["device"] == "cpu"


def test_gpu_compiled_variants(bench):
    gpu = bench("bench_gpu")
    cuda, cpu = gpu.torch.device("cuda"), gpu.torch.device("cpu")

    def variants(*argv: str, device=cuda) -> list:
        return gpu.timed_variants(gpu.parse_args(list(argv)), device)

    assert variants() == [("sdpa", False), ("flex_attention", False)]
    # Issue 30's table in one compilation: sdpa, flex, compiled flex.
    assert variants("--compile", "flex_attention") == [
        ("sdpa", False),
        ("flex_attention", False),
        ("flex_attention", True),
    ]
    assert variants("--compile")[2:] == [("sdpa", True), ("flex_attention", True)]
    assert variants("--compile", "--attn", "sdpa", "flex_attention", device=cpu) == [("sdpa", False), ("sdpa", True)]


def test_gpu_batch_layout(bench):
    gpu = bench("bench_gpu")
    args = gpu.parse_args(["--dry_run"])
    config = gpu.load_config(args, "sdpa")
    batch = gpu.make_batch(config, args, gpu.torch.device("cpu"))
    assert batch["input_ids"].shape == (args.batch_size, args.seq_len)
    per_row = (batch["input_ids"] == config.image_token_id).sum(dim=1)
    assert per_row.tolist() == [args.num_images * config.num_patches] * args.batch_size
    assert batch["latents"].shape[0] == args.batch_size * args.num_images


def test_packing_quick(bench, tmp_path):
    output = tmp_path / "packing.json"
    result = bench("bench_packing").main(["--quick", "--output", str(output)])
    rows = {row["layout"]: row for row in result["rows"]}
    assert set(rows) == {"padded", "packed"}
    # The same pairs in both layouts: same real tokens and the same loss; packed rows are max_sequence_length long.
    assert rows["packed"]["real_tokens_per_step"] == rows["padded"]["real_tokens_per_step"]
    assert result["first_batch_loss_difference"] < 1e-5
    assert rows["packed"]["positions_per_step"] % 512 == 0 and rows["packed"]["real_tokens_per_s"] > 0
    assert json.loads(output.read_text())["rows"][1]["layout"] == "packed"


def test_data_memory_quick(bench, tmp_path, capsys):
    """One tiny image folder through the training script in a child process: its peak RSS and encoding throughput."""
    output = tmp_path / "data_memory.json"
    result = bench("bench_data_memory").main(["--quick", "--sizes", "8", "16", "--output", str(output)])
    row, larger = result["rows"]
    assert row["images"] == 8 and 100 < row["peak_rss_mb"] < 10_000 and row["encode_images_per_s"] > 0
    assert larger["images"] == 16 and larger["latent_cache_mb"] > row["latent_cache_mb"] > 0
    # The ratio the benchmark reports is that of its two rows (memory flat in the data size: near 1, never 2x).
    assert result["peak_rss_ratio"] == pytest.approx(larger["peak_rss_mb"] / row["peak_rss_mb"], rel=1e-2)
    assert 0.5 < result["peak_rss_ratio"] < 1.5
    assert "| images | peak RSS (MB) |" in capsys.readouterr().out
    assert json.loads(output.read_text())["rows"][0]["images"] == 8


def test_text_retention_quick(bench, tmp_path, capsys):
    """Pretrain a tiny LLM, train it with frozen text through the training script, score it: its text-only logits
    over the LLM's vocabulary are untouched, and the table and json are written."""
    output = tmp_path / "text_retention.json"
    argv = [
        "--quick",
        "--variants",
        "experts_frozen_text",
        "--work_dir",
        str(tmp_path / "work"),
        "--output",
        str(output),
    ]
    result = bench("bench_text_retention").main(argv)
    [row] = result["rows"]
    assert row["max_text_logit_change"] == 0.0
    assert row["held_out_perplexity"] == pytest.approx(result["llm"]["held_out_perplexity"], rel=1e-6)
    assert row["steps"] == 2 and row["seconds_per_step"] > 0 and 0 < row["trainable_parameters"] < row["parameters"]
    assert "| (c) modality experts, text frozen |" in capsys.readouterr().out
    assert json.loads(output.read_text())["rows"][0]["variant"] == "experts_frozen_text"
    assert (tmp_path / "work" / "llm" / "config.json").is_file()


def test_samplers_quick(bench, tmp_path, capsys):
    """bench_samplers scores a saved pixel-space pipeline with each named sampler, from its own scheduler config."""
    from pipeline_components import get_pipeline

    saved = tmp_path / "pipeline"
    get_pipeline(pixel_space=True).save_pretrained(saved)
    output = tmp_path / "samplers.json"
    samplers = bench("bench_samplers")
    argv = [str(saved), "--samplers", "dpm", "sde_dpm_clamped", "flow_euler", "--images_per_caption", "1"]
    argv += ["--num_inference_steps", "2", "--threads", "1", "--output", str(output), "--grids", str(tmp_path / "g")]
    result = samplers.main(argv)
    rows = {row["sampler"]: row for row in result["rows"]}
    assert set(rows) == {"dpm", "sde_dpm_clamped"}  # flow_euler does not fit an epsilon model: named, skipped
    assert "do not fit" in capsys.readouterr().out
    assert rows["sde_dpm_clamped"]["overrides"]["thresholding"] is True
    # Every attribute must be right for an image to count: the accuracy is at most each attribute's score.
    for row in rows.values():
        attributes = [row[f"t2i_{name}"] for name in ("size", "color", "shape", "position")]
        assert row["t2i_accuracy"] <= min(attributes) and row["num_inference_steps"] == 2
    assert json.loads(output.read_text())["settings"]["images_per_caption"] == 1
    assert sorted(path.name for path in (tmp_path / "g").iterdir()) == [
        "pipeline_dpm.png",
        "pipeline_sde_dpm_clamped.png",
    ]
    for bad in (["--samplers", "heun"], ["--images_per_caption", "0"]):
        with pytest.raises(SystemExit):
            samplers.parse_args([str(saved), *bad])
    with pytest.raises(SystemExit):
        samplers.parse_args([str(tmp_path)])  # no model_index.json
