"""Bad input and faults (issue 5): every messy annotation, image and run either trains normally,
skips the bad part with a warning naming the annotation, or stops with a message naming the file.

The policy per case is in README.md; each test below covers one bullet of it. The
exact-resume test is in test_resume_determinism.py.
"""

import json
import logging
import math
import os
import uuid

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.datasets import register_coco_instances as d2_register_coco_instances
from detectron2.data.detection_utils import SizeMismatchError
from detectron2.evaluation import DatasetEvaluator, DatasetEvaluators
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, BoxMode, Instances
from PIL import Image

import solov2_d2.modeling.solov2 as solov2_module
import train_net
from solov2_d2.data import SOLOv2DatasetMapper, register_shapes_dataset
from solov2_d2.data.checks import (
    DatasetError,
    ImageSizeError,
    get_dataset_dicts,
    register_coco_instances,
)
from solov2_d2.engine import build_resumable_train_loader, non_finite_loss_error

from .conftest import tiny_cfg

NUM_CLASSES = 3
CATEGORIES = [{"id": i + 1, "name": f"class{i}"} for i in range(NUM_CLASSES)]


# ------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_cfg(NUM_CLASSES))


@pytest.fixture
def target_spy(monkeypatch):
    """The SOLOv2Targets of every image the model computes losses for."""
    records = []
    original = solov2_module.assign_targets_single_image

    def spy(*args, **kwargs):
        targets = original(*args, **kwargs)
        records.append(targets)
        return targets

    monkeypatch.setattr(solov2_module, "assign_targets_single_image", spy)
    return records


@pytest.fixture
def solov2_log():
    """The text of what solov2_d2's loggers emit during the test (caplog misses it once something
    has called Detectron2's setup_logger(name="solov2_d2"), which stops propagation)."""
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    target = logging.getLogger("solov2_d2")
    level = target.level
    target.setLevel(logging.INFO)
    target.addHandler(handler)
    yield lambda: "\n".join(record.getMessage() for record in records)
    target.removeHandler(handler)
    target.setLevel(level)


@pytest.fixture
def dataset_names():
    """Unique dataset names, unregistered after the test."""
    names = []

    def new(prefix="bad_input"):
        names.append(f"{prefix}_{uuid.uuid4().hex[:8]}")
        return names[-1]

    yield new
    for name in names:
        if name in DatasetCatalog:
            DatasetCatalog.remove(name)
        if name in MetadataCatalog:
            MetadataCatalog.remove(name)


def square(x0, y0, x1, y1):
    return [float(x0), float(y0), float(x1), float(y0), float(x1), float(y1), float(x0), float(y1)]


def write_rgb(path, height=64, width=64, boxes=()):
    """A dark RGB PNG/JPEG with bright boxes (x0, y0, x1, y1)."""
    image = np.full((height, width, 3), 30, np.uint8)
    for x0, y0, x1, y1 in boxes:
        image[y0:y1, x0:x1] = 220
    Image.fromarray(image).save(path)
    return str(path)


def record(file_name, annotations, height=64, width=64, image_id=1):
    return {
        "file_name": str(file_name),
        "image_id": image_id,
        "height": height,
        "width": width,
        "annotations": annotations,
    }


def annotation(ann_id, polygon_or_segmentation, category=0, bbox=None, **extra):
    segmentation = polygon_or_segmentation
    if bbox is None:
        coords = np.asarray(segmentation[0], dtype=float)
        points = coords[: len(coords) // 2 * 2].reshape(-1, 2)
        x0, y0 = points.min(0)
        x1, y1 = points.max(0)
        bbox = [x0, y0, x1 - x0, y1 - y0]
    result = dict(
        id=ann_id,
        category_id=category,
        bbox=bbox,
        bbox_mode=BoxMode.XYWH_ABS,
        segmentation=segmentation,
        iscrowd=0,
    )
    result.update(extra)
    return result


def train_mapper(**overrides):
    cfg = tiny_cfg(NUM_CLASSES)
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MAX_SIZE_TRAIN = 64
    cfg.INPUT.RANDOM_FLIP = "none"
    for key, value in overrides.items():
        cfg.merge_from_list([key, value])
    return SOLOv2DatasetMapper(cfg, is_train=True)


def eval_mapper(**overrides):
    cfg = tiny_cfg(NUM_CLASSES)
    for key, value in overrides.items():
        cfg.merge_from_list([key, value])
    return SOLOv2DatasetMapper(cfg, is_train=False)


def assert_trains(model, inputs):
    """Finite losses and gradients for a batch of mapped inputs."""
    model.train()
    model.zero_grad()
    losses = model(inputs)
    total = sum(losses.values())
    assert all(torch.isfinite(v) for v in losses.values()), losses
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    return losses


def write_coco(tmp_path, images, annotations, categories=CATEGORIES, name="instances.json"):
    path = tmp_path / name
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return str(path)


def coco_image(image_id, file_name, height=64, width=64):
    return {"id": image_id, "file_name": file_name, "height": height, "width": width}


def coco_annotation(ann_id, image_id, polygon, category_id=1, iscrowd=0):
    points = np.asarray(polygon, dtype=float).reshape(-1, 2) if len(polygon) >= 2 else None
    bbox = [0, 0, 1, 1]
    if points is not None and len(points):
        x0, y0 = points.min(0)
        x1, y1 = points.max(0)
        bbox = [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": [polygon],
        "bbox": bbox,
        "area": bbox[2] * bbox[3],
        "iscrowd": iscrowd,
    }


# ------------------------------------------------------------------------------- data: images


def test_base_config_keeps_images_without_annotations():
    """Base-SOLOv2.yaml turns Detectron2's FILTER_EMPTY_ANNOTATIONS (default True) off."""
    assert tiny_cfg().DATALOADER.FILTER_EMPTY_ANNOTATIONS is False


def test_images_without_annotations_train_as_negatives(tmp_path, model, solov2_log):
    with_objects = write_rgb(tmp_path / "a.png", boxes=[(8, 8, 30, 30)])
    empty = write_rgb(tmp_path / "b.png")
    no_key = write_rgb(tmp_path / "c.png")
    dicts = [
        record(with_objects, [annotation(1, [square(8, 8, 30, 30)])], image_id=1),
        record(empty, [], image_id=2),
        {k: v for k, v in record(no_key, [], image_id=3).items() if k != "annotations"},
    ]
    name = "negatives_" + uuid.uuid4().hex[:8]
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(thing_classes=["a", "b", "c"])
    try:
        kept = get_dataset_dicts(name, training=True, num_classes=NUM_CLASSES)
        assert [r["image_id"] for r in kept] == [1, 2, 3]
        assert "2 of 3 images (2 without annotations and 0 with crowd" in solov2_log()
        dropped = get_dataset_dicts(name, training=True, num_classes=NUM_CLASSES, filter_empty=True)
        assert [r["image_id"] for r in dropped] == [1]
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    mapper = train_mapper()
    mapped = [mapper(r) for r in kept]
    assert [len(m["instances"]) for m in mapped] == [1, 0, 0]
    assert_trains(model, mapped[1:])  # a batch of negatives only
    assert_trains(model, mapped)


def test_crowd_only_image_trains_as_negative(tmp_path, model):
    path = write_rgb(tmp_path / "crowd.png", boxes=[(8, 8, 40, 40)])
    crowd = annotation(5, [square(8, 8, 40, 40)], iscrowd=1)
    mapped = train_mapper()(record(path, [crowd]))
    assert len(mapped["instances"]) == 0
    losses = assert_trains(model, [mapped])
    assert float(losses["loss_mask"].detach()) == 0.0


@pytest.mark.parametrize(
    "mode, value, expected",
    [
        ("L", 77, (77, 77, 77)),
        ("LA", (77, 0), (77, 77, 77)),
        ("1", 1, (255, 255, 255)),
        ("P", 3, (0, 200, 100)),  # palette entry 3
        ("RGBA", (10, 200, 30, 0), (10, 200, 30)),  # alpha dropped, even when transparent
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
    ],
)
def test_grayscale_palette_and_alpha_images_load_as_rgb(tmp_path, mode, value, expected):
    image = Image.new(mode, (40, 30), value)
    if mode == "P":
        palette = [0] * 768
        palette[9:12] = [0, 200, 100]
        image.putpalette(palette)
    path = str(tmp_path / ("image.jpg" if mode == "CMYK" else "image.png"))
    image.save(path)
    mapped = eval_mapper(**{"INPUT.MIN_SIZE_TEST": 30, "INPUT.MAX_SIZE_TEST": 40})(
        {"file_name": path, "image_id": 1, "height": 30, "width": 40}
    )
    tensor = mapped["image"]
    assert tensor.dtype == torch.uint8 and tuple(tensor.shape) == (3, 30, 40)
    bgr = tuple(int(c) for c in tensor[:, 15, 20])
    assert bgr == tuple(reversed(expected))  # INPUT.FORMAT is BGR


def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    """Pillow's convert("RGB") of a 16-bit PNG (mode I;16) clips at 255: a mid-gray 16-bit image
    would load white. It is scaled to 8 bit (high byte), as Pillow reads 16-bit RGB PNGs."""
    values = np.zeros((32, 48), np.uint16)
    values[:, :16] = 0x8000
    values[:, 16:32] = 0xFFFF
    values[:, 32:] = 0x00FF  # dark in 16 bit: must stay dark
    path = str(tmp_path / "gray16.png")
    cv2.imwrite(path, values)
    assert Image.open(path).mode.startswith("I;16")
    mapped = eval_mapper(**{"INPUT.MIN_SIZE_TEST": 32, "INPUT.MAX_SIZE_TEST": 48})(
        {"file_name": path, "image_id": 1, "height": 32, "width": 48}
    )
    row = mapped["image"][0, 10]
    assert (int(row[5]), int(row[20]), int(row[40])) == (128, 255, 0)


def test_16_bit_rgb_png_loads_at_8_bit(tmp_path):
    values = np.zeros((32, 32, 3), np.uint16)
    values[..., 2] = 0x8000  # red, in OpenCV's BGR order
    path = str(tmp_path / "rgb16.png")
    cv2.imwrite(path, values)
    mapped = eval_mapper(**{"INPUT.MIN_SIZE_TEST": 32, "INPUT.MAX_SIZE_TEST": 32})(
        {"file_name": path, "image_id": 1, "height": 32, "width": 32}
    )
    assert tuple(int(c) for c in mapped["image"][:, 5, 5]) == (0, 0, 128)  # BGR


@pytest.mark.parametrize("kind", ["int32", "float"])
def test_32_bit_and_float_images_stop_with_a_clear_message(tmp_path, kind):
    path = str(tmp_path / f"{kind}.tif")
    if kind == "int32":
        Image.fromarray(np.full((16, 16), 1 << 20, np.int32)).save(path)
        expected = "32-bit integer image"
    else:
        Image.fromarray(np.full((16, 16), 0.5, np.float32)).save(path)
        expected = "floating-point image"
    with pytest.raises(DatasetError, match=expected) as error:
        eval_mapper()({"file_name": path, "image_id": 1})
    assert path in str(error.value)


def _exif_jpeg(path, raw, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(raw).save(path, "JPEG", quality=95, exif=exif.tobytes())
    return str(path)


def test_exif_rotated_jpeg_lines_up_with_annotations_in_the_displayed_frame(tmp_path, model):
    """Height/width and annotations are in the displayed (EXIF-applied) frame, as annotation tools
    show the image and as Detectron2 loads it: the loaded pixels under the mask are the object."""
    from PIL import ImageOps

    raw = np.full((40, 64, 3), 20, np.uint8)  # stored 64 wide, 40 high
    raw[4:16, 40:60] = 235  # a bright block near the stored top-right corner
    path = _exif_jpeg(tmp_path / "rotated.jpg", raw, orientation=6)
    displayed = np.asarray(ImageOps.exif_transpose(Image.open(path)))
    assert displayed.shape[:2] == (64, 40)
    ys, xs = np.nonzero(displayed[..., 0] > 128)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    polygon = square(x0 + 1, y0 + 1, x1 - 1, y1 - 1)
    data = record(path, [annotation(1, [polygon])], height=64, width=40)
    mapped = train_mapper(**{"INPUT.MIN_SIZE_TRAIN": (40,), "INPUT.MAX_SIZE_TRAIN": 64})(data)
    image = mapped["image"]
    assert tuple(image.shape[1:]) == (64, 40)
    mask = mapped["instances"].gt_masks.tensor[0]
    assert mask.sum() > 100
    assert image[1][mask].float().mean() > 200 and image[1][~mask].float().mean() < 60
    assert_trains(model, [mapped])


def test_exif_size_mismatch_names_the_file_and_the_rotation(tmp_path):
    """Recorded size = the stored (unrotated) pixels: Detectron2's check_image_size message only
    says "Mismatched image shape"; ours names the file and explains the EXIF rotation."""
    path = _exif_jpeg(tmp_path / "rotated.jpg", np.zeros((40, 64, 3), np.uint8), orientation=8)
    data = record(path, [annotation(1, [square(2, 2, 20, 20)])], height=40, width=64)
    with pytest.raises(ImageSizeError) as error:
        train_mapper()(data)
    message = str(error.value)
    assert path in message and "EXIF orientation 8" in message and "64 x 40" in message
    assert isinstance(error.value, SizeMismatchError)  # still Detectron2's error type


def test_size_mismatch_names_the_file(tmp_path):
    path = write_rgb(tmp_path / "small.png", height=30, width=50)
    with pytest.raises(SizeMismatchError) as error:
        eval_mapper()({"file_name": path, "image_id": 4, "height": 31, "width": 50})
    assert path in str(error.value) and "image_id 4" in str(error.value)
    assert "50 x 30" in str(error.value) and "50 x 31" in str(error.value)


def test_missing_image_files_are_listed_before_training(tmp_path, dataset_names):
    write_rgb(tmp_path / "present.png")
    images = [coco_image(i, f"{n}.png") for i, n in enumerate(["present", "gone1", "gone2"], 1)]
    json_file = write_coco(tmp_path, images, [])
    name = dataset_names()
    d2_register_coco_instances(name, {}, json_file, str(tmp_path))
    with pytest.raises(DatasetError) as error:
        get_dataset_dicts(name, training=True, num_classes=NUM_CLASSES)
    message = str(error.value)
    assert "2 image file(s) not found" in message
    assert str(tmp_path / "gone1.png") in message and str(tmp_path / "gone2.png") in message


@pytest.mark.parametrize("damage", ["missing", "garbage", "truncated", "empty", "directory"])
def test_missing_or_corrupt_image_stops_naming_the_file(tmp_path, damage):
    path = tmp_path / "image.png"
    if damage != "missing":
        write_rgb(path, height=64, width=64, boxes=[(3, 3, 50, 50)])
        content = path.read_bytes()
        if damage == "garbage":
            path.write_bytes(os.urandom(2048))
        elif damage == "truncated":
            path.write_bytes(content[: len(content) // 2])
        elif damage == "empty":
            path.write_bytes(b"")
        else:
            path.unlink()
            path.mkdir()
    data = record(path, [annotation(1, [square(3, 3, 50, 50)])])
    for mapper in (train_mapper(), eval_mapper()):
        with pytest.raises(DatasetError) as error:
            mapper(data)
        assert str(path) in str(error.value)
        expected = {"missing": "not found", "directory": "is a directory"}.get(damage, "decode")
        assert expected in str(error.value)


def test_32x32_and_4000x6000_images_in_one_batch(tmp_path, model):
    """Through the test mapper (resized to MIN_SIZE_TEST) and the model, one batch of very
    different sizes; masks come back at each original size."""
    small = write_rgb(tmp_path / "small.png", height=32, width=32, boxes=[(4, 4, 20, 20)])
    big_path = str(tmp_path / "big.jpg")
    big = np.full((4000, 6000, 3), 30, np.uint8)
    big[500:2500, 1000:4000] = 220
    cv2.imwrite(big_path, big)
    mapper = eval_mapper(**{"INPUT.MIN_SIZE_TEST": 96, "INPUT.MAX_SIZE_TEST": 160})
    inputs = [
        mapper({"file_name": small, "image_id": 1, "height": 32, "width": 32}),
        mapper({"file_name": big_path, "image_id": 2, "height": 4000, "width": 6000}),
    ]
    assert tuple(inputs[0]["image"].shape) == (3, 96, 96)
    assert tuple(inputs[1]["image"].shape) == (3, 96, 144)
    params = model.inference_params
    saved = (params.score_threshold, params.update_threshold, params.max_per_image)
    params.score_threshold, params.update_threshold, params.max_per_image = 0.0, 0.0, 2
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(inputs)
    finally:
        params.score_threshold, params.update_threshold, params.max_per_image = saved
    for result, size in zip(outputs, [(32, 32), (4000, 6000)]):
        instances = result["instances"]
        assert instances.image_size == size
        assert 0 < len(instances) <= 2
        assert tuple(instances.pred_masks.shape[1:]) == size
        assert instances.pred_masks.dtype == torch.bool


def test_tiny_image_without_resize_runs_inference(model):
    """Smaller than one stride of the coarsest level: padded, still well-typed results."""
    model.eval()
    with torch.no_grad():
        (result,) = model([{"image": torch.randint(0, 255, (3, 20, 24), dtype=torch.uint8)}])
    assert result["instances"].image_size == (20, 24)


# -------------------------------------------------------------------------- data: annotations


def test_degenerate_polygons_are_skipped_with_a_warning_naming_the_annotation(
    tmp_path, model, solov2_log
):
    path = write_rgb(tmp_path / "a.png", boxes=[(8, 8, 30, 30), (40, 40, 60, 60)])
    annotations = [
        # one good polygon, one with 2 points, one with zero area (collinear): the good one stays
        annotation(7, [square(8, 8, 30, 30), [1, 1, 5, 5], [0, 0, 10, 10, 20, 20]]),
        # only degenerate polygons: the whole annotation goes
        annotation(8, [[40, 40, 50, 50]], bbox=[40, 40, 10, 10]),
        annotation(9, [square(40, 40, 60, 60)]),
    ]
    mapped = train_mapper()(record(path, annotations))
    assert len(mapped["instances"]) == 2
    for expected in (
        "annotation id 7: polygon 1 has 2 point(s), fewer than 3: skipped",
        "annotation id 7: polygon 2 has zero area: skipped",
        "annotation id 8: no usable polygon left: annotation skipped",
    ):
        assert expected in solov2_log()
    assert path in solov2_log()
    assert_trains(model, [mapped])


def test_degenerate_polygons_in_coco_json_are_listed_by_id(tmp_path, dataset_names, solov2_log):
    """Detectron2's load_coco_json drops polygons of < 3 points itself and only counts the
    annotations that lose all of them; ours lists their ids; zero-area ones get named at loading
    for training."""
    write_rgb(tmp_path / "a.png")
    annotations = [
        coco_annotation(11, 1, square(8, 8, 30, 30)),
        coco_annotation(12, 1, [1, 1, 5, 5]),
        coco_annotation(13, 1, [0, 0, 10, 10, 20, 20]),
    ]
    json_file = write_coco(tmp_path, [coco_image(1, "a.png")], annotations)
    name = dataset_names()
    register_coco_instances(name, {}, json_file, str(tmp_path))
    dicts = get_dataset_dicts(name, training=True, num_classes=NUM_CLASSES)
    assert "annotation id 12 (image_id 1)" in solov2_log()
    assert "annotation id 13: polygon 0 has zero area" in solov2_log()
    assert [a["id"] for a in dicts[0]["annotations"]] == [11]


@pytest.mark.parametrize(
    "segmentation, expected",
    [
        ([[0, 0, 10, 0, 10]], "odd number of coordinates (5)"),
        ([[0, 0, 10, 0, float("nan"), 10]], "NaN or infinite"),
        ([[0, 0, "10", 0, 10, 10]], "not a number"),
        ({"size": [10, 10], "counts": "0"}, "RLE mask is height x width = 10 x 10"),
        (np.ones((10, 10), bool), "mask array has shape (10, 10)"),
        (42, "neither polygons, RLE nor a mask array"),
    ],
)
def test_malformed_segmentation_stops_naming_the_annotation(tmp_path, segmentation, expected):
    path = write_rgb(tmp_path / "a.png")
    bad = annotation(21, [square(0, 0, 10, 10)])
    bad["segmentation"] = segmentation
    with pytest.raises(DatasetError) as error:
        train_mapper()(record(path, [bad]))
    message = str(error.value)
    assert expected in message and "annotation id 21" in message and path in message


def test_malformed_annotations_are_all_listed_before_training(tmp_path, dataset_names):
    path = write_rgb(tmp_path / "a.png")
    dicts = [
        record(path, [annotation(31, [[0, 0, 1]]), annotation(32, [square(0, 0, 9, 9)], 7)]),
        record(
            path, [annotation(33, [square(0, 0, 9, 9)], bbox=[0, 0, float("inf"), 1])], 64, 64, 2
        ),
    ]
    name = dataset_names()
    DatasetCatalog.register(name, lambda: dicts)
    with pytest.raises(DatasetError) as error:
        get_dataset_dicts(name, training=True, num_classes=NUM_CLASSES)
    message = str(error.value)
    assert "3 malformed annotation(s)" in message
    assert "annotation id 31: polygon 0 has an odd number" in message
    assert "annotation id 32: category_id 7 is outside the 3 classes" in message
    assert "annotation id 33: bbox" in message


@pytest.mark.parametrize("mask_kind", ["array", "polygon"])
def test_instance_outside_the_image_after_augmentation_is_dropped(tmp_path, model, mask_kind):
    """A crop that leaves an instance with no pixel drops it (Detectron2's filter_empty_instances);
    the cut one keeps its visible part, with its box recomputed from the mask."""
    if mask_kind == "polygon":
        # Detectron2's CropTransform clips polygons with shapely (not a dependency here).
        pytest.importorskip("shapely")
    boxes = [(4, 4, 20, 20), (50, 50, 62, 62), (30, 10, 50, 24)]  # the 2nd is outside the crop
    path = write_rgb(tmp_path / "a.png", boxes=boxes)
    annotations = []
    for ann_id, (x0, y0, x1, y1) in enumerate(boxes, 1):
        segmentation = [square(x0, y0, x1, y1)]
        if mask_kind == "array":
            segmentation = np.zeros((64, 64), np.uint8)
            segmentation[y0:y1, x0:x1] = 1
        annotations.append(annotation(ann_id, segmentation, bbox=[x0, y0, x1 - x0, y1 - y0]))
    data = record(path, annotations)
    mapper = SOLOv2DatasetMapper(
        is_train=True,
        augmentations=[T.CropTransform(0, 0, 40, 40)],
        image_format="BGR",
        use_instance_mask=True,
        instance_mask_format="bitmask",
        recompute_boxes=True,
        num_classes=NUM_CLASSES,
    )
    instances = mapper(data)["instances"]
    assert len(instances) == 2
    assert instances.gt_boxes.tensor.tolist() == [[4, 4, 20, 20], [30, 10, 40, 24]]
    assert_trains(model, [mapper(data)])


def test_objects_smaller_than_one_mask_feature_pixel_train(model, target_spy):
    """1x1 and 2x2 px objects (the mask feature has stride 4): each gets a positive cell, its
    mask target may vanish at 1/4 resolution, the losses stay finite."""
    height = width = 64
    masks = torch.zeros(2, height, width, dtype=torch.bool)
    masks[0, 10, 10] = True
    masks[1, 40:42, 30:32] = True
    instances = Instances((height, width))
    instances.gt_boxes = Boxes(torch.tensor([[10.0, 10, 11, 11], [30.0, 40, 32, 42]]))
    instances.gt_classes = torch.tensor([0, 1])
    instances.gt_masks = BitMasks(masks)
    image = torch.full((3, height, width), 30.0)
    image[:, masks.any(0)] = 220.0
    assert_trains(model, [{"image": image, "instances": instances}])
    (targets,) = target_spy
    assigned = torch.cat(targets.positive_instances)
    assert set(assigned.tolist()) == {0, 1}


def test_objects_outside_the_scale_ranges_go_to_the_end_levels(target_spy):
    """An object larger than the top FPN_SCALE_RANGES range trains the last level, one smaller
    than the first range's lower bound the first level: none is dropped silently (the clamp of
    the scales in target_assigner.assign_targets_single_image)."""
    cfg = tiny_cfg(NUM_CLASSES)
    cfg.MODEL.SOLOV2.FPN_SCALE_RANGES = ((4, 16), (8, 24), (12, 32), (16, 40), (20, 48))
    torch.manual_seed(0)
    model = build_model(cfg)
    height = width = 64
    masks = torch.zeros(2, height, width, dtype=torch.bool)
    masks[0, 20:22, 20:22] = True  # sqrt(area) 2 < 4
    masks[1, 2:62, 2:62] = True  # sqrt(area) 60 > 48
    instances = Instances((height, width))
    instances.gt_boxes = Boxes(torch.tensor([[20.0, 20, 22, 22], [2.0, 2, 62, 62]]))
    instances.gt_classes = torch.tensor([0, 1])
    instances.gt_masks = BitMasks(masks)
    assert_trains(model, [{"image": torch.rand(3, height, width) * 255, "instances": instances}])
    (targets,) = target_spy
    per_level = [set(level.tolist()) for level in targets.positive_instances]
    assert 0 in per_level[0], per_level
    assert 1 in per_level[-1], per_level


@pytest.mark.parametrize("register", [d2_register_coco_instances, register_coco_instances])
def test_undeclared_category_id_names_annotation_and_file(tmp_path, dataset_names, register):
    """Detectron2's load_coco_json raises a KeyError naming neither annotation nor file."""
    write_rgb(tmp_path / "a.png")
    write_rgb(tmp_path / "b.png")
    annotations = [
        coco_annotation(41, 1, square(2, 2, 20, 20), category_id=1),
        coco_annotation(42, 2, square(2, 2, 20, 20), category_id=9),
    ]
    images = [coco_image(1, "a.png"), coco_image(2, "b.png")]
    json_file = write_coco(tmp_path, images, annotations)
    name = dataset_names()
    register(name, {}, json_file, str(tmp_path))
    with pytest.raises(DatasetError) as error:
        get_dataset_dicts(name, training=True, num_classes=NUM_CLASSES)
    message = str(error.value)
    assert "annotation id 42 (image_id 2, b.png) has category_id 9" in message
    assert json_file in message and "declared ids: [1, 2, 3]" in message


def test_class_count_other_than_num_classes_stops(tmp_path, dataset_names):
    write_rgb(tmp_path / "a.png")
    json_file = write_coco(
        tmp_path, [coco_image(1, "a.png")], [coco_annotation(1, 1, square(2, 2, 20, 20))]
    )
    name = dataset_names()
    register_coco_instances(name, {}, json_file, str(tmp_path))
    with pytest.raises(DatasetError, match="set MODEL.SOLOV2.NUM_CLASSES 3"):
        get_dataset_dicts(name, training=False, num_classes=80)


def test_empty_dataset_split_stops_with_a_clear_error(tmp_path, dataset_names):
    json_file = write_coco(tmp_path, [], [])
    name = dataset_names()
    d2_register_coco_instances(name, {}, json_file, str(tmp_path))
    cfg = tiny_cfg(NUM_CLASSES)
    cfg.DATASETS.TRAIN = (name,)
    with pytest.raises(DatasetError) as error:
        train_net.Trainer.build_train_loader(cfg)
    assert f"Dataset {name!r} is empty" in str(error.value) and json_file in str(error.value)
    with pytest.raises(DatasetError, match="is empty"):
        train_net.Trainer.build_test_loader(cfg, name)


def test_only_negatives_with_filter_empty_stops_with_a_clear_error(tmp_path, dataset_names):
    write_rgb(tmp_path / "a.png")
    name = dataset_names()
    register_coco_instances(
        name, {}, write_coco(tmp_path, [coco_image(1, "a.png")], []), str(tmp_path)
    )
    cfg = tiny_cfg(NUM_CLASSES)
    cfg.DATASETS.TRAIN = (name,)
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = True
    with pytest.raises(DatasetError, match="FILTER_EMPTY_ANNOTATIONS is True; set it to False"):
        build_resumable_train_loader(cfg, mapper=train_mapper())


# ---------------------------------------------------------------------------------- training


def test_batch_without_positive_cells_gives_finite_losses(model, target_spy):
    """Instances whose masks are empty (e.g. cut away) get no cell: no positive in the batch."""
    batch = []
    for height, width in [(64, 64), (48, 80)]:
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(torch.tensor([[4.0, 4, 20, 20]]))
        instances.gt_classes = torch.tensor([1])
        instances.gt_masks = BitMasks(torch.zeros(1, height, width, dtype=torch.bool))
        batch.append({"image": torch.rand(3, height, width) * 255, "instances": instances})
    losses = assert_trains(model, batch)
    assert all(len(torch.cat(t.positive_cells)) == 0 for t in target_spy)
    assert float(losses["loss_mask"].detach()) == 0.0 and float(losses["loss_cate"].detach()) > 0


def test_training_inputs_of_other_dtypes_and_layouts(model):
    """(Inference with uint8 / non-contiguous images is in test_solov2_model.py.) Training with a
    non-contiguous float64 image, a channels-last uint8 image and masks as a uint8 tensor."""
    height, width = 64, 64
    masks = torch.zeros(1, height, width, dtype=torch.uint8)
    masks[0, 8:30, 8:30] = 1
    base = (torch.rand(height, width, 3) * 255).to(torch.float64)
    batch = []
    for image, gt_masks in (
        (base.permute(2, 0, 1), BitMasks(masks)),  # non-contiguous float64
        # channels-last uint8, masks as a bare uint8 tensor
        (
            base.to(torch.uint8).permute(2, 0, 1)[None].to(memory_format=torch.channels_last)[0],
            masks,
        ),
    ):
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(torch.tensor([[8.0, 8, 30, 30]]))
        instances.gt_classes = torch.tensor([2])
        instances.gt_masks = gt_masks
        batch.append({"image": image, "instances": instances})
    assert not batch[0]["image"].is_contiguous()
    assert_trains(model, batch)


def test_non_finite_loss_error_names_terms_iteration_and_batch():
    error = non_finite_loss_error(
        7,
        {"loss_cate": torch.tensor(0.5), "loss_mask": torch.tensor(float("inf"))},
        ["a.png", "b.png"],
    )
    message = str(error)
    assert isinstance(error, FloatingPointError)
    assert message.startswith("Non-finite loss at iteration 7: loss_mask = inf")
    assert "(finite: loss_cate = 0.5)" in message and "Batch: a.png, b.png" in message


@pytest.fixture(scope="module")
def shapes_split(tmp_path_factory):
    """A tiny generated shapes split (8 images of 64-96 px), unregistered afterwards."""
    name = "bad_input_shapes_" + uuid.uuid4().hex[:8]
    root = str(tmp_path_factory.mktemp("shapes"))
    register_shapes_dataset(
        name, root=root, split="val", num_images=4, seed=3, min_side=64, max_side=96
    )
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def shapes_cfg(dataset, output_dir):
    cfg = tiny_cfg(num_classes=6)
    cfg.DATASETS.TRAIN = (dataset,)
    cfg.DATASETS.TEST = (dataset,)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MAX_SIZE_TRAIN = 96
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 96
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.MAX_ITER = 4
    cfg.SOLVER.WARMUP_ITERS = 1
    cfg.SOLVER.STEPS = ()
    cfg.SOLVER.CHECKPOINT_PERIOD = 100
    cfg.SEED = 0
    cfg.OUTPUT_DIR = str(output_dir)
    return cfg


@pytest.mark.slow
def test_nan_loss_stops_training_naming_iteration_and_term(shapes_split, tmp_path, monkeypatch):
    original = solov2_module.solov2_losses
    calls = []

    def poisoned(*args, **kwargs):
        losses = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # iteration 2
            losses["loss_mask"] = losses["loss_mask"] * float("nan")
        return losses

    monkeypatch.setattr(solov2_module, "solov2_losses", poisoned)
    torch.manual_seed(0)
    trainer = train_net.Trainer(shapes_cfg(shapes_split, tmp_path))
    trainer.resume_or_load(resume=False)
    with pytest.raises(FloatingPointError) as error:
        trainer.train()
    message = str(error.value)
    assert message.startswith("Non-finite loss at iteration 2: loss_mask = nan (finite: loss_cate")
    assert "Batch: " in message and ".png" in message
    assert len(calls) == 3
    # Raised before the optimizer step: the weights are untouched by the NaN.
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


# ------------------------------------------------------------------- inference and evaluation


class _Outputs(DatasetEvaluator):
    """Keeps every (input, output) pair that an evaluation sees."""

    def __init__(self):
        self.pairs = []

    def reset(self):
        self.pairs = []

    def process(self, inputs, outputs):
        self.pairs += list(zip(inputs, outputs))

    def evaluate(self):
        return {}


@pytest.mark.slow
def test_evaluation_without_any_detection_reports_zero_ap(shapes_split, tmp_path, solov2_log):
    """Detectron2's COCOEvaluator gives NaN for every metric when nothing is detected; ours 0.0.
    Each image's result is a well-typed empty Instances of its original size."""
    cfg = shapes_cfg(shapes_split, tmp_path)
    cfg.MODEL.SOLOV2.SCORE_THR = 1.1  # no score can pass
    torch.manual_seed(0)
    model = train_net.Trainer.build_model(cfg)
    outputs = _Outputs()
    coco = train_net.Trainer.build_evaluator(cfg, shapes_split)
    results = train_net.Trainer.test(cfg, model, [DatasetEvaluators([coco, outputs])])
    for task in ("segm", "bbox"):
        for metric in ("AP", "AP50", "AP75"):
            assert results[task][metric] == 0.0, (task, metric, results[task])
        # Per class: 0.0 for the classes in the split, NaN (no ground truth) for the others.
        per_class = [v for k, v in results[task].items() if k.startswith("AP-")]
        assert 0.0 in per_class and all(v == 0.0 or math.isnan(v) for v in per_class)
    assert "detected nothing on any of the 4 images" in solov2_log()
    assert len(outputs.pairs) == 4
    for inputs, output in outputs.pairs:
        instances = output["instances"]
        size = (inputs["height"], inputs["width"])
        assert len(instances) == 0 and instances.image_size == size
        assert tuple(instances.pred_masks.shape) == (0, *size)
        assert instances.pred_masks.dtype == torch.bool
        assert instances.scores.dtype == torch.float32
        assert instances.pred_classes.dtype == torch.int64
        assert tuple(instances.pred_boxes.tensor.shape) == (0, 4)
