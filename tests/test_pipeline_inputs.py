"""Invalid arguments of ClassConditionalPipeline.__call__ and set_scheduler: each one raises TypeError (wrong type) or
ValueError (wrong value) before any UNet call, with a message that names the argument and the value received."""

import logging

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from pipeline_helpers import (
    NUM_CLASSES,
    one_thread,  # noqa: F401 (fixture)
    record_unet,
    seeded,
    seeded_list,
    tiny_pipeline,
)

pytestmark = pytest.mark.usefixtures("one_thread")

NAN = float("nan")
INF = float("inf")


@pytest.fixture
def pipe():
    return tiny_pipeline()


# Each case: id, the arguments that differ from two labeled images in 2 steps, the exception, the argument that the
# message must name, and how the message must show the value received.
CALL_CASES = [
    ("labels-empty-tensor", {"class_labels": torch.tensor([], dtype=torch.long)}, ValueError, "class_labels",
     "tensor([]"),
    ("labels-empty-list", {"class_labels": []}, ValueError, "class_labels", "[]"),
    ("labels-set", {"class_labels": {1, 2}}, TypeError, "class_labels", "{1, 2}"),
    ("labels-bytes", {"class_labels": b"one"}, TypeError, "class_labels", "b'one'"),
    ("labels-float", {"class_labels": 1.0}, TypeError, "class_labels", "1.0"),
    ("labels-numpy-2d-names", {"class_labels": np.array([["one"], ["two"]])}, ValueError, "class_labels", "(2, 1)"),
    ("labels-numpy-bool", {"class_labels": np.array([True, False])}, TypeError, "class_labels", "torch.bool"),
    ("labels-numpy-unknown-name", {"class_labels": np.array(["one", "seven"])}, ValueError, "class_labels",
     "'seven'"),
    ("negative-empty", {"negative_class_labels": []}, ValueError, "negative_class_labels", "[]"),
    ("negative-float", {"negative_class_labels": [0, 2.5]}, TypeError, "negative_class_labels", "2.5"),
    ("negative-unknown-name", {"negative_class_labels": ["one", "seven"]}, ValueError, "negative_class_labels",
     "'seven'"),
    ("negative-out-of-range", {"negative_class_labels": [0, NUM_CLASSES]}, ValueError, "negative_class_labels",
     f"[{NUM_CLASSES}]"),
    ("negative-count", {"negative_class_labels": [0, 1, 2]}, ValueError, "negative_class_labels", "3 labels"),
    ("batch-size-zero", {"class_labels": None, "batch_size": 0}, ValueError, "batch_size", "got 0"),
    ("batch-size-negative", {"class_labels": None, "batch_size": -1}, ValueError, "batch_size", "got -1"),
    ("batch-size-float", {"class_labels": None, "batch_size": 2.0}, TypeError, "batch_size", "2.0"),
    ("batch-size-string", {"class_labels": None, "batch_size": "2"}, TypeError, "batch_size", "'2'"),
    ("batch-size-bool", {"class_labels": None, "batch_size": True}, TypeError, "batch_size", "True"),
    ("batch-size-mismatch", {"batch_size": 3}, ValueError, "batch_size", "batch_size=3"),
    ("scale-string", {"guidance_scale": "4"}, TypeError, "guidance_scale", "'4'"),
    ("scale-bool", {"guidance_scale": True}, TypeError, "guidance_scale", "True"),
    ("scale-none-entry", {"guidance_scale": [None, 1.0]}, TypeError, "guidance_scale", "None"),
    ("scale-nested", {"guidance_scale": [[1.0, 2.0]]}, TypeError, "guidance_scale", "[1.0, 2.0]"),
    ("scale-2d-tensor", {"guidance_scale": torch.ones(2, 1)}, ValueError, "guidance_scale", "(2, 1)"),
    ("scale-complex", {"guidance_scale": torch.ones(2, dtype=torch.complex64)}, TypeError, "guidance_scale",
     "torch.complex64"),
    ("scale-inf", {"guidance_scale": INF}, ValueError, "guidance_scale", "inf"),
    ("scale-numpy-nan", {"guidance_scale": np.array([1.0, NAN])}, ValueError, "guidance_scale", "nan"),
    ("scale-negative", {"guidance_scale": [2.0, -1.0]}, ValueError, "guidance_scale", "-1.0"),
    ("scale-count", {"guidance_scale": [1.0, 2.0, 3.0]}, ValueError, "guidance_scale", "3 values"),
    ("scale-unconditional", {"class_labels": None, "guidance_scale": "4"}, TypeError, "guidance_scale", "'4'"),
    ("steps-zero", {"num_inference_steps": 0}, ValueError, "num_inference_steps", "got 0"),
    ("steps-too-many", {"num_inference_steps": 101}, ValueError, "num_inference_steps", "101"),
    ("steps-float", {"num_inference_steps": 2.0}, TypeError, "num_inference_steps", "2.0"),
    ("steps-none", {"num_inference_steps": None}, TypeError, "num_inference_steps", "None"),
    ("generator-int", {"generator": 5}, TypeError, "generator", "5 (int)"),
    ("generator-int-entry", {"generator": [seeded(0), 5]}, TypeError, "generator", "5 (int)"),
    ("generator-tuple", {"generator": (seeded(0), seeded(1))}, TypeError, "generator", "(tuple)"),
    ("generator-count", {"generator": seeded_list([0, 1, 2])}, ValueError, "generator", "3 generators"),
    ("latents-numpy", {"latents": np.zeros((2, 1, 8, 8), dtype=np.float32)}, TypeError, "latents", "(ndarray)"),
    ("latents-int", {"latents": torch.zeros(2, 1, 8, 8, dtype=torch.long)}, TypeError, "latents", "torch.int64"),
    ("latents-3d", {"latents": torch.zeros(2, 8, 8)}, ValueError, "latents", "(2, 8, 8)"),
    ("latents-nan", {"latents": torch.zeros(2, 1, 8, 8).index_fill_(0, torch.tensor([1]), NAN)}, ValueError,
     "latents", "64 NaN or infinite values"),
    ("latents-batch", {"latents": torch.zeros(3, 1, 8, 8)}, ValueError, "latents", "(3, 1, 8, 8)"),
    ("latents-channels", {"latents": torch.zeros(2, 3, 8, 8)}, ValueError, "latents", "(2, 3, 8, 8)"),
    ("rescale-string", {"guidance_rescale": "0.5"}, TypeError, "guidance_rescale", "'0.5'"),
    ("rescale-nan", {"guidance_rescale": NAN}, ValueError, "guidance_rescale", "nan"),
    ("rescale-negative", {"guidance_rescale": -0.1}, ValueError, "guidance_rescale", "-0.1"),
    ("interval-scalar", {"guidance_interval": 1.0}, TypeError, "guidance_interval", "1.0"),
    ("interval-string", {"guidance_interval": "ab"}, TypeError, "guidance_interval", "'ab'"),
    ("interval-string-bound", {"guidance_interval": (0.0, "1")}, TypeError, "guidance_interval", "(0.0, '1')"),
    ("interval-nan", {"guidance_interval": (NAN, 1.0)}, ValueError, "guidance_interval", "(nan, 1.0)"),
    ("interval-nan-high", {"guidance_interval": (0.0, NAN)}, ValueError, "guidance_interval", "(0.0, nan)"),
    ("interval-inf-low", {"guidance_interval": (INF, INF)}, ValueError, "guidance_interval", "(inf, inf)"),
    ("interval-empty", {"guidance_interval": (1.0, 1.0)}, ValueError, "guidance_interval", "(1.0, 1.0)"),
    ("interval-negative", {"guidance_interval": (-1.0, 1.0)}, ValueError, "guidance_interval", "(-1.0, 1.0)"),
    ("interval-three", {"guidance_interval": (0.0, 1.0, 2.0)}, ValueError, "guidance_interval", "(0.0, 1.0, 2.0)"),
    ("clip-string", {"clip_sample": "no"}, TypeError, "clip_sample", "'no'"),
    ("eta-nan", {"eta": NAN}, ValueError, "eta", "nan"),
    ("eta-inf", {"eta": INF}, ValueError, "eta", "inf"),
    ("eta-negative", {"eta": -0.5}, ValueError, "eta", "-0.5"),
    ("eta-above-one", {"eta": 1.5}, ValueError, "eta", "1.5"),
    ("eta-string", {"eta": "0"}, TypeError, "eta", "'0'"),
    ("eta-none", {"eta": None}, TypeError, "eta", "None"),
    ("output-type", {"output_type": "latent"}, ValueError, "output_type", "'latent'"),
    ("return-dict-string", {"return_dict": "no"}, TypeError, "return_dict", "'no'"),
    ("callback-int", {"callback_on_step_end": 5}, TypeError, "callback_on_step_end", "5 (int)"),
    ("callback-inputs-string", {"callback_on_step_end_tensor_inputs": "latents"}, TypeError,
     "callback_on_step_end_tensor_inputs", "'latents' (str)"),
    ("callback-inputs-unknown", {"callback_on_step_end_tensor_inputs": ["noise"]}, ValueError,
     "callback_on_step_end_tensor_inputs", "['noise']"),
]  # fmt: skip


@pytest.mark.parametrize(("arguments", "error", "argument", "value"), [case[1:] for case in CALL_CASES],
                         ids=[case[0] for case in CALL_CASES])  # fmt: skip
def test_invalid_call_argument_is_named(pipe, arguments, error, argument, value):
    recorder = record_unet(pipe)
    call = {"class_labels": [0, 1], "num_inference_steps": 2, "output_type": "pt", **arguments}
    with pytest.raises(error) as raised:
        pipe(**call)
    assert type(raised.value) is error
    message = str(raised.value)
    assert argument in message
    assert value in message
    assert recorder.calls == []


def test_case_ids_are_unique():
    ids = [case[0] for case in CALL_CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(
    ("returned", "error", "shown"),
    [
        (5, TypeError, "5 (int)"),
        ({"noise": torch.zeros(2, 1, 8, 8)}, ValueError, "['noise']"),
        ({"latents": "x"}, TypeError, "'x' (str)"),
        ({"latents": torch.zeros(1, 1, 8, 8)}, ValueError, "(1, 1, 8, 8)"),
        ({"latents": torch.full((2, 1, 8, 8), NAN)}, FloatingPointError, "non-finite latents"),
    ],
    ids=["int", "unknown-name", "string-latents", "shape", "nan"],
)
def test_invalid_callback_result_is_named(pipe, returned, error, shown):
    def callback(pipe, step_index, timestep, callback_kwargs):
        return returned

    with pytest.raises(error) as raised:
        pipe([0, 1], num_inference_steps=2, output_type="pt", callback_on_step_end=callback)
    message = str(raised.value)
    assert "callback_on_step_end" in message
    assert shown in message
    assert "step 0" in message


def test_callback_latents_keep_dtype(pipe):
    seen = []

    def callback(pipe, step_index, timestep, callback_kwargs):
        seen.append(callback_kwargs["latents"].dtype)
        return {"latents": callback_kwargs["latents"].double()}

    pipe([0, 1], num_inference_steps=3, output_type="pt", callback_on_step_end=callback)
    assert seen == [torch.float32] * 3


# ---------------------------------------------------------------------------------------------------------------------
# Valid inputs next to the rejected ones
# ---------------------------------------------------------------------------------------------------------------------


def test_numpy_names_are_class_names(pipe):
    assert pipe.prepare_class_labels(np.array(["two", "zero"])).tolist() == [2, 0]
    assert pipe.prepare_class_labels(np.array("one")).tolist() == [1]
    images = pipe(np.array(["two", "zero"]), num_inference_steps=2, output_type="pt").images
    assert images.shape == (2, 1, 8, 8)


def test_interval_may_reach_infinity(pipe):
    recorder = record_unet(pipe)
    pipe([0, 1], guidance_scale=3.0, guidance_interval=(0.0, INF), num_inference_steps=2, output_type="pt")
    assert recorder.rows == [4, 4]


def test_ignored_eta_is_logged(pipe, caplog):
    pipe.set_scheduler("EulerDiscreteScheduler")
    with caplog.at_level(logging.WARNING):
        pipe([0], num_inference_steps=2, eta=0.5, output_type="pt")
    assert "eta=0.5 has no effect" in caplog.text
    assert "EulerDiscreteScheduler" in caplog.text


def test_eta_reaches_ddim_quietly(pipe, caplog):
    with caplog.at_level(logging.WARNING):
        pipe([0], num_inference_steps=2, eta=1.0, generator=seeded(0), output_type="pt")
    assert "has no effect" not in caplog.text


def test_scale_without_labels_is_logged(pipe, caplog):
    with caplog.at_level(logging.WARNING):
        pipe(batch_size=2, guidance_scale=4.0, num_inference_steps=2, output_type="pt")
    assert "guidance_scale=4.0 has no effect without class_labels" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device for a generator on another device")
def test_generator_on_another_device_is_named(pipe):
    recorder = record_unet(pipe)
    with pytest.raises(ValueError, match=r"generator is on cuda:0, but the pipeline runs on cpu"):
        pipe([0, 1], num_inference_steps=2, generator=torch.Generator(device="cuda").manual_seed(0))
    assert recorder.calls == []


# ---------------------------------------------------------------------------------------------------------------------
# set_scheduler
# ---------------------------------------------------------------------------------------------------------------------


SCHEDULER_CASES = [
    ("int", (5,), {}, TypeError, ["scheduler", "5 (int)"]),
    ("instance", (DDIMScheduler(),), {}, TypeError, ["scheduler", "(DDIMScheduler)"]),
    ("incompatible", ("LCMScheduler",), {}, ValueError, ["'LCMScheduler'", "not compatible"]),
    ("edm", ("EDMEulerScheduler",), {}, ValueError, ["EDMEulerScheduler cannot sample this UNet"]),
    ("unknown-setting", ("EulerDiscreteScheduler",), {"bogus": 1}, TypeError, ["['bogus']", "'timestep_spacing'"]),
    ("other-class-setting", ("DDIMScheduler",), {"use_karras_sigmas": True}, TypeError,
     ["['use_karras_sigmas']", "'timestep_spacing'"]),
    ("training-setting", ("EulerDiscreteScheduler",), {"prediction_type": "sample"}, ValueError,
     ["['prediction_type']"]),
    ("spacing-value", ("DDIMScheduler",), {"timestep_spacing": "bogus"}, ValueError,
     ["DDIMScheduler", "'timestep_spacing': 'bogus'"]),
    ("algorithm-value", (DPMSolverMultistepScheduler,), {"algorithm_type": "bogus"}, ValueError,
     ["DPMSolverMultistepScheduler", "'algorithm_type': 'bogus'"]),
]  # fmt: skip


@pytest.mark.parametrize(("arguments", "overrides", "error", "expected"), [case[1:] for case in SCHEDULER_CASES],
                         ids=[case[0] for case in SCHEDULER_CASES])  # fmt: skip
def test_invalid_set_scheduler_argument_is_named(pipe, arguments, overrides, error, expected):
    before = pipe.scheduler
    with pytest.raises(error) as raised:
        pipe.set_scheduler(*arguments, **overrides)
    assert type(raised.value) is error
    for text in expected:
        assert text in str(raised.value)
    assert pipe.scheduler is before


def test_scheduler_choices_are_exact(pipe):
    choices = pipe.compatible_schedulers()
    compatible = sorted(cls.__name__ for cls in pipe.scheduler.compatibles)
    assert "EDMEulerScheduler" in compatible
    assert "EDMEulerScheduler" not in choices
    assert "EulerDiscreteScheduler" in choices

    with pytest.raises(ValueError) as raised:
        pipe.set_scheduler("LCMScheduler")
    assert str(choices) in str(raised.value)

    for name in compatible:
        swapped = tiny_pipeline()
        if name in choices:
            assert type(swapped.set_scheduler(name)).__name__ == name
        else:
            with pytest.raises(ValueError, match=f"{name} cannot sample this UNet.*choose one of"):
                swapped.set_scheduler(name)
