"""The field's metrics (`evaluation.field_metrics`) on known cases, offline: small random feature extractors and a tiny
random CLIP saved locally; the standard weights' error path for real; examples/evaluate.py and the training script's
`--validation_metrics` end to end on tiny models."""

from __future__ import annotations

import json
import string
import sys
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import PIL.Image
import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from pipeline_components import CAPTIONS, get_pipeline, get_tokenizer, get_transformer
from script_loading import load_script, one_thread_and_fresh_accelerate, reset_accelerate  # noqa: F401 (fixture)
from transfusion_hf.data.shapes import draw_shape, sample_specs
from transfusion_hf.evaluation.feature_extractors import (
    ShapesExtractorTrainingConfig,
    load_feature_extractor,
    load_shapes_feature_extractor,
    save_feature_extractor,
    shapes_extractor_cache_path,
    train_shapes_feature_extractor,
)
from transfusion_hf.evaluation.field_metrics import (
    FieldMetrics,
    caption_scores,
    evaluate_pipeline,
    metrics_table,
    parse_metric_names,
    text_perplexity,
)
from transfusion_hf.evaluation.shapes_benchmark import ShapesEvaluation
from transfusion_hf.processing_transfusion import TransfusionProcessor, pad_sequences

ROOT = Path(__file__).resolve().parents[1]
evaluate_script = load_script(ROOT / "examples" / "evaluate.py", "evaluate_example")
train_script = load_script(ROOT / "examples" / "train_transfusion.py", "train_transfusion_for_metrics")


def random_extractor(seed: int = 0) -> torch.nn.Module:
    """A small random CNN: images (N, 3, H, W) in [0, 1] -> 32 features, He-initialised (features of order 1)."""
    torch.manual_seed(seed)
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
    )
    for layer in module:
        if isinstance(layer, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    return module.eval()


def shape_images(count: int, seed: int = 0) -> list[PIL.Image.Image]:
    return [draw_shape(spec, jitter) for spec, jitter in sample_specs("all", count, seed=seed)]


def noised(images: list[PIL.Image.Image], sigma: float, seed: int = 0) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(image, dtype=np.float32) + rng.normal(0, sigma, (*image.size[::-1], 3)) for image in images]
    return [PIL.Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)) for array in arrays]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random `CLIPModel` (hidden 16, one layer, 32 px images) and its `CLIPProcessor`, the tokenizer's vocabulary
    the lower-case letters and digits (no merges), saved with `save_pretrained`."""
    folder = tmp_path_factory.mktemp("tiny_clip")
    symbols = string.ascii_lowercase + string.digits
    vocab = {token: index for index, token in enumerate(["<|startoftext|>", "<|endoftext|>", *symbols])}
    vocab.update({f"{symbol}</w>": len(vocab) + index for index, symbol in enumerate(symbols)})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def extractor_file(tmp_path_factory) -> Path:
    return save_feature_extractor(random_extractor(), tmp_path_factory.mktemp("extractor") / "features.pt2")


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """No network and an empty Hub cache: what a machine without the standard weights sees."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


# ------------------------------------------------------------------------------------------------------ FID / KID
def test_fid_and_kid_are_zero_for_identical_sets_and_grow_with_noise():
    metrics = FieldMetrics("fid,kid", random_extractor())
    real = shape_images(64)
    identical = metrics.image_scores(real, real)
    assert abs(identical["fid"]) < 1e-3 and abs(identical["kid_mean"]) < 0.05, identical
    slightly, strongly = (metrics.image_scores(real, noised(real, sigma)) for sigma in (8, 40))
    assert strongly["fid"] > slightly["fid"] > 1e3 * abs(identical["fid"]), (identical, slightly, strongly)
    assert strongly["kid_mean"] > slightly["kid_mean"] > identical["kid_mean"], (slightly, strongly)
    # Deterministic: KID draws its subsets from a fixed seed.
    assert metrics.image_scores(real, noised(real, 40)) == strongly


def test_a_saved_feature_extractor_gives_the_same_scores_at_any_image_size(tmp_path, extractor_file):
    real, fake = shape_images(32), noised(shape_images(32, seed=1), 20)
    from_module = FieldMetrics("fid", random_extractor()).image_scores(real, fake)
    from_file = FieldMetrics("fid", str(extractor_file)).image_scores(real, fake)
    assert from_file["fid"] == pytest.approx(from_module["fid"], rel=1e-4)
    # Images of another size are resized to the size the module was exported for.
    loaded = load_feature_extractor(str(extractor_file))
    assert loaded(torch.rand(3, 3, 64, 64)).shape == (3, loaded.num_features)
    (tmp_path / "bad.pt2").write_bytes(b"not a program")
    for path in (tmp_path / "missing.pt2", tmp_path / "bad.pt2"):
        with pytest.raises(ValueError, match="fid_feature_extractor"):
            FieldMetrics("fid", str(path))


def test_the_standard_inception_missing_is_one_error_naming_the_flag(offline_hub, monkeypatch, tmp_path):
    # No torch-fidelity here, and no download possible: the error names what to pass instead.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ValueError, match="--fid_feature_extractor shapes") as error:
        FieldMetrics("fid", "inception")
    assert "\n" not in str(error.value)


def test_shapes_feature_extractor_reads_every_attribute_and_is_cached(tmp_path):
    config = ShapesExtractorTrainingConfig(num_images=2_400, epochs=2, num_test_images=400)
    extractor = load_shapes_feature_extractor(tmp_path, config)
    assert shapes_extractor_cache_path(tmp_path, config).is_file()
    images = torch.from_numpy(np.stack([np.asarray(image) for image in shape_images(400, seed=9)]))
    images = images.permute(0, 3, 1, 2).float() / 255
    cached = load_shapes_feature_extractor(tmp_path, config)
    assert torch.equal(cached(images), extractor(images))
    # The features of real renders have a root mean square of 1 (the scale KID's kernel expects).
    assert extractor(images).square().mean().sqrt().item() == pytest.approx(1.0, abs=0.2)
    metrics = FieldMetrics("fid", extractor)
    real = shape_images(96)
    other_renders = metrics.image_scores(real, shape_images(96, seed=1))["fid"]
    blurred = metrics.image_scores(real, [image.resize((16, 16)).resize((32, 32)) for image in real])["fid"]
    black = metrics.image_scores(real, [PIL.Image.new("RGB", (32, 32))] * 96)["fid"]
    assert other_renders < blurred < black, (other_renders, blurred, black)


# -------------------------------------------------------------------------------------------------------- CLIP
def test_clip_score_is_100_cosine_of_the_clip_embeddings(tiny_clip):
    images, texts = shape_images(6), [f"a shape number {index}" for index in range(6)]
    score = FieldMetrics("clip", clip_model=str(tiny_clip)).clip_scores(images, texts, batch_size=4)
    model, processor = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    pixels = [torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in images]
    with torch.no_grad():
        output = model(**processor(text=texts, images=pixels, return_tensors="pt", padding=True))
    cosine = output.logits_per_image.diagonal() / model.logit_scale.exp()
    assert score == pytest.approx(max(100 * cosine.mean().item(), 0.0), abs=1e-3)


def test_the_default_clip_offline_is_one_error_naming_the_flag(offline_hub):
    with pytest.raises(ValueError, match="--clip_model PATH") as error:
        FieldMetrics("clip")
    assert "openai/clip-vit-base-patch32" in str(error.value) and "\n" not in str(error.value)


# ----------------------------------------------------------------------------------------------------- captions
def test_bleu_and_cider_known_cases():
    references = ["a small red circle in the top left", "a large blue square in the center", "a green triangle"]
    references += ["two yellow dots on a black background"]
    same = caption_scores(references, references)
    assert [same[f"bleu_{n}"] for n in (1, 2, 3)] == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)
    # BLEU-4 and CIDEr's 4-gram part have nothing to match in a caption of three words ("a green triangle").
    assert same["bleu_4"] < 1 and same["cider"] == pytest.approx((3 * 10 + 7.5) / 4, abs=1e-6)
    # Case and punctuation do not count (COCO's tokenisation); several references per image are accepted.
    shouted = caption_scores([text.upper() + "." for text in references], [[text, "x"] for text in references])
    assert shouted["bleu_1"] == pytest.approx(1.0, abs=1e-6)
    unrelated = caption_scores(["zebra"] * 4, references)
    assert max(unrelated[f"bleu_{n}"] for n in (1, 2, 3, 4)) < 1e-6 and unrelated["cider"] == 0.0
    with pytest.raises(ValueError, match="one reference per caption"):
        caption_scores(["a"], references)


def test_identical_captions_of_four_words_or_more_score_the_maximum():
    references = ["a small red circle in the top left", "a large blue square in the center"]
    references += ["a large green triangle in the bottom right", "a small white square in the top right"]
    same = caption_scores(references, references)
    assert [same[f"bleu_{n}"] for n in (1, 2, 3, 4)] == pytest.approx([1.0] * 4, abs=1e-6)
    assert same["cider"] == pytest.approx(10.0, abs=1e-6)


# --------------------------------------------------------------------------------------------------- perplexity
def test_perplexity_is_the_exp_of_the_models_mean_lm_loss():
    tokenizer = get_tokenizer()
    model = get_transformer(tokenizer, latent_channels=3)
    processor = TransfusionProcessor(tokenizer, image_size=4, num_image_tokens=4)
    texts = CAPTIONS + ["a", "a much longer caption about a red circle and a blue square in the top left corner"]
    result = text_perplexity(model, processor, texts, batch_size=3)
    # The model's own loss, one text at a time (no padding), weighted by the tokens each predicts.
    losses, counts = [], []
    for text in texts:
        input_ids, attention_mask = pad_sequences([processor.encode_parts([text])], tokenizer.pad_token_id)
        with torch.no_grad():
            output = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids, use_cache=False)
        losses.append(float(output.lm_loss))
        counts.append(input_ids.shape[1] - 1)
    mean_loss = float(np.average(losses, weights=counts))
    assert result["num_text_tokens"] == sum(counts)
    assert result["perplexity"] == pytest.approx(float(np.exp(mean_loss)), rel=1e-4)
    assert result["lm_loss"] == pytest.approx(mean_loss, abs=1e-4)


def test_metric_names_are_checked():
    assert parse_metric_names(" FID, caption,fid ") == ("fid", "caption")
    with pytest.raises(ValueError, match="--validation_metrics='bleu'"):
        parse_metric_names("fid,bleu", "--validation_metrics")


# ------------------------------------------------------------------------------------------------- end to end
def test_evaluate_pipeline_scores_every_metric(tiny_clip):
    pipeline = get_pipeline(pixel_space=True)
    real = shape_images(8)
    real = [image.resize((pipeline.image_size,) * 2) for image in real]
    captions = [CAPTIONS[index % len(CAPTIONS)] for index in range(8)]
    metrics = FieldMetrics("fid,kid,clip,caption,perplexity", random_extractor(), str(tiny_clip))
    evaluation = evaluate_pipeline(pipeline, captions, real, metrics, num_inference_steps=2, max_new_tokens=4)
    expected = {"fid", "kid_mean", "kid_std", "clip_score", "clip_score_real", "cider", "perplexity", "lm_loss"}
    assert expected | {f"bleu_{n}" for n in (1, 2, 3, 4)} <= set(evaluation.metrics)
    assert all(np.isfinite(evaluation.metrics[name]) for name in expected)
    assert len(evaluation.images) == len(evaluation.predicted_captions) == 8
    table = metrics_table(evaluation.metrics, "tiny")
    assert table.startswith("## tiny") and "| fid |" in table and "| cider |" in table


def test_evaluate_script_writes_the_report(tmp_path, extractor_file, tiny_clip):
    pipeline_dir = tmp_path / "pipeline"
    get_pipeline(pixel_space=True).save_pretrained(pipeline_dir)
    out = tmp_path / "evaluation"
    report = evaluate_script.main(
        ["--pretrained_model_name_or_path", str(pipeline_dir), "--dataset", "shapes", "--dataset_split", "held_out",
         "--shapes_num_samples", "32", "--num_samples", "6", "--fid_feature_extractor", str(extractor_file),
         "--clip_model", str(tiny_clip), "--num_inference_steps", "2", "--max_new_tokens", "4",
         "--output_dir", str(out)]
    )  # fmt: skip
    assert sorted(path.name for path in out.iterdir()) == [
        "captions.jsonl",
        "metrics.json",
        "metrics.md",
        "samples.png",
    ]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(report)) and saved["num_real_images"] == 6
    assert saved["settings"]["dataset_split"] == "held_out" and np.isfinite(saved["fid"])
    assert len((out / "captions.jsonl").read_text().splitlines()) == 6


def test_evaluate_script_scores_interleaved_documents(tmp_path, extractor_file):
    """`--interleaved`: documents spread over the data set, each image captioned by the text before it, one per
    document in turn (the documents are `[caption, source, "instruction: caption", target]`, so 3 documents give 6
    captioned images)."""
    from transfusion_hf.data.shapes_edit import load_shapes_edit_documents

    documents = load_shapes_edit_documents(num_samples=3, with_captions=True)
    (tmp_path / "docs").mkdir()
    documents.to_parquet(str(tmp_path / "docs" / "train.parquet"))
    pipeline_dir = tmp_path / "pipeline"
    get_pipeline(pixel_space=True).save_pretrained(pipeline_dir)
    out = tmp_path / "evaluation"
    report = evaluate_script.main(
        ["--pretrained_model_name_or_path", str(pipeline_dir), "--dataset_name", str(tmp_path / "docs"),
         "--interleaved", "--num_samples", "8", "--metrics", "fid,caption", "--fid_feature_extractor",
         str(extractor_file), "--num_inference_steps", "2", "--max_new_tokens", "4", "--output_dir", str(out)]
    )  # fmt: skip
    assert report["num_real_images"] == 6 and np.isfinite(report["fid"])
    references = [json.loads(line)["reference"] for line in (out / "captions.jsonl").read_text().splitlines()]
    # One image per document in turn: every document's first captioned image, then the second ones.
    per_document = [[text for text in texts if text is not None] for texts in documents["texts"]]
    assert references == [text for turn in zip(*per_document) for text in turn]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--interleaved"], "--interleaved does not support --dataset_name='shapes'"),
        (["--metrics", "fid,bleu"], "--metrics='bleu'"),
        (["--num_samples", "1"], "--num_samples must be >= 2"),
        (["--dataset_split", "test"], "`dataset_split`='test'"),
        (["--guidance_scale", "-1"], "--guidance_scale"),
    ],
)
def test_evaluate_script_refuses_bad_flags_before_loading_anything(flags, message):
    with pytest.raises(ValueError, match=message):
        evaluate_script.parse_args(["--pipeline", "does-not-matter", "--dataset", "shapes", *flags])


@pytest.mark.parametrize("script", ["evaluate", "train_vae"])
def test_square_only_scripts_do_not_take_aspect_ratio_buckets(script, capsys):
    """The evaluation and the VAE work at the square --resolution: they refuse --aspect_ratio_buckets rather than
    accept and ignore it (its help spoke of the training recipe's steps)."""
    module = evaluate_script if script == "evaluate" else load_script(ROOT / "examples" / "train_vae.py")
    required = ["--pipeline", "p"] if script == "evaluate" else []
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args([*required, "--dataset", "shapes", "--aspect_ratio_buckets", "32x32", "--output_dir", "o"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --aspect_ratio_buckets" in capsys.readouterr().err


def test_validation_metrics_are_logged_during_training(tmp_path, extractor_file):
    out = tmp_path / "run"
    try:
        train_script.main(
            ["--model_config", "tiny", "--train_batch_size", "4", "--report_to", "none", "--num_inference_steps", "2",
             "--dataset_name", "shapes", "--shapes_num_samples", "64", "--max_train_steps", "4",
             "--validation_steps", "2", "--checkpointing_steps", "0", "--output_dir", str(out),
             "--validation_metrics", "fid,kid,caption,perplexity", "--fid_feature_extractor", str(extractor_file),
             "--num_validation_metric_samples", "8"]
        )  # fmt: skip
    finally:
        reset_accelerate()
    records = [json.loads(line) for line in (out / "logs" / "validation_log.jsonl").read_text().splitlines()]
    field = [record for record in records if "eval/fid" in record]
    assert [record["step"] for record in field] == [2, 4]
    assert {"eval/kid_mean", "eval/bleu_4", "eval/cider", "eval/perplexity"} <= set(field[0])
    assert all(np.isfinite(value) for record in field for value in record.values())


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--validation_metrics", "fid,nope"], "--validation_metrics='nope'"),
        (["--validation_metrics", "fid", "--validation_steps", "0"], "--validation_steps is 0"),
        (["--validation_metrics", "caption", "--num_validation_metric_samples", "65"], "num_validation_metric"),
        (["--validation_metrics", "clip"], "--clip_model PATH"),
    ],
)
def test_validation_metric_flags_are_checked_before_any_data(flags, message, offline_hub):
    from transfusion_hf.training import parse_args

    with pytest.raises(ValueError, match=message):
        parse_args(["--dataset_name", "shapes", "--model_config", "tiny", *flags])


def test_field_metrics_benchmark_quick(tmp_path):
    bench = load_script(ROOT / "benchmarks" / "bench_field_metrics.py", "bench_field_metrics")
    result = bench.main(["--quick", "--output", str(tmp_path / "calibration.json")])
    scores = result["scores"]
    assert json.loads((tmp_path / "calibration.json").read_text())["num_images"] == 16
    assert scores["black images"]["fid"] > scores["other renders of the held-out captions"]["fid"]


def test_field_metrics_benchmark_glyphs_world(tmp_path):
    """`--world glyphs` writes a held-out folder `examples/evaluate.py` reads (data set captions) and the judge's
    features as a `.pt2`; the judge is seeded untrained (the bench loads a judge file it finds), so only the plumbing
    and the ordering of the scale are checked, not the judge's accuracy."""
    bench = load_script(ROOT / "benchmarks" / "bench_field_metrics.py", "bench_field_metrics_glyphs")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_real_folders import FolderJudge

    torch.manual_seed(0)
    judge = FolderJudge(len(bench.GlyphWorld.classes))
    torch.save({"state_dict": judge.state_dict(), "accuracy": 0.0}, tmp_path / "glyphs_judge.pt")
    result = bench.main(["--world", "glyphs", "--num_images", "20", "--work_dir", str(tmp_path),
                         "--output", str(tmp_path / "glyphs.json")])  # fmt: skip
    folder = Path(result["held_out_folder"])
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 20 and all(line["text"].endswith("background") for line in lines)
    assert PIL.Image.open(folder / lines[0]["file_name"]).size == (32, 32)
    assert Path(result["feature_extractor"]).is_file()
    scores = result["scores"]
    assert scores["black images"]["fid"] > scores["other held-out images"]["fid"]


def test_the_shapes_demo_reports_fid_and_cider_next_to_the_judge(tmp_path, monkeypatch):
    # The cache the demo's `shapes` extractor reads, seeded with a quickly trained one (the default takes ~6 s).
    monkeypatch.setenv("TRANSFUSION_HF_CACHE", str(tmp_path / "cache"))
    quick, _ = train_shapes_feature_extractor(ShapesExtractorTrainingConfig(num_images=480, epochs=1))
    shapes_extractor_cache_path().parent.mkdir(parents=True)
    torch.save({"state_dict": quick.state_dict()}, shapes_extractor_cache_path())
    demo = load_script(ROOT / "examples" / "shapes_demo.py", "shapes_demo_for_metrics")
    drawn, references = shape_images(8), [spec.caption for spec, _ in sample_specs("all", 8, seed=0)]
    evaluation = ShapesEvaluation(
        {}, images=noised(drawn, 30), caption_images=drawn, reference_captions=references,
        predicted_captions=references[:4] + ["a shape"] * 4,
    )  # fmt: skip
    scores = demo.field_metrics(evaluation)
    assert set(scores) == {"fid", "kid_mean", "kid_std", "caption_bleu_4", "caption_cider"}
    assert scores["fid"] > 0 and 0 < scores["caption_cider"] < 10
