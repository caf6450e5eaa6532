"""Real COCO data (../shared/data/coco_real_sample, read in place): 17 photos with multi-part
polygons, uncompressed and compressed RLE, crowd regions, the 80 COCO categories with their
non-contiguous ids. Registration, the dataset mapper in both mask formats, and (slow) training
through train_net.py, COCO evaluation and demo.py.

What the sample shows about the mask formats: Detectron2's mapper drops crowd annotations in
training, so crowd RLE never reaches the masks, but two images (000000142238, 000000439180) also
have NON-crowd instances stored as RLE. MASK_FORMAT "bitmask" (the configs' default) trains on all
17 images; "polygon" fails on those two with an error naming the file, and trains on the others.
"""

import importlib.machinery
import json
import math
import os
import uuid

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import default_argument_parser
from detectron2.evaluation import inference_on_dataset
from detectron2.structures import BitMasks, PolygonMasks

import demo
import train_net
from solov2_d2.compat import build_coco_evaluator
from solov2_d2.data import SOLOv2DatasetMapper

from .conftest import write_tiny_config

NUM_IMAGES, NUM_ANNOTATIONS, NUM_CROWD = 17, 156, 5
# Images whose non-crowd instances are RLE: image id -> (non-crowd instances, crowd regions, size
# after the 256 px short side / 384 px long side resize: 427x640 -> 256x384, 360x640 -> 216x384).
RLE_IMAGES = {142238: (14, 1, (256, 384)), 439180: (26, 2, (216, 384))}
# Polygons only, plus one crowd RLE region.
POLYGON_AND_CROWD_IMAGE = (193245, 25)
SMALL_INPUT = {"MIN_SIZE_TRAIN": [256], "MAX_SIZE_TRAIN": 384, "MIN_SIZE_TEST": 256}


@pytest.fixture(scope="module")
def state():
    """Per-module cache (the sample is registered and trained on once) and its cleanup."""
    cache = {"registered": []}
    yield cache
    for name in cache["registered"]:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.fixture
def sample(shared_dir, state):
    """Registers the sample with register_coco_instances (once), plus the subset of the images
    without non-crowd RLE for the polygon format. Returns a dict of names and paths."""
    if "sample" not in state:
        root = os.path.join(shared_dir, "data", "coco_real_sample")
        json_file = os.path.join(root, "instances.json")
        tag = uuid.uuid4().hex[:8]
        name, polygon_name = "coco_real_sample_" + tag, "coco_real_sample_polygons_" + tag
        register_coco_instances(name, {}, json_file, os.path.join(root, "images"))
        state["registered"].append(name)
        DatasetCatalog.get(name)  # sets thing_classes and the id mapping in the metadata

        def polygon_only():
            return [d for d in DatasetCatalog.get(name) if d["image_id"] not in RLE_IMAGES]

        DatasetCatalog.register(polygon_name, polygon_only)
        state["registered"].append(polygon_name)
        metadata = MetadataCatalog.get(name)
        MetadataCatalog.get(polygon_name).set(
            thing_classes=metadata.thing_classes,
            thing_dataset_id_to_contiguous_id=metadata.thing_dataset_id_to_contiguous_id,
        )
        with open(json_file) as stream:
            coco = json.load(stream)
        state["sample"] = {
            "name": name,
            "polygon_name": polygon_name,
            "root": root,
            "images": os.path.join(root, "images"),
            "coco": coco,
        }
    return state["sample"]


def tiny_config(folder, dataset_name, mask_format="bitmask"):
    return write_tiny_config(
        folder,
        num_classes=80,
        DATASETS={"TRAIN": [dataset_name], "TEST": [dataset_name]},
        DATALOADER={"NUM_WORKERS": 0},
        INPUT=dict(SMALL_INPUT, MASK_FORMAT=mask_format),
        SOLVER={"IMS_PER_BATCH": 2, "BASE_LR": 0.01, "WARMUP_ITERS": 2, "STEPS": []},
        SEED=0,
    )


def setup_cfg(config_file, *opts):
    return train_net.setup(
        default_argument_parser().parse_args(["--config-file", config_file, *opts])
    )


def train(config_file, output_dir, iterations):
    cfg = setup_cfg(
        config_file,
        "OUTPUT_DIR",
        output_dir,
        "SOLVER.MAX_ITER",
        str(iterations),
        "DATASETS.TEST",
        "()",  # evaluated separately
    )
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return cfg, trainer


@pytest.fixture
def trained(sample, state, tmp_path_factory):
    """The tiny model (80 classes) trained 4 iterations on the whole sample, bitmask format."""
    if "trained" not in state:
        folder = str(tmp_path_factory.mktemp("coco_real"))
        config_file = tiny_config(folder, sample["name"], "bitmask")
        cfg, trainer = train(config_file, os.path.join(folder, "output"), 4)
        state["trained"] = {
            "config_file": config_file,
            "cfg": cfg,
            "trainer": trainer,
            "weights": os.path.join(cfg.OUTPUT_DIR, "model_final.pth"),
        }
    return state["trained"]


# -------------------------------------------------------------------------------- registration


def test_sample_registers_in_place_with_80_contiguous_classes(sample):
    dicts = DatasetCatalog.get(sample["name"])
    assert len(dicts) == NUM_IMAGES
    assert all(d["file_name"].startswith(sample["images"] + os.sep) for d in dicts)
    assert all(os.path.isfile(d["file_name"]) for d in dicts)
    annotations = [a for d in dicts for a in d["annotations"]]
    assert len(annotations) == NUM_ANNOTATIONS
    assert sum(a["iscrowd"] for a in annotations) == NUM_CROWD
    assert sum(1 for a in annotations if isinstance(a["segmentation"], list)) == 111
    assert any(len(a["segmentation"]) > 1 for a in annotations if a["iscrowd"] == 0)

    metadata = MetadataCatalog.get(sample["name"])
    assert len(metadata.thing_classes) == 80
    mapping = metadata.thing_dataset_id_to_contiguous_id
    # COCO's ids run 1..90 with gaps; the contiguous ids are 0..79 in the same order.
    assert sorted(mapping.values()) == list(range(80))
    assert (mapping[1], mapping[90]) == (0, 79)
    assert (metadata.thing_classes[0], metadata.thing_classes[79]) == ("person", "toothbrush")
    assert {a["category_id"] for a in annotations} <= set(range(80))


def record_of(sample, image_id):
    return next(d for d in DatasetCatalog.get(sample["name"]) if d["image_id"] == image_id)


def map_for_training(config_file, record):
    cfg = setup_cfg(config_file, "OUTPUT_DIR", os.path.dirname(config_file))
    return SOLOv2DatasetMapper(cfg, is_train=True)(record)


@pytest.mark.parametrize("image_id", sorted(RLE_IMAGES))
def test_bitmask_mapper_takes_rle_instances_and_drops_crowd(sample, tmp_path, image_id):
    record = record_of(sample, image_id)
    non_crowd, crowd, resized = RLE_IMAGES[image_id]
    assert len(record["annotations"]) == non_crowd + crowd
    mapped = map_for_training(tiny_config(str(tmp_path), sample["name"], "bitmask"), record)
    instances = mapped["instances"]
    assert isinstance(instances.gt_masks, BitMasks)
    assert len(instances) == non_crowd
    assert tuple(mapped["image"].shape[1:]) == resized
    assert tuple(instances.gt_masks.tensor.shape[1:]) == resized
    assert instances.gt_masks.tensor.flatten(1).any(dim=1).all()


def test_polygon_mapper_handles_crowd_rle_but_reports_non_crowd_rle(sample, tmp_path):
    config_file = tiny_config(str(tmp_path), sample["name"], "polygon")
    image_id, non_crowd = POLYGON_AND_CROWD_IMAGE
    mapped = map_for_training(config_file, record_of(sample, image_id))
    assert isinstance(mapped["instances"].gt_masks, PolygonMasks)
    assert len(mapped["instances"]) == non_crowd

    record = record_of(sample, 439180)
    with pytest.raises(ValueError, match="polygon") as error:
        map_for_training(config_file, record)
    assert "000000439180.jpg" in str(error.value)


# ------------------------------------------------------------------------------------ training


def assert_trained(trainer, iterations):
    assert trainer.iter == iterations
    for key in ("total_loss", "loss_cate", "loss_mask"):
        values = [value for value, _ in trainer.storage.history(key).values()]
        assert len(values) == iterations, key
        assert all(math.isfinite(v) and v > 0 for v in values), (key, values)


@pytest.mark.slow
def test_training_on_the_sample_with_bitmasks(trained):
    assert_trained(trained["trainer"], 4)
    assert torch.load(trained["weights"], map_location="cpu")["iteration"] == 3


@pytest.mark.slow
def test_training_on_the_polygon_only_images_with_polygons(sample, tmp_path):
    assert len(DatasetCatalog.get(sample["polygon_name"])) == NUM_IMAGES - len(RLE_IMAGES)
    config_file = tiny_config(str(tmp_path), sample["polygon_name"], "polygon")
    _, trainer = train(config_file, str(tmp_path / "output"), 3)
    assert_trained(trainer, 3)


# ---------------------------------------------------------------------------------- evaluation


def compiled_detectron2_ops():
    """Whether ``detectron2._C`` is a compiled extension module, decided without solov2_d2."""
    from detectron2 import _C

    return _C.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


@pytest.mark.slow
def test_coco_evaluator_on_the_sample(sample, trained, tmp_path):
    cfg = trained["cfg"].clone()
    cfg.defrost()
    # Barely trained: keep every candidate so that there are predictions to score.
    cfg.MODEL.SOLOV2.SCORE_THR = 0.0
    cfg.MODEL.SOLOV2.UPDATE_THR = 0.0
    cfg.MODEL.SOLOV2.MAX_PER_IMG = 20
    cfg.freeze()
    model = train_net.Trainer.build_model(cfg)
    model.load_state_dict(trained["trainer"].model.state_dict())
    loader = train_net.Trainer.build_test_loader(cfg, sample["name"])
    evaluator = build_coco_evaluator(sample["name"], str(tmp_path))
    # Detectron2's fast C++ COCOeval exactly where its compiled ops exist (the sdist build's
    # ``_C`` is a Python stand-in, a source build's a compiled extension).
    assert evaluator._use_fast_impl is compiled_detectron2_ops()
    results = inference_on_dataset(model, loader, evaluator)

    assert set(results) == {"segm", "bbox"}
    for task in ("segm", "bbox"):
        for metric in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            value = results[task][metric]
            assert math.isfinite(value) and 0.0 <= value <= 100.0, (task, metric, value)
        assert len([k for k in results[task] if k.startswith("AP-")]) == 80

    with open(tmp_path / "coco_instances_results.json") as stream:
        predictions = json.load(stream)
    coco = sample["coco"]
    # Predictions come back with COCO's own ids: category ids from the file, every image scored.
    assert {p["category_id"] for p in predictions} <= {c["id"] for c in coco["categories"]}
    assert {p["image_id"] for p in predictions} == {image["id"] for image in coco["images"]}
    assert len(predictions) == NUM_IMAGES * 20


# ---------------------------------------------------------------------------------------- demo


@pytest.mark.slow
def test_demo_draws_two_sample_photos(sample, trained, tmp_path):
    names = ["000000193245.jpg", "000000439180.jpg"]
    inputs = [os.path.join(sample["images"], name) for name in names]
    output = tmp_path / "vis"
    exit_code = demo.main(
        [
            "--config-file",
            trained["config_file"],
            "--input",
            *inputs,
            "--output",
            str(output),
            "--confidence-threshold",
            "0",
            "--opts",
            "MODEL.WEIGHTS",
            trained["weights"],
            "DATASETS.TEST",
            "('{}',)".format(sample["name"]),
            "MODEL.SOLOV2.SCORE_THR",
            "0.0",
            "MODEL.SOLOV2.MAX_PER_IMG",
            "3",
        ]
    )
    assert exit_code == 0
    assert sorted(os.listdir(output)) == ["000000193245.png", "000000439180.png"]
    for name, path in zip(names, inputs):
        original = cv2.imread(path)
        drawn = cv2.imread(str(output / name.replace(".jpg", ".png")))
        assert drawn is not None and drawn.shape == original.shape
        # Three instances drawn over the photo: a good share of the pixels changed.
        changed = np.abs(drawn.astype(int) - original.astype(int)).max(axis=2) > 8
        assert changed.mean() > 0.01, name
