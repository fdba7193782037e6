#!/usr/bin/env python
"""Score one trained shapes pipeline with several diffusers samplers: held-out text-to-image accuracy per sampler.

The sampler alone moved the demo's flow model from 0.91 to 0.98 and the paper's epsilon recipe (10 CPU minutes) from
0.18 to 0.42 on seed 0 (README, "Sampling in pixel space"); this reruns that comparison on any saved pipeline:

    python benchmarks/bench_samplers.py outputs/shapes                         # every sampler of its prediction type
    python benchmarks/bench_samplers.py outputs/shapes --samplers flow_euler flow_euler_stochastic

Every sampler is built from the pipeline's own scheduler config by `TransfusionPipeline.scheduler_from_config` (the
noise schedule the model learned), with each sampler's clamp and stochastic fields set explicitly, so a pipeline saved
with any default is compared on equal terms. Same prompts, images per prompt, guidance and generator seed for all.
Prints a table and writes json (default benchmarks/results/samplers.json).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402


class Sampler(NamedTuple):
    scheduler_class: str
    overrides: dict[str, Any]
    num_inference_steps: int
    description: str


_DETERMINISTIC_DPM = {"algorithm_type": "dpmsolver++", "thresholding": False}
_CLAMPED_DPM = {"thresholding": True, "sample_max_value": 1.0}
_NO_DDPM_CLAMP = {"clip_sample": False, "thresholding": False}
_DDPM_CLIP = {"clip_sample": True, "clip_sample_range": 1.0, "thresholding": False}
# "clamped" = the implied x0 clamped to the pixel range [-1, 1]. The DPM-Solver++ forms serve both kinds of model.
SOLVER_SAMPLERS = {
    "dpm_clamped": Sampler(
        "DPMSolverMultistepScheduler", {**_DETERMINISTIC_DPM, **_CLAMPED_DPM}, 25, "DPM-Solver++ 2M, clamped"
    ),
    "sde_dpm": Sampler(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "thresholding": False},
        25,
        "DPM-Solver++ SDE",
    ),
    "sde_dpm_clamped": Sampler(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", **_CLAMPED_DPM},
        25,
        "DPM-Solver++ SDE, clamped (the script's pixel-space default for epsilon / v)",
    ),
}
# Samplers of a DDPM-schedule (epsilon / v) model.
NOISE_SCHEDULE_SAMPLERS = {
    "dpm": Sampler("DPMSolverMultistepScheduler", _DETERMINISTIC_DPM, 25, "DPM-Solver++ 2M"),
    **SOLVER_SAMPLERS,
    "ddim_clip": Sampler("DDIMScheduler", _DDPM_CLIP, 25, "DDIM, clipped"),
    "ddpm": Sampler("DDPMScheduler", _NO_DDPM_CLAMP, 100, "DDPM (ancestral)"),
    "ddpm_clip": Sampler("DDPMScheduler", _DDPM_CLIP, 100, "DDPM (ancestral), clipped"),
    "ddpm_clip_250": Sampler("DDPMScheduler", _DDPM_CLIP, 250, "DDPM, clipped, the paper's 250 steps"),
    "euler_ancestral": Sampler("EulerAncestralDiscreteScheduler", {}, 50, "Euler ancestral"),
}
FLOW_SAMPLERS = {
    "flow_euler": Sampler("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": False}, 25, "FlowMatch Euler"),
    "flow_euler_stochastic": Sampler(
        "FlowMatchEulerDiscreteScheduler",
        {"stochastic_sampling": True},
        25,
        "FlowMatch Euler, stochastic (the script's pixel-space default for flow)",
    ),
    **SOLVER_SAMPLERS,
}


def samplers_for(prediction_type: str) -> dict[str, Sampler]:
    return FLOW_SAMPLERS if prediction_type == "flow_prediction" else NOISE_SCHEDULE_SAMPLERS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipelines", nargs="+", help="saved TransfusionPipeline folders (trained on the shapes)")
    parser.add_argument("--samplers", nargs="+", default=None, help="names (default: all of the prediction type)")
    parser.add_argument("--images_per_caption", type=int, default=2, help="per held-out caption (48 captions)")
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    parser.add_argument("--num_inference_steps", type=int, default=None, help="override every sampler's steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(common.RESULTS_DIR / "samplers.json"))
    parser.add_argument("--grids", default=None, help="folder for one png per pipeline and sampler (first images)")
    args = parser.parse_args(argv)
    known = sorted(set(NOISE_SCHEDULE_SAMPLERS) | set(FLOW_SAMPLERS))
    unknown = [name for name in args.samplers or [] if name not in known]
    if unknown:
        parser.error(f"--samplers: unknown {unknown}; known: {known}.")
    missing = [path for path in args.pipelines if not (Path(path) / "model_index.json").is_file()]
    if missing:
        parser.error(f"not a saved pipeline (no model_index.json): {missing}.")
    if args.images_per_caption < 1 or (args.num_inference_steps is not None and args.num_inference_steps < 1):
        parser.error("--images_per_caption and --num_inference_steps must be positive.")
    return args


def score(pipeline, saved_config: dict, name: str, sampler: Sampler, args: argparse.Namespace) -> dict[str, Any]:
    """Swap in `sampler` (built from the pipeline's saved scheduler config, not the previous sampler's), draw one image
    per prompt and judge them."""
    from transfusion_hf import TransfusionPipeline
    from transfusion_hf.evaluation.shapes_benchmark import held_out_text_to_image

    prediction_type = pipeline.transformer.config.prediction_type
    pipeline.scheduler = TransfusionPipeline.scheduler_from_config(
        sampler.scheduler_class, saved_config, prediction_type, **sampler.overrides
    )
    steps = args.num_inference_steps or sampler.num_inference_steps
    start = time.perf_counter()
    # The demo's own text-to-image evaluation (same prompts, batches and generator), so the figures compare with it.
    prompts, images, scores = held_out_text_to_image(
        pipeline, args.images_per_caption, steps, args.guidance_scale, seed=args.seed
    )
    seconds = time.perf_counter() - start
    if args.grids:
        from transfusion_hf.evaluation.shapes_benchmark import held_out_samples_grid

        grid = Path(args.grids) / f"{Path(pipeline.name_or_path).resolve().name}_{name}.png"
        grid.parent.mkdir(parents=True, exist_ok=True)
        held_out_samples_grid(prompts, images, args.images_per_caption).save(grid)
    return {
        "sampler": name,
        "description": sampler.description,
        "scheduler": sampler.scheduler_class,
        "overrides": sampler.overrides,
        "num_inference_steps": steps,
        "seconds_per_image": seconds / len(prompts),
        **{f"t2i_{key}": value for key, value in scores.items() if isinstance(value, float)},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transfusion_hf import TransfusionPipeline

    rows = []
    for path in args.pipelines:
        pipeline = TransfusionPipeline.from_pretrained(path)
        pipeline.set_progress_bar_config(disable=True)
        saved_config = dict(pipeline.scheduler.config)
        available = samplers_for(pipeline.transformer.config.prediction_type)
        names = [name for name in args.samplers or available if name in available]
        skipped = sorted(set(args.samplers or []) - set(names))
        if skipped:
            print(f"{path}: {skipped} do not fit prediction_type={pipeline.transformer.config.prediction_type!r}.")
        for name in names:
            row = {"pipeline": str(path), **score(pipeline, saved_config, name, available[name], args)}
            rows.append(row)
            print(f"{path} {name}: t2i {row['t2i_accuracy']:.3f}", flush=True)
    headers = ["pipeline", "sampler", "steps", "t2i", "size", "colour", "shape", "position", "s / image"]
    keys = ["t2i_accuracy", "t2i_size", "t2i_color", "t2i_shape", "t2i_position"]
    table = [
        [Path(row["pipeline"]).name, row["sampler"], row["num_inference_steps"]]
        + [round(row[key], 3) for key in keys]
        + [round(row["seconds_per_image"], 3)]
        for row in rows
    ]
    print(common.markdown_table(headers, table))
    result = {
        "environment": common.environment(args.threads),
        "settings": {
            "images_per_caption": args.images_per_caption,
            "guidance_scale": args.guidance_scale,
            "seed": args.seed,
        },
        "rows": rows,
    }
    common.write_json(result, args.output)
    return result


if __name__ == "__main__":
    main()
