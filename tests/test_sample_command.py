"""The sample command: one PNG grid per guidance scale, a row per class and a column per seed."""

import pytest
import torch
from command_helpers import printed_values, run_console_script
from PIL import Image

from diffusers_cfg.pipelines import sample
from pipeline_helpers import tiny_pipeline


@pytest.fixture
def saved_pipeline(tmp_path):
    pipe = tiny_pipeline()  # classes "zero", "one", "two"
    folder = tmp_path / "pipe"
    pipe.save_pretrained(folder)
    return folder


def test_grids_per_scale_with_names(saved_pipeline, tmp_path):
    output = tmp_path / "grids" / "digits.png"
    written = sample.run([
        str(saved_pipeline), "--labels", "two", "0", "--guidance_scales", "1", "3", "--num_seeds", "3",
        "--scheduler", "dpm++", "--num_inference_steps", "2", "--output", str(output),
    ])  # fmt: skip

    assert written == [str(tmp_path / "grids" / "digits_s1.png"), str(tmp_path / "grids" / "digits_s3.png")]
    for path in written:
        grid = Image.open(path)
        assert grid.size == (3 * 8, 2 * 8)
        assert grid.mode == "L"


def test_columns_differ_rows_share_seeds(saved_pipeline, tmp_path):
    output = tmp_path / "grid.png"
    sample.run([str(saved_pipeline), "--labels", "1", "1", "--guidance_scales", "2", "--num_seeds", "2",
                 "--num_inference_steps", "2", "--output", str(output)])  # fmt: skip

    grid = Image.open(output)
    top_left, top_right = grid.crop((0, 0, 8, 8)).tobytes(), grid.crop((8, 0, 16, 8)).tobytes()
    bottom_left = grid.crop((0, 8, 8, 16)).tobytes()
    assert top_left != top_right
    assert top_left == bottom_left


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--labels", "7"], "class_labels [7] are outside [0, 3)"),
        (["--labels", "four"], "'four'"),
        (["--scheduler", "nope"], "--scheduler 'nope'"),
    ],
)
def test_invalid_input_exits_with_message(saved_pipeline, tmp_path, flags, expected):
    with pytest.raises(SystemExit) as exit_info:
        sample.main([str(saved_pipeline), "--num_inference_steps", "2", "--output", str(tmp_path / "x.png"), *flags])
    assert expected in str(exit_info.value)


def test_console_script_exits_zero(saved_pipeline, tmp_path):
    output = tmp_path / "grid.png"
    result = run_console_script("diffusers-cfg-sample", [saved_pipeline, "--guidance_scales", "1", "2", "--num_seeds",
                                                         "1", "--num_inference_steps", "1", "--output", output])
    assert result.returncode == 0, result.stderr
    assert printed_values(result.stderr) == [], "the return value of main() reached stderr"
    assert "Traceback" not in result.stderr
    assert (tmp_path / "grid_s1.png").is_file()
    assert (tmp_path / "grid_s2.png").is_file()


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the command loads the pipeline: the checks under test must run before that."""

    def fail_to_load(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the invalid flag was reported")

    monkeypatch.setattr(sample.ClassConditionalPipeline, "from_pretrained", fail_to_load)


def invalid_cases(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "a_folder").mkdir()
    cases = {
        "no extension": (["--output", tmp_path / "outnoext"], "--output '{tmp}/outnoext' does not end in an image"),
        "trailing slash": (["--output", f"{tmp_path}/grids/"], "--output '{tmp}/grids/' is a folder"),
        "existing folder": (["--output", tmp_path / "a_folder"], "--output '{tmp}/a_folder' is a folder"),
        "parent is a file": (["--output", tmp_path / "a_file" / "x.png"], "because '{tmp}/a_file' is a file"),
        "repeated scale": (["--guidance_scales", "1", "1.0"], "--guidance_scales lists 1 more than once"),
        "negative scale": (["--guidance_scales", "-1"], "--guidance_scales -1 is invalid"),
        "unknown device": (["--device", "banana"], "--device 'banana' is not a torch device"),
        "meta device": (["--device", "meta"], "--device 'meta' cannot sample"),
    }
    if not torch.cuda.is_available():
        cases["missing cuda"] = (["--device", "cuda"], "--device 'cuda' is not available on this machine")
    return cases


CASE_NAMES = ["no extension", "trailing slash", "existing folder", "parent is a file", "repeated scale",
              "negative scale", "unknown device", "meta device", "missing cuda"]  # fmt: skip


@pytest.mark.parametrize("case", CASE_NAMES)
def test_invalid_flag_fails_before_loading(saved_pipeline, tmp_path, no_loading, case):
    cases = invalid_cases(tmp_path)
    if case not in cases:
        pytest.skip("this machine has cuda")
    flags, expected = cases[case]
    argv = [str(saved_pipeline), "--output", str(tmp_path / "x.png"), *map(str, flags)]
    with pytest.raises(SystemExit) as exit_info:
        sample.run(argv)
    message = str(exit_info.value)
    assert message.startswith("error: ")
    assert expected.format(tmp=tmp_path) in message
    assert "\n" not in message
    assert not (tmp_path / "x.png").exists()
