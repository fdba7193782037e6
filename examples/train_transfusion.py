#!/usr/bin/env python
"""Train a Transfusion model with Accelerate: from scratch or from a pretrained decoder LLM (optionally with LoRA, or
with image copies of its weights and the text frozen: --modality_experts --freeze_text), on a Hub data set, a local
image folder, webdataset shards or the built-in captioned shapes, or on interleaved documents of several images
(`--interleaved`), optionally with text-only data mixed in and the sequences packed (`--text_dataset_name`,
`--max_sequence_length`).

    accelerate launch examples/train_transfusion.py --dataset_name shapes --output_dir outputs/shapes

Its defaults are the package's default recipe (`--recipe small`, `transfusion_hf.recipes`): the model config and the
training hyper-parameters measured to draw what the prompt says on a CPU, in pixel space or on a VAE's latents
(rectified flow, logit-normal times, learning rate 2e-3, 2,000 steps of 32). A flag given on the command line wins over
the recipe. Every part below lives in `transfusion_hf.training` (typed functions a loop of your own can import); this
file is the training loop. Beyond the recipe, the paper's choices (section 4.1): lambda = 5, 80/20
caption-first/image-first pairs, a noise limit of t <= 500 on image-first pairs, AdamW (0.9, 0.95), weight decay 0.1
(not on biases, norms and embeddings), gradient clipping 1.0, warmup then cosine to 5% of the peak learning rate
(transformers' `cosine_warmup_with_min_lr` schedule). The paper's epsilon prediction on DDPM's cosine schedule
(`--prediction_type epsilon`) ignores the prompt at small scale; with `--snr_gamma 20 --snr_weighting truncated_min_snr
--timestep_sampling importance` it draws, in more steps than flow. Every `--validation_steps` (250) the run logs, with
a grid of samples, the text-conditioning gap: how much the diffusion loss of 64 fixed pairs rises when each image gets
another image's caption (about 0 for a model that ignores the prompt).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from transfusion_hf import TransfusionProcessor
from transfusion_hf.training import (
    CleanImageErrorTracker,
    GradNormWindow,
    NonFiniteLossError,
    StepLosses,
    TrainingClock,
    TrainingComponents,
    build_collator,
    build_dataloader,
    build_noiser,
    build_optimizer,
    build_vae,
    check_finite,
    finish_training,
    inference_scheduler,
    num_real_tokens,
    parse_args,
    prepare_model,
    prepare_training_data,
    prepare_with_accelerator,
    register_training_state,
    restore_checkpoint,
    run_validation,
    save_checkpoint,
    set_loader_epoch,
    setup_accelerator,
    text_lm_loss,
    text_validation_batches,
    time_budget_message,
    trainable_parameters,
    training_forward,
)

logger = logging.getLogger("train_transfusion")


def training_loop(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    dataloader: Iterable[dict[str, torch.Tensor]],
    state: dict,
    components: TrainingComponents,
) -> int:
    """Run until `max_train_steps` (or the time budget). Returns the last global step.

    Args:
        state (`dict`): the loop's position (`global_step`, `epoch`, `batches_in_epoch`, `micro_batches`,
            `skip_batches`, `last_checkpoint`), saved with every checkpoint (`register_training_state`).
    """
    global_step = state["global_step"]
    progress = tqdm(
        total=args.max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc="training"
    )
    clock = components.clock
    clock.start()
    window_tokens, window_start = 0, time.time()
    ema = components.ema
    step_losses = StepLosses()
    grad_norms = components.grad_norms
    while global_step < args.max_train_steps:
        epoch_loader = dataloader
        if state["skip_batches"]:
            epoch_loader = accelerator.skip_first_batches(dataloader, state["skip_batches"])
            state["skip_batches"] = 0
        set_loader_epoch(dataloader, state["epoch"])
        set_loader_epoch(epoch_loader, state["epoch"])
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
            window_tokens += num_real_tokens(batch, components.tokenizer.pad_token_id) * accelerator.num_processes
            components.clean_error.update(batch, output.diffusion_predictions)
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
                    accelerator, args.output_dir, global_step, args.checkpoints_total_limit, args.max_train_steps
                )
            if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                if ema is not None:
                    # Validate the weights the run saves (the average), then give training its own weights back.
                    ema.store(trainable_parameters(model))
                    ema.copy_to(trainable_parameters(model))
                run_validation(args, accelerator, model, components, components.examples, global_step)
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


def log_step(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model: torch.nn.Module,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    components: TrainingComponents,
    step: int,
    losses: dict[str, float],
    tokens_per_second: float,
) -> None:
    """Write one record to the trackers and `logs/train_log.jsonl`. Every process calls it: the count of truncated
    sequences is summed over processes, and the held-out text loss runs the (possibly sharded) model on all of them.
    """
    collator = components.collator
    truncated = collator.num_truncated - components.truncated_logged
    components.truncated_logged = collator.num_truncated
    record = {
        "step": step,
        **losses,
        "lr": lr_scheduler.get_last_lr()[0],
        "tokens_per_second": tokens_per_second,
        # Sequences whose text was cut to fit the context since the last record (collated, all processes).
        "truncated_sequences": int(accelerator.reduce(torch.tensor(truncated, device=accelerator.device), "sum")),
        **components.grad_norms.compute(),
        **components.clean_error.compute(),
    }
    if components.stream is not None:
        # Unreadable images skipped so far by the stream (all processes).
        skipped = torch.tensor(components.stream.num_skipped, device=accelerator.device)
        record["skipped_images"] = int(accelerator.reduce(skipped, "sum"))
    if components.text_validation_batches:
        record["eval/text_lm_loss"] = text_lm_loss(model, components.text_validation_batches, accelerator)
    accelerator.log(record, step=step)
    if accelerator.is_main_process:
        with (Path(args.output_dir) / "logs" / "train_log.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def start_trackers(args: argparse.Namespace, accelerator: Accelerator) -> None:
    """Start the `--report_to` trackers on the main process, with the scalar flags as the run's config."""
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers(
            "transfusion", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        )


def main(argv: list[str] | None = None) -> Path:
    """Train, then save the pipeline to `--output_dir`; returns that folder.

    Args:
        argv (`list[str]` or `argparse.Namespace`, *optional*): the command line (default `sys.argv`), or flags
            already parsed.
    """
    # Before the flags are parsed: parsing logs what the recipe chose (e.g. the steps for several image sizes).
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args(argv, description=__doc__) if not isinstance(argv, argparse.Namespace) else argv
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
    collator = build_collator(args, processor, noiser, context, accelerator, patch_size=model.config.patch_size)
    dataloader = build_dataloader(args, data, vae, collator, accelerator)
    clock = TrainingClock(args.max_train_time_minutes)
    optimizer, lr_scheduler = build_optimizer(args, model, row_trained, accelerator.num_processes, clock)
    model, optimizer, dataloader, lr_scheduler = prepare_with_accelerator(
        args, accelerator, model, optimizer, dataloader, lr_scheduler
    )
    state, ema = register_training_state(args, accelerator, model, dataloader)
    restore_checkpoint(args, accelerator, state, ema, collator)
    start_trackers(args, accelerator)

    components = TrainingComponents(
        tokenizer=data.tokenizer,
        processor=processor,
        noiser=noiser,
        collator=collator,
        inference_scheduler=inference_scheduler(args, noiser.scheduler),
        clean_error=CleanImageErrorTracker(noiser),
        grad_norms=GradNormWindow(args.max_grad_norm),
        clock=clock,
        vae=vae,
        examples=data.head,
        ema=ema,
        stream=dataloader if args.streaming else None,
        text_validation_batches=text_validation_batches(data.held_out_texts, processor, noiser, context, args),
    )
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
