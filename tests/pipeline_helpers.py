"""Tiny components for the pipeline tests: a seeded UNet of a few thousand parameters at 8x8, pipelines built on it,
an exact Gaussian denoiser, and a wrapper that records what every UNet forward received."""

import functools
import importlib.util
import math

import diffusers
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils import BaseOutput

from diffusers_cfg.pipelines import ClassConditionalPipeline

NUM_CLASSES = 3
ID2LABEL = {0: "zero", 1: "one", 2: "two"}
SAMPLE_SIZE = 8


@pytest.fixture
def one_thread():
    """Run a test on one CPU thread: tiny models run faster so on a shared machine, and results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_unet(in_channels: int = 1, seed: int = 0, num_classes: int = NUM_CLASSES) -> UNet2DModel:
    """Return a seeded class-conditional UNet of 8x8 pixels with `num_classes` classes plus the null class."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=SAMPLE_SIZE,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=num_classes + 1,
    ).eval()


def trained_scheduler_config(num_train_timesteps: int = 100, **overrides) -> dict:
    """Return a DDPM config that stands for the model's training settings: a schedule unlike diffusers' defaults."""
    config = dict(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=False,
    )
    config.update(overrides)
    return DDPMScheduler(**config).config


def tiny_pipeline(scheduler=None, in_channels: int = 1, num_train_timesteps: int = 100) -> ClassConditionalPipeline:
    """Return a pipeline on `tiny_unet` with DDIM on the trained settings, unless `scheduler` is given."""
    if scheduler is None:
        scheduler = DDIMScheduler.from_config(trained_scheduler_config(num_train_timesteps))
    pipe = ClassConditionalPipeline(unet=tiny_unet(in_channels), scheduler=scheduler, id2label=ID2LABEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def seeded_list(seeds) -> list[torch.Generator]:
    return [seeded(seed) for seed in seeds]


def compatible_scheduler_classes() -> list[type]:
    """Return every scheduler class that diffusers lists as compatible with DDPMScheduler, sorted by name."""
    return sorted(DDPMScheduler.from_config(trained_scheduler_config()).compatibles, key=lambda cls: cls.__name__)


def missing_requirement(scheduler_cls: type) -> str | None:
    """Return why `scheduler_cls` cannot run in this environment, or None when it can."""
    if scheduler_cls.__name__ == "DPMSolverSDEScheduler" and importlib.util.find_spec("torchsde") is None:
        return "DPMSolverSDEScheduler needs the torchsde package, which is not installed"
    return None


def scheduler_by_name(name: str) -> type:
    return getattr(diffusers, name)


class RecordingUNet(torch.nn.Module):
    """Wrap a UNet and record the input, timesteps, class labels and output of every forward.

    `rows` lists the batch size of every call, so tests can count model passes and rows. With `nan_at_call`, that
    call (counted from 0) returns a NaN in its first pixel.
    """

    def __init__(self, unet, nan_at_call: int | None = None):
        super().__init__()
        self.unet = unet
        self.config = unet.config
        self.nan_at_call = nan_at_call
        self.calls: list[dict] = []

    @property
    def dtype(self):
        return self.unet.dtype

    @property
    def device(self):
        return self.unet.device

    @property
    def rows(self) -> list[int]:
        return [len(call["class_labels"]) for call in self.calls]

    def forward(self, sample, timestep, class_labels=None, **kwargs):
        output = self.unet(sample, timestep, class_labels=class_labels, **kwargs)
        if self.nan_at_call is not None and len(self.calls) == self.nan_at_call:
            output.sample[0, 0, 0, 0] = float("nan")
        self.calls.append(
            {
                "sample": sample.clone(),
                "timestep": torch.as_tensor(timestep).clone(),
                "class_labels": class_labels.clone(),
                "output": output.sample.clone(),
            }
        )
        return output


def record_unet(pipe: ClassConditionalPipeline, nan_at_call: int | None = None) -> RecordingUNet:
    """Put a `RecordingUNet` around `pipe.unet` and return it."""
    recorder = RecordingUNet(pipe.unet, nan_at_call=nan_at_call)
    pipe.register_modules(unet=recorder)
    return recorder


def record_steps(monkeypatch, scheduler_cls: type) -> list[torch.Tensor]:
    """Record the model output that every `scheduler_cls.step` call receives, in the returned list."""
    model_outputs = []
    step = scheduler_cls.step

    @functools.wraps(step)
    def recording_step(self, model_output, *args, **kwargs):
        model_outputs.append(model_output.clone())
        return step(self, model_output, *args, **kwargs)

    monkeypatch.setattr(scheduler_cls, "step", recording_step)
    return model_outputs


def final_latents(pipe, *args, **kwargs) -> torch.Tensor:
    """Run `pipe` and return the latents after the last step, before they are clamped into an image."""
    latents = []

    def keep_latents(pipe, step_index, timestep, callback_kwargs):
        latents.append(callback_kwargs["latents"].clone())
        return {}

    pipe(*args, output_type="pt", callback_on_step_end=keep_latents, **kwargs)
    return latents[-1]


def manual_sample(unet, scheduler, labels: torch.Tensor, noise: torch.Tensor, num_inference_steps: int,
                  null_labels: torch.Tensor | None = None, guidance_scale: float = 1.0) -> torch.Tensor:
    """Sample with a plain loop over `scheduler`, the reference the pipeline is checked against.

    With `null_labels`, each step calls the UNet twice, once per label set, and mixes the two predictions.
    """
    scheduler.set_timesteps(num_inference_steps)
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        timesteps = t.expand(len(labels))
        prediction = unet(model_input, timesteps, class_labels=labels).sample
        if null_labels is not None:
            null_prediction = unet(model_input, timesteps, class_labels=null_labels).sample
            prediction = null_prediction + guidance_scale * (prediction - null_prediction)
        latents = scheduler.step(prediction, t, latents).prev_sample
    return latents


# ---------------------------------------------------------------------------------------------------------------------
# An exact denoiser for Gaussian data
#
# When the data of class c is N(mu_c, sigma_c^2 I) and x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, x_t and eps are jointly
# Gaussian: E[x_t] = sqrt(a_t) mu_c, Var[x_t] = a_t sigma_c^2 + 1 - a_t and Cov[eps, x_t] = sqrt(1 - a_t). So the
# minimum-error noise prediction is
#     eps*(x_t, t) = E[eps | x_t] = sqrt(1 - a_t) (x_t - sqrt(a_t) mu_c) / (a_t sigma_c^2 + 1 - a_t).
# The probability-flow ODE keeps z = (x_t - sqrt(a_t) mu_c) / sqrt(a_t sigma_c^2 + 1 - a_t) constant along a path, so
# a deterministic sampler that starts from x_T must end at mu_c + sigma_c z_T, pixel by pixel.
# ---------------------------------------------------------------------------------------------------------------------


class GaussianDenoiserOutput(BaseOutput):
    sample: torch.Tensor


class GaussianDenoiser(ModelMixin, ConfigMixin):
    """A UNet2DModel stand-in whose epsilon prediction is exact for Gaussian data of one mean and std per class.

    `means` and `stds` have `num_classes + 1` entries: the last one is the distribution of the null label.
    """

    @register_to_config
    def __init__(
        self,
        means: list[float],
        stds: list[float],
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        sample_size: int = SAMPLE_SIZE,
        in_channels: int = 1,
    ):
        super().__init__()
        if len(means) != len(stds):
            raise ValueError(f"means has {len(means)} entries but stds has {len(stds)}")
        self.register_to_config(num_class_embeds=len(means), out_channels=in_channels)
        # float64 buffers and no parameters: the pipeline then feeds this model float64 inputs.
        self.register_buffer("class_means", torch.tensor(means, dtype=torch.float64), persistent=False)
        self.register_buffer("class_stds", torch.tensor(stds, dtype=torch.float64), persistent=False)
        training = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule)
        self.register_buffer("alphas_cumprod", training.alphas_cumprod.to(torch.float64), persistent=False)

    def alpha_bar(self, timestep: torch.Tensor) -> torch.Tensor:
        """a_t at a possibly fractional timestep, interpolating linearly in sigma = sqrt((1 - a_t) / a_t)."""
        sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        t = timestep.to(torch.float64).clamp(0, len(sigmas) - 1)
        low = t.floor().long()
        high = (low + 1).clamp(max=len(sigmas) - 1)
        sigma = torch.lerp(sigmas[low], sigmas[high], t - low)
        return 1 / (1 + sigma**2)

    def forward(self, sample, timestep, class_labels=None, return_dict: bool = True):
        timestep = torch.as_tensor(timestep, device=sample.device).expand(sample.shape[0])
        shape = (-1,) + (1,) * (sample.ndim - 1)
        a_t = self.alpha_bar(timestep).view(shape)
        mean = self.class_means[class_labels].view(shape)
        std = self.class_stds[class_labels].view(shape)
        x_t = sample.to(torch.float64)
        eps = (1 - a_t).sqrt() * (x_t - a_t.sqrt() * mean) / (a_t * std**2 + 1 - a_t)
        eps = eps.to(sample.dtype)
        if not return_dict:
            return (eps,)
        return GaussianDenoiserOutput(sample=eps)


def exact_gaussian_sample(noise: torch.Tensor, mean: float, std: float, alpha_bar_start: float) -> torch.Tensor:
    """Return where the probability-flow ODE takes the starting noise `noise` (at a_t = `alpha_bar_start`)."""
    z = (noise.double() - math.sqrt(alpha_bar_start) * mean) / math.sqrt(alpha_bar_start * std**2 + 1 - alpha_bar_start)
    return mean + std * z
