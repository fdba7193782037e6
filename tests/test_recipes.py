"""The named recipes (`transfusion_hf.recipes`): one source for the model config and the training defaults."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from transfusion_hf import TransfusionConfig, TransfusionForMixedModal
from transfusion_hf.recipes import DEFAULT_RECIPE, TRAINING_FIELDS, list_recipes, load_recipe


def test_the_package_ships_its_recipes():
    assert list_recipes() == ["paper_0.16b", "small", "small_epsilon", "tiny"]
    assert DEFAULT_RECIPE == "small"
    for name in list_recipes():
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.description
        assert recipe.model["text_config"]["model_type"] == "llama"
        assert set(recipe.training) <= set(TRAINING_FIELDS)
        # Every recipe builds a config as it is.
        config = TransfusionConfig.from_recipe(name, vocab_size=128)
        assert config.vocab_size == 128 and config.prediction_type == recipe.model["prediction_type"]


def test_the_default_recipe_is_the_one_that_draws():
    """What the demo and the glyph folder measured (docs/research/recipes.md): U-Net 8x8 with both shortcuts,
    rectified flow, logit-normal times, learning rate 2e-3, 2,000 steps of 32."""
    recipe = load_recipe()
    assert recipe.name == "small"
    config = TransfusionConfig.from_recipe(vocab_size=64)
    assert (config.patch_encoder, config.patch_size, config.prediction_type) == ("unet", 8, "flow_prediction")
    assert config.unet_linear_shortcut and config.unet_output_shortcut
    assert (config.latent_channels, config.latent_size, config.num_patches) == (3, 32, 16)
    assert recipe.training == {
        "learning_rate": 2e-3,
        "lr_warmup_steps": 100,
        "timestep_sampling": "logit_normal",
        "train_batch_size": 32,
        "max_train_steps": 2000,
    }
    # The class's own defaults stay the paper's (saved checkpoints store only the fields that differ from them).
    assert (TransfusionConfig().prediction_type, TransfusionConfig().patch_encoder) == ("epsilon", "linear")


def test_from_recipe_takes_overrides_and_builds_a_model():
    config = TransfusionConfig.from_recipe("tiny", vocab_size=40, latent_channels=4, latent_size=4)
    assert (config.latent_channels, config.latent_size, config.image_token_id) == (4, 4, 39)
    model = TransfusionForMixedModal(config)
    assert model.config.patch_size == 2


def test_flow_only_timestep_sampling_falls_back_for_epsilon():
    recipe = load_recipe("small")
    assert recipe.training_defaults()["timestep_sampling"] == "logit_normal"
    assert recipe.training_defaults("epsilon")["timestep_sampling"] == "uniform"
    assert recipe.training_defaults("flow_prediction") == recipe.training


def test_several_image_sizes_add_half_the_steps_each():
    """Aspect-ratio buckets share the recipe's steps (measured, two seeds: 2 sizes 0.85 / 0.97 at 1x, 0.96 / 0.98 at
    1.5x): the training script's default grows with them, a --max_train_steps given wins, and a bad flag still fails
    on its own check."""
    from transfusion_hf import training

    recipe = load_recipe("small")
    assert [recipe.training_defaults(num_image_sizes=k)["max_train_steps"] for k in (1, 2, 3)] == [2000, 3000, 4000]
    with pytest.raises(ValueError, match="num_image_sizes"):
        recipe.training_defaults(num_image_sizes=0)
    base = ["--dataset", "shapes", "--output_dir", "unused"]
    assert training.parse_args(base).max_train_steps == 2000
    assert training.parse_args([*base, "--aspect_ratio_buckets", "32x32,32x48"]).max_train_steps == 3000
    assert training.parse_args([*base, "--aspect_ratio_buckets", "32x32,32x48,48x32"]).max_train_steps == 4000
    assert (
        training.parse_args([*base, "--aspect_ratio_buckets", "32x48", "--max_train_steps", "7"]).max_train_steps == 7
    )
    with pytest.raises(ValueError, match="--aspect_ratio_buckets='32x30'"):
        training.parse_args([*base, "--aspect_ratio_buckets", "32x30"])


def test_a_retired_name_loads_its_successor(caplog):
    with caplog.at_level("WARNING", logger="transfusion_hf.recipes"):
        recipe = load_recipe("small_unet")
    assert recipe.name == "small" and "now loads small" in caplog.text


def test_a_json_recipe_of_the_users(tmp_path):
    # The full format.
    recipe = {"model": load_recipe("tiny").model, "training": {"learning_rate": 5e-4}, "description": "mine"}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(recipe))
    loaded = load_recipe(path)
    assert loaded.training == {"learning_rate": 5e-4} and loaded.name == str(path)
    # A bare model preset (the former examples/configs format): a model and no training part.
    bare = {"_comment": "x", "_warning": {"text": "careful", "except_dataset": "shapes"}, **load_recipe("tiny").model}
    path.write_text(json.dumps(bare))
    loaded = load_recipe(path)
    assert loaded.model == load_recipe("tiny").model and loaded.training == {}
    assert (loaded.warning, loaded.warning_except_dataset) == ("careful", "shapes")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"model": {"patch_size": 2}}, "needs a `text_config`"),
        ({"model": {"text_config": {}}, "training": {"learning_rat": 1e-3}}, r"training keys \['learning_rat'\]"),
        ({"model": {"text_config": {}}, "optim": {}}, r"unknown keys \['optim'\]"),
        ("[1, 2]", "must hold a json object"),
        ("{not json", "not valid json"),
    ],
)
def test_bad_recipes_are_refused_naming_the_field(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=message):
        load_recipe(path)


def test_unknown_names_list_the_recipes():
    with pytest.raises(ValueError, match=r"recipe='huge' is neither a json file nor a recipe \['paper_0.16b'"):
        load_recipe("huge")
    with pytest.raises(ValueError, match="no such json file"):
        load_recipe("missing.json")


def test_the_steps_rule_is_logged_when_the_script_runs(tmp_path):
    """The training script configures its logging before it parses the flags, so the line saying that several image
    sizes raised the steps reaches the user (parsing had logged it into the void)."""
    code = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "from pathlib import Path\n"
        "from script_loading import load_script\n"
        "script = load_script(Path('examples/train_transfusion.py'))\n"
        "script.setup_accelerator = lambda args: sys.exit(3)  # stop right after parsing\n"
        "script.main(['--dataset', 'shapes', '--output_dir', sys.argv[1], '--aspect_ratio_buckets', '32x32,32x48'])\n"
    )
    repo = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=repo)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "2 image sizes share the steps, so the recipe trains 3000" in result.stderr
