"""Image-conditioned training end to end: a tiny model trained on shapes, saved, then trained on the built-in editing
task (`--dataset shapes_edit --pretrained_model_name_or_path`), whose loss covers the noised targets only; and the
refusals of bad flags before any data is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch

from script_loading import (
    load_script,
    one_thread_and_fresh_accelerate,  # noqa: F401 (autouse fixture)
    reset_accelerate,
)
from transfusion_hf import training
from transfusion_hf.pipeline_transfusion import TransfusionPipeline

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--recipe", "tiny", "--train_batch_size", "4", "--report_to", "none", "--num_inference_steps", "2"]
QUICK = ["--validation_steps", "0", "--checkpointing_steps", "0", "--logging_steps", "1"]
SHAPES = ["--dataset_name", "shapes", "--shapes_num_samples", "16"]
EDITS = ["--dataset", "shapes_edit", "--shapes_num_samples", "16"]

train_transfusion = load_script(ROOT / "examples" / "train_transfusion.py")


def run_main(output_dir: Path, *args: str) -> Path:
    try:
        return train_transfusion.main([*TINY, *QUICK, "--output_dir", str(output_dir), *args])
    finally:
        reset_accelerate()


@pytest.fixture(scope="module")
def base_pipeline(tmp_path_factory) -> Path:
    """A tiny model trained on shapes for 2 steps and saved (the starting point of the editing runs)."""
    out = tmp_path_factory.mktemp("base") / "run"
    try:
        # 4x4 patches: 64 positions an image, so that a source and a target fit the tiny recipe's 512.
        run_main(out, *SHAPES, "--patch_size", "4", "--max_train_steps", "2")
    finally:
        reset_accelerate()
    return out


def test_editing_from_a_saved_pipeline_trains_on_the_targets_only(tmp_path, base_pipeline):
    """At learning rate 0 the run keeps the saved transformer's weights (it starts from them); its batches hold clean
    sources (t = 0, no target) before noised targets, and the diffusion loss of a batch built by the run's own parts
    (data, collator, model) is the mean over the targets only. Validation edits a few training sources."""
    out = tmp_path / "edit"
    run_main(out, *EDITS, "--pretrained_model_name_or_path", str(base_pipeline), "--max_train_steps", "2",
             "--learning_rate", "0", "--validation_steps", "2")  # fmt: skip
    base = TransfusionPipeline.from_pretrained(base_pipeline)
    saved = TransfusionPipeline.from_pretrained(out)  # the editing run saves a working pipeline
    for name, tensor in saved.transformer.state_dict().items():
        torch.testing.assert_close(tensor, base.transformer.state_dict()[name], rtol=0, atol=0, msg=name)
    assert len(saved.tokenizer) == len(base.tokenizer)
    assert (out / "validation" / "step-000002.png").is_file()

    # A batch of the run's data from the package's parts.
    args = training.parse_args([*TINY, *QUICK, *EDITS, "--pretrained_model_name_or_path", str(base_pipeline),
                                "--output_dir", str(tmp_path / "again")])  # fmt: skip
    accelerator = training.build_accelerator(args)
    data = training.prepare_training_data(args, None, accelerator)
    processor = base.processor
    collator = training.build_collator(
        args, processor, training.build_noiser(args, base.transformer.config.prediction_type), 512, accelerator,
        patch_size=base.transformer.config.patch_size,
    )  # fmt: skip
    batch = collator([data.examples[index] for index in range(4)])
    targets, timesteps = batch["diffusion_targets"], batch["timesteps"]
    # Each row is [bos] <boi> source <eoi> instruction <boi> target <eoi> [eos]: sources clean, targets noised.
    assert [target is None for target in targets] == [True, False] * 4
    assert (timesteps[0::2] == 0).all() and (timesteps[1::2] > 0).any()
    model = base.transformer.train()
    with torch.no_grad():
        output = model(**batch)
    per_target = [(output.diffusion_predictions[i] - targets[i]).pow(2).mean() for i in range(1, 8, 2)]
    torch.testing.assert_close(output.diffusion_loss, torch.stack(per_target).mean())
    records = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2]
    assert all(record["diffusion_loss"] > 0 for record in records)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--pretrained_model_name_or_path", "/no/such/folder"],
            "--pretrained_model_name_or_path='/no/such/folder' is",
        ),
        (["--dataset", "shapes_edit", "--patch_size", "4", "--random_flip"], "does not support --random_flip"),
        (
            ["--dataset", "shapes_edit", "--patch_size", "4", "--aspect_ratio_buckets", "32x32,32x48"],
            "does not support --aspect_ratio",
        ),
        (["--dataset", "shapes_edit"], "a source and a target image take 518 positions"),
    ],
)
def test_bad_flags_are_refused_before_any_data(flags, message):
    argv = [*TINY, *flags] if "--dataset" in flags else [*TINY, *SHAPES, *flags]
    with pytest.raises(ValueError, match=message):
        training.parse_args(argv)


def test_a_folder_that_is_not_a_transfusion_pipeline_is_refused(tmp_path, base_pipeline):
    flag = "--pretrained_model_name_or_path"
    with pytest.raises(ValueError, match="has no model_index.json"):
        training.parse_args([*TINY, *EDITS, flag, str(tmp_path)])
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="is a StableDiffusionPipeline folder, not a TransfusionPipeline"):
        training.parse_args([*TINY, *EDITS, flag, str(other)])
    with pytest.raises(ValueError, match="brings its own model, tokenizer and VAE: drop --patch_size"):
        training.parse_args([*TINY, *EDITS, flag, str(base_pipeline), "--patch_size", "2"])
    with pytest.raises(ValueError, match="--resolution=64 differs from the 32 px"):
        training.parse_args([*TINY, *EDITS, flag, str(base_pipeline), "--resolution", "64"])
    assert training.parse_args([*TINY, *EDITS, flag, str(base_pipeline)]).pretrained_model_name_or_path


def test_shapes_demo_edit_task_evaluates_a_saved_pipeline(tmp_path, base_pipeline):
    import shutil

    shapes_demo = load_script(ROOT / "examples" / "shapes_demo.py")
    assert shapes_demo.EDIT_DEMO_FLAGS[:2] == ["--dataset", "shapes_edit"]
    out = tmp_path / "demo"
    shutil.copytree(base_pipeline, out)
    argv = ["--task", "edit", "--skip_training", "--output_dir", str(out), "--num_edits", "4"]
    metrics = shapes_demo.main([*argv, "--eval_inference_steps", "2", "--eval_device", "cpu", "--patch_size", "4"])
    assert {"edit_accuracy", "edited_attribute_accuracy", "kept_attributes_accuracy"} <= set(metrics)
    assert json.loads((out / "metrics.json").read_text())["edit_accuracy"] == metrics["edit_accuracy"]
    assert (out / "edits.png").is_file()


def test_shapes_demo_edit_documents_task_writes_trains_and_scores(tmp_path, monkeypatch):
    """`--task edit_documents`: the edits written once as a parquet folder of documents, trained with --interleaved
    in the script's own process, scored as `--task edit` (8 documents and 1 step here instead of 20,000 and 1,700)."""
    shapes_demo = load_script(ROOT / "examples" / "shapes_demo.py", "shapes_demo_documents")
    monkeypatch.setattr(shapes_demo, "EDIT_DOCUMENTS_ROWS", 8)
    out = tmp_path / "demo"
    metrics = shapes_demo.main(
        ["--task", "edit_documents", "--output_dir", str(out), "--num_edits", "4", "--eval_inference_steps", "2",
         "--eval_device", "cpu", *TINY, *QUICK, "--patch_size", "4", "--max_train_steps", "1"]
    )  # fmt: skip
    assert len(datasets.load_dataset(str(out / "documents" / "seed_0"), split="train")) == 8
    assert metrics["global_step"] == 1 and "edit_accuracy" in metrics
    assert (out / "edits.png").is_file() and (out / "transformer" / "config.json").is_file()
    # A bad flag fails before any document is written; another seed writes (and trains on) its own documents.
    with pytest.raises(ValueError, match="--clean_image_probability"):
        shapes_demo.main(["--task", "edit_documents", "--output_dir", str(tmp_path / "bad"),
                          "--clean_image_probability", "2"])  # fmt: skip
    assert not (tmp_path / "bad").exists()
    assert shapes_demo.edit_documents_folder(out, 1) != shapes_demo.edit_documents_folder(out, 0)
