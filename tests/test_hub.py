"""Ship to the Hub: push models and pipelines (with their model card) and load them back by repo id.

Everything runs against `hub_server.LocalHub` (a real HTTP server on 127.0.0.1) through the unmodified
`huggingface_hub` / `transformers` / `diffusers` clients, configured by the `local_hub` fixture.
"""

from __future__ import annotations

import ast
import configparser
import json
import os
import subprocess
import sys
import textwrap
from importlib import resources
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
from safetensors.torch import save_file
from transformers import AutoModel

import transfusion_hf
from hub_fixtures import local_hub  # noqa: F401
from pipeline_components import (
    NUM_PATCHES,
    get_generator,
    get_pipeline,
    get_tokenizer,
    get_transformer,
    one_thread,  # noqa: F401 (autouse fixture)
)
from test_remote_code import MODEL_CODE, PIPELINE_CODE  # the code saved beside the weights
from transfusion_hf import TransfusionForMixedModal
from transfusion_hf.hub import (
    PICKLE_SUFFIXES,
    TEMPLATE_PATH,
    build_model_card,
    card_files,
    push_pipeline_to_hub,
    upload_to_hub,
)
from transfusion_hf.hub import main as hub_cli
from transfusion_hf.pipeline_transfusion import TransfusionPipeline

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a small red circle in the top left"
STEPS = 2
# Files of a pushed pipeline repo whose output dir holds run artifacts (.gitattributes: the Hub's initial commit).
PIPELINE_FILES = {
    ".gitattributes",
    "README.md",
    "samples.png",
    "model_index.json",
    *PIPELINE_CODE,
    "scheduler/scheduler_config.json",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "transformer/config.json",
    "transformer/generation_config.json",
    "transformer/model.safetensors",
    *(f"transformer/{name}" for name in MODEL_CODE),
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
}


@pytest.fixture
def hub(local_hub):  # noqa: F811 (the fixture imported above)
    """The `local_hub` fixture: an empty local Hub that the in-process clients talk to."""
    return local_hub


@pytest.fixture(autouse=True)
def no_safetensors_conversion_bot(monkeypatch):
    # transformers would ask the Hub's conversion Space to convert a .bin-only repo: not something to test here.
    monkeypatch.setenv("DISABLE_SAFETENSORS_CONVERSION", "1")


@pytest.fixture(scope="module")
def pipe() -> TransfusionPipeline:
    return get_pipeline()


@pytest.fixture(scope="module")
def other_pipe() -> TransfusionPipeline:
    """Same shapes, other weights: tells which revision was loaded."""
    return get_pipeline(seed=1)


@pytest.fixture(scope="module")
def model() -> TransfusionForMixedModal:
    return get_transformer(get_tokenizer())


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A training output folder: run artifacts for the card, and files that must not be uploaded."""
    folder = tmp_path / "run"
    (folder / "checkpoints" / "checkpoint-10").mkdir(parents=True)
    (folder / "checkpoints" / "checkpoint-10" / "optimizer.bin").write_bytes(b"not for the hub")
    (folder / "logs").mkdir()
    (folder / "logs" / "train_log.jsonl").write_text("{}\n")
    (folder / "metrics.json").write_text(
        json.dumps({"t2i_accuracy": 0.5, "caption_accuracy": 0.75, "eval_minutes": 1.5})
    )
    summary = {"global_step": 300, "dataset": "shapes", "base_model": None, "learning_rate": 0.001, "resolution": 8}
    (folder / "training_summary.json").write_text(json.dumps(summary))
    PIL.Image.new("RGB", (16, 8), "red").save(folder / "samples.png")
    return folder


def model_inputs(model: TransfusionForMixedModal) -> dict[str, torch.Tensor]:
    config = model.config
    text = [100, 101, 102]  # ordinary tokens (the special ones come first)
    input_ids = torch.tensor(
        [text + [config.boi_token_id] + [config.image_token_id] * NUM_PATCHES + [config.eoi_token_id]]
    )
    shape = (1, config.latent_channels, config.latent_size, config.latent_size)
    return {
        "input_ids": input_ids,
        "latents": torch.randn(shape, generator=get_generator(1)),
        "timesteps": torch.tensor([300]),
    }


@torch.no_grad()
def model_outputs(model: TransfusionForMixedModal, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    output = model(**inputs)
    return {"logits": output.logits, "diffusion_predictions": output.diffusion_predictions}


def caption_image() -> PIL.Image.Image:
    return PIL.Image.fromarray((np.arange(8 * 8 * 3).reshape(8, 8, 3) * 7 % 256).astype(np.uint8))


def pipeline_outputs(pipe: TransfusionPipeline) -> tuple[torch.Tensor, str]:
    latents = pipe(PROMPT, num_inference_steps=STEPS, generator=get_generator(0), output_type="latent").images
    return latents, pipe.caption(caption_image(), max_new_tokens=4)[0]


def assert_same_model(loaded: TransfusionForMixedModal, expected: TransfusionForMixedModal) -> None:
    inputs = model_inputs(expected)
    for name, value in model_outputs(expected, inputs).items():
        assert torch.equal(model_outputs(loaded.eval(), inputs)[name], value), name


# --------------------------------------------------------------------------------------------------- template
def test_template_copies_are_equal_and_shipped():
    copy = ROOT / "model_cards" / "transfusion_card_template.md"
    assert copy.read_text() == TEMPLATE_PATH.read_text(), "model_cards/ copy differs from the packaged template"
    assert resources.files("transfusion_hf").joinpath("templates/model_card.md").is_file()
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert "templates/*.md" in setup["options.package_data"]["transfusion_hf"]


# ------------------------------------------------------------------------------------------------------ model
def test_model_push_and_load_by_repo_id(hub, model):
    info = model.push_to_hub("tiny-model", commit_message="First push", commit_description="details")
    repo_id = f"{hub.user}/tiny-model"
    assert info.startswith(hub.endpoint) and info.pr_url is None
    assert hub.history(repo_id)[0].title == "First push"
    files = hub.list_files(repo_id)
    assert files == sorted(
        [".gitattributes", "README.md", "config.json", "generation_config.json", "model.safetensors", *MODEL_CODE]
    )

    assert_same_model(TransfusionForMixedModal.from_pretrained(repo_id, use_safetensors=True), model)
    auto = AutoModel.from_pretrained(repo_id)
    assert type(auto) is TransfusionForMixedModal
    assert_same_model(auto, model)

    card = ModelCard.load(repo_id)
    assert card.data.pipeline_tag == "text-to-image" and "transfusion" in card.data.tags
    assert f'AutoModel.from_pretrained("{repo_id}")' in card.text


def test_model_push_private_tags_and_card_kwargs(hub, model):
    model.push_to_hub("private-model", private=True, tags=["my-tag"], base_model="org/llm", datasets="org/data")
    repo_id = f"{hub.user}/private-model"
    assert hub.get_repo(repo_id).private
    data = ModelCard.load(repo_id).data
    assert "my-tag" in data.tags and "transfusion" in data.tags
    assert data.base_model == "org/llm" and data.datasets == ["org/data"]


def test_model_push_to_branch_and_pull_request(hub, model):
    other = get_transformer(get_tokenizer(), seed=1)
    model.push_to_hub("branchy")
    repo_id = f"{hub.user}/branchy"
    main_head = hub.resolve_revision(repo_id)
    other.push_to_hub(repo_id, revision="dev")
    assert_same_model(TransfusionForMixedModal.from_pretrained(repo_id, revision="dev"), other)
    assert_same_model(TransfusionForMixedModal.from_pretrained(repo_id), model)

    info = other.push_to_hub(repo_id, create_pr=True, commit_message="Proposal")
    assert info.pr_url is not None and info.pr_revision == "refs/pr/1"
    assert hub.resolve_revision(repo_id) == main_head, "create_pr must not touch main"
    assert_same_model(TransfusionForMixedModal.from_pretrained(repo_id, revision=info.pr_revision), other)


# --------------------------------------------------------------------------------------------------- pipeline
def test_pipeline_push_files_card_and_load_by_repo_id(hub, pipe, run_dir):
    info = pipe.push_to_hub("tiny-pipe", output_dir=run_dir, base_model="org/llm", datasets=["org/data"])
    repo_id = f"{hub.user}/tiny-pipe"
    files = hub.list_files(repo_id)
    assert set(files) == PIPELINE_FILES, "only the pipeline, its card and the sample grid are uploaded"
    assert not [name for name in files if name.endswith(PICKLE_SUFFIXES)]
    assert hub.history(repo_id)[0].title == "Upload TransfusionPipeline"
    assert info.oid == hub.resolve_revision(repo_id)

    card = ModelCard.load(repo_id)
    data = card.data
    assert data.license == "apache-2.0" and data.pipeline_tag == "text-to-image"
    assert {"transfusion", "text-to-image", "image-to-text"} <= set(data.tags)
    assert data.library_name == "transfusion_hf"
    assert data.base_model == "org/llm" and data.datasets == ["org/data"]
    assert "| t2i_accuracy | 0.5 |" in card.text and "| caption_accuracy | 0.75 |" in card.text
    assert {(r.task_type, r.metric_type, r.metric_value) for r in data.eval_results} == {
        ("text-to-image", "t2i_accuracy", 0.5),
        ("image-to-text", "caption_accuracy", 0.75),
    }
    assert "![Samples generated by this model](samples.png)" in card.text
    assert "| Training steps | 300 |" in card.text and "arxiv.org/abs/2408.11039" in card.text
    assert f'TransfusionPipeline.from_pretrained("{repo_id}")' in card.text

    loaded = TransfusionPipeline.from_pretrained(repo_id, use_safetensors=True)
    loaded.set_progress_bar_config(disable=True)
    expected_latents, expected_caption = pipeline_outputs(pipe)
    latents, caption = pipeline_outputs(loaded)
    assert torch.equal(latents, expected_latents) and caption == expected_caption


def test_pipeline_push_to_branch_and_pull_request(hub, pipe, other_pipe):
    push_pipeline_to_hub(pipe, "revs")
    repo_id = f"{hub.user}/revs"
    main_head = hub.resolve_revision(repo_id)
    other_pipe.push_to_hub(repo_id, revision="dev", commit_message="Other weights")
    assert hub.resolve_revision(repo_id) == main_head
    assert hub.history(repo_id, revision="dev")[0].title == "Other weights"
    dev = TransfusionPipeline.from_pretrained(repo_id, revision="dev")
    main = TransfusionPipeline.from_pretrained(repo_id)
    assert_same_model(dev.transformer, other_pipe.transformer)
    assert_same_model(main.transformer, pipe.transformer)

    info = other_pipe.push_to_hub(repo_id, create_pr=True)
    assert info.pr_url is not None and hub.resolve_revision(repo_id) == main_head
    assert_same_model(
        TransfusionPipeline.from_pretrained(repo_id, revision=info.pr_revision).transformer, other_pipe.transformer
    )


def test_pipeline_push_refuses_pickles(hub, pipe, tmp_path):
    with pytest.raises(ValueError, match="safetensors"):
        pipe.push_to_hub("nope", safe_serialization=False)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        upload_to_hub(tmp_path, "nope")
    assert ("model", f"{hub.user}/nope") not in hub.repos


def test_push_a_saved_output_dir(hub, pipe, run_dir, capsys):
    """The README's "push an existing output dir": a folder path (Python) and `python -m transfusion_hf.hub`."""
    pipe.save_pretrained(run_dir)
    info = push_pipeline_to_hub(run_dir, "from-folder", commit_message="From a folder")
    repo_id = f"{hub.user}/from-folder"
    assert set(hub.list_files(repo_id)) == PIPELINE_FILES and info.oid == hub.resolve_revision(repo_id)
    assert "| t2i_accuracy | 0.5 |" in ModelCard.load(repo_id).text

    hub_cli([str(run_dir), "org/from-cli", "--private", "--revision", "v1", "--dataset", "org/data"])
    assert hub.get_repo("org/from-cli").private
    assert set(hub.list_files("org/from-cli", revision="v1")) == PIPELINE_FILES
    card = ModelCard(hub.read_file("org/from-cli", "README.md", revision="v1").decode())
    assert card.data.datasets == ["org/data"]
    assert capsys.readouterr().out.strip() == hub.repo_url("org/from-cli") + "/commit/" + hub.resolve_revision(
        "org/from-cli", "v1"
    )


@pytest.mark.parametrize("module", ["transfusion_hf.hub", "transfusion_hf.commands.hub"])
def test_the_documented_command_runs_as_a_module(module):
    """`python -m transfusion_hf.hub` (docs/hub.md) runs the command line of `transfusion_hf.commands.hub`."""
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m transfusion_hf.hub ") and "output_dir" in result.stdout
    assert "RuntimeWarning" not in result.stderr


# ----------------------------------------------------------------------------------------------------- errors
def test_missing_repo_or_revision_errors(hub, model):
    missing = f"{hub.user}/does-not-exist"
    with pytest.raises(RepositoryNotFoundError):
        TransfusionPipeline.from_pretrained(missing)
    with pytest.raises(OSError, match=missing):  # transformers' message names the repo
        TransfusionForMixedModal.from_pretrained(missing)

    model.push_to_hub("exists")
    repo_id = f"{hub.user}/exists"
    with pytest.raises(RevisionNotFoundError):
        TransfusionPipeline.from_pretrained(repo_id, revision="no-such-branch")
    with pytest.raises(OSError, match="no-such-branch"):
        TransfusionForMixedModal.from_pretrained(repo_id, revision="no-such-branch")


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called: weights were unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.serialization, "load", refuse)


def test_pickle_only_repos_are_refused_without_unpickling(hub, pipe, model, tmp_path, no_unpickling):
    """With `use_safetensors=True`, a repo whose weights are only a pickle (`pytorch_model.bin`) fails to load,
    and nothing is unpickled (the bytes are not even a valid pickle)."""
    config = model.config.to_json_string().encode()
    hub.commit_files("local-user/bin-model", {"config.json": config, "pytorch_model.bin": b"pickle"})
    with pytest.raises(OSError, match="safetensors"):
        TransfusionForMixedModal.from_pretrained("local-user/bin-model", use_safetensors=True)

    pipe.save_pretrained(tmp_path / "pipe")
    files = {
        p.relative_to(tmp_path / "pipe").as_posix(): p.read_bytes()
        for p in (tmp_path / "pipe").rglob("*")
        if p.is_file()
    }
    del files["transformer/model.safetensors"]
    files["transformer/pytorch_model.bin"] = b"pickle"
    hub.commit_files("local-user/bin-pipe", files)
    with pytest.raises(OSError, match="safetensors"):
        TransfusionPipeline.from_pretrained("local-user/bin-pipe", use_safetensors=True)


# -------------------------------------------------------------------------------------------------------- card
def test_card_without_run_artifacts(model):
    card = build_model_card(model, "me/bare")
    data = card.data
    assert data.license == "apache-2.0" and data.pipeline_tag == "text-to-image"
    assert data.base_model is None and data.datasets is None and data.eval_results is None
    assert "## Evaluation" not in card.text and "No training summary" in card.text
    assert "## Samples" not in card.text
    assert "`llama` decoder" in card.text and "| Patch size | 2 |" in card.text


def test_card_metadata_from_training_summary(model, tmp_path):
    summary = {"global_step": 7, "dataset": "shapes", "base_model": str(tmp_path)}  # built-in data, local LLM
    data = build_model_card(model, "me/x", training_summary=summary).data
    assert data.datasets is None and data.base_model is None
    summary = {"global_step": 7, "dataset": "org/captions", "base_model": "org/llm"}
    card = build_model_card(model, "me/x", training_summary=summary, license="mit", tags=["extra"])
    assert card.data.datasets == ["org/captions"] and card.data.base_model == "org/llm"
    assert card.data.license == "mit" and card.data.tags[-1] == "extra"
    # A round trip through text keeps the metadata.
    reloaded = ModelCard(str(card))
    assert reloaded.data.to_dict() == card.data.to_dict()


def test_card_from_a_saved_folder_equals_the_card_from_the_object(pipe, model, run_dir, tmp_path):
    """A saved folder gives the card of the object it was saved from (configs and safetensors headers only)."""
    pipe.save_pretrained(run_dir)
    from_folder = build_model_card(run_dir, "me/pipe", output_dir=run_dir)
    assert str(from_folder) == str(build_model_card(pipe, "me/pipe", output_dir=run_dir))
    assert "| VAE | `AutoencoderKL`, 4 latent channels, 2x downsampling |" in from_folder.text
    assert f"({pipe.transformer.num_parameters():,})" in from_folder.text
    model.save_pretrained(tmp_path / "model")
    assert str(build_model_card(tmp_path / "model", "me/m")) == str(build_model_card(model, "me/m"))
    files = card_files(run_dir, "me/pipe", output_dir=run_dir)
    assert files == {"README.md": str(from_folder).encode(), "samples.png": run_dir / "samples.png"}
    with pytest.raises(ValueError, match="is not a saved Transfusion model or pipeline"):
        build_model_card(tmp_path, "me/x")


def test_push_a_saved_folder_refuses_save_options(hub, pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"`variant`='fp16' and `max_shard_size`=None apply when saving"):
        push_pipeline_to_hub(tmp_path, "nope", variant="fp16")
    with pytest.raises(ValueError, match="holds no saved pipeline"):
        push_pipeline_to_hub(tmp_path / "transformer", "nope")
    assert ("model", f"{hub.user}/nope") not in hub.repos


def module_level_imports(path: Path) -> tuple[set[str], set[str]]:
    """The relative imports of a module: (at module level, inside functions), `if TYPE_CHECKING:` blocks left out."""
    top, nested = set(), set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and ast.unparse(child.test) == "TYPE_CHECKING":
                continue
            if isinstance(child, ast.ImportFrom) and child.level:
                (nested if in_function else top).add(child.module or "")
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(ast.parse(path.read_text()), False)
    return top, nested


def test_no_import_circle_between_hub_model_and_pipeline(hub, pipe, run_dir):
    """hub.py and the card module import neither the model nor the pipeline module, anywhere; those import the Hub
    code by name only when they push (no relative import, so the code saved beside the weights carries none of it).

    Proof at run time: a fresh interpreter imports `transfusion_hf.hub` with the package's `__init__` left out (it
    imports every module on purpose, to register the Auto classes), builds the card of a saved pipeline folder and
    pushes that folder; neither `modeling_transfusion` nor `pipeline_transfusion` gets imported.
    """
    package = Path(transfusion_hf.__file__).parent
    hub_top, hub_nested = module_level_imports(package / "hub.py")
    assert hub_top == {"modelcard_transfusion"} and hub_nested == {"commands.hub"}  # the command line, when run
    card_top, card_nested = module_level_imports(package / "modelcard_transfusion.py")
    assert card_top == {"configuration_transfusion"} and not card_nested
    for name in ("modeling_transfusion", "pipeline_transfusion"):
        top, nested = module_level_imports(package / f"{name}.py")
        assert not {"hub", "modelcard_transfusion"} & (top | nested), name

    pipe.save_pretrained(run_dir)
    expected_card = str(build_model_card(run_dir, "org/no-circle", output_dir=run_dir))
    code = textwrap.dedent(
        f"""
        import json, sys, types

        package = types.ModuleType("transfusion_hf")
        package.__path__ = [{str(package)!r}]
        sys.modules["transfusion_hf"] = package  # the package without its __init__
        import transfusion_hf.hub as hub

        card = hub.build_model_card({str(run_dir)!r}, "org/no-circle", output_dir={str(run_dir)!r})
        hub.push_pipeline_to_hub({str(run_dir)!r}, "org/no-circle")
        loaded = sorted(name for name in sys.modules if name.startswith("transfusion_hf."))
        print(json.dumps({{"modules": loaded, "card": str(card)}}))
        """
    )
    result = json.loads(hub.run_python(code, extra_env={"OMP_NUM_THREADS": "1"}).stdout.strip().splitlines()[-1])
    assert result["modules"] == [
        "transfusion_hf.configuration_transfusion",
        "transfusion_hf.hub",
        "transfusion_hf.modelcard_transfusion",
    ]
    assert result["card"] == expected_card
    assert set(hub.list_files("org/no-circle")) == PIPELINE_FILES


# ------------------------------------------------------------------------------------------- fresh processes
@pytest.mark.slow
def test_load_by_repo_id_in_a_fresh_process(hub, model, pipe, other_pipe, tmp_path):
    """Push from this process; load by repo id (and revision) in a new interpreter and get identical outputs."""
    model.push_to_hub("fresh-model")
    pipe.push_to_hub("fresh-pipe")
    other_pipe.push_to_hub("fresh-pipe", revision="dev")
    inputs = model_inputs(model)
    latents, caption = pipeline_outputs(pipe)
    other_latents, _ = pipeline_outputs(other_pipe)
    expected = {**inputs, **model_outputs(model, inputs), "pipe_latents": latents, "dev_latents": other_latents}
    save_file({name: value.contiguous() for name, value in expected.items()}, str(tmp_path / "expected.safetensors"))
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModel

        import transfusion_hf
        from test_hub import caption_image, model_outputs, pipeline_outputs
        from transfusion_hf.pipeline_transfusion import TransfusionPipeline

        torch.set_num_threads(1)
        expected = load_file({str(tmp_path / "expected.safetensors")!r})
        inputs = {{name: expected[name] for name in ("input_ids", "latents", "timesteps")}}
        for loaded in (
            transfusion_hf.TransfusionForMixedModal.from_pretrained("{hub.user}/fresh-model", use_safetensors=True),
            AutoModel.from_pretrained("{hub.user}/fresh-model"),
        ):
            for name, value in model_outputs(loaded.eval(), inputs).items():
                assert torch.equal(value, expected[name]), name
        pipe = TransfusionPipeline.from_pretrained("{hub.user}/fresh-pipe", use_safetensors=True)
        pipe.set_progress_bar_config(disable=True)
        latents, caption = pipeline_outputs(pipe)
        assert torch.equal(latents, expected["pipe_latents"])
        assert caption == {caption!r}, caption
        dev = TransfusionPipeline.from_pretrained("{hub.user}/fresh-pipe", revision="dev")
        dev.set_progress_bar_config(disable=True)
        assert torch.equal(pipeline_outputs(dev)[0], expected["dev_latents"])
        print("fresh process OK")
        """
    )
    result = hub.run_python(code, extra_env={"OMP_NUM_THREADS": "1", "DISABLE_SAFETENSORS_CONVERSION": "1"})
    assert "fresh process OK" in result.stdout


@pytest.fixture
def fresh_accelerate_state():
    """The training script builds an `Accelerator`: start from, and leave, a clean process-wide state."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_train_script_pushes_pipeline_and_card(hub, tmp_path, monkeypatch, fresh_accelerate_state):
    from script_loading import load_script

    train_transfusion = load_script(ROOT / "examples" / "train_transfusion.py")

    output_dir = tmp_path / "out"
    argv = [
        "--dataset", "shapes", "--model_config", "tiny", "--shapes_num_samples", "16", "--resolution", "8",
        "--train_batch_size", "4", "--max_train_steps", "2", "--lr_warmup_steps", "1", "--checkpointing_steps", "100",
        "--report_to", "none", "--output_dir", str(output_dir), "--push_to_hub", "--hub_model_id", "trained",
        "--hub_private_repo",
    ]  # fmt: skip
    train_transfusion.main(argv)
    repo_id = f"{hub.user}/trained"
    files = hub.list_files(repo_id)
    assert "README.md" in files and "transformer/model.safetensors" in files and "model_index.json" in files
    assert not [name for name in files if name.endswith(PICKLE_SUFFIXES) or name.startswith(("logs/", "checkpoint"))]
    assert hub.get_repo(repo_id).private
    card = ModelCard.load(repo_id)
    assert "| Training steps | 2 |" in card.text and "transfusion" in card.data.tags
    pipeline = TransfusionPipeline.from_pretrained(repo_id)
    assert pipeline.transformer.config.latent_size == 8


def test_the_cards_built_in_data_sets_are_the_readers():
    """A glyphs run's card must not name `glyphs` as a Hub data set: the card's list follows the data readers'."""
    from transfusion_hf import hub as card_code
    from transfusion_hf.data.image_text import BUILTIN_DATASETS

    assert set(card_code.BUILTIN_DATASETS) == set(BUILTIN_DATASETS)
