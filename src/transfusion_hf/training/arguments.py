"""The training script's command line: every flag, the recipe's defaults, and the checks that refuse a bad flag before
any data is loaded.
"""

from __future__ import annotations

import argparse
import inspect
import logging

from diffusers import AutoencoderKL
from transformers import AutoConfig

from ..configuration_transfusion import TransfusionConfig
from ..data.buckets import BUCKETS_FLAG, parse_aspect_ratio_buckets
from ..data.collator import DEFAULT_CLEAN_IMAGE_PROBABILITY
from ..data.image_text import (
    EDITING_DATASETS,
    add_data_arguments,
    aspect_ratio_buckets_from_args,
    check_dataset_from_args,
)
from ..data.latent_cache import LATENT_DTYPES
from ..evaluation.feature_extractors import STANDARD_FEATURE_EXTRACTOR
from ..evaluation.field_metrics import DEFAULT_CLIP_MODEL, FIELD_METRICS
from ..recipes import DEFAULT_RECIPE, list_recipes, load_recipe, resolve_recipe_name
from .compilation import TORCH_COMPILE_BACKENDS
from .model_setup import (
    IMAGE_FIELD_FLAGS,
    PRETRAINED_FLAG,
    first_line,
    image_config_fields,
    pretrained_has_vae,
    run_model_preset,
    warn_about_preset_limits,
)
from .optimization import DEFAULT_LR_SCHEDULER, DEFAULT_MIN_LR_RATIO, LR_SCHEDULERS, MIN_LR_SCHEDULERS
from .schedulers import INFERENCE_SCHEDULER_CHOICES, build_noiser, inference_scheduler
from .validation import DEFAULT_VALIDATION_METRIC_SAMPLES, DEFAULT_VALIDATION_STEPS, check_validation_metrics

logger = logging.getLogger("transfusion_hf.training")


DEFAULT_TEXT_ONLY_SHARE = 0.5


def add_data_and_text_arguments(parser: argparse.ArgumentParser) -> None:
    """The data source, the latent cache, the text-only data and packing flags."""
    data = add_data_arguments(parser, aspect_ratio_buckets=True)
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
    data.add_argument(
        "--interleaved",
        action="store_true",
        help="The rows are interleaved documents (text, image, text, image, ...): aligned lists of texts and images "
        "(--caption_column, default 'texts', and --image_column, default 'images'; OBELICS's layout) in a Hub data "
        "set or a local folder of parquet / json files (--dataset_name), or one .json per sample holding both lists, "
        "images base64-encoded, in webdataset shards (--train_data_files). Each image is noised with its own t or "
        "kept clean as context (--clean_image_probability); documents over the context are cut there.",
    )
    data.add_argument(
        "--clean_image_probability",
        type=float,
        default=None,
        help="With --interleaved: the chance each image of a document but its last part is kept clean as context "
        f"(t = 0, no loss) instead of noised; default {DEFAULT_CLEAN_IMAGE_PROBABILITY} (editing from documents: "
        "0.70 at 0, the paper's every image noised; 0.85 at 0.5; 0.97 at 1).",
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


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The recipe, the backbone and the image layers."""
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
    model.add_argument(
        PRETRAINED_FLAG,
        default=None,
        help="Start from a saved TransfusionPipeline folder (save_pretrained, e.g. the --output_dir of a finished run): "
        "its transformer, tokenizer and VAE (if any) instead of a model built from the recipe, e.g. to train the "
        "editing task (--dataset shapes_edit) from a model trained on shapes. The recipe still gives the training "
        "hyper-parameters.",
    )
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
    model.add_argument(
        "--patch_position_embedding_type",
        choices=["learned", "factorized", "interpolated"],
        default=None,
        help="How a patch's (row, column) is embedded, for images of any aspect ratio (`TransfusionConfig`).",
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


def add_objective_arguments(parser: argparse.ArgumentParser) -> None:
    """The diffusion objective and its noising (the recipe sets some defaults)."""
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
        "--noise_offset",
        type=float,
        default=0.0,
        help="Offset noise (diffusers' flag): a per-image, per-channel constant of this scale added to the noise, for "
        "epsilon / v prediction.",
    )
    recipe.add_argument(
        "--importance_exponent",
        type=float,
        default=None,
        help="With --timestep_sampling importance: times drawn in proportion to weight**exponent, in (0, 1] "
        "(default 0.5; 1 gives every image the same weight but few times below t = 750).",
    )


def add_optimization_arguments(parser: argparse.ArgumentParser) -> None:
    """The optimizer and its learning-rate schedule."""
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
    optim.add_argument(
        "--torch_compile",
        action="store_true",
        help="Compile the training step with torch.compile (through Accelerate's TorchDynamoPlugin; fullgraph=True on "
        "one process): one graph for the forward and the backward; validation and saving use the model uncompiled. "
        "Off by default (on CPU the compile time outweighs the gain on short runs).",
    )
    optim.add_argument(
        "--torch_compile_backend",
        choices=TORCH_COMPILE_BACKENDS,
        default=None,
        help="torch.compile backend (default inductor); setting it turns --torch_compile on (as in transformers' "
        "TrainingArguments).",
    )
    optim.add_argument(
        "--torch_compile_mode",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        default=None,
        help="torch.compile mode; setting it turns --torch_compile on.",
    )
    optim.add_argument("--use_ema", action="store_true")
    optim.add_argument("--ema_decay", type=float, default=0.999)
    optim.add_argument("--seed", type=int, default=0)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Checkpoints, validation, logging, the Hub and the launch."""
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
        "--validation_metrics",
        default=None,
        help=f"Field metrics measured at every --validation_steps, a comma list of {', '.join(FIELD_METRICS)} "
        "(transfusion_hf.evaluation.field_metrics; e.g. fid,caption): logged as eval/<name> to the trackers, "
        "logs/validation_log.jsonl and the console. Off by default.",
    )
    run.add_argument(
        "--num_validation_metric_samples",
        type=int,
        default=DEFAULT_VALIDATION_METRIC_SAMPLES,
        help="Validation examples (spread over the data) the --validation_metrics are measured on.",
    )
    run.add_argument(
        "--fid_feature_extractor",
        default=STANDARD_FEATURE_EXTRACTOR,
        help="Features of FID / KID: 'inception' (torchmetrics' standard, a download), 'shapes' (a CNN trained here "
        "on the built-in shapes) or a .pt2 file (transfusion_hf.evaluation.save_feature_extractor).",
    )
    run.add_argument("--clip_model", default=DEFAULT_CLIP_MODEL, help="CLIP of the CLIP score: a Hub id or a folder.")
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


def parse_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """Parse and check the training flags: every check that needs no data runs here, so a bad flag fails in a
    second. The recipe (`--recipe`, default `small`) sets the defaults of its hyper-parameters; a flag given wins.

    Args:
        argv (`list[str]`, *optional*): the command line without the program name (default `sys.argv[1:]`).
        description (`str`, *optional*): the `--help` text (the example script passes its docstring).

    Raises:
        `ValueError`: naming the flag and its value, for a bad flag or combination.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for add_arguments in (
        add_data_and_text_arguments,
        add_model_arguments,
        add_objective_arguments,
        add_optimization_arguments,
        add_run_arguments,
    ):
        add_arguments(parser)
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
    pre_parser.add_argument(BUCKETS_FLAG, default=None)
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
    num_image_sizes = count_image_sizes(known.aspect_ratio_buckets)
    defaults = load_recipe(DEFAULT_RECIPE).training_defaults(prediction_type, num_image_sizes)
    defaults.update(recipe.training_defaults(prediction_type, num_image_sizes))
    if num_image_sizes > 1 and "max_train_steps" in defaults:
        logger.info(
            f"{BUCKETS_FLAG}: {num_image_sizes} image sizes share the steps, so the recipe trains "
            f"{defaults['max_train_steps']} (--max_train_steps sets another number)."
        )
    if "diffusion_loss_weight" in recipe.model:
        defaults["diffusion_loss_weight"] = recipe.model["diffusion_loss_weight"]
    parser.set_defaults(**defaults)
    return name


def count_image_sizes(aspect_ratio_buckets: str | None) -> int:
    """The number of sizes `--aspect_ratio_buckets` names (1 without it, or when it does not parse: the full check,
    which names the flag and its value, comes later)."""
    if aspect_ratio_buckets is None:
        return 1
    try:
        return max(1, len(parse_aspect_ratio_buckets(aspect_ratio_buckets)))
    except ValueError:
        return 1


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
    if args.clean_image_probability is not None and not 0 <= args.clean_image_probability <= 1:
        raise ValueError(f"--clean_image_probability must be in [0, 1], got {args.clean_image_probability}.")
    if args.clean_image_probability is not None and not args.interleaved:
        raise ValueError(
            f"--clean_image_probability={args.clean_image_probability} applies to interleaved documents only: add "
            "--interleaved (an editing data set keeps its sources clean already)."
        )
    check_text_and_packing_args(args)
    check_text_freezing_args(args)
    if args.lora_rank < 0:
        raise ValueError(f"--lora_rank must be >= 0, got {args.lora_rank}.")
    if args.torch_compile_backend is not None or args.torch_compile_mode is not None:
        args.torch_compile = True
    if args.lora_rank and args.text_model_name_or_path is None:
        raise ValueError(
            f"--lora_rank={args.lora_rank} needs --text_model_name_or_path: LoRA adapts a pretrained LLM, and over "
            "the random frozen weights of a model trained from scratch it would train next to nothing."
        )
    # The recipe and the noising flags are checked here, before any data is loaded or encoded.
    preset = run_model_preset(args)
    prediction_type = args.prediction_type or preset.get("prediction_type", "epsilon")
    if args.pretrained_model_name_or_path is not None:
        prediction_type = pretrained_config(args).prediction_type
    noiser = build_noiser(args, prediction_type)
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
    if args.pretrained_model_name_or_path is not None:
        check_pretrained_args(args)
    else:
        check_model_fields(args, preset)
    warn_about_preset_limits(args)
    check_validation_metrics(args)
    check_dataset_from_args(args)
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
    # The buckets' sides must be whole patches (of latents, through the VAE's downsampling): said about the flag
    # before the config refuses the `max_latent_size` made from them.
    aspect_ratio_buckets_from_args(args, multiple=fields.get("patch_size", TransfusionConfig.patch_size) * vae_scale)
    config = TransfusionConfig(text_config=text_config, **fields)
    check_editing_context(args, config)
    # bos, <boi>, the image, <eoi>, eos: the shortest sequence must fit the backbone's positions, for the largest
    # image trained (the default square one, or the largest bucket).
    max_positions = getattr(config.text_config, "max_position_embeddings", None)
    sizes = aspect_ratio_buckets_from_args(args) or [(args.resolution, args.resolution)]
    largest, (height, width) = max(
        (config.num_patches_for(height // vae_scale, width // vae_scale), (height, width)) for height, width in sizes
    )
    if max_positions is not None and largest + 4 > max_positions:
        raise ValueError(
            f"--patch_size={config.patch_size} at {height}x{width} pixels gives {largest} image positions, more than "
            f"the backbone's max_position_embeddings={max_positions} allow: use a larger --patch_size or a VAE."
        )


def check_editing_context(args: argparse.Namespace, config: TransfusionConfig) -> None:
    """An editing data set's rows hold two images (source and target): both blocks must fit the backbone's context."""
    if args.dataset_name not in EDITING_DATASETS:
        return
    max_positions = getattr(config.text_config, "max_position_embeddings", None)
    needed = 2 * (config.num_patches + 2) + 2  # bos, two image blocks with <boi> and <eoi>, eos
    if max_positions is not None and needed > max_positions:
        raise ValueError(
            f"--dataset_name={args.dataset_name}: a source and a target image take {needed} positions at "
            f"patch_size={config.patch_size}, more than the model's max_position_embeddings={max_positions}: use a "
            "larger --patch_size (for the model trained first) or a VAE."
        )
    if args.max_sequence_length is not None and needed > args.max_sequence_length:
        raise ValueError(
            f"--max_sequence_length={args.max_sequence_length} cannot hold a row of --dataset_name="
            f"{args.dataset_name}: a source and a target image take {needed} positions."
        )


def pretrained_config(args: argparse.Namespace) -> TransfusionConfig:
    """The config of the transformer of `--pretrained_model_name_or_path` (raises one line naming the flag when the
    folder is not a saved Transfusion pipeline)."""
    from .model_setup import pretrained_pipeline_index

    path = args.pretrained_model_name_or_path
    pretrained_pipeline_index(path)
    try:
        return TransfusionConfig.from_pretrained(path, subfolder="transformer")
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{PRETRAINED_FLAG}={path!r}: its transformer cannot be loaded: {first_line(error)}"
        ) from error


def check_pretrained_args(args: argparse.Namespace) -> None:
    """Refuse the flags that would build another model than the saved pipeline's, and a `--resolution` or
    `--prediction_type` other than its own."""
    path = args.pretrained_model_name_or_path
    config = pretrained_config(args)
    given = [
        f"--{name}"
        for name in (
            "text_model_name_or_path",
            "tokenizer_name_or_path",
            "vae_name_or_path",
            "config_overrides",
            *IMAGE_FIELD_FLAGS,
            "patch_position_embedding",
            "unet_linear_shortcut",
            "unet_output_shortcut",
        )
        if getattr(args, name, None) is not None
    ]
    if args.modality_experts:
        given.append("--modality_experts")
    if given:
        raise ValueError(
            f"{PRETRAINED_FLAG}={path!r} brings its own model, tokenizer and VAE: drop {', '.join(given)}."
        )
    if args.prediction_type is not None and args.prediction_type != config.prediction_type:
        raise ValueError(
            f"--prediction_type={args.prediction_type} differs from the {config.prediction_type} of "
            f"{PRETRAINED_FLAG}={path!r}."
        )
    check_editing_context(args, config)
    vae_scale = 1
    if pretrained_has_vae(path):
        blocks = AutoencoderKL.load_config(path, subfolder="vae").get("block_out_channels", [64])
        vae_scale = 2 ** (len(blocks) - 1)
    # The saved model's grids bound the buckets: its `max_latent_size` cannot grow with a pretrained model.
    aspect_ratio_buckets_from_args(
        args, multiple=config.patch_size * vae_scale, max_side=config.max_latent_side * vae_scale
    )
    if args.resolution != config.latent_size * vae_scale:
        raise ValueError(
            f"--resolution={args.resolution} differs from the {config.latent_size * vae_scale} px the model of "
            f"{PRETRAINED_FLAG}={path!r} was made for."
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
