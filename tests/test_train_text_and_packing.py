"""examples/train_transfusion.py with text-only data, sequence packing and the training hygiene of issue 11: the
held-out text LM loss, truncated captions counted, the logged loss averaged over micro-steps and processes, no KV cache
in the training forward, no weight decay on biases, norms and embeddings, LoRA refused without a pretrained LLM."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import FlowMatchEulerDiscreteScheduler

from script_loading import one_thread_and_fresh_accelerate  # noqa: F401 (autouse fixture)
from test_train_transfusion import SHAPES, TINY, read_log, run_main
from tiny_configs import BOI_TOKEN_ID, EOI_TOKEN_ID, IMAGE_TOKEN_ID, tiny_config
from transfusion_hf import TransfusionForMixedModal, training
from transfusion_hf.data.text import load_text_dataset, text_only_examples, text_only_rows
from transfusion_hf.modeling_transfusion import TransfusionOutput
from transfusion_hf.noising import TransfusionNoiser
from transfusion_hf.training import GradNormWindow, StepLosses, num_real_tokens, weight_decay_parameter_groups
from transfusion_hf.training.model_setup import load_model_preset

WORDS = "the quick brown fox jumps over a lazy dog while red circles and blue squares dance".split()


def write_text_file(path: Path, num: int = 40, max_words: int = 30) -> Path:
    """One document per line, of 3 to `max_words` words, and blank lines (which are dropped)."""
    generator = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(num):
        count = int(torch.randint(3, max_words + 1, (), generator=generator))
        lines.append(
            " ".join(WORDS[int(index)] for index in torch.randint(0, len(WORDS), (count,), generator=generator))
        )
        lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------------------------- text-only data
def test_load_text_dataset_from_local_files(tmp_path):
    text = load_text_dataset(str(write_text_file(tmp_path / "docs.txt", num=10)))
    assert text.column_names == ["text"] and len(text) == 10  # blank lines dropped
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": f"document {index}", "id": index}) + "\n" for index in range(5)))
    rows = load_text_dataset(data_files=[str(jsonl)], text_column="body")
    assert rows["text"] == [f"document {index}" for index in range(5)]
    with pytest.raises(ValueError, match=r"`text_column`='text' is not a column.*\['body', 'id'\]"):
        load_text_dataset(str(jsonl))
    with pytest.raises(ValueError, match="give files of one type"):
        load_text_dataset(data_files=[str(jsonl), str(tmp_path / "docs.txt")])


def test_text_only_examples_share_and_held_out_rows(tmp_path):
    dataset = load_text_dataset(str(write_text_file(tmp_path / "docs.txt", num=10)))
    assert text_only_rows(30, 0.25) == 10 and text_only_rows(30, 0.0) == 0
    examples, held_out = text_only_examples(dataset, num_image_rows=30, share=0.5, num_held_out=4, seed=1)
    assert len(examples) == 30 and len(held_out) == 4  # 6 training texts, cycled
    assert all(set(example) == {"text"} for example in examples)
    assert not {example["text"] for example in examples} & set(held_out)
    assert len({example["text"] for example in examples}) == 6
    with pytest.raises(ValueError, match="`text_only_share` must be in \\[0, 1\\), got 1.0"):
        text_only_examples(dataset, 30, 1.0)
    with pytest.raises(ValueError, match="has 10 non-empty rows: holding out 10 leaves none"):
        text_only_examples(dataset, 30, 0.5, num_held_out=10)


def text_run_flags(text: Path) -> list[str]:
    """24 shape rows and 8 text-only rows (a quarter of all rows), 6 texts held out, rows packed into 512 tokens."""
    return [*SHAPES[:-1], "24", "--text_dataset_name", str(text), "--text_only_share", "0.25",
            "--num_text_validation_rows", "6", "--max_sequence_length", "512", "--logging_steps", "1",
            "--checkpointing_steps", "0"]  # fmt: skip


def test_text_data_packing_and_accumulation_end_to_end(tmp_path):
    """Text-only rows mixed in, packed rows, 2 micro-steps per step: the run logs eval/text_lm_loss, which follows the
    weights; the data holds the asked share of text-only rows and the held-out texts."""
    text = write_text_file(tmp_path / "docs.txt")
    out = tmp_path / "run"
    run_main(out, *text_run_flags(text), "--gradient_accumulation_steps", "2", "--max_train_steps", "3")
    records = read_log(out)
    assert [record["step"] for record in records] == [1, 2, 3]
    for record in records:
        assert math.isfinite(record["loss"]) and math.isfinite(record["eval/text_lm_loss"])
        assert record["truncated_sequences"] == 0
    # The held-out loss follows the weights: it moves as training goes on.
    assert len({record["eval/text_lm_loss"] for record in records}) == 3

    # The run's data, built by the package function the script calls: a quarter of the rows are text-only.
    args = training.parse_args([*TINY, *text_run_flags(text), "--output_dir", str(out)])
    data = training.prepare_training_data(args, None, Accelerator(cpu=True))
    assert (len(data.examples), len(data.text_examples), len(data.held_out_texts)) == (24, 8, 6)
    assert not {example["text"] for example in data.text_examples} & set(data.held_out_texts)


def test_logged_loss_is_the_mean_of_the_micro_steps(tmp_path):
    """With 2 micro-steps per step, each logged loss is the mean of the losses of the step's two micro-batches. With
    a learning rate of 0 the weights never move, so a run of one micro-step per step over the same batches (the
    loader and the collator's draws do not depend on the accumulation) logs each micro-batch's loss."""
    text = write_text_file(tmp_path / "docs.txt")
    frozen = [*text_run_flags(text), "--learning_rate", "0"]
    run_main(tmp_path / "accumulated", *frozen, "--gradient_accumulation_steps", "2", "--max_train_steps", "3")
    run_main(tmp_path / "micro", *frozen, "--max_train_steps", "6")
    accumulated, micro = (read_log(tmp_path / name) for name in ("accumulated", "micro"))
    assert [record["step"] for record in accumulated] == [1, 2, 3]
    assert [record["step"] for record in micro] == [1, 2, 3, 4, 5, 6]
    assert len({record["loss"] for record in micro}) == 6  # six different batches
    assert len({record["eval/text_lm_loss"] for record in accumulated + micro}) == 1  # the weights did not move
    for record, first, second in zip(accumulated, micro[::2], micro[1::2]):
        assert record["loss"] == pytest.approx((first["loss"] + second["loss"]) / 2, rel=1e-6)
        assert record["lm_loss"] == pytest.approx((first["lm_loss"] + second["lm_loss"]) / 2, rel=1e-6)


def test_captions_longer_than_the_context_are_truncated_and_counted(tmp_path):
    """A model whose context is shorter than some captions trains anyway; the log counts the cut sequences."""
    preset = load_model_preset("tiny")
    preset["text_config"]["max_position_embeddings"] = 24  # 8x8 pixels, patch 2: 16 patches + 4 specials + 4 text
    (tmp_path / "short.json").write_text(json.dumps(preset))
    out = tmp_path / "run"
    run_main(out, *SHAPES, "--model_config", str(tmp_path / "short.json"), "--resolution", "8",
             "--max_train_steps", "2", "--logging_steps", "1", "--checkpointing_steps", "0")  # fmt: skip
    records = read_log(out)
    assert [record["step"] for record in records] == [1, 2]
    assert sum(record["truncated_sequences"] for record in records) > 0


# ------------------------------------------------------------------------------------------------------ hygiene
def test_training_forward_builds_no_kv_cache():
    model = TransfusionForMixedModal(tiny_config())
    input_ids = torch.tensor([[1, 5, 6, 7, 2]])
    assert model(input_ids=input_ids, labels=input_ids).cache is not None  # the backbone's default
    assert training.training_forward(model, {"input_ids": input_ids, "labels": input_ids}).cache is None


def test_lora_without_a_pretrained_model_is_refused():
    with pytest.raises(ValueError, match="--lora_rank=4 needs --text_model_name_or_path"):
        training.parse_args([*SHAPES, *TINY, "--lora_rank", "4"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--text_only_share", "0.3"], "--text_only_share=0.3 needs text-only data"),
        (["--text_data_files", "a.txt", "--text_only_share", "1.0"], r"--text_only_share must be in \[0, 1\)"),
        (["--max_sequence_length", "0"], "--max_sequence_length must be positive, got 0"),
        (["--text_data_files", "a.txt", "--num_text_validation_rows", "-1"], "--num_text_validation_rows must be"),
    ],
)
def test_text_and_packing_flags_are_checked(flags, message):
    with pytest.raises(ValueError, match=message):
        training.parse_args([*SHAPES, *TINY, *flags])
    if "--text_data_files" in flags:  # the default share with text data
        assert training.parse_args([*SHAPES, *TINY, "--text_data_files", "a.txt"]).text_only_share == 0.5


def decay_split(model: torch.nn.Module) -> tuple[set[str], set[str]]:
    groups = weight_decay_parameter_groups(model, 0.1)
    assert [group["weight_decay"] for group in groups] == [0.1, 0.0]
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return tuple({names[id(parameter)] for parameter in group["params"]} for group in groups)


@pytest.mark.parametrize("patch_encoder", ["linear", "unet"])
def test_no_weight_decay_on_biases_norms_and_embeddings(patch_encoder):
    model = TransfusionForMixedModal(tiny_config(patch_encoder=patch_encoder))
    decayed, kept = decay_split(model)
    assert decayed | kept == {name for name, _ in model.named_parameters()} and not decayed & kept
    for name in kept:
        assert name.endswith("bias") or "norm" in name or "embed_tokens" in name or "position_embedding" in name, name
    for name in decayed:
        assert name.endswith("weight") and "norm" not in name and "embed_tokens" not in name, name
    assert "model.layers.0.input_layernorm.weight" in kept and "model.norm.weight" in kept
    assert "model.embed_tokens.weight" in kept and "model.layers.0.self_attn.q_proj.weight" in decayed
    if patch_encoder == "unet":  # GroupNorm, named norm1 / norm_out (transformers' name patterns miss them)
        assert "image_encoder.levels.0.0.norm1.weight" in kept and "image_decoder.norm_out.weight" in kept
        assert "image_encoder.levels.0.0.conv1.weight" in decayed
    else:
        assert "patch_position_embedding.weight" in kept and "image_encoder.proj.weight" in decayed


def test_weight_decay_groups_of_a_lora_model():
    """Only trainable parameters: LoRA matrices decay; the new token rows (embedding rows) and biases do not."""
    args = argparse.Namespace(lora_rank=4, lora_alpha=None)
    new_token_ids = [BOI_TOKEN_ID, EOI_TOKEN_ID, IMAGE_TOKEN_ID]
    model = training.apply_lora(args, TransfusionForMixedModal(tiny_config()), new_token_ids)
    decayed, kept = decay_split(model)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert decayed | kept == trainable
    assert any("lora_A" in name for name in decayed) and not any("lora_" in name for name in kept)
    assert any("trainable_tokens_delta" in name for name in kept)
    assert not any("trainable_tokens_delta" in name for name in decayed)


def test_num_real_tokens():
    padded = {"input_ids": torch.tensor([[1, 5, 2, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0]])}
    packed = {
        "input_ids": torch.tensor([[1, 5, 2, 1, 2, 0, 0]]),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1]]),
    }
    assert num_real_tokens(padded, pad_token_id=0) == 3 and num_real_tokens(packed, pad_token_id=0) == 5


def output(loss: float, diffusion: float | None = None) -> TransfusionOutput:
    return TransfusionOutput(
        loss=torch.tensor(loss),
        lm_loss=torch.tensor(loss / 2),
        diffusion_loss=None if diffusion is None else torch.tensor(diffusion),
    )


def test_step_losses_average_the_micro_steps():
    losses = StepLosses()
    losses.add(output(1.0, diffusion=4.0))
    losses.add(output(3.0))  # a text-only micro-step: no diffusion loss
    assert losses.compute() == {"loss": 2.0, "lm_loss": 1.0, "diffusion_loss": 4.0}
    assert losses.compute() == {}  # reset


def test_grad_norm_window_means_the_norms_and_counts_the_clipped_steps():
    norms = GradNormWindow(max_grad_norm=1.0)
    norms.add(torch.tensor(0.5))
    norms.add(None)  # a backend that reports no norm (DeepSpeed) adds nothing
    norms.add(torch.tensor(3.5))
    assert norms.compute() == {"grad_norm": 2.0, "grad_clipped_fraction": 0.5}
    assert norms.compute() == {}  # reset


def average_over_two_processes():
    """Run by `debug_launcher` in two real processes (gloo): process 0 had micro-steps 1 and 3, process 1 had 5 and 7
    (with a diffusion loss only on process 1): every process gets the means over both."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    losses = StepLosses()
    if accelerator.process_index == 0:
        losses.add(output(1.0))
        losses.add(output(3.0))
    else:
        losses.add(output(5.0, diffusion=2.0))
        losses.add(output(7.0, diffusion=4.0))
    assert losses.compute(accelerator) == {"loss": 4.0, "lm_loss": 2.0, "diffusion_loss": 3.0}


def test_step_losses_average_over_processes():
    from accelerate import debug_launcher

    AcceleratorState._reset_state(reset_partial_state=True)  # the processes are forked from this one
    debug_launcher(average_over_two_processes, num_processes=2)


def test_text_validation_batches_are_text_only_and_padded():
    from transfusion_hf.processing_transfusion import TransfusionProcessor
    from transfusion_hf.tokenization_transfusion import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer([" ".join(WORDS)] * 4, vocab_size=300)
    processor = TransfusionProcessor(tokenizer, image_size=4, num_image_tokens=4)
    noiser = TransfusionNoiser(FlowMatchEulerDiscreteScheduler(), "flow_prediction")
    args = argparse.Namespace(train_batch_size=2)
    batches = training.text_validation_batches(["a b", "the fox", "red dog"], processor, noiser, 64, args)
    assert [batch["input_ids"].shape[0] for batch in batches] == [2, 1]
    assert all(set(batch) == {"input_ids", "attention_mask", "labels"} for batch in batches)
