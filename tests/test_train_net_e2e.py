"""train_net.py end to end on a tiny generated shapes dataset, through the command-line flow:
``default_argument_parser`` -> ``train_net.setup`` -> ``Trainer`` / ``train_net.main``.

A chain of module fixtures: train 10 iterations (checkpoints, evaluation at the end), resume to
20 (continues at iteration 10 from the saved weights), then ``--eval-only`` on the final weights
(the very same APs and predictions as the evaluation at the end of training). Then both
INPUT.MASK_FORMATs train a few iterations.
"""

import json
import math
import os
import uuid

import pytest
import torch
import yaml
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser
from detectron2.structures import BitMasks, PolygonMasks

import train_net
from solov2_d2.data import register_shapes_dataset

from .conftest import write_tiny_config

pytestmark = pytest.mark.slow

SIDES = {"min_side": 64, "max_side": 96}
# Always numbers once there are predictions. APs/APm/APl are NaN when val has no object of that
# size (no "large" object fits in these images), so they are only checked to be in range or NaN.
METRICS = ("AP", "AP50", "AP75")
SIZE_METRICS = ("APs", "APm", "APl")


@pytest.fixture(scope="module")
def shapes_datasets(tmp_path_factory):
    """(train, val) dataset names: 8 / 4 generated images of 64-96 px, unique to this run."""
    root = str(tmp_path_factory.mktemp("shapes"))
    tag = uuid.uuid4().hex[:8]
    train, val = "e2e_shapes_train_" + tag, "e2e_shapes_val_" + tag
    register_shapes_dataset(train, root=root, split="train", num_images=8, seed=0, **SIDES)
    register_shapes_dataset(val, root=root, split="val", num_images=4, seed=1, **SIDES)
    yield train, val
    for name in (train, val):
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, shapes_datasets):
    """The tiny model with the 6 shape classes and ~100 px inputs. SCORE_THR 0 so that the barely
    trained model predicts something and its APs are numbers, not the NaN of "no predictions"."""
    train, val = shapes_datasets
    return write_tiny_config(
        tmp_path_factory.mktemp("config"),
        num_classes=6,
        MODEL={"SOLOV2": {"SCORE_THR": 0.0, "UPDATE_THR": 0.0}},
        DATASETS={"TRAIN": [train], "TEST": [val]},
        DATALOADER={"NUM_WORKERS": 0},
        INPUT={
            "MIN_SIZE_TRAIN": [96],
            "MAX_SIZE_TRAIN": 128,
            "MIN_SIZE_TEST": 96,
            "MAX_SIZE_TEST": 128,
            "MASK_FORMAT": "polygon",
        },
        SOLVER={
            "IMS_PER_BATCH": 2,
            "BASE_LR": 0.01,
            "WARMUP_ITERS": 5,
            "STEPS": [],
            "MAX_ITER": 10,
            "CHECKPOINT_PERIOD": 10,
        },
        SEED=0,
    )


def parse(config_file, *argv):
    return default_argument_parser().parse_args(["--config-file", config_file] + list(argv))


def read_json(path):
    with open(path) as stream:
        return json.load(stream)


def predictions_file(output_dir, dataset_name):
    """Where Trainer.build_evaluator's COCOEvaluator writes the predictions of a dataset."""
    return os.path.join(output_dir, "inference", dataset_name, "coco_instances_results.json")


def read_yaml(path):
    with open(path) as stream:
        return yaml.safe_load(stream)


def checkpoint_iteration(path):
    return torch.load(path, map_location="cpu")["iteration"]


def last_checkpoint(output_dir):
    with open(os.path.join(output_dir, "last_checkpoint")) as stream:
        return stream.read().strip()


def last_evaluation(output_dir):
    """{"segm": {...}, "bbox": {...}} of the last evaluation that the trainer's EvalHook wrote to
    metrics.json (as flat "segm/AP", "bbox/AP50", ... scalars)."""
    with open(os.path.join(output_dir, "metrics.json")) as stream:
        records = [json.loads(line) for line in stream if line.strip()]
    last = [record for record in records if "segm/AP" in record][-1]
    results = {}
    for key, value in last.items():
        task, _, metric = key.partition("/")
        if task in ("segm", "bbox"):
            results.setdefault(task, {})[metric] = value
    return results


def assert_coco_results(results):
    assert set(results) == {"segm", "bbox"}
    for task in ("segm", "bbox"):
        for metric in METRICS:
            value = results[task][metric]
            assert isinstance(value, float) and math.isfinite(value), (task, metric, value)
            assert 0.0 <= value <= 100.0, (task, metric, value)
        for metric in SIZE_METRICS:
            value = results[task][metric]
            assert math.isnan(value) or 0.0 <= value <= 100.0, (task, metric, value)


def assert_same_results(a, b):
    """Every metric exactly equal, NaN (a metric without ground truth) equal to NaN."""
    assert set(a) == set(b)
    for task in a:
        assert set(a[task]) == set(b[task]), task
        for metric, value in a[task].items():
            other = b[task][metric]
            assert value == other or (math.isnan(value) and math.isnan(other)), (task, metric)


# ---------------------------------------------------------------------------------- the chain


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, config_file, shapes_datasets):
    """``train_net.main``: iterations 0..9 into a fresh OUTPUT_DIR, evaluated at the end."""
    output_dir = str(tmp_path_factory.mktemp("train"))
    # Training returns None (Detectron2's DefaultTrainer.train returns the evaluation results only
    # when TEST.EXPECTED_RESULTS is set); the results are in metrics.json, as after a CLI run.
    assert train_net.main(parse(config_file, "OUTPUT_DIR", output_dir)) is None
    results = last_evaluation(output_dir)
    # Read now: the resumed run evaluates into the same folder.
    predictions = read_json(predictions_file(output_dir, shapes_datasets[1]))
    final = torch.load(os.path.join(output_dir, "model_final.pth"), map_location="cpu")["model"]
    return {
        "output_dir": output_dir,
        "results": results,
        "predictions": predictions,
        "final": final,
    }


@pytest.fixture(scope="module")
def resumed_run(first_run, config_file, shapes_datasets):
    """``--resume`` with MAX_ITER 20 into the same OUTPUT_DIR, step by step as in
    ``train_net.main`` so that the trainer can be looked at before and after training."""
    output_dir = first_run["output_dir"]
    args = parse(config_file, "--resume", "OUTPUT_DIR", output_dir, "SOLVER.MAX_ITER", "20")
    assert args.resume and not args.eval_only
    cfg = train_net.setup(args)
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    start_iter = trainer.start_iter
    loaded = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    trainer.train()
    results = trainer._last_eval_results  # set by the EvalHook of DefaultTrainer.build_hooks
    assert_same_results(last_evaluation(output_dir), results)
    return {
        "output_dir": output_dir,
        "trainer": trainer,
        "start_iter": start_iter,
        "loaded": loaded,
        "results": results,
        "predictions": read_json(predictions_file(output_dir, shapes_datasets[1])),
    }


@pytest.fixture(scope="module")
def eval_only_run(tmp_path_factory, resumed_run, config_file, shapes_datasets):
    """``train_net.main`` with ``--eval-only MODEL.WEIGHTS <output>/model_final.pth``."""
    output_dir = str(tmp_path_factory.mktemp("eval_only"))
    weights = os.path.join(resumed_run["output_dir"], "model_final.pth")
    args = parse(config_file, "--eval-only", "OUTPUT_DIR", output_dir, "MODEL.WEIGHTS", weights)
    results = train_net.main(args)
    predictions = read_json(predictions_file(output_dir, shapes_datasets[1]))
    return {"output_dir": output_dir, "results": results, "predictions": predictions}


# ---------------------------------------------------------------------------------- the tests


def test_setup_writes_config_and_log_into_output_dir(first_run):
    output_dir = first_run["output_dir"]
    saved = read_yaml(os.path.join(output_dir, "config.yaml"))
    assert saved["OUTPUT_DIR"] == output_dir
    assert saved["MODEL"]["SOLOV2"]["NUM_CLASSES"] == 6
    assert saved["MODEL"]["RESNETS"]["DEPTH"] == 18
    assert saved["SOLVER"]["MAX_ITER"] == 10
    assert os.path.getsize(os.path.join(output_dir, "log.txt")) > 0


def test_training_evaluates_segm_and_bbox_at_the_end(first_run):
    assert_coco_results(first_run["results"])
    # SCORE_THR 0 and MAX_PER_IMG 100: every one of the 4 val images has predictions.
    predictions = first_run["predictions"]
    assert len({p["image_id"] for p in predictions}) == 4
    assert all("segmentation" in p and len(p["bbox"]) == 4 for p in predictions)
    assert {p["category_id"] for p in predictions} <= set(range(1, 7))


def test_training_writes_periodic_and_final_checkpoints(first_run):
    output_dir = first_run["output_dir"]
    # CHECKPOINT_PERIOD 10: model_0000009 after iteration 9 (the 10th), model_final at the end.
    assert checkpoint_iteration(os.path.join(output_dir, "model_0000009.pth")) == 9
    assert checkpoint_iteration(os.path.join(output_dir, "model_final.pth")) == 9
    assert not os.path.exists(os.path.join(output_dir, "model_0000019.pth"))
    assert last_checkpoint(output_dir) == "model_final.pth"


def test_resume_continues_from_the_saved_iteration_and_weights(first_run, resumed_run):
    trainer = resumed_run["trainer"]
    assert resumed_run["start_iter"] == 10
    # train() leaves iter at max_iter once the last iteration (19) has run.
    assert (trainer.iter, trainer.max_iter) == (20, 20)
    # The weights the resumed run started from are the first run's final weights.
    final = first_run["final"]
    assert set(resumed_run["loaded"]) == set(final)
    for name, value in final.items():
        assert torch.equal(resumed_run["loaded"][name], value), name
    # ... and it trained: its own final weights differ from them.
    assert not torch.equal(
        trainer.model.state_dict()["ins_head.cate_pred.weight"], final["ins_head.cate_pred.weight"]
    )


def test_resume_writes_checkpoints_of_the_continued_iterations(resumed_run):
    output_dir = resumed_run["output_dir"]
    assert checkpoint_iteration(os.path.join(output_dir, "model_0000009.pth")) == 9
    assert checkpoint_iteration(os.path.join(output_dir, "model_0000019.pth")) == 19
    assert checkpoint_iteration(os.path.join(output_dir, "model_final.pth")) == 19
    assert last_checkpoint(output_dir) == "model_final.pth"
    with open(os.path.join(output_dir, "metrics.json")) as stream:
        iterations = {json.loads(line)["iteration"] for line in stream if line.strip()}
    # Each run logged its training metrics at its last iteration (9, then 19) and its evaluation
    # at max_iter (10, then 20): the resumed run appended to the first run's file.
    assert {9, 19} <= iterations <= {9, 10, 19, 20}
    assert_coco_results(resumed_run["results"])


def test_eval_only_reproduces_the_evaluation_at_the_end_of_training(
    first_run, resumed_run, eval_only_run
):
    trained, evaluated = resumed_run["results"], eval_only_run["results"]
    assert_coco_results(evaluated)
    assert evaluated["segm"]["AP"] == trained["segm"]["AP"]
    assert_same_results(evaluated, trained)
    assert len(eval_only_run["predictions"]) > 0
    assert eval_only_run["predictions"] == resumed_run["predictions"]
    # Not a coincidence of an untrained model: the weights of iteration 9 predict otherwise.
    assert eval_only_run["predictions"] != first_run["predictions"]


@pytest.mark.parametrize(
    "mask_format, mask_type", [("polygon", PolygonMasks), ("bitmask", BitMasks)]
)
def test_both_mask_formats_train(tmp_path, config_file, mask_format, mask_type):
    args = parse(
        config_file,
        "OUTPUT_DIR",
        str(tmp_path),
        "INPUT.MASK_FORMAT",
        mask_format,
        "SOLVER.MAX_ITER",
        "3",
        "DATASETS.TEST",
        "()",  # no evaluation at the end
    )
    cfg = train_net.setup(args)
    assert cfg.INPUT.MASK_FORMAT == mask_format
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    batch = next(iter(trainer.build_train_loader(cfg)))
    assert len(batch) == 2
    assert all(isinstance(inputs["instances"].gt_masks, mask_type) for inputs in batch)
    trainer.train()
    assert trainer.iter == 3
    for key in ("total_loss", "loss_cate", "loss_mask"):
        values = [value for value, _ in trainer.storage.history(key).values()]
        assert len(values) == 3 and all(math.isfinite(v) and v > 0 for v in values), key
