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
import collections
import dataclasses
import importlib.util
import json
import logging
import math
import os
import time

import accelerate
import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from PIL import Image
from tqdm.auto import tqdm

from diffusers_cfg.model_cards.model_card import training_card_fields, write_model_card
from diffusers_cfg.pipelines import ClassConditionalPipeline
from diffusers_cfg.pipelines.command_line import check_output_folder
from diffusers_cfg.training import checkpoints
from diffusers_cfg.training.classifier import load_or_train_classifier
from diffusers_cfg.training.data import (
    DEFAULT_DATASET,
    LabeledImages,
    channel_conversion_note,
    collate_examples,
    detect_image_format,
    load_labeled_images,
    transformed_split,
)
from diffusers_cfg.training.evaluation import (
    cpu_supports_bf16,
    evaluate_guidance_scales,
    image_grid,
    sample_class_balanced,
)
from diffusers_cfg.training.model import build_noise_scheduler, build_unet, drop_labels, sampling_scheduler

logger = get_logger(__name__)

CONFIG_FILE = "training_config.json"
TRACKER_PROJECT = "train_cfg"


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
    data.add_argument("--num_channels", type=int, default=None, choices=[1, 3],
                      help="Image channels the model sees: 1 (grayscale) or 3 (RGB). Images of the other kind are "
                           "converted. The first training image's kind when omitted.")
    data.add_argument("--dataloader_num_workers", type=int, default=0,
                      help="Data loader worker processes, started with the spawn method; 0 loads in the training "
                           "process.")

    model = parser.add_argument_group("model")
    model.add_argument("--block_out_channels", type=int, nargs="+", default=None,
                       help="Channels per UNet block, e.g. 32 64 128; sized for the resolution when omitted.")
    model.add_argument("--layers_per_block", type=int, default=1, help="ResNet layers per UNet block.")
    model.add_argument("--attention_levels", type=int, nargs="*", default=[],
                       help="Block indices (0 = full resolution) that get self-attention.")
    model.add_argument("--num_train_timesteps", type=int, default=1000, help="Steps of the training noise schedule.")
    model.add_argument("--beta_schedule", default="linear", choices=["linear", "scaled_linear", "squaredcos_cap_v2"],
                       help="Noise schedule.")
    # v-prediction by default: with epsilon prediction, a (16, 32, 64) UNet trained for 700 steps on mnist-5k turned a
    # third of its samples all white or all black, because x_0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) multiplies any
    # error in the predicted noise's mean by up to 150 at the noisiest steps. v-prediction has no such division.
    model.add_argument("--prediction_type", default="v_prediction", choices=["epsilon", "v_prediction", "sample"],
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
    saving.add_argument("--checkpoints_total_limit", type=int, default=3,
                        help="Checkpoints kept; older ones are deleted, except the one the run resumed from.")
    saving.add_argument("--resume_from_checkpoint", default=None,
                        help="'latest' (the newest intact checkpoint in --output_dir; a fresh start when there is "
                             "none), a checkpoint folder, or a checkpoint name such as checkpoint-500.")
    saving.add_argument("--overwrite_output_dir", action="store_true",
                        help="Start a new run in an --output_dir that contains another run's checkpoints, deleting "
                             "them before training. Without it such a run stops at startup. Other files are "
                             "overwritten or left in place.")

    logs = parser.add_argument_group("logging and evaluation")
    logs.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "wandb", "none"],
                      help="Where metrics go: TensorBoard files in OUTPUT_DIR/logs, Weights & Biases (needs the "
                           "wandb package), or nowhere.")
    logs.add_argument("--sample_every_steps", type=int, default=250,
                      help="Write a sample grid (classes by guidance scale) every this many optimizer steps; 0 = never.")
    logs.add_argument("--eval_every_steps", type=int, default=0,
                      help="Log the class accuracy of guided samples at --eval_guidance_scales every this many "
                           "optimizer steps; 0 = only at the end.")
    logs.add_argument("--eval_samples_per_class", type=int, default=20,
                      help="Samples per class for each class-accuracy check; 0 skips the final one.")
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
    """Reject invalid flag values before anything is loaded; each error names the flag and the value."""
    at_least_one = ["train_batch_size", "max_train_steps", "gradient_accumulation_steps", "checkpointing_steps",
                    "checkpoints_total_limit", "num_inference_steps", "num_train_timesteps"]  # fmt: skip
    for name in at_least_one:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    at_least_zero = ["lr_warmup_steps", "dataloader_num_workers", "sample_every_steps", "eval_every_steps",
                     "eval_samples_per_class"]  # fmt: skip
    for name in at_least_zero:
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be at least 0, got {getattr(args, name)}")
    if not 0.0 <= args.cond_drop_prob < 1.0:
        raise ValueError(f"--cond_drop_prob must be in [0, 1), got {args.cond_drop_prob}")
    if not math.isfinite(args.learning_rate) or args.learning_rate <= 0:
        raise ValueError(f"--learning_rate must be a positive number, got {args.learning_rate}")
    if args.num_inference_steps > args.num_train_timesteps:
        raise ValueError(
            f"--num_inference_steps {args.num_inference_steps} exceeds --num_train_timesteps "
            f"{args.num_train_timesteps}; sampling cannot take more steps than the noise schedule has"
        )
    if not math.isfinite(args.max_grad_norm) or args.max_grad_norm <= 0:
        raise ValueError(f"--max_grad_norm must be a positive number, got {args.max_grad_norm}")
    if not 0.0 <= args.adam_beta1 < 1.0 or not 0.0 <= args.adam_beta2 < 1.0:
        raise ValueError(f"--adam_beta1 and --adam_beta2 must be in [0, 1), got {args.adam_beta1} and {args.adam_beta2}")
    if args.adam_weight_decay < 0:
        raise ValueError(f"--adam_weight_decay must be at least 0, got {args.adam_weight_decay}")
    if not 0.0 < args.ema_max_decay <= 1.0 or args.ema_power <= 0:
        raise ValueError(
            f"--ema_max_decay must be in (0, 1] and --ema_power positive, got {args.ema_max_decay} and {args.ema_power}"
        )
    if args.layers_per_block < 1:
        raise ValueError(f"--layers_per_block must be at least 1, got {args.layers_per_block}")
    if args.block_out_channels is not None and min(args.block_out_channels) < 1:
        raise ValueError(f"--block_out_channels must all be at least 1, got {args.block_out_channels}")
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed must be in [0, 2**32), got {args.seed}")
    if args.resolution is not None and args.resolution < 4:
        raise ValueError(f"--resolution must be at least 4 pixels, got {args.resolution}")
    if args.eval_every_steps and not args.eval_samples_per_class:
        raise ValueError("--eval_every_steps needs --eval_samples_per_class of at least 1")
    if args.overwrite_output_dir and args.resume_from_checkpoint is not None:
        raise ValueError(
            "--overwrite_output_dir deletes the checkpoints that --resume_from_checkpoint would resume from; give "
            "only one of them"
        )
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id, e.g. --hub_model_id your-name/cfg-mnist")
    for scale in [args.guidance_scale, *args.eval_guidance_scales]:
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(
                f"--guidance_scale and --eval_guidance_scales must be finite and >= 0 (0 = unconditional), got {scale}"
            )
    if args.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ImportError(
            "--report_to wandb needs the wandb package, which is not installed; install it with `pip install wandb`, "
            "or use --report_to tensorboard"
        )


def check_output_dir(args: argparse.Namespace) -> None:
    """Raise a ValueError when --output_dir cannot be written, or when it contains checkpoints that a new run would
    mix with its own (see `checkpoints.check_no_checkpoints`)."""
    check_output_folder("--output_dir", args.output_dir)
    if args.resume_from_checkpoint is None and not args.overwrite_output_dir:
        checkpoints.check_no_checkpoints(args.output_dir)


def warn_about_schedule(args: argparse.Namespace) -> None:
    """Warn when the learning-rate warm-up is longer than training, so that the rate never reaches its peak."""
    if args.lr_scheduler == "constant" or args.lr_warmup_steps <= args.max_train_steps:
        return  # the constant schedule has no warm-up, and a warm-up within training reaches the peak
    reached = args.learning_rate * args.max_train_steps / args.lr_warmup_steps
    logger.warning(
        f"--lr_warmup_steps {args.lr_warmup_steps} exceeds --max_train_steps {args.max_train_steps}, so the learning "
        f"rate never reaches its peak --learning_rate {args.learning_rate:g}: it ends at {reached:.3g}. Give "
        f"--lr_warmup_steps {args.max_train_steps} or less to reach the peak"
    )


def has_accelerator_device() -> bool:
    """Return whether torch finds a GPU or another accelerator device."""
    if hasattr(torch, "accelerator"):  # torch >= 2.6
        return torch.accelerator.is_available()
    return torch.cuda.is_available() or torch.backends.mps.is_available()


def resolve_mixed_precision(requested: str) -> str:
    """Pick the autocast dtype: "auto" means bf16 where the hardware runs it natively, else fp32 ("no").

    fp16 needs a CUDA GPU; elsewhere it falls back, with a warning, to what "auto" picks.
    """
    if requested == "auto" or (requested == "fp16" and not torch.cuda.is_available()):
        if torch.cuda.is_available():
            resolved = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            resolved = "bf16" if cpu_supports_bf16() else "no"
        if requested == "fp16":
            logger.warning(
                f"--mixed_precision fp16 needs a CUDA GPU and this machine has none; training with "
                f"--mixed_precision {resolved} instead ({'fp32' if resolved == 'no' else resolved} on the CPU)"
            )
        return resolved
    if requested == "bf16" and not has_accelerator_device() and not cpu_supports_bf16():
        logger.warning("This CPU has no native bf16 (AVX-512 BF16 or AMX): bf16 autocast runs emulated, many times "
                       "slower than fp32 (--mixed_precision no)")  # fmt: skip
    return requested


def build_accelerator(args: argparse.Namespace, mixed_precision: str) -> Accelerator:
    # cpu=True on a machine without an accelerator device lets `accelerate launch --multi_gpu` (torchrun) start
    # several CPU processes over gloo: accelerate 1.16 treats the processes as distributed CPU ones only when asked
    # for the CPU.
    return Accelerator(
        cpu=not has_accelerator_device(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs")
        ),
        # The sampler is reseeded with seed + epoch, so the data order of any epoch is known again after a resume.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )


def configure_logging(accelerator: Accelerator) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # accelerate logs seven lines per checkpoint, and the project's own logger reports where each one went.
    logging.getLogger("accelerate.checkpointing").setLevel(logging.WARNING)
    logging.getLogger("accelerate.accelerator").setLevel(logging.WARNING)
    if not accelerator.is_local_main_process:
        logging.getLogger().setLevel(logging.WARNING)


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
    native_resolution, native_channels = detect_image_format(data)
    resolution = args.resolution or native_resolution
    channels = args.num_channels or native_channels
    note = channel_conversion_note(data, channels)
    if note:
        logger.warning(note)

    train = transformed_split(data, "train", resolution, channels)
    loader = torch.utils.data.DataLoader(
        train,
        batch_size=args.train_batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate_examples,
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed),
        multiprocessing_context="spawn" if args.dataloader_num_workers > 0 else None,
        persistent_workers=args.dataloader_num_workers > 0,
    )
    if len(loader) == 0:
        raise ValueError(
            f"the train split has {len(train)} images, fewer than --train_batch_size {args.train_batch_size}"
        )
    return data, loader, resolution, channels


class TrainingGenerator:
    """The random generator of training noise, timesteps and label dropout: one per process, saved in checkpoints.

    It is kept apart from torch's global generator, so sampling, evaluation or library code cannot shift what
    training draws. Every process saves its state as `training_generator_<process index>.pt` through the
    accelerator's save hook and reads it back through the load hook, so a resumed run draws exactly what an
    uninterrupted one would.
    """

    def __init__(self, seed: int, process_index: int, device):
        self.process_index = process_index
        # Derived seeds keep the processes' streams apart and away from the data order, which uses seed + epoch.
        derived = np.random.SeedSequence(seed, spawn_key=(process_index,)).generate_state(1, dtype=np.uint64)[0]
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(int(derived))

    @property
    def file_name(self) -> str:
        return f"training_generator_{self.process_index}.pt"

    def save(self, folder: str) -> None:
        torch.save(self.generator.get_state(), os.path.join(folder, self.file_name))

    def load(self, folder: str) -> None:
        path = os.path.join(folder, self.file_name)
        if not os.path.isfile(path):
            logger.warning(
                f"{folder} has no {self.file_name} (it was saved by fewer processes); process {self.process_index} "
                "keeps drawing from its initial seed",
                main_process_only=False,
            )
            return
        self.generator.set_state(torch.load(path, weights_only=True))

    def register_for_checkpointing(self, accelerator: Accelerator) -> None:
        accelerator.register_save_state_pre_hook(lambda models, weights, folder: self.save(folder))
        accelerator.register_load_state_pre_hook(lambda models, folder: self.load(folder))


def train_step(batch, unet, noise_scheduler, null_class_id, cond_drop_prob, prediction_type, generator=None):
    """Noise a batch, drop labels, and return the denoising loss (in fp32) and the share of null labels.

    `generator` draws the noise, the timesteps and the dropped labels; torch's global generator when None.
    """
    # 1. Forward diffusion: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps at a random t per image
    clean = batch["pixel_values"]
    noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],), generator=generator,
                              device=clean.device)  # fmt: skip
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)

    # 2. Label dropout: each label independently becomes the null class, so the model also learns p(x)
    labels = drop_labels(batch["class_labels"], cond_drop_prob, null_class_id, generator=generator)

    # 3. Loss against the target of the prediction type, in fp32 even under autocast
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


def write_sample_grid(pipe, path, scales, num_inference_steps, mixed_precision, seeds=None) -> Image.Image:
    """Sample one image per class and column and save the grid as a PNG (rows: classes, columns: `scales`).

    Column j uses `seeds[j]` (0 for every column when omitted), so columns of different scales share their noise.
    """
    seeds = seeds or [0] * len(scales)
    columns = []
    for scale, seed in zip(scales, seeds):
        images, _ = sample_class_balanced(
            pipe, 1, scale, num_inference_steps, seed=seed, mixed_precision=mixed_precision
        )
        columns.append(images)
    grid_images = torch.stack(columns, dim=1).flatten(0, 1)
    grid = image_grid(grid_images, rows=pipe.num_classes, cols=len(scales))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    grid.save(path)
    return grid


class Throughput:
    """Images per second over the last `window` optimizer steps."""

    def __init__(self, window: int = 20):
        self.marks = collections.deque([(time.perf_counter(), 0.0)], maxlen=window + 1)

    def add(self, images: float) -> float:
        """Record a finished step of `images` images and return the current rate."""
        self.marks.append((time.perf_counter(), self.marks[-1][1] + images))
        (start, first), (end, last) = self.marks[0], self.marks[-1]
        return (last - first) / max(end - start, 1e-9)


@dataclasses.dataclass
class TrainingRun:
    """The models, optimizer, data and settings that the training loop and its periodic tasks work on."""

    args: argparse.Namespace
    accelerator: Accelerator
    data: LabeledImages
    unet: torch.nn.Module
    ema: EMAModel | None
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    loader: torch.utils.data.DataLoader
    noise_scheduler: object
    generator: TrainingGenerator
    mixed_precision: str
    resumed_from: str | None = None
    classifier: torch.nn.Module | None = None
    # Start of train() in this process, and the seconds that evaluations took since then. Evaluations report the
    # training time without them.
    train_started: float = 0.0
    evaluation_seconds: float = 0.0

    @property
    def null_class_id(self) -> int:
        return self.data.num_classes


def train(run: TrainingRun, global_step: int) -> int:
    """Train from `global_step` to --max_train_steps and return the step reached.

    Everything periodic counts optimizer steps, not micro-batches: the learning-rate schedule, the EMA updates,
    checkpoint names, sample grids and evaluations.
    """
    args, accelerator = run.args, run.accelerator
    if global_step >= args.max_train_steps:
        # Reached only by resuming from a checkpoint at --max_train_steps, after its settings passed the check.
        logger.warning(f"Training is already complete at step {global_step}: {run.resumed_from} is at "
                       f"--max_train_steps {args.max_train_steps}, so nothing is left to train. The pipeline is saved "
                       "from this checkpoint; give a larger --max_train_steps to train longer")  # fmt: skip
        return global_step

    # An epoch has ceil(micro-batches / accumulation) optimizer steps: accelerate ends an accumulation at the end of
    # the data, so the last step of an epoch may use fewer micro-batches. A resumed run skips the micro-batches that
    # the steps already taken in its epoch consumed.
    updates_per_epoch = math.ceil(len(run.loader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(args.max_train_steps / updates_per_epoch)
    first_epoch = global_step // updates_per_epoch
    skip_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps

    run.train_started = time.perf_counter()
    progress = tqdm(total=args.max_train_steps, initial=global_step, desc="training", unit="step",
                    disable=not accelerator.is_local_main_process)  # fmt: skip
    throughput = Throughput()
    step_totals = torch.zeros(4, device=accelerator.device)  # loss sum, micro-batches, null labels, labels
    run.unet.train()
    for epoch in range(first_epoch, num_epochs):
        run.loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(run.loader, skip_batches) if skip_batches else run.loader
        skip_batches = 0
        for batch in batches:
            with accelerator.accumulate(run.unet):
                loss, null_share = train_step(
                    batch, run.unet, run.noise_scheduler, run.null_class_id, args.cond_drop_prob,
                    args.prediction_type, run.generator.generator,
                )  # fmt: skip
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(run.unet.parameters(), args.max_grad_norm)
                run.optimizer.step()
                run.lr_scheduler.step()
                run.optimizer.zero_grad()
            batch_size = batch["class_labels"].shape[0]
            step_totals += torch.stack([loss.detach(), torch.ones_like(loss), null_share.detach() * batch_size,
                                        torch.full_like(loss, batch_size)])  # fmt: skip
            if not accelerator.sync_gradients:
                continue

            # One optimizer step is done.
            if run.ema is not None:
                run.ema.step(run.unet.parameters())
            global_step += 1
            totals = accelerator.reduce(step_totals, reduction="sum").tolist()
            step_totals.zero_()
            logs = {
                "loss": totals[0] / totals[1],
                "lr": run.lr_scheduler.get_last_lr()[0],
                "null_label_share": totals[2] / totals[3],
                "images_per_second": throughput.add(totals[3]),
            }
            if run.ema is not None:
                logs["ema_decay"] = run.ema.cur_decay_value
            progress.update(1)
            progress.set_postfix(loss=f"{logs['loss']:.4f}", img_s=f"{logs['images_per_second']:.0f}", refresh=False)
            accelerator.log(logs, step=global_step)
            run_periodic_tasks(run, global_step)
            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps:
            break
    progress.close()
    return global_step


def run_periodic_tasks(run: TrainingRun, step: int) -> None:
    """Checkpoint on every process; sample and evaluate on the main process only, with the EMA weights."""
    args = run.args
    if step % args.checkpointing_steps == 0 or step == args.max_train_steps:
        checkpoints.save(run.accelerator, args.output_dir, step, args.checkpoints_total_limit, keep=run.resumed_from)
    if not run.accelerator.is_main_process:
        return
    if args.sample_every_steps and step % args.sample_every_steps == 0:
        log_sample_grid(run, step)
    if args.eval_every_steps and step % args.eval_every_steps == 0:
        log_class_accuracy(run, step)


def log_sample_grid(run: TrainingRun, step: int) -> None:
    """Save and log a grid of one sample per class (rows) and guidance scale (columns), all from the same noise."""
    args = run.args
    scales = sorted({0.0, 1.0, *args.eval_guidance_scales, args.guidance_scale})
    unwrapped = run.accelerator.unwrap_model(run.unet)
    with EMAWeights(run.ema, unwrapped):
        pipe = build_pipeline(unwrapped, run.noise_scheduler, run.data.id2label, args.guidance_scale)
        path = os.path.join(args.output_dir, "samples", f"step-{step:06d}.png")
        grid = write_sample_grid(pipe, path, scales, args.num_inference_steps, run.mixed_precision)
    tag = "samples/classes_by_guidance_scale_" + "_".join(f"{scale:g}" for scale in scales)
    for tracker in run.accelerator.trackers:
        if tracker.name == "tensorboard":
            pixels = np.asarray(grid)
            tracker.writer.add_image(tag, pixels, step, dataformats="HW" if pixels.ndim == 2 else "HWC")
        elif tracker.name == "wandb":
            # NOTE: never run, because wandb was not installed where this was written. The call follows
            # WandBTracker.log_images of accelerate 1.16.
            tracker.log_images({tag: [grid]}, step=step)


def log_class_accuracy(run: TrainingRun, step: int) -> None:
    """Log the class accuracy of guided samples (EMA weights) at each of --eval_guidance_scales, with the seconds of
    training so far, evaluations excluded."""
    started = time.perf_counter()
    args = run.args
    unwrapped = run.accelerator.unwrap_model(run.unet)
    with EMAWeights(run.ema, unwrapped):
        pipe = build_pipeline(unwrapped, run.noise_scheduler, run.data.id2label, args.guidance_scale)
        results = evaluate_guidance_scales(
            pipe, run.classifier, args.eval_guidance_scales, args.eval_samples_per_class, args.num_inference_steps,
            mixed_precision=run.mixed_precision,
        )  # fmt: skip
    training_seconds = started - run.train_started - run.evaluation_seconds
    run.evaluation_seconds += time.perf_counter() - started
    metrics = {f"class_accuracy/s={row['guidance_scale']:g}": row["class_accuracy"] for row in results}
    run.accelerator.log({**metrics, "training_seconds": training_seconds}, step=step)
    accuracies = ", ".join(f"{100 * row['class_accuracy']:.1f}% at s = {row['guidance_scale']:g}" for row in results)
    # benchmarks/time_to_quality.py reads this line.
    logger.info(f"Evaluation at step {step}: class accuracy {accuracies}, after {training_seconds:.1f} s of training "
                "(evaluations excluded)")  # fmt: skip


def resolved_config(args, accelerator, data, unet, mixed_precision, resolution, channels, resume_path) -> dict:
    """Return the flags with every automatic choice filled in, as saved to training_config.json and printed by
    --dry_run."""
    num_parameters = sum(p.numel() for p in unet.parameters())
    # The Hub token never goes into the saved config, the logs or --dry_run output: a push would upload it.
    flags = {key: value for key, value in vars(args).items() if key != "hub_token"}
    return {
        **flags,
        "mixed_precision_resolved": mixed_precision,
        "resolution": resolution,
        "channels": channels,
        "num_classes": data.num_classes,
        "null_class_id": data.num_classes,
        "id2label": data.id2label,
        "block_out_channels": list(unet.config.block_out_channels),
        "num_parameters": num_parameters,
        "model_size_mib_fp32": round(num_parameters * 4 / 2**20, 3),
        "num_processes": accelerator.num_processes,
        "total_batch_size": args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
        "resume_checkpoint": resume_path,
        "versions": {
            "torch": torch.__version__, "diffusers": diffusers.__version__, "accelerate": accelerate.__version__,
        },  # fmt: skip
    }


# Settings that fix the shape of the UNet's weights, the noise process they learned, and whether checkpoints contain
# EMA weights, each with where it comes from. A run resumes only from a checkpoint saved with the same values.
RESUME_SETTINGS = {
    "resolution": "--resolution",
    "channels": "--num_channels",
    "num_classes": "the dataset's classes",
    "block_out_channels": "--block_out_channels",
    "layers_per_block": "--layers_per_block",
    "attention_levels": "--attention_levels",
    "num_train_timesteps": "--num_train_timesteps",
    "beta_schedule": "--beta_schedule",
    "prediction_type": "--prediction_type",
    "no_ema": "--no_ema",
}


def resume_settings(config: dict) -> dict:
    """Return the entries of RESUME_SETTINGS in a resolved configuration, as JSON stores them."""
    settings = {key: config[key] for key in RESUME_SETTINGS if key in config}
    if "attention_levels" in settings:
        # build_unet reads the levels as a set, so "1 0" builds the same UNet as "0 1".
        settings["attention_levels"] = sorted(set(settings["attention_levels"]))
    return json.loads(json.dumps(settings))


def check_resume_settings(resume_path: str, config: dict) -> None:
    """Raise a ValueError naming every setting of RESUME_SETTINGS in which this run differs from its checkpoint.

    The checkpoint's own `training_settings.json` is compared. For a checkpoint without one, the training_config.json
    of the output folder that contains it is compared instead.
    """
    saved = checkpoints.read_settings(resume_path)
    source = os.path.join(resume_path, checkpoints.SETTINGS_FILE)
    if saved is None:
        source = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(resume_path))), CONFIG_FILE)
        if not os.path.isfile(source):
            logger.warning(f"{resume_path} records no training settings and {source} does not exist, so the run "
                           "resumes without checking that its model matches the checkpoint")  # fmt: skip
            return
        with open(source, encoding="utf-8") as handle:
            saved = json.load(handle)

    saved, current = resume_settings(saved), resume_settings(config)
    differing = [key for key in current if key in saved and saved[key] != current[key]]
    if differing:
        details = "; ".join(
            f"{key} ({RESUME_SETTINGS[key]}): checkpoint {saved[key]!r}, this run {current[key]!r}"
            for key in differing
        )
        raise ValueError(
            f"cannot resume from {resume_path}, because this run's model differs from the checkpoint's in {details} "
            f"(checkpoint settings read from {source}). Give the checkpoint's values, or a new --output_dir to start "
            "another run"
        )


def check_resume_step(resume_path: str, max_train_steps: int, output_dir: str) -> None:
    """Raise a ValueError when the checkpoint is past --max_train_steps.

    A checkpoint past --max_train_steps cannot give a model of that many steps, and the saved pipeline and its model
    card would report fewer steps than the weights had. A checkpoint exactly at --max_train_steps is accepted: it is
    also what a run leaves when it is killed after its last checkpoint, before the pipeline is saved, so resuming it
    saves the pipeline without training (`train` reports that).
    """
    step = checkpoints.step_of(resume_path)
    if step > max_train_steps:
        earlier = [os.path.basename(path) for path in checkpoints.complete_checkpoints(output_dir)
                   if checkpoints.step_of(path) <= max_train_steps]  # fmt: skip
        raise ValueError(
            f"--max_train_steps {max_train_steps} is below step {step} of {resume_path}, and training cannot go back. "
            f"Give --max_train_steps {step} or more, or resume from a checkpoint at step {max_train_steps} or earlier "
            f"(in {output_dir}: {', '.join(earlier) or 'none'})"
        )


def build_optimization(args, accelerator, unet) -> tuple:
    """Return the EMA of the UNet's weights (None with --no_ema), its AdamW optimizer, and the learning-rate schedule."""
    ema = None
    if not args.no_ema:
        ema = EMAModel(unet.parameters(), decay=args.ema_max_decay, use_ema_warmup=True, inv_gamma=1.0,
                       power=args.ema_power)  # fmt: skip
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay)  # fmt: skip
    # The prepared scheduler steps once per process at every optimizer step, hence the scaled lengths.
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    return ema, optimizer, lr_scheduler


def main(argv=None):
    args = parse_args(argv)
    # accelerate's logger fails until its state exists, and resolving the precision may log a warning.
    PartialState(cpu=not has_accelerator_device())
    mixed_precision = resolve_mixed_precision(args.mixed_precision)
    accelerator = build_accelerator(args, mixed_precision)
    configure_logging(accelerator)
    checkpoints.decide_on_main_process(accelerator, check_output_dir, args)
    warn_about_schedule(args)
    set_seed(args.seed)
    use_all_cpu_cores(accelerator)
    resume_path = checkpoints.select(accelerator, args.output_dir, args.resume_from_checkpoint)
    if resume_path is not None:
        check_resume_step(resume_path, args.max_train_steps, args.output_dir)

    # 1. Data, model and the resolved configuration
    data, loader, resolution, channels = build_data(args, accelerator)
    unet = build_unet(resolution, channels, data.num_classes, args.block_out_channels, args.layers_per_block,
                      tuple(args.attention_levels))  # fmt: skip
    noise_scheduler = build_noise_scheduler(args.num_train_timesteps, args.beta_schedule, args.prediction_type)
    config = resolved_config(args, accelerator, data, unet, mixed_precision, resolution, channels, resume_path)
    if resume_path is not None:
        check_resume_settings(resume_path, config)
    if args.dry_run:
        accelerator.print(json.dumps(config, indent=2))
        accelerator.print(f"UNet2DModel: {config['num_parameters']:,} parameters, "
                          f"{config['model_size_mib_fp32']:.2f} MiB in fp32")  # fmt: skip
        return config

    # 2. Optimizer, EMA, and the state that checkpoints carry
    ema, optimizer, lr_scheduler = build_optimization(args, accelerator, unet)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    generator = TrainingGenerator(args.seed, accelerator.process_index, accelerator.device)
    generator.register_for_checkpointing(accelerator)
    checkpoints.record_settings(accelerator, resume_settings(config))
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    if accelerator.is_main_process and args.report_to != "none":
        tracker_config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.items()}
        accelerator.init_trackers(TRACKER_PROJECT, config=tracker_config)

    # 3. Resume, and get the evaluation classifier ready before the first step
    global_step = checkpoints.load(accelerator, args.output_dir, resume_path)
    if ema is not None:
        ema.to(accelerator.device)  # accelerate loads registered objects onto the CPU
    # Written only now, so that a resume that fails leaves the previous run's file in place.
    if accelerator.is_main_process:
        if args.overwrite_output_dir:
            checkpoints.delete_all(args.output_dir)
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, CONFIG_FILE), "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2)
    run = TrainingRun(args, accelerator, data, unet, ema, optimizer, lr_scheduler, loader, noise_scheduler, generator,
                      mixed_precision, resumed_from=resume_path)  # fmt: skip
    if args.eval_every_steps and accelerator.is_main_process:
        run.classifier, _ = load_or_train_classifier(data, resolution, channels)
    accelerator.wait_for_everyone()
    logger.info(
        f"Training on {data.name}: {len(loader.dataset)} images of {resolution}x{resolution}x{channels}, "
        f"{data.num_classes} classes (null id {data.num_classes}), {config['num_parameters'] / 1e6:.2f}M parameters, "
        f"{args.max_train_steps} steps of {config['total_batch_size']} images, mixed precision {mixed_precision}, "
        f"{accelerator.num_processes} process(es), starting at step {global_step}"
    )

    # 4. Train
    train(run, global_step)

    # 5. Save the pipeline with the EMA weights, then evaluate and describe it
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(unet)
        with EMAWeights(ema, unwrapped):
            pipe = build_pipeline(unwrapped, noise_scheduler, data.id2label, args.guidance_scale)
            pipe.save_pretrained(args.output_dir)
        finish(args, data, resolution, channels, mixed_precision, config)
    accelerator.end_training()


def finish(args, data, resolution, channels, mixed_precision, config):
    """Write the final sample grid and class-accuracy report into the output folder, and print a summary."""
    pipe = ClassConditionalPipeline.from_pretrained(args.output_dir)
    pipe.set_progress_bar_config(disable=True)
    grid_path = os.path.join(args.output_dir, "samples.png")
    seeds = [column * pipe.num_classes for column in range(8)]  # every image of the grid gets its own noise
    write_sample_grid(pipe, grid_path, [args.guidance_scale] * 8, args.num_inference_steps, mixed_precision, seeds)

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
    write_model_card(args.output_dir, **training_card_fields(report))

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


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, ImportError) as error:
        # Invalid flags and data are the user's to fix: one line, not a traceback.
        raise SystemExit(f"error: {error}") from error
