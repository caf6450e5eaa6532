"""tools/analyze_predictions.py on one hand-built 20 x 20 image whose counts and APs are computed by
hand below, and its command line."""

import json

import numpy as np
import pycocotools.mask as mask_util
import pytest

from .conftest import load_tool

tool = load_tool("analyze_predictions")


def _square_rle(y0, x0, side, size=20):
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[y0 : y0 + side, x0 : x0 + side] = 1
    rle = mask_util.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _dataset():
    # Object A (class 1): a 10 x 10 square, 100 px; object B (class 2): a 4 x 4 square, 16 px.
    gt = {
        "images": [{"id": 1, "height": 20, "width": 20, "file_name": "a.png"}],
        "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 100,
             "bbox": [0, 0, 10, 10], "segmentation": _square_rle(0, 0, 10)},
            {"id": 2, "image_id": 1, "category_id": 2, "iscrowd": 0, "area": 16,
             "bbox": [12, 12, 4, 4], "segmentation": _square_rle(12, 12, 4)},
        ],  # fmt: skip
    }
    # Two exact masks of A: the higher score with the wrong class; nothing on B.
    results = [
        {"image_id": 1, "category_id": 2, "score": 0.9, "segmentation": _square_rle(0, 0, 10)},
        {"image_id": 1, "category_id": 1, "score": 0.5, "segmentation": _square_rle(0, 0, 10)},
    ]
    return gt, results


def test_hand_computed_report():
    gt, results = _dataset()
    report = tool.analyze(gt, results, area_bins=(50, 400), min_area=50)
    assert report["objects"] == 2
    small, medium, large = report["bins"]
    assert (small["objects"], small["found"]) == (1, 0.0)  # B: no prediction overlaps it
    assert (medium["objects"], medium["found"], medium["class_right"]) == (1, 1.0, 0.0)
    assert large["objects"] == 0
    assert report["found"] == 0.5 and report["class_right"] == 0.0
    assert report["median_best_iou"] == pytest.approx(0.5)  # best IoUs 1 (A) and 0 (B)
    # Class-aware: class 1 has A found exactly (AP 100), class 2 only a false positive (AP 0).
    assert report["segm_AP"] == pytest.approx(50.0)
    # Merged: the 0.9 mask is a hit and the 0.5 one a duplicate; recall stops at 1/2, so 51 of
    # COCO's 101 recall points have precision 1, at every IoU threshold.
    assert report["segm_AP_agnostic"] == pytest.approx(100.0 * 51 / 101)
    # From 50 px on, B is ignored: class 1 AP 100, class 2 has no objects left (not averaged);
    # merged, A is found at precision 1 before the duplicate.
    assert report["segm_AP_min_area"] == pytest.approx(100.0)
    assert report["segm_AP_agnostic_min_area"] == pytest.approx(100.0)


def test_best_scoring_match_decides_the_class():
    gt, results = _dataset()
    results.append(
        {"image_id": 1, "category_id": 1, "score": 0.95, "segmentation": _square_rle(0, 0, 10)}
    )
    report = tool.analyze(gt, results, area_bins=(50, 400))
    assert report["bins"][1]["class_right"] == 1.0
    # A 6 x 6 mask holding B overlaps it with IoU 16 / 36 < 0.5: B stays not found.
    gt, results = _dataset()
    results.append(
        {"image_id": 1, "category_id": 2, "score": 0.8, "segmentation": _square_rle(12, 12, 6)}
    )
    assert tool.analyze(gt, results, area_bins=(50, 400))["bins"][0]["found"] == 0.0


def test_command_line(tmp_path, capsys):
    gt, results = _dataset()
    gt_file, results_file = tmp_path / "gt.json", tmp_path / "results.json"
    gt_file.write_text(json.dumps(gt))
    results_file.write_text(json.dumps(results))
    out = tmp_path / "report.json"
    tool.main(["--gt", str(gt_file), "--results", str(results_file), "--json", str(out)])
    assert "segm AP 50.0, classes merged 50.5" in capsys.readouterr().out
    assert json.loads(out.read_text())["found"] == 0.5

    results[0]["image_id"] = 7
    results_file.write_text(json.dumps(results))
    with pytest.raises(SystemExit):
        tool.main(["--gt", str(gt_file), "--results", str(results_file)])
    assert "image ids [7]" in capsys.readouterr().err
