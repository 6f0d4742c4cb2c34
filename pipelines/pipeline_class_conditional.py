"""Class-conditional sampling with classifier-free guidance for a `UNet2DModel` and any diffusers scheduler.

This module imports only torch, diffusers and the standard library, so that `save_pretrained` can copy it next
to the weights and `DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)` can load it without this
package installed.

Symbols used in comments (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance"):
    x_t      noisy sample at timestep t, as the UNet sees it after `scheduler.scale_model_input`
    a_t      alpha-bar, the cumulative signal share of the training noise schedule: x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps
    sigma_t  noise level sqrt((1 - a_t) / a_t), the unit of `guidance_interval`
    c        class label; the null label `num_classes` stands for "no label"
    s        `guidance_scale`: eps = eps(x_t, null) + s * (eps(x_t, c) - eps(x_t, null))
    w        the weight of Ho & Salimans, w = s - 1
"""

import inspect
import json
import math
import numbers
import os
import shutil
from collections.abc import Callable, Sequence

import diffusers
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DModel
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

logger = logging.get_logger(__name__)

MODULE_STEM = os.path.splitext(os.path.basename(__file__))[0]
OUTPUT_TYPES = ("pil", "np", "pt")

# Scheduler settings that define the noise process the UNet was trained on. A scheduler swapped in for sampling must
# keep them, while every other setting (timestep spacing, solver order, clipping) may change.
TRAINING_SETTINGS = (
    "num_train_timesteps",
    "beta_schedule",
    "beta_start",
    "beta_end",
    "trained_betas",
    "prediction_type",
    "rescale_betas_zero_snr",
)
# The value that a scheduler without the setting behaves as if it had.
TRAINING_SETTING_NEUTRAL = {"trained_betas": None, "rescale_betas_zero_snr": False}


def predict_x0(model_output, x_t, alpha_bar, prediction_type):
    """Convert a model prediction of any `prediction_type` into the clean-sample estimate x_0."""
    if prediction_type == "epsilon":
        return (x_t - (1 - alpha_bar).sqrt() * model_output) / alpha_bar.sqrt()
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; use 'epsilon', 'v_prediction' or 'sample'")


def prediction_from_x0(x0, x_t, alpha_bar, prediction_type):
    """Inverse of `predict_x0`: the model output of `prediction_type` that is consistent with x_0 at x_t."""
    if prediction_type == "sample":
        return x0
    eps = (x_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
    if prediction_type == "epsilon":
        return eps
    return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0


def threshold_x0(x0, config):
    """Clip x_0 the way the scheduler's config asks: dynamic thresholding (Imagen) or a fixed range."""
    if config.get("thresholding", False):
        flat = x0.abs().reshape(x0.shape[0], -1).float()
        limit = torch.quantile(flat, config.get("dynamic_thresholding_ratio", 0.995), dim=1)
        limit = limit.clamp(min=1.0, max=config.get("sample_max_value", 1.0)).view(-1, *([1] * (x0.ndim - 1)))
        return torch.maximum(torch.minimum(x0, limit), -limit) / limit
    clip_range = config.get("clip_sample_range", 1.0)
    return x0.clamp(-clip_range, clip_range)


def rescale_guided_prediction(guided, conditional, guidance_rescale):
    """Rescale the guided prediction's standard deviation toward the conditional one (Lin et al. 2023, eq. 15-16)."""
    dims = list(range(1, guided.ndim))
    guided_std = guided.std(dim=dims, keepdim=True)
    # A constant guided prediction has no spread to rescale, so it stays as it is instead of being divided by zero.
    ratio = torch.where(guided_std > 0, conditional.std(dim=dims, keepdim=True) / guided_std, torch.ones_like(guided_std))
    return guidance_rescale * guided * ratio + (1 - guidance_rescale) * guided


def training_settings(config) -> dict:
    """Return the entries of a scheduler config that define the noise process a model is trained on."""
    return {key: _plain(config[key]) for key in TRAINING_SETTINGS if key in config}


def _plain(value):
    # `trained_betas` may be a NumPy array or a tensor, which `!=` would compare element by element.
    return value.tolist() if hasattr(value, "tolist") else value


def lost_training_settings(trained: dict, scheduler) -> dict:
    """Return {setting: (trained value, the scheduler's value)} for every training setting `scheduler` does not keep."""
    lost = {}
    for key, trained_value in trained.items():
        value = _plain(scheduler.config.get(key, TRAINING_SETTING_NEUTRAL.get(key, "<not supported>")))
        if value != trained_value:
            lost[key] = (trained_value, value)
    return lost


def _has_repeated_timesteps(scheduler, num_inference_steps: int) -> bool:
    """Return whether a scheduler with one timestep per step visits a timestep twice."""
    timesteps = scheduler.timesteps
    if len(timesteps) != num_inference_steps:
        # Schedulers with two model calls per step (Heun, KDPM2, PNDM's warm-up) repeat timesteps on purpose.
        return False
    return bool((timesteps[1:] >= timesteps[:-1]).any())


def _describe(value) -> str:
    """Describe a received value for an error message: its repr, cut to one short line, and its type."""
    text = " ".join(repr(value).split())
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _is_real(value) -> bool:
    # bool is an int subclass, but True as a number is almost always a mistake.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_int(name: str, value, minimum: int, maximum: int | None = None, note: str = "") -> None:
    """Raise TypeError unless `value` is an int, and ValueError unless it lies in [minimum, maximum]."""
    allowed = f"an int in [{minimum}, {maximum}]" if maximum is not None else f"an int >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {allowed}{note}, got {_describe(value)}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {allowed}{note}, got {value!r}")


def _check_real(name: str, value, minimum: float, maximum: float, note: str = "") -> None:
    """Raise TypeError unless `value` is a real number, and ValueError unless it is finite and in the range."""
    allowed = f"a finite number in [{minimum:g}, {maximum:g}]{note}"
    if not _is_real(value):
        raise TypeError(f"{name} must be {allowed}, got {_describe(value)}")
    if not (math.isfinite(value) and minimum <= value <= maximum):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _check_bool(name: str, value, allow_none: bool = False) -> None:
    if isinstance(value, bool) or (allow_none and value is None):
        return
    allowed = "True, False or None" if allow_none else "True or False"
    raise TypeError(f"{name} must be {allowed}, got {_describe(value)}")


def _check_generator(generator, device: torch.device) -> None:
    """Raise TypeError or ValueError unless `generator` is None or generators that can draw noise for `device`."""
    if generator is None:
        return
    allowed = "a torch.Generator, a list of them with one per image, or None"
    for source in generator if isinstance(generator, list) else [generator]:
        if not isinstance(source, torch.Generator):
            entry = f" with the entry {_describe(source)}" if isinstance(generator, list) else ""
            raise TypeError(f"generator must be {allowed}, got {_describe(generator)}{entry}")
        # diffusers' randn_tensor draws on a CPU generator for any device, but on another accelerator not at all.
        if not _can_draw_for(source.device, device):
            raise ValueError(
                f"generator is on {source.device}, but the pipeline runs on {device}; create it with "
                f"torch.Generator(device={str(device)!r}) or on the CPU"
            )


def _can_draw_for(generator_device: torch.device, device: torch.device) -> bool:
    if generator_device.type == "cpu":
        return True
    if generator_device.type != device.type:
        return False
    return None in (generator_device.index, device.index) or generator_device.index == device.index


def _constructor_parameters(scheduler_cls: type) -> set:
    """Return the names of the settings that `scheduler_cls.__init__` takes."""
    parameters = inspect.signature(scheduler_cls.__init__).parameters.values()
    return {p.name for p in parameters if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _check_latents(latents) -> None:
    """Raise TypeError or ValueError unless `latents` is a floating-point tensor of finite values with 4 dimensions."""
    allowed = "a floating-point tensor of shape (batch_size, channels, height, width)"
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be {allowed}, got {_describe(latents)}")
    if not latents.is_floating_point():
        raise TypeError(f"latents must be {allowed}, got dtype {latents.dtype}")
    if latents.is_meta:
        raise ValueError("latents is a tensor on the meta device, which has no data")
    if latents.ndim != 4:
        raise ValueError(f"latents must be {allowed}, got shape {tuple(latents.shape)}")
    non_finite = int((~torch.isfinite(latents)).sum())
    if non_finite:
        raise ValueError(f"latents must be finite, got {non_finite} NaN or infinite values of {latents.numel()}")


def _check_guidance_interval(interval) -> None:
    if interval is None:
        return
    allowed = "None or a (low, high) pair of noise levels with 0 <= low < high, where high may be inf"
    if not isinstance(interval, Sequence) or isinstance(interval, (str, bytes)):
        raise TypeError(f"guidance_interval must be {allowed}, got {_describe(interval)}")
    if len(interval) != 2:
        raise ValueError(f"guidance_interval must be {allowed}, got {len(interval)} values: {interval!r}")
    if not all(_is_real(bound) for bound in interval):
        raise TypeError(f"guidance_interval must be {allowed}, got {_describe(interval)}")
    low, high = interval
    # NaN fails every comparison, so a NaN bound fails the test below.
    if not (math.isfinite(low) and 0 <= low < high):
        raise ValueError(f"guidance_interval must be {allowed}, got {interval!r}")


class ClassConditionalPipeline(DiffusionPipeline):
    r"""
    Pipeline that samples images of requested classes from a class-conditional `UNet2DModel`, with
    classifier-free guidance.

    The UNet has `num_class_embeds = num_classes + 1` class-embedding rows; the last id, `num_classes`, is the null
    label that training substitutes for dropped labels, and that guidance uses for the unconditional prediction.

    Args:
        unet ([`UNet2DModel`]): The denoiser, trained with per-element label dropout.
        scheduler ([`SchedulerMixin`]): Any diffusers noise scheduler compatible with the UNet's training schedule.
        id2label (`dict[int, str]`, *optional*): Class names, so that labels can be given by name. Kept in the
            pipeline config, so it survives `save_pretrained` and `from_pretrained`.
        default_guidance_scale (`float`, *optional*, defaults to 4.0): The scale used when `__call__` gets
            `guidance_scale=None`, for instance the best scale a guidance sweep found for this model.
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet: UNet2DModel, scheduler, id2label: dict | None = None, default_guidance_scale: float = 4.0):
        super().__init__()
        if unet.config.num_class_embeds is None or unet.config.num_class_embeds < 2:
            raise ValueError(
                f"unet.config.num_class_embeds is {unet.config.num_class_embeds}; a class-conditional UNet needs "
                "num_classes + 1 class embeddings (the last one is the null label)"
            )
        num_classes = unet.config.num_class_embeds - 1
        if id2label is not None:
            # JSON turns the integer keys into strings, so normalise them on the way in.
            id2label = {int(key): str(name) for key, name in id2label.items()}
            unknown = sorted(key for key in id2label if not 0 <= key < num_classes)
            if unknown:
                raise ValueError(f"id2label has ids {unknown} outside [0, {num_classes}) for a UNet of {num_classes} classes")
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(id2label=id2label, default_guidance_scale=float(default_guidance_scale))
        self.id2label = id2label or {}
        # The noise process of the scheduler the pipeline is built with is taken as the one the UNet was trained on.
        self._trained_settings = training_settings(scheduler.config)

    @property
    def num_classes(self) -> int:
        return self.unet.config.num_class_embeds - 1

    @property
    def null_class_id(self) -> int:
        """The class id that means "no label": the last row of the class embedding."""
        return self.unet.config.num_class_embeds - 1

    @property
    def labels(self) -> dict:
        """Mapping from class name to class id."""
        return {name: key for key, name in self.id2label.items()}

    # Loading and saving

    @classmethod
    def _dict_from_json_file(cls, json_file):
        # A folder saved by this class names the module file in `_class_name`, so that the generic loader can run it
        # as remote code. Loading through this class itself must not run that copy: read it as a plain class name.
        # diffusers 0.42 reads model_index.json through this hook both for local folders (`load_config`) and for Hub
        # repos (`download`), which is why it is overridden rather than `load_config`.
        config = super()._dict_from_json_file(json_file)
        class_name = config.get("_class_name")
        if isinstance(class_name, (list, tuple)) and len(class_name) == 2 and class_name[1] == cls.__name__:
            config["_class_name"] = cls.__name__
        return config

    def save_pretrained(self, save_directory, safe_serialization: bool = True, push_to_hub: bool = False, **kwargs):
        """Save the pipeline, plus this module file, so the folder also loads with `trust_remote_code=True`."""
        if push_to_hub:
            raise ValueError(
                "push_to_hub=True is not supported here; save the pipeline, then push the folder with "
                "`diffusers_cfg.training.hub.push_to_hub(folder, repo_id)`"
            )
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, **kwargs)
        module_path = os.path.join(save_directory, f"{MODULE_STEM}.py")
        # This module may itself be the file in `save_directory`, when it was imported from there.
        if not (os.path.exists(module_path) and os.path.samefile(__file__, module_path)):
            shutil.copyfile(__file__, module_path)
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path, encoding="utf-8") as index_file:
            index = json.load(index_file)
        index["_class_name"] = [MODULE_STEM, self.__class__.__name__]
        with open(index_path, "w", encoding="utf-8") as index_file:
            json.dump(index, index_file, indent=2, sort_keys=True)
            index_file.write("\n")

    # Schedulers

    def set_scheduler(self, scheduler: str | type, **overrides) -> SchedulerMixin:
        """Swap in another scheduler built from the current config, keeping the noise schedule the UNet was trained on.

        Args:
            scheduler (`str` or scheduler class): One of `self.compatible_schedulers()`, or its class, such as
                `"DPMSolverMultistepScheduler"`.
            overrides: Settings of the new scheduler's constructor, such as `timestep_spacing="trailing"` or
                `use_karras_sigmas=True`. The training settings (`num_train_timesteps`, the betas, `prediction_type`,
                `rescale_betas_zero_snr`) cannot be overridden, because the UNet only works on the noise process it
                was trained on.

        Returns:
            The new scheduler, which is also `self.scheduler` from now on.

        Raises:
            TypeError: for a `scheduler` that is neither a class nor a name, or an override that the scheduler's
                constructor does not take. The message lists the settings it takes.
            ValueError: for a scheduler not in `self.compatible_schedulers()`, an override of a training setting, or
                an override value that the scheduler rejects.
        """
        if isinstance(scheduler, str):
            name = scheduler
        elif isinstance(scheduler, type):
            name = scheduler.__name__
        else:
            raise TypeError(
                "scheduler must be a scheduler class or its name, such as 'DPMSolverMultistepScheduler'; pass "
                f"settings as keyword arguments. Got {_describe(scheduler)}"
            )
        compatible = {cls.__name__: cls for cls in self.scheduler.compatibles}
        if name not in compatible:
            raise ValueError(
                f"scheduler {name!r} is not compatible with {self.scheduler.__class__.__name__}; "
                f"choose one of {self.compatible_schedulers()}"
            )
        fixed = sorted(key for key in overrides if key in TRAINING_SETTINGS)
        if fixed:
            raise ValueError(
                f"set_scheduler cannot override {fixed}: they define the noise process the UNet was trained on "
                f"(trained values: {({key: self._trained_settings.get(key) for key in fixed})}); "
                "only sampling settings such as timestep_spacing can change"
            )
        scheduler_cls = compatible[name]
        settings = sorted(_constructor_parameters(scheduler_cls) - set(TRAINING_SETTINGS))
        unknown = sorted(set(overrides) - set(settings))
        if unknown:
            raise TypeError(f"{name} has no settings {unknown}; the settings set_scheduler can change are {settings}")

        try:
            new_scheduler = self._build_scheduler(scheduler_cls, overrides)
        except (ValueError, NotImplementedError, TypeError) as error:
            kind = TypeError if isinstance(error, TypeError) else ValueError
            raise kind(f"{name} rejected the settings {overrides}: {error}") from error
        problem = self._sampling_problem(new_scheduler)
        if problem:
            raise ValueError(
                f"{name} cannot sample this UNet: {problem}; choose one of {self.compatible_schedulers()}"
            )
        self.register_modules(scheduler=new_scheduler)
        return new_scheduler

    def compatible_schedulers(self) -> list[str]:
        """Return the names of the schedulers that `set_scheduler` accepts, sorted.

        These are the schedulers that diffusers lists as compatible with the current one and that keep the noise
        process the UNet was trained on. A scheduler that fails to build, for one because it needs a package that is
        not installed, is left out.
        """
        names = []
        for scheduler_cls in self.scheduler.compatibles:
            try:
                candidate = self._build_scheduler(scheduler_cls, {})
            except (ImportError, ValueError, NotImplementedError):
                continue
            if not self._sampling_problem(candidate):
                names.append(scheduler_cls.__name__)
        return sorted(names)

    def _build_scheduler(self, scheduler_cls: type, overrides: dict) -> SchedulerMixin:
        """Build `scheduler_cls` from the current config, the training settings and `overrides`, and try its timesteps.

        diffusers' from_config drops the settings that the source config left at their defaults, and the new class
        then uses its own defaults (HeunDiscreteScheduler's beta_end is 0.012, DDPMScheduler's 0.02). So the training
        settings are passed explicitly. Some override values, such as an unknown `timestep_spacing`, fail only when
        timesteps are set, which a throwaway copy does here.
        """
        accepted = _constructor_parameters(scheduler_cls)
        # Settings that the class does not take are left out, because from_config would keep them unused in the new
        # config, where they would hide that the class cannot keep a training setting.
        config = {key: value for key, value in self.scheduler.config.items() if key in accepted or key.startswith("_")}
        pinned = {key: value for key, value in self._trained_settings.items() if key in accepted}
        new_scheduler = scheduler_cls.from_config(config, **pinned, **overrides)
        if overrides:
            trial = scheduler_cls.from_config(new_scheduler.config)
            trial.set_timesteps(min(50, trial.config.num_train_timesteps))
        return new_scheduler

    def _sampling_problem(self, scheduler) -> str | None:
        """Return why `scheduler` cannot sample this UNet, or None when it can."""
        if getattr(scheduler, "alphas_cumprod", None) is None:
            return (
                "it does not sample on the UNet's training noise schedule, because it has no alphas_cumprod and feeds "
                "the UNet inputs and timesteps preconditioned for an EDM-trained model"
            )
        lost = lost_training_settings(self._trained_settings, scheduler)
        if lost:
            details = ", ".join(f"{key}={trained!r} became {value!r}" for key, (trained, value) in lost.items())
            return f"it cannot keep the settings the UNet was trained with: {details}"
        return None

    def _sampling_scheduler(self, num_inference_steps: int, clip_sample, generator, device):
        """Return a fresh copy of the scheduler for one call, with its timesteps set, and whether to clip x_0.

        The copy has the scheduler's own clipping turned off. DDIM's clipping, for one, acts on its x_0 estimate but
        steps with the unclipped model output. Under guidance the two disagree, and samples drift to a grey or black
        background or flip to the other end of the range. So the pipeline clips x_0 itself and gives the scheduler a
        model output that agrees with the clipped x_0. A fresh copy also keeps the state of multistep schedulers from
        leaking between calls.
        """
        config = self.scheduler.config
        scheduler_name = self.scheduler.__class__.__name__
        wants_clipping = bool(config.get("clip_sample", False) or config.get("thresholding", False))
        clip = wants_clipping if clip_sample is None else bool(clip_sample)
        overrides = {key: False for key in ("clip_sample", "thresholding") if key in config}

        # PNDM's Runge-Kutta warm-up takes `pndm_order` (4) timesteps, and diffusers fails with fewer. Its linear
        # multistep method alone runs at any step count.
        pndm_order = getattr(self.scheduler, "pndm_order", None)
        if config.get("skip_prk_steps") is False and pndm_order is not None and num_inference_steps < pndm_order:
            logger.warning(
                f"{scheduler_name} needs {pndm_order} steps for its Runge-Kutta warm-up; sampling "
                f"{num_inference_steps} steps with skip_prk_steps=True"
            )
            overrides["skip_prk_steps"] = True

        scheduler = self.scheduler.__class__.from_config(config, **overrides)
        scheduler.set_timesteps(num_inference_steps, device=device)

        # With num_inference_steps close to num_train_timesteps, "linspace" spacing rounds two steps to the same
        # timestep, a step of size zero that turns some multistep solvers' outputs into NaN. Trailing spacing covers
        # the same range with distinct timesteps: through the config where the scheduler offers it, else as explicit
        # timesteps.
        if _has_repeated_timesteps(scheduler, num_inference_steps):
            if "timestep_spacing" in config:
                overrides["timestep_spacing"] = "trailing"
                scheduler = self.scheduler.__class__.from_config(config, **overrides)
                scheduler.set_timesteps(num_inference_steps, device=device)
            elif "timesteps" in inspect.signature(scheduler.set_timesteps).parameters:
                train_steps = config.num_train_timesteps
                trailing = torch.arange(train_steps, 0, -train_steps / num_inference_steps).round() - 1
                scheduler.set_timesteps(device=device, timesteps=trailing.long().tolist())
        if _has_repeated_timesteps(scheduler, num_inference_steps):
            raise ValueError(
                f"{scheduler_name} repeats timesteps for num_inference_steps={num_inference_steps}: "
                f"{scheduler.timesteps.tolist()}; use fewer steps"
            )
        # KDPM2AncestralDiscreteScheduler of diffusers 0.42.1, for one, computes NaN timesteps in float32 when the
        # largest noise level is thousands of times the next one (a cosine schedule sampled in a few steps).
        if not torch.isfinite(scheduler.timesteps).all():
            raise ValueError(
                f"{scheduler_name} computed non-finite timesteps for num_inference_steps={num_inference_steps} with "
                f"this noise schedule: {scheduler.timesteps.tolist()}; use more steps, timestep_spacing='leading', "
                "or another scheduler"
            )

        return scheduler, clip

    @staticmethod
    def _seed_noise_sampler(scheduler, generator):
        """Seed the Brownian noise of DPMSolverSDEScheduler from `generator`, which its `step` does not take.

        Without this its noise comes from torch's global random state. With one generator per image, each image's
        noise depends on its own generator only.
        """
        if not hasattr(scheduler, "noise_sampler_seed") or generator is None:
            return
        generators = generator if isinstance(generator, list) else [generator]
        seeds = [int(torch.randint(0, 2**63 - 1, (), generator=source, device=source.device)) for source in generators]
        scheduler.noise_sampler_seed = seeds if isinstance(generator, list) else seeds[0]

    def _alpha_bar(self, scheduler, timestep, device) -> torch.Tensor:
        """Return a_t at a model timestep, interpolating log sigma between integer timesteps as Karras sigmas do.

        NOTE: Euler-type schedulers with "linspace" spacing interpolate sigma itself. Between two training timesteps
        the two disagree by up to about 2% of sigma (at the lowest noise levels of a linear 1000-step schedule), which
        only shifts where clipping applies and where the guidance interval starts.
        """
        alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float64)
        t = torch.as_tensor(timestep, dtype=torch.float64, device=device).clamp(0, len(alphas_cumprod) - 1)
        low = t.floor().long()
        if t == low:
            # Exact at integer timesteps, including a_T = 0 of a zero-terminal-SNR schedule, where log sigma is inf.
            return alphas_cumprod[low].float()
        high = (low + 1).clamp(max=len(alphas_cumprod) - 1)
        log_sigmas = 0.5 * torch.log((1 - alphas_cumprod) / alphas_cumprod)
        log_sigma = torch.lerp(log_sigmas[low], log_sigmas[high], t - low)
        return (1 / (1 + torch.exp(2 * log_sigma))).float()

    # Inputs

    def prepare_class_labels(self, class_labels, device=None, name: str = "class_labels") -> torch.Tensor:
        """Turn an int, a name, a list of ints or names, a 1-D tensor or NumPy array into a long tensor of shape (B,).

        `name` is the argument that the labels came from, for the error messages.

        Raises:
            TypeError: for a value of another type, such as a float, a set or a bool, or a list entry of one.
            ValueError: for no labels, a tensor that is not 1-D or contains non-integer values, a name not in
                `id2label`, or a label outside `[0, num_classes)`. The message names the value and what is allowed.
        """
        if isinstance(class_labels, torch.Tensor) and class_labels.ndim == 0:
            class_labels = class_labels.reshape(1)
        if isinstance(class_labels, (str, numbers.Integral)) and not isinstance(class_labels, bool):
            class_labels = [class_labels]
        elif hasattr(class_labels, "__array__") and not isinstance(class_labels, torch.Tensor):
            class_labels = self._numpy_class_labels(class_labels, name)

        if isinstance(class_labels, torch.Tensor):
            ids = self._tensor_class_ids(class_labels, name)
        elif isinstance(class_labels, Sequence) and not isinstance(class_labels, (str, bytes)):
            ids = [self._class_id(label, name) for label in class_labels]
        else:
            raise TypeError(
                f"{name} must be an int, a class name, a list of them, a 1-D tensor or a NumPy array of class ids, "
                f"got {_describe(class_labels)}"
            )
        if not ids:
            unconditional = " (for unconditional samples pass class_labels=None and batch_size)"
            raise ValueError(
                f"{name} is empty, got {_describe(class_labels)}; give at least one label"
                + (unconditional if name == "class_labels" else "")
            )

        invalid = [label for label in ids if not 0 <= label < self.num_classes]
        if invalid:
            raise ValueError(
                f"{name} {invalid} are outside [0, {self.num_classes}); this model has {self.num_classes} classes"
                f" (id {self.null_class_id} is the null label, used through guidance, not requested directly)"
            )
        return torch.tensor(ids, dtype=torch.long, device=device)

    @staticmethod
    def _numpy_class_labels(array, name: str):
        """Return a NumPy array's labels as a tensor of ids, or as a list of names when it contains strings."""
        if getattr(array, "ndim", 1) > 1:
            raise ValueError(f"{name} must be 1-D, got an array of shape {tuple(array.shape)}")
        if getattr(getattr(array, "dtype", None), "kind", None) in ("U", "S", "O"):
            # Strings and objects cannot become a tensor, so they go on as a list, whose strings are class names.
            return array.reshape(-1).tolist()
        try:
            return torch.as_tensor(array)
        except TypeError as error:
            raise TypeError(f"{name} must contain integer class ids or class names, got {_describe(array)}") from error

    @staticmethod
    def _tensor_class_ids(class_labels: torch.Tensor, name: str = "class_labels") -> list[int]:
        if class_labels.is_meta:
            raise ValueError(
                f"{name} is a tensor on the meta device, which has no data; pass a tensor with values, for instance "
                "on the CPU"
            )
        if class_labels.ndim != 1:
            raise ValueError(
                f"{name} must be a 1-D tensor of shape (batch_size,), got shape {tuple(class_labels.shape)}"
            )
        if class_labels.dtype == torch.bool or class_labels.is_complex():
            raise TypeError(f"{name} must contain integer class ids, got dtype {class_labels.dtype}")
        if class_labels.is_floating_point():
            values = class_labels.detach().cpu().double()
            if not (torch.isfinite(values).all() and torch.equal(values, values.round())):
                raise ValueError(f"{name} must contain whole numbers, got {values.tolist()}")
        return class_labels.detach().to(device="cpu", dtype=torch.long).tolist()

    def _class_id(self, label, name: str = "class_labels") -> int:
        if isinstance(label, str):
            if label not in self.labels:
                names = sorted(self.labels)
                shown = ", ".join(repr(known) for known in names[:20]) + (" ..." if len(names) > 20 else "")
                raise ValueError(
                    f"{name} has the class name {label!r}, which is not in id2label; known names: "
                    f"{shown or 'none (no id2label)'}"
                )
            return self.labels[label]
        if isinstance(label, numbers.Integral) and not isinstance(label, bool):
            return int(label)
        if isinstance(label, torch.Tensor) and label.ndim == 0 and not label.is_floating_point() and not label.is_meta:
            if label.dtype != torch.bool and not label.is_complex():
                return int(label)
        raise TypeError(f"{name} entries must be ints or class names, got {_describe(label)}")

    def prepare_guidance_scale(self, guidance_scale, batch_size: int, device) -> torch.Tensor:
        """Return guidance scales as a float tensor of shape (B,), checking type, count and values.

        Raises:
            TypeError: for a value that is not a number, a list of numbers, or a real-valued tensor or array.
            ValueError: for a count other than 1 or `batch_size`, more than one dimension, or a scale that is negative
                or not finite.
        """
        if guidance_scale is None:
            guidance_scale = self.config.default_guidance_scale
        allowed = "a number, a list of numbers (one per image), a 1-D tensor or None"
        if hasattr(guidance_scale, "__array__") and not isinstance(guidance_scale, (torch.Tensor, numbers.Real)):
            guidance_scale = guidance_scale.tolist()  # a NumPy array: a scalar or (nested) lists of numbers

        if isinstance(guidance_scale, torch.Tensor):
            if guidance_scale.is_meta:
                raise ValueError("guidance_scale is a tensor on the meta device, which has no data")
            if guidance_scale.dtype == torch.bool or guidance_scale.is_complex():
                raise TypeError(f"guidance_scale must be {allowed}, got a tensor of dtype {guidance_scale.dtype}")
            if guidance_scale.ndim > 1:
                shape = tuple(guidance_scale.shape)
                raise ValueError(f"guidance_scale must be {allowed}, got a tensor of shape {shape}")
            scales = guidance_scale.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
        elif _is_real(guidance_scale):
            scales = torch.tensor([float(guidance_scale)])
        elif isinstance(guidance_scale, Sequence) and not isinstance(guidance_scale, (str, bytes)):
            wrong = [value for value in guidance_scale if not _is_real(value)]
            if wrong:
                raise TypeError(
                    f"guidance_scale must be {allowed}, got {_describe(guidance_scale)} with the entry "
                    f"{_describe(wrong[0])}"
                )
            scales = torch.tensor([float(value) for value in guidance_scale], dtype=torch.float32)
        else:
            raise TypeError(f"guidance_scale must be {allowed}, got {_describe(guidance_scale)}")

        if scales.numel() == 1:
            scales = scales.expand(batch_size)
        elif scales.numel() != batch_size:
            raise ValueError(
                f"guidance_scale has {scales.numel()} values for {batch_size} images; give one number or one per image"
            )
        if not torch.isfinite(scales).all() or (scales < 0).any():
            raise ValueError(
                f"guidance_scale must be finite and >= 0 (0 = unconditional, 1 = conditional), got {scales.tolist()}"
            )
        return scales.to(device)

    def check_inputs(
        self,
        num_inference_steps,
        generator,
        latents,
        guidance_rescale,
        guidance_interval,
        clip_sample,
        eta,
        batch_size,
        output_type,
        return_dict,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
        device,
    ):
        """Check the scheduler and the arguments of `__call__` other than labels and scales, before any model call.

        Raises:
            TypeError: for an argument of the wrong type.
            ValueError: for a value out of range, or a scheduler that cannot sample this UNet. Each message names the
                argument, the value received and what is allowed.
        """
        train_steps = self.scheduler.config.num_train_timesteps
        _check_int("num_inference_steps", num_inference_steps, 1, train_steps, note=" (the training step count)")
        if batch_size is not None:
            _check_int("batch_size", batch_size, 1)
        _check_generator(generator, device)
        if latents is not None:
            _check_latents(latents)
        _check_real("guidance_rescale", guidance_rescale, 0.0, 1.0)
        _check_guidance_interval(guidance_interval)
        _check_bool("clip_sample", clip_sample, allow_none=True)
        # DDIM's eta scales the noise of a step between none (0) and DDPM's (1). Above 1 that noise can exceed the
        # variance left at the next timestep, and the step takes the square root of a negative number.
        _check_real("eta", eta, 0.0, 1.0, note=" (0 is deterministic DDIM, 1 is DDPM-like)")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        _check_bool("return_dict", return_dict)
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError(f"callback_on_step_end must be callable or None, got {_describe(callback_on_step_end)}")
        self._check_callback_tensor_inputs(callback_on_step_end_tensor_inputs)
        self._check_scheduler()

    def _check_callback_tensor_inputs(self, tensor_inputs) -> None:
        if tensor_inputs is None:
            return
        # A string is a sequence too, and "latents" would otherwise read as seven one-letter names.
        if not isinstance(tensor_inputs, (list, tuple)) or not all(isinstance(name, str) for name in tensor_inputs):
            raise TypeError(
                "callback_on_step_end_tensor_inputs must be a list of tensor names such as "
                f"{self._callback_tensor_inputs}, got {_describe(tensor_inputs)}"
            )
        unknown_inputs = [name for name in tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown_inputs:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown_inputs} are not available; "
                f"choose from {self._callback_tensor_inputs}"
            )

    def _check_scheduler(self):
        """Raise a ValueError if `self.scheduler` cannot sample this UNet: another noise process, or one that fails."""
        scheduler_name = self.scheduler.__class__.__name__
        problem = self._sampling_problem(self.scheduler)
        if problem is not None:
            if getattr(self.scheduler, "alphas_cumprod", None) is None:
                advice = "use EulerDiscreteScheduler (with use_karras_sigmas=True for EDM's spacing of noise levels)"
            else:
                advice = (
                    "diffusers' from_config drops settings that the source config left at their defaults; swap "
                    f"schedulers with pipe.set_scheduler({scheduler_name!r}), which keeps them"
                )
            raise ValueError(f"the scheduler {scheduler_name} cannot sample this UNet: {problem}; {advice}")
        config = self.scheduler.config
        if config.get("rescale_betas_zero_snr", False) and config.get("prediction_type") == "epsilon":
            raise ValueError(
                "the scheduler has rescale_betas_zero_snr=True with prediction_type='epsilon': at zero terminal SNR "
                "the input holds no signal, so an epsilon prediction cannot recover the image; use a model trained "
                "with prediction_type='v_prediction', or set rescale_betas_zero_snr=False"
            )

    # Sampling

    def _predict(self, model_input, timestep, class_labels, uncond_labels, scales, guide: bool, guidance_rescale):
        """Run the UNet once, on B rows or on 2B rows when `guide`, and return the prediction for the B samples.

        Without `guide`, each image gets its conditional prediction, or its null (or negative) one where s = 0. That
        is the guided prediction when every s is 0 or 1, and the prediction outside the guidance interval, where
        s = 1 applies.
        """
        batch_size = model_input.shape[0]
        scale = scales.view(-1, *([1] * (model_input.ndim - 1)))
        if not guide:
            labels = torch.where(scales == 0, uncond_labels, class_labels)
            return self._unet_forward(model_input, timestep, labels)

        # One batched forward: the first half carries the labels, the second half the null or negative labels.
        output = self._unet_forward(
            torch.cat([model_input, model_input]), timestep, torch.cat([class_labels, uncond_labels])
        )
        conditional, unconditional = output[:batch_size], output[batch_size:]
        guided = unconditional + scale * (conditional - unconditional)
        if guidance_rescale > 0:
            # An image sampled at s = 0 requested the unconditional prediction, which is not rescaled.
            rescaled = rescale_guided_prediction(guided, conditional, guidance_rescale)
            guided = torch.where(scale == 0, guided, rescaled)
        return guided

    def _run_callback(self, callback, tensor_inputs, step_index: int, timestep, latents) -> torch.Tensor:
        """Call `callback_on_step_end` and return the latents it returns, or `latents` when it returns none."""
        available = {"latents": latents}
        outputs = callback(self, step_index, timestep, {name: available[name] for name in tensor_inputs})
        if outputs is None:
            return latents

        if not isinstance(outputs, dict):
            raise TypeError(
                f"callback_on_step_end must return a dict of tensors or None, got {_describe(outputs)} at step "
                f"{step_index}"
            )
        unused = sorted(set(outputs) - set(self._callback_tensor_inputs))
        if unused:
            raise ValueError(
                f"callback_on_step_end returned {unused} at step {step_index}, which the pipeline does not use; it "
                f"may return only {self._callback_tensor_inputs}"
            )

        new_latents = outputs.get("latents", latents)
        if not isinstance(new_latents, torch.Tensor):
            raise TypeError(
                f"callback_on_step_end returned latents {_describe(new_latents)} at step {step_index}; they must be a "
                "tensor"
            )
        if new_latents.shape != latents.shape:
            raise ValueError(
                f"callback_on_step_end returned latents of shape {tuple(new_latents.shape)} at step {step_index}; "
                f"they must keep the shape {tuple(latents.shape)}"
            )
        if not torch.isfinite(new_latents).all():
            raise FloatingPointError(f"callback_on_step_end returned non-finite latents at step {step_index}")
        return new_latents.to(device=latents.device, dtype=latents.dtype)

    def _unet_forward(self, model_input, timestep, labels) -> torch.Tensor:
        timesteps = timestep.expand(model_input.shape[0]) if timestep.ndim == 0 else timestep
        return self.unet(model_input.to(self.unet.dtype), timesteps, class_labels=labels).sample.float()

    @torch.no_grad()
    def __call__(
        self,
        class_labels=None,
        guidance_scale: float | Sequence[float] | torch.Tensor | None = None,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        negative_class_labels=None,
        guidance_rescale: float = 0.0,
        guidance_interval: tuple[float, float] | None = None,
        clip_sample: bool | None = None,
        eta: float = 0.0,
        batch_size: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        r"""
        Generate images of the requested classes.

        Args:
            class_labels (`int`, `str`, `list[int | str]` or `torch.Tensor`, *optional*):
                The class of each image: ids in `[0, num_classes)`, names from `id2label`, or a 1-D tensor or NumPy
                array of ids (a float tensor must contain whole numbers) or of names. With `None`, the images are
                unconditional samples (the null label) and `batch_size` sets their count.
            guidance_scale (`float`, `list[float]` or `torch.Tensor`, *optional*, defaults to `None`):
                The scale s in eps = eps_null + s * (eps_label - eps_null), one value or one per image; the weight w of
                Ho & Salimans is s - 1. s = 0 samples unconditionally, s = 1 conditionally (one model pass each), s > 1
                strengthens the class at the cost of variety. `None` uses `pipe.config.default_guidance_scale`.
                Without `class_labels` it has no effect.
            num_inference_steps (`int`, *optional*, defaults to 50):
                Number of denoising steps, from 1 to the scheduler's `num_train_timesteps`.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Random source, on the CPU or on the pipeline's device. With a list of one generator per image, image i
                depends only on generator i.
            latents (`torch.Tensor`, *optional*):
                Finite floating-point starting noise of shape (B, C, H, W) with unit variance; it is scaled by
                `init_noise_sigma`.
            negative_class_labels (same forms as `class_labels`, *optional*):
                Classes to steer away from: they replace the null label in the guidance formula.
            guidance_rescale (`float`, *optional*, defaults to 0.0):
                Share in [0, 1] of the rescaling of Lin et al. (2023), which pulls the guided prediction's standard
                deviation back toward the conditional one. Images at s = 0 are not rescaled.
            guidance_interval (`tuple[float, float]`, *optional*):
                Noise levels (low, high) in sigma = sqrt((1 - a_t) / a_t) units, 0 <= low < high, where high may be
                `float("inf")`. Guidance applies only where low < sigma <= high (Kynkäänniemi et al. 2024).
                Elsewhere s = 1 applies, except to images at s = 0, and one pass of B rows replaces the pass of 2B,
                which saves model calls.
            clip_sample (`bool`, *optional*):
                Clip the x_0 estimate to the scheduler's `clip_sample_range` (or threshold it, when the scheduler
                config asks for `thresholding`) consistently with the model output. `None` follows the scheduler
                config's `clip_sample` and `thresholding`.
            eta (`float`, *optional*, defaults to 0.0):
                In [0, 1]. Passed to schedulers whose `step` takes it (DDIM: 0 is deterministic, 1 is DDPM-like);
                others log a warning when it is not 0.
            batch_size (`int`, *optional*):
                Number of images, at least 1, when `class_labels` is `None`; otherwise it must match the number of
                labels.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"` (mode "L" for one channel, "RGB" for three), `"np"` (float array B x H x W x C in [0, 1]) or
                `"pt"` (float tensor B x C x H x W in [0, 1]).
            return_dict (`bool`, *optional*, defaults to `True`):
                Return an [`ImagePipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, *optional*):
                Called after each step as `callback(pipe, step_index, timestep, callback_kwargs)`; it may return
                `None` or a dict that replaces tensors named in `callback_on_step_end_tensor_inputs`, with finite
                values of the same shape.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*):
                Tensors passed to the callback in `callback_kwargs`; `None` passes `["latents"]`, the only one offered.

        Examples:
            ```py
            >>> import torch
            >>> from diffusers_cfg.pipelines import ClassConditionalPipeline

            >>> pipe = ClassConditionalPipeline.from_pretrained("path/to/output_dir")
            >>> scheduler = pipe.set_scheduler("DPMSolverMultistepScheduler")
            >>> generator = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
            >>> images = pipe(class_labels=[3, 7], guidance_scale=4.0, num_inference_steps=20, generator=generator).images
            >>> images[0].save("class_3.png")
            ```

        Raises:
            TypeError: for an argument of the wrong type, such as `batch_size=2.0` or `generator=5`, before the first
                UNet call.
            ValueError: for a value out of range, such as an empty label list, `eta=float("nan")` or a count that does
                not match the batch, and for a scheduler that cannot sample this UNet, before the first UNet call.
                Each message names the argument, the value received and what is allowed.
            FloatingPointError: when the UNet output, the sample or the latents a callback returns stop being finite,
                naming the step.

        Returns:
            [`ImagePipelineOutput`] or `tuple`: the images, or a one-element tuple of them when `return_dict=False`.
        """
        device = self._execution_device

        # 1. Checks, labels and scales, all before the first UNet call
        self.check_inputs(
            num_inference_steps=num_inference_steps,
            generator=generator,
            latents=latents,
            guidance_rescale=guidance_rescale,
            guidance_interval=guidance_interval,
            clip_sample=clip_sample,
            eta=eta,
            batch_size=batch_size,
            output_type=output_type,
            return_dict=return_dict,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            device=device,
        )
        if class_labels is None:
            if negative_class_labels is not None:
                raise ValueError(
                    "negative_class_labels needs class_labels: without class_labels the images are unconditional "
                    "samples, which have no guidance to steer away from a class"
                )
            if batch_size is None:
                batch_size = len(latents) if latents is not None else 1
            if guidance_scale is not None:
                self.prepare_guidance_scale(guidance_scale, batch_size, device)
                logger.warning(f"guidance_scale={guidance_scale!r} has no effect without class_labels: unconditional "
                               "samples use the null label alone")  # fmt: skip
            labels = torch.full((batch_size,), self.null_class_id, dtype=torch.long, device=device)
            scales = torch.zeros(batch_size, device=device)
        else:
            labels = self.prepare_class_labels(class_labels, device)
            if batch_size is not None and batch_size != len(labels):
                raise ValueError(f"batch_size={batch_size} does not match the {len(labels)} class_labels given")
            batch_size = len(labels)
            scales = self.prepare_guidance_scale(guidance_scale, batch_size, device)
        if negative_class_labels is None:
            uncond_labels = torch.full_like(labels, self.null_class_id)
        else:
            uncond_labels = self.prepare_class_labels(negative_class_labels, device, name="negative_class_labels")
            if len(uncond_labels) != batch_size:
                raise ValueError(
                    f"negative_class_labels has {len(uncond_labels)} labels for {batch_size} images; give one per image"
                )
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"generator is a list of {len(generator)} generators for a batch of {batch_size} images; "
                "give one generator or exactly one per image"
            )
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]

        # At s = 0 the guided prediction is the unconditional (or negative-label) one alone, and at s = 1 the
        # conditional one alone: when every image has one of these, one pass of B rows gives them all. Any other
        # scale needs both predictions, from one batched pass of 2B rows.
        needs_guidance = not bool(((scales == 0) | (scales == 1)).all())

        # 2. Scheduler and starting noise
        scheduler, clip = self._sampling_scheduler(num_inference_steps, clip_sample, generator, device)
        sample_size = self.unet.config.sample_size
        if isinstance(sample_size, int):
            sample_size = (sample_size, sample_size)
        shape = (batch_size, self.unet.config.in_channels, *sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents has shape {tuple(latents.shape)}, expected {shape}")
        latents = latents.to(device=device, dtype=torch.float32) * scheduler.init_noise_sigma
        self._seed_noise_sampler(scheduler, generator)

        step_parameters = set(inspect.signature(scheduler.step).parameters)
        step_kwargs = {}
        if "generator" in step_parameters:
            step_kwargs["generator"] = generator
        if "eta" in step_parameters:
            step_kwargs["eta"] = eta
        elif eta != 0:
            logger.warning(f"eta={eta!r} has no effect: the step of {scheduler.__class__.__name__} takes no eta")
        prediction_type = scheduler.config.get("prediction_type", "epsilon")

        # 3. Denoising loop
        for step_index, t in enumerate(self.progress_bar(scheduler.timesteps)):
            model_input = scheduler.scale_model_input(latents, t)
            alpha_bar = self._alpha_bar(scheduler, t, device)

            guide = needs_guidance
            if guide and guidance_interval is not None:
                sigma = float(((1 - alpha_bar) / alpha_bar).sqrt())
                guide = guidance_interval[0] < sigma <= guidance_interval[1]
            model_output = self._predict(model_input, t, labels, uncond_labels, scales, guide, guidance_rescale)
            if not torch.isfinite(model_output).all():
                raise FloatingPointError(
                    f"the UNet returned non-finite values at step {step_index} (timestep {float(t):g}) of "
                    f"{len(scheduler.timesteps)}; check the model weights and dtype ({self.unet.dtype})"
                )

            if clip:
                x0 = predict_x0(model_output, model_input, alpha_bar, prediction_type)
                x0 = threshold_x0(x0, self.scheduler.config)
                model_output = prediction_from_x0(x0, model_input, alpha_bar, prediction_type)

            latents = scheduler.step(model_output, t, latents, **step_kwargs).prev_sample
            if not torch.isfinite(latents).all():
                raise FloatingPointError(
                    f"sampling produced non-finite values at step {step_index} (timestep {float(t):g}) of "
                    f"{len(scheduler.timesteps)} with {scheduler.__class__.__name__}, from a finite model output"
                )

            if callback_on_step_end is not None:
                latents = self._run_callback(callback_on_step_end, tensor_inputs, step_index, t, latents)

        # 4. Images in [0, 1]
        images = (latents / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            output = images
        else:
            output = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                output = self.numpy_to_pil(output)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (output,)
        return ImagePipelineOutput(images=output)
