#!/usr/bin/env python
"""Train a Transfusion model with Accelerate: from scratch or from a pretrained decoder LLM (optionally with LoRA, or
with image copies of its weights and the text frozen: --modality_experts --freeze_text), on a Hub data set, a local
image folder, or the built-in captioned shapes, optionally with text-only data mixed in and the sequences packed
(`--text_dataset_name`, `--max_sequence_length`).

    accelerate launch examples/train_transfusion.py --dataset_name shapes --output_dir outputs/shapes

Its defaults are the package's default recipe (`--recipe small`, `transfusion_hf.recipes`): the model config and the
training hyper-parameters measured to draw what the prompt says on a CPU, in pixel space or on a VAE's latents
(rectified flow, logit-normal times, learning rate 2e-3, 1,700 steps of 32). A flag given on the command line wins over
the recipe. Beyond the recipe, the paper's choices (section 4.1): lambda = 5, 80/20 caption-first/image-first pairs, a
noise limit of t <= 500 on image-first pairs, AdamW (0.9, 0.95), weight decay 0.1 (not on biases, norms and
embeddings), gradient clipping 1.0, warmup then cosine to 5% of the peak learning rate (transformers'
`cosine_warmup_with_min_lr` schedule). The paper's epsilon prediction on DDPM's cosine schedule (`--prediction_type
epsilon`) ignores the prompt at small scale; with `--snr_gamma 20 --snr_weighting truncated_min_snr
--timestep_sampling importance` it draws, in more steps than flow. Every `--validation_steps` (250) the run logs, with a grid of
samples, the text-conditioning gap: how much the diffusion loss of 64 fixed pairs rises when each image gets another
image's caption (about 0 for a model that ignores the prompt).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
import time
from datetime import timedelta
from functools import partial
from itertools import chain
from pathlib import Path
from typing import NamedTuple

import datasets
import torch
from accelerate import Accelerator
from accelerate import __version__ as accelerate_version
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    DistributedType,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    parse_flag_from_env,
    set_seed,
)
from diffusers import AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    SchedulerType,
    get_scheduler,
)

from transfusion_hf import TransfusionConfig, TransfusionForMixedModal
from transfusion_hf.configuration_transfusion import PREDICTION_TYPES
from transfusion_hf.data.image_text import add_data_arguments, check_image_text_source, load_dataset_from_args
from transfusion_hf.data.latent_cache import LATENT_DTYPES, cache_latents, encoder_fingerprint
from transfusion_hf.data.streaming import StreamingLatentBatches, take_captions, take_examples
from transfusion_hf.data.text import load_text_dataset, text_only_examples
from transfusion_hf.latents_transfusion import pixels_to_latents
from transfusion_hf.modality_experts import freeze_text_weights
from transfusion_hf.noising import TransfusionNoiser
from transfusion_hf.pipeline_transfusion import TransfusionPipeline
from transfusion_hf.processing_transfusion import (
    TransfusionDataCollator,
    TransfusionProcessor,
    add_special_tokens,
    special_token_ids,
)
from transfusion_hf.recipes import DEFAULT_RECIPE, list_recipes, load_recipe, resolve_recipe_name
from transfusion_hf.tokenization_transfusion import train_bpe_tokenizer
from transfusion_hf.training import text_conditioning_gap
from transfusion_hf.training_utils import (
    CleanImageErrorTracker,
    GradNormWindow,
    NonFiniteLossError,
    StepLosses,
    TrainingClock,
    check_finite,
    checkpoint_step,
    follow_time_budget,
    num_real_tokens,
    resolve_checkpoint,
    save_checkpoint,
    weight_decay_parameter_groups,
)
from transfusion_hf.visualization import make_grid

logger = logging.getLogger("train_transfusion")
# transformers' schedules that need only the warmup and total steps (reduce_lr_on_plateau and greedy step on a metric,
# warmup_stable_decay needs its own phase lengths).
LR_SCHEDULERS = [
    kind.value
    for kind in SchedulerType
    if kind not in (SchedulerType.REDUCE_ON_PLATEAU, SchedulerType.GREEDY, SchedulerType.WARMUP_STABLE_DECAY)
]
MIN_LR_SCHEDULERS = (SchedulerType.COSINE_WARMUP_WITH_MIN_LR.value, SchedulerType.COSINE_WITH_MIN_LR.value)
# Warmup (step + 1) / warmup_steps (the first step already learns), then cosine to the floor at the last step.
# `cosine_with_min_lr` is the same with a warmup from 0, one step later.
DEFAULT_LR_SCHEDULER = SchedulerType.COSINE_WARMUP_WITH_MIN_LR.value
DEFAULT_MIN_LR_RATIO = 0.05  # the paper: 3e-4 -> 1.5e-5
DEFAULT_TEXT_ONLY_SHARE = 0.5
# Pairs of the data on which validation measures the text-conditioning gap (kept in memory with the validation ones).
CONDITIONING_GAP_PAIRS = 64
DEFAULT_VALIDATION_STEPS = 250
# With --streaming the BPE tokenizer learns from the captions of the stream's first rows.
STREAMING_TOKENIZER_ROWS = 10000
# Short names of `--inference_scheduler`; which schedulers fit which prediction type is the pipeline's knowledge
# (`TransfusionPipeline._compatibles`), and any scheduler class it lists is a choice too.
SCHEDULER_ALIASES = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
}
INFERENCE_SCHEDULER_CHOICES = sorted(SCHEDULER_ALIASES) + sorted(
    {scheduler.__name__ for kind in PREDICTION_TYPES for scheduler in TransfusionPipeline.compatible_schedulers(kind)}
)


# --------------------------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = add_data_arguments(parser)
    data.add_argument(
        "--latent_cache_dir",
        default=None,
        help="Folder of the encoded-latent caches (default: transfusion_latents in --cache_dir or the datasets cache).",
    )
    data.add_argument("--encode_batch_size", type=int, default=64, help="Images per VAE call when encoding.")
    data.add_argument("--latent_dtype", choices=LATENT_DTYPES, default="float32", help="dtype of the cached latents.")
    data.add_argument(
        "--streaming",
        action="store_true",
        help="Read the data on the fly (datasets' streaming) and encode each batch when it is drawn, instead of "
        "encoding everything once into the latent cache; resumes exactly on the same number of processes.",
    )
    data.add_argument(
        "--shuffle_buffer_size", type=int, default=1000, help="With --streaming: rows of the shuffle buffer."
    )

    text = parser.add_argument_group("text-only data and packing")
    text.add_argument(
        "--text_dataset_name",
        default=None,
        help="Text-only data mixed in: a Hub data set id, a `datasets` builder name (text, json, ...) or a local "
        ".txt (one document per line) / .jsonl file.",
    )
    text.add_argument("--text_dataset_config_name", default=None)
    text.add_argument(
        "--text_data_files",
        nargs="+",
        default=None,
        help="Files of --text_dataset_name, or alone: local .txt / .jsonl / .json / .csv / .parquet files.",
    )
    text.add_argument("--text_dataset_split", default="train")
    text.add_argument("--text_column", default="text", help="Column of the text data holding the documents.")
    text.add_argument(
        "--text_only_share",
        type=float,
        default=None,
        help=f"Fraction of the training rows that are text-only (default {DEFAULT_TEXT_ONLY_SHARE} with text data).",
    )
    text.add_argument(
        "--num_text_validation_rows",
        type=int,
        default=64,
        help="Rows of the text data held out of training; their LM loss is logged as eval/text_lm_loss.",
    )
    text.add_argument(
        "--max_sequence_length",
        type=int,
        default=None,
        help="Pack several sequences into each row of this many tokens (each attends only to itself, positions "
        "restart per sequence); default: one padded row per sequence.",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--recipe",
        "--model_config",
        dest="recipe",
        default=DEFAULT_RECIPE,
        help=f"A recipe of transfusion_hf.recipes ({', '.join(list_recipes())}; default {DEFAULT_RECIPE}, the one "
        "that draws) or a recipe json path: the model config and this script's training defaults (learning rate, "
        "warmup, timestep sampling, batch, steps); a flag given here wins. `--model_config` is the former name.",
    )
    model.add_argument(
        "--config_overrides",
        default=None,
        help="Fields of the preset's backbone text_config to override when training from scratch, as in "
        "transformers' run_clm.py: e.g. 'num_hidden_layers=4,hidden_size=192'.",
    )
    model.add_argument("--text_model_name_or_path", default=None, help="Start from a pretrained decoder LLM.")
    model.add_argument("--tokenizer_name_or_path", default=None)
    model.add_argument("--tokenizer_vocab_size", type=int, default=512, help="BPE size when training a tokenizer.")
    model.add_argument("--vae_name_or_path", default=None, help="Frozen AutoencoderKL; pixel space without one.")
    model.add_argument("--patch_size", type=int, default=None)
    model.add_argument("--patch_encoder", choices=["linear", "unet"], default=None)
    model.add_argument("--prediction_type", choices=["epsilon", "v_prediction", "flow_prediction"], default=None)
    model.add_argument(
        "--unet_skip_connections",
        choices=["all", "coarse", "fine", "none"],
        default=None,
        help="U-Net levels joined to the up path (config field of the same name).",
    )
    model.add_argument(
        "--unet_block_out_channels",
        type=int,
        nargs="+",
        default=None,
        help="Channels of the U-Net levels, log2(patch_size) + 1 of them (config field of the same name).",
    )
    model.add_argument(
        "--unet_norm_num_groups", type=int, default=None, help="GroupNorm groups of the U-Net blocks (1: LayerNorm)."
    )
    model.add_argument(
        "--image_attention",
        choices=["bidirectional", "causal"],
        default=None,
        help="Attention among the patches of one image (paper, Table 5).",
    )
    model.add_argument(
        "--unet_linear_shortcut",
        choices=["true", "false"],
        default=None,
        help="With the U-Net patch encoder, add a linear projection of each raw patch to its token (config field; "
        "default: true for a U-Net unless the preset sets it).",
    )
    model.add_argument(
        "--unet_output_shortcut",
        choices=["true", "false"],
        default=None,
        help="With the U-Net patch decoder, add a linear projection of each token back to its patch to the U-Net's "
        "output (config field; default: true for a flow U-Net unless the preset sets it, false with epsilon or v).",
    )
    model.add_argument(
        "--patch_position_embedding",
        choices=["true", "false"],
        default=None,
        help="The learned 2D patch-position embedding (beyond the paper).",
    )
    model.add_argument("--lora_rank", type=int, default=0, help="Train the backbone through LoRA of this rank.")
    model.add_argument("--lora_alpha", type=int, default=None)
    model.add_argument(
        "--modality_experts",
        action="store_true",
        help="Image positions get their own copy of every layer's projections, MLP and norms, initialised from the "
        "text weights; one shared attention (config field of the same name; LMFusion).",
    )
    model.add_argument(
        "--freeze_text",
        action="store_true",
        help="With --text_model_name_or_path and --modality_experts: freeze the pretrained text weights (the LLM's "
        "embedding and LM-head rows included) and train the image copies, the patch layers and the new special-token "
        "rows; text-only input then keeps the LLM's logits exactly.",
    )
    model.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "eager", "flex_attention"])

    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--diffusion_loss_weight", type=float, default=5.0)
    recipe.add_argument("--image_first_probability", type=float, default=0.2)
    recipe.add_argument("--image_first_max_timestep", type=int, default=500)
    recipe.add_argument("--caption_dropout_probability", type=float, default=0.1)
    recipe.add_argument(
        "--snr_gamma",
        type=float,
        default=None,
        help="Min-SNR-gamma loss weighting for epsilon and v prediction (Hang et al., 2023; 5.0 is their choice).",
    )
    recipe.add_argument(
        "--snr_weighting",
        choices=["min_snr", "truncated_min_snr"],
        default="min_snr",
        help="With --snr_gamma: clean-image error weighted by min(SNR, gamma), or clip(SNR, 1, gamma) (truncated).",
    )
    recipe.add_argument(
        "--normalize_snr_weights",
        choices=["true", "false"],
        default="false",
        help="With --snr_gamma: divide the weights by their mean over the schedule, so the diffusion loss keeps the "
        "scale --diffusion_loss_weight was set for (the truncated weights average ~12).",
    )
    recipe.add_argument(
        "--timestep_sampling",
        choices=["uniform", "logit_normal", "importance"],
        default="uniform",
        help="Training timesteps: uniform; logit-normal (SD3, flow prediction only); or importance (with --snr_gamma: "
        "drawn in proportion to a power of their SNR weight, --importance_exponent, and each image reweighted so the "
        "expected loss is unchanged, with far less variance).",
    )
    recipe.add_argument("--logit_mean", type=float, default=0.0)
    recipe.add_argument("--logit_std", type=float, default=1.0)
    recipe.add_argument(
        "--importance_exponent",
        type=float,
        default=None,
        help="With --timestep_sampling importance: times drawn in proportion to weight**exponent, in (0, 1] "
        "(default 0.5; 1 gives every image the same weight but few times below t = 750).",
    )

    optim = parser.add_argument_group("optimization")
    optim.add_argument("--train_batch_size", type=int, default=32)
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--max_train_steps", type=int, default=2000)
    optim.add_argument("--max_train_time_minutes", type=float, default=None, help="Stop early after this wall time.")
    optim.add_argument("--learning_rate", type=float, default=3e-4)
    optim.add_argument(
        "--lr_scheduler",
        choices=LR_SCHEDULERS,
        default=DEFAULT_LR_SCHEDULER,
        help="A schedule of `transformers.get_scheduler`; those with a warmup take --lr_warmup_steps.",
    )
    optim.add_argument(
        "--min_lr_ratio",
        type=float,
        default=None,
        help=f"Floor of {' and '.join(MIN_LR_SCHEDULERS)}, relative to the peak (default {DEFAULT_MIN_LR_RATIO}).",
    )
    optim.add_argument("--lr_warmup_steps", type=int, default=100)
    optim.add_argument(
        "--lr_schedule_clock",
        choices=["steps", "time"],
        default="steps",
        help="What moves the schedule: 'steps' (of --max_train_steps), or 'time', with --max_train_time_minutes: the "
        "larger of the step and the spent share of the budget, so a run whose steps do not fit still decays fully.",
    )
    optim.add_argument(
        "--optim",
        choices=["adamw_torch_fused", "adamw_torch"],
        default="adamw_torch_fused",
        help="transformers' names for torch's AdamW: fused (one kernel over every parameter; the optimizer step ~6x "
        "faster than the per-tensor loop for the CPU presets, ~5%% more training steps a minute) or the loop.",
    )
    optim.add_argument("--adam_beta1", type=float, default=0.9)
    optim.add_argument("--adam_beta2", type=float, default=0.95)
    optim.add_argument("--adam_weight_decay", type=float, default=0.1)
    optim.add_argument("--adam_epsilon", type=float, default=1e-8)
    optim.add_argument("--max_grad_norm", type=float, default=1.0)
    optim.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    optim.add_argument("--gradient_checkpointing", action="store_true")
    optim.add_argument("--use_ema", action="store_true")
    optim.add_argument("--ema_decay", type=float, default=0.999)
    optim.add_argument("--seed", type=int, default=0)

    run = parser.add_argument_group("checkpoints, validation and logging")
    run.add_argument("--output_dir", default="outputs/transfusion")
    run.add_argument("--checkpointing_steps", type=int, default=500)
    run.add_argument("--checkpoints_total_limit", type=int, default=2)
    run.add_argument("--resume_from_checkpoint", default=None, help="A checkpoint folder, or 'latest'.")
    run.add_argument(
        "--validation_steps",
        type=int,
        default=None,
        help=f"Every this many steps (default {DEFAULT_VALIDATION_STEPS}; 0 under FSDP, whose sharded weights the "
        "validation cannot run): samples for the validation prompts and captions (a PNG grid in "
        "output_dir/validation) and the text-conditioning gap (logs/validation_log.jsonl, the trackers and the "
        "console): how much the diffusion loss of fixed pairs rises with another pair's caption, ~0 while the model "
        "ignores the prompt. 0 disables validation.",
    )
    run.add_argument("--validation_prompts", nargs="*", default=None)
    run.add_argument("--num_validation_captions", type=int, default=4)
    run.add_argument(
        "--inference_scheduler",
        choices=INFERENCE_SCHEDULER_CHOICES,
        default=None,
        help="Validation and saved-pipeline scheduler (one that fits the prediction type); default: in pixel space "
        "DPM-Solver++ SDE (dpm with sde-dpmsolver++, clamping the implied clean image to [-1, 1] for epsilon / v); on "
        "a VAE's latents DPM-Solver++ (dpm), FlowMatchEuler (flow_euler) for flow matching. A scheduler chosen in "
        "pixel space clamps the implied clean image where it can (clip_sample or thresholding).",
    )
    run.add_argument("--num_inference_steps", type=int, default=25)
    run.add_argument("--guidance_scale", type=float, default=3.0)
    run.add_argument("--logging_steps", type=int, default=10)
    run.add_argument("--report_to", default="tensorboard", help="Accelerate trackers, or 'none'.")
    run.add_argument(
        "--ddp_timeout",
        type=int,
        default=1800,
        help="Seconds a multi-process collective (gradient all-reduce, barrier) may wait for the other processes "
        "before the run stops with an error naming it, instead of hanging (transformers' `ddp_timeout`).",
    )
    run.add_argument("--push_to_hub", action="store_true")
    run.add_argument("--hub_model_id", default=None)
    run.add_argument("--hub_token", default=None)
    run.add_argument("--hub_private_repo", action="store_true")
    recipe_name = apply_recipe_defaults(parser, argv)
    args = parser.parse_args(argv)
    args.recipe = recipe_name  # a retired alias records its successor's name
    return check_args(args)


def apply_recipe_defaults(parser: argparse.ArgumentParser, argv: list[str] | None) -> str:
    """Make the recipe's training hyper-parameters the parser's defaults, so the script's defaults are the recipe and
    a flag given on the command line wins. Returns the recipe's name (a retired alias warns and gives its successor).
    A flow-only timestep sampling falls back to uniform when `--prediction_type` switches to epsilon or v."""
    pre_parser = argparse.ArgumentParser(add_help=False)
    pre_parser.add_argument("--recipe", "--model_config", dest="recipe", default=DEFAULT_RECIPE)
    pre_parser.add_argument("--prediction_type", default=None)
    known, _ = pre_parser.parse_known_args(argv)
    name, what_changed = resolve_recipe_name(known.recipe)
    if what_changed is not None:
        logger.warning(f"--recipe {known.recipe} now loads {name}: {what_changed}")
    try:
        recipe = load_recipe(name)
    except ValueError as error:
        raise ValueError(f"--{error}") from error  # the recipes' messages start with "recipe=..."
    # A recipe json of the user's that sets no training part (e.g. a bare model preset) trains with the default
    # recipe's hyper-parameters: the ones measured to draw.
    prediction_type = known.prediction_type or recipe.model.get("prediction_type", "epsilon")
    defaults = load_recipe(DEFAULT_RECIPE).training_defaults(prediction_type)
    defaults.update(recipe.training_defaults(prediction_type))
    if "diffusion_loss_weight" in recipe.model:
        defaults["diffusion_loss_weight"] = recipe.model["diffusion_loss_weight"]
    parser.set_defaults(**defaults)
    return name


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    if sum(source is not None for source in (args.dataset_name, args.train_data_dir, args.train_data_files)) != 1:
        raise ValueError(
            "Give exactly one data source: --dataset_name (or --dataset shapes), --train_data_dir or "
            "--train_data_files."
        )
    check_streaming_args(args)
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id.")
    for name in (
        "train_batch_size",
        "gradient_accumulation_steps",
        "max_train_steps",
        "resolution",
        "encode_batch_size",
        "ddp_timeout",
    ):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}.")
    if args.min_lr_ratio is not None and args.lr_scheduler not in MIN_LR_SCHEDULERS:
        raise ValueError(
            f"--min_lr_ratio={args.min_lr_ratio} has no effect with --lr_scheduler={args.lr_scheduler}: use one of "
            f"{list(MIN_LR_SCHEDULERS)}."
        )
    if args.validation_steps is not None and args.validation_steps < 0:
        raise ValueError(f"--validation_steps must be >= 0 (0 disables validation), got {args.validation_steps}.")
    if args.max_train_time_minutes is not None and args.max_train_time_minutes <= 0:
        raise ValueError(f"--max_train_time_minutes must be positive, got {args.max_train_time_minutes}.")
    if args.lr_schedule_clock == "time" and args.max_train_time_minutes is None:
        raise ValueError("--lr_schedule_clock=time needs --max_train_time_minutes (the budget the schedule follows).")
    if args.min_lr_ratio is not None and not 0 <= args.min_lr_ratio <= 1:
        raise ValueError(f"--min_lr_ratio must be in [0, 1], got {args.min_lr_ratio}.")
    check_text_and_packing_args(args)
    check_text_freezing_args(args)
    if args.lora_rank < 0:
        raise ValueError(f"--lora_rank must be >= 0, got {args.lora_rank}.")
    if args.lora_rank and args.text_model_name_or_path is None:
        raise ValueError(
            f"--lora_rank={args.lora_rank} needs --text_model_name_or_path: LoRA adapts a pretrained LLM, and over "
            "the random frozen weights of a model trained from scratch it would train next to nothing."
        )
    # The recipe and the noising flags are checked here, before any data is loaded or encoded.
    preset = run_model_preset(args)
    noiser = build_noiser(args, args.prediction_type or preset.get("prediction_type", "epsilon"))
    if noiser.prediction_type == "epsilon" and args.snr_gamma is None:
        # Not an error: plain epsilon is the paper as written, and it may do at scale. Measured here it reads images
        # (captions 0.99) but draws shapes that ignore the prompt (t2i 0.00; README, "Why the paper's recipe did
        # not draw", cause 3), so a user who picked it for the paper's sake should hear it before ten minutes pass.
        logger.warning(
            "Plain epsilon prediction (--snr_gamma not set): the loss barely asks for the clean image at high noise, "
            "where the prompt decides the layout; at small scale the samples ignore the prompt. --snr_gamma 20 "
            "--snr_weighting truncated_min_snr --timestep_sampling importance is the measured fix (README, 'Why the "
            "paper's recipe did not draw')."
        )
    inference_scheduler(args, noiser.scheduler)
    check_model_fields(args, preset)
    warn_about_preset_limits(args)
    check_image_text_source(
        args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir, args.train_data_files
    )
    return args


def check_streaming_args(args: argparse.Namespace) -> None:
    """Refuse what --streaming cannot do."""
    if args.shuffle_buffer_size < 0:
        raise ValueError(f"--shuffle_buffer_size must be >= 0, got {args.shuffle_buffer_size}.")
    if not args.streaming:
        return
    if args.text_dataset_name is not None or args.text_data_files:
        raise ValueError(
            "--streaming with text-only data (--text_dataset_name / --text_data_files) is not supported: the text "
            "rows are sized from the number of image rows, which a stream does not know."
        )
    if args.latent_cache_dir is not None:
        raise ValueError(
            f"--latent_cache_dir={args.latent_cache_dir!r} has no effect with --streaming (nothing is cached)."
        )


def check_text_and_packing_args(args: argparse.Namespace) -> None:
    """The text-only data and packing flags (sets the default `--text_only_share`)."""
    has_text = args.text_dataset_name is not None or bool(args.text_data_files)
    if args.text_only_share is not None and not has_text:
        raise ValueError(
            f"--text_only_share={args.text_only_share} needs text-only data: --text_dataset_name or --text_data_files."
        )
    if args.text_only_share is None:
        args.text_only_share = DEFAULT_TEXT_ONLY_SHARE if has_text else 0.0
    if not 0 <= args.text_only_share < 1:
        raise ValueError(f"--text_only_share must be in [0, 1), got {args.text_only_share}.")
    if args.num_text_validation_rows < 0:
        raise ValueError(f"--num_text_validation_rows must be >= 0, got {args.num_text_validation_rows}.")
    if args.max_sequence_length is not None and args.max_sequence_length <= 0:
        raise ValueError(f"--max_sequence_length must be positive, got {args.max_sequence_length}.")


def first_line(error: Exception) -> str:
    """The first line of an error's message (hub errors append URLs and hints), for a one-line `error: ...`."""
    message = str(error).strip()
    return message.splitlines()[0] if message else type(error).__name__


def vae_latent_geometry(args: argparse.Namespace) -> tuple[int, int]:
    """Latent channels and downsampling factor of `--vae_name_or_path` from its config.json alone (no weights), or
    `(3, 1)` in pixel space."""
    if args.vae_name_or_path is None:
        return 3, 1
    try:
        config = AutoencoderKL.load_config(args.vae_name_or_path)
    except OSError as error:
        raise ValueError(
            f"--vae_name_or_path={args.vae_name_or_path!r} cannot be loaded: {first_line(error)}"
        ) from error
    # config.json omits the fields left at their defaults: take those from AutoencoderKL's signature.
    defaults = inspect.signature(AutoencoderKL.__init__).parameters
    channels = config.get("latent_channels", defaults["latent_channels"].default)
    blocks = config.get("block_out_channels", defaults["block_out_channels"].default)
    return channels, 2 ** (len(blocks) - 1)


def check_model_fields(args: argparse.Namespace, preset: dict) -> None:
    """Build the run's `TransfusionConfig` from the preset, the flags and the configs (no weights) of the VAE and the
    pretrained LLM, so that a bad patch size, U-Net layout or resolution fails before any data is loaded. The special
    token ids are placeholders (the tokenizer is trained on the data)."""
    latent_channels, vae_scale = vae_latent_geometry(args)
    if args.resolution % vae_scale:
        raise ValueError(f"--resolution={args.resolution} is not a multiple of the VAE's downsampling {vae_scale}.")
    text_config = preset["text_config"]
    if args.text_model_name_or_path is not None:
        try:
            text_config = AutoConfig.from_pretrained(args.text_model_name_or_path).to_dict()
        except OSError as error:
            name = args.text_model_name_or_path
            raise ValueError(f"--text_model_name_or_path={name!r} cannot be loaded: {first_line(error)}") from error
    fields = image_config_fields(args, preset, latent_channels, args.resolution // vae_scale)
    config = TransfusionConfig(text_config=text_config, **fields)
    # bos, <boi>, the image, <eoi>, eos: the shortest sequence must fit the backbone's positions.
    max_positions = getattr(config.text_config, "max_position_embeddings", None)
    if max_positions is not None and config.num_patches + 4 > max_positions:
        raise ValueError(
            f"--patch_size={config.patch_size} at --resolution={args.resolution} gives {config.num_patches} image "
            f"positions (latent side {config.latent_size}), more than the backbone's max_position_embeddings="
            f"{max_positions} allow: use a larger --patch_size or a VAE."
        )


def check_text_freezing_args(args: argparse.Namespace) -> None:
    """Refuse combinations of --freeze_text, --modality_experts and --lora_rank that make no sense."""
    if args.freeze_text:
        if args.lora_rank:
            raise ValueError(
                f"--freeze_text keeps every text weight fixed, --lora_rank={args.lora_rank} trains them through LoRA: "
                "choose one."
            )
        if args.text_model_name_or_path is None:
            raise ValueError(
                "--freeze_text needs --text_model_name_or_path: freezing the text weights of a model trained from "
                "scratch would freeze random weights."
            )
        if not args.modality_experts:
            raise ValueError(
                "--freeze_text needs --modality_experts: without image copies the frozen backbone would leave only "
                "the patch layers to train."
            )
    if args.modality_experts and args.lora_rank:
        raise ValueError(
            f"--modality_experts with --lora_rank={args.lora_rank} is not supported: the LoRA update of a text "
            "projection would also act at the image positions, on top of their own copy. Train the image copies "
            "instead (--freeze_text keeps the text weights)."
        )


# ------------------------------------------------------------------------------------------------ components
def load_model_preset(name_or_path: str) -> dict:
    """The model fields of a recipe (`transfusion_hf.recipes`: a name, a retired alias, or a json path)."""
    try:
        return load_recipe(name_or_path).model  # parsed afresh on every call: the caller may change it
    except ValueError as error:
        raise ValueError(f"--{error}") from error  # the recipes' messages start with "recipe=..."


def warn_about_preset_limits(args: argparse.Namespace) -> None:
    """Say so before training when the recipe declares (its `warning`) that it does not draw this kind of data: `tiny`
    draws backgrounds only. `warning_except_dataset`, when given, names the built-in data set the recipe is made for
    (no warning there)."""
    recipe = load_recipe(args.recipe)
    if recipe.warning is None:
        return
    if recipe.warning_except_dataset is None or args.dataset_name != recipe.warning_except_dataset:
        logger.warning(f"--recipe {args.recipe}: {recipe.warning}")


def run_model_preset(args: argparse.Namespace) -> dict:
    """The run's model fields: those of `--recipe`, its backbone `text_config` updated by `--config_overrides`.

    transformers' `PretrainedConfig.update_from_string` parses the overrides (each value cast to the type of the field
    it replaces, unknown fields refused), as in its `run_clm.py`; a pretrained LLM brings its own config, so the two
    do not combine.
    """
    preset = load_model_preset(args.recipe)
    overrides = args.config_overrides
    if overrides is None:
        return preset
    if args.text_model_name_or_path is not None:
        raise ValueError(
            f"--config_overrides={overrides!r} changes a backbone trained from scratch; with "
            f"--text_model_name_or_path={args.text_model_name_or_path!r} the LLM's own config is used."
        )
    pairs = overrides.split(",")
    keys = [pair.partition("=")[0] for pair in pairs]
    if not all(pair.count("=") == 1 and key for pair, key in zip(pairs, keys)):
        raise ValueError(f"--config_overrides={overrides!r}: give comma-separated key=value pairs.")
    text_config = AutoConfig.for_model(**preset["text_config"])
    updated = {}
    for pair, key in zip(pairs, keys):
        try:
            text_config.update_from_string(pair)
        except ValueError as error:
            raise ValueError(f"--config_overrides={overrides!r}, field {key!r}: {first_line(error)}") from error
        updated[key] = getattr(text_config, key)
    return {**preset, "text_config": {**preset["text_config"], **updated}}


def build_vae(args: argparse.Namespace, device: torch.device | str = "cpu") -> tuple[AutoencoderKL | None, int, int]:
    """The frozen VAE on `device` (the accelerator: it encodes the data set, then decodes validation images), or None
    for pixel space; its downsampling factor and latent channels."""
    if args.vae_name_or_path is None:
        return None, 1, 3
    vae = AutoencoderKL.from_pretrained(args.vae_name_or_path)
    vae.requires_grad_(False).eval().to(device)
    return vae, 2 ** (len(vae.config.block_out_channels) - 1), vae.config.latent_channels


def build_tokenizer(args: argparse.Namespace, captions: list[str]):
    source = args.tokenizer_name_or_path or args.text_model_name_or_path
    if source is None:
        # No pretrained tokenizer: a byte-level BPE learned from the captions (never meets an unknown character).
        return train_bpe_tokenizer(captions, vocab_size=args.tokenizer_vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(source)
    add_special_tokens(tokenizer)
    return tokenizer


# Flags that override the config field of the same name when given.
IMAGE_FIELD_FLAGS = (
    "patch_size",
    "patch_encoder",
    "prediction_type",
    "unet_block_out_channels",
    "unet_norm_num_groups",
    "unet_skip_connections",
    "image_attention",
)


def image_config_fields(args: argparse.Namespace, preset: dict, latent_channels: int, latent_size: int) -> dict:
    """The image and diffusion fields of the run's `TransfusionConfig`: the preset's, overridden by the flags."""
    fields = {key: value for key, value in preset.items() if key != "text_config"}
    fields.update(latent_channels=latent_channels, latent_size=latent_size)
    fields["diffusion_loss_weight"] = args.diffusion_loss_weight
    for name in IMAGE_FIELD_FLAGS:
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    for name in ("patch_position_embedding", "unet_linear_shortcut", "unet_output_shortcut"):  # true/false flags
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name) == "true"
    is_unet = fields.get("patch_encoder", "linear") == "unet"
    channels = fields.get("unet_block_out_channels")
    if is_unet and channels and args.patch_size is not None and args.unet_block_out_channels is None:
        # A preset's U-Net is laid out for its own patch size (one level per halving); with a smaller --patch_size
        # keep its finest log2(patch_size) + 1 levels, so `--model_config small --patch_size 2` needs no channel list.
        fields["unet_block_out_channels"] = channels[: args.patch_size.bit_length()]
    if args.unet_linear_shortcut is None:
        # The script's U-Nets take the linear shortcut unless the preset says otherwise: without it the U-Net names
        # the wrong colour in most captions and draws mixed colours (2 seeds, README "Why the U-Net's captions
        # fail"). The config class keeps False as its default, so U-Net checkpoints saved before it load unchanged.
        # A linear encoder (e.g. `--patch_encoder linear` on the small_unet preset) has no shortcut to take.
        fields["unet_linear_shortcut"] = is_unet and fields.get("unet_linear_shortcut", True)
    if args.unet_output_shortcut is None:
        # The output shortcut, for flow: without it the flow U-Net draws blobs of the right colour, with it characters
        # (glyph folder, 3,400 steps: t2i character 0.15 -> 0.80). With epsilon it draws tiled shapes (the paper's
        # recipe on the shapes, 2 seeds at 2,900 steps: 0.85 -> 0.49), as linear 8x8 epsilon does; v is unmeasured.
        # README "The U-Net's output shortcut".
        is_flow_unet = is_unet and fields.get("prediction_type") == "flow_prediction"
        fields["unet_output_shortcut"] = is_flow_unet and fields.get("unet_output_shortcut", True)
    return fields


def build_model(args: argparse.Namespace, tokenizer, latent_channels: int, latent_size: int):
    """From scratch (a preset) or from a pretrained LLM; returns the model and the base model id (for the card)."""
    preset = run_model_preset(args)
    text_config = preset.pop("text_config")
    image_fields = {
        **image_config_fields(args, preset, latent_channels, latent_size),
        **special_token_ids(tokenizer),
    }
    if args.modality_experts:
        image_fields["modality_experts"] = True
    if args.text_model_name_or_path is None:
        text_config["vocab_size"] = len(tokenizer)
        config = TransfusionConfig(text_config=text_config, **image_fields)
        config._attn_implementation = args.attn_implementation
        return TransfusionForMixedModal(config), None
    language_model = AutoModelForCausalLM.from_pretrained(
        args.text_model_name_or_path, attn_implementation=args.attn_implementation
    )
    if len(tokenizer) > language_model.get_input_embeddings().weight.shape[0]:
        language_model.resize_token_embeddings(len(tokenizer))
    return TransfusionForMixedModal.from_text_model(language_model, **image_fields), args.text_model_name_or_path


def apply_lora(args: argparse.Namespace, model: TransfusionForMixedModal, new_token_ids: list[int]):
    """Wrap the backbone in LoRA adapters; image layers and the new special-token rows train fully."""
    from peft import LoraConfig, get_peft_model

    image_modules = ["image_encoder", "image_decoder"]
    if model.patch_position_embedding is not None:
        image_modules.append("patch_position_embedding")
    trainable_tokens = None
    if new_token_ids:
        trainable_tokens = {"embed_tokens": new_token_ids}
        # With untied output embeddings (Llama's default) the LM-head rows of the new tokens must train too, or the
        # model never learns to predict <boi>/<eoi>. Tied heads follow embed_tokens (peft).
        if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
            trainable_tokens["lm_head"] = new_token_ids
    lora_config = LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha or args.lora_rank,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        modules_to_save=image_modules,
        trainable_token_indices=trainable_tokens,
    )
    return get_peft_model(model, lora_config)


def build_lr_scheduler(
    args: argparse.Namespace,
    optimizer: torch.optim.Optimizer,
    num_processes: int,
    clock: TrainingClock | None = None,
) -> torch.optim.lr_scheduler.LRScheduler:
    """transformers' `get_scheduler(args.lr_scheduler)`, counted in optimizer steps of all processes; with
    `--lr_schedule_clock time` it also advances with `clock`'s spent share of the time budget.

    Accelerate's prepared scheduler steps once per process at every optimizer step (and not on accumulation steps),
    so the warmup and total lengths are scaled by the number of processes.
    """
    specific = {}
    if args.lr_scheduler in MIN_LR_SCHEDULERS:
        specific["min_lr_rate"] = DEFAULT_MIN_LR_RATIO if args.min_lr_ratio is None else args.min_lr_ratio
    scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=args.max_train_steps * num_processes,
        scheduler_specific_kwargs=specific,
    )
    if args.lr_schedule_clock == "time":
        if clock is None:
            raise ValueError("--lr_schedule_clock=time: build_lr_scheduler needs the run's TrainingClock.")
        follow_time_budget(scheduler, clock, args.max_train_steps * num_processes)
    return scheduler


def training_scheduler(prediction_type: str):
    """The paper's DDPM (1000 steps, cosine schedule) or rectified flow."""
    if prediction_type == "flow_prediction":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=prediction_type,
        clip_sample=False,
    )


def build_noiser(args: argparse.Namespace, prediction_type: str) -> TransfusionNoiser:
    """The training-time noising of the run (raises a ValueError naming the flag for a bad combination)."""
    return TransfusionNoiser(
        training_scheduler(prediction_type),
        prediction_type,
        args.image_first_probability,
        args.image_first_max_timestep,
        args.caption_dropout_probability,
        snr_gamma=args.snr_gamma,
        snr_weighting=args.snr_weighting,
        normalize_snr_weights=args.normalize_snr_weights == "true",
        timestep_sampling=args.timestep_sampling,
        logit_mean=args.logit_mean,
        logit_std=args.logit_std,
        importance_exponent=args.importance_exponent,
    )


def inference_scheduler(args: argparse.Namespace, train_scheduler):
    """The sampling scheduler of `--inference_scheduler`, built from the training scheduler's config by the pipeline
    (raises a ValueError naming the flag when it does not fit the prediction type)."""
    prediction_type = TransfusionPipeline.scheduler_prediction_type(train_scheduler)
    pixel_space = getattr(args, "vae_name_or_path", None) is None
    # Pixel space samples with DPM-Solver++ SDE (below) whatever the objective; on a VAE's latents flow keeps
    # FlowMatchEuler.
    default = "flow_euler" if prediction_type == "flow_prediction" and not pixel_space else "dpm"
    name = SCHEDULER_ALIASES.get(args.inference_scheduler or default, args.inference_scheduler or default)
    overrides = {}
    if prediction_type == "epsilon":
        overrides = TransfusionPipeline.epsilon_start_below_zero_snr(name)
    if pixel_space and args.inference_scheduler is None:
        # Pixel space samples stochastically: fresh noise at every step washes out the model's errors instead of
        # integrating them. DPM-Solver++ SDE, a discretisation of the reverse SDE, samples the model's distribution;
        # FlowMatchEuler's `stochastic_sampling` (the former flow default) re-noises the predicted clean image, a
        # posterior mean, at every step, so its samples drift towards the prompt's average image: on the photo folder
        # (docs/research/recipes.md) the samples of one prompt spread 0.63x as much as real crops (0.94x with the SDE)
        # and t2i 0.82 (0.91); on the shapes 1.00 (0.98). For epsilon / v the SDE also clamps the implied clean image
        # to [-1, 1] (the paper's recipe after 10 CPU minutes: 0.18 -> 0.42); for flow the clamp cost the shapes 0.03.
        overrides["algorithm_type"] = "sde-dpmsolver++"
        if prediction_type != "flow_prediction":
            overrides.update(TransfusionPipeline.pixel_range_clamp(name))
    elif pixel_space:
        # A chosen scheduler in pixel space clamps the implied clean image to [-1, 1] where its class can (DDPM's own
        # sampler does).
        overrides.update(TransfusionPipeline.pixel_range_clamp(name))
    try:
        return TransfusionPipeline.scheduler_from_config(name, train_scheduler.config, prediction_type, **overrides)
    except ValueError as error:
        raise ValueError(f"--inference_scheduler={args.inference_scheduler or name}: {error}") from error


# ------------------------------------------------------------------------------------------------------- data
def prepare_examples(
    args: argparse.Namespace, vae: AutoencoderKL | None, image_size: int, accelerator
) -> datasets.Dataset:
    """Load the data set and encode every image once (the VAE is frozen) into the latent cache: each process encodes
    its shard on its device, then all read every latent back memory-mapped (`text`, `latents` columns, torch format).
    A rerun, a resumed run, or another run on the same data, VAE, resolution, crop and flip reuses the cache."""
    dataset = load_dataset_from_args(args)
    default_cache_dir = Path(args.cache_dir or datasets.config.HF_DATASETS_CACHE) / "transfusion_latents"
    cache = cache_latents(
        dataset,
        partial(pixels_to_latents, vae),
        image_size,
        args.latent_cache_dir or default_cache_dir,
        encoder_fingerprint(vae),
        center_crop=args.center_crop,
        random_flip=args.random_flip,
        batch_size=args.encode_batch_size,
        strict=args.strict_data,
        latent_dtype=args.latent_dtype,
        state=accelerator,
    )
    counts = f"{len(cache.dataset)} images ({cache.num_skipped} unreadable images skipped) from {cache.num_rows} rows"
    if cache.reused:
        accelerator.print(f"Read the latents of {counts} from the cache {cache.path}.")
    else:
        accelerator.print(f"Encoded {counts}.")
        accelerator.print(
            f"Encoding: {cache.num_encoded} images in {cache.encode_seconds:.1f} s ({cache.images_per_second:.1f} "
            f"images/s) on the main process of {accelerator.num_processes}; cache {cache.path}."
        )
    if not len(cache.dataset):
        raise ValueError("No readable image-caption pair in the data set.")
    return cache.dataset


def prepare_text_examples(args: argparse.Namespace, num_image_rows: int, accelerator) -> tuple[list[dict], list[str]]:
    """The text-only training rows (`--text_only_share` of all rows) and the held-out texts, or nothing without text
    data."""
    if args.text_dataset_name is None and not args.text_data_files:
        return [], []
    dataset = load_text_dataset(
        args.text_dataset_name,
        args.text_dataset_config_name,
        data_files=args.text_data_files,
        split=args.text_dataset_split,
        text_column=args.text_column,
        cache_dir=args.cache_dir,
    )
    examples, held_out = text_only_examples(
        dataset, num_image_rows, args.text_only_share, args.num_text_validation_rows, seed=args.seed
    )
    accelerator.print(
        f"Text-only data: {len(examples)} training rows ({args.text_only_share:.0%} of all rows) from "
        f"{len(dataset)} texts, {len(held_out)} held out for eval/text_lm_loss."
    )
    return examples, held_out


def text_validation_batches(texts: list[str], processor, noiser, context: int, args) -> list[dict]:
    """The held-out texts as padded text-only batches, collated once (no random draw touches a text-only row)."""
    collator = TransfusionDataCollator(processor, noiser, max_length=context)
    size = args.train_batch_size
    return [collator([{"text": text} for text in texts[start : start + size]]) for start in range(0, len(texts), size)]


# ------------------------------------------------------------------------------------------------- validation
@torch.no_grad()
def run_validation(args, accelerator, model, components, examples, step: int) -> None:
    """Images for the validation prompts and captions for a few training images, as a PNG grid and in the trackers."""
    pipeline = make_pipeline(accelerator.unwrap_model(model), components, args)
    pipeline.set_progress_bar_config(disable=True)
    prompts = args.validation_prompts or [example["text"] for example in examples[:4]]
    generator = torch.Generator().manual_seed(args.seed)
    was_training = model.training
    model.eval()
    images = pipeline(
        prompts, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, generator=generator
    ).images
    reference = [
        pipeline.decode_latents(example["latents"][None].to(pipeline.transformer.dtype))[0]
        for example in examples[: args.num_validation_captions]
    ]
    captions = pipeline.caption(reference, max_new_tokens=24) if reference else []
    model.train(was_training)
    log_text_conditioning_gap(args, accelerator, pipeline.transformer, components, examples, step)
    grid = make_grid(images + reference, [f"prompt: {p}" for p in prompts] + [f"caption: {c}" for c in captions])
    folder = Path(args.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    grid.save(folder / f"step-{step:06d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
            tracker.writer.add_text("validation/captions", "\n".join(captions), step)


def log_text_conditioning_gap(args, accelerator, model, components, examples: list[dict], step: int) -> None:
    """Measure the text-conditioning gap on the validation examples (up to `CONDITIONING_GAP_PAIRS`, spread over the
    data set; the same noise and times at every validation) and log it: trackers, `logs/validation_log.jsonl` and one
    console line."""
    pairs = [example for example in examples[:CONDITIONING_GAP_PAIRS] if example.get("latents") is not None]
    captions = [example["text"] for example in pairs]
    if len(set(captions)) < 2:
        if not components.get("gap_skip_warned"):
            logger.warning("Every validation pair has the same caption: the text-conditioning gap is not measured.")
            components["gap_skip_warned"] = True
        return
    clean = torch.stack([torch.as_tensor(example["latents"]) for example in pairs])
    gap = text_conditioning_gap(model, components["processor"], components["noiser"], captions, clean, seed=args.seed)
    record = gap.log_record()
    accelerator.log(record, step=step)
    with (Path(args.output_dir) / "logs" / "validation_log.jsonl").open("a") as handle:
        handle.write(json.dumps({"step": step, **record}) + "\n")
    bands = ", ".join(f"{band} {value:+.3f}" for band, value in gap.relative_gap.items())
    accelerator.print(
        f"step {step}: text-conditioning gap (diffusion loss with another pair's caption / with its own - 1; ~0 while "
        f"the model ignores the prompt): {bands}"
    )


def make_pipeline(model, components: dict, args) -> TransfusionPipeline:
    return TransfusionPipeline(
        transformer=model,
        scheduler=components["inference_scheduler"],
        vae=components["vae"],
        tokenizer=components["tokenizer"],
    )


# ---------------------------------------------------------------------------------------------------- training
def training_loop(args, accelerator, model, optimizer, lr_scheduler, dataloader, state: dict, components: dict) -> int:
    """Run until `max_train_steps` (or the time budget). Returns the last global step."""
    global_step = state["global_step"]
    progress = tqdm(
        total=args.max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc="training"
    )
    clock = components["clock"]
    clock.start()
    window_tokens, window_start = 0, time.time()
    ema = components["ema"]
    step_losses = StepLosses()
    grad_norms = components["grad_norms"]
    while global_step < args.max_train_steps:
        epoch_loader = dataloader
        if state["skip_batches"]:
            epoch_loader = accelerator.skip_first_batches(dataloader, state["skip_batches"])
            state["skip_batches"] = 0
        dataloader.set_epoch(state["epoch"])
        epoch_loader.set_epoch(state["epoch"])
        for batch in epoch_loader:
            state["micro_batches"] += 1
            state["batches_in_epoch"] += 1
            with accelerator.accumulate(model):
                output = training_forward(model, batch)
                loss_to_check = output.loss.detach()
                if accelerator.num_processes > 1:
                    # All processes must stop together: one that raised alone would leave the others hanging in the
                    # next gradient all-reduce.
                    loss_to_check = accelerator.gather(loss_to_check[None])
                check_finite(loss_to_check, global_step + 1, state["last_checkpoint"])
                accelerator.backward(output.loss)
                if accelerator.sync_gradients:
                    grad_norms.add(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm))
                    clock.tick(accelerator)  # before the schedule reads it and the budget check below
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step_losses.add(output)
            window_tokens += num_real_tokens(batch, components["tokenizer"].pad_token_id) * accelerator.num_processes
            components["clean_error"].update(batch, output.diffusion_predictions)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            state["global_step"] = global_step
            if ema is not None:
                ema.step(trainable_parameters(model))
            progress.update(1)
            is_logging_step = global_step % args.logging_steps == 0 or global_step == args.max_train_steps
            # The mean over the step's micro-steps; on logging steps also over processes (a collective, all log).
            losses = step_losses.compute(accelerator if is_logging_step else None)
            progress.set_postfix({key: f"{value:.4f}" for key, value in losses.items()})
            if is_logging_step:
                tokens_per_second = window_tokens / max(time.time() - window_start, 1e-9)
                log_step(args, accelerator, model, lr_scheduler, components, global_step, losses, tokens_per_second)
                window_tokens, window_start = 0, time.time()
            if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                state["last_checkpoint"] = save_checkpoint(
                    accelerator, args.output_dir, global_step, args.checkpoints_total_limit
                )
            if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                if ema is not None:
                    # Validate the weights the run saves (the average), then give training its own weights back.
                    ema.store(trainable_parameters(model))
                    ema.copy_to(trainable_parameters(model))
                run_validation(args, accelerator, model, components, components["examples"], global_step)
                if ema is not None:
                    ema.restore(trainable_parameters(model))
            out_of_time = clock.out_of_time()
            if global_step >= args.max_train_steps or out_of_time:
                if out_of_time:
                    accelerator.print(time_budget_message(args, global_step, lr_scheduler.get_last_lr()[0]))
                progress.close()
                return global_step
        state["epoch"] += 1
        state["batches_in_epoch"] = 0
    progress.close()
    return global_step


def time_budget_message(args: argparse.Namespace, step: int, learning_rate: float) -> str:
    """What a run stopped by `--max_train_time_minutes` says: with the step clock, how far from its end the schedule
    (planned for `--max_train_steps`) stopped."""
    reached = (
        f"Time budget of {args.max_train_time_minutes} min reached at step {step} of "
        f"--max_train_steps={args.max_train_steps}"
    )
    if args.lr_schedule_clock == "time":
        return f"{reached}; the schedule followed the budget to its end (learning rate {learning_rate:.3g})."
    return (
        f"{reached}: the learning rate is still {learning_rate:.3g} (its schedule ends at step "
        f"{args.max_train_steps}; set --max_train_steps to what fits the budget, or --lr_schedule_clock time, for a "
        "run that decays fully)."
    )


def training_forward(model, batch: dict):
    """The training forward: no KV cache (the backbone would otherwise build one at every step, for nothing)."""
    return model(**batch, use_cache=False)


def log_step(args, accelerator, model, lr_scheduler, components: dict, step: int, losses: dict, tokens_per_second):
    """Write one record to the trackers and `logs/train_log.jsonl`. Every process calls it: the count of truncated
    sequences is summed over processes, and the held-out text loss runs the (possibly sharded) model on all of them.
    """
    collator = components["collator"]
    truncated = collator.num_truncated - components["truncated_logged"]
    components["truncated_logged"] = collator.num_truncated
    record = {
        "step": step,
        **losses,
        "lr": lr_scheduler.get_last_lr()[0],
        "tokens_per_second": tokens_per_second,
        # Sequences whose text was cut to fit the context since the last record (collated, all processes).
        "truncated_sequences": int(accelerator.reduce(torch.tensor(truncated, device=accelerator.device), "sum")),
        **components["grad_norms"].compute(),
        **components["clean_error"].compute(),
    }
    if components["stream"] is not None:
        # Unreadable images skipped so far by the stream (all processes).
        skipped = torch.tensor(components["stream"].num_skipped, device=accelerator.device)
        record["skipped_images"] = int(accelerator.reduce(skipped, "sum"))
    if components["text_validation_batches"]:
        record["eval/text_lm_loss"] = text_lm_loss(model, components["text_validation_batches"], accelerator)
    accelerator.log(record, step=step)
    if accelerator.is_main_process:
        with (Path(args.output_dir) / "logs" / "train_log.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")


@torch.no_grad()
def text_lm_loss(model, batches: list[dict], accelerator) -> float:
    """The LM loss of the held-out text rows: the mean over their predicted tokens (every batch weighted by its
    tokens), with the training weights, in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = {key: value.to(accelerator.device) for key, value in batch.items()}
        predicted = int((batch["labels"][:, 1:] != -100).sum())
        total += float(training_forward(model, batch).lm_loss) * predicted
        count += predicted
    model.train(was_training)
    return total / max(count, 1)


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def optimizer_parameter_groups(
    model, row_trained: list[torch.nn.Parameter], weight_decay: float
) -> list[dict[str, list[torch.nn.Parameter] | float]]:
    """AdamW groups: transformers' convention (`weight_decay_parameter_groups`: no decay on biases, norms and
    embeddings), and no decay either on the parameters of which only some rows train (with --freeze_text): decoupled
    weight decay would shrink their frozen rows too."""
    decay, no_decay = weight_decay_parameter_groups(model, weight_decay)
    row_ids = {id(parameter) for parameter in row_trained}
    decay["params"] = [parameter for parameter in decay["params"] if id(parameter) not in row_ids]
    no_decay_ids = {id(parameter) for parameter in no_decay["params"]}
    no_decay["params"] += [parameter for parameter in row_trained if id(parameter) not in no_decay_ids]
    return [decay, no_decay]


class LoopState:
    """Epoch and position inside it, saved with every checkpoint so a resumed run skips the batches already seen."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return {key: self.state[key] for key in ("global_step", "epoch", "batches_in_epoch", "micro_batches")}

    def load_state_dict(self, loaded: dict) -> None:
        self.state.update(loaded)


def truncate_log(log_path: Path, step: int) -> None:
    """Drop the records a killed run wrote after the checkpoint it resumes from, so each step is logged once."""
    if not log_path.is_file():
        return
    records = [line for line in log_path.read_text().splitlines() if line.strip()]
    kept = [line for line in records if json.loads(line).get("step", 0) <= step]
    log_path.write_text("".join(line + "\n" for line in kept))


def save_final(
    args,
    accelerator,
    model,
    components: dict,
    base_model: str | None,
    global_step: int,
    full_state_dict: dict | None = None,
) -> None:
    """Save the whole pipeline (model, VAE, scheduler, tokenizer) to `output_dir`, EMA weights when used.

    `full_state_dict`: the gathered weights under FSDP, where the wrapped model only holds this process's shard.
    """
    unwrapped = accelerator.unwrap_model(model)
    if full_state_dict is not None:
        unwrapped = TransfusionForMixedModal(unwrapped.config)
        unwrapped.load_state_dict(full_state_dict)
    ema = components["ema"]
    if ema is not None:
        ema.copy_to(trainable_parameters(unwrapped))
    if args.lora_rank:
        unwrapped = unwrapped.merge_and_unload()
    pipeline = make_pipeline(unwrapped, components, args)
    pipeline.save_pretrained(args.output_dir)
    summary = {
        "global_step": global_step,
        "dataset": args.dataset_name or args.train_data_dir or args.train_data_files,
        "base_model": base_model,
        "num_parameters": unwrapped.num_parameters(),
        "train_batch_size": args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
        "learning_rate": args.learning_rate,
        "resolution": args.resolution,
    }
    (Path(args.output_dir) / "training_summary.json").write_text(json.dumps(summary, indent=2))
    if args.push_to_hub:
        from transfusion_hf.hub import push_pipeline_to_hub

        push_pipeline_to_hub(
            pipeline,
            args.hub_model_id,
            output_dir=args.output_dir,
            private=args.hub_private_repo,
            token=args.hub_token,
        )


# -------------------------------------------------------------------------------------------------------- FSDP
def check_fsdp_setup(args: argparse.Namespace, accelerator: Accelerator) -> None:
    """Refuse, before any data is loaded, an FSDP launch that would not shard, or flags FSDP cannot train.

    Args:
        args (`argparse.Namespace`): the parsed flags.
        accelerator (`Accelerator`): the run's accelerator, already set up (its `distributed_type` is final).
    """
    fsdp_requested = parse_flag_from_env("ACCELERATE_USE_FSDP")  # set by `accelerate launch` from an FSDP config
    if fsdp_requested and accelerator.distributed_type != DistributedType.FSDP:
        # accelerate (1.15) turns FSDP on only for GPU-like process groups: `AcceleratorState.__init__` sets
        # DistributedType.FSDP for MULTI_GPU, MULTI_XPU, ... but not MULTI_CPU, and gives no warning. The run would
        # then train unsharded (DDP) while its config says FSDP.
        raise ValueError(
            f"The launch asked for FSDP (ACCELERATE_USE_FSDP=true) but Accelerate set up "
            f"{accelerator.distributed_type} on {accelerator.device} with {accelerator.num_processes} process(es): "
            f"accelerate {accelerate_version} enables FSDP only on GPUs (and other accelerators), never on CPU "
            "processes. Use examples/configs/accelerate_cpu_2proc.yaml (DDP) on CPU."
        )
    if accelerator.distributed_type != DistributedType.FSDP:
        return
    if args.validation_steps is None:
        args.validation_steps = 0
    if args.lora_rank or args.use_ema or args.validation_steps or args.freeze_text:
        raise ValueError(
            "With FSDP, --lora_rank, --use_ema, --validation_steps and --freeze_text are not supported (sharded "
            f"weights): got lora_rank={args.lora_rank}, use_ema={args.use_ema}, validation_steps="
            f"{args.validation_steps}, freeze_text={args.freeze_text}."
        )
    if args.text_only_share:
        # FSDP2 reduce-scatters the gradients of the parameters that got one in this process. A process whose batch
        # holds no image leaves the image layers without gradients while another process has them: the collectives
        # no longer match (measured on gloo: "Received data size doesn't match expected size", the run aborts).
        raise ValueError(
            f"With FSDP, text-only rows are not supported: got --text_only_share={args.text_only_share} (a batch "
            "without images leaves the image layers without gradients in one process only)."
        )


def log_fsdp_shard(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Log, from every process, how many parameter values it holds: with FSDP2 each parameter is a `DTensor` sharded
    on dim 0, and this process keeps only its `to_local()` part (about 1 / num_processes of the model)."""
    from torch.distributed.tensor import DTensor

    parameters = list(model.parameters())
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in parameters)
    total = sum(p.numel() for p in parameters)  # a DTensor's numel is its full (global) size
    sharded = sum(isinstance(p, DTensor) for p in parameters)
    logger.info(
        "FSDP: process %d holds %d of %d parameter values (%.1f%%); %d of %d parameters are DTensor shards.",
        accelerator.process_index,
        local,
        total,
        100 * local / max(total, 1),
        sharded,
        len(parameters),
    )


def accelerator_kwargs_handlers(args: argparse.Namespace) -> list:
    """The process-group timeout (`--ddp_timeout`) and, with text-only rows, DDP's search for unused parameters (a
    text-only batch leaves the image layers without gradients)."""
    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout))]
    if args.text_only_share:
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    return handlers


# -------------------------------------------------------------------------------------------------------- run
def setup_accelerator(args: argparse.Namespace) -> Accelerator:
    """The run's `Accelerator`, after refusing a launch that would not train as asked; seeds every generator, makes
    the logs folder and prints the distributed setup.

    Args:
        args (`argparse.Namespace`): the parsed flags.
    """
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / "logs")
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=accelerator_kwargs_handlers(args),
    )
    check_fsdp_setup(args, accelerator)
    if args.validation_steps is None:
        args.validation_steps = DEFAULT_VALIDATION_STEPS
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > accelerator.num_processes:
        # `accelerate launch --multi_gpu` on a machine without GPUs starts processes that each train alone on
        # the whole data and overwrite each other's checkpoints. Stop instead.
        raise ValueError(
            f"{launched} processes were launched but Accelerate sees {accelerator.num_processes}: on CPU set "
            "ACCELERATE_USE_CPU=1 (e.g. ACCELERATE_USE_CPU=1 accelerate launch --config_file "
            "examples/configs/accelerate_cpu_2proc.yaml ...)."
        )
    set_seed(args.seed)
    Path(args.output_dir, "logs").mkdir(parents=True, exist_ok=True)
    accelerator.print(
        f"Distributed: num_processes={accelerator.num_processes} ({accelerator.distributed_type}), "
        f"device={accelerator.device}, mixed_precision={accelerator.mixed_precision}."
    )
    return accelerator


class TrainingData(NamedTuple):
    """The training data and what is learnt from it before the model exists.

    `head`: the first few image examples (validation prompts and captions); `examples`: the encoded map-style data
    set, or `stream`: the streamed one (the other is None); `text_examples` and `held_out_texts`: the text-only
    training rows and validation texts (empty when streaming); `tokenizer`: pretrained, or learnt from the captions.
    """

    head: list[dict]
    examples: datasets.Dataset | None
    stream: datasets.IterableDataset | None
    text_examples: list[dict]
    held_out_texts: list[str]
    tokenizer: PreTrainedTokenizerBase


def prepare_training_data(
    args: argparse.Namespace, vae: AutoencoderKL | None, accelerator: Accelerator
) -> TrainingData:
    """Open the stream (`--streaming`) or encode the data set into the latent cache, load the text-only data, and
    build the tokenizer.

    Args:
        args (`argparse.Namespace`): the parsed flags.
        vae (`AutoencoderKL` or None): the frozen VAE, None in pixel space.
        accelerator (`Accelerator`): the run's accelerator (the encoding is shared among its processes).
    """
    num_head = max(CONDITIONING_GAP_PAIRS, args.num_validation_captions)
    if args.streaming:
        stream = load_dataset_from_args(args, streaming=True)
        # Validation prompts and captions use the stream's first rows; the tokenizer learns from its first captions.
        head = take_examples(stream, num_head, partial(pixels_to_latents, vae), args.resolution, args.center_crop)
        if not head:
            raise ValueError("No readable image-caption pair in the first rows of the stream.")
        text_examples, held_out_texts = [], []
        tokenizer = build_tokenizer(args, take_captions(stream, STREAMING_TOKENIZER_ROWS))
        return TrainingData(head, None, stream, text_examples, held_out_texts, tokenizer)
    examples = prepare_examples(args, vae, args.resolution, accelerator)
    # Validation prompts, captions and the text-conditioning gap use a few training examples, spread evenly over the
    # data set (a folder sorted by class must not give 64 pairs of one caption): keep only those in memory.
    spread = torch.linspace(0, len(examples) - 1, min(len(examples), num_head)).round().long().unique()
    head = list(examples.select(spread.tolist()))
    text_examples, held_out_texts = prepare_text_examples(args, len(examples), accelerator)
    # The captions are a lazy column of the memory-mapped cache; the text-only rows are a small list.
    tokenizer = build_tokenizer(args, chain(examples["text"], (example["text"] for example in text_examples)))
    return TrainingData(head, examples, None, text_examples, held_out_texts, tokenizer)


def prepare_model(
    args: argparse.Namespace,
    tokenizer: PreTrainedTokenizerBase,
    latent_channels: int,
    latent_size: int,
    accelerator: Accelerator,
) -> tuple[torch.nn.Module, str | None, list[torch.nn.Parameter]]:
    """Build the model with its gradient checkpointing, LoRA adapters or frozen text weights, and print its size.

    Returns:
        The model, the base model id (None from scratch) and the parameters trained only in their new special-token
        rows (`--freeze_text`; empty otherwise).
    """
    model, base_model = build_model(args, tokenizer, latent_channels, latent_size)
    if args.gradient_checkpointing:
        # `gradient_checkpointing_enable` is deprecated in transformers 5 (same behaviour, non-reentrant).
        model.activation_checkpointing_enable()
    new_token_ids = list(special_token_ids(tokenizer).values())
    row_trained = []
    if args.lora_rank:
        model = apply_lora(args, model, new_token_ids if base_model else [])
    elif args.freeze_text:
        # The new special-token rows train (input embeddings and LM head, as with LoRA): the model learns where an
        # image starts; text-only input never reads those rows, so its logits over the LLM's vocabulary stay exact.
        row_trained = freeze_text_weights(model, new_token_ids)
    accelerator.print(
        f"Model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
        f"({sum(p.numel() for p in trainable_parameters(model)) / 1e6:.2f}M trainable)."
    )
    return model, base_model, row_trained


def build_collator(
    args: argparse.Namespace,
    processor: TransfusionProcessor,
    noiser: TransfusionNoiser,
    context: int,
    accelerator: Accelerator,
) -> TransfusionDataCollator:
    """The training collator, seeded per process, truncating to the model's `context` (packing to
    `--max_sequence_length` when given)."""
    # Latents are memory-mapped and collation is cheap: no worker processes, so the collator's batch counter is exact.
    return TransfusionDataCollator(
        processor,
        noiser,
        seed=args.seed * 1000 + accelerator.process_index,
        max_length=context,
        max_sequence_length=args.max_sequence_length,
    )


def build_dataloader(
    args: argparse.Namespace,
    data: TrainingData,
    vae: AutoencoderKL | None,
    collator: TransfusionDataCollator,
    accelerator: Accelerator,
) -> torch.utils.data.DataLoader | StreamingLatentBatches:
    """The training batches: this process's part of the stream, encoded on the fly, or a shuffling loader (no
    worker processes, see `build_collator`) over the cached image rows and the text-only rows."""
    if args.streaming:
        # Each process reads its own part of the stream: not prepared by Accelerate, which would dispatch or slice
        # the batches of an iterable again; the batches are sent to the device here.
        return StreamingLatentBatches(
            data.stream,
            partial(pixels_to_latents, vae),
            collator,
            args.resolution,
            args.train_batch_size,
            shuffle_buffer_size=args.shuffle_buffer_size,
            seed=args.seed,
            process_index=accelerator.process_index,
            num_processes=accelerator.num_processes,
            device=accelerator.device,
            center_crop=args.center_crop,
            random_flip=args.random_flip,
            strict=args.strict_data,
        )
    examples, text_examples = data.examples, data.text_examples
    return torch.utils.data.DataLoader(
        torch.utils.data.ConcatDataset([examples, text_examples]) if text_examples else examples,
        batch_size=args.train_batch_size,
        shuffle=True,
        collate_fn=collator,
    )


def build_optimizer(
    args: argparse.Namespace,
    model: torch.nn.Module,
    row_trained: list[torch.nn.Parameter],
    num_processes: int,
    clock: TrainingClock | None = None,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the trainable parameters (no weight decay on biases, norms and embeddings) and its learning-rate
    schedule, counted in optimizer steps of all `num_processes`."""
    optimizer = torch.optim.AdamW(
        optimizer_parameter_groups(model, row_trained, args.adam_weight_decay),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        fused=args.optim == "adamw_torch_fused",
    )
    return optimizer, build_lr_scheduler(args, optimizer, num_processes, clock)


def prepare_with_accelerator(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    dataloader: torch.utils.data.DataLoader | StreamingLatentBatches,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[
    torch.nn.Module,
    torch.optim.Optimizer,
    torch.utils.data.DataLoader | StreamingLatentBatches,
    torch.optim.lr_scheduler.LRScheduler,
]:
    """`accelerator.prepare` the model, optimizer, schedule and (map-style only) the data loader; logs each
    process's shard under FSDP. Returns them in the same order."""
    if args.streaming:
        model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    else:
        model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    if accelerator.distributed_type == DistributedType.FSDP:
        log_fsdp_shard(accelerator, model)
    return model, optimizer, dataloader, lr_scheduler


def register_training_state(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model: torch.nn.Module,
    dataloader: torch.utils.data.DataLoader | StreamingLatentBatches,
) -> tuple[dict, EMAModel | None]:
    """The loop's state (step, epoch, position) and the EMA weights (`--use_ema`), registered with the stream's
    state for checkpointing. Returns the state dict and the EMA (None without)."""
    # The average of the trainable weights; `foreach` updates them all in a few fused kernels per step.
    ema = EMAModel(trainable_parameters(model), decay=args.ema_decay, foreach=True) if args.use_ema else None
    state = {
        "global_step": 0,
        "epoch": 0,
        "batches_in_epoch": 0,
        "micro_batches": 0,
        "skip_batches": 0,
        "last_checkpoint": None,
    }
    accelerator.register_for_checkpointing(LoopState(state))
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    if args.streaming:
        # The stream's position, shuffle buffer and generator: a resumed run draws the same next rows.
        accelerator.register_for_checkpointing(dataloader)
    return state, ema


def restore_checkpoint(
    args: argparse.Namespace,
    accelerator: Accelerator,
    state: dict,
    ema: EMAModel | None,
    collator: TransfusionDataCollator,
) -> None:
    """Resume from `--resume_from_checkpoint` when it names (or finds) a checkpoint: load every registered state,
    set where the data resumes and the collator's batch count, and drop the log records written after it."""
    checkpoint = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        if ema is not None:
            # Accelerate loads custom states onto the CPU: bring the averages back next to the weights.
            ema.to(accelerator.device)
        # A stream resumes from its own state; a map-style loader replays its sampler and skips the seen batches.
        state["skip_batches"] = 0 if args.streaming else state["batches_in_epoch"]
        collator.num_batches = state["micro_batches"]
        state["last_checkpoint"] = checkpoint
        if accelerator.is_main_process:
            for log_name in ("train_log.jsonl", "validation_log.jsonl"):
                truncate_log(Path(args.output_dir) / "logs" / log_name, checkpoint_step(checkpoint))
        accelerator.print(f"Resumed from {checkpoint} at step {checkpoint_step(checkpoint)}.")
    elif args.resume_from_checkpoint is not None:
        accelerator.print(f"No checkpoint in {args.output_dir}: starting from scratch.")


def start_trackers(args: argparse.Namespace, accelerator: Accelerator) -> None:
    """Start the `--report_to` trackers on the main process, with the scalar flags as the run's config."""
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers(
            "transfusion", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        )


def finish_training(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model: torch.nn.Module,
    components: dict,
    base_model: str | None,
    global_step: int,
) -> None:
    """Save the final pipeline from the main process (gathering the FSDP shards first) and end the run on every
    process: all processes must call this."""
    accelerator.wait_for_everyone()
    # Under FSDP every process holds a shard: gathering the full weights is a collective, so all processes call it.
    is_fsdp = accelerator.distributed_type == DistributedType.FSDP
    full_state_dict = accelerator.get_state_dict(model) if is_fsdp else None
    if accelerator.is_main_process:
        save_final(args, accelerator, model, components, base_model, global_step, full_state_dict)
    # `end_training` destroys the process group: no process may do so while the main one is still saving.
    accelerator.wait_for_everyone()
    accelerator.end_training()


def main(argv: list[str] | None = None) -> Path:
    """Train, then save the pipeline to `--output_dir`; returns that folder.

    Args:
        argv (`list[str]` or `argparse.Namespace`, *optional*): the command line (default `sys.argv`), or flags
            already parsed.
    """
    args = parse_args(argv) if not isinstance(argv, argparse.Namespace) else argv
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = setup_accelerator(args)

    vae, vae_scale, latent_channels = build_vae(args, accelerator.device)
    if args.resolution % vae_scale:
        raise ValueError(f"--resolution={args.resolution} is not a multiple of the VAE's downsampling {vae_scale}.")
    data = prepare_training_data(args, vae, accelerator)
    model, base_model, row_trained = prepare_model(
        args, data.tokenizer, latent_channels, args.resolution // vae_scale, accelerator
    )

    processor = TransfusionProcessor(
        data.tokenizer, image_size=args.resolution, num_image_tokens=model.config.num_patches
    )
    noiser = build_noiser(args, model.config.prediction_type)
    context = model.config.text_config.max_position_embeddings
    collator = build_collator(args, processor, noiser, context, accelerator)
    dataloader = build_dataloader(args, data, vae, collator, accelerator)
    clock = TrainingClock(args.max_train_time_minutes)
    optimizer, lr_scheduler = build_optimizer(args, model, row_trained, accelerator.num_processes, clock)
    model, optimizer, dataloader, lr_scheduler = prepare_with_accelerator(
        args, accelerator, model, optimizer, dataloader, lr_scheduler
    )
    state, ema = register_training_state(args, accelerator, model, dataloader)
    restore_checkpoint(args, accelerator, state, ema, collator)
    start_trackers(args, accelerator)

    components = {
        "vae": vae,
        "tokenizer": data.tokenizer,
        "ema": ema,
        "examples": data.head,
        "stream": dataloader if args.streaming else None,
        "inference_scheduler": inference_scheduler(args, noiser.scheduler),
        "clean_error": CleanImageErrorTracker(noiser),
        "grad_norms": GradNormWindow(args.max_grad_norm),
        "clock": clock,
        "collator": collator,
        "processor": processor,
        "noiser": noiser,
        "truncated_logged": 0,
        "text_validation_batches": text_validation_batches(data.held_out_texts, processor, noiser, context, args),
    }
    global_step = training_loop(args, accelerator, model, optimizer, lr_scheduler, dataloader, state, components)
    finish_training(args, accelerator, model, components, base_model, global_step)
    return Path(args.output_dir)


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as error:  # a diverged run: the message names the step and the checkpoint, no traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(3)
