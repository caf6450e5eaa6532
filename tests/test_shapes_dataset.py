"""Tests of the generated shapes dataset: files, annotations, Detectron2 registration."""

import contextlib
import io
import json
import os

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from pycocotools.coco import COCO

from solov2_d2.data import shapes
from solov2_d2.data.shapes import (
    SHAPES_CLASSES,
    SHAPES_COLORS,
    ensure_generated,
    generate_shapes_split,
    register_builtin_shapes,
    register_shapes_dataset,
)

# Small images keep the tests fast where relative sizes do not matter.
SMALL = {"min_side": 64, "max_side": 96}


def _split_files(root):
    """{relative path: bytes} of every file under root."""
    contents = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as stream:
                contents[os.path.relpath(path, root)] = stream.read()
    return contents


def _rasterize(annotation, image):
    rles = mask_util.frPyObjects(annotation["segmentation"], image["height"], image["width"])
    return mask_util.decode(mask_util.merge(rles))


def _load(json_path):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(json_path)


@pytest.fixture(scope="module")
def default_size_split(tmp_path_factory):
    """40 images at the default sizes: enough objects for the distribution checks."""
    root = tmp_path_factory.mktemp("shapes_default")
    return _load(generate_shapes_split(str(root), "train", num_images=40, seed=0))


@pytest.fixture
def isolate_dataset_names():
    """Names a test registers: whatever they were before is put back afterwards."""
    saved = {}

    def track(*new_names):
        for name in new_names:
            saved[name] = (
                DatasetCatalog.data.get(name),
                MetadataCatalog.data.get(name),
                shapes._REGISTERED_SPECS.get(name),
            )
            DatasetCatalog.data.pop(name, None)
            MetadataCatalog.data.pop(name, None)
            shapes._REGISTERED_SPECS.pop(name, None)

    yield track
    for name, (loader, metadata, spec) in saved.items():
        for catalog, value in ((DatasetCatalog.data, loader), (MetadataCatalog.data, metadata)):
            catalog.pop(name, None)
            if value is not None:
                catalog[name] = value
        shapes._REGISTERED_SPECS.pop(name, None)
        if spec is not None:
            shapes._REGISTERED_SPECS[name] = spec


def _gen(root, seed, num_images=5):
    return generate_shapes_split(str(root), "train", num_images=num_images, seed=seed, **SMALL)


def test_generation_is_deterministic(tmp_path):
    for folder, seed in (("a", 3), ("b", 3), ("c", 4)):
        _gen(tmp_path / folder, seed)
    first, second, other = (_split_files(tmp_path / folder) for folder in "abc")
    assert first.keys() == second.keys()
    assert all(first[path] == second[path] for path in first)
    for path in (
        os.path.join("annotations", "instances_train.json"),
        os.path.join("train", "000000.png"),
    ):
        assert other[path] != first[path]


def test_generation_in_worker_processes_writes_the_same_files(tmp_path):
    for folder, workers in (("serial", 1), ("pool", 2)):
        generate_shapes_split(
            str(tmp_path / folder), "train", num_images=6, seed=5, num_workers=workers, **SMALL
        )
    serial, pool = _split_files(tmp_path / "serial"), _split_files(tmp_path / "pool")
    assert len(serial) == 7 and serial.keys() == pool.keys()
    assert all(serial[path] == pool[path] for path in serial)
    coco = json.loads(serial[os.path.join("annotations", "instances_train.json")])
    # annotation ids number the whole split, in image order
    assert [a["id"] for a in coco["annotations"]] == list(range(1, len(coco["annotations"]) + 1))
    assert len({a["image_id"] for a in coco["annotations"]}) == 6


def test_smaller_split_is_prefix_of_larger(tmp_path):
    _gen(tmp_path / "small", 0, num_images=2)
    _gen(tmp_path / "large", 0, num_images=4)
    small, large = _split_files(tmp_path / "small"), _split_files(tmp_path / "large")
    for index in range(2):
        path = os.path.join("train", f"{index:06d}.png")
        assert small[path] == large[path]


def test_coco_json_is_valid_and_exact(tmp_path):
    json_path = _gen(tmp_path, seed=0, num_images=12)
    with open(json_path) as stream:
        raw = json.load(stream)
    assert {"info", "licenses", "images", "annotations", "categories"} <= raw.keys()
    assert [c["id"] for c in raw["categories"]] == list(range(1, len(SHAPES_CLASSES) + 1))
    assert [c["name"] for c in raw["categories"]] == SHAPES_CLASSES
    coco = _load(json_path)
    assert len(coco.getImgIds()) == 12
    assert len({a["id"] for a in raw["annotations"]}) == len(raw["annotations"])
    for image in raw["images"]:
        assert len(coco.getAnnIds(imgIds=image["id"])) >= 1  # every image has an object
        pixels = cv2.imread(os.path.join(tmp_path, "train", image["file_name"]))
        assert pixels.shape == (image["height"], image["width"], 3)
    for annotation in raw["annotations"]:
        image = coco.imgs[annotation["image_id"]]
        assert annotation["category_id"] in coco.cats
        assert annotation["iscrowd"] == 0
        assert all(len(poly) >= 6 and len(poly) % 2 == 0 for poly in annotation["segmentation"])
        mask = _rasterize(annotation, image)
        assert mask.sum() == annotation["area"] > 0
        points = np.concatenate([np.reshape(p, (-1, 2)) for p in annotation["segmentation"]])
        x0, y0 = points.min(axis=0)
        x1, y1 = points.max(axis=0)
        assert annotation["bbox"] == [x0, y0, x1 - x0, y1 - y0]  # tight box of the polygons
        # ... which is also, within a pixel, the box of the pixels they cover.
        ys, xs = np.nonzero(mask)
        mask_box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        assert np.abs(mask_box - [x0, y0, x1, y1]).max() <= 1
        assert 0 <= x0 and 0 <= y0 and x1 <= image["width"] and y1 <= image["height"]


def test_visible_masks_have_no_holes(default_size_split):
    coco = default_size_split
    for annotation in coco.dataset["annotations"]:
        mask = _rasterize(annotation, coco.imgs[annotation["image_id"]])
        _, hierarchy = cv2.findContours(np.pad(mask, 1), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        assert (hierarchy[0][:, 3] < 0).all(), f"annotation {annotation['id']} has a hole"


def test_sizes_are_varied(default_size_split):
    coco = default_size_split
    long_sides, image_shares = [], []
    for annotation in coco.dataset["annotations"]:
        image = coco.imgs[annotation["image_id"]]
        _, _, width, height = annotation["bbox"]
        long_sides.append(max(width, height))
        image_shares.append(max(width / image["width"], height / image["height"]))
    # Tiny objects are drawn 16-22 px long (TINY_OBJECT_EXTENT: below 16 px the classes cannot be
    # told apart); occlusion and the image border may cut a visible box a little shorter.
    assert 12 <= min(long_sides) < 19 and np.percentile(long_sides, 5) < 22
    assert max(image_shares) > 0.6
    # Not just a few outliers: the sizes spread over the whole range.
    assert np.percentile(long_sides, 25) < 30 and np.percentile(image_shares, 90) > 0.3
    assert len({a["category_id"] for a in coco.dataset["annotations"]}) == len(SHAPES_CLASSES)


def test_objects_occlude_each_other(default_size_split):
    annotations = default_size_split.dataset["annotations"]
    assert any(len(a["segmentation"]) > 1 for a in annotations)  # split into parts
    occluded = 0
    for index in range(20):
        rng = np.random.default_rng(np.random.SeedSequence(0, spawn_key=(index,)))
        _, instances = shapes._generate_image(rng, 160, 160, 1, 8)
        for instance in instances:
            visible, unoccluded = int(instance.visible.sum()), int(instance.unoccluded.sum())
            assert shapes.MIN_VISIBLE_FRACTION * unoccluded <= visible <= unoccluded
            occluded += visible < unoccluded
    assert occluded >= 5


def _objects_per_image(coco):
    counts = {image_id: 0 for image_id in coco.getImgIds()}
    for annotation in coco.dataset["annotations"]:
        counts[annotation["image_id"]] += 1
    return sorted(counts.values())


def test_object_count_range(tmp_path):
    # One object asked for: exactly one placed (a single object always fits, the generator
    # retries until an image has one).
    one = _load(
        generate_shapes_split(str(tmp_path / "one"), "train", 8, 2, min_objects=1, max_objects=1)
    )
    assert _objects_per_image(one) == [1] * 8
    # Six asked for in every image: never more, and mostly all of them (some may not fit).
    six = _load(
        generate_shapes_split(str(tmp_path / "six"), "train", 8, 2, min_objects=6, max_objects=6)
    )
    counts = _objects_per_image(six)
    assert max(counts) == 6 and min(counts) >= 1 and sum(counts) >= 6 * 8 * 0.75
    info = six.dataset["info"]["solov2_shapes"]
    assert (info["min_objects"], info["max_objects"]) == (6, 6)
    # Defaults: 1 to 8 (the val split's range).
    default = _load(_gen(tmp_path / "default", 2, num_images=8))
    assert default.dataset["info"]["solov2_shapes"]["max_objects"] == 8
    for low, high in ((0, 3), (5, 4)):
        with pytest.raises(ValueError, match="min_objects"):
            generate_shapes_split(
                str(tmp_path / "bad"), "train", 2, 0, min_objects=low, max_objects=high
            )


def test_builtin_train_split_is_denser_than_val():
    train = shapes.BUILTIN_SHAPES_DATASETS["solov2_shapes_train"]
    val = shapes.BUILTIN_SHAPES_DATASETS["solov2_shapes_val"]
    assert (train["min_objects"], train["max_objects"]) == (3, 14)
    assert "min_objects" not in val and "max_objects" not in val  # the defaults, 1 to 8
    assert (shapes.MIN_OBJECTS_PER_IMAGE, shapes.MAX_OBJECTS_PER_IMAGE) == (1, 8)


def test_registration_loads_detectron2_dicts(tmp_path, isolate_dataset_names):
    name = "test_shapes_registration"
    isolate_dataset_names(name)
    register_shapes_dataset(name, root=str(tmp_path), split="val", num_images=4, seed=1, **SMALL)
    json_path = os.path.join(tmp_path, "annotations", "instances_val.json")
    assert not os.path.exists(json_path)  # registering generates nothing
    metadata = MetadataCatalog.get(name)
    assert metadata.thing_classes == SHAPES_CLASSES
    assert len(metadata.thing_colors) == len(SHAPES_CLASSES)
    assert len(set(SHAPES_COLORS)) == len(SHAPES_COLORS)
    assert metadata.json_file == json_path
    assert metadata.evaluator_type == "coco"

    dicts = DatasetCatalog.get(name)
    assert len(dicts) == 4 and os.path.isfile(json_path)
    for record in dicts:
        assert os.path.isfile(record["file_name"])
        assert record["annotations"]
        for obj in record["annotations"]:
            assert 0 <= obj["category_id"] < len(SHAPES_CLASSES)
            assert isinstance(obj["segmentation"], list) and len(obj["bbox"]) == 4
    assert metadata.thing_dataset_id_to_contiguous_id == {i + 1: i for i in range(6)}

    # Same parameters again: nothing happens. Other parameters: refused.
    register_shapes_dataset(name, root=str(tmp_path), split="val", num_images=4, seed=1, **SMALL)
    with pytest.raises(ValueError):
        register_shapes_dataset(name, root=str(tmp_path), split="val", num_images=5, seed=1)


def test_ensure_generated_lets_coco_evaluator_read_the_json(tmp_path, isolate_dataset_names):
    from detectron2.evaluation import COCOEvaluator

    name = "test_shapes_evaluator"
    isolate_dataset_names(name)
    register_shapes_dataset(name, root=str(tmp_path), split="val", num_images=2, seed=1, **SMALL)
    assert ensure_generated(name) == MetadataCatalog.get(name).json_file
    evaluator = COCOEvaluator(name, output_dir=None)
    assert len(evaluator._coco_api.getImgIds()) == 2
    with pytest.raises(ValueError):
        ensure_generated("not_a_shapes_dataset")


def test_interrupted_generation_does_not_break_loading(tmp_path, isolate_dataset_names):
    name = "test_shapes_interrupted"
    isolate_dataset_names(name)
    register_shapes_dataset(name, root=str(tmp_path), split="train", num_images=3, seed=0, **SMALL)
    annotations_dir = tmp_path / "annotations"
    annotations_dir.mkdir()
    # What a run killed while writing leaves behind: a temporary JSON and a temporary image.
    (annotations_dir / "instances_train.json.x1y2z3").write_text('{"images": [{"id": 1')
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "000000.png.a1b2c3").write_bytes(b"\x89PNG")
    assert len(DatasetCatalog.get(name)) == 3

    # A JSON truncated in place, or written with other parameters, is regenerated too.
    json_path = annotations_dir / "instances_train.json"
    complete = json_path.read_bytes()
    json_path.write_bytes(complete[: len(complete) // 2])
    assert len(DatasetCatalog.get(name)) == 3
    assert json_path.read_bytes() == complete
    _gen(tmp_path, seed=0, num_images=2)
    assert len(DatasetCatalog.get(name)) == 3
    # A missing image as well.
    os.remove(tmp_path / "train" / "000002.png")
    assert len(DatasetCatalog.get(name)) == 3
    assert (tmp_path / "train" / "000002.png").is_file()


def test_builtin_registration_is_repeatable(tmp_path, monkeypatch, isolate_dataset_names):
    isolate_dataset_names(*shapes.BUILTIN_SHAPES_DATASETS)
    monkeypatch.setenv(shapes.SHAPES_ROOT_ENV, str(tmp_path / "from_env"))
    register_builtin_shapes()
    register_builtin_shapes()
    for name, params in shapes.BUILTIN_SHAPES_DATASETS.items():
        metadata = MetadataCatalog.get(name)
        assert metadata.image_root == str(tmp_path / "from_env" / params["split"])
        assert metadata.thing_classes == SHAPES_CLASSES
    assert shapes.BUILTIN_SHAPES_DATASETS["solov2_shapes_train"]["num_images"] == 1000
    assert shapes.BUILTIN_SHAPES_DATASETS["solov2_shapes_val"]["seed"] == 1
    with pytest.raises(ValueError):
        register_builtin_shapes(root=str(tmp_path / "elsewhere"))
    assert not (tmp_path / "from_env").exists()  # nothing generated yet
