"""Load Transfusion folders and Hub repos through the code saved beside their weights, where transfusion_hf cannot be
imported: run by tests/test_remote_code.py as ``python load_without_package.py SPEC.json`` in a fresh interpreter.

The interpreter is the test environment's (torch, transformers, diffusers, ...), with transfusion_hf taken away:
its source folders leave ``sys.path`` and a finder at the head of ``sys.meta_path`` refuses the import, so any
``import transfusion_hf`` fails loudly. ``SPEC.json`` names the inputs (a safetensors file written by the test), the
folders and repo ids to load, and the output folder, where this writes ``outputs.safetensors`` and ``report.json``.
"""

from __future__ import annotations

import importlib.abc
import os
import sys


class RefuseTransfusionHF(importlib.abc.MetaPathFinder):
    """Makes every import of `transfusion_hf` (or of one of its modules) raise `ModuleNotFoundError`."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "transfusion_hf" or fullname.startswith("transfusion_hf."):
            raise ModuleNotFoundError(f"No module named {fullname!r} (refused: no transfusion_hf here)", name=fullname)
        return None


# Before any other import: the editable install and PYTHONPATH put the package's src/ on the path.
sys.path[:] = [entry for entry in sys.path if not os.path.isdir(os.path.join(entry or ".", "transfusion_hf"))]
sys.meta_path.insert(0, RefuseTransfusionHF())

import importlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402
from diffusers.utils.constants import HF_MODULES_CACHE  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModel, AutoProcessor  # noqa: E402


def refusal(load: Callable[[], object]) -> str | None:
    """The error `load` raises (type and message), or None when it loads."""
    try:
        load()
    except Exception as error:  # the libraries raise ValueError today; record whatever comes
        return f"{type(error).__name__}: {error}"
    return None


def forget_diffusers_modules() -> None:
    """Start the next pipeline load from an empty diffusers module cache, as a new process would: diffusers puts the
    code of every folder into one `diffusers_modules.local` package, so a module an earlier load left there (on disk
    or in `sys.modules`) would hide a file this load failed to copy."""
    for name in [name for name in sys.modules if name.split(".")[0] == "diffusers_modules"]:
        del sys.modules[name]
    shutil.rmtree(os.path.join(HF_MODULES_CACHE, "diffusers_modules"), ignore_errors=True)
    importlib.invalidate_caches()


def model_outputs(model, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        output = model.eval()(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            latents=inputs["latents"],
            timesteps=inputs["timesteps"],
        )
    return {"logits": output.logits, "diffusion_predictions": output.diffusion_predictions}


def pipeline_outputs(pipe, prompt: str, image: PIL.Image.Image) -> tuple[torch.Tensor, str]:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    images = pipe(prompt, num_inference_steps=2, generator=generator, output_type="np").images
    return torch.from_numpy(np.ascontiguousarray(images)), pipe.caption(image, max_new_tokens=4)[0]


def main(spec_path: str) -> None:
    torch.set_num_threads(1)
    spec = json.loads(open(spec_path).read())
    inputs = load_file(spec["inputs"])
    image_array = inputs["image"].numpy()
    image = PIL.Image.fromarray(image_array)
    outputs: dict[str, torch.Tensor] = {}
    report: dict[str, object] = {"package_import": refusal(lambda: __import__("transfusion_hf")), "classes": {}}

    for label, source in spec["models"].items():
        model = AutoModel.from_pretrained(source, trust_remote_code=True)
        report["classes"][f"model/{label}"] = f"{type(model).__module__}.{type(model).__name__}"
        outputs.update({f"model/{label}/{name}": value for name, value in model_outputs(model, inputs).items()})
        report[f"model/{label}/refusal"] = refusal(lambda source=source: AutoModel.from_pretrained(source))
        report["model/push_without_package"] = refusal(lambda model=model: model.push_to_hub("never-pushed"))

    processor = AutoProcessor.from_pretrained(spec["processor"], trust_remote_code=True)
    report["classes"]["processor"] = f"{type(processor).__module__}.{type(processor).__name__}"
    processed = processor([spec["processor_text"]], images=[image_array])
    outputs.update({f"processor/{name}": value for name, value in processed.items()})

    captions = {}
    for label, source in spec["pipelines"].items():
        forget_diffusers_modules()
        pipe = DiffusionPipeline.from_pretrained(source, trust_remote_code=True)
        report["classes"][f"pipeline/{label}"] = f"{type(pipe).__module__}.{type(pipe).__name__}"
        report["classes"][f"pipeline/{label}/transformer"] = type(pipe.transformer).__module__
        outputs[f"pipeline/{label}/images"], captions[label] = pipeline_outputs(pipe, spec["prompt"], image)
        report[f"pipeline/{label}/refusal"] = refusal(lambda source=source: DiffusionPipeline.from_pretrained(source))
        report["pipeline/push_without_package"] = refusal(lambda pipe=pipe: pipe.push_to_hub("never-pushed"))
    report["captions"] = captions
    report["loaded_package_modules"] = sorted(name for name in sys.modules if name.startswith("transfusion_hf"))

    save_file(
        {name: value.contiguous() for name, value in outputs.items()},
        os.path.join(spec["output"], "outputs.safetensors"),
    )
    with open(os.path.join(spec["output"], "report.json"), "w") as file:
        json.dump(report, file, indent=2)


if __name__ == "__main__":
    main(sys.argv[1])
