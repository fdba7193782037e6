"""Does every model preset draw recognisable images on a generic image folder of real-looking images?

The built-in glyphs (a character in one colour on a shaded background, many fonts) are written once to an ordinary
diffusers-convention image folder (PNG files + `metadata.jsonl`), so that training goes through the same
`--train_data_dir` route as a user's own data, not through `--dataset glyphs`. Each preset of
`transfusion_hf.recipes` is then trained by `examples/train_transfusion.py` (a subprocess) with no recipe
flags, so the preset's own defaults are what is checked, and its saved pipeline is scored by
`transfusion_hf.evaluation.glyphs_benchmark.evaluate_glyphs` on the 40 held-out glyph captions. Each preset gets a
verdict: "draws", "mean image", "mosaic" or "noise" (thresholds below), and a samples grid in its run folder.

    python benchmarks/bench_presets_draw.py                      # every CPU-sized recipe, its own step count
    python benchmarks/bench_presets_draw.py --presets small tiny -- --use_ema
    python benchmarks/bench_presets_draw.py --presets tiny --num_samples 64 --max_train_steps 2 \\
        --images_per_caption 2 --num_inference_steps 2 --num_caption_images 8   # smoke run

Prints a markdown table, writes the json to `benchmarks/results/presets_draw.json` and exits with status 1 when a
checked preset does not draw and the training script did not warn, before training, that it would not (so it can serve
as a check: a preset's `_warning`, e.g. the flat-shapes preset's, is printed by the script and recorded as `warned`).
To run presets side by side (e.g. on a GPU,
`STAGES=presets PRESETS_STEPS=10000 bash benchmarks/run_device_checks.sh` does this):

    python benchmarks/bench_presets_draw.py --prepare_only --work_dir W          # image folder + glyph judge, once
    python benchmarks/bench_presets_draw.py --presets P --work_dir W --output W/P.json &    # one per preset
    python benchmarks/bench_presets_draw.py --merge W --output all.json --montage all.png
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import subprocess
import sys
import time
import unittest.mock
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

# torch, datasets and transfusion_hf are imported inside the functions that use them: they take ~10 s to import on
# a busy machine, and a mistyped preset name should fail at once.
if TYPE_CHECKING:
    from transfusion_hf.evaluation.glyph_judge import GlyphJudge

REPO_DIR = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO_DIR / "examples" / "train_transfusion.py"
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "presets_draw.json"

# Backbones wider x deeper than the CPU presets (width 256, 6 layers: ~4.8M parameters) do not learn anything in
# minutes on a CPU; the paper's 0.16B model (768 x 16) needs a GPU. They are skipped unless --include_large.
CPU_BACKBONE_LIMIT = 256 * 6

# Verdict thresholds, from the reference values of `transfusion_hf.evaluation.image_quality` (measured at 32 px on
# glyph renders) and the glyph judge:
# - seam_score: real renders ~1.0 (1.00-1.04 for 2-16 px tiles), their mean image 1.03, their 8x8 tiles shuffled
#   between images 9.4. 2 is far from both ends: a model whose patches ignore each other lands well above it.
MOSAIC_MIN_SEAM_SCORE = 2.0
# - diversity_score and mean_image_score (per caption): real renders ~1, the per-caption mean image (what a model
#   that regresses to the mean draws) 0, and samples that ignore their noise have diversity 0. Below 0.3 the samples
#   are much closer to one blurred average than real renders ever are.
MEAN_IMAGE_MAX_SCORE = 0.3
# - t2i_character: the judge reads one of the 10 characters (or none), so guessing scores 1/10. 0.3 is 3x chance:
#   with the default 80 images (40 held-out captions x 2) that is ~6 standard deviations above it.
CHANCE_CHARACTER_ACCURACY = 1 / 10  # len(transfusion_hf.data.glyphs.CHARACTERS), checked by the test
DRAWS_MIN_CHARACTER_ACCURACY = 0.3

VERDICT_OK = "draws"
TABLE_HEADERS = (
    "preset",
    "prediction",
    "patch encoder",
    "patch",
    "steps",
    "train min",
    "t2i char acc",
    "t2i all acc",
    "caption acc",
    "seam",
    "diversity",
    "verdict",
)


@dataclass
class Preset:
    """A model preset: its name, json file and contents (keys starting with `_` are comments, dropped)."""

    name: str
    path: Path
    config: dict[str, Any]

    @property
    def backbone_size(self) -> int:
        """`hidden_size * num_hidden_layers` of the backbone: the yardstick for "too big to train on CPU"."""
        text_config = self.config.get("text_config", {})
        return int(text_config.get("hidden_size", 0)) * int(text_config.get("num_hidden_layers", 0))


# ------------------------------------------------------------------------------------------------- arguments
def available_presets() -> dict[str, Path]:
    """Recipe name -> json file, for every recipe of `transfusion_hf.recipes`."""
    from transfusion_hf.recipes import list_recipes, recipe_path

    return {name: recipe_path(name) for name in list_recipes()}


def load_preset(name: str, path: Path) -> Preset:
    """Read one recipe's model fields."""
    from transfusion_hf.recipes import load_recipe

    return Preset(name, path, load_recipe(path).model)


def build_parser() -> argparse.ArgumentParser:
    """The command-line options (extra training flags go after `--` and are split off before parsing)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        usage="%(prog)s [options] [-- extra flags for examples/train_transfusion.py]",
    )
    parser.add_argument("--presets", nargs="+", default=None, help="preset names (default: every CPU-sized one)")
    parser.add_argument("--num_samples", type=int, default=20000, help="images in the glyphs image folder")
    parser.add_argument("--resolution", type=int, default=32)
    # The default preset draws the glyphs after ~3,400 steps (34 minutes on 2 threads); at 1,500 every preset is near
    # chance, so a shorter default would only measure the budget (README, "The U-Net's output shortcut").
    parser.add_argument("--max_train_steps", type=int, default=None, help="default: the recipe's own step count")
    parser.add_argument(
        "--max_train_time_minutes", type=float, default=None, help="per recipe; default: no cap (the steps decide)"
    )
    parser.add_argument("--work_dir", default="outputs/presets_draw", help="image folder and one run folder each")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    parser.add_argument("--images_per_caption", type=int, default=2, help="per held-out caption (>= 2)")
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--num_caption_images", type=int, default=80, help="held-out renders to caption")
    parser.add_argument("--include_large", action="store_true", help="also presets too big to train on CPU")
    parser.add_argument(
        "--prepare_only",
        action="store_true",
        help="only write the image folder and train (or load) the glyph judge, so that several invocations can then "
        "run side by side on one --work_dir",
    )
    parser.add_argument(
        "--merge",
        default=None,
        metavar="DIR",
        help="instead of training: join the json files of several invocations found in DIR into --output",
    )
    parser.add_argument("--montage", default=None, help="also write the first prompts of every preset as one png")
    return parser


def split_extra(argv: list[str]) -> tuple[list[str], list[str]]:
    """Our arguments, and the training flags after the first `--`."""
    if "--" not in argv:
        return argv, []
    index = argv.index("--")
    return argv[:index], argv[index + 1 :]


def select_presets(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[Preset], list[str]]:
    """The presets to check and a line per default preset skipped for its size; errors name a bad preset."""
    available = available_presets()
    unknown = [name for name in args.presets or [] if name not in available]
    if unknown:
        parser.error(f"unknown preset(s) {', '.join(unknown)}; available presets: {', '.join(available)}.")
    presets = [load_preset(name, available[name]) for name in args.presets or available]
    large = [p for p in presets if p.backbone_size > CPU_BACKBONE_LIMIT and not args.include_large]
    if args.presets and large:
        # Named on purpose: skipping it silently would let the check pass without checking it.
        names = ", ".join(f"{p.name} (hidden_size x layers = {p.backbone_size})" for p in large)
        parser.error(f"{names} too big to train on CPU (> {CPU_BACKBONE_LIMIT}); pass --include_large to check it.")
    skipped = [
        f"{p.name}: hidden_size x num_hidden_layers = {p.backbone_size} > {CPU_BACKBONE_LIMIT}, too big to train on "
        "CPU (--include_large checks it)"
        for p in large
    ]
    checked = [p for p in presets if p not in large]
    if not checked:
        parser.error("no preset left to check; pass --include_large or --presets.")
    return checked, skipped


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[Preset], list[str]]:
    """Parse and validate everything (presets, numbers, the training flags) before any data is built."""
    parser = build_parser()
    ours, extra = split_extra(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(ours)
    args.extra_train_args = extra
    if args.merge is not None:
        if not Path(args.merge).is_dir():
            parser.error(f"--merge={args.merge!r} is not a folder.")
        return args, [], []
    for name in ("num_samples", "resolution", "num_inference_steps", "num_caption_images"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}.")
    if args.max_train_steps is not None and args.max_train_steps <= 0:
        parser.error(f"--max_train_steps must be positive, got {args.max_train_steps}.")
    if args.max_train_time_minutes is not None and args.max_train_time_minutes <= 0:
        parser.error(f"--max_train_time_minutes must be positive, got {args.max_train_time_minutes}.")
    if args.images_per_caption < 2:
        parser.error(
            f"--images_per_caption must be >= 2 (the diversity score compares two samples of a caption), "
            f"got {args.images_per_caption}."
        )
    args.work_dir = Path(args.work_dir).resolve()
    presets, skipped = select_presets(parser, args)
    check_training_flags(parser, args, presets)
    return args, presets, skipped


def check_training_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, presets: list[Preset]) -> None:
    """Run the training script's own argument checks on each command, so a bad extra flag fails now."""
    # The package's parse_args (the script's own) checks the flags, the recipe and the noising options without loading
    # data; its check that the data source exists would refuse the image folder, which is written only after these.
    from transfusion_hf.training import arguments as training_arguments

    for preset in presets:
        command = train_arguments(args, preset, args.work_dir / "glyphs_folder", args.work_dir / "runs" / preset.name)
        messages = io.StringIO()
        try:
            with contextlib.redirect_stderr(messages):  # its usage text would name our script and list its flags
                with unittest.mock.patch.object(training_arguments, "check_dataset_from_args"):
                    training_arguments.parse_args(command)
        except SystemExit:
            reason = (messages.getvalue().strip().splitlines() or ["?"])[-1].split("error: ", 1)[-1]
            parser.error(f"examples/train_transfusion.py rejects the extra flags {args.extra_train_args}: {reason}")
        except ValueError as error:
            parser.error(f"examples/train_transfusion.py rejects preset {preset.name}: {error}")


# ------------------------------------------------------------------------------------------------------ data
def build_image_folder(work_dir: Path, num_samples: int, resolution: int) -> Path:
    """Write the glyphs train split as `work_dir/glyphs_folder/` (PNG files + `metadata.jsonl`), once.

    A stamp next to the folder records what it holds; a folder for other settings (or from an interrupted build,
    which never gets a stamp) is rebuilt.
    """
    from datasets import Image as ImageFeature

    from transfusion_hf.data.glyphs import RENDER_VERSION, font_signature, load_glyphs_dataset

    folder, stamp_path = work_dir / "glyphs_folder", work_dir / "glyphs_folder.json"
    stamp = {
        "source": "transfusion_hf.data.glyphs.load_glyphs_dataset",
        "split": "train",
        "seed": 0,
        "num_samples": num_samples,
        "resolution": resolution,
        "render_version": RENDER_VERSION,
        "fonts": font_signature(),
    }
    if folder.is_dir() and stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        print(f"Reusing the image folder {folder} ({num_samples} images at {resolution} px).")
        return folder
    start = time.perf_counter()
    stamp_path.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    partial = work_dir / "glyphs_folder.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    dataset = load_glyphs_dataset(split="train", num_samples=num_samples, seed=0, resolution=resolution)
    # Undecoded: the rows already hold PNG bytes, written as they are (no decode / re-encode round trip).
    dataset = dataset.cast_column("image", ImageFeature(decode=False))
    with (partial / "metadata.jsonl").open("w") as metadata:
        for index, (image, text) in enumerate(zip(dataset["image"], dataset["text"], strict=True)):
            file_name = f"{index:06d}.png"
            (partial / file_name).write_bytes(image["bytes"])
            metadata.write(json.dumps({"file_name": file_name, "text": text}) + "\n")
    partial.rename(folder)
    stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
    print(f"Wrote {num_samples} images to {folder} in {time.perf_counter() - start:.1f} s.")
    return folder


# -------------------------------------------------------------------------------------------------- training
def train_arguments(args: argparse.Namespace, preset: Preset, folder: Path, run_dir: Path) -> list[str]:
    """The flags of `examples/train_transfusion.py` for one recipe: data and run flags only, so the recipe's own
    defaults (model and training hyper-parameters) are what gets checked."""
    return [
        "--train_data_dir", str(folder),
        "--resolution", str(args.resolution),
        "--recipe", preset.name,
        "--output_dir", str(run_dir),
        *(["--max_train_steps", str(args.max_train_steps)] if args.max_train_steps else []),
        *(["--max_train_time_minutes", str(args.max_train_time_minutes)] if args.max_train_time_minutes else []),
        "--report_to", "none",
        "--checkpointing_steps", "0",
        *args.extra_train_args,
    ]  # fmt: skip


def train(args: argparse.Namespace, preset: Preset, folder: Path, run_dir: Path) -> dict[str, Any]:
    """Train one preset in a subprocess (its output goes to `run_dir/train.log`). Returns steps and minutes, or
    the error when the run failed."""
    # A fresh folder: the script appends to an existing train log and would resume from stale checkpoints.
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    log_path = run_dir / "train.log"
    command = [sys.executable, str(TRAIN_SCRIPT), *train_arguments(args, preset, folder, run_dir)]
    print(f"[{preset.name}] training: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    with log_path.open("w") as log:
        returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_DIR).returncode
    minutes = (time.perf_counter() - start) / 60
    result: dict[str, Any] = {"train_minutes": minutes, "train_log": str(log_path)}
    summary_path = run_dir / "training_summary.json"
    if returncode != 0 or not summary_path.is_file():
        tail = log_path.read_text().splitlines()[-15:]
        print(f"[{preset.name}] training failed (exit {returncode}); last lines of {log_path}:", *tail, sep="\n")
        return {**result, "error": f"training exited with status {returncode}"}
    result["steps"] = json.loads(summary_path.read_text())["global_step"]
    # Whether the training script warned, before training, that this preset does not draw such images (the preset's
    # `_warning`): a preset that fails the check without that warning fails silently.
    result["warned"] = f"--recipe {preset.name}:" in log_path.read_text()
    print(f"[{preset.name}] trained {result['steps']} steps in {minutes:.1f} min.", flush=True)
    return result


# ------------------------------------------------------------------------------------------------ evaluation
def verdict(metrics: dict[str, float]) -> tuple[str, str]:
    """The failure mode the metrics show first (a mosaic, then a collapse to the mean), else "draws" when the
    characters are read back clearly above chance, else "noise". Returns the verdict and why."""
    seam, diversity, mean_image = metrics["seam_score"], metrics["diversity_score"], metrics["mean_image_score"]
    character = metrics["t2i_character"]
    if seam > MOSAIC_MIN_SEAM_SCORE:
        return "mosaic", f"seam score {seam:.2f} > {MOSAIC_MIN_SEAM_SCORE} (real renders ~1)"
    if min(diversity, mean_image) < MEAN_IMAGE_MAX_SCORE:
        return "mean image", (
            f"diversity {diversity:.2f} / mean-image score {mean_image:.2f}: one below {MEAN_IMAGE_MAX_SCORE} "
            "(real renders ~1)"
        )
    if character >= DRAWS_MIN_CHARACTER_ACCURACY:
        return VERDICT_OK, f"t2i character accuracy {character:.2f} >= {DRAWS_MIN_CHARACTER_ACCURACY}"
    return "noise", (
        f"t2i character accuracy {character:.2f} < {DRAWS_MIN_CHARACTER_ACCURACY} "
        f"(chance {CHANCE_CHARACTER_ACCURACY:.2f}); sharpness {metrics.get('sharpness_score', float('nan')):.2f} "
        "(real renders 1, pure noise >> 1)"
    )


def evaluate(args: argparse.Namespace, run_dir: Path, judge: GlyphJudge) -> dict[str, Any]:
    """Load the saved pipeline, score it on the held-out glyphs and save its samples grid."""
    import torch

    from transfusion_hf import TransfusionPipeline
    from transfusion_hf.evaluation.glyphs_benchmark import evaluate_glyphs
    from transfusion_hf.visualization import make_grid

    pipeline = TransfusionPipeline.from_pretrained(str(run_dir))
    pipeline.to("cuda" if torch.cuda.is_available() else "cpu")
    pipeline.set_progress_bar_config(disable=True)
    config = pipeline.transformer.config
    evaluation = evaluate_glyphs(
        pipeline,
        images_per_caption=args.images_per_caption,
        num_inference_steps=args.num_inference_steps,
        num_caption_images=args.num_caption_images,
        judge=judge,
    )
    grid_path = run_dir / "samples_grid.png"
    columns = 2 * args.images_per_caption
    make_grid(evaluation.images, evaluation.prompts, columns=columns).save(grid_path)
    grid_lines = -(-len(evaluation.images) // columns)
    name, reason = verdict(evaluation.metrics)
    return {
        "prediction_type": config.prediction_type,
        "patch_encoder": config.patch_encoder,
        "patch_size": config.patch_size,
        "metrics": evaluation.metrics,
        "verdict": name,
        "reason": reason,
        "samples_grid": str(grid_path),
        "samples_grid_lines": grid_lines,
    }


def check_preset(args: argparse.Namespace, preset: Preset, folder: Path, judge: GlyphJudge) -> dict[str, Any]:
    """Train and score one preset; a failed training run gets the verdict "training failed"."""
    run_dir = args.work_dir / "runs" / preset.name
    row: dict[str, Any] = {
        "preset": preset.name,
        "config": str(preset.path),
        "backbone_size": preset.backbone_size,
        "run_dir": str(run_dir),
    }
    row.update(train(args, preset, folder, run_dir))
    if "error" in row:
        row.update(verdict="training failed", reason=row["error"])
        return row
    start = time.perf_counter()
    row.update(evaluate(args, run_dir, judge))
    row["eval_minutes"] = (time.perf_counter() - start) / 60
    print(f"[{preset.name}] {row['verdict']}: {row['reason']}. Samples: {row['samples_grid']}", flush=True)
    return row


# ---------------------------------------------------------------------------------------------------- output
def table_row(row: dict[str, Any]) -> list[object]:
    """One line of the markdown table (dashes where training failed)."""
    metrics = row.get("metrics", {})

    def cell(value: object) -> object:
        return "-" if value is None else value

    return [
        row["preset"],
        cell(row.get("prediction_type")),
        cell(row.get("patch_encoder")),
        cell(row.get("patch_size")),
        cell(row.get("steps")),
        round(row["train_minutes"], 2),
        *(cell(metrics.get(key)) for key in ("t2i_character", "t2i_accuracy", "caption_accuracy")),
        *(cell(metrics.get(key)) for key in ("seam_score", "diversity_score")),
        row["verdict"] + (" (warned)" if row.get("warned") and row["verdict"] != VERDICT_OK else ""),
    ]


def thresholds() -> dict[str, float]:
    """The verdict thresholds, for the json."""
    return {
        "mosaic_min_seam_score": MOSAIC_MIN_SEAM_SCORE,
        "mean_image_max_score": MEAN_IMAGE_MAX_SCORE,
        "draws_min_character_accuracy": DRAWS_MIN_CHARACTER_ACCURACY,
        "chance_character_accuracy": CHANCE_CHARACTER_ACCURACY,
        "cpu_backbone_limit": CPU_BACKBONE_LIMIT,
    }


def outcome(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether every preset draws, and the presets that do not and were not warned about by the training script:
    the check fails on those (the issue's bar: no preset may silently draw the mean image or a mosaic)."""
    return {
        "all_draw": all(row["verdict"] == VERDICT_OK for row in rows),
        "silent_failures": [row["preset"] for row in rows if row["verdict"] != VERDICT_OK and not row.get("warned")],
    }


def summary(result: dict[str, Any]) -> str:
    """The last line printed: does every preset draw, and which fail without a warning."""
    silent = ", ".join(result["silent_failures"]) or "none"
    return f"Every checked preset draws: {result['all_draw']}. Not drawing without a warning: {silent}."


def run(args: argparse.Namespace, presets: list[Preset], skipped: list[str], judge: GlyphJudge | None) -> dict:
    """Build the image folder, check every preset, print the table and write the json."""
    import torch

    from bench_common import environment, markdown_table, write_json
    from transfusion_hf.evaluation.glyph_judge import default_glyph_judge

    for line in skipped:
        print(f"Skipping {line}.")
    folder = build_image_folder(args.work_dir, args.num_samples, args.resolution)
    judge = judge or default_glyph_judge()  # once, before the first run, not inside the timed evaluations
    rows = [check_preset(args, preset, folder, judge) for preset in presets]
    print()
    print(markdown_table(TABLE_HEADERS, [table_row(row) for row in rows]))
    result = {
        "benchmark": "presets_draw",
        "args": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "image_folder": str(folder),
        "thresholds": thresholds(),
        "skipped": skipped,
        "rows": rows,
        **outcome(rows),
        "environment": environment(torch.get_num_threads()),
    }
    path = write_json(result, args.output)
    print(f"\nWrote {path}. {summary(result)}")
    return result


def prepare(args: argparse.Namespace, judge: GlyphJudge | None) -> dict[str, Any]:
    """`--prepare_only`: the image folder and the glyph judge (trained once, then cached), nothing else."""
    from transfusion_hf.evaluation.glyph_judge import default_glyph_judge

    build_image_folder(args.work_dir, args.num_samples, args.resolution)
    if judge is None:
        default_glyph_judge()
    return {"all_draw": True, "silent_failures": []}


def merge(args: argparse.Namespace) -> dict[str, Any]:
    """`--merge DIR`: the rows of every benchmark json in DIR (one invocation per preset run side by side) in one
    result, with its table and, with `--montage`, the first prompts of each preset."""
    from bench_common import markdown_table, write_json

    parts = [json.loads(path.read_text()) for path in sorted(Path(args.merge).glob("*.json"))]
    parts = [part for part in parts if part.get("benchmark") == "presets_draw"]
    if not parts:
        raise SystemExit(f"error: no presets_draw json in {args.merge}.")
    rows = [row for part in parts for row in part["rows"]]
    print(markdown_table(TABLE_HEADERS, [table_row(row) for row in rows]))
    result = {
        **parts[0],
        "args": [part["args"] for part in parts],
        "skipped": sorted({line for part in parts for line in part["skipped"]}),
        "rows": rows,
        **outcome(rows),
    }
    print(f"Wrote {write_json(result, args.output)}. {summary(result)}")
    if args.montage:
        write_montage(rows, Path(args.montage))
    return result


def write_montage(rows: list[dict[str, Any]], path: Path, num_lines: int = 3) -> None:
    """The first `num_lines` lines of each preset's samples grid, two presets side by side, each under its name."""
    from PIL import Image, ImageDraw

    grids = [
        (row["preset"], Image.open(row["samples_grid"]).convert("RGB"), row["samples_grid_lines"])
        for row in rows
        if row.get("samples_grid")
    ]
    if not grids:
        return
    line_height = grids[0][1].height // grids[0][2]
    width, height = grids[0][1].width, line_height * num_lines + 24
    montage = Image.new("RGB", (2 * width, height * ((len(grids) + 1) // 2)), "white")
    draw = ImageDraw.Draw(montage)
    for index, (name, grid, _) in enumerate(grids):
        x, y = (index % 2) * width, (index // 2) * height
        draw.text((x + 6, y + 6), f"preset {name}", fill="black")
        montage.paste(grid.crop((0, 0, width, line_height * num_lines)), (x, y + 24))
    path.parent.mkdir(parents=True, exist_ok=True)
    montage.save(path)
    print(f"Wrote {path}.")


def main(argv: list[str] | None = None, judge: GlyphJudge | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what it writes to `--output` (the check passes when `silent_failures` is empty:
    every preset draws or the training script warned that it does not).

    `judge`: the glyph judge (default: `default_glyph_judge()`, trained on first use, then cached); tests pass a
    smaller one.
    """
    args, presets, skipped = parse_args(argv)  # before any heavy import or data
    if args.merge is not None:
        return merge(args)
    if args.prepare_only:
        return prepare(args, judge)
    return run(args, presets, skipped, judge)


if __name__ == "__main__":
    sys.exit(1 if main()["silent_failures"] else 0)
