"""Loading without this package: the code saved beside the weights (transformers' `register_for_auto_class`,
diffusers' custom pipeline and components) loads models, processors and pipelines with `trust_remote_code=True`
in an environment without transfusion_hf, from a folder and from a Hub repo, with the same outputs.

The environment without transfusion_hf is a fresh interpreter running tests/load_without_package.py (any import of
the package fails there); the Hub is `hub_server.LocalHub`, a real HTTP server on 127.0.0.1. One such interpreter
loads everything for the whole module, so the tests below share its report.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.utils.dynamic_modules_utils import get_relative_imports
from safetensors.torch import load_file, save_file
from transformers import AutoModel
from transformers.dynamic_module_utils import get_relative_import_files

import transfusion_hf
from hub_fixtures import configure_hf_client
from hub_server import LocalHub
from pipeline_components import NUM_PATCHES, get_pipeline
from transfusion_hf import TransfusionForMixedModal, TransfusionPipeline, TransfusionProcessor
from transfusion_hf.hub import push_pipeline_to_hub

PROMPT = "a small red circle in the top left"
PROCESSOR_TEXT = "a large blue square <image> in the center"
LOADER = Path(__file__).resolve().parent / "load_without_package.py"
PACKAGE = Path(transfusion_hf.__file__).resolve().parent
# The code a saved model carries: modeling_transfusion.py and every module it imports, recursively. No Hub or card
# code: the model and the pipeline import it by name only when they push (transfusion_hf.hub).
MODEL_CODE = {
    "configuration_transfusion.py",
    "image_grids.py",
    "image_layers.py",
    "loss_transfusion.py",
    "masking_transfusion.py",
    "modality_experts.py",
    "modeling_transfusion.py",
}
# The code a saved pipeline carries at its root (its transformer/ folder has MODEL_CODE).
PIPELINE_CODE = MODEL_CODE | {
    "cache_transfusion.py",
    "generation_transfusion.py",
    "latents_transfusion.py",
    "pipeline_transfusion.py",
    "processing_transfusion.py",
    "remote_code_transfusion.py",
    "scheduling_transfusion.py",
}


def model_outputs(model: TransfusionForMixedModal, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same forward as tests/load_without_package.py runs."""
    with torch.no_grad():
        output = model.eval()(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            latents=inputs["latents"],
            timesteps=inputs["timesteps"],
        )
    return {"logits": output.logits, "diffusion_predictions": output.diffusion_predictions}


def pipeline_outputs(pipe: TransfusionPipeline, image: PIL.Image.Image) -> tuple[torch.Tensor, str]:
    """The same generation as tests/load_without_package.py runs."""
    pipe.set_progress_bar_config(disable=True)
    images = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    return torch.from_numpy(images), pipe.caption(image, max_new_tokens=4)[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny pipeline, its model and a processor saved to folders, the inputs, and the in-package outputs."""
    root = tmp_path_factory.mktemp("remote_code")
    torch.set_num_threads(1)
    pipe = get_pipeline()
    processor = TransfusionProcessor(pipe.tokenizer, image_size=pipe.image_size, num_image_tokens=NUM_PATCHES)
    pipe.save_pretrained(root / "pipeline")
    pipe.transformer.save_pretrained(root / "model")
    processor.save_pretrained(root / "processor")

    image_array = np.random.RandomState(0).randint(0, 256, (pipe.image_size, pipe.image_size, 3)).astype(np.uint8)
    processed = processor([PROCESSOR_TEXT], images=[image_array])
    inputs = {
        "image": torch.from_numpy(image_array),
        "input_ids": processed["input_ids"],
        "attention_mask": processed["attention_mask"],
        "latents": torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1)),
        "timesteps": torch.tensor([321.0]),
    }
    save_file(inputs, str(root / "inputs.safetensors"))
    images, caption = pipeline_outputs(pipe, PIL.Image.fromarray(image_array))
    expected = {
        **model_outputs(pipe.transformer, inputs),
        **{f"processor/{name}": value for name, value in processed.items()},
        "images": images,
    }
    return {"root": root, "pipe": pipe, "inputs": inputs, "expected": expected, "caption": caption}


@pytest.fixture(scope="module")
def hub(saved):
    """A local Hub holding the model and the pipeline, pushed with their own `push_to_hub`."""
    server = LocalHub(hf_home=saved["root"] / "hf_home").start()
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            configure_hf_client(monkeypatch, server, saved["root"] / "hf_home")
            monkeypatch.setenv("DISABLE_SAFETENSORS_CONVERSION", "1")
            saved["pipe"].transformer.push_to_hub("remote-model")
            saved["pipe"].push_to_hub("remote-pipe")
            push_pipeline_to_hub(saved["root"] / "pipeline", "remote-pipe-folder")
            yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def fresh(saved, hub):
    """Everything loaded in one interpreter without transfusion_hf: its `report.json` and `outputs.safetensors`."""
    root = saved["root"]
    output = root / "fresh"
    output.mkdir()
    spec = {
        "inputs": str(root / "inputs.safetensors"),
        "models": {"folder": str(root / "model"), "hub": f"{hub.user}/remote-model"},
        "processor": str(root / "processor"),
        "processor_text": PROCESSOR_TEXT,
        "pipelines": {
            "folder": str(root / "pipeline"),
            "hub": f"{hub.user}/remote-pipe",
            "hub_from_folder": f"{hub.user}/remote-pipe-folder",
        },
        "prompt": PROMPT,
        "output": str(output),
    }
    (root / "spec.json").write_text(json.dumps(spec))
    # A cache of its own (downloads and both libraries' dynamic modules), so nothing comes from an earlier load.
    env = hub.subprocess_env(hf_home=root / "fresh_home")
    env.update(HF_MODULES_CACHE=str(root / "fresh_home" / "modules"), OMP_NUM_THREADS="1")
    env.update(DISABLE_SAFETENSORS_CONVERSION="1")
    # stdin from /dev/null: transformers asks on stdin before running remote code it was not told to trust.
    result = subprocess.run(
        [sys.executable, str(LOADER), str(root / "spec.json")],
        env=env,
        cwd=root,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    return {
        "report": json.loads((output / "report.json").read_text()),
        "outputs": load_file(output / "outputs.safetensors"),
    }


# ------------------------------------------------------------------------------------------ what is saved
def test_saved_model_carries_its_code(saved):
    folder = saved["root"] / "model"
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_transfusion.TransfusionConfig",
        "AutoModel": "modeling_transfusion.TransfusionForMixedModal",
    }
    assert {path.name for path in folder.glob("*.py")} == MODEL_CODE


def test_saved_pipeline_names_its_code_the_diffusers_way(saved):
    folder = saved["root"] / "pipeline"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_transfusion", "TransfusionPipeline"]
    assert index["transformer"] == ["modeling_transfusion", "TransfusionForMixedModal"]
    assert index["tokenizer"][0] == "transformers" and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert {path.name for path in folder.glob("*.py")} == PIPELINE_CODE
    assert {path.name for path in (folder / "transformer").glob("*.py")} == MODEL_CODE


def test_saved_processor_carries_its_code(saved):
    folder = saved["root"] / "processor"
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_transfusion.TransfusionProcessor"}
    # The processor lays sequences out and needs no other module: the training noise lives with the collator
    # (transfusion_hf.data.collator), which is not saved.
    assert {path.name for path in folder.glob("*.py")} == {"processing_transfusion.py"}


def test_pipeline_module_imports_every_module_it_needs():
    """diffusers 0.42 copies only the modules a pipeline file imports itself into its module cache when it loads
    the file from a folder: every module the package code imports, recursively, must be among them."""
    entry = PACKAGE / "pipeline_transfusion.py"
    needed = {Path(path).stem for path in get_relative_import_files(entry)} - {entry.stem}
    missing = needed - set(get_relative_imports(entry))
    assert not missing, f"pipeline_transfusion.py must import {sorted(missing)} itself (see the comment there)"


def test_saved_code_imports_form_no_circle():
    """diffusers 0.42 fetches a pipeline's code from the Hub by following its relative imports (found by text, even
    under `if TYPE_CHECKING:`) and recurses forever on a circle."""
    graph = {path.stem: set(get_relative_imports(path)) for path in PACKAGE.glob("*.py")}

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import circle: {' -> '.join((*path, module))}"
        for imported in graph[module]:
            visit(imported, (*path, module))

    visit("pipeline_transfusion", ())


def test_in_package_loading_keeps_the_package_classes(saved):
    """Where transfusion_hf is installed, a folder with code loads the package's classes, without trust_remote_code."""
    root = saved["root"]
    assert type(AutoModel.from_pretrained(root / "model")) is TransfusionForMixedModal
    pipe = TransfusionPipeline.from_pretrained(root / "pipeline")
    assert type(pipe) is TransfusionPipeline and type(pipe.transformer) is TransfusionForMixedModal
    images, caption = pipeline_outputs(pipe, PIL.Image.fromarray(saved["inputs"]["image"].numpy()))
    assert torch.equal(images, saved["expected"]["images"]) and caption == saved["caption"]


def test_a_folder_saved_without_code_still_loads(saved, tmp_path):
    """A pipeline saved before its code was saved with it: model_index.json names the package's classes."""
    folder = tmp_path / "without_code"
    shutil.copytree(saved["root"] / "pipeline", folder, ignore=shutil.ignore_patterns("*.py"))
    index = json.loads((folder / "model_index.json").read_text())
    index.update(_class_name="TransfusionPipeline")
    index.update(transformer=["transfusion_hf.modeling_transfusion", "TransfusionForMixedModal"])
    (folder / "model_index.json").write_text(json.dumps(index))
    pipe = TransfusionPipeline.from_pretrained(folder)
    assert type(pipe.transformer) is TransfusionForMixedModal
    images, _ = pipeline_outputs(pipe, PIL.Image.fromarray(saved["inputs"]["image"].numpy()))
    assert torch.equal(images, saved["expected"]["images"])


def test_push_refuses_a_folder_whose_code_is_missing(saved, tmp_path):
    folder = tmp_path / "no_pipeline_code"
    shutil.copytree(saved["root"] / "pipeline", folder)
    (folder / "pipeline_transfusion.py").unlink()
    with pytest.raises(ValueError, match=r"code file `pipeline_transfusion.py`.*no such file"):
        push_pipeline_to_hub(folder, "never-created")


def test_pushed_repos_carry_the_code(hub):
    model_files = set(hub.list_files(f"{hub.user}/remote-model"))
    assert MODEL_CODE <= model_files and "config.json" in model_files
    for repo in ("remote-pipe", "remote-pipe-folder"):
        files = set(hub.list_files(f"{hub.user}/{repo}"))
        assert PIPELINE_CODE <= files, repo
        assert {f"transformer/{name}" for name in MODEL_CODE} <= files, repo
    # The cards show the one-liners.
    pipe_card = hub.read_file(f"{hub.user}/remote-pipe", "README.md").decode()
    assert f'DiffusionPipeline.from_pretrained("{hub.user}/remote-pipe", trust_remote_code=True)' in pipe_card
    model_card = hub.read_file(f"{hub.user}/remote-model", "README.md").decode()
    assert f'AutoModel.from_pretrained("{hub.user}/remote-model", trust_remote_code=True)' in model_card


# ------------------------------------------------------------------------------------ without the package
def test_fresh_environment_has_no_transfusion_hf(fresh):
    report = fresh["report"]
    assert report["package_import"].startswith("ModuleNotFoundError") and not report["loaded_package_modules"]
    for name, module in report["classes"].items():
        assert not module.startswith("transfusion_hf"), name


@pytest.mark.parametrize("source", ["folder", "hub"])
def test_auto_model_without_the_package(fresh, saved, source):
    assert fresh["report"]["classes"][f"model/{source}"].endswith("modeling_transfusion.TransfusionForMixedModal")
    for name in ("logits", "diffusion_predictions"):
        torch.testing.assert_close(
            fresh["outputs"][f"model/{source}/{name}"], saved["expected"][name], rtol=0, atol=1e-6
        )


def test_auto_processor_without_the_package(fresh, saved):
    assert fresh["report"]["classes"]["processor"].endswith("processing_transfusion.TransfusionProcessor")
    for name in ("input_ids", "attention_mask", "pixel_values", "timesteps"):
        assert torch.equal(fresh["outputs"][f"processor/{name}"], saved["expected"][f"processor/{name}"]), name


@pytest.mark.parametrize("source", ["folder", "hub", "hub_from_folder"])
def test_diffusion_pipeline_without_the_package(fresh, saved, source):
    classes = fresh["report"]["classes"]
    assert classes[f"pipeline/{source}"].endswith("pipeline_transfusion.TransfusionPipeline")
    assert classes[f"pipeline/{source}/transformer"].endswith("modeling_transfusion")
    images = fresh["outputs"][f"pipeline/{source}/images"]
    torch.testing.assert_close(images, saved["expected"]["images"], rtol=0, atol=1e-6)
    assert fresh["report"]["captions"][source] == saved["caption"]


@pytest.mark.parametrize("kind", ["model", "pipeline"])
def test_push_without_the_package_says_what_it_needs(fresh, kind):
    """The saved code carries no Hub or card code: `push_to_hub` of a model or pipeline loaded without the package
    refuses before creating anything, naming the package."""
    refusal = fresh["report"][f"{kind}/push_without_package"]
    assert refusal is not None and refusal.startswith("ImportError"), refusal
    assert "transfusion_hf" in refusal and "upload_folder" in refusal


@pytest.mark.parametrize("kind", ["model", "pipeline"])
@pytest.mark.parametrize("source", ["folder", "hub"])
def test_without_trust_remote_code_the_libraries_refuse(fresh, kind, source):
    refusal = fresh["report"][f"{kind}/{source}/refusal"]
    assert refusal is not None and refusal.startswith("ValueError"), refusal
    assert "trust_remote_code=True" in refusal and "custom code" in refusal
