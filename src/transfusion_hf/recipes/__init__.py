"""Named training recipes: one place for what a tuned run learned.

A recipe is a json file (package data here, or a path of the user's) with three parts:

- ``model``: the fields of a [`TransfusionConfig`] (the backbone's ``text_config`` and the image / diffusion fields).
  ``latent_channels`` / ``latent_size`` say what the recipe was tuned for; the training script sets them from the
  data (pixel space or a VAE) and the resolution.
- ``training``: the training script's defaults for this recipe (``learning_rate``, ``lr_warmup_steps``,
  ``timestep_sampling``, ``train_batch_size``, ``max_train_steps``, ...; see ``TRAINING_FIELDS``). A flag given on
  the command line wins.
- ``description`` (and optionally ``warning``, said before training starts).

``examples/train_transfusion.py`` trains ``--recipe small`` by default, so its defaults are this package's default
recipe, and ``examples/shapes_demo.py`` adds only data flags. From Python:

```python
>>> from transfusion_hf import TransfusionConfig
>>> from transfusion_hf.recipes import load_recipe
>>> recipe = load_recipe("small")
>>> recipe.training["learning_rate"]
0.002
>>> config = TransfusionConfig.from_recipe("small", vocab_size=512)
```

A json file holding only model fields (the format of the former ``examples/configs/model_*.json`` presets) is read as
a recipe with that model and no training defaults.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RECIPE_DIR = Path(__file__).resolve().parent
DEFAULT_RECIPE = "small"

# The training hyper-parameters a recipe may set: the training script's flags of the same names. Data, output and
# logging flags are not part of a recipe (they say where and how to run, not how to train).
TRAINING_FIELDS = (
    "learning_rate",
    "lr_scheduler",
    "lr_warmup_steps",
    "min_lr_ratio",
    "train_batch_size",
    "gradient_accumulation_steps",
    "max_train_steps",
    "adam_beta1",
    "adam_beta2",
    "adam_weight_decay",
    "adam_epsilon",
    "max_grad_norm",
    "use_ema",
    "ema_decay",
    "timestep_sampling",
    "logit_mean",
    "logit_std",
    "importance_exponent",
    "noise_offset",
    "snr_gamma",
    "snr_weighting",
    "normalize_snr_weights",
    "image_first_probability",
    "image_first_max_timestep",
    "caption_dropout_probability",
    "num_inference_steps",
    "guidance_scale",
)
# Timestep samplings that exist for rectified flow only (`TransfusionNoiser`): a recipe's choice is dropped, back to
# uniform times, when a run switches the objective to epsilon or v prediction.
FLOW_ONLY_TIMESTEP_SAMPLINGS = ("logit_normal",)

# A recipe's `max_train_steps` is for images of one size. Aspect-ratio buckets share those steps, and each size has
# grid cells (positions) the others never train, so every size beyond the first adds half the steps again. On the
# built-in shapes (docs/research/image_sizes.md): two sizes drew 0.85 and 0.97 of the prompts right (two seeds) at
# the square recipe's steps and 0.96 and 0.98 at 1.5x; three sizes 0.78 at 1,700 steps and 0.98 at 3,400 (2x).
EXTRA_STEPS_PER_IMAGE_SIZE = 0.5

# Retired names: the old name loads its successor, with a warning that says what changed.
RECIPE_ALIASES = {
    "small_unet": (
        "small",
        "the same U-Net patch layers at half the width (8 -> 64 channels); --unet_block_out_channels 16 32 64 128 "
        "--unet_norm_num_groups 8 gives the former width.",
    ),
    "shapes": (
        "small",
        "the built-in demo now trains the default recipe (U-Net patch layers), which draws the shapes and "
        "real-looking images alike, where the linear 8x8 patches of `shapes` drew mosaics of tiles on real-looking "
        "images; --patch_encoder linear gives the former model.",
    ),
}


@dataclass(frozen=True)
class TransfusionRecipe:
    """A named recipe: model config fields, training defaults and what it is for.

    Args:
        name (`str`): the recipe's name (file stem) or the path it was read from.
        model (`dict`): [`TransfusionConfig`] fields, `text_config` included.
        training (`dict`): training-script defaults, keys of `TRAINING_FIELDS`.
        description (`str`): what the recipe is for and what it was measured to do.
        warning (`str`, *optional*): said before training with this recipe (e.g. a smoke-test recipe that does not
            draw real images).
        warning_except_dataset (`str`, *optional*): a built-in data set (`--dataset_name`) the warning spares, the
            one the recipe is made for.
    """

    name: str
    model: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    warning: str | None = None
    warning_except_dataset: str | None = None

    def training_defaults(self, prediction_type: str | None = None, num_image_sizes: int = 1) -> dict[str, Any]:
        """The training defaults for a run of `prediction_type` (default: the recipe's own): a flow-only timestep
        sampling falls back to uniform times for epsilon or v prediction; with images of several sizes
        (`--aspect_ratio_buckets`) `max_train_steps` grows by [`EXTRA_STEPS_PER_IMAGE_SIZE`] of itself per size
        beyond the first.

        Args:
            prediction_type (`str`, *optional*): the run's objective, if it overrides the recipe's.
            num_image_sizes (`int`, *optional*, defaults to 1): the run's aspect-ratio buckets (1: square images).
        """
        defaults = dict(self.training)
        prediction_type = prediction_type or self.model.get("prediction_type", "epsilon")
        if prediction_type != "flow_prediction" and defaults.get("timestep_sampling") in FLOW_ONLY_TIMESTEP_SAMPLINGS:
            defaults["timestep_sampling"] = "uniform"
        if num_image_sizes < 1:
            raise ValueError(f"`num_image_sizes` must be at least 1, got {num_image_sizes}.")
        if "max_train_steps" in defaults and num_image_sizes > 1:
            scale = 1 + EXTRA_STEPS_PER_IMAGE_SIZE * (num_image_sizes - 1)
            defaults["max_train_steps"] = round(defaults["max_train_steps"] * scale)
        return defaults


def list_recipes() -> list[str]:
    """Names of the recipes shipped with the package."""
    return sorted(path.stem for path in RECIPE_DIR.glob("*.json"))


def resolve_recipe_name(name_or_path: str | Path) -> tuple[str | Path, str | None]:
    """A retired recipe name -> (its successor, what changed); anything else (a json path too) -> (itself, None)."""
    if str(name_or_path) in RECIPE_ALIASES and not Path(name_or_path).is_file():
        return RECIPE_ALIASES[str(name_or_path)]
    return name_or_path, None


def recipe_path(name_or_path: str | Path) -> Path:
    """The json file of a recipe name (or retired alias) of the package, or a json path."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise ValueError(f"recipe={str(name_or_path)!r}: no such json file.")
        return path
    path = RECIPE_DIR / f"{resolve_recipe_name(name_or_path)[0]}.json"
    if not path.is_file():
        raise ValueError(f"recipe={str(name_or_path)!r} is neither a json file nor a recipe {list_recipes()}.")
    return path


def load_recipe(name_or_path: str | Path = DEFAULT_RECIPE) -> TransfusionRecipe:
    """Read a recipe by name (`list_recipes()`; a retired alias warns and loads its successor) or from a json path.

    Args:
        name_or_path (`str` or `Path`): e.g. `"small"` (the default), `"tiny"`, `"paper_0.16b"`, or a json file.

    Raises:
        ValueError: naming the recipe and the field: an unknown name, unreadable json, a training key that is not a
            training hyper-parameter.
    """
    new_name, what_changed = resolve_recipe_name(name_or_path)
    if what_changed is not None:
        logger.warning(f"recipe {name_or_path} now loads {new_name}: {what_changed}")
        name_or_path = new_name
    path = recipe_path(name_or_path)
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"recipe={str(name_or_path)!r} ({path}) is not valid json: {error}") from error
    if not isinstance(content, dict):
        raise ValueError(f"recipe={str(name_or_path)!r} ({path}) must hold a json object.")
    name = path.stem if path.parent == RECIPE_DIR else str(path)
    # A warning is a string, or {"text": ..., "except_dataset": ...} (also the `_warning` of the former presets).
    warning = content.get("warning", content.get("_warning"))
    except_dataset = warning.get("except_dataset") if isinstance(warning, dict) else None
    warning = warning.get("text") if isinstance(warning, dict) else warning
    if "model" in content:
        unknown = sorted(set(content) - {"model", "training", "description", "warning"})
        if unknown:
            raise ValueError(
                f"recipe={name!r}: unknown keys {unknown} (expected model, training, description, warning)."
            )
        model = dict(content["model"])
        training = dict(content.get("training", {}))
        description = content.get("description", "")
        unknown = sorted(set(training) - set(TRAINING_FIELDS))
        if unknown:
            raise ValueError(
                f"recipe={name!r}: training keys {unknown} are not training hyper-parameters {TRAINING_FIELDS}."
            )
    else:
        # A bare model preset: its fields are the model (keys starting with `_` are comments), no training part.
        model = {key: value for key, value in content.items() if not key.startswith("_")}
        training, description = {}, ""
    if "text_config" not in model:
        raise ValueError(f"recipe={name!r}: the model needs a `text_config` (the backbone).")
    return TransfusionRecipe(name, model, training, description, warning, except_dataset)


__all__ = [
    "DEFAULT_RECIPE",
    "EXTRA_STEPS_PER_IMAGE_SIZE",
    "RECIPE_ALIASES",
    "TRAINING_FIELDS",
    "TransfusionRecipe",
    "list_recipes",
    "load_recipe",
    "recipe_path",
    "resolve_recipe_name",
]
