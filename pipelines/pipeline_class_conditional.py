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
            scheduler (`str` or scheduler class): A class from `self.scheduler.compatibles`, or its name, such as
                `"DPMSolverMultistepScheduler"`.
            overrides: Settings of the new scheduler, such as `timestep_spacing="trailing"` or `use_karras_sigmas=True`.
                The training settings (`num_train_timesteps`, the betas, `prediction_type`, `rescale_betas_zero_snr`)
                cannot be overridden, because the UNet only works on the noise process it was trained on.

        Returns:
            The new scheduler, which is also `self.scheduler` from now on.
        """
        compatible = {cls.__name__: cls for cls in self.scheduler.compatibles}
        name = scheduler if isinstance(scheduler, str) else getattr(scheduler, "__name__", repr(scheduler))
        if name not in compatible:
            raise ValueError(
                f"scheduler {name!r} is not compatible with {self.scheduler.__class__.__name__}; "
                f"choose one of {sorted(compatible)}"
            )
        fixed = sorted(key for key in overrides if key in TRAINING_SETTINGS)
        if fixed:
            raise ValueError(
                f"set_scheduler cannot override {fixed}: they define the noise process the UNet was trained on "
                f"(trained values: {({key: self._trained_settings.get(key) for key in fixed})}); "
                "only sampling settings such as timestep_spacing can change"
            )

        # diffusers' from_config drops the settings that the source config left at their defaults, and the new class
        # then uses its own defaults (HeunDiscreteScheduler's beta_end is 0.012, DDPMScheduler's 0.02). So the
        # training settings are passed explicitly.
        scheduler_cls = compatible[name]
        accepted = set(inspect.signature(scheduler_cls.__init__).parameters)
        pinned = {key: value for key, value in self._trained_settings.items() if key in accepted}
        new_scheduler = scheduler_cls.from_config(self.scheduler.config, **pinned, **overrides)
        lost = lost_training_settings(self._trained_settings, new_scheduler)
        if lost:
            details = ", ".join(f"{key}={trained!r} became {value!r}" for key, (trained, value) in lost.items())
            raise ValueError(
                f"{name} cannot keep the settings the UNet was trained with: {details}; choose another scheduler"
            )
        self.register_modules(scheduler=new_scheduler)
        return new_scheduler

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

    def prepare_class_labels(self, class_labels, device=None) -> torch.Tensor:
        """Turn an int, a name, a list of ints or names, or a 1-D tensor into a long tensor of shape (B,).

        Raises:
            ValueError: for a tensor that is not 1-D or contains non-integer values, a name not in `id2label`, or a
                label outside `[0, num_classes)`. The message names the value and what is allowed.
        """
        if isinstance(class_labels, torch.Tensor) and class_labels.ndim == 0:
            class_labels = class_labels.reshape(1)
        if isinstance(class_labels, (str, numbers.Integral)) and not isinstance(class_labels, bool):
            class_labels = [class_labels]
        elif hasattr(class_labels, "__array__") and not isinstance(class_labels, torch.Tensor):
            class_labels = torch.as_tensor(class_labels)  # a NumPy array

        if isinstance(class_labels, torch.Tensor):
            ids = self._tensor_class_ids(class_labels)
        elif isinstance(class_labels, Sequence) and len(class_labels) > 0:
            ids = [self._class_id(label) for label in class_labels]
        else:
            raise ValueError(
                "class_labels must be an int, a class name, a non-empty list of them, or a 1-D tensor; "
                f"got {class_labels!r}"
            )

        invalid = [label for label in ids if not 0 <= label < self.num_classes]
        if invalid:
            raise ValueError(
                f"class_labels {invalid} are outside [0, {self.num_classes}); this model has {self.num_classes} classes"
                f" (id {self.null_class_id} is the null label, used through guidance, not requested directly)"
            )
        return torch.tensor(ids, dtype=torch.long, device=device)

    @staticmethod
    def _tensor_class_ids(class_labels: torch.Tensor) -> list[int]:
        if class_labels.is_meta:
            raise ValueError(
                "class_labels is a tensor on the meta device, which has no data; pass a tensor with values, for "
                "instance on the CPU"
            )
        if class_labels.ndim != 1:
            raise ValueError(
                f"class_labels must be a 1-D tensor of shape (batch_size,), got shape {tuple(class_labels.shape)}"
            )
        if class_labels.dtype == torch.bool or class_labels.is_complex():
            raise ValueError(f"class_labels must contain integer class ids, got dtype {class_labels.dtype}")
        if class_labels.is_floating_point():
            values = class_labels.detach().cpu().double()
            if not (torch.isfinite(values).all() and torch.equal(values, values.round())):
                raise ValueError(f"class_labels must contain whole numbers, got {values.tolist()}")
        return class_labels.detach().to(device="cpu", dtype=torch.long).tolist()

    def _class_id(self, label) -> int:
        if isinstance(label, str):
            if label not in self.labels:
                names = sorted(self.labels)
                shown = ", ".join(repr(name) for name in names[:20]) + (" ..." if len(names) > 20 else "")
                raise ValueError(f"class name {label!r} is not in id2label; known names: {shown or 'none (no id2label)'}")
            return self.labels[label]
        if isinstance(label, numbers.Integral) and not isinstance(label, bool):
            return int(label)
        if isinstance(label, torch.Tensor) and label.ndim == 0 and not label.is_floating_point() and not label.is_meta:
            if label.dtype != torch.bool and not label.is_complex():
                return int(label)
        raise ValueError(f"class_labels entries must be ints or class names, got {label!r} ({type(label).__name__})")

    def prepare_guidance_scale(self, guidance_scale, batch_size: int, device) -> torch.Tensor:
        """Return guidance scales as a float tensor of shape (B,), checking count and values."""
        if guidance_scale is None:
            guidance_scale = self.config.default_guidance_scale
        if isinstance(guidance_scale, torch.Tensor):
            guidance_scale = guidance_scale.detach().cpu()
        scales = torch.as_tensor(guidance_scale, dtype=torch.float32).flatten()
        if scales.numel() == 1:
            scales = scales.expand(batch_size)
        elif scales.numel() != batch_size:
            raise ValueError(
                f"guidance_scale has {scales.numel()} values for {batch_size} images; give one float or one per image"
            )
        if not torch.isfinite(scales).all() or (scales < 0).any():
            raise ValueError(
                f"guidance_scale must be finite and >= 0 (0 = unconditional, 1 = conditional), got {scales.tolist()}"
            )
        return scales.to(device)

    def check_inputs(self, num_inference_steps, output_type, generator, batch_size, guidance_rescale, guidance_interval):
        train_steps = self.scheduler.config.num_train_timesteps
        if (
            not isinstance(num_inference_steps, numbers.Integral)
            or isinstance(num_inference_steps, bool)
            or not 1 <= num_inference_steps <= train_steps
        ):
            raise ValueError(
                f"num_inference_steps must be an int in [1, {train_steps}] (the training step count), "
                f"got {num_inference_steps!r}"
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"generator is a list of {len(generator)} generators for a batch of {batch_size} images; "
                "give one generator or exactly one per image"
            )
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        if guidance_interval is not None:
            if len(guidance_interval) != 2 or not 0 <= guidance_interval[0] < guidance_interval[1]:
                raise ValueError(
                    f"guidance_interval must be (low, high) noise levels with 0 <= low < high, got {guidance_interval}"
                )
        self._check_scheduler()

    def _check_scheduler(self):
        """Raise a ValueError if `self.scheduler` cannot sample this UNet: another noise process, or one that fails."""
        scheduler_name = self.scheduler.__class__.__name__
        if getattr(self.scheduler, "alphas_cumprod", None) is None:
            raise ValueError(
                f"{scheduler_name} does not sample on the UNet's training noise schedule: it has no alphas_cumprod and "
                "feeds the UNet inputs and timesteps preconditioned for an EDM-trained model; use "
                "EulerDiscreteScheduler instead (with use_karras_sigmas=True for EDM's spacing of noise levels)"
            )
        lost = lost_training_settings(self._trained_settings, self.scheduler)
        if lost:
            details = ", ".join(f"{key}={trained!r} became {value!r}" for key, (trained, value) in lost.items())
            raise ValueError(
                f"the scheduler {scheduler_name} does not keep the settings the UNet was trained with: {details}. "
                "diffusers' from_config drops settings that the source config left at their defaults; swap "
                f"schedulers with pipe.set_scheduler({scheduler_name!r}), which keeps them"
            )
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
                The class of each image: ids in `[0, num_classes)`, names from `id2label`, or a 1-D tensor of ids
                (a float tensor must contain whole numbers). With `None`, the images are unconditional samples (the null
                label) and `batch_size` sets their count.
            guidance_scale (`float`, `list[float]` or `torch.Tensor`, *optional*, defaults to `None`):
                The scale s in eps = eps_null + s * (eps_label - eps_null), one value or one per image; the weight w of
                Ho & Salimans is s - 1. s = 0 samples unconditionally, s = 1 conditionally (one model pass each), s > 1
                strengthens the class at the cost of variety. `None` uses `pipe.config.default_guidance_scale`.
            num_inference_steps (`int`, *optional*, defaults to 50):
                Number of denoising steps, from 1 to the scheduler's `num_train_timesteps`.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Random source. With a list of one generator per image, image i depends only on generator i.
            latents (`torch.Tensor`, *optional*):
                Starting noise of shape (B, C, H, W) with unit variance; it is scaled by `init_noise_sigma`.
            negative_class_labels (same forms as `class_labels`, *optional*):
                Classes to steer away from: they replace the null label in the guidance formula.
            guidance_rescale (`float`, *optional*, defaults to 0.0):
                Share in [0, 1] of the rescaling of Lin et al. (2023), which pulls the guided prediction's standard
                deviation back toward the conditional one. Images at s = 0 are not rescaled.
            guidance_interval (`tuple[float, float]`, *optional*):
                Noise levels (low, high) in sigma = sqrt((1 - a_t) / a_t) units. Guidance applies only where low < sigma
                <= high (Kynkäänniemi et al. 2024). Elsewhere s = 1 applies, except to images at s = 0, and one pass of
                B rows replaces the pass of 2B, which saves model calls.
            clip_sample (`bool`, *optional*):
                Clip the x_0 estimate to the scheduler's `clip_sample_range` (or threshold it, when the scheduler
                config asks for `thresholding`) consistently with the model output. `None` follows the scheduler
                config's `clip_sample` and `thresholding`.
            eta (`float`, *optional*, defaults to 0.0):
                Passed to schedulers whose `step` takes it (DDIM: 0 is deterministic, 1 is DDPM-like).
            batch_size (`int`, *optional*):
                Number of images when `class_labels` is `None`; otherwise it must match the number of labels.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"` (mode "L" for one channel, "RGB" for three), `"np"` (float array B x H x W x C in [0, 1]) or
                `"pt"` (float tensor B x C x H x W in [0, 1]).
            return_dict (`bool`, *optional*, defaults to `True`):
                Return an [`ImagePipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, *optional*):
                Called after each step as `callback(pipe, step_index, timestep, callback_kwargs)`; it may return a
                dict that replaces tensors named in `callback_on_step_end_tensor_inputs`.
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
            ValueError: for invalid labels, scales, step counts or output types, and for a scheduler that cannot sample
                this UNet, before the first UNet call.
            FloatingPointError: when the UNet output or the sample stops being finite, naming the step.

        Returns:
            [`ImagePipelineOutput`] or `tuple`: the images, or a one-element tuple of them when `return_dict=False`.
        """
        device = self._execution_device

        # 1. Labels, scales and checks
        if class_labels is None:
            if negative_class_labels is not None:
                raise ValueError(
                    "negative_class_labels needs class_labels: without class_labels the images are unconditional "
                    "samples, which have no guidance to steer away from a class"
                )
            if batch_size is None:
                batch_size = len(latents) if latents is not None else 1
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
            uncond_labels = self.prepare_class_labels(negative_class_labels, device)
            if len(uncond_labels) != batch_size:
                raise ValueError(
                    f"negative_class_labels has {len(uncond_labels)} labels for {batch_size} images; give one per image"
                )
        self.check_inputs(num_inference_steps, output_type, generator, batch_size, guidance_rescale, guidance_interval)
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        unknown_inputs = [name for name in tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown_inputs:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown_inputs} are not available; "
                f"choose from {self._callback_tensor_inputs}"
            )

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
                available = {"latents": latents}
                callback_kwargs = {name: available[name] for name in tensor_inputs}
                callback_outputs = callback_on_step_end(self, step_index, t, callback_kwargs) or {}
                latents = callback_outputs.get("latents", latents)

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
