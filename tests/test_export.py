"""solov2_d2.export: the exported graph under ONNX Runtime, OpenVINO (f32) and torch.export
against the PyTorch model; dynamic input sizes; the JSON; bad input."""

import copy
import glob
import json
import os
import shutil

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model

from solov2_d2 import add_solov2_config
from solov2_d2.export import ExportError, check_config, export_model, load_exported
from solov2_d2.export.metadata import metadata_path
from solov2_d2.modeling.layers import arange_linspace
from solov2_d2.modeling.postprocess import point_nms

from .conftest import ROOT, SHARED, sharpen_untrained_heads, tiny_cfg

pytest.importorskip("onnxruntime", reason="the [export] extra: pip install -e .[export]")
pytest.importorskip("openvino", reason="the [export] extra: pip install -e .[export]")

PHOTOS = sorted(glob.glob(os.path.join(SHARED, "data", "coco_real_sample", "images", "*.jpg")))
EXPORTED_BACKENDS = ("onnxruntime", "openvino")
# ONNX Runtime's and OpenVINO's kernels round differently from PyTorch's (scores within ~1e-5
# here): the tolerances.
MIN_MASK_IOU = 0.99
MAX_SCORE_DIFF = 1e-4


def test_arange_linspace_is_linspace():
    for steps in range(2, 600):
        assert torch.equal(
            arange_linspace(-1, 1, steps, dtype=torch.float32), torch.linspace(-1, 1, steps)
        ), steps


def assert_same_detections(expected, actual, max_score_diff=MAX_SCORE_DIFF):
    """Same number of detections; each expected one matched by class to an unused actual one
    with mask IoU >= MIN_MASK_IOU and |score diff| <= max_score_diff."""
    assert len(expected) > 0
    assert len(actual) == len(expected)
    used = set()
    for i in range(len(expected)):
        mask = expected.pred_masks[i]
        best, best_iou = None, -1.0
        for j in torch.nonzero(actual.pred_classes == expected.pred_classes[i])[:, 0].tolist():
            if j in used:
                continue
            union = (mask | actual.pred_masks[j]).sum().item()
            iou = (mask & actual.pred_masks[j]).sum().item() / union if union else 1.0
            if iou > best_iou:
                best, best_iou = j, iou
        assert best is not None, f"detection {i}: no detection of class {expected.pred_classes[i]}"
        assert best_iou >= MIN_MASK_IOU, (i, best_iou)
        score_diff = abs(float(expected.scores[i]) - float(actual.scores[best]))
        assert score_diff <= max_score_diff, (i, score_diff)
        used.add(best)


def candidate_count(model, image):
    with torch.no_grad():
        features = model.backbone(model.preprocess_image([{"image": image}]).tensor)
        logits, _ = model.ins_head(features)
    scores = torch.cat([point_nms(level.sigmoid()).flatten(2) for level in logits], dim=2)
    return int((scores > model.inference_params.score_threshold).sum())


def export_both(cfg, model, directory):
    return {
        "onnx": export_model(cfg, model, str(directory), "onnx"),
        "torch-export": export_model(cfg, model, str(directory), "torch-export"),
    }


def check_against_eager(model, paths, images, max_score_diff=MAX_SCORE_DIFF):
    with torch.no_grad():
        expected = [model([inputs])[0]["instances"] for inputs in images]
    assert sum(len(e) for e in expected) > 0
    exported = load_exported(paths["torch-export"], "torch")
    for inputs, eager in zip(images, expected):
        result = exported([inputs])[0]
        assert not result["overflow"]
        actual = result["instances"]
        assert len(eager) > 0 and len(actual) == len(eager)
        # torch.export runs the same kernels as eager: bit for bit.
        for field in ("scores", "pred_classes", "pred_masks"):
            assert torch.equal(getattr(actual, field), getattr(eager, field)), field
        assert torch.equal(actual.pred_boxes.tensor, eager.pred_boxes.tensor)
    for backend in EXPORTED_BACKENDS:
        runtime = load_exported(paths["onnx"], backend)
        for inputs, eager in zip(images, expected):
            result = runtime([inputs])[0]
            assert not result["overflow"]
            assert result["instances"].image_size == eager.image_size
            assert_same_detections(eager, result["instances"], max_score_diff)


# ------------------------------------------------------------------ tiny model, synthetic images
@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = sharpen_untrained_heads(build_model(cfg)).eval()
    # The graph is the network as built: the eager reference is the exact form, not the CPU
    # forward's optimized copy (MODEL.SOLOV2.FAST_INFERENCE).
    model.fast_inference = False
    directory = tmp_path_factory.mktemp("tiny_export")
    return cfg, model, export_both(cfg, model, directory)


def synthetic_images():
    generator = torch.Generator().manual_seed(1)
    # Three padded sizes (128 x 160, 128 x 96, 224 x 160) through one file; one with an output
    # size of its own.
    sizes = [(100, 130), (128, 96), (200, 150)]
    images = [
        {"image": torch.randint(0, 256, (3, h, w), generator=generator).float()} for h, w in sizes
    ]
    images[2].update(height=300, width=225)
    return images


def test_tiny_model_three_sizes_one_file(tiny_export):
    cfg, model, paths = tiny_export
    check_against_eager(model, paths, synthetic_images())


def test_metadata_fields(tiny_export):
    cfg, model, paths = tiny_export
    with open(metadata_path(paths["onnx"])) as stream:
        metadata = json.load(stream)
    assert metadata["format"] == "onnx" and metadata["model_file"] == "model.onnx"
    assert metadata["pixel_mean"] == list(cfg.MODEL.PIXEL_MEAN)
    assert metadata["input_format"] == cfg.INPUT.FORMAT
    assert metadata["size_divisibility"] == 32
    assert metadata["inference_params"]["max_per_image"] == cfg.MODEL.SOLOV2.MAX_PER_IMG
    assert metadata["versions"]["torch"] == torch.__version__ and "onnx" in metadata["versions"]
    check_config(cfg, metadata, metadata_path(paths["onnx"]))  # the config it came from: fine


def test_export_tool_and_demo(tmp_path, tiny_export):
    """tools/export_model.py with Detectron2's flags, then demo.py draws with the result."""
    import runpy

    from .conftest import write_tiny_config

    config = write_tiny_config(tmp_path)
    tool = runpy.run_path(os.path.join(ROOT, "tools", "export_model.py"))
    out = tmp_path / "exported"
    assert (
        tool["main"](
            ["--config-file", config, "--format", "onnx", "--output", str(out), "MODEL.WEIGHTS", ""]
        )
        == 0
    )
    assert (out / "model.onnx").is_file() and (out / "model.onnx.json").is_file()
    import cv2
    import numpy as np

    image = tmp_path / "in.png"
    cv2.imwrite(str(image), np.random.RandomState(0).randint(0, 256, (120, 150, 3), np.uint8))
    demo = runpy.run_path(os.path.join(ROOT, "demo.py"))
    target = tmp_path / "vis.png"
    argv = ["--backend", "onnxruntime", "--model", str(out / "model.onnx")]
    argv += ["--input", str(image), "--output", str(target), "--config-file", config]
    assert demo["main"](argv) == 0 and target.is_file()


# ------------------------------------------------------------------------------------ bad input
def test_missing_and_corrupt_model_file(tmp_path, tiny_export):
    _, _, paths = tiny_export
    with pytest.raises(ExportError, match="no such model file"):
        load_exported(str(tmp_path / "model.onnx"), "onnxruntime")
    copy = tmp_path / "model.onnx"
    shutil.copy(paths["onnx"], copy)
    with pytest.raises(ExportError, match=r"model\.onnx\.json: missing"):
        load_exported(str(copy), "onnxruntime")
    shutil.copy(metadata_path(paths["onnx"]), metadata_path(str(copy)))
    with open(copy, "r+b") as stream:  # truncated
        stream.truncate(1000)
    with pytest.raises(ExportError, match="checksum differs"):
        load_exported(str(copy), "onnxruntime")
    # The checksum of the damaged file recorded too: the runtime's own error, naming the file.
    metadata = json.loads(open(metadata_path(str(copy))).read())
    from solov2_d2.export.metadata import file_sha256

    metadata["model_sha256"] = file_sha256(str(copy))
    with open(metadata_path(str(copy)), "w") as stream:
        json.dump(metadata, stream)
    for backend in EXPORTED_BACKENDS:
        with pytest.raises(ExportError, match=f"{copy}: {backend} cannot load it"):
            load_exported(str(copy), backend)
    with open(metadata_path(str(copy)), "w") as stream:
        stream.write("{not json")
    with pytest.raises(ExportError, match="not a readable JSON file"):
        load_exported(str(copy), "onnxruntime")


def test_export_refuses_the_winograd_fast_path(tmp_path, tiny_export):
    from solov2_d2.modeling.fast import optimize_for_inference

    cfg, model, _ = tiny_export
    fast = optimize_for_inference(copy.deepcopy(model))
    with pytest.raises(ValueError, match="Winograd convolutions.*winograd=False"):
        export_model(cfg, fast, str(tmp_path), "onnx")
    assert not os.listdir(tmp_path)


def test_format_backend_mismatch(tiny_export):
    _, _, paths = tiny_export
    with pytest.raises(ExportError, match="backend torch runs torch-export models"):
        load_exported(paths["onnx"], "torch")
    with pytest.raises(ExportError, match="backend onnxruntime runs onnx models"):
        load_exported(paths["torch-export"], "onnxruntime")


def test_config_mismatch(tiny_export):
    cfg, _, paths = tiny_export
    other = cfg.clone()
    other.MODEL.SOLOV2.SCORE_THR = 0.3
    other.INPUT.FORMAT = "RGB"
    metadata = load_exported(paths["onnx"], "onnxruntime").metadata
    with pytest.raises(
        ExportError,
        match=r"model\.onnx\.json: the config does not match.*" r"input_format.*inference_params",
    ):
        check_config(other, metadata, metadata_path(paths["onnx"]))


def test_wrong_channel_count_and_size(tiny_export):
    _, _, paths = tiny_export
    model = load_exported(paths["onnx"], "onnxruntime")
    with pytest.raises(ExportError, match=r"must be \(3, H, W\) in BGR .*got shape \(1, 64, 64\)"):
        model([{"image": torch.zeros(1, 64, 64)}])
    with pytest.raises(ExportError, match=r"got shape \(64, 64\)"):
        model([{"image": torch.zeros(64, 64)}])
    with pytest.raises(ExportError, match="padded sizes from 96 to 4096"):
        model([{"image": torch.zeros(3, 40, 200)}])


# ---------------------------------------------------------------- R50 and Light on real photos
# Random weights; the category predictor scaled so that a few hundred (cell, class) pairs pass
# SCORE_THR on these photos at this size (asserted below), the kernel predictor x10 so that mask
# logits stay away from MASK_THR (sharpen_untrained_heads).
PHOTO_SHORT_SIDE = 256  # small: an R50 at its 800-pixel test size takes tens of s on 2 cores


def real_model(name, category_factor):
    cfg = get_cfg()
    add_solov2_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", name))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.SOLOV2.FAST_INFERENCE = False  # eager = the exact form, the graph's network
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.ins_head.cate_pred.weight.mul_(category_factor)
        model.ins_head.kernel_pred.weight.mul_(10.0)
    return cfg, model


def photo_inputs(count):
    resize = T.ResizeShortestEdge([PHOTO_SHORT_SIDE] * 2, 400)
    inputs = []
    for path in PHOTOS[:count]:
        image = read_image(path, format="BGR")
        resized = resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
        inputs.append({"image": tensor, "height": image.shape[0], "width": image.shape[1]})
    return inputs


# The R50 config's scores are held to 1e-3, not the 1e-4. Measured (torch 2.14.1, ONNX
# Runtime 1.32): four of the 100 detections of a photo differ from eager by up to 1.2e-4 in score,
# labels and masks matching. Not an export error: ONNX Runtime's convolutions round differently
# (kernels and mask feature within 2e-6 relative through the 50-layer network), which moves mask
# logits by up to 8e-4 and flips 2 of 2.6 million candidate-mask pixels at MASK_THR. A score is a
# function of pixel counts (maskness, and the Matrix NMS decay through mask IoU), so one flipped
# pixel in a mask of a few hundred 1/4-resolution pixels moves the scores of the masks that
# overlap it by ~1e-4. With FrozenBN statistics calibrated to O(1) activations the kernels differ
# by 5e-5 relative and the gap grows (to 2e-3), so it is this discontinuity, not the weights'
# scale. The Light config (fewer layers) keeps 1e-4.
R50_MAX_SCORE_DIFF = 1e-3
# Per config: (category predictor factor, score tolerance of the exported runtimes against eager).
REAL_CONFIGS = {
    "SOLOv2_R50_3x.yaml": (1.4, R50_MAX_SCORE_DIFF),
    "SOLOv2_Light_448_R50_3x.yaml": (2.5, MAX_SCORE_DIFF),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_real_photos(name, tmp_path):
    if not PHOTOS:
        pytest.skip("../shared/data/coco_real_sample (real COCO photos) is not beside this clone")
    category_factor, max_score_diff = REAL_CONFIGS[name]
    cfg, model = real_model(name, category_factor)
    images = photo_inputs(2)
    counts = [candidate_count(model, inputs["image"]) for inputs in images]
    max_candidates = 2 * cfg.MODEL.SOLOV2.NMS_PRE
    assert all(100 <= c < max_candidates for c in counts), counts
    check_against_eager(model, export_both(cfg, model, tmp_path), images, max_score_diff)
