"""Classifier-free guidance in ClassConditionalPipeline: the scale convention, the number of UNet rows it costs,
rescaling, the guidance interval, negative labels, and clipping that stays consistent under guidance.

Convention: eps = eps_null + s * (eps_label - eps_null), so s = 0 is unconditional and s = 1 conditional sampling.
"""

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)
from pipeline_helpers import (
    NUM_CLASSES,
    GaussianDenoiser,
    final_latents,
    manual_sample,
    one_thread,  # noqa: F401 (fixture)
    record_steps,
    record_unet,
    seeded,
    seeded_list,
    tiny_pipeline,
    trained_scheduler_config,
)

from diffusers_cfg.pipelines import ClassConditionalPipeline
from diffusers_cfg.pipelines.pipeline_class_conditional import (
    predict_x0,
    prediction_from_x0,
    rescale_guided_prediction,
)

pytestmark = pytest.mark.usefixtures("one_thread")

NULL = NUM_CLASSES
LABELS = [2, 0, 1]
STEPS = 4


def noise_for(batch_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch_size, 1, 8, 8, generator=seeded(seed))


def pipeline_with(scheduler_cls, **overrides) -> ClassConditionalPipeline:
    return tiny_pipeline(scheduler_cls.from_config(trained_scheduler_config(), **overrides))


# ---------------------------------------------------------------------------------------------------------------------
# s = 0, s = 1 and everything between
# ---------------------------------------------------------------------------------------------------------------------


def test_scale_one_equals_conditional_loop():
    # Euler scales the starting noise and every model input, so a pipeline that skips either would differ.
    pipe = pipeline_with(EulerDiscreteScheduler)
    noise = noise_for(3)
    expected = manual_sample(pipe.unet, EulerDiscreteScheduler.from_config(pipe.scheduler.config),
                             torch.tensor(LABELS), noise, STEPS)  # fmt: skip
    recorder = record_unet(pipe)

    latents = final_latents(pipe, LABELS, guidance_scale=1.0, num_inference_steps=STEPS, latents=noise)

    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=1e-5)
    assert recorder.rows == [3] * STEPS
    for call in recorder.calls:
        assert call["class_labels"].tolist() == LABELS


def test_scale_zero_equals_null_label_loop():
    pipe = pipeline_with(DDIMScheduler)
    noise = noise_for(3)
    null_labels = torch.full((3,), NULL)
    expected = manual_sample(pipe.unet, DDIMScheduler.from_config(pipe.scheduler.config), null_labels, noise, STEPS)
    recorder = record_unet(pipe)

    latents = final_latents(pipe, LABELS, guidance_scale=0.0, num_inference_steps=STEPS, latents=noise)

    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=1e-5)
    assert recorder.rows == [3] * STEPS
    for call in recorder.calls:
        assert call["class_labels"].tolist() == [NULL] * 3


def test_guided_scale_equals_two_pass_loop():
    pipe = pipeline_with(DDIMScheduler)
    noise = noise_for(3)
    expected = manual_sample(pipe.unet, DDIMScheduler.from_config(pipe.scheduler.config), torch.tensor(LABELS), noise,
                             STEPS, null_labels=torch.full((3,), NULL), guidance_scale=3.0)  # fmt: skip

    latents = final_latents(pipe, LABELS, guidance_scale=3.0, num_inference_steps=STEPS, latents=noise)

    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=1e-5)


def test_guided_scale_runs_one_pass_of_2b_rows(monkeypatch):
    pipe = pipeline_with(DDIMScheduler)
    recorder = record_unet(pipe)
    model_outputs = record_steps(monkeypatch, DDIMScheduler)

    pipe(LABELS, guidance_scale=2.5, num_inference_steps=STEPS, generator=seeded(0), output_type="pt")

    assert recorder.rows == [6] * STEPS
    for call, model_output in zip(recorder.calls, model_outputs, strict=True):
        assert call["class_labels"].tolist() == LABELS + [NULL] * 3
        assert torch.equal(call["sample"][:3], call["sample"][3:])
        conditional, unconditional = call["output"][:3], call["output"][3:]
        torch.testing.assert_close(model_output, unconditional + 2.5 * (conditional - unconditional))


@pytest.mark.parametrize("scale", [0.25, 0.75])
def test_scale_between_zero_and_one_interpolates(monkeypatch, scale):
    pipe = pipeline_with(DDIMScheduler)
    recorder = record_unet(pipe)
    model_outputs = record_steps(monkeypatch, DDIMScheduler)

    pipe(LABELS, guidance_scale=scale, num_inference_steps=STEPS, generator=seeded(0), output_type="pt")

    for call, model_output in zip(recorder.calls, model_outputs, strict=True):
        conditional, unconditional = call["output"][:3], call["output"][3:]
        torch.testing.assert_close(model_output, (1 - scale) * unconditional + scale * conditional)


def test_one_step_samples_interpolate_linearly():
    # One DDIM step is affine in the model output, so the sample at s lies on the line between those at 0 and 1.
    pipe = pipeline_with(DDIMScheduler)
    noise = noise_for(3)
    at = {
        scale: final_latents(pipe, LABELS, guidance_scale=scale, num_inference_steps=1, latents=noise)
        for scale in (0.0, 0.4, 1.0)
    }
    assert not torch.allclose(at[0.0], at[1.0], atol=1e-3)
    torch.testing.assert_close(at[0.4], 0.6 * at[0.0] + 0.4 * at[1.0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_per_image_scales_equal_separate_calls(as_tensor):
    pipe = pipeline_with(DDIMScheduler)
    scales = [0.0, 1.0, 3.0]
    batched = pipe(LABELS, guidance_scale=torch.tensor(scales) if as_tensor else scales, num_inference_steps=STEPS,
                   generator=seeded_list([10, 11, 12]), output_type="pt").images  # fmt: skip

    for index, (label, scale) in enumerate(zip(LABELS, scales, strict=True)):
        alone = pipe([label], guidance_scale=scale, num_inference_steps=STEPS, generator=[seeded(10 + index)],
                     output_type="pt").images  # fmt: skip
        torch.testing.assert_close(batched[index], alone[0], atol=1e-5, rtol=1e-5)


def test_scales_of_zero_and_one_need_one_pass():
    pipe = pipeline_with(DDIMScheduler)
    recorder = record_unet(pipe)

    pipe(LABELS, guidance_scale=[0.0, 1.0, 0.0], num_inference_steps=STEPS, generator=seeded(0), output_type="pt")

    assert recorder.rows == [3] * STEPS
    for call in recorder.calls:
        assert call["class_labels"].tolist() == [NULL, LABELS[1], NULL]


def test_unconditional_call_equals_scale_zero():
    pipe = pipeline_with(DDIMScheduler)
    unconditional = pipe(None, batch_size=3, num_inference_steps=STEPS, generator=seeded(5), output_type="pt").images
    for labels in ([0, 0, 0], LABELS):
        at_zero = pipe(labels, guidance_scale=0.0, num_inference_steps=STEPS, generator=seeded(5),
                       output_type="pt").images  # fmt: skip
        torch.testing.assert_close(unconditional, at_zero, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Guidance rescale, interval and negative labels
# ---------------------------------------------------------------------------------------------------------------------


def test_rescale_formula_on_hand_case():
    guided = torch.tensor([0.0, 2.0, 4.0, 6.0]).view(1, 1, 2, 2)
    conditional = torch.tensor([1.0, 1.0, 3.0, 3.0]).view(1, 1, 2, 2)
    # Standard deviations (n - 1 denominator): guided sqrt(20 / 3), conditional sqrt(4 / 3), a ratio of 1 / sqrt(5).
    # The rescaled prediction guided / sqrt(5) is mixed with guided in the proportion 0.7 : 0.3.
    expected = guided * (0.7 / math.sqrt(5) + 0.3)

    torch.testing.assert_close(rescale_guided_prediction(guided, conditional, 0.7), expected)
    torch.testing.assert_close(rescale_guided_prediction(guided, conditional, 0.0), guided)


def test_rescale_of_constant_prediction_stays_finite():
    guided = torch.full((1, 1, 2, 2), 3.0)
    conditional = torch.tensor([1.0, 1.0, 3.0, 3.0]).view(1, 1, 2, 2)
    torch.testing.assert_close(rescale_guided_prediction(guided, conditional, 1.0), guided)


def test_pipeline_applies_guidance_rescale(monkeypatch):
    pipe = pipeline_with(DDIMScheduler)
    recorder = record_unet(pipe)
    model_outputs = record_steps(monkeypatch, DDIMScheduler)

    pipe(LABELS, guidance_scale=[4.0, 0.0, 2.0], guidance_rescale=0.6, num_inference_steps=STEPS,
         generator=seeded(0), output_type="pt")  # fmt: skip

    scale = torch.tensor([4.0, 0.0, 2.0]).view(3, 1, 1, 1)
    for call, model_output in zip(recorder.calls, model_outputs, strict=True):
        conditional, unconditional = call["output"][:3], call["output"][3:]
        guided = unconditional + scale * (conditional - unconditional)
        ratio = conditional.std(dim=(1, 2, 3), keepdim=True) / guided.std(dim=(1, 2, 3), keepdim=True)
        expected = 0.6 * guided * ratio + 0.4 * guided
        torch.testing.assert_close(model_output[[0, 2]], expected[[0, 2]])
        # The image at s = 0 asked for the unconditional prediction: nothing to rescale.
        torch.testing.assert_close(model_output[1], unconditional[1])


def test_guidance_interval_guides_inside_only():
    pipe = pipeline_with(DDIMScheduler)
    recorder = record_unet(pipe)
    low, high = 0.5, 3.0
    steps = 10

    pipe(LABELS, guidance_scale=3.0, guidance_interval=(low, high), num_inference_steps=steps,
         generator=seeded(0), output_type="pt")  # fmt: skip

    alphas_cumprod = pipe.scheduler.alphas_cumprod.double()
    inside = 0
    for call in recorder.calls:
        a_t = alphas_cumprod[int(call["timestep"][0])]
        sigma = math.sqrt((1 - a_t) / a_t)
        if low < sigma <= high:
            inside += 1
            assert len(call["class_labels"]) == 6, f"sigma {sigma:.3f} lies inside the interval"
            assert call["class_labels"].tolist() == LABELS + [NULL] * 3
        else:
            assert call["class_labels"].tolist() == LABELS, f"sigma {sigma:.3f} lies outside the interval"
    assert 0 < inside < steps
    assert sum(recorder.rows) < 2 * 3 * steps


def test_guidance_interval_keeps_unconditional_images():
    # Outside the interval an image sampled at s = 0 keeps its null label, so per-image scales still equal separate
    # calls.
    pipe = pipeline_with(DDIMScheduler)
    recorder = record_unet(pipe)
    options = dict(guidance_interval=(0.5, 3.0), num_inference_steps=10, output_type="pt")
    batched = pipe([1, 2], guidance_scale=[0.0, 3.0], generator=seeded_list([3, 4]), **options).images

    single_passes = [call for call in recorder.calls if len(call["class_labels"]) == 2]
    assert single_passes
    assert all(call["class_labels"].tolist() == [NULL, 2] for call in single_passes)
    unconditional = pipe([1], guidance_scale=0.0, generator=[seeded(3)], **options).images
    guided = pipe([2], guidance_scale=3.0, generator=[seeded(4)], **options).images
    torch.testing.assert_close(batched, torch.cat([unconditional, guided]), atol=1e-5, rtol=1e-5)


def test_negative_labels_replace_null_label(monkeypatch):
    pipe = pipeline_with(DDIMScheduler)
    plain = pipe(LABELS, guidance_scale=3.0, num_inference_steps=STEPS, generator=seeded(0), output_type="pt").images
    recorder = record_unet(pipe)
    model_outputs = record_steps(monkeypatch, DDIMScheduler)
    negative = [1, 2, 0]

    steered = pipe(LABELS, guidance_scale=3.0, negative_class_labels=negative, num_inference_steps=STEPS,
                   generator=seeded(0), output_type="pt").images  # fmt: skip

    assert not torch.allclose(plain, steered, atol=1e-4)
    for call, model_output in zip(recorder.calls, model_outputs, strict=True):
        assert call["class_labels"].tolist() == LABELS + negative
        conditional, away_from = call["output"][:3], call["output"][3:]
        torch.testing.assert_close(model_output, away_from + 3.0 * (conditional - away_from))


def test_negative_labels_need_labels_and_count():
    pipe = pipeline_with(DDIMScheduler)
    with pytest.raises(ValueError, match="negative_class_labels has 2 labels for 3 images"):
        pipe(LABELS, negative_class_labels=[0, 1], num_inference_steps=2)
    with pytest.raises(ValueError, match="negative_class_labels needs class_labels"):
        pipe(None, negative_class_labels=[0], num_inference_steps=2)


# ---------------------------------------------------------------------------------------------------------------------
# Clipping under guidance
#
# Data of the requested class ~ N(0.8, 0.1^2), null label ~ N(0, 0.5^2): guidance at s = 4 pushes the x_0 estimate
# far above 1 at high noise, although the guided samples end near 0.83, inside [-1, 1]. Clipping x_0 must then leave
# the samples close to the unclipped ones. DDIM's own clipping steps with the unclipped noise prediction, and its
# samples flip to the other end of the range.
# ---------------------------------------------------------------------------------------------------------------------

CLIP_CASE = dict(means=[0.8, 0.0, 0.0], stds=[0.1, 1.0, 0.5])
CLIP_SCALE = 4.0


def clip_case_pipeline(scheduler) -> ClassConditionalPipeline:
    pipe = ClassConditionalPipeline(unet=GaussianDenoiser(**CLIP_CASE), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("clipping", [{"clip_sample": True}, {"thresholding": True}], ids=["clip_sample", "thresholding"])
def test_ddim_clipping_stays_consistent_under_guidance(clipping):
    scheduler = DDIMScheduler(num_train_timesteps=1000, **clipping)
    pipe = clip_case_pipeline(scheduler)
    noise = noise_for(16)
    labels, null_labels = torch.zeros(16, dtype=torch.long), torch.full((16,), 2)

    ours = final_latents(pipe, [0] * 16, guidance_scale=CLIP_SCALE, num_inference_steps=25, latents=noise)
    diffusers_clipping = manual_sample(pipe.unet, DDIMScheduler.from_config(scheduler.config), labels, noise, 25,
                                       null_labels=null_labels, guidance_scale=CLIP_SCALE)  # fmt: skip
    unclipped = manual_sample(pipe.unet, DDIMScheduler.from_config(scheduler.config, clip_sample=False,
                                                                   thresholding=False),
                              labels, noise, 25, null_labels=null_labels, guidance_scale=CLIP_SCALE)  # fmt: skip

    assert 0.7 < unclipped.mean() < 0.95, "the case no longer has guided samples inside [-1, 1]"
    assert abs(ours.mean() - unclipped.mean()) < 0.03
    assert ours.min() >= -1
    assert ours.max() <= 1
    assert diffusers_clipping.mean() < 0, "diffusers' DDIM clipping no longer drifts: the case lost its point"


def test_clip_sample_argument_overrides_config():
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=True)
    pipe = clip_case_pipeline(scheduler)
    noise = noise_for(4)
    clipped = final_latents(pipe, [0] * 4, guidance_scale=CLIP_SCALE, num_inference_steps=10, latents=noise)
    unclipped = final_latents(pipe, [0] * 4, guidance_scale=CLIP_SCALE, num_inference_steps=10, latents=noise,
                              clip_sample=False)  # fmt: skip
    reference = clip_case_pipeline(DDIMScheduler(num_train_timesteps=1000, clip_sample=False))
    torch.testing.assert_close(unclipped, final_latents(reference, [0] * 4, guidance_scale=CLIP_SCALE,
                                                        num_inference_steps=10, latents=noise))  # fmt: skip
    assert not torch.allclose(clipped, unclipped, atol=1e-3)


def test_clip_sample_true_clips_euler():
    # EulerDiscreteScheduler has no clipping of its own. With clip_sample=True the pipeline clips its x_0 estimates,
    # and Euler's last step lands on the last estimate. Data ~ N(0.9, 0.3^2) often lies above 1.
    pipe = ClassConditionalPipeline(unet=GaussianDenoiser(means=[0.9, 0.0, 0.0], stds=[0.3, 1.0, 0.5]),
                                    scheduler=EulerDiscreteScheduler(num_train_timesteps=1000))  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    noise = noise_for(4)
    clipped = final_latents(pipe, [0] * 4, guidance_scale=1.0, num_inference_steps=10, latents=noise, clip_sample=True)
    free = final_latents(pipe, [0] * 4, guidance_scale=1.0, num_inference_steps=10, latents=noise)
    assert free.max() > 1.1, "the case no longer leaves [-1, 1] without clipping"
    assert clipped.abs().max() <= 1.0 + 1e-5


@pytest.mark.parametrize("clipping", [{"clip_sample": True}, {"thresholding": True}], ids=["clip_sample", "thresholding"])
def test_ddpm_clipping_equals_diffusers(clipping):
    # DDPM's posterior mean is computed from the clipped x_0, so its own clipping is consistent: ours must match it.
    scheduler = DDPMScheduler(num_train_timesteps=1000, **clipping)
    pipe = clip_case_pipeline(scheduler)
    noise = noise_for(4)
    ours = final_latents(pipe, [0] * 4, guidance_scale=CLIP_SCALE, num_inference_steps=20, latents=noise,
                         generator=seeded(7))  # fmt: skip

    reference = DDPMScheduler.from_config(scheduler.config)
    reference.set_timesteps(20)
    latents = noise.double()
    generator = seeded(7)
    labels, null_labels = torch.zeros(4, dtype=torch.long), torch.full((4,), 2)
    for t in reference.timesteps:
        conditional = pipe.unet(latents, t, class_labels=labels).sample
        unconditional = pipe.unet(latents, t, class_labels=null_labels).sample
        guided = unconditional + CLIP_SCALE * (conditional - unconditional)
        latents = reference.step(guided.float(), t, latents.float(), generator=generator).prev_sample.double()

    torch.testing.assert_close(ours, latents.float(), atol=1e-4, rtol=1e-4)


def test_dpm_solver_thresholding_equals_diffusers():
    # DPM-Solver++ thresholds its x_0 estimate and steps with it alone, so its own thresholding is consistent too.
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, thresholding=True)
    pipe = clip_case_pipeline(scheduler)
    noise = noise_for(4)
    ours = final_latents(pipe, [0] * 4, guidance_scale=CLIP_SCALE, num_inference_steps=15, latents=noise)
    reference = manual_sample(pipe.unet, DPMSolverMultistepScheduler.from_config(scheduler.config),
                              torch.zeros(4, dtype=torch.long), noise.double(), 15,
                              null_labels=torch.full((4,), 2), guidance_scale=CLIP_SCALE)  # fmt: skip
    torch.testing.assert_close(ours, reference.float(), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# Conversions between prediction types
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("alpha_bar", [0.999, 0.5, 1e-3])
def test_x0_conversions_round_trip(prediction_type, alpha_bar):
    generator = seeded(0)
    x_t = torch.randn(2, 1, 4, 4, generator=generator, dtype=torch.float64)
    model_output = torch.randn(2, 1, 4, 4, generator=generator, dtype=torch.float64)
    a_t = torch.tensor(alpha_bar, dtype=torch.float64)

    x0 = predict_x0(model_output, x_t, a_t, prediction_type)
    torch.testing.assert_close(prediction_from_x0(x0, x_t, a_t, prediction_type), model_output)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predict_x0_matches_ddim(prediction_type):
    scheduler = DDIMScheduler(num_train_timesteps=100, prediction_type=prediction_type, clip_sample=False)
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[3]
    generator = seeded(1)
    x_t, model_output = torch.randn(2, 1, 4, 4, generator=generator), torch.randn(2, 1, 4, 4, generator=generator)

    expected = scheduler.step(model_output, t, x_t).pred_original_sample
    torch.testing.assert_close(predict_x0(model_output, x_t, scheduler.alphas_cumprod[t], prediction_type), expected)


def test_predict_x0_rejects_unknown_type():
    with pytest.raises(ValueError, match="'flow' is not supported"):
        predict_x0(torch.zeros(1), torch.zeros(1), torch.tensor(0.5), "flow")
