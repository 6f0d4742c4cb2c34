"""The sample command: one PNG grid per guidance scale, a row per class and a column per seed."""

import pytest
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
    written = sample.main([
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
    sample.main([str(saved_pipeline), "--labels", "1", "1", "--guidance_scales", "2", "--num_seeds", "2",
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
