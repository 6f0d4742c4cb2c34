"""ClassConditionalPipeline around the loop: labels in every form, inputs that must be rejected, outputs, callbacks,
dtypes, non-finite results, saving and loading (also as remote code), and the documented signature."""

import ast
import doctest
import importlib.util
import inspect
import json
import re
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from pipeline_helpers import (
    ID2LABEL,
    NUM_CLASSES,
    final_latents,
    one_thread,  # noqa: F401 (fixture)
    record_unet,
    seeded,
    seeded_list,
    tiny_pipeline,
    tiny_unet,
    trained_scheduler_config,
)

import diffusers_cfg.pipelines.pipeline_class_conditional as pipeline_module
from diffusers_cfg.pipelines import ClassConditionalPipeline

pytestmark = pytest.mark.usefixtures("one_thread")

MODULE_FILE = f"{pipeline_module.MODULE_STEM}.py"


@pytest.fixture
def pipe():
    return tiny_pipeline()


# ---------------------------------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels",
    [
        [2, 0, 1],
        ["two", "zero", "one"],
        [2, "zero", 1],
        torch.tensor([2, 0, 1]),
        torch.tensor([2, 0, 1], dtype=torch.int32),
        torch.tensor([2.0, 0.0, 1.0]),
        torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64),
        np.array([2, 0, 1]),
        [np.int64(2), torch.tensor(0), 1],
    ],
    ids=["ints", "names", "mixed", "int64", "int32", "float32", "float64", "numpy", "scalars"],
)
def test_label_forms_give_long_tensor(pipe, labels):
    ids = pipe.prepare_class_labels(labels)
    assert ids.dtype == torch.long
    assert ids.shape == (3,)
    assert ids.tolist() == [2, 0, 1]


@pytest.mark.parametrize("label", [1, "one", np.int64(1), torch.tensor(1), torch.tensor([1])])
def test_single_label_forms(pipe, label):
    ids = pipe.prepare_class_labels(label)
    assert ids.dtype == torch.long
    assert ids.tolist() == [1]


def test_single_name_is_not_split_into_characters(pipe):
    # A string is a Sequence of characters, but "two" must not become ["t", "w", "o"].
    assert pipe.prepare_class_labels("two").tolist() == [2]


def test_labels_follow_requested_device(pipe):
    assert pipe.prepare_class_labels([1], device="cpu").device == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device to hold the labels")
def test_labels_on_another_device(pipe):
    ids = pipe.prepare_class_labels(torch.tensor([2, 0], device="cuda"))
    assert ids.device == torch.device("cpu")
    assert ids.tolist() == [2, 0]


@pytest.mark.parametrize(
    ("labels", "error", "message"),
    [
        (torch.tensor([[1], [2]]), ValueError, r"must be a 1-D tensor of shape \(batch_size,\), got shape \(2, 1\)"),
        (torch.tensor([0.5, 1.0]), ValueError, r"must contain whole numbers, got \[0.5, 1.0\]"),
        (torch.tensor([float("nan")]), ValueError, r"must contain whole numbers, got \[nan\]"),
        (torch.tensor([float("inf")]), ValueError, r"must contain whole numbers, got \[inf\]"),
        (torch.tensor([True]), TypeError, "must contain integer class ids, got dtype torch.bool"),
        (torch.empty(2, dtype=torch.long, device="meta"), ValueError, "on the meta device, which has no data"),
        ("seven", ValueError, "class name 'seven', which is not in id2label; known names: 'one', 'two', 'zero'"),
        ([0, "seven"], ValueError, "class name 'seven', which is not in id2label"),
        (3, ValueError, rf"class_labels \[3\] are outside \[0, {NUM_CLASSES}\); this model has {NUM_CLASSES} classes"),
        ([1, -1, 5], ValueError, rf"class_labels \[-1, 5\] are outside \[0, {NUM_CLASSES}\)"),
        (torch.tensor([-2]), ValueError, r"class_labels \[-2\] are outside \[0, 3\)"),
        ([1.0], TypeError, r"entries must be ints or class names, got 1.0 \(float\)"),
        ([True], TypeError, r"entries must be ints or class names, got True \(bool\)"),
        (True, TypeError, r"must be an int, a class name, a list of them, .*got True \(bool\)"),
        ([], ValueError, r"class_labels is empty, got \[\]"),
        (2.0, TypeError, r"got 2.0 \(float\)"),
    ],
    ids=["2d", "fraction", "nan", "inf", "bool-tensor", "meta", "unknown-name", "unknown-in-list", "too-large",
         "out-of-range", "negative-tensor", "float-entry", "bool-entry", "bool", "empty", "float"],  # fmt: skip
)
def test_invalid_labels_are_rejected_before_unet(pipe, labels, error, message):
    recorder = record_unet(pipe)
    with pytest.raises(error, match=message):
        pipe.prepare_class_labels(labels)
    with pytest.raises(error, match=message):
        pipe(labels, num_inference_steps=2)
    assert recorder.calls == []


def test_null_label_error_names_it(pipe):
    with pytest.raises(ValueError, match=f"id {NUM_CLASSES} is the null label"):
        pipe.prepare_class_labels([NUM_CLASSES])


def test_label_count_mismatches_are_rejected(pipe):
    with pytest.raises(ValueError, match="batch_size=3 does not match the 2 class_labels given"):
        pipe([0, 1], batch_size=3, num_inference_steps=2)
    with pytest.raises(ValueError, match="guidance_scale has 2 values for 3 images"):
        pipe([0, 1, 2], guidance_scale=[1.0, 2.0], num_inference_steps=2)
    with pytest.raises(ValueError, match=r"latents has shape \(3, 1, 8, 8\), expected \(2, 1, 8, 8\)"):
        pipe([0, 1], latents=torch.zeros(3, 1, 8, 8), num_inference_steps=2)


@pytest.mark.parametrize("scale", [-0.5, float("nan"), [1.0, float("inf")]])
def test_invalid_guidance_scale_is_rejected(pipe, scale):
    with pytest.raises(ValueError, match="guidance_scale must be finite and >= 0"):
        pipe([0, 1], guidance_scale=scale, num_inference_steps=2)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"guidance_rescale": 1.5}, r"guidance_rescale must be a finite number in \[0, 1\], got 1.5"),
        ({"guidance_interval": (2.0, 1.0)}, r"guidance_interval must be None or a \(low, high\) pair"),
        ({"guidance_interval": (0.0, 1.0, 2.0)}, r"guidance_interval must be None or a \(low, high\) pair"),
        ({"callback_on_step_end_tensor_inputs": ["noise"]}, r"\['noise'\] are not available; choose from"),
    ],
)
def test_invalid_options_are_rejected(pipe, options, message):
    with pytest.raises(ValueError, match=message):
        pipe([0], num_inference_steps=2, **options)


def test_default_guidance_scale_comes_from_config():
    guided = ClassConditionalPipeline(unet=tiny_unet(), scheduler=DDIMScheduler.from_config(trained_scheduler_config()))
    plain = ClassConditionalPipeline(unet=tiny_unet(), scheduler=DDIMScheduler.from_config(trained_scheduler_config()),
                                     default_guidance_scale=1.0)  # fmt: skip
    for pipeline, rows in ((guided, 2), (plain, 1)):
        pipeline.set_progress_bar_config(disable=True)
        recorder = record_unet(pipeline)
        pipeline([0], num_inference_steps=2, output_type="pt")
        assert recorder.rows == [rows] * 2
    assert guided.config.default_guidance_scale == 4.0


def test_unconditional_batch_size(pipe):
    recorder = record_unet(pipe)
    assert pipe(None, num_inference_steps=2, output_type="pt").images.shape == (1, 1, 8, 8)
    assert pipe(batch_size=3, num_inference_steps=2, output_type="pt").images.shape == (3, 1, 8, 8)
    assert pipe(latents=torch.zeros(2, 1, 8, 8), num_inference_steps=2, output_type="pt").images.shape[0] == 2
    assert all(call["class_labels"].eq(NUM_CLASSES).all() for call in recorder.calls)


def test_latents_start_the_sampling(pipe):
    recorder = record_unet(pipe)
    latents = torch.randn(2, 1, 8, 8, generator=seeded(3))
    pipe([0, 1], guidance_scale=1.0, latents=latents.double(), num_inference_steps=3, output_type="pt")
    # DDIM's init_noise_sigma is 1 and its scale_model_input changes nothing: the first UNet input is the noise.
    torch.testing.assert_close(recorder.calls[0]["sample"], latents)

    from_generator = pipe([0, 1], guidance_scale=1.0, generator=seeded(3), num_inference_steps=3,
                          output_type="pt").images  # fmt: skip
    from_latents = pipe([0, 1], guidance_scale=1.0, latents=latents, num_inference_steps=3, output_type="pt").images
    torch.testing.assert_close(from_latents, from_generator, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Outputs and callbacks
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("channels", "mode"), [(1, "L"), (3, "RGB")])
def test_pil_output_mode(channels, mode):
    pipe = tiny_pipeline(in_channels=channels)
    images = pipe([0, 1], num_inference_steps=2, generator=seeded(0)).images
    assert len(images) == 2
    assert all(isinstance(image, PIL.Image.Image) for image in images)
    assert {image.mode for image in images} == {mode}
    assert images[0].size == (8, 8)


def test_np_and_pt_outputs_agree(pipe):
    as_np = pipe([0, 1], num_inference_steps=2, generator=seeded(0), output_type="np").images
    as_pt = pipe([0, 1], num_inference_steps=2, generator=seeded(0), output_type="pt").images
    as_pil = pipe([0, 1], num_inference_steps=2, generator=seeded(0), output_type="pil").images

    assert isinstance(as_np, np.ndarray)
    assert as_np.shape == (2, 8, 8, 1)
    assert isinstance(as_pt, torch.Tensor)
    assert as_pt.shape == (2, 1, 8, 8)
    assert as_pt.min() >= 0
    assert as_pt.max() <= 1
    np.testing.assert_allclose(as_np, as_pt.permute(0, 2, 3, 1).numpy(), atol=0)
    np.testing.assert_array_equal(np.asarray(as_pil[1]), (as_np[1, :, :, 0] * 255).round().astype(np.uint8))


@pytest.mark.parametrize("output_type", ["latent", "PIL", None])
def test_invalid_output_type_is_rejected(pipe, output_type):
    with pytest.raises(ValueError, match=r"output_type must be one of \('pil', 'np', 'pt'\), got"):
        pipe([0], num_inference_steps=2, output_type=output_type)


def test_return_dict_false_gives_tuple(pipe):
    output = pipe([0, 1], num_inference_steps=2, generator=seeded(0), output_type="pt", return_dict=False)
    assert isinstance(output, tuple)
    assert len(output) == 1
    expected = pipe([0, 1], num_inference_steps=2, generator=seeded(0), output_type="pt").images
    torch.testing.assert_close(output[0], expected, atol=0, rtol=0)


def test_callback_runs_every_step(pipe):
    seen = []

    def callback(pipeline, step_index, timestep, callback_kwargs):
        assert pipeline is pipe
        seen.append((step_index, int(timestep), callback_kwargs["latents"].shape))
        return {}

    pipe([0, 1], num_inference_steps=5, generator=seeded(0), output_type="pt", callback_on_step_end=callback,
         callback_on_step_end_tensor_inputs=["latents"])  # fmt: skip

    expected_timesteps = DDIMScheduler.from_config(pipe.scheduler.config)
    expected_timesteps.set_timesteps(5)
    assert seen == [(index, int(t), (2, 1, 8, 8)) for index, t in enumerate(expected_timesteps.timesteps)]


def test_callback_replaces_latents(pipe):
    recorder = record_unet(pipe)
    replacement = torch.full((2, 1, 8, 8), 0.25)

    def replace_after_first_step(pipeline, step_index, timestep, callback_kwargs):
        return {"latents": replacement} if step_index == 0 else {}

    pipe([0, 1], guidance_scale=1.0, num_inference_steps=3, generator=seeded(0), output_type="pt",
         callback_on_step_end=replace_after_first_step)  # fmt: skip
    torch.testing.assert_close(recorder.calls[1]["sample"], replacement)

    zeros_at_end = pipe([0, 1], num_inference_steps=3, generator=seeded(0), output_type="pt",
                        callback_on_step_end=lambda pipeline, i, t, kwargs: {"latents": torch.zeros(2, 1, 8, 8)}).images
    torch.testing.assert_close(zeros_at_end, torch.full((2, 1, 8, 8), 0.5))  # latent 0 is mid-grey


def test_bf16_unet_on_cpu():
    pipe = tiny_pipeline()
    full = final_latents(pipe, [0, 1], guidance_scale=2.0, num_inference_steps=3, generator=seeded(0))
    pipe.unet.to(torch.bfloat16)
    recorder = record_unet(pipe)

    half = final_latents(pipe, [0, 1], guidance_scale=2.0, num_inference_steps=3, generator=seeded(0))

    assert half.dtype == torch.float32
    assert torch.isfinite(half).all()
    assert all(call["sample"].dtype == torch.bfloat16 for call in recorder.calls)
    assert all(call["class_labels"].dtype == torch.long for call in recorder.calls)
    # bf16 keeps 8 bits of mantissa: the samples agree to a few percent of their spread.
    assert (half - full).abs().max() < 0.1 * full.std()


@pytest.mark.parametrize("nan_at_call", [0, 2])
def test_non_finite_unet_output_names_the_step(pipe, nan_at_call):
    record_unet(pipe, nan_at_call=nan_at_call)
    with pytest.raises(FloatingPointError, match=f"the UNet returned non-finite values at step {nan_at_call} "):
        pipe([0, 1], guidance_scale=1.0, num_inference_steps=4, generator=seeded(0))


def test_non_finite_step_names_the_step(pipe, monkeypatch):
    step = DDIMScheduler.step

    def overflowing_step(self, model_output, timestep, sample, **kwargs):
        output = step(self, model_output, timestep, sample, **kwargs)
        if self.timesteps[1] == timestep:
            output.prev_sample[0, 0, 0, 0] = float("inf")
        return output

    monkeypatch.setattr(DDIMScheduler, "step", overflowing_step)
    with pytest.raises(FloatingPointError, match="sampling produced non-finite values at step 1 "):
        pipe([0], num_inference_steps=4, generator=seeded(0))


# ---------------------------------------------------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------------------------------------------------


def test_properties(pipe):
    assert pipe.num_classes == NUM_CLASSES
    assert pipe.null_class_id == NUM_CLASSES
    assert pipe.id2label == ID2LABEL
    assert pipe.labels == {"zero": 0, "one": 1, "two": 2}


def test_unet_without_class_embeddings_is_rejected():
    unet = tiny_unet()
    unet.register_to_config(num_class_embeds=None)
    with pytest.raises(ValueError, match="num_class_embeds is None; a class-conditional UNet needs"):
        ClassConditionalPipeline(unet=unet, scheduler=DDIMScheduler())


def test_id2label_outside_classes_is_rejected():
    with pytest.raises(ValueError, match=r"id2label has ids \[3\] outside \[0, 3\)"):
        ClassConditionalPipeline(unet=tiny_unet(), scheduler=DDIMScheduler(), id2label={0: "a", 3: "d"})


# ---------------------------------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """Let diffusers copy remote pipeline code into a temporary folder, and forget the imported copies afterwards."""
    import diffusers.utils.constants as diffusers_constants
    import diffusers.utils.dynamic_modules_utils as dynamic_modules

    cache = str(tmp_path / "modules")
    monkeypatch.setattr(dynamic_modules, "HF_MODULES_CACHE", cache)
    monkeypatch.setattr(diffusers_constants, "HF_MODULES_CACHE", cache)
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield cache
    for name in set(sys.modules) - before:
        if name.startswith("diffusers_modules"):
            del sys.modules[name]


def sample_images(pipeline) -> torch.Tensor:
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(["two", 0], guidance_scale=3.0, num_inference_steps=3, generator=seeded_list([4, 5]),
                    output_type="pt").images  # fmt: skip


def test_save_and_load_keep_id2label_and_images(pipe, tmp_path):
    expected = sample_images(pipe)
    pipe.save_pretrained(tmp_path)

    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == [pipeline_module.MODULE_STEM, "ClassConditionalPipeline"]
    assert index["id2label"] == {"0": "zero", "1": "one", "2": "two"}  # JSON keys are strings
    assert (tmp_path / MODULE_FILE).read_text() == inspect.getsource(pipeline_module)

    loaded = ClassConditionalPipeline.from_pretrained(tmp_path)
    assert type(loaded) is ClassConditionalPipeline
    assert loaded.id2label == ID2LABEL
    assert dict(loaded.config.id2label) == ID2LABEL
    assert loaded.config.default_guidance_scale == pipe.config.default_guidance_scale
    torch.testing.assert_close(sample_images(loaded), expected, atol=0, rtol=0)


def test_trust_remote_code_loads_identical_pipeline(pipe, tmp_path, modules_cache):
    expected = sample_images(pipe)
    pipe.save_pretrained(tmp_path)

    remote = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)

    assert type(remote).__name__ == "ClassConditionalPipeline"
    assert type(remote) is not ClassConditionalPipeline
    assert inspect.getfile(type(remote)).startswith(modules_cache)
    assert remote.id2label == ID2LABEL
    torch.testing.assert_close(sample_images(remote), expected, atol=0, rtol=0)


@pytest.mark.parametrize("source", ["saved", "repository"])
def test_custom_pipeline_path_loads(pipe, tmp_path, modules_cache, source):
    expected = sample_images(pipe)
    folder = tmp_path / "saved"
    pipe.save_pretrained(folder)
    if source == "saved":
        module_path = folder / MODULE_FILE
    else:
        # Weights without the code beside them, and the module file taken from elsewhere. (diffusers prefers the
        # folder's copy whenever the folder has one.)
        (folder / MODULE_FILE).unlink()
        module_path = inspect.getfile(pipeline_module)

    # diffusers 0.42.1 runs a local custom pipeline file only with trust_remote_code=True.
    with pytest.raises(ValueError, match="Pass `trust_remote_code=True`"):
        DiffusionPipeline.from_pretrained(folder, custom_pipeline=str(module_path))
    loaded = DiffusionPipeline.from_pretrained(folder, custom_pipeline=str(module_path), trust_remote_code=True)

    assert type(loaded).__name__ == "ClassConditionalPipeline"
    assert inspect.getfile(type(loaded)).startswith(modules_cache)
    torch.testing.assert_close(sample_images(loaded), expected, atol=0, rtol=0)


def test_saving_remote_pipeline_keeps_remote_class_name(pipe, tmp_path, modules_cache):
    pipe.save_pretrained(tmp_path / "first")
    remote = DiffusionPipeline.from_pretrained(tmp_path / "first", trust_remote_code=True)

    remote.save_pretrained(tmp_path / "second")

    index = json.loads((tmp_path / "second" / "model_index.json").read_text())
    assert index["_class_name"] == [pipeline_module.MODULE_STEM, "ClassConditionalPipeline"]
    assert (tmp_path / "second" / MODULE_FILE).read_text() == (tmp_path / "first" / MODULE_FILE).read_text()
    again = ClassConditionalPipeline.from_pretrained(tmp_path / "second")
    assert type(again) is ClassConditionalPipeline
    torch.testing.assert_close(sample_images(again), sample_images(pipe), atol=0, rtol=0)


def test_saving_over_its_own_module_file(pipe, tmp_path):
    # A pipeline class imported from the saved folder itself can save back into that folder.
    pipe.save_pretrained(tmp_path)
    spec = importlib.util.spec_from_file_location("saved_pipeline_module", tmp_path / MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    source = (tmp_path / MODULE_FILE).read_text()

    module.ClassConditionalPipeline(unet=pipe.unet, scheduler=pipe.scheduler, id2label=ID2LABEL).save_pretrained(tmp_path)

    assert (tmp_path / MODULE_FILE).read_text() == source


def test_push_to_hub_argument_is_rejected(pipe, tmp_path):
    with pytest.raises(ValueError, match="push_to_hub=True is not supported here"):
        pipe.save_pretrained(tmp_path, push_to_hub=True)


# ---------------------------------------------------------------------------------------------------------------------
# Signature and documentation
# ---------------------------------------------------------------------------------------------------------------------

PUBLIC_ARGUMENTS = (
    "class_labels", "guidance_scale", "num_inference_steps", "generator", "latents", "negative_class_labels",
    "guidance_rescale", "guidance_interval", "clip_sample", "eta", "batch_size", "output_type", "return_dict",
    "callback_on_step_end", "callback_on_step_end_tensor_inputs",
)  # fmt: skip


def documented_arguments(docstring: str) -> dict[str, str]:
    """Return {name: the text in brackets after it} for every argument in the Args section of `docstring`."""
    section = docstring.split("Args:")[1].split("Examples:")[0]
    return dict(re.findall(r"^ {12}(\w+) \((.*)\):$", section, flags=re.MULTILINE))


def test_call_signature():
    parameters = inspect.signature(ClassConditionalPipeline.__call__).parameters
    assert list(parameters)[1:] == list(PUBLIC_ARGUMENTS)
    assert parameters["guidance_scale"].default is None
    assert parameters["num_inference_steps"].default == 50
    assert parameters["generator"].default is None
    assert parameters["output_type"].default == "pil"
    assert parameters["return_dict"].default is True


def test_docstring_documents_every_argument_with_its_default():
    parameters = inspect.signature(ClassConditionalPipeline.__call__).parameters
    documented = documented_arguments(ClassConditionalPipeline.__call__.__doc__)

    assert list(documented) == list(parameters)[1:]
    for name, description in documented.items():
        default = parameters[name].default
        stated = re.search(r"defaults to (.+)$", description)
        if stated is None:
            assert default is None, f"{name}: the docstring states no default, the signature has {default!r}"
            assert "*optional*" in description, name
        else:
            assert ast.literal_eval(stated.group(1).strip("`")) == default, name


def test_docstring_example_runs(tmp_path, monkeypatch):
    # The example requests classes 3 and 7, so this pipeline has ten.
    pipe = ClassConditionalPipeline(unet=tiny_unet(num_classes=10), scheduler=DDIMScheduler.from_config(
        trained_scheduler_config(num_train_timesteps=30)))  # fmt: skip
    pipe.save_pretrained(tmp_path / "saved")
    monkeypatch.chdir(tmp_path)
    docstring = ClassConditionalPipeline.__call__.__doc__
    examples = doctest.DocTestParser().get_examples(docstring.split("Examples:")[1].split("Raises:")[0])
    assert examples, "the docstring has no example"
    namespace = {}

    for example in examples:
        source = example.source.replace('"path/to/output_dir"', repr(str(tmp_path / "saved")))
        exec(compile(source, "<docstring example>", "exec"), namespace)  # noqa: S102

    assert [image.size for image in namespace["images"]] == [(8, 8), (8, 8)]
    assert (tmp_path / "class_3.png").is_file()
