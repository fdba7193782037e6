"""The optimizer and its learning-rate schedule: AdamW groups without decay on biases, norms and embeddings,
transformers' schedules counted in optimizer steps, and the wall-clock budget.
"""

from __future__ import annotations

import argparse
import time

import torch
from accelerate.utils import broadcast
from torch import nn
from transformers import (
    SchedulerType,
    get_scheduler,
)

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


def weight_decay_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups of the trainable parameters: `weight_decay` on the weights of linear and conv layers,
    none on biases, norms and embeddings.

    Biases and norms are transformers' convention, `Trainer.get_decay_parameter_names` (by name pattern and
    `nn.LayerNorm`). It keeps decay on embeddings and on `nn.GroupNorm` (the U-Net patch layers' norms, named `norm1`,
    `norm2`, `norm_out`, which its patterns miss); those layer types, and peft's trainable rows of new tokens (rows of
    the embedding), are taken out here with transformers' `get_parameter_names`.

    Args:
        model (`nn.Module`): the model (or its peft wrapper); parameters with `requires_grad=False` are left out.
        weight_decay (`float`): the decay of the first group.

    Returns:
        `list[dict]`: `[{"params": [...], "weight_decay": weight_decay}, {"params": [...], "weight_decay": 0.0}]`.
    """
    from peft.tuners.trainable_tokens import TrainableTokensLayer
    from transformers import Trainer
    from transformers.trainer_pt_utils import get_parameter_names

    # `get_decay_parameter_names` is a method that reads nothing from the Trainer: called without one, it gives
    # exactly the Trainer's rule instead of a copy of its patterns.
    by_trainer = set(Trainer.get_decay_parameter_names(None, model))
    not_embedding_or_group_norm = set(get_parameter_names(model, [nn.Embedding, nn.GroupNorm, TrainableTokensLayer]))
    decay = by_trainer & not_embedding_or_group_norm
    groups: list[dict] = [{"params": [], "weight_decay": weight_decay}, {"params": [], "weight_decay": 0.0}]
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            groups[0 if name in decay else 1]["params"].append(parameter)
    return groups


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


class TrainingClock:
    """Wall time of a training run against its budget (`--max_train_time_minutes`), counted from `start()` and read
    at each `tick()`.

    Every process must agree on when the budget is spent (one that stopped alone would leave the others waiting in the
    next gradient all-reduce) and on the learning rate the budget implies (replicas with different rates drift apart),
    so `tick` takes the main process's reading.

    Args:
        budget_minutes (`float`, *optional*): the budget; without one the run never runs out of time.
    """

    def __init__(self, budget_minutes: float | None = None):
        self.budget_seconds = None if budget_minutes is None else 60.0 * budget_minutes
        self.started: float | None = None
        self.reading = 0.0

    def start(self) -> None:
        self.started, self.reading = time.time(), 0.0

    def tick(self, accelerator=None) -> None:
        """Read the time (once per optimizer step); with several processes, the main process's reading for all (one
        scalar broadcast, only when there is a budget)."""
        if self.started is None or self.budget_seconds is None:
            return
        elapsed = time.time() - self.started
        if accelerator is not None and accelerator.num_processes > 1:
            reading = torch.tensor([elapsed], dtype=torch.float64, device=accelerator.device)
            elapsed = float(broadcast(reading, from_process=0)[0])
        self.reading = elapsed

    def elapsed(self) -> float:
        """Seconds from `start()` to the last `tick()`."""
        return self.reading

    def fraction(self) -> float:
        """The spent share of the budget, from 0 (not started, or no budget) up; above 1 once it is spent."""
        return 0.0 if not self.budget_seconds else self.elapsed() / self.budget_seconds

    def out_of_time(self) -> bool:
        return self.budget_seconds is not None and self.elapsed() > self.budget_seconds


def time_budget_message(args: argparse.Namespace, step: int, learning_rate: float) -> str:
    """What a run stopped by `--max_train_time_minutes` prints: the step it reached and, with the step clock
    (`--lr_schedule_clock steps`), how far from its end the schedule (planned for `--max_train_steps`) stopped.

    Args:
        args (`argparse.Namespace`): the parsed flags (`max_train_time_minutes`, `max_train_steps`,
            `lr_schedule_clock`).
        step (`int`): the last optimizer step of the run.
        learning_rate (`float`): the learning rate at that step.
    """
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


def follow_time_budget(scheduler: torch.optim.lr_scheduler.LambdaLR, clock: TrainingClock, total_steps: int) -> None:
    """Make a step-based `LambdaLR` schedule (any of `transformers.get_scheduler`'s) advance with the time budget too:
    at step `s` it gives the factor of step `max(s, clock.fraction() * total_steps)`, capped at the last step. A run
    whose steps do not fit the budget thus still warms up and decays to the schedule's end when the time runs out; one
    that fits follows its steps. Budgeted training decays to the end of the budget (Li et al., 2020, "Budgeted
    Training"); transformers and accelerate have no such schedule, so it wraps theirs.

    The wrappers are plain closures, so `LambdaLR.state_dict` leaves them out of checkpoints (it saves only the step);
    the clock of a resumed run restarts with the run, as its time budget does.
    """

    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise ValueError(f"A time budget can only move a LambdaLR schedule, not {type(scheduler).__name__}.")

    def follow(factor_of_step):
        def at_time_or_step(step: int) -> float:
            # The schedule's last step is total_steps - 1 (the factor of a full run's last update); past it some
            # schedules rise again (cosine with a floor).
            return factor_of_step(min(max(step, clock.fraction() * total_steps), total_steps - 1))

        return at_time_or_step

    # The first learning rate was set at construction, before the clock starts: the step schedule's own, unchanged.
    scheduler.lr_lambdas = [follow(factor) for factor in scheduler.lr_lambdas]
