"""What training a Transfusion model needs beyond the model: the training script's flags and checks, the run's model,
data, noise schedules, optimizer, validation, checkpoints and distributed setup, as typed functions.

`examples/train_transfusion.py` is the training loop over these parts; a user's own loop can import them the same way:

    from transfusion_hf.training import parse_args, build_vae, prepare_training_data, prepare_model
"""

from .arguments import check_args, parse_args
from .checkpointing import (
    LoopState,
    checkpoint_step,
    finish_training,
    list_checkpoints,
    register_training_state,
    resolve_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    save_final,
    truncate_log,
)
from .compilation import mark_varying_dims_dynamic, torch_compile_plugin
from .components import TrainingComponents
from .conditioning import TextConditioningGap, text_conditioning_gap
from .data import (
    TrainingData,
    build_collator,
    build_dataloader,
    clean_image_probability_from_args,
    prepare_training_data,
    set_loader_epoch,
    text_validation_batches,
)
from .distributed import build_accelerator, check_fsdp_setup, prepare_with_accelerator, setup_accelerator
from .model_setup import apply_lora, build_model, build_tokenizer, build_vae, image_config_fields, prepare_model
from .monitoring import (
    CleanImageErrorTracker,
    GradNormWindow,
    NonFiniteLossError,
    StepLosses,
    check_finite,
    num_real_tokens,
)
from .optimization import (
    TrainingClock,
    build_lr_scheduler,
    build_optimizer,
    follow_time_budget,
    time_budget_message,
    trainable_parameters,
    weight_decay_parameter_groups,
)
from .schedulers import build_noiser, inference_scheduler, training_scheduler
from .validation import make_pipeline, run_validation, text_lm_loss, training_forward

__all__ = [
    "CleanImageErrorTracker",
    "GradNormWindow",
    "LoopState",
    "NonFiniteLossError",
    "StepLosses",
    "TextConditioningGap",
    "TrainingClock",
    "TrainingComponents",
    "TrainingData",
    "apply_lora",
    "build_accelerator",
    "build_collator",
    "build_dataloader",
    "build_lr_scheduler",
    "build_model",
    "build_noiser",
    "build_optimizer",
    "build_tokenizer",
    "build_vae",
    "check_args",
    "check_finite",
    "check_fsdp_setup",
    "checkpoint_step",
    "finish_training",
    "follow_time_budget",
    "image_config_fields",
    "inference_scheduler",
    "list_checkpoints",
    "make_pipeline",
    "mark_varying_dims_dynamic",
    "num_real_tokens",
    "parse_args",
    "prepare_model",
    "prepare_training_data",
    "prepare_with_accelerator",
    "register_training_state",
    "resolve_checkpoint",
    "restore_checkpoint",
    "run_validation",
    "save_checkpoint",
    "save_final",
    "setup_accelerator",
    "text_conditioning_gap",
    "text_lm_loss",
    "set_loader_epoch",
    "clean_image_probability_from_args",
    "text_validation_batches",
    "time_budget_message",
    "torch_compile_plugin",
    "trainable_parameters",
    "training_forward",
    "training_scheduler",
    "truncate_log",
    "weight_decay_parameter_groups",
]
