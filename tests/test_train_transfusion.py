"""examples/train_transfusion.py end to end on tiny settings: every data source, a pretrained LLM with LoRA, exact resume
after SIGKILL, crash-safe checkpoints, the NaN stop, corrupt data, two processes, validation, EMA, accumulation.

Most runs call the script's `main(argv)` in this process (the imports cost more than the training); the ones that need
a real process (SIGKILL, exit codes, `accelerate launch`) start it with `sys.executable`.
"""

from __future__ import annotations

import copy
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from launching import accelerate_launch
from script_loading import (
    load_script,
    one_thread_and_fresh_accelerate,  # noqa: F401 (autouse fixture)
    reset_accelerate,
)
from transfusion_hf import training
from transfusion_hf.data.image_text import CorruptImageError
from transfusion_hf.data.latent_cache import MANIFEST_NAME
from transfusion_hf.data.shapes import draw_shape, sample_specs, train_captions
from transfusion_hf.pipeline_transfusion import TransfusionPipeline
from transfusion_hf.processing_transfusion import special_token_ids
from transfusion_hf.training import (
    NonFiniteLossError,
    TrainingClock,
    check_finite,
    checkpoint_step,
    list_checkpoints,
    resolve_checkpoint,
)
from transfusion_hf.training.distributed import accelerator_kwargs_handlers
from transfusion_hf.training.model_setup import load_model_preset, run_model_preset

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_transfusion.py"
VAE_SCRIPT = ROOT / "examples" / "train_vae.py"
CONFIGS = ROOT / "examples" / "configs"
# Tiny model, tiny data, no trackers: a step takes tens of milliseconds.
TINY = ["--model_config", "tiny", "--train_batch_size", "4", "--report_to", "none", "--num_inference_steps", "2"]
SHAPES = ["--dataset_name", "shapes", "--shapes_num_samples", "64"]


train_transfusion = load_script(SCRIPT)


def run_main(output_dir: Path, *args: str) -> Path:
    try:
        return train_transfusion.main([*TINY, "--output_dir", str(output_dir), *args])
    finally:
        reset_accelerate()


def subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


def run_script(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, *args],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=timeout,
        cwd=ROOT,
    )


def read_log(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / "logs" / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def losses_by_step(output_dir: Path) -> dict[int, float]:
    """The last record of each step (a resumed run appends to the log of the run it continues)."""
    return {record["step"]: record["loss"] for record in read_log(output_dir)}


def latent_cache_manifest(cache_dir: Path) -> dict:
    """The manifest of the one latent cache under `cache_dir` (`--latent_cache_dir`): `num_rows` of the source data
    set, `num_examples` encoded (the readable ones)."""
    [folder] = [path for path in cache_dir.iterdir() if path.is_dir()]
    return json.loads((folder / MANIFEST_NAME).read_text())


def png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def shape_rows(num: int, seed: int = 0) -> list[tuple[PIL.Image.Image, str]]:
    return [(draw_shape(spec, jitter), spec.caption) for spec, jitter in sample_specs("train", num, seed)]


def write_image_folder(folder: Path, num: int = 16, corrupt: bool = False, caption_key: str = "text") -> Path:
    """The diffusers image-folder layout: PNG files and a metadata.jsonl with `file_name` and the caption."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (image, caption) in enumerate(shape_rows(num)):
        name = f"{index:03d}.png"
        image.save(folder / name)
        lines.append({"file_name": name, caption_key: caption})
    if corrupt:
        good = png_bytes(shape_rows(1, seed=1)[0][0])
        (folder / "truncated.png").write_bytes(good[: len(good) // 2])  # a download cut off half-way
        (folder / "garbage.png").write_bytes(b"this is not an image" * 10)
        lines += [
            {"file_name": "truncated.png", caption_key: "a truncated file"},
            {"file_name": "garbage.png", caption_key: "a garbage file"},
        ]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def write_hub_layout_dataset(folder: Path, num: int = 16) -> Path:
    """A data set folder laid out like a Hub data set repo (`data/train-00000-of-00001.parquet`, image bytes embedded,
    non-default column names).

    `load_image_text_dataset(dataset_name=...)` calls `datasets.load_dataset(dataset_name, ...)` for any name but
    "shapes". For a Hub id or a local folder `load_dataset` resolves the same way: list the repo's data files, infer
    the `parquet` packaged builder from them, build the train split. Only the file listing differs (Hub API vs local
    disk), so this exercises the script's Hub code path without a network.
    """
    rows = shape_rows(num)
    dataset = datasets.Dataset.from_dict(
        {"img": [{"bytes": png_bytes(image), "path": None} for image, _ in rows], "caption": [c for _, c in rows]},
        features=datasets.Features({"img": datasets.Image(), "caption": datasets.Value("string")}),
    )
    (folder / "data").mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return folder


# ------------------------------------------------------------------------------------------------- data sources
def test_shapes_validation_and_final_pipeline(tmp_path):
    """Built-in shapes from scratch; validation grids; the final folder is a loadable, working pipeline."""
    out = tmp_path / "run"
    run_main(out, *SHAPES, "--max_train_steps", "4", "--validation_steps", "2", "--checkpointing_steps", "0",
             "--logging_steps", "1")  # fmt: skip
    records = read_log(out)
    assert [record["step"] for record in records] == [1, 2, 3, 4]
    assert all(record["tokens_per_second"] > 0 and torch.isfinite(torch.tensor(record["loss"])) for record in records)
    # The clipping threshold is the default 1.0: each one-step window was clipped (1.0) or not (0.0), by its norm.
    assert all(record["grad_clipped_fraction"] == float(record["grad_norm"] > 1.0) for record in records), records
    assert all(0 < record["grad_norm"] < 1e4 for record in records), records
    assert sorted(path.name for path in (out / "validation").iterdir()) == ["step-000002.png", "step-000004.png"]
    assert PIL.Image.open(out / "validation" / "step-000004.png").size[0] > 0
    # The text-conditioning gap of each validation: one record per band and the whole, on the console too.
    gaps = [json.loads(line) for line in (out / "logs" / "validation_log.jsonl").read_text().splitlines()]
    assert [gap["step"] for gap in gaps] == [2, 4]
    assert set(gaps[0]) == {"step", "text_gap/all"} | {f"text_gap/t{250 * b}-{250 * (b + 1)}" for b in range(4)}
    assert all(abs(value) < 10 for gap in gaps for value in gap.values() if value != gap["step"])
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["global_step"] == 4 and summary["train_batch_size"] == 4  # 4 a process x 1 process x 1 micro-step

    pipe = TransfusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_local_image_folder_skips_and_counts_corrupt_images(tmp_path, caplog):
    folder = write_image_folder(tmp_path / "images", num=12, corrupt=True)
    out, cache = tmp_path / "run", tmp_path / "cache"
    run_main(out, "--train_data_dir", str(folder), "--max_train_steps", "2", "--checkpointing_steps", "0",
             "--latent_cache_dir", str(cache))  # fmt: skip
    manifest = latent_cache_manifest(cache)
    assert (manifest["num_rows"], manifest["num_examples"]) == (14, 12)  # the 2 unreadable files skipped
    assert "skipped 2 unreadable images of 14" in caplog.text  # the warning that tells the user
    assert [record["step"] for record in read_log(out)] == [2] and (out / "model_index.json").is_file()


def test_strict_data_names_the_corrupt_file(tmp_path):
    folder = write_image_folder(tmp_path / "images", num=4, corrupt=True)
    with pytest.raises(CorruptImageError, match=r"unreadable image at row \d+ \(.*(truncated|garbage)\.png\)"):
        run_main(tmp_path / "run", "--train_data_dir", str(folder), "--max_train_steps", "1", "--strict_data")


def test_hub_layout_dataset_with_custom_columns(tmp_path):
    data = write_hub_layout_dataset(tmp_path / "hub_dataset", num=12)
    out, cache = tmp_path / "run", tmp_path / "cache"
    run_main(out, "--dataset_name", str(data), "--image_column", "img", "--caption_column", "caption",
             "--max_train_steps", "2", "--checkpointing_steps", "0", "--latent_cache_dir", str(cache))  # fmt: skip
    manifest = latent_cache_manifest(cache)
    assert (manifest["num_rows"], manifest["num_examples"]) == (12, 12)
    assert json.loads((out / "training_summary.json").read_text())["dataset"] == str(data)


def test_missing_caption_column_fails_with_message(tmp_path):
    """A real process: non-zero exit code, and stderr names the column and lists the available ones."""
    folder = write_image_folder(tmp_path / "images", num=2, caption_key="caption")
    result = run_script("--train_data_dir", str(folder), "--output_dir", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "`caption_column`='text' is not a column of the data set" in result.stderr
    assert "available columns: ['image', 'caption']" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------- pretrained LLM + LoRA
@pytest.fixture(scope="module")
def tiny_llms(tmp_path_factory) -> dict[bool, Path]:
    """Tiny LlamaForCausalLMs (untied LM head like Llama, and tied like SmolLM2 or Qwen2) and their byte-level BPE
    tokenizer, with no image tokens and no pad token (like a real LLM checkpoint), saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(train_captions(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    folders = {}
    for tied in (False, True):
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=tied,
        )
        folders[tied] = tmp_path_factory.mktemp("tied_llm" if tied else "llm")
        LlamaForCausalLM(config).save_pretrained(folders[tied])
        tokenizer.save_pretrained(folders[tied])
    return folders


@pytest.fixture(scope="module")
def tiny_llm(tiny_llms) -> Path:
    return tiny_llms[False]


@pytest.mark.parametrize("tied", [False, True], ids=["untied_head", "tied_head"])
def test_lora_trainable_parameters(tiny_llms, tied):
    """LoRA on every backbone projection; image layers fully trained; the rows of the new special tokens trainable in
    the input embeddings AND the LM head (its own rows when untied, shared when tied); the rest of the LLM frozen."""
    args = training.parse_args([*SHAPES, *TINY, "--text_model_name_or_path", str(tiny_llms[tied]), "--lora_rank", "4"])
    tokenizer = training.build_tokenizer(args, train_captions())
    model, base = training.build_model(args, tokenizer, latent_channels=3, latent_size=32)
    assert base == str(tiny_llms[tied])
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    new_ids = list(special_token_ids(tokenizer).values())
    assert min(new_ids) >= 300  # appended after the LLM's vocabulary
    peft_model = training.apply_lora(args, model, new_ids)
    trainable = {name for name, parameter in peft_model.named_parameters() if parameter.requires_grad}
    assert any("embed_tokens.token_adapter.trainable_tokens_delta" in name for name in trainable)
    # A tied head follows the embedding's adapter (peft ties it); an untied one gets its own trainable rows.
    assert any("lm_head.token_adapter.trainable_tokens_delta" in name for name in trainable) == (not tied)
    assert sum("lora_A" in name for name in trainable) == 2 * 7
    assert any(name.startswith("base_model.model.image_encoder.modules_to_save") for name in trainable)
    assert any(name.startswith("base_model.model.image_decoder.modules_to_save") for name in trainable)
    assert not any(".base_layer." in name or name.endswith("embed_tokens.weight") for name in trainable)

    # One backward pass reaches the new rows of both the embeddings and the LM head.
    ids = torch.tensor([[tokenizer.bos_token_id, 5, new_ids[0], new_ids[1], 7]])
    peft_model(input_ids=ids, labels=ids).loss.backward()
    grads = {name: p.grad for name, p in peft_model.named_parameters() if "trainable_tokens_delta" in name}
    assert len(grads) == (1 if tied else 2)
    assert all(grad is not None and grad.abs().sum() > 0 for grad in grads.values())


def test_pretrained_llm_with_lora_end_to_end(tmp_path, tiny_llm):
    out = tmp_path / "run"
    run_main(out, *SHAPES, "--text_model_name_or_path", str(tiny_llm), "--lora_rank", "4", "--max_train_steps", "4",
             "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--checkpointing_steps", "2")  # fmt: skip
    pipe = TransfusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)

    llm = load_file(tiny_llm / "model.safetensors")
    merged = pipe.transformer.state_dict()
    vocab = llm["model.embed_tokens.weight"].shape[0]
    # The backbone started from the LLM: the old token rows are frozen, so still exactly the LLM's.
    torch.testing.assert_close(merged["model.embed_tokens.weight"][:vocab], llm["model.embed_tokens.weight"])
    torch.testing.assert_close(merged["lm_head.weight"][:vocab], llm["lm_head.weight"])
    # LoRA merged into the projections: changed, but only a little (rank 4, 4 steps).
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        change = (merged[key] - llm[key]).abs().max()
        assert 0 < change < 0.1 * llm[key].abs().max(), (key, change)
    # The new special-token rows trained: the final rows differ from those saved at step 2.
    checkpoint = load_file(out / "checkpoint-2" / "model.safetensors")
    tokenizer = pipe.tokenizer
    new_ids = [special_token_ids(tokenizer)[field] for field in ("boi_token_id", "eoi_token_id")]
    for module, weight in (("model.embed_tokens", "model.embed_tokens.weight"), ("lm_head", "lm_head.weight")):
        [delta_key] = [key for key in checkpoint if f"{module}.token_adapter.trainable_tokens_delta" in key]
        assert not torch.allclose(checkpoint[delta_key][:2], merged[weight][new_ids]), module


# ----------------------------------------------------------------------------- pretrained LLM, frozen text
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--freeze_text", "--modality_experts"], "--freeze_text needs --text_model_name_or_path"),
        (["--freeze_text", "--text_model_name_or_path", "x"], "--freeze_text needs --modality_experts"),
        (["--freeze_text", "--modality_experts", "--text_model_name_or_path", "x", "--lora_rank", "4"], "choose one"),
        (["--modality_experts", "--lora_rank", "4"], "--modality_experts with --lora_rank=4 is not supported"),
    ],
)
def test_freeze_text_refuses_combinations_that_make_no_sense(flags, message):
    with pytest.raises(ValueError, match=message):
        training.parse_args([*SHAPES, *TINY, *flags])


def test_frozen_text_end_to_end_keeps_the_llm_logits(tmp_path, tiny_llm):
    """--modality_experts --freeze_text from a pretrained LLM (EMA and gradient checkpointing on): the saved pipeline
    gives the LLM's text-only logits over its vocabulary bit for bit; the image copies and the new rows trained."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    run_main(out, *SHAPES, "--text_model_name_or_path", str(tiny_llm), "--modality_experts", "--freeze_text",
             "--max_train_steps", "3", "--learning_rate", "1e-2", "--lr_warmup_steps", "0", "--use_ema",
             "--gradient_checkpointing", "--checkpointing_steps", "1", "--checkpoints_total_limit", "3")  # fmt: skip
    pipe = TransfusionPipeline.from_pretrained(out)
    model = pipe.transformer.eval()
    assert model.config.modality_experts
    llm = AutoModelForCausalLM.from_pretrained(tiny_llm).eval()
    vocab = llm.config.vocab_size
    ids = torch.tensor([pipe.tokenizer("a small red circle in the top left")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits[..., :vocab], llm(input_ids=ids).logits)

    trained, base = model.state_dict(), load_file(tiny_llm / "model.safetensors")
    for key, value in base.items():
        assert torch.equal(trained[key][:vocab], value), key  # every LLM weight, embedding and LM-head rows included
    # The new rows and the image copies trained: the raw weights moved between the checkpoints of steps 1 and 3.
    first, last = (load_file(out / f"checkpoint-{step}" / "model.safetensors") for step in (1, 3))
    new_ids = [pipe.tokenizer.convert_tokens_to_ids(token) for token in ("<boi>", "<eoi>")]
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert not torch.equal(first[key][new_ids], last[key][new_ids]), key
    for key in ("self_attn.q_proj.image_expert.weight", "mlp.image_expert.down_proj.weight"):
        assert not torch.equal(first[f"model.layers.1.{key}"], last[f"model.layers.1.{key}"]), key
    assert not torch.equal(trained["model.norm.image_expert.weight"], base["model.norm.weight"])


# ---------------------------------------------------------------------------------------------------- resume
RESUME_ARGS = [*SHAPES[:-1], "24", "--max_train_steps", "12", "--checkpointing_steps", "3", "--logging_steps", "1",
               "--lr_warmup_steps", "2", "--checkpoints_total_limit", "3"]  # fmt: skip
# 24 samples / batch 4 = 6 batches per epoch: the checkpoints fall mid-epoch (3, 9) and at an epoch end (6, 12).


def run_until_checkpoint_fails(output_dir: Path, step: int, *args: str) -> None:
    """Run in-process until the run dies saving the checkpoint of `step`: a file stands where that checkpoint is
    written (`.tmp-checkpoint-{step}`), and the file system refuses the folder (a real `OSError`, as from a full disk
    or a lost mount). The run has trained and logged `step`; only the checkpoints before it are complete. The file is
    then removed, as a user would fix the disk before resuming."""
    blocker = output_dir / f".tmp-checkpoint-{step}"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a folder")
    with pytest.raises(FileExistsError, match=f"tmp-checkpoint-{step}"):
        run_main(output_dir, *args)
    blocker.unlink()
    assert max(losses_by_step(output_dir)) == step


@pytest.mark.parametrize("resumed_from", [3, 6], ids=["mid_epoch", "epoch_end"])
def test_resume_after_crash_is_exact(tmp_path, resumed_from, caplog):
    """In-process: a run that dies saving the checkpoint after `resumed_from`, resumed from the latest complete one,
    logs the same losses as an uninterrupted run (mid-epoch and epoch-end checkpoints; sampler, collator counter, LR
    schedule, RNG). A resume toward another --max_train_steps than the checkpoint's run says so."""
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    run_main(reference, *RESUME_ARGS)
    expected = losses_by_step(reference)
    assert sorted(expected) == list(range(1, 13))

    run_until_checkpoint_fails(crashed, resumed_from + 3, *RESUME_ARGS)
    assert resolve_checkpoint(crashed, "latest").name == f"checkpoint-{resumed_from}"
    run_main(crashed, *RESUME_ARGS, "--resume_from_checkpoint", "latest")
    steps = [record["step"] for record in read_log(crashed)]
    assert steps == list(range(1, 13))  # the resumed run dropped the killed run's records after the checkpoint
    assert losses_by_step(crashed) == expected
    assert "trained toward --max_train_steps" not in caplog.text
    if resumed_from == 3:
        run_main(crashed, *RESUME_ARGS, "--resume_from_checkpoint", "latest", "--max_train_steps", "13")
        assert "The checkpoint's run trained toward --max_train_steps=12, this one toward 13" in caplog.text
        assert [record["step"] for record in read_log(crashed)][-1] == 13


def test_resume_after_sigkill_is_exact(tmp_path):
    """A real process killed with SIGKILL at a random step after its first checkpoint, then resumed with
    `--resume_from_checkpoint latest`: every step's loss equals the uninterrupted run's."""
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_main(reference, *RESUME_ARGS)
    expected = losses_by_step(reference)

    kill_after = random.Random().randint(4, 10)  # >= one checkpoint (step 3) written, and before the end
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *TINY, "--output_dir", str(killed), *RESUME_ARGS],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=subprocess_env(),
        cwd=ROOT,
    )
    deadline = time.time() + 240
    try:
        while max(losses_by_step(killed), default=0) < kill_after:
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "the run did not reach the kill step in time"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    killed_at = max(losses_by_step(killed))
    assert killed_at < 12 and list_checkpoints(killed)

    run_main(killed, *RESUME_ARGS, "--resume_from_checkpoint", "latest")
    resumed = losses_by_step(killed)
    assert sorted(resumed) == list(range(1, 13))
    for step, loss in expected.items():
        assert abs(resumed[step] - loss) <= 1e-6, (step, loss, resumed[step], killed_at)


def test_checkpoints_are_crash_safe_and_pruned(tmp_path):
    out = tmp_path / "run"
    limit = ["--checkpointing_steps", "1", "--checkpoints_total_limit", "2", "--logging_steps", "1"]
    run_main(out, *SHAPES, "--max_train_steps", "4", *limit)
    assert [path.name for path in list_checkpoints(out)] == ["checkpoint-3", "checkpoint-4"]
    assert sorted(path.name for path in out.iterdir() if path.name.startswith("checkpoint-")) == [
        "checkpoint-3",
        "checkpoint-4",
    ]
    # A kill while checkpoint 5 was being written leaves only its temporary folder, half-written.
    partial = out / ".tmp-checkpoint-5"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a file")
    assert resolve_checkpoint(out, "latest") == out / "checkpoint-4"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_checkpoint(out, str(partial))
    first_run = read_log(out)
    run_main(out, *SHAPES, "--max_train_steps", "6", *limit, "--resume_from_checkpoint", "latest")
    assert [path.name for path in list_checkpoints(out)] == ["checkpoint-5", "checkpoint-6"]
    assert not partial.exists()  # overwritten by the real checkpoint 5, then pruned
    records = read_log(out)
    assert [record["step"] for record in records] == [1, 2, 3, 4, 5, 6]
    # Resumed from checkpoint-4: the records of steps 1 to 4 are the first run's (a step trained again would have
    # logged another tokens_per_second).
    assert records[:4] == first_run


# -------------------------------------------------------------------------------------------------------- NaN
def test_check_finite():
    check_finite(torch.tensor(1.5), 3, None)
    check_finite(torch.tensor([1.0, 2.0]), 3, None)  # one value per process
    with pytest.raises(NonFiniteLossError, match=r"nan at step 7.*Last good checkpoint: out/checkpoint-5"):
        check_finite(torch.tensor(float("nan")), 7, Path("out/checkpoint-5"))
    with pytest.raises(NonFiniteLossError, match=r"\[1.0, inf\] at step 2.*none \(no checkpoint was saved yet\)"):
        check_finite(torch.tensor([1.0, float("inf")]), 2, None)


def test_nan_loss_stops_the_run(tmp_path):
    """A learning rate of 1e30 makes the weights overflow after the first update: the run stops at step 2, naming the
    step and the checkpoint written after step 1."""
    out = tmp_path / "run"
    with pytest.raises(
        NonFiniteLossError, match=r"at step 2; training stopped\. Last good checkpoint: .*checkpoint-1"
    ):
        run_main(out, *SHAPES, "--max_train_steps", "6", "--checkpointing_steps", "1", "--learning_rate", "1e30",
                 "--lr_warmup_steps", "0", "--logging_steps", "1")  # fmt: skip
    assert [record["step"] for record in read_log(out)] == [1]
    assert not (out / "model_index.json").exists()


# ------------------------------------------------------------------------------------------------ options
def test_accumulation_ema_and_gradient_checkpointing(tmp_path):
    out = tmp_path / "run"
    run_main(out, *SHAPES, "--max_train_steps", "3", "--gradient_accumulation_steps", "2", "--use_ema",
             "--gradient_checkpointing", "--checkpointing_steps", "1", "--logging_steps", "1")  # fmt: skip
    assert [record["step"] for record in read_log(out)] == [1, 2, 3]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["train_batch_size"] == 8 and summary["global_step"] == 3
    # The EMA state is part of the checkpoint (so a resumed run continues the average).
    assert len(list((out / "checkpoint-3").glob("custom_checkpoint_*.pkl"))) == 2
    # The final weights are the EMA's, not those of the last step (saved in checkpoint-3).
    final = TransfusionPipeline.from_pretrained(out).transformer.state_dict()
    raw = load_file(out / "checkpoint-3" / "model.safetensors")
    assert all(not torch.equal(final[key], raw[key]) for key in ("model.layers.0.self_attn.q_proj.weight",
                                                                 "image_decoder.proj.weight"))  # fmt: skip


def ema_averages(checkpoint: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The EMA's averages saved in `checkpoint`, by parameter name (EMAModel keeps one per trainable parameter, in
    `model.parameters()` order; it is the second object registered for checkpointing, after the loop state)."""
    state = torch.load(checkpoint / "custom_checkpoint_1.pkl", weights_only=False)
    names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert state["optimization_step"] == checkpoint_step(checkpoint) and len(state["shadow_params"]) == len(names)
    return dict(zip(names, state["shadow_params"]))


def test_ema_resume_is_exact_and_saved_weights_are_the_average(tmp_path):
    """With --use_ema, a run that dies at step 6 and resumes from checkpoint-3 continues the average exactly: the final
    weights (the average) equal the uninterrupted run's, and they are the EMA's averages of the last checkpoint."""
    ema_args = [*RESUME_ARGS, "--use_ema", "--ema_decay", "0.9", "--learning_rate", "1e-2"]
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    run_main(reference, *ema_args)

    run_until_checkpoint_fails(crashed, 6, *ema_args)
    run_main(crashed, *ema_args, "--resume_from_checkpoint", "latest")
    assert losses_by_step(crashed) == losses_by_step(reference)

    expected = TransfusionPipeline.from_pretrained(reference).transformer
    resumed = TransfusionPipeline.from_pretrained(crashed).transformer.state_dict()
    averages = ema_averages(reference / "checkpoint-12", expected)
    raw = load_file(reference / "checkpoint-12" / "model.safetensors")
    for name, value in expected.state_dict().items():
        assert torch.equal(resumed[name], value), name
        assert torch.equal(value, averages[name]), name
    assert not torch.equal(averages["image_decoder.proj.weight"], raw["image_decoder.proj.weight"])


def test_ema_validation_leaves_training_weights_alone(tmp_path):
    """Validation draws with the EMA's averages (store / copy_to / restore): training then goes on from its own
    weights, so the losses equal those of a run without validation."""
    common = [*SHAPES[:-1], "24", "--max_train_steps", "6", "--checkpointing_steps", "0", "--logging_steps", "1",
              "--use_ema", "--lr_warmup_steps", "0", "--learning_rate", "1e-2"]  # fmt: skip
    run_main(tmp_path / "plain", *common)
    run_main(tmp_path / "validated", *common, "--validation_steps", "2")
    assert len(list((tmp_path / "validated" / "validation").glob("step-*.png"))) == 3
    assert losses_by_step(tmp_path / "validated") == losses_by_step(tmp_path / "plain")


def test_lr_scheduler_flags():
    """`--lr_scheduler` takes transformers' schedule names. The default warms up from the first step ((step + 1) /
    warmup_steps, as the script's own schedule did) and decays to `--min_lr_ratio` of the peak at the last step."""
    parameter = torch.nn.Parameter(torch.zeros(1))

    def learning_rates(*flags: str) -> list[float]:
        """The learning rate of each of the 10 training steps (2 of warmup)."""
        args = training.parse_args([*SHAPES, *TINY, "--max_train_steps", "10", "--lr_warmup_steps", "2",
                                             "--learning_rate", "1.0", *flags])  # fmt: skip
        optimizer = torch.optim.SGD([parameter], lr=args.learning_rate)
        scheduler = training.build_lr_scheduler(args, optimizer, num_processes=1)
        rates = []
        for _ in range(args.max_train_steps):
            rates.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return rates

    default = learning_rates()
    assert default[:2] == [0.5, 1.0] and default[-1] == pytest.approx(0.05)
    assert all(a > b for a, b in zip(default[1:], default[2:]))
    assert learning_rates("--min_lr_ratio", "0.2")[-1] == pytest.approx(0.2)
    from_zero = learning_rates("--lr_scheduler", "cosine_with_min_lr")
    assert from_zero[:3] == [0.0, 0.5, 1.0] and from_zero[3:] == default[2:-1]  # one step later
    assert learning_rates("--lr_scheduler", "linear")[-1] == pytest.approx(1 / 8)
    assert set(learning_rates("--lr_scheduler", "constant")) == {1.0}
    with pytest.raises(ValueError, match=r"--min_lr_ratio=0.2 has no effect with --lr_scheduler=linear"):
        learning_rates("--lr_scheduler", "linear", "--min_lr_ratio", "0.2")
    with pytest.raises(ValueError, match=r"--min_lr_ratio must be in \[0, 1\], got 1.5"):
        learning_rates("--min_lr_ratio", "1.5")
    with pytest.raises(SystemExit):  # argparse: not a schedule name
        learning_rates("--lr_scheduler", "reduce_lr_on_plateau")


def test_optim_flag_picks_the_fused_adamw_by_default():
    """`--optim` takes transformers' names: `adamw_torch_fused` (the default, one kernel over all parameters) and
    `adamw_torch` (the per-tensor loop) make the same updates, weight decay groups included."""
    torch.manual_seed(0)
    template = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    inputs, targets = torch.randn(8, 6), torch.randn(8, 3)

    def train(*flags: str) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
        args = training.parse_args([*SHAPES, *TINY, "--output_dir", "unused", "--learning_rate", "0.05", *flags])
        model = copy.deepcopy(template)
        optimizer, _ = training.build_optimizer(args, model, [], num_processes=1)
        for _ in range(3):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(inputs), targets).backward()
            optimizer.step()
        return optimizer, [parameter.detach().clone() for parameter in model.parameters()]

    fused, fused_weights = train()
    loop, loop_weights = train("--optim", "adamw_torch")
    assert fused.defaults["fused"] is True and not loop.defaults["fused"]
    assert [group["weight_decay"] for group in fused.param_groups] == [
        group["weight_decay"] for group in loop.param_groups
    ]
    for a, b, start in zip(fused_weights, loop_weights, template.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.equal(a, start.detach())  # both trained
    with pytest.raises(SystemExit):  # argparse: not an optimizer name
        train("--optim", "sgd")


def test_time_budget_stop_leaves_the_step_schedule_where_it_was(tmp_path):
    """A run stopped by --max_train_time_minutes has not decayed its learning rate (the schedule is planned for
    --max_train_steps): it stops at the step the budget allows, with the step schedule's rate there."""
    output_dir = tmp_path / "run"
    flags = [*SHAPES, "--max_train_steps", "1000", "--max_train_time_minutes", "0.0001", "--logging_steps", "1"]
    run_main(output_dir, *flags)
    assert json.loads((output_dir / "training_summary.json").read_text())["global_step"] == 1
    [record] = read_log(output_dir)
    args = training.parse_args([*TINY, *flags])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    scheduler = training.build_lr_scheduler(args, optimizer, num_processes=1)
    optimizer.step()
    scheduler.step()
    assert record["step"] == 1 and record["lr"] == pytest.approx(scheduler.get_last_lr()[0])


def test_time_budget_message_says_how_far_the_schedule_was():
    """What a run stopped by its budget prints: with the step clock, that the schedule did not reach its end and what
    to set; with the time clock, that it did."""
    flags = [*SHAPES, *TINY, "--max_train_steps", "1000", "--max_train_time_minutes", "0.5"]
    message = training.time_budget_message(training.parse_args(flags), 12, 1.5e-3)
    assert message.startswith("Time budget of 0.5 min reached at step 12 of --max_train_steps=1000: the learning rate")
    assert " is still 0.0015 (its schedule ends at step 1000; set --max_train_steps to what fits the budget" in message
    message = training.time_budget_message(training.parse_args([*flags, "--lr_schedule_clock", "time"]), 12, 5e-5)
    assert message.endswith("step 12 of --max_train_steps=1000; the schedule followed the budget to its end (learning "
                            "rate 5e-05).")  # fmt: skip


def test_time_clock_schedule_follows_the_budget_and_keeps_checkpoints_plain(tmp_path):
    """`--lr_schedule_clock time`: the schedule's position is the larger of the step and the spent share of the budget
    (capped at its end); before the clock starts it is the step schedule; its state holds no closure or clock."""
    parameter = torch.nn.Parameter(torch.zeros(1))

    def scheduler_at(spent_share: float | None, *flags: str):
        args = training.parse_args([*SHAPES, *TINY, "--max_train_steps", "10", "--lr_warmup_steps", "2",
                                             "--learning_rate", "1.0", "--max_train_time_minutes", "10", *flags])  # fmt: skip
        clock = TrainingClock(args.max_train_time_minutes)
        optimizer = torch.optim.SGD([parameter], lr=args.learning_rate)
        scheduler = training.build_lr_scheduler(args, optimizer, num_processes=1, clock=clock)
        if spent_share is not None:
            clock.start()
            clock.started -= spent_share * clock.budget_seconds
            clock.tick()
        for _ in range(3):
            optimizer.step()
            scheduler.step()
        return scheduler

    by_steps = [scheduler_at(None).lr_lambdas[0](step) for step in range(11)]
    assert scheduler_at(None, "--lr_schedule_clock", "time").get_last_lr()[0] == pytest.approx(by_steps[3])
    # Steps ahead of the clock lead; a clock ahead of the steps leads; a spent budget gives the floor.
    assert scheduler_at(0.1, "--lr_schedule_clock", "time").get_last_lr()[0] == pytest.approx(by_steps[3])
    assert scheduler_at(0.5, "--lr_schedule_clock", "time").get_last_lr()[0] == pytest.approx(by_steps[5], rel=1e-3)
    assert scheduler_at(3.0, "--lr_schedule_clock", "time").get_last_lr()[0] == pytest.approx(0.05)
    assert scheduler_at(0.5).get_last_lr()[0] == pytest.approx(by_steps[3])  # the default clock ignores the time

    torch.save(scheduler_at(0.5, "--lr_schedule_clock", "time").state_dict(), tmp_path / "scheduler.pt")
    assert torch.load(tmp_path / "scheduler.pt", weights_only=True)["last_epoch"] == 3


def test_time_clock_run_ends_its_schedule_with_the_budget(tmp_path):
    """A run whose steps cannot fit its budget still ends at the schedule's floor (5% of the peak)."""
    output_dir = tmp_path / "run"
    run_main(output_dir, *SHAPES, "--max_train_steps", "100000", "--max_train_time_minutes", "0.02",
             "--lr_schedule_clock", "time", "--learning_rate", "1e-3", "--checkpointing_steps", "0",
             "--logging_steps", "1")  # fmt: skip
    last = read_log(output_dir)[-1]
    assert last["step"] == json.loads((output_dir / "training_summary.json").read_text())["global_step"]
    assert last["lr"] == pytest.approx(5e-5), last


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr_schedule_clock", "time"], r"--lr_schedule_clock=time needs --max_train_time_minutes"),
        (["--max_train_time_minutes", "0"], r"--max_train_time_minutes must be positive, got 0.0"),
        (["--max_train_samples", "-3"], r"--max_train_samples must be positive, got -3"),
    ],
)
def test_time_budget_flags_are_checked(flags, message):
    with pytest.raises(ValueError, match=message):
        training.parse_args([*SHAPES, *TINY, *flags])


def test_shapes_demo_is_the_script_plus_data_flags():
    """The demo trains the script's defaults, which are the package's default recipe, and stops at its step count
    (no wall-clock cap: a slow machine takes longer instead of training a worse model); a user's flags override."""
    from transfusion_hf.recipes import load_recipe

    shapes_demo = load_script(ROOT / "examples" / "shapes_demo.py")
    assert set(shapes_demo.DEMO_FLAGS[::2]) == {"--dataset", "--shapes_num_samples", "--logging_steps"}
    args = training.parse_args([*shapes_demo.DEMO_FLAGS, "--output_dir", "unused"])
    recipe = load_recipe("small")
    assert args.recipe == "small" and recipe.training["max_train_steps"] == args.max_train_steps == 2000
    assert (args.max_train_time_minutes, args.lr_schedule_clock) == (None, "steps")
    for name, value in recipe.training.items():
        assert getattr(args, name) == value, name
    overrides = ["--prediction_type", "epsilon"]
    args = training.parse_args([*shapes_demo.DEMO_FLAGS, "--output_dir", "unused", *overrides])
    assert (args.timestep_sampling, args.learning_rate) == ("uniform", recipe.training["learning_rate"])


def test_a_recipe_sets_the_scripts_defaults_and_a_flag_wins(tmp_path):
    """`--recipe` sets the training defaults (a json of the user's too); a flag on the command line wins; a json
    without a training part trains with the default recipe's hyper-parameters, measured to draw."""
    from transfusion_hf.recipes import load_recipe

    mine = {"model": load_recipe("tiny").model, "training": {"learning_rate": 5e-4, "max_train_steps": 7}}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(mine))
    args = training.parse_args([*SHAPES, "--recipe", str(path)])
    assert (args.learning_rate, args.max_train_steps, args.timestep_sampling) == (5e-4, 7, "logit_normal")
    args = training.parse_args([*SHAPES, "--recipe", str(path), "--learning_rate", "1e-4"])
    assert (args.learning_rate, args.max_train_steps) == (1e-4, 7)
    path.write_text(json.dumps(load_recipe("tiny").model))  # a bare model preset
    args = training.parse_args([*SHAPES, "--model_config", str(path)])
    assert (args.learning_rate, args.max_train_steps) == (2e-3, 2000)
    args = training.parse_args([*SHAPES, "--recipe", "paper_0.16b"])
    assert (args.learning_rate, args.lr_warmup_steps) == (3e-4, 4000)
    # An epsilon model of the user's, no training part: the default recipe's times fall back to uniform.
    path.write_text(json.dumps({**load_recipe("tiny").model, "prediction_type": "epsilon"}))
    args = training.parse_args([*SHAPES, "--recipe", str(path), "--snr_gamma", "5"])
    assert (args.timestep_sampling, args.learning_rate) == ("uniform", 2e-3)


def test_same_command_and_seed_give_the_same_model_on_one_or_two_threads(tmp_path):
    """Training stops at the step count, not at a time budget, and nothing depends on the machine's speed: a run on
    one thread (a machine half as fast) trains the same weights as on two (the tiny recipe: bit for bit)."""
    from safetensors.torch import load_file

    threads = torch.get_num_threads()
    weights = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            out = tmp_path / f"threads{count}"
            run_main(out, *SHAPES, "--max_train_steps", "6", "--checkpointing_steps", "0", "--validation_steps", "0")
            assert json.loads((out / "training_summary.json").read_text())["global_step"] == 6
            weights.append(load_file(out / "transformer" / "model.safetensors"))
    finally:
        torch.set_num_threads(threads)
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_model_presets_parse():
    for name in ("tiny", "small", "paper_0.16b"):
        preset = load_model_preset(name)
        assert preset["text_config"]["model_type"] == "llama" and "patch_size" in preset
    with pytest.raises(ValueError, match="neither a json file nor a recipe"):
        load_model_preset("huge")


def test_config_overrides_change_the_backbone_of_a_run(tmp_path):
    """`--config_overrides` (transformers' run_clm.py flag) edits the preset's text_config: values take the type of the
    field they replace, and the saved model has them."""
    args = training.parse_args(
        [*SHAPES, *TINY, "--config_overrides", "num_hidden_layers=1,rms_norm_eps=1e-5,hidden_act=gelu"]
    )
    text_config = run_model_preset(args)["text_config"]
    tiny = load_model_preset("tiny")["text_config"]
    assert text_config == {**tiny, "num_hidden_layers": 1, "rms_norm_eps": 1e-5, "hidden_act": "gelu"}
    assert isinstance(text_config["num_hidden_layers"], int)

    out = run_main(tmp_path / "run", *SHAPES, "--max_train_steps", "1", "--config_overrides", "num_hidden_layers=1")
    saved = json.loads((out / "transformer" / "config.json").read_text())
    assert saved["text_config"]["num_hidden_layers"] == 1


@pytest.mark.parametrize(
    "overrides, extra, message",
    [
        ("num_layers=2", [], r"--config_overrides='num_layers=2', field 'num_layers': key num_layers isn't in"),
        ("num_hidden_layers=two", [], r"field 'num_hidden_layers': invalid literal for int\(\)"),
        ("num_hidden_layers", [], r"give comma-separated key=value pairs"),
        ("num_hidden_layers=2,", [], r"give comma-separated key=value pairs"),
        ("num_hidden_layers=2", ["--text_model_name_or_path", "some/llm"], r"the LLM's own config is used"),
    ],
)
def test_config_overrides_refuse_bad_fields_before_any_data(overrides, extra, message):
    with pytest.raises(ValueError, match=message):
        training.parse_args([*SHAPES, *TINY, "--config_overrides", overrides, *extra])


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {name: load_config_from_file(str(CONFIGS / f"accelerate_{name}.yaml")) for name in
               ("cpu_2proc", "1gpu", "ddp", "fsdp")}  # fmt: skip
    assert configs["cpu_2proc"].distributed_type == "MULTI_GPU" and configs["cpu_2proc"].use_cpu
    assert configs["cpu_2proc"].num_processes == 2
    assert configs["1gpu"].distributed_type == "NO" and configs["1gpu"].num_processes == 1
    assert configs["ddp"].distributed_type == "MULTI_GPU" and not configs["ddp"].use_cpu
    fsdp = configs["fsdp"]
    assert fsdp.distributed_type == "FSDP"
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"


# ------------------------------------------------------------------------------------------- two processes
def test_ddp_timeout_reaches_the_process_group():
    """--ddp_timeout becomes the process group's timeout (a hung collective then fails instead of waiting forever);
    DDP searches for unused parameters only when text-only rows can leave the image layers without gradients."""
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    handlers = accelerator_kwargs_handlers(training.parse_args([*TINY, *SHAPES, "--ddp_timeout", "90"]))
    assert [type(handler) for handler in handlers] == [InitProcessGroupKwargs]
    assert handlers[0].timeout.total_seconds() == 90
    handlers = accelerator_kwargs_handlers(training.parse_args([*TINY, *SHAPES, "--text_data_files", "docs.txt"]))
    assert handlers[0].timeout.total_seconds() == 1800
    assert isinstance(handlers[1], DistributedDataParallelKwargs) and handlers[1].find_unused_parameters


def test_two_processes_over_gloo(tmp_path):
    """`ACCELERATE_USE_CPU=1 accelerate launch --config_file examples/configs/accelerate_cpu_2proc.yaml` starts two
    real CPU processes (DDP over gloo): both report num_processes=2, and the effective batch is 2 x 4."""
    out = tmp_path / "run"
    # --ddp_timeout: a collective that waits for a process that never comes fails in 2 minutes, naming itself.
    run = [str(SCRIPT), *TINY, *SHAPES[:-1], "32", "--max_train_steps", "3", "--checkpointing_steps", "2",
           "--logging_steps", "1", "--ddp_timeout", "120", "--output_dir", str(out)]  # fmt: skip
    result = accelerate_launch(
        CONFIGS / "accelerate_cpu_2proc.yaml", run, dict(subprocess_env(), ACCELERATE_USE_CPU="1")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "training_summary.json").read_text())["train_batch_size"] == 8  # 4 a process x 2
    assert [record["step"] for record in read_log(out)] == [1, 2, 3]  # written once, by the main process
    # Each process saved its own RNG state in the checkpoint.
    assert {path.name for path in (out / "checkpoint-2").glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    assert (out / "model_index.json").is_file()


def test_two_processes_stop_together_at_the_time_budget(tmp_path):
    """A budget that binds: both processes take the main process's clock (a broadcast per step), so they stop at the
    same step with the same learning rate instead of one leaving the other in the next all-reduce."""
    out = tmp_path / "run"
    run = [str(SCRIPT), *TINY, *SHAPES, "--max_train_steps", "100000", "--max_train_time_minutes", "0.03",
           "--lr_schedule_clock", "time", "--checkpointing_steps", "0", "--ddp_timeout", "60", "--learning_rate", "3e-4",
           "--logging_steps", "1", "--output_dir", str(out)]  # fmt: skip
    result = accelerate_launch(
        CONFIGS / "accelerate_cpu_2proc.yaml", run, dict(subprocess_env(), ACCELERATE_USE_CPU="1")
    )
    # A process that stopped alone would have left the other waiting in a collective until --ddp_timeout failed it.
    assert result.returncode == 0, result.stderr[-3000:]
    global_step = json.loads((out / "training_summary.json").read_text())["global_step"]
    records = read_log(out)  # every step logged: a reduction over both processes each time
    assert global_step > 1 and [record["step"] for record in records] == list(range(1, global_step + 1))
    assert records[-1]["lr"] == pytest.approx(1.5e-5)  # the floor: 5% of the peak
    assert (out / "model_index.json").is_file()


@pytest.mark.slow
def test_cpu_launch_without_use_cpu_fails_loudly(tmp_path):
    """Without ACCELERATE_USE_CPU=1 the launcher starts two processes that each find no GPU and would train alone on
    the same output folder: the script stops with an error saying what to set."""
    run = [str(SCRIPT), *TINY, *SHAPES, "--max_train_steps", "1", "--output_dir", str(tmp_path / "run")]
    env = {key: value for key, value in subprocess_env().items() if key != "ACCELERATE_USE_CPU"}
    result = accelerate_launch(CONFIGS / "accelerate_cpu_2proc.yaml", run, env)
    assert result.returncode != 0
    assert "2 processes were launched but Accelerate sees 1: on CPU set ACCELERATE_USE_CPU=1" in result.stderr


# ------------------------------------------------------------------------------------------------------ VAE
def test_train_vae_then_use_it(tmp_path):
    """examples/train_vae.py trains a small AutoencoderKL for a few steps and sets its latent scaling; the saved VAE
    then drives a tiny Transfusion run in latent space."""
    train_vae = load_script(VAE_SCRIPT)
    vae_dir = tmp_path / "vae"
    train_vae.main([*SHAPES, "--max_train_steps", "4", "--train_batch_size", "8", "--output_dir", str(vae_dir),
                    "--report_to", "none"])  # fmt: skip
    reset_accelerate()
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir)
    # 2x downsampling: the default keeps 16x16 latents of 32 px images.
    assert vae.config.latent_channels == 4 and len(vae.config.block_out_channels) == 2
    metrics = json.loads((vae_dir / "vae_metrics.json").read_text())
    assert vae.config.scaling_factor == pytest.approx(1 / metrics["latent_std"])
    assert vae.config.shift_factor == pytest.approx(metrics["latent_mean"])
    assert 0 < metrics["reconstruction_l1"] < 2 and metrics["num_eval_images"] == 12 and metrics["held_out"]
    assert (vae_dir / "reconstructions.png").is_file()

    out = tmp_path / "transfusion"
    run_main(out, *SHAPES, "--vae_name_or_path", str(vae_dir), "--max_train_steps", "2", "--checkpointing_steps", "0")
    pipe = TransfusionPipeline.from_pretrained(out)
    assert pipe.transformer.config.latent_channels == 4 and pipe.transformer.config.latent_size == 16
    # The tiny recipe's 2x2 pixel patches become 1x1 latent patches: the same 256 image positions.
    assert pipe.transformer.config.patch_size == 1
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red circle", num_inference_steps=2).images[0].size == (32, 32)
