"""Tests of the benchmark scripts under benchmarks/: their parts in this process, and each script end to end on tiny
settings in a subprocess.

No test here decides anything from a timing: the end-to-end runs check that the report's ratio lines come last and
are finite, and the unit tests check that the variants do the work they claim to do.
"""

import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from training_helpers import read_checkpoint, run_main, subprocess_env

from diffusers_cfg.pipelines import ClassConditionalPipeline
from diffusers_cfg.training import classifier as classifier_module
from diffusers_cfg.training.classifier import load_or_train_classifier
from diffusers_cfg.training.data import load_labeled_images
from diffusers_cfg.training.model import build_noise_scheduler, build_unet, sampling_scheduler

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO_ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import harness  # noqa: E402
import memory  # noqa: E402
import sampling_speed  # noqa: E402
import time_to_quality  # noqa: E402
import training_speed  # noqa: E402

RATIO_LINE = re.compile(r"^ratio: (.+) = (\S+)$")
# Training and sampling flags of a UNet of about 40k parameters on the 8x8 digits.
TINY_TRAINING = ["--dataset_name", "builtin:digits", "--block_out_channels", "8", "16", "--train_batch_size", "16"]
TINY_SAMPLING = ["--resolution", "8", "--block_out_channels", "8", "16"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def fresh_accelerate_state():
    """Reset accelerate's process-wide state after a test that built an accelerator in this process."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def classifier_cache(tmp_path_factory):
    """A classifier cache holding a briefly trained digits classifier, so that no run trains the full one."""
    cache = tmp_path_factory.mktemp("classifier-cache")
    real_train = classifier_module.train_classifier
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(classifier_module, "train_classifier",
                      lambda data, resolution, channels: real_train(data, resolution, channels, min_steps=60,
                                                                    max_epochs=6))  # fmt: skip
        load_or_train_classifier(load_labeled_images("builtin:digits"), 8, 1, directory=str(cache))
    return cache


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    """An untrained tiny digits pipeline, saved with the training_config.json that training writes beside it."""
    folder = tmp_path_factory.mktemp("pipeline") / "cfg-digits"
    torch.manual_seed(0)
    pipe = ClassConditionalPipeline(
        unet=build_unet(8, 1, 10, block_out_channels=(8, 16)),
        scheduler=sampling_scheduler(build_noise_scheduler(prediction_type="v_prediction")),
    )
    pipe.save_pretrained(folder)
    (folder / "training_config.json").write_text('{"dataset_name": "builtin:digits"}')
    return folder


def run_script(name, *flags, cache_dir) -> str:
    """Run benchmarks/<name>.py with `flags` on one thread, with the classifier cache in `cache_dir`; return its
    standard output, failing on a non-zero exit."""
    command = [sys.executable, str(BENCHMARKS / f"{name}.py"), *map(str, flags)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(cache_dir), capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, f"{name}.py failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    return result.stdout


def ratios_of(output: str) -> dict:
    """Return the report's ratio lines as {label: value}, checking that they are its last lines."""
    lines = output.rstrip("\n").splitlines()
    ratio_lines = [line for line in lines if RATIO_LINE.match(line)]
    assert ratio_lines, f"no ratio lines in:\n{output}"
    assert lines[-len(ratio_lines) :] == ratio_lines, f"the ratio lines are not the last lines of:\n{output}"
    return {RATIO_LINE.match(line).group(1): float(RATIO_LINE.match(line).group(2)) for line in ratio_lines}


def assert_finite(ratios: dict, expected: list) -> None:
    for label in expected:
        assert label in ratios, f"missing ratio {label!r}; got {sorted(ratios)}"
    for label, value in ratios.items():
        assert math.isfinite(value), f"ratio {label!r} is {value}"
        assert value > 0, f"ratio {label!r} is {value}"


# Parts, in this process


def test_select_device_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only behaviour")
    assert harness.select_device("auto") == torch.device("cpu")
    assert harness.select_device("cpu") == torch.device("cpu")
    with pytest.raises(SystemExit, match="--device cuda needs a CUDA GPU"):
        harness.select_device("cuda")


def test_time_interleaved_rotates_order():
    calls = []
    variants = [harness.Variant(name, lambda name=name: calls.append(name), images=1) for name in "abc"]
    harness.time_interleaved(variants, rounds=3, repeats=2, warmup=1, device=torch.device("cpu"))
    assert calls[:3] == ["a", "b", "c"], "each variant warms up once, in order"
    assert calls[3:9] == ["a", "a", "b", "b", "c", "c"]
    assert calls[9:15] == ["b", "b", "c", "c", "a", "a"]
    assert calls[15:] == ["c", "c", "a", "a", "b", "b"]
    assert all(len(variant.seconds) == 6 for variant in variants)


def test_default_step_matches_training(tmp_path, fresh_accelerate_state):
    """Two benchmark steps give bit for bit the weights and EMA that train_cfg saves after two steps."""
    training_flags = ["--max_train_steps", "2", "--lr_warmup_steps", "1"]
    run_main([*TINY_TRAINING, *training_flags, "--output_dir", str(tmp_path / "train"), "--checkpointing_steps", "2",
              "--num_inference_steps", "2", "--sample_every_steps", "0", "--eval_samples_per_class", "0",
              "--report_to", "none"])  # fmt: skip
    saved = read_checkpoint(tmp_path / "train" / "checkpoints" / "checkpoint-2")

    args = training_speed.parse_args([*TINY_TRAINING, "--device", "cpu"])
    setup = training_speed.TrainingSetup(args, str(tmp_path / "benchmark"), training_flags)
    step, batches = setup.default_step(), setup.batches()
    for _ in range(2):
        step(next(batches))

    weights = step.accelerator.unwrap_model(step.unet).state_dict()
    assert set(weights) == set(saved["model"])
    changed = [name for name in weights if not torch.equal(weights[name], saved["model"][name])]
    assert not changed, f"weights differ from training's after two steps: {changed[:5]}"
    shadow = step.ema.state_dict()["shadow_params"]
    assert len(shadow) == len(saved["ema"]["shadow_params"])
    assert all(torch.equal(a, b) for a, b in zip(shadow, saved["ema"]["shadow_params"])), "EMA differs"


def test_reference_step_trains_the_unet(tmp_path, fresh_accelerate_state):
    args = training_speed.parse_args([*TINY_TRAINING, "--device", "cpu"])
    setup = training_speed.TrainingSetup(args, str(tmp_path))
    reference = setup.reference_step()
    before = [parameter.detach().clone() for parameter in reference.unet.parameters()]
    losses = [reference(setup.fixed_batch) for _ in range(2)]
    assert all(math.isfinite(loss) for loss in losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, reference.unet.parameters())), "no weight changed"
    assert all(torch.equal(a, b) for a, b in zip(before, setup.unet.parameters())), "the shared initial UNet changed"


def test_forward_flops_count_convolutions(tmp_path, fresh_accelerate_state):
    args = training_speed.parse_args([*TINY_TRAINING, "--device", "cpu"])
    setup = training_speed.TrainingSetup(args, str(tmp_path))
    flops = training_speed.count_forward_flops(setup.unet, setup.fixed_batch)
    first_conv = setup.unet.conv_in
    # conv_in alone: 2 FLOPs per multiply-add, for every output pixel of every output channel of every image.
    conv_in_flops = 2 * 16 * first_conv.out_channels * 8 * 8 * first_conv.in_channels * 3 * 3
    assert flops > 10 * conv_in_flops


def test_plain_loops_match_pipeline(tiny_pipeline_dir):
    """Both plain loops compute what the pipeline computes, so the speed comparison is between equal work."""
    args = sampling_speed.parse_args(["--pipeline_dir", str(tiny_pipeline_dir)])
    pipe = sampling_speed.load_pipeline(args, torch.device("cpu"))
    labels = torch.tensor([0, 3, 7])
    expected = pipe(class_labels=labels, guidance_scale=4.0, num_inference_steps=4,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images  # fmt: skip
    for two_calls in (False, True):
        latents = sampling_speed.plain_guided_sampling(pipe.unet, pipe.scheduler, labels, 4.0, 4,
                                                       torch.Generator().manual_seed(0), two_calls)  # fmt: skip
        images = (latents / 2 + 0.5).clamp(0, 1)
        assert torch.allclose(images, expected, atol=1e-5), f"two_calls={two_calls}: max difference " \
            f"{(images - expected).abs().max():.2e}"  # fmt: skip


def test_guidance_interval_rows_per_image(tmp_path):
    args = sampling_speed.parse_args([*TINY_SAMPLING, "--pipeline_dir", str(tmp_path / "missing"), "--batch_size", "3",
                                      "--num_inference_steps", "10"])  # fmt: skip
    pipe = sampling_speed.load_pipeline(args, torch.device("cpu"))
    rows = sampling_speed.compare_guidance_intervals(pipe, args, torch.device("cpu"), [(1.0, math.inf)], None)
    assert rows[0]["setting"] == "full guidance"
    assert rows[0]["rows_per_image"] == 20, "full guidance passes 2 rows per image at each of 10 steps"
    # DDIM's 10 steps (timesteps 900, 800, ..., 0) reach sigma <= 1 at the last three: sigma is 0.72 at t = 200.
    assert rows[1]["rows_per_image"] == 17
    assert rows[1]["accuracy"] is None


def test_parse_evaluation_line():
    line = ("2026-01-01 00:00:00,000 INFO __main__: [RANK 0] Evaluation at step 150: class accuracy 91.5% at s = 1, "
            "96.0% at s = 4, after 123.4 s of training (evaluations excluded)")  # fmt: skip
    assert time_to_quality.parse_evaluation(line) == {
        "step": 150, "training_seconds": 123.4, "accuracy": {1.0: 0.915, 4.0: 0.96},
    }  # fmt: skip
    assert time_to_quality.parse_evaluation("training:  21%|##  | 150/700 [02:00<07:20, 1.25step/s]") is None


def test_training_logs_evaluation_line(tmp_path, classifier_cache, caplog, monkeypatch):
    """train_cfg logs, at each evaluation, the line that time_to_quality.py reads."""
    monkeypatch.setenv("DIFFUSERS_CFG_CACHE", str(classifier_cache))
    caplog.set_level("INFO")
    run_main([*TINY_TRAINING, "--output_dir", str(tmp_path), "--max_train_steps", "4", "--eval_every_steps", "2",
              "--eval_samples_per_class", "1", "--eval_guidance_scales", "1", "4", "--num_inference_steps", "2",
              "--sample_every_steps", "0", "--report_to", "none"])  # fmt: skip
    evaluations = [time_to_quality.parse_evaluation(record.getMessage()) for record in caplog.records]
    evaluations = [evaluation for evaluation in evaluations if evaluation is not None]
    assert [evaluation["step"] for evaluation in evaluations] == [2, 4]
    assert all(set(evaluation["accuracy"]) == {1.0, 4.0} for evaluation in evaluations)
    first, second = (evaluation["training_seconds"] for evaluation in evaluations)
    assert 0 <= first <= second


def test_measure_peak_rss_of_child():
    allocate = "import sys; block = bytearray(300 * 2**20); block[::4096] = b'x' * len(block[::4096]); print('done')"
    peak, output = memory.measure_peak_rss([sys.executable, "-c", allocate])
    idle, _ = memory.measure_peak_rss([sys.executable, "-c", "pass"])
    assert output.strip() == "done"
    assert peak >= 300 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    # This test process has torch loaded, hundreds of MiB, which must not count as the child's.
    assert idle < 100 * 2**20, f"an idle child reports {idle / 2**20:.0f} MiB"
    with pytest.raises(SystemExit, match="failed with exit code 3"):
        memory.measure_peak_rss([sys.executable, "-c", "raise SystemExit(3)"])


def test_gpu_script_flags_parse():
    """Every benchmark command in run_gpu.sh passes its script's flag checks."""
    text = (BENCHMARKS / "run_gpu.sh").read_text()
    commands = re.findall(r"benchmarks/(\w+)\.py((?: [^\n|;&>]*)?)", text)
    modules = {"training_speed": training_speed, "sampling_speed": sampling_speed, "memory": memory,
               "time_to_quality": time_to_quality}  # fmt: skip
    assert {name for name, _ in commands} == set(modules)
    for name, flags in commands:
        argv = shlex.split(flags.replace("\\\n", " "))
        modules[name].parse_args(argv)
        if name != "time_to_quality":
            assert argv[argv.index("--device") + 1] == "cuda", f"{name} does not run on the GPU"
    assert subprocess.run(["bash", "-n", str(BENCHMARKS / "run_gpu.sh")]).returncode == 0


# Each script end to end, on tiny settings in a subprocess


@pytest.mark.slow
def test_training_speed_script(tmp_path):
    output = run_script("training_speed", *TINY_TRAINING, "--device", "cpu", "--mixed_precision", "bf16",
                        "--compile", "--compile_backend", "eager", "--channels_last", "--rounds", "2", "--repeats", "1",
                        "--warmup", "1", "--matmul_size", "64", "--matmul_seconds", "0.01", cache_dir=tmp_path)  # fmt: skip
    assert "resolved to bf16" in output
    assert_finite(ratios_of(output), [
        "default step / reference (images/s)",
        "default step + data loader / reference (images/s)",
        "default step + channels_last / reference (images/s)",
        "default step + torch.compile (eager) / reference (images/s)",
        "reference, achieved FLOP/s / fp32 matmul FLOP/s",
        "default step, achieved FLOP/s / bf16 matmul FLOP/s",
    ])  # fmt: skip


@pytest.mark.slow
def test_sampling_speed_script_without_pipeline(tmp_path):
    output = run_script("sampling_speed", *TINY_SAMPLING, "--pipeline_dir", tmp_path / "missing", "--device", "cpu",
                        "--batch_size", "4", "--num_inference_steps", "3", "--rounds", "2", "--mixed_precision",
                        "bf16", "--compile", "--compile_backend", "eager", "--channels_last", cache_dir=tmp_path)  # fmt: skip
    assert f"no saved pipeline at {tmp_path / 'missing'}" in output
    ratios = ratios_of(output)
    assert_finite(ratios, [
        "pipeline / plain loop, one 2B call (images/s)",
        "pipeline / plain loop, two B calls (images/s)",
        "pipeline + channels_last / pipeline (images/s)",
        "pipeline + torch.compile (eager) / pipeline (images/s)",
        "UNet rows per image, guidance_interval (1, inf] / full guidance",
    ])  # fmt: skip
    assert not any(label.startswith("class accuracy") for label in ratios)


@pytest.mark.slow
def test_sampling_speed_script_scores_pipeline(tiny_pipeline_dir, classifier_cache):
    output = run_script("sampling_speed", "--pipeline_dir", tiny_pipeline_dir, "--batch_size", "10",
                        "--num_inference_steps", "3", "--rounds", "1", "--samples_per_class", "1",
                        "--guidance_intervals", "1,inf", cache_dir=classifier_cache)  # fmt: skip
    assert "scored by the evaluation classifier of builtin:digits" in output
    ratios = ratios_of(output)
    assert_finite({label: value for label, value in ratios.items() if not label.startswith("class accuracy")},
                  ["UNet rows per image, guidance_interval (1, inf] / full guidance"])  # fmt: skip
    # DDIM's 3 steps are at timesteps 666, 333 and 0. Full guidance passes 2 UNet rows per image at each, and (1, inf]
    # passes 1 at t = 0, where sigma is 0.01.
    assert re.search(r"^full guidance +6\.0 +\d+\.\d%$", output, re.MULTILINE), output
    assert re.search(r"^guidance_interval \(1, inf\] +5\.0 +\d+\.\d%$", output, re.MULTILINE), output


@pytest.mark.slow
def test_time_to_quality_script(classifier_cache):
    output = run_script("time_to_quality", "--target_accuracy", "0", "--eval_every_steps", "2",
                        "--eval_samples_per_class", "1", "--", *TINY_TRAINING, "--max_train_steps", "6",
                        "--num_inference_steps", "2", "--sample_every_steps", "0", "--report_to", "none",
                        cache_dir=classifier_cache)  # fmt: skip
    assert "first reached at step 2" in output
    ratios = ratios_of(output)
    assert_finite(ratios, ["steps to target / --max_train_steps", "training seconds to target / wall seconds to target"])
    assert ratios["steps to target / --max_train_steps"] == pytest.approx(2 / 6, abs=1e-3)


@pytest.mark.slow
def test_memory_script(tmp_path):
    output = run_script("memory", *TINY_TRAINING, *TINY_SAMPLING[:2], "--device", "cpu", "--train_steps", "1",
                        "--pipeline_dir", tmp_path / "missing", "--sampling_batch_size", "4", "--sampling_steps", "2",
                        cache_dir=tmp_path)  # fmt: skip
    for workload in memory.WORKLOADS:
        assert re.search(rf"^{workload} +peak RSS +\d+\.\d MiB", output, re.MULTILINE), f"no line for {workload}"
    assert_finite(ratios_of(output), [
        "peak RSS, training, default step / training, reference",
        "peak RSS, sampling, pipeline / sampling, plain loop",
    ])  # fmt: skip
