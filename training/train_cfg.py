#!/usr/bin/env python
"""Train a class-conditional UNet with classifier-free guidance, with accelerate.

    accelerate launch training/train_cfg.py                                  # builtin:mnist-5k into ./cfg-mnist
    accelerate launch training/train_cfg.py --dataset_name builtin:fashion-mnist --output_dir cfg-fashion
    accelerate launch training/train_cfg.py --dataset_name uoft-cs/cifar10 --image_column img --resolution 32

Each label is replaced by the null class with probability --cond_drop_prob, so that one network learns both the
conditional and the unconditional prediction that guidance mixes. The output folder ends up holding a complete
`ClassConditionalPipeline` with the EMA weights, a sample grid, the evaluation results and a model card.
"""

import argparse
import json
import logging
import math
import os
import shutil
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from diffusers_cfg.model_cards.model_card import write_model_card
from diffusers_cfg.pipelines import ClassConditionalPipeline
from diffusers_cfg.training import checkpoints
from diffusers_cfg.training.classifier import load_or_train_classifier
from diffusers_cfg.training.data import (
    DEFAULT_DATASET,
    collate_examples,
    detect_image_format,
    load_labeled_images,
    transformed_split,
)
from diffusers_cfg.training.evaluation import (
    autocast_context,
    cpu_supports_bf16,
    evaluate_guidance_scales,
    image_grid,
    sample_class_balanced,
)
from diffusers_cfg.training.model import build_noise_scheduler, build_unet, drop_labels, sampling_scheduler

logger = get_logger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a class-conditional diffusion UNet with classifier-free guidance.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", default=DEFAULT_DATASET,
                      help="Hub dataset id, local imagefolder, .parquet file, or builtin:digits, builtin:mnist-5k, "
                           "builtin:fashion-mnist.")
    data.add_argument("--dataset_cache_dir", default=None, help="Cache folder for the datasets library.")
    data.add_argument("--image_column", default=None, help="Image column; found automatically when omitted.")
    data.add_argument("--label_column", default=None, help="Integer or ClassLabel column; found automatically when omitted.")
    data.add_argument("--resolution", type=int, default=None,
                      help="Square image size in pixels; the dataset's own size when omitted.")
    data.add_argument("--dataloader_num_workers", type=int, default=0,
                      help="Data loader worker processes; 0 loads in the training process.")

    model = parser.add_argument_group("model")
    model.add_argument("--block_out_channels", type=int, nargs="+", default=None,
                       help="Channels per UNet block, e.g. 32 64 128; sized for the resolution when omitted.")
    model.add_argument("--layers_per_block", type=int, default=1, help="ResNet layers per UNet block.")
    model.add_argument("--attention_levels", type=int, nargs="*", default=[],
                       help="Block indices (0 = full resolution) that get self-attention.")
    model.add_argument("--num_train_timesteps", type=int, default=1000, help="Steps of the training noise schedule.")
    model.add_argument("--beta_schedule", default="linear", choices=["linear", "scaled_linear", "squaredcos_cap_v2"],
                       help="Noise schedule.")
    model.add_argument("--prediction_type", default="epsilon", choices=["epsilon", "v_prediction", "sample"],
                       help="What the UNet predicts.")

    guidance = parser.add_argument_group("guidance")
    guidance.add_argument("--cond_drop_prob", type=float, default=0.1,
                          help="Probability that each label is replaced by the null class during training.")
    guidance.add_argument("--guidance_scale", type=float, default=4.0,
                          help="Guidance scale s of the final sample grid and the pipeline's default (w = s - 1).")
    guidance.add_argument("--eval_guidance_scales", type=float, nargs="+", default=[1.0, 4.0],
                          help="Guidance scales s at which the final class accuracy is measured.")

    optimization = parser.add_argument_group("optimization")
    optimization.add_argument("--train_batch_size", type=int, default=128, help="Images per device per micro-batch.")
    optimization.add_argument("--max_train_steps", type=int, default=700, help="Optimizer steps to train for.")
    optimization.add_argument("--gradient_accumulation_steps", type=int, default=1,
                              help="Micro-batches per optimizer step.")
    optimization.add_argument("--learning_rate", type=float, default=2e-3, help="Peak AdamW learning rate.")
    optimization.add_argument("--lr_scheduler", default="cosine",
                              choices=["constant", "constant_with_warmup", "linear", "cosine"],
                              help="Learning-rate schedule after the warm-up.")
    optimization.add_argument("--lr_warmup_steps", type=int, default=50, help="Optimizer steps of linear warm-up.")
    optimization.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    optimization.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    optimization.add_argument("--adam_weight_decay", type=float, default=0.0, help="AdamW weight decay.")
    optimization.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    optimization.add_argument("--ema_max_decay", type=float, default=0.9999,
                              help="Upper bound of the EMA decay, which warms up as 1 - (1 + step)^-ema_power.")
    optimization.add_argument("--ema_power", type=float, default=0.75, help="Exponent of the EMA decay warm-up.")
    optimization.add_argument("--no_ema", action="store_true", help="Save the raw weights instead of their EMA.")
    optimization.add_argument("--mixed_precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                              help="auto: bf16 on GPUs and CPUs with native bf16 (AVX-512 BF16 or AMX), else fp32.")
    optimization.add_argument("--seed", type=int, default=0, help="Random seed of weights, data order and noise.")

    saving = parser.add_argument_group("checkpoints and output")
    saving.add_argument("--output_dir", default="cfg-mnist", help="Where the pipeline, samples and checkpoints go.")
    saving.add_argument("--checkpointing_steps", type=int, default=250,
                        help="Save a resumable checkpoint every this many optimizer steps.")
    saving.add_argument("--checkpoints_total_limit", type=int, default=3, help="Checkpoints kept; older ones are deleted.")
    saving.add_argument("--resume_from_checkpoint", default=None,
                        help="'latest', or a checkpoint folder, to continue an interrupted run.")

    logs = parser.add_argument_group("logging and evaluation")
    logs.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "wandb", "none"],
                      help="Where metrics go.")
    logs.add_argument("--sample_every_steps", type=int, default=250,
                      help="Write a sample grid (classes by guidance scale) every this many optimizer steps; 0 = never.")
    logs.add_argument("--eval_samples_per_class", type=int, default=20,
                      help="Samples per class for the final class-accuracy check; 0 skips it.")
    logs.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps for sample grids and evaluation.")
    logs.add_argument("--dry_run", action="store_true", help="Print the resolved configuration and model size, then stop.")

    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true", help="Push the output folder to the Hub at the end.")
    hub.add_argument("--hub_model_id", default=None, help="Repository id to push to, e.g. user/cfg-mnist.")
    hub.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repository as private.")
    hub.add_argument("--hub_token", default=None, help="Hub token; the usual HF_TOKEN or saved login when omitted.")

    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    positive = ["train_batch_size", "max_train_steps", "gradient_accumulation_steps", "checkpointing_steps",
                "num_inference_steps", "num_train_timesteps"]  # fmt: skip
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not 0.0 <= args.cond_drop_prob < 1.0:
        raise ValueError(f"--cond_drop_prob must be in [0, 1), got {args.cond_drop_prob}")
    if args.learning_rate <= 0:
        raise ValueError(f"--learning_rate must be positive, got {args.learning_rate}")
    if args.resolution is not None and args.resolution < 4:
        raise ValueError(f"--resolution must be at least 4 pixels, got {args.resolution}")
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id, e.g. --hub_model_id your-name/cfg-mnist")
    for scale in [args.guidance_scale, *args.eval_guidance_scales]:
        if scale < 0:
            raise ValueError(f"guidance scales must be >= 0 (0 = unconditional), got {scale}")


def resolve_mixed_precision(requested: str) -> str:
    """Pick the autocast dtype: "auto" means bf16 where the hardware runs it natively, else fp32."""
    if requested == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_supports_bf16() else "no"
    if requested == "fp16" and not torch.cuda.is_available():
        fallback = "bf16" if cpu_supports_bf16() else "no"
        logger.warning(f"--mixed_precision fp16 needs a GPU; using {fallback} on this CPU instead", main_process_only=True)
        return fallback
    return requested


def use_all_cpu_cores(accelerator) -> None:
    """On CPU, give each local process its share of the cores.

    `accelerate launch` without a config sets OMP_NUM_THREADS=1 for a single CPU process (accelerate 1.16), which
    halves training speed on 2 cores. Set DIFFUSERS_CFG_KEEP_THREADS=1 to keep the thread count you launched with.
    """
    if accelerator.device.type != "cpu" or os.environ.get("DIFFUSERS_CFG_KEEP_THREADS") == "1":
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE") or accelerator.num_processes)
    threads = max(1, cores // max(1, local_processes))
    if torch.get_num_threads() != threads:
        logger.info(f"Using {threads} CPU threads per process (was {torch.get_num_threads()})")
        torch.set_num_threads(threads)


def build_data(args, accelerator):
    """Load the dataset and return it with its training data loader, resolution and channel count."""
    data = load_labeled_images(args.dataset_name, args.image_column, args.label_column, args.dataset_cache_dir)
    native_resolution, channels = detect_image_format(data)
    resolution = args.resolution or native_resolution
    train = transformed_split(data, "train", resolution, channels)
    generator = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(
        train,
        batch_size=args.train_batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate_examples,
        num_workers=args.dataloader_num_workers,
        generator=generator,
        multiprocessing_context="spawn" if args.dataloader_num_workers > 0 else None,
        persistent_workers=args.dataloader_num_workers > 0,
    )
    if len(loader) == 0:
        raise ValueError(
            f"the train split has {len(train)} images, fewer than --train_batch_size {args.train_batch_size}"
        )
    return data, loader, resolution, channels


def train_step(batch, unet, noise_scheduler, null_class_id, cond_drop_prob, prediction_type):
    """Noise a batch, drop labels, and return the denoising loss (in fp32) and the share of null labels."""
    clean = batch["pixel_values"]
    noise = torch.randn_like(clean)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],), device=clean.device)
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    labels = drop_labels(batch["class_labels"], cond_drop_prob, null_class_id)

    prediction = unet(noisy, timesteps, class_labels=labels).sample
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(clean, noise, timesteps)
    else:
        target = clean
    loss = F.mse_loss(prediction.float(), target.float())
    null_share = (labels == null_class_id).float().mean()
    return loss, null_share


def build_pipeline(unet, noise_scheduler, id2label, guidance_scale) -> ClassConditionalPipeline:
    pipe = ClassConditionalPipeline(
        unet=unet, scheduler=sampling_scheduler(noise_scheduler), id2label=id2label, default_guidance_scale=guidance_scale
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class EMAWeights:
    """Swap the EMA weights into the UNet for sampling or saving, and restore the training weights afterwards."""

    def __init__(self, ema: EMAModel | None, unet):
        self.ema = ema
        self.unet = unet

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.unet.parameters())
            self.ema.copy_to(self.unet.parameters())
        self.was_training = self.unet.training
        self.unet.eval()
        return self.unet

    def __exit__(self, *exc_info):
        if self.ema is not None:
            self.ema.restore(self.unet.parameters())
        self.unet.train(self.was_training)


def write_sample_grid(pipe, path, scales, num_inference_steps, mixed_precision, seed=0) -> torch.Tensor:
    """Sample one image per class and scale (rows: classes, columns: scales) and save the grid as a PNG."""
    columns = []
    for scale in scales:
        images, _ = sample_class_balanced(
            pipe, 1, scale, num_inference_steps, seed=seed, mixed_precision=mixed_precision
        )
        columns.append(images)
    grid_images = torch.stack(columns, dim=1).flatten(0, 1)
    grid = image_grid(grid_images, rows=pipe.num_classes, cols=len(scales))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    grid.save(path)
    return grid


def main(argv=None):
    args = parse_args(argv)
    mixed_precision = resolve_mixed_precision(args.mixed_precision)
    logging_dir = os.path.join(args.output_dir, "logs")
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # accelerate logs seven lines per checkpoint; the project's own logger says where each one went.
    logging.getLogger("accelerate.checkpointing").setLevel(logging.WARNING)
    logging.getLogger("accelerate.accelerator").setLevel(logging.WARNING)
    if not accelerator.is_local_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    set_seed(args.seed)
    use_all_cpu_cores(accelerator)

    # 1. Data and model
    data, loader, resolution, channels = build_data(args, accelerator)
    unet = build_unet(resolution, channels, data.num_classes, args.block_out_channels, args.layers_per_block,
                      tuple(args.attention_levels))  # fmt: skip
    noise_scheduler = build_noise_scheduler(args.num_train_timesteps, args.beta_schedule, args.prediction_type)
    null_class_id = data.num_classes
    # The Hub token never goes into a file that may be uploaded.
    settings = {key: value for key, value in vars(args).items() if key != "hub_token"}
    config = {**settings, "mixed_precision_resolved": mixed_precision, "resolution": resolution,
              "channels": channels, "num_classes": data.num_classes, "null_class_id": null_class_id,
              "block_out_channels": list(unet.config.block_out_channels),
              "num_parameters": sum(p.numel() for p in unet.parameters()),
              "num_processes": accelerator.num_processes}  # fmt: skip
    if args.dry_run:
        accelerator.print(json.dumps(config, indent=2))
        return config
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "training_config.json"), "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2)

    ema = None
    if not args.no_ema:
        ema = EMAModel(unet.parameters(), decay=args.ema_max_decay, use_ema_warmup=True, inv_gamma=1.0,
                       power=args.ema_power)  # fmt: skip
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay)  # fmt: skip
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    if accelerator.is_main_process and args.report_to != "none":
        tracker_config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.items()}
        accelerator.init_trackers("train_cfg", config=tracker_config)

    # 2. Resume
    global_step, resumed_from = checkpoints.resume(accelerator, args.output_dir, args.resume_from_checkpoint)
    updates_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"Training on {data.name}: {len(loader.dataset)} images of {resolution}x{resolution}x{channels}, "
        f"{data.num_classes} classes (null id {null_class_id}), {config['num_parameters'] / 1e6:.2f}M parameters, "
        f"{args.max_train_steps} steps of {total_batch} images, mixed precision {mixed_precision}, "
        f"{accelerator.num_processes} process(es), starting at step {global_step}"
    )

    # 3. Training loop
    unet.train()
    progress = tqdm(total=args.max_train_steps, initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)  # fmt: skip
    start_epoch = global_step // updates_per_epoch
    skip_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps
    images_seen, window_start = 0, time.perf_counter()
    for epoch in range(start_epoch, math.ceil(args.max_train_steps / updates_per_epoch)):
        loader.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, skip_batches) if skip_batches else loader
        skip_batches = 0
        for batch in epoch_loader:
            with accelerator.accumulate(unet):
                loss, null_share = train_step(batch, unet, noise_scheduler, null_class_id, args.cond_drop_prob,
                                              args.prediction_type)  # fmt: skip
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            images_seen += batch["pixel_values"].shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue

            # One optimizer step is done: everything below counts optimizer steps, not micro-batches.
            if ema is not None:
                ema.step(unet.parameters())
            global_step += 1
            elapsed = time.perf_counter() - window_start
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0],
                    "null_label_share": null_share.item(), "images_per_second": images_seen / max(elapsed, 1e-9)}  # fmt: skip
            if ema is not None:
                logs["ema_decay"] = ema.cur_decay_value
            progress.update(1)
            progress.set_postfix(loss=f"{logs['loss']:.4f}", img_s=f"{logs['images_per_second']:.0f}")
            accelerator.log(logs, step=global_step)

            if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
                checkpoints.save(accelerator, args.output_dir, global_step, args.checkpoints_total_limit, keep=resumed_from)
            if args.sample_every_steps and global_step % args.sample_every_steps == 0 and accelerator.is_main_process:
                log_sample_grid(accelerator, unet, ema, noise_scheduler, data.id2label, args, mixed_precision, global_step)
            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps:
            break
    progress.close()

    # 4. Save the pipeline with the EMA weights, then evaluate and describe it
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(unet)
        with EMAWeights(ema, unwrapped):
            pipe = build_pipeline(unwrapped, noise_scheduler, data.id2label, args.guidance_scale)
            pipe.save_pretrained(args.output_dir)
        finish(args, data, resolution, channels, mixed_precision, config)
    accelerator.end_training()


def log_sample_grid(accelerator, unet, ema, noise_scheduler, id2label, args, mixed_precision, step):
    scales = sorted({0.0, 1.0, *args.eval_guidance_scales, args.guidance_scale})
    unwrapped = accelerator.unwrap_model(unet)
    with EMAWeights(ema, unwrapped):
        pipe = build_pipeline(unwrapped, noise_scheduler, id2label, args.guidance_scale)
        path = os.path.join(args.output_dir, "samples", f"step-{step:06d}.png")
        grid = write_sample_grid(pipe, path, scales, args.num_inference_steps, mixed_precision)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_image("samples/classes_by_guidance_scale", np.asarray(grid), step, dataformats="HW"
                                     if grid.mode == "L" else "HWC")  # fmt: skip


def finish(args, data, resolution, channels, mixed_precision, config):
    """Write the final sample grid and class-accuracy report into the output folder, and print a summary."""
    pipe = ClassConditionalPipeline.from_pretrained(args.output_dir)
    pipe.set_progress_bar_config(disable=True)
    grid_path = os.path.join(args.output_dir, "samples.png")
    write_sample_grid(pipe, grid_path, [args.guidance_scale] * 8, args.num_inference_steps, mixed_precision)

    report = {"dataset": data.name, "num_classes": data.num_classes, "training": config}
    if args.eval_samples_per_class > 0:
        classifier, classifier_info = load_or_train_classifier(data, resolution, channels)
        results = evaluate_guidance_scales(
            pipe, classifier, args.eval_guidance_scales, args.eval_samples_per_class, args.num_inference_steps,
            mixed_precision=mixed_precision,
        )  # fmt: skip
        report.update(classifier=classifier_info, guidance=results)
    with open(os.path.join(args.output_dir, "eval_results.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    write_card(args, data, resolution, channels, report)

    lines = [f"Saved the pipeline to {os.path.abspath(args.output_dir)}", f"Sample grid (s = {args.guidance_scale:g}): {grid_path}"]
    if "guidance" in report:
        ceiling = report["classifier"]["test_accuracy"]
        lines.append(
            f"Class accuracy of samples ({args.eval_samples_per_class} per class, DDIM {args.num_inference_steps} "
            f"steps), scored by a CNN with {100 * ceiling:.1f}% accuracy on real test images:"
        )
        for result in report["guidance"]:
            lines.append(f"  s = {result['guidance_scale']:g} (w = {result['guidance_weight']:g}): "
                         f"{100 * result['class_accuracy']:.1f}%")  # fmt: skip
    print("\n".join(lines), flush=True)
    if args.push_to_hub:
        from diffusers_cfg.training.hub import push_to_hub

        url = push_to_hub(args.output_dir, args.hub_model_id, private=args.hub_private_repo, token=args.hub_token)
        print(f"Pushed to {url}", flush=True)


def write_card(args, data, resolution, channels, report):
    """Write the model card README.md into the output folder from the training settings and evaluation."""
    evaluation = None
    if "guidance" in report:
        evaluation = {
            "results": [
                {"guidance_scale": row["guidance_scale"], "class_accuracy": row["class_accuracy"]}
                for row in report["guidance"]
            ],
            "classifier_accuracy": report["classifier"]["test_accuracy"],
            "num_samples": report["guidance"][0]["num_samples"],
            "num_inference_steps": args.num_inference_steps,
            "scheduler": report["guidance"][0]["scheduler"],
        }
    config = report["training"]
    settings = {
        "dataset": data.name,
        "resolution": f"{resolution}x{resolution}, {channels} channel(s)",
        "UNet block channels": config["block_out_channels"],
        "parameters": f"{config['num_parameters'] / 1e6:.2f}M",
        "label dropout (cond_drop_prob)": args.cond_drop_prob,
        "optimizer steps": args.max_train_steps,
        "batch size": args.train_batch_size * config["num_processes"] * args.gradient_accumulation_steps,
        "learning rate": f"{args.learning_rate:g} ({args.lr_scheduler}, {args.lr_warmup_steps} warm-up steps)",
        "EMA": "off" if args.no_ema else f"max decay {args.ema_max_decay}, warm-up power {args.ema_power}",
        "mixed precision": config["mixed_precision_resolved"],
        "noise schedule": f"{args.beta_schedule}, {args.num_train_timesteps} steps, {args.prediction_type} prediction",
    }
    write_model_card(
        args.output_dir,
        repo_id=args.hub_model_id,
        id2label=data.id2label,
        num_classes=data.num_classes,
        dataset_name=data.name,
        resolution=resolution,
        num_channels=channels,
        guidance_scale=args.guidance_scale,
        guidance_scale_source="set by --guidance_scale at training time",
        num_inference_steps=args.num_inference_steps,
        sample_grid="samples.png",
        sample_grid_caption=f"One row per class, eight seeds, guidance scale s = {args.guidance_scale:g}.",
        evaluation=evaluation,
        training_settings=settings,
    )


if __name__ == "__main__":
    main()
