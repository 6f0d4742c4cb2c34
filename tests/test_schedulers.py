"""ClassConditionalPipeline with every scheduler that diffusers lists as compatible.

Checked: finite images at any step count, the right result against an exact denoiser, no state leaking between
calls, per-image randomness, and scheduler swaps that keep the noise process the UNet was trained on.
"""

import itertools

import diffusers
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)
from pipeline_helpers import (
    GaussianDenoiser,
    compatible_scheduler_classes,
    exact_gaussian_sample,
    final_latents,
    missing_requirement,
    one_thread,  # noqa: F401 (fixture)
    record_unet,
    seeded,
    seeded_list,
    tiny_pipeline,
    trained_scheduler_config,
)

from diffusers_cfg.pipelines import ClassConditionalPipeline

pytestmark = pytest.mark.usefixtures("one_thread")

# A short training schedule, so that sampling with every training timestep stays fast.
TRAIN_STEPS = 30
STEP_COUNTS = (1, 2, 3, 7, TRAIN_STEPS)
# Schedulers that diffusers lists as compatible but that cannot sample a UNet trained on a discrete noise schedule.
REJECTED = {"EDMEulerScheduler": "does not sample on the UNet's training noise schedule"}
# Schedulers that draw fresh noise at every step: name, scheduler settings, and call arguments.
STOCHASTIC = {
    "DDPMScheduler": ({}, {}),
    "DDIMScheduler": ({}, {"eta": 1.0}),
    "EulerAncestralDiscreteScheduler": ({}, {}),
    "KDPM2AncestralDiscreteScheduler": ({}, {}),
    "DPMSolverMultistepScheduler": ({"algorithm_type": "sde-dpmsolver++"}, {}),
    "DPMSolverSDEScheduler": ({}, {}),
}

SCHEDULER_NAMES = [cls.__name__ for cls in compatible_scheduler_classes()]


def scheduler_class(name: str) -> type:
    scheduler_cls = getattr(diffusers, name)
    reason = missing_requirement(scheduler_cls)
    if reason:
        pytest.skip(reason)
    return scheduler_cls


def diffusers_computes_nan_timesteps(scheduler, num_inference_steps: int) -> bool:
    """Whether diffusers itself computes non-finite timesteps for this scheduler and step count."""
    copy = scheduler.__class__.from_config(scheduler.config)
    try:
        copy.set_timesteps(num_inference_steps)
    except ValueError:
        return False  # PNDM's warm-up with too few steps, which the pipeline works around
    return not bool(torch.isfinite(copy.timesteps).all())


def sample_every_step_count(pipe):
    for num_inference_steps in STEP_COUNTS:
        if diffusers_computes_nan_timesteps(pipe.scheduler, num_inference_steps):
            with pytest.raises(ValueError, match="computed non-finite timesteps"):
                pipe([0], guidance_scale=2.0, num_inference_steps=num_inference_steps, output_type="pt")
            continue
        images = pipe([0, 2], guidance_scale=2.0, num_inference_steps=num_inference_steps, generator=seeded(0),
                      output_type="pt").images  # fmt: skip
        assert images.shape == (2, 1, 8, 8), f"{num_inference_steps} steps"
        assert torch.isfinite(images).all(), f"{num_inference_steps} steps"


# ---------------------------------------------------------------------------------------------------------------------
# Every compatible scheduler, every step count
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_scheduler_defaults_sample_any_step_count(name):
    scheduler_cls = scheduler_class(name)
    pipe = tiny_pipeline(scheduler_cls(num_train_timesteps=TRAIN_STEPS))
    if name in REJECTED:
        with pytest.raises(ValueError, match=REJECTED[name]):
            pipe([0], num_inference_steps=2)
        return
    sample_every_step_count(pipe)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_scheduler_trained_settings_sample_any_step_count(name):
    scheduler_class(name)
    pipe = tiny_pipeline(num_train_timesteps=TRAIN_STEPS)
    if name in REJECTED:
        with pytest.raises(ValueError, match=REJECTED[name]):
            pipe.set_scheduler(name)
        return
    pipe.set_scheduler(name)
    assert pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    sample_every_step_count(pipe)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_too_many_steps_is_the_same_error(name):
    scheduler_cls = scheduler_class(name)
    pipe = tiny_pipeline(scheduler_cls(num_train_timesteps=TRAIN_STEPS))
    recorder = record_unet(pipe)
    expected = f"num_inference_steps must be an int in [1, {TRAIN_STEPS}] (the training step count), got {TRAIN_STEPS + 1}"
    with pytest.raises(ValueError) as error:
        pipe([0], num_inference_steps=TRAIN_STEPS + 1)
    assert str(error.value) == expected
    assert recorder.calls == []


@pytest.mark.parametrize(("steps", "error"), [(0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError),
                                              ("4", TypeError)])  # fmt: skip
def test_invalid_step_count_is_rejected(steps, error):
    pipe = tiny_pipeline()
    with pytest.raises(error, match=r"num_inference_steps must be an int in \[1, 100\]"):
        pipe([0], num_inference_steps=steps)


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "DEISMultistepScheduler",
                                  "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler"])  # fmt: skip
def test_every_training_step_is_visited_once(name):
    # diffusers' "linspace" spacing rounds two of these steps to one timestep when steps = num_train_timesteps.
    pipe = tiny_pipeline(num_train_timesteps=TRAIN_STEPS)
    pipe.set_scheduler(name)
    recorder = record_unet(pipe)
    pipe([0], guidance_scale=1.0, num_inference_steps=TRAIN_STEPS, generator=seeded(0), output_type="pt")
    timesteps = [int(call["timestep"][0]) for call in recorder.calls]
    assert timesteps == list(range(TRAIN_STEPS - 1, -1, -1))


def test_non_finite_schedule_is_rejected(monkeypatch):
    set_timesteps = DDIMScheduler.set_timesteps

    def broken_set_timesteps(self, *args, **kwargs):
        set_timesteps(self, *args, **kwargs)
        self.timesteps = self.timesteps.float()
        self.timesteps[1] = float("nan")

    monkeypatch.setattr(DDIMScheduler, "set_timesteps", broken_set_timesteps)
    pipe = tiny_pipeline()
    recorder = record_unet(pipe)
    with pytest.raises(ValueError, match="DDIMScheduler computed non-finite timesteps for num_inference_steps=3"):
        pipe([0], num_inference_steps=3)
    assert recorder.calls == []


def test_kdpm2_ancestral_cosine_failure_is_explained():
    # diffusers 0.42.1 computes NaN timesteps here (float32 cancellation when sigma_max / sigma_next is huge).
    pipe = tiny_pipeline(num_train_timesteps=TRAIN_STEPS)
    pipe.set_scheduler("KDPM2AncestralDiscreteScheduler")
    if not diffusers_computes_nan_timesteps(pipe.scheduler, 2):
        pytest.skip("this diffusers version computes a finite KDPM2 ancestral schedule here")
    with pytest.raises(ValueError, match="use more steps, timestep_spacing='leading', or another scheduler"):
        pipe([0], num_inference_steps=2)
    pipe.set_scheduler("KDPM2AncestralDiscreteScheduler", timestep_spacing="leading")
    assert torch.isfinite(pipe([0], num_inference_steps=2, generator=seeded(0), output_type="pt").images).all()


# ---------------------------------------------------------------------------------------------------------------------
# A known answer: exact denoisers of Gaussian data
# ---------------------------------------------------------------------------------------------------------------------

GAUSSIANS = dict(means=[0.5, -0.3, 0.1], stds=[0.3, 0.6, 0.8])
# Steps for about 0.03 of largest error per pixel: first-order solvers need more.
DETERMINISTIC = {
    "DDIMScheduler": 200,
    "EulerDiscreteScheduler": 200,
    "DPMSolverMultistepScheduler": 60,
    "HeunDiscreteScheduler": 40,
    "UniPCMultistepScheduler": 60,
}


def gaussian_pipeline(name: str) -> ClassConditionalPipeline:
    training = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    pipe = ClassConditionalPipeline(unet=GaussianDenoiser(**GAUSSIANS), scheduler=training)
    pipe.set_progress_bar_config(disable=True)
    pipe.set_scheduler(name)
    return pipe


def test_deterministic_schedulers_reach_the_exact_answer():
    noise = torch.randn(64, 1, 8, 8, generator=seeded(0))
    alpha_bar_start = float(DDPMScheduler(num_train_timesteps=1000).alphas_cumprod[-1])
    for label, scale in ((0, 1.0), (1, 1.0), (0, 0.0)):
        mean_index = label if scale == 1.0 else 2  # s = 0 samples the null label's distribution
        mean, std = GAUSSIANS["means"][mean_index], GAUSSIANS["stds"][mean_index]
        exact = exact_gaussian_sample(noise, mean, std, alpha_bar_start).float()
        samples = {}
        for name, steps in DETERMINISTIC.items():
            pipe = gaussian_pipeline(name)
            samples[name] = final_latents(pipe, [label] * 64, guidance_scale=scale, num_inference_steps=steps,
                                          latents=noise)  # fmt: skip
            case = f"{name}, label {label}, s = {scale}"
            assert (samples[name] - exact).abs().max() < 0.035, case
            assert abs(samples[name].mean() - mean) < 0.03, case
            assert abs(samples[name].std() / std - 1) < 0.05, case
        for first, second in itertools.combinations(samples, 2):
            assert (samples[first] - samples[second]).abs().max() < 0.05, f"{first} and {second}"


@pytest.mark.parametrize("fault", ["no scale_model_input", "no init_noise_sigma"])
def test_known_answer_catches_contract_faults(monkeypatch, fault):
    # The known-answer test must fail for a loop that breaks the scheduler contract; these reproduce such loops.
    if fault == "no scale_model_input":
        monkeypatch.setattr(EulerDiscreteScheduler, "scale_model_input", lambda self, sample, timestep: sample)
    else:
        monkeypatch.setattr(EulerDiscreteScheduler, "init_noise_sigma", 1.0)
    pipe = gaussian_pipeline("EulerDiscreteScheduler")
    noise = torch.randn(8, 1, 8, 8, generator=seeded(0))
    exact = exact_gaussian_sample(noise, 0.5, 0.3, float(pipe.scheduler.alphas_cumprod[-1])).float()
    latents = final_latents(pipe, [0] * 8, guidance_scale=1.0, num_inference_steps=50, latents=noise)
    assert (latents - exact).abs().max() > 0.2


# ---------------------------------------------------------------------------------------------------------------------
# State between calls, and randomness per image
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
                                  "PNDMScheduler", "LMSDiscreteScheduler", "HeunDiscreteScheduler"])  # fmt: skip
def test_calls_in_a_row_equal_fresh_pipelines(name):
    def fresh():
        pipe = tiny_pipeline()
        pipe.set_scheduler(name)
        return pipe

    pipe = fresh()
    first = pipe([0, 1, 2], guidance_scale=2.0, num_inference_steps=5, generator=seeded(1), output_type="pt").images
    second = pipe([1], guidance_scale=2.0, num_inference_steps=5, generator=seeded(2), output_type="pt").images

    expected_first = fresh()([0, 1, 2], guidance_scale=2.0, num_inference_steps=5, generator=seeded(1),
                             output_type="pt").images  # fmt: skip
    expected_second = fresh()([1], guidance_scale=2.0, num_inference_steps=5, generator=seeded(2),
                              output_type="pt").images  # fmt: skip
    torch.testing.assert_close(first, expected_first, atol=0, rtol=0)
    torch.testing.assert_close(second, expected_second, atol=0, rtol=0)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_image_depends_only_on_its_generator(name):
    scheduler_class(name)
    if name in REJECTED:
        pytest.skip(f"{name} is rejected by the pipeline")
    settings, step_options = STOCHASTIC.get(name, ({}, {}))
    pipe = tiny_pipeline()
    pipe.set_scheduler(name, **settings)

    def sample(labels, seeds):
        return final_latents(pipe, labels, guidance_scale=2.0, num_inference_steps=4, generator=seeded_list(seeds),
                             **step_options)  # fmt: skip

    # Batches of other sizes round differently in float32: a relative tolerance of 1e-4 allows for that.
    batch = sample([0, 1, 2], [20, 21, 22])
    torch.testing.assert_close(sample([1], [21])[0], batch[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sample([2, 0, 1, 1], [22, 5, 6, 21])[[0, 3]], batch[[2, 1]], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(STOCHASTIC))
def test_stochastic_schedulers_follow_the_generator(name):
    scheduler_class(name)
    settings, step_options = STOCHASTIC[name]
    pipe = tiny_pipeline()
    pipe.set_scheduler(name, **settings)
    noise = torch.randn(2, 1, 8, 8, generator=seeded(0))

    def sample(seed):
        return final_latents(pipe, [0, 1], guidance_scale=2.0, num_inference_steps=4, generator=seeded(seed),
                             latents=noise, **step_options)  # fmt: skip

    # Same starting noise: only the noise drawn during the steps differs between seeds.
    torch.testing.assert_close(sample(3), sample(3), atol=0, rtol=0)
    assert not torch.allclose(sample(3), sample(4), atol=1e-4)


def test_generator_list_of_wrong_length_is_rejected():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="generator is a list of 2 generators for a batch of 3 images"):
        pipe([0, 1, 2], num_inference_steps=2, generator=seeded_list([1, 2]))


# ---------------------------------------------------------------------------------------------------------------------
# Scheduler settings that cannot work, and swaps that keep the training settings
# ---------------------------------------------------------------------------------------------------------------------


def test_zero_terminal_snr_with_epsilon_is_rejected():
    scheduler = DDIMScheduler.from_config(trained_scheduler_config(), rescale_betas_zero_snr=True)
    pipe = tiny_pipeline(scheduler)
    with pytest.raises(ValueError, match="at zero terminal SNR the input holds no signal") as error:
        pipe([0], num_inference_steps=2)
    assert "v_prediction" in str(error.value)


@pytest.mark.parametrize("clip_sample", [False, True])
def test_zero_terminal_snr_with_v_prediction_samples(clip_sample):
    training = trained_scheduler_config(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    scheduler = DDIMScheduler.from_config(training, timestep_spacing="trailing")
    assert float(scheduler.alphas_cumprod[-1]) == 0.0
    pipe = tiny_pipeline(scheduler)
    images = pipe([0, 1], guidance_scale=3.0, num_inference_steps=5, generator=seeded(0), output_type="pt",
                  clip_sample=clip_sample, guidance_interval=(0.1, 1e9)).images  # fmt: skip
    assert torch.isfinite(images).all()


def test_set_scheduler_keeps_training_settings():
    training = DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction", clip_sample=False)
    pipe = tiny_pipeline(training)
    # Heun's own defaults differ: beta_start 0.00085 and beta_end 0.012.
    plain = HeunDiscreteScheduler.from_config(training.config)
    assert plain.config.beta_end != training.config.beta_end, "from_config no longer drops default settings"

    heun = pipe.set_scheduler("HeunDiscreteScheduler", use_karras_sigmas=True)

    assert pipe.scheduler is heun
    assert heun.config.use_karras_sigmas is True
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"):
        assert heun.config[key] == training.config[key], key
    torch.testing.assert_close(heun.alphas_cumprod, training.alphas_cumprod)


def test_set_scheduler_accepts_a_class():
    pipe = tiny_pipeline()
    assert isinstance(pipe.set_scheduler(EulerDiscreteScheduler), EulerDiscreteScheduler)


@pytest.mark.parametrize("override", [{"beta_schedule": "linear"}, {"prediction_type": "sample"},
                                      {"num_train_timesteps": 50}, {"rescale_betas_zero_snr": True}])  # fmt: skip
def test_set_scheduler_rejects_training_overrides(override):
    pipe = tiny_pipeline()
    key = next(iter(override))
    with pytest.raises(ValueError, match=f"set_scheduler cannot override \\['{key}'\\]"):
        pipe.set_scheduler("EulerDiscreteScheduler", **override)
    assert isinstance(pipe.scheduler, DDIMScheduler)


def test_set_scheduler_rejects_incompatible_class():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="'LCMScheduler' is not compatible with DDIMScheduler; choose one of"):
        pipe.set_scheduler("LCMScheduler")


def test_scheduler_that_lost_training_settings_is_rejected():
    training = DDPMScheduler(num_train_timesteps=100, clip_sample=False)
    pipe = tiny_pipeline(training)
    pipe.scheduler = HeunDiscreteScheduler.from_config(training.config)
    recorder = record_unet(pipe)
    with pytest.raises(ValueError, match="beta_start=0.0001 became 0.00085") as error:
        pipe([0], num_inference_steps=2)
    assert "pipe.set_scheduler('HeunDiscreteScheduler')" in str(error.value)
    assert recorder.calls == []


def test_scheduler_keeping_training_settings_is_accepted():
    pipe = tiny_pipeline()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    assert torch.isfinite(pipe([0], num_inference_steps=2, generator=seeded(0), output_type="pt").images).all()


def test_pndm_below_warm_up_length_samples():
    pipe = tiny_pipeline(num_train_timesteps=TRAIN_STEPS)
    pipe.set_scheduler("PNDMScheduler")
    assert pipe.scheduler.config.skip_prk_steps is False
    images = pipe([0], num_inference_steps=2, generator=seeded(0), output_type="pt").images
    assert torch.isfinite(images).all()
    assert pipe.scheduler.config.skip_prk_steps is False, "the pipeline's own scheduler must not change"


def test_dpm_solver_sde_uses_generator_seeds():
    scheduler_class("DPMSolverSDEScheduler")
    pipe = tiny_pipeline()
    pipe.set_scheduler("DPMSolverSDEScheduler")
    noise = torch.randn(2, 1, 8, 8, generator=seeded(0))
    # Its Brownian noise must come from the generator, not from torch's global random state.
    torch.manual_seed(0)
    first = final_latents(pipe, [0, 1], num_inference_steps=3, latents=noise, generator=seeded(9))
    torch.manual_seed(1)
    second = final_latents(pipe, [0, 1], num_inference_steps=3, latents=noise, generator=seeded(9))
    torch.testing.assert_close(first, second, atol=0, rtol=0)
