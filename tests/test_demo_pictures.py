"""The demo's pictures: contact sheet, per-image matching, learning curve, per-class table
(solov2_d2/visualization.py, tools/demo_pipeline.py), then tools/demo_pipeline.py end to end on a
tiny generated dataset (a few iterations): every file is written, and the subset evaluation of
the learning curve equals the full evaluation when the subset is the whole split."""

import json
import os
import uuid

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BitMasks, BoxMode, Instances

from solov2_d2.data import register_shapes_dataset
from solov2_d2.visualization import (
    CAPTION_HEIGHT,
    GAP,
    contact_sheet,
    draw_ground_truth,
    draw_predictions,
    enlarged,
    match_instances,
    plot_learning_curve,
    read_metrics,
)

from .conftest import load_tool, write_tiny_config

demo_pipeline = load_tool("demo_pipeline")

HEIGHT, WIDTH = 40, 60


class _Metadata:
    thing_classes = ["box", "bar"]
    thing_colors = [(220, 40, 40), (40, 40, 220)]

    def get(self, key, default=None):
        return getattr(self, key, default)


def _rectangle(x0, y0, x1, y1):
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _annotation(x0, y0, x1, y1, category):
    return {
        "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "bbox_mode": BoxMode.XYWH_ABS,
        "category_id": category,
        "iscrowd": 0,
    }


def _record(*annotations):
    return {"height": HEIGHT, "width": WIDTH, "file_name": "x.png", "image_id": 1,
            "annotations": list(annotations)}  # fmt: skip


def _instances(masks, classes, scores):
    instances = Instances((HEIGHT, WIDTH))
    masks = torch.as_tensor(np.array(masks, dtype=bool).reshape(-1, HEIGHT, WIDTH))
    instances.pred_masks = masks
    instances.pred_boxes = BitMasks(masks).get_bounding_boxes()
    instances.pred_classes = torch.tensor(classes, dtype=torch.int64)
    instances.scores = torch.tensor(scores, dtype=torch.float32)
    return instances


def _image():
    image = np.full((HEIGHT, WIDTH, 3), 90, dtype=np.uint8)
    image[10:30, 10:30] = (230, 200, 40)
    return image


def test_match_instances_counts_same_class_masks_at_iou_half():
    # GT: a 20x20 box (class 0) and a 10x20 bar (class 1).
    record = _record(_annotation(10, 10, 30, 30, 0), _annotation(40, 5, 50, 25, 1))
    box = _rectangle(10, 10, 30, 30)
    # Prediction 1 is the box exactly (IoU 1). Prediction 2, lower score, the box again: the box
    # is taken, so it matches nothing. Prediction 3 is the bar's upper half, 10x10: IoU
    # 100 / 200 = 0.5 exactly, which counts (COCO's >=), but it says class 0, not the bar's 1.
    # Prediction 4 is that half bar as class 1: matched. 2 of 2 objects found by 4 predictions.
    half_bar = _rectangle(40, 5, 50, 15)
    instances = _instances([box, box, half_bar, half_bar], [0, 0, 0, 1], [0.9, 0.8, 0.7, 0.6])
    assert match_instances(record, instances) == (2, 2, 4)
    # Without prediction 4 only the box is found.
    assert match_instances(record, instances[:3]) == (1, 2, 3)
    # A bar of 9x10 pixels: IoU 90 / 200 < 0.5.
    assert match_instances(record, _instances([_rectangle(40, 5, 49, 15)], [1], [0.5])) == (0, 2, 1)
    assert match_instances(record, _instances([], [], [])) == (0, 2, 0)


def test_contact_sheet_layout_and_panels():
    image = _image()
    record = _record(_annotation(10, 10, 30, 30, 0))
    found = _instances([_rectangle(10, 10, 30, 30)], [0], [0.9])
    nothing = _instances([], [], [])
    entries = [
        (image, record, found, "a"),
        (image, record, nothing, "b"),
        (image, record, found, "c"),
    ]
    sheet, layout = contact_sheet(entries, _Metadata(), scale=3, columns=2)

    # Panels are 120 x 180 (3x), a cell is GT | prediction with a gap after each and a caption
    # under them: 120 + 28 + 8 high, 2 * (180 + 8) wide; 3 entries in 2 columns make 2 rows.
    cell_height, cell_width = 3 * HEIGHT + CAPTION_HEIGHT + GAP, 2 * (3 * WIDTH + GAP)
    assert (cell_height, cell_width) == (156, 376)
    assert sheet.shape == (2 * 156, 2 * 376, 3)
    assert layout[0]["prediction"] == (0, 188, 120, 180)
    assert layout[1]["ground_truth"] == (0, 376, 120, 180)
    assert layout[2]["ground_truth"] == (156, 0, 120, 180)

    plain = enlarged(image, 3)
    assert plain.shape == (120, 180, 3)

    def panel(index, name):
        top, left, height, width = layout[index][name]
        return sheet[top : top + height, left : left + width]

    # No prediction: the plain enlarged image. A prediction: its pixels change, mostly under the
    # mask (30..90 x 30..90 at 3x), the ground truth too.
    assert np.array_equal(panel(1, "prediction"), plain)
    for index, name in ((0, "prediction"), (2, "prediction"), (0, "ground_truth")):
        changed = np.any(panel(index, name) != plain, axis=2)
        assert changed[30:90, 30:90].mean() > 0.9, (index, name)
    top, left, height, width = layout[0]["caption"]
    caption = sheet[top : top + height, left : left + width]
    assert caption.min() < 128 and caption.max() == 255  # dark text on white


@pytest.mark.parametrize("metadata", [_Metadata(), None], ids=["thing_colors", "no_colors"])
def test_drawings_do_not_depend_on_the_global_numpy_state(metadata):
    """The Visualizer jitters colours (and, without thing_colors, picks them) with NumPy's
    global generator: the same predictions must give the same picture in every run, and drawing
    must leave the caller's generator where it was."""
    image = _image()
    instances = _instances([_rectangle(10, 10, 30, 30), _rectangle(35, 5, 55, 25)], [0, 1],
                           [0.9, 0.6])  # fmt: skip
    record = _record(_annotation(10, 10, 30, 30, 0), _annotation(35, 5, 55, 25, 1))
    drawings = []
    for seed in (1, 2):
        np.random.seed(seed)
        expected_next = np.random.rand()
        np.random.seed(seed)
        drawings.append(
            (
                draw_predictions(image, instances, metadata, 2.0),
                draw_ground_truth(image, record, metadata, 2.0),
            )
        )
        assert np.random.rand() == expected_next
    (pred_1, gt_1), (pred_2, gt_2) = drawings
    assert np.array_equal(pred_1, pred_2) and np.array_equal(gt_1, gt_2)
    # Not vacuous: the instances are drawn (the drawings differ from the bare enlarged image).
    assert not np.array_equal(pred_1, enlarged(image, 2.0))
    assert not np.array_equal(gt_1, enlarged(image, 2.0))


def test_contact_sheet_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        contact_sheet([], _Metadata())
    entry = (_image(), _record(), _instances([], [], []), "x")
    with pytest.raises(ValueError, match="columns"):
        contact_sheet([entry], _Metadata(), columns=0)


def _write_lines(path, records):
    with open(path, "w") as stream:
        stream.write("".join(json.dumps(record) + "\n" for record in records))


def test_learning_curve_from_a_jsonwriter_file(tmp_path):
    path = str(tmp_path / "metrics.json")
    _write_lines(
        path,
        [
            {"iteration": 19, "total_loss": 3.0, "loss_ins": 2.0, "loss_cate": 1.0},
            {"iteration": 39, "total_loss": 2.0, "loss_ins": 1.5, "loss_cate": 0.5},
            {"iteration": 49, "val_subset/segm/AP": 5.0},
            {"iteration": 99, "val_subset/segm/AP": 12.0, "total_loss": 1.0},
            # A resumed run rewrote iteration 99: the later line wins.
            {"iteration": 99, "val_subset/segm/AP": 11.0},
            # The final evaluation, logged after training at iteration MAX_ITER.
            {"iteration": 100, "segm/AP": 9.5},
        ],
    )
    assert read_metrics(path)[99] == {"iteration": 99, "val_subset/segm/AP": 11.0,
                                      "total_loss": 1.0}  # fmt: skip
    out = str(tmp_path / "curve.png")
    drawn = plot_learning_curve(path, out)
    assert drawn == {"losses": ["total_loss", "loss_cate", "loss_ins"], "subset_points": 2,
                     "final": (100, 9.5)}  # fmt: skip
    assert cv2.imread(out) is not None

    _write_lines(path, [{"iteration": 1, "lr": 0.1}])
    with pytest.raises(ValueError, match="no loss"):
        plot_learning_curve(path, out)
    with open(path, "w") as stream:
        stream.write('{"total_loss": 1.0}\n')
    with pytest.raises(ValueError, match="line 1: no 'iteration'"):
        read_metrics(path)


def test_demo_arguments_bad_input(capsys):
    for argv in (["--eval-period", "-1"], ["--vis-scale", "0"], ["--num-vis", "-2"]):
        with pytest.raises(SystemExit):
            demo_pipeline.parse_args(argv)
        assert "must" in capsys.readouterr().err
    assert demo_pipeline.parse_args(["--eval-period", "0"]).eval_period == 0


def test_per_class_table_marks_absent_classes():
    results = {
        "segm": {"AP": 20.0, "AP-ellipse": 30.0, "AP-star": float("nan")},
        "bbox": {"AP": 25.0, "AP-ellipse": 35.5, "AP-star": float("nan")},
    }
    per_class, table = demo_pipeline.per_class_table(results, ["ellipse", "star"])
    assert per_class == {"ellipse": {"segm": 30.0, "bbox": 35.5},
                         "star": {"segm": None, "bbox": None}}  # fmt: skip
    assert table.splitlines() == [
        "class    mask AP   box AP",
        "ellipse     30.0     35.5",
        "star         n/a      n/a",
    ]


# --------------------------------------------------------------------------------------------
# tools/demo_pipeline.py end to end, tiny
# --------------------------------------------------------------------------------------------

MAX_ITER, PERIOD, VAL_IMAGES = 4, 2, 3


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """(output folder, stdout lines, val dataset name) of a 4-iteration demo run on 4 / 3
    generated images, the subset evaluation every 2 iterations (closer than Detectron2's
    writer period of 20, so the demo must write more often) on all 3 val images."""
    root = str(tmp_path_factory.mktemp("shapes"))
    tag = uuid.uuid4().hex[:8]
    train, val = "pictures_train_" + tag, "pictures_val_" + tag
    sides = {"min_side": 64, "max_side": 80}
    register_shapes_dataset(train, root=root, split="train", num_images=4, seed=0, **sides)
    register_shapes_dataset(val, root=root, split="val", num_images=VAL_IMAGES, seed=1, **sides)
    config = write_tiny_config(
        tmp_path_factory.mktemp("config"),
        num_classes=6,
        # SCORE_THR 0 so that the barely trained model predicts something (MAX_PER_IMG keeps the
        # drawing quick).
        MODEL={"SOLOV2": {"SCORE_THR": 0.0, "UPDATE_THR": 0.0, "MAX_PER_IMG": 5}},
        DATASETS={"TRAIN": [train], "TEST": [val]},
        DATALOADER={"NUM_WORKERS": 0},
        INPUT={"MIN_SIZE_TRAIN": [64], "MAX_SIZE_TRAIN": 96, "MIN_SIZE_TEST": 64,
               "MAX_SIZE_TEST": 96, "MASK_FORMAT": "polygon"},  # fmt: skip
        SOLVER={"IMS_PER_BATCH": 2, "BASE_LR": 0.01, "WARMUP_ITERS": 2, "STEPS": [],
                "MAX_ITER": MAX_ITER, "CHECKPOINT_PERIOD": 100},  # fmt: skip
        SEED=0,
    )
    output = str(tmp_path_factory.mktemp("demo"))
    argv = ["--config-file", config, "--output", output, "--num-vis", "2", "--sheet-images", "3"]
    argv += ["--eval-period", str(PERIOD), "--eval-images", str(VAL_IMAGES)]
    argv += ["--vis-threshold", "0", "--vis-scale", "2"]
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        demo_pipeline.main(argv)
    yield output, printed.getvalue().splitlines(), val
    for name in (train, val):
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.mark.slow
def test_demo_writes_its_pictures_and_metrics(demo_run):
    output, lines, val = demo_run
    assert lines[-1].startswith("mask AP ")
    for name in ("learning_curve.png", "contact_sheet.png", "metrics.json"):
        assert os.path.isfile(os.path.join(output, name)), name
    assert len(os.listdir(os.path.join(output, "vis"))) == 2
    drawing = cv2.imread(os.path.join(output, "vis", os.listdir(os.path.join(output, "vis"))[0]))
    assert 128 <= drawing.shape[0] <= 160  # 64-80 px drawn at scale 2
    sheet = cv2.imread(os.path.join(output, "contact_sheet.png"))
    # 3 images in 2 columns: 2 rows of cells at most 160 px + caption + gap high.
    assert sheet.shape[0] <= 2 * (160 + CAPTION_HEIGHT + GAP)
    assert sheet.shape[0] >= 2 * (128 + CAPTION_HEIGHT + GAP)

    with open(os.path.join(output, "metrics.json")) as stream:
        summary = json.load(stream)
    assert lines[-1] == "mask AP {:.1f}".format(summary["segm"]["AP"])
    classes = MetadataCatalog.get(val).thing_classes
    assert sorted(summary["per_class_AP"]) == sorted(classes)
    for name in classes:
        assert summary["per_class_AP"][name]["segm"] == summary["segm"].get("AP-" + name)
    assert any(line.startswith("class ") and "mask AP" in line for line in lines)
    points = summary["subset_evaluations"]["points"]
    assert [p["iteration"] for p in points] == [PERIOD, 2 * PERIOD]
    # The last subset evaluation scored the final weights on every val image: the full
    # evaluation's numbers.
    assert points[-1]["segm_AP"] == pytest.approx(summary["segm"]["AP"])
    assert points[-1]["bbox_AP"] == pytest.approx(summary["bbox"]["AP"])
    assert all(p["seconds"] > 0 for p in points)
    assert summary["seconds"]["subset_evaluations"] >= 0

    records = read_metrics(os.path.join(output, demo_pipeline.TRAINING_METRICS))
    assert (
        "val_subset/segm/AP" in records[PERIOD - 1]
        and "val_subset/segm/AP" in records[MAX_ITER - 1]
    )
    # Detectron2 logs the evaluation after training at iteration MAX_ITER.
    assert records[MAX_ITER]["segm/AP"] == pytest.approx(summary["segm"]["AP"])
