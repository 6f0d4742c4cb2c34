"""Training speed of the project's default training step against a plain reference loop, measured in one run.

    python benchmarks/training_speed.py                        # default UNet, builtin:mnist-5k, batch 128
    python benchmarks/training_speed.py --compile --channels_last
    python benchmarks/training_speed.py --device cuda --compile --matmul_size 8192

Variants, timed in interleaved rounds (see harness.py):
- reference: the same UNet and batch in fp32, eager, with the loop of diffusers' example training scripts: noise,
  timesteps, add_noise, forward, MSE against the noise, backward, AdamW step, zero_grad.
- default step: one optimizer step as training/train_cfg.py takes it with its default flags, on the reference's
  batch. That is its --mixed_precision auto choice, label dropout, the v-prediction target, gradient clipping, AdamW
  with the warm-up and cosine schedule, and the EMA update, all through accelerate.
- default step + data loader: the same, with every batch drawn from training's data loader, as training does.
- with --compile or --channels_last: the default step on the fixed batch, with the UNet compiled or in channels_last.

It also counts the UNet's forward FLOPs with torch.utils.flop_counter and takes a training step as three forwards,
because the backward pass costs about two. It prints the achieved FLOP/s as a share of the fp32 and bf16 rates of
a large torch.matmul measured in the same run. Run it on an otherwise idle machine.
"""

import argparse
import copy
import itertools
import tempfile
import time

import torch
import torch.nn.functional as F
from accelerate import PartialState
from accelerate.utils import set_seed
from torch.utils.flop_counter import FlopCounterMode

import harness
from diffusers_cfg.training import train_cfg
from diffusers_cfg.training.model import build_noise_scheduler, build_unet


class DefaultTrainingStep:
    """One optimizer step as train_cfg takes it, with train_cfg's optimizer, schedule and EMA.

    NOTE: the step copies the loop body of train_cfg.train(), which has no function for one step.
    tests/test_benchmarks.py checks that two steps give the weights and EMA that train_cfg saves, so that a change on
    either side fails the test.
    """

    def __init__(self, config: argparse.Namespace, accelerator, unet, noise_scheduler, null_class_id: int):
        self.config = config
        self.accelerator = accelerator
        self.noise_scheduler = noise_scheduler
        self.null_class_id = null_class_id
        self.ema, optimizer, lr_scheduler = train_cfg.build_optimization(config, accelerator, unet)
        self.unet, self.optimizer, self.lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
        if self.ema is not None:
            self.ema.to(accelerator.device)
        self.generator = train_cfg.TrainingGenerator(config.seed, accelerator.process_index, accelerator.device)
        self.unet.train()

    def __call__(self, batch: dict) -> float:
        accelerator = self.accelerator
        with accelerator.accumulate(self.unet):
            loss, _ = train_cfg.train_step(
                batch, self.unet, self.noise_scheduler, self.null_class_id, self.config.cond_drop_prob,
                self.config.prediction_type, self.generator.generator,
            )  # fmt: skip
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(self.unet.parameters(), self.config.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
        if accelerator.sync_gradients and self.ema is not None:
            self.ema.step(self.unet.parameters())
        # Training reads the loss back every step for its log, which waits for the device.
        return loss.item()


class ReferenceTrainingStep:
    """The loop of diffusers' example training scripts, in fp32 and eager: epsilon target, no dropout, clipping or
    EMA."""

    def __init__(self, unet, noise_scheduler, learning_rate: float):
        self.unet = unet.train()
        self.noise_scheduler = noise_scheduler
        self.optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate)

    def __call__(self, batch: dict) -> float:
        clean, labels = batch["pixel_values"], batch["class_labels"]
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (clean.shape[0],),
                                  device=clean.device)  # fmt: skip
        noisy = self.noise_scheduler.add_noise(clean, noise, timesteps)
        prediction = self.unet(noisy, timesteps, class_labels=labels).sample
        loss = F.mse_loss(prediction, noise)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.item()


class TrainingSetup:
    """The resolved training configuration, accelerator, data loader and initial UNet that every variant shares."""

    def __init__(self, args: argparse.Namespace, output_dir: str, training_flags: tuple = ()):
        """Resolve the configuration from `args` and train_cfg's defaults; `training_flags` override any of them."""
        device = harness.select_device(args.device)
        flags = ["--dataset_name", args.dataset_name, "--train_batch_size", str(args.train_batch_size),
                 "--mixed_precision", args.mixed_precision, "--output_dir", output_dir, "--report_to", "none"]  # fmt: skip
        if args.block_out_channels:
            flags += ["--block_out_channels", *map(str, args.block_out_channels)]
        # Every other setting is train_cfg's default.
        self.config = train_cfg.parse_args([*flags, *training_flags])

        # The order of train_cfg.main(). Resolving the precision may log, which needs accelerate's state, and the
        # seed is set before the data and the UNet.
        PartialState(cpu=not train_cfg.has_accelerator_device())
        self.mixed_precision = train_cfg.resolve_mixed_precision(self.config.mixed_precision)
        self.accelerator = train_cfg.build_accelerator(self.config, self.mixed_precision)
        if self.accelerator.device.type != device.type:
            raise SystemExit(
                f"error: --device {args.device} asks for {device.type}, but training runs on "
                f"{self.accelerator.device.type} here; use --device auto"
            )
        self.device = self.accelerator.device
        set_seed(self.config.seed)
        data, loader, resolution, channels = train_cfg.build_data(self.config, self.accelerator)
        self.num_classes = data.num_classes
        self.unet = build_unet(resolution, channels, data.num_classes, self.config.block_out_channels,
                               self.config.layers_per_block, tuple(self.config.attention_levels))  # fmt: skip
        self.noise_scheduler = build_noise_scheduler(
            self.config.num_train_timesteps, self.config.beta_schedule, self.config.prediction_type
        )
        self.loader = self.accelerator.prepare(loader)
        self.fixed_batch = next(iter(self.loader))

    def default_step(self, unet=None) -> DefaultTrainingStep:
        """Return the project's default step on a copy of the initial UNet, or on `unet`."""
        unet = copy.deepcopy(self.unet) if unet is None else unet
        return DefaultTrainingStep(self.config, self.accelerator, unet, self.noise_scheduler, self.num_classes)

    def reference_step(self) -> ReferenceTrainingStep:
        unet = copy.deepcopy(self.unet).to(self.device)
        return ReferenceTrainingStep(unet, self.noise_scheduler, self.config.learning_rate)

    def batches(self):
        """Yield training batches endlessly, epoch after epoch, as training draws them."""
        for epoch in itertools.count():
            self.loader.set_epoch(epoch)
            yield from self.loader


def build_variants(setup: TrainingSetup, args: argparse.Namespace) -> list:
    batch = setup.fixed_batch
    images = len(batch["class_labels"])
    reference = setup.reference_step()
    default = setup.default_step()
    loader_step = setup.default_step()
    batches = setup.batches()
    variants = [
        harness.Variant("reference", lambda: reference(batch), images),
        harness.Variant("default step", lambda: default(batch), images),
        harness.Variant("default step + data loader", lambda: loader_step(next(batches)), images),
    ]
    if args.channels_last:
        unet = copy.deepcopy(setup.unet).to(memory_format=torch.channels_last)
        channels_last = setup.default_step(unet)
        variants.append(harness.Variant("default step + channels_last", lambda: channels_last(batch), images))
    if args.compile:
        compiled = setup.default_step(torch.compile(copy.deepcopy(setup.unet), backend=args.compile_backend))
        variants.append(harness.Variant(f"default step + torch.compile ({args.compile_backend})",
                                        lambda: compiled(batch), images))  # fmt: skip
    return variants


def count_forward_flops(unet, batch: dict) -> int:
    """Count the FLOPs of one fp32 forward pass of `unet` on `batch` (matrix products, convolutions, attention)."""
    clean = batch["pixel_values"]
    timesteps = torch.zeros(clean.shape[0], dtype=torch.long, device=clean.device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(clean, timesteps, class_labels=batch["class_labels"])
    return counter.get_total_flops()


def matmul_flops_per_second(dtype: torch.dtype, size: int, device: torch.device, min_seconds: float) -> float:
    """Return the best rate of a `size` x `size` torch.matmul in `dtype`, over products run for `min_seconds`."""
    left = torch.randn(size, size, device=device).to(dtype)
    right = torch.randn(size, size, device=device).to(dtype)
    torch.matmul(left[:64, :64], right[:64, :64])  # loads the library and picks kernels outside the clock
    harness.synchronize(device)
    best, spent = float("inf"), 0.0
    while spent < min_seconds or best == float("inf"):
        start = time.perf_counter()
        torch.matmul(left, right)
        harness.synchronize(device)
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return 2 * size**3 / best


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    work = parser.add_argument_group("training work")
    work.add_argument("--dataset_name", default=train_cfg.DEFAULT_DATASET, help="Dataset, as training's flag.")
    work.add_argument("--train_batch_size", type=int, default=128, help="Images per step, as training's flag.")
    work.add_argument("--block_out_channels", type=int, nargs="+", default=None,
                      help="UNet channels per block; training's default for the resolution when omitted.")
    work.add_argument("--mixed_precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                      help="Training's --mixed_precision for the default-step variants; the reference is fp32.")
    work.add_argument("--matmul_size", type=int, default=1024,
                      help="Side of the square matrices whose product gives the peak FLOP/s; 0 skips it.")
    work.add_argument("--matmul_seconds", type=float, default=1.0, help="Seconds of products per dtype.")
    harness.add_device_arguments(parser)
    harness.add_timing_arguments(parser, rounds=4, repeats=2, warmup=2)
    args = parser.parse_args(argv)
    harness.check_positive(args, ["train_batch_size", "rounds", "repeats"])
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as output_dir:
        setup = TrainingSetup(args, output_dir)
        print(harness.describe_machine(setup.device))
        num_parameters = sum(parameter.numel() for parameter in setup.unet.parameters())
        print(f"dataset {setup.config.dataset_name}, batch {args.train_batch_size}, UNet "
              f"{tuple(setup.unet.config.block_out_channels)} ({num_parameters:,} parameters)")
        print(f"reference: fp32, eager, the loop of diffusers' example scripts; default step: train_cfg's step with "
              f"--mixed_precision {setup.config.mixed_precision} resolved to {setup.mixed_precision}\n", flush=True)

        variants = build_variants(setup, args)
        forward_flops = count_forward_flops(copy.deepcopy(setup.unet).to(setup.device), setup.fixed_batch)
        harness.time_interleaved(variants, args.rounds, args.repeats, args.warmup, setup.device)

    harness.print_rates(variants)
    per_image = 3 * forward_flops / args.train_batch_size
    print(f"\nUNet forward: {forward_flops / args.train_batch_size / 1e6:.1f} MFLOP per image; a training step is "
          f"counted as 3 forwards, {per_image / 1e6:.1f} MFLOP per image")  # fmt: skip
    peaks = {}
    if args.matmul_size > 0:
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            peaks[name] = matmul_flops_per_second(dtype, args.matmul_size, setup.device, args.matmul_seconds)
            print(f"{name} torch.matmul of {args.matmul_size} x {args.matmul_size}: {peaks[name] / 1e9:.1f} GFLOP/s")
    for variant in variants:
        print(f"{variant.name}: {variant.images_per_second() * per_image / 1e9:.2f} GFLOP/s achieved")

    reference = variants[0]
    ratios = [(f"{variant.name} / {reference.name} (images/s)",
               variant.images_per_second() / reference.images_per_second()) for variant in variants[1:]]  # fmt: skip
    for variant in variants:
        for name, peak in peaks.items():
            ratios.append((f"{variant.name}, achieved FLOP/s / {name} matmul FLOP/s",
                           variant.images_per_second() * per_image / peak))  # fmt: skip
    harness.print_ratios(ratios)


if __name__ == "__main__":
    main()
