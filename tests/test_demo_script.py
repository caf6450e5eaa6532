"""demo.py: PNGs drawn with the Visualizer, inputs as files, folders and globs, bad files skipped.

The model is the tiny one with fixed random weights saved as a checkpoint; SCORE_THR / UPDATE_THR
0 and MAX_PER_IMG 1 make it predict exactly one instance per image, which the test can recompute
with a DefaultPredictor to know where the mask is.
"""

import logging
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

import demo

from .conftest import tiny_cfg, write_tiny_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HEIGHT, WIDTH = 72, 96  # not square, so that a swapped height/width shows


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """(config file, checkpoint) of the tiny 3-class model with seeded random weights."""
    folder = tmp_path_factory.mktemp("demo_model")
    config_file = write_tiny_config(
        folder, num_classes=3, INPUT={"MIN_SIZE_TEST": HEIGHT, "MAX_SIZE_TEST": 128}
    )
    torch.manual_seed(0)
    model = build_model(tiny_cfg(3))
    DetectionCheckpointer(model, save_dir=str(folder)).save("tiny_random")
    return config_file, str(folder / "tiny_random.pth")


def easy_image(seed=0):
    """A grey background with one bright rectangle (BGR, uint8), a trivially easy picture."""
    image = np.full((HEIGHT, WIDTH, 3), 96, dtype=np.uint8)
    rng = np.random.default_rng(seed)
    y0, x0 = rng.integers(4, 20, size=2)
    image[y0 : y0 + 40, x0 : x0 + 50] = (40, 200, 240)
    return image


def write_image(path, seed=0):
    assert cv2.imwrite(str(path), easy_image(seed))
    return str(path)


def run_demo(model_files, inputs, output, threshold="0", *opts):
    config_file, weights = model_files
    argv = ["--config-file", config_file, "--input", *[str(i) for i in inputs]]
    argv += ["--output", str(output), "--confidence-threshold", threshold]
    argv += ["--opts", "MODEL.WEIGHTS", weights, "MODEL.SOLOV2.SCORE_THR", "0.0"]
    argv += ["MODEL.SOLOV2.UPDATE_THR", "0.0", "MODEL.SOLOV2.MAX_PER_IMG", "1", *opts]
    return demo.main(argv)


@pytest.fixture
def demo_log():
    """Records of the demo's logger (its parent "solov2_d2" logger does not propagate to the
    root logger once Detectron2's setup_logger has configured it, so caplog would miss them)."""
    records = []
    handler = logging.Handler(level=logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("solov2_d2.demo")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def errors(records):
    return [r.getMessage() for r in records if r.levelno >= logging.ERROR]


def predicted_instances(model_files, image):
    """The instances demo.py draws, recomputed from the same config, weights and overrides."""
    config_file, weights = model_files
    args = demo.get_parser().parse_args(
        ["--config-file", config_file, "--input", "x", "--output", "y", "--opts"]
        + ["MODEL.WEIGHTS", weights, "MODEL.SOLOV2.SCORE_THR", "0.0"]
        + ["MODEL.SOLOV2.UPDATE_THR", "0.0", "MODEL.SOLOV2.MAX_PER_IMG", "1"]
    )
    return DefaultPredictor(demo.setup_cfg(args))(image)["instances"].to("cpu")


@pytest.mark.parametrize("form", ["fast", "exact"])
def test_demo_draws_the_predicted_mask_into_a_png(model_files, tmp_path, form):
    source = write_image(tmp_path / "easy.png")
    target = tmp_path / "drawn.png"
    opts = ["MODEL.SOLOV2.FAST_INFERENCE", str(form == "fast")]
    assert run_demo(model_files, [source], target, "0", *opts) == 0

    with open(target, "rb") as stream:
        assert stream.read(8) == PNG_SIGNATURE
    original = cv2.imread(source)
    drawn = cv2.imread(str(target))
    assert drawn.shape == original.shape == (HEIGHT, WIDTH, 3)

    instances = predicted_instances(model_files, original)
    assert len(instances) == 1
    mask = instances.pred_masks[0].numpy()
    assert mask.shape == (HEIGHT, WIDTH)
    assert 20 <= mask.sum() <= 0.9 * mask.size  # some pixels inside, some outside
    changed = np.any(drawn != original, axis=2)
    # The mask is filled with a translucent colour: (nearly) every pixel under it changes. Outside
    # it only the mask's outline, the box and the label are drawn.
    assert changed[mask].mean() > 0.9
    assert changed[~mask].mean() < 0.5


def test_demo_without_instances_above_the_threshold_writes_the_input_unchanged(
    model_files, tmp_path
):
    source = write_image(tmp_path / "easy.png")
    assert run_demo(model_files, [source], tmp_path / "out.png", "1.01") == 0
    assert np.array_equal(cv2.imread(str(tmp_path / "out.png")), cv2.imread(source))


def test_demo_takes_a_folder(model_files, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    write_image(folder / "b.png", seed=1)
    write_image(folder / "a.jpg", seed=2)
    (folder / "notes.txt").write_text("not an image, not an image extension")
    assert run_demo(model_files, [folder], tmp_path / "vis") == 0
    assert sorted(os.listdir(tmp_path / "vis")) == ["a.png", "b.png"]
    for name in ("a.png", "b.png"):
        assert cv2.imread(str(tmp_path / "vis" / name)).shape == (HEIGHT, WIDTH, 3)


def test_demo_takes_a_glob(model_files, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("cat_1.png", "cat_2.png", "dog_1.png"):
        write_image(folder / name)
    assert run_demo(model_files, [str(folder / "cat_*.png")], tmp_path / "vis") == 0
    assert sorted(os.listdir(tmp_path / "vis")) == ["cat_1.png", "cat_2.png"]


def test_demo_reports_unreadable_inputs_and_draws_the_others(model_files, tmp_path, demo_log):
    folder = tmp_path / "images"
    folder.mkdir()
    write_image(folder / "good.png")
    (folder / "corrupt.png").write_bytes(PNG_SIGNATURE + b"truncated, not an image")
    (folder / "empty.jpg").write_bytes(b"")
    missing = tmp_path / "missing.png"
    assert run_demo(model_files, [folder, missing], tmp_path / "vis") == 0

    assert os.listdir(tmp_path / "vis") == ["good.png"]
    reported = errors(demo_log)
    assert len(reported) == 3, reported
    for name in ("corrupt.png", "empty.jpg", "missing.png"):
        assert sum(name in message for message in reported) == 1, (name, reported)
    summary = [r.getMessage() for r in demo_log if "images written" in r.getMessage()]
    assert summary == ["1 images written, 3 skipped"]


def test_demo_fails_when_nothing_can_be_drawn(model_files, tmp_path, demo_log):
    (tmp_path / "corrupt.png").write_bytes(b"garbage")
    assert run_demo(model_files, [tmp_path / "corrupt.png"], tmp_path / "vis") == 1
    assert run_demo(model_files, [str(tmp_path / "nothing_*.png")], tmp_path / "vis") == 1
    assert any("no input images" in message for message in errors(demo_log))
    assert not os.path.exists(tmp_path / "vis")


def test_output_names_do_not_collide_and_single_png_needs_single_input():
    paths = ["in/a.jpg", "in/a.png", "in/b.jpg"]
    assert demo.output_paths("out", paths) == ["out/a_jpg.png", "out/a_png.png", "out/b.png"]
    assert demo.output_paths("x.png", ["in/a.jpg"]) == ["x.png"]
    with pytest.raises(SystemExit, match="give a folder"):
        demo.output_paths("x.png", paths)
