"""tools/analyze_dataset.py on a hand-built image of five rectangles whose counts are computed by
hand below, the suggestion rule, and the command line on a registered dataset."""

import uuid

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog
from detectron2.structures import BoxMode

from .conftest import load_tool

tool = load_tool("analyze_dataset")


# One 100 x 100 image resized 2x (short side 200), padded to 224 (a multiple of 32): the grid
# covers 224 px, so a level-0 cell (S 10) is 22.4 px and a level-1 cell (S 5) 44.8 px.
SETTINGS = tool.Settings(
    num_grids=(10, 5),
    scale_ranges=((4.0, 30.0), (20.0, 150.0)),
    sigma=0.2,
    num_classes=2,
    short_side=200,
    max_size=1000,
    instance_strides=(8, 16),
)


def _box(x0, y0, x1, y1):
    return {
        "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "bbox_mode": BoxMode.XYWH_ABS,
        "category_id": 0,
        "iscrowd": 0,
    }


# Boxes in the original image; after the 2x resize (pixels [2 x0, 2 x1) are inside the mask):
#  A 5x5   -> 10x10,  scale 10:   level 0; center 24.5, region +-1 -> cell 1 of 10: 1 cell.
#  B 1x20  -> 2x40,   scale 8.9:  level 0, thinner than 4 px; center (100.5, 99.5), region
#             +-0.2 x +-4 -> 1 cell.
#  C 100^2 -> 200^2,  scale 200:  above every range, clamped into level 1; center 99.5, region
#             +-20 -> rows/cols (79.5 / 44.8 = 1) .. (119.5 / 44.8 = 2): 2 x 2 = 4 cells.
#  D 12^2  -> 24^2,   scale 24:   levels 0 and 1 (the ranges overlap); center 151.5, region +-2.4
#             stays in cell 6 of 10 and cell 3 of 5: 1 cell each.
#  E 1x1   -> 2x2,    scale 2:    below every range, clamped into level 0, thinner; 1 cell.
RECORD = {
    "file_name": "hand.png",
    "image_id": 0,
    "height": 100,
    "width": 100,
    "annotations": [
        _box(10, 10, 15, 15),
        _box(50, 40, 51, 60),
        _box(0, 0, 100, 100),
        _box(70, 70, 82, 82),
        _box(90, 90, 91, 91),
    ],
}


def test_per_object_scales_and_cells():
    scales, min_sides, cells = tool.image_objects(RECORD, SETTINGS)
    np.testing.assert_allclose(scales, [10, np.sqrt(80), 200, 24, 2])
    np.testing.assert_allclose(min_sides, [10, 2, 200, 24, 2])
    assert cells.tolist() == [[1, 0], [1, 0], [0, 4], [1, 1], [1, 0]]


def test_dataset_counts():
    # A second image without objects counts as an image only.
    empty = {"file_name": "e.png", "image_id": 1, "height": 50, "width": 80, "annotations": []}
    stats = tool.analyze([RECORD, empty], SETTINGS)
    assert (stats["images"], stats["objects"]) == (2, 5)
    # E below 4, C above 150; no scale falls between the (overlapping) ranges.
    assert (stats["outside"], stats["below"], stats["above"], stats["gap"]) == (2, 1, 1, 0)
    assert stats["thinner_than_mask_pixel"] == 2  # B and E
    assert stats["without_cells"] == 0
    level0, level1 = stats["levels"]
    # In range: A, B, D on level 0; D on level 1. Trained: E (clamped) joins level 0, C level 1.
    assert (level0["in_range"], level0["objects"], level0["cells"]) == (3, 4, 4)
    assert level0["cells_per_object"] == (1, 1.0, 1)
    assert (level1["in_range"], level1["objects"], level1["cells"]) == (1, 2, 5)
    assert level1["cells_per_object"] == (1, 2.5, 4)
    report = tool.format_report("hand", SETTINGS, stats)
    assert "outside every range: 2 (40.0%) (below 1, above 1, between ranges 0)" in report
    assert "thinner than a mask-feature pixel (min(w, h) < 4 px): 2 (40.0%)" in report


def test_a_gap_between_ranges_is_counted():
    gapped = tool.Settings(**{**SETTINGS.__dict__, "scale_ranges": ((4.0, 20.0), (30.0, 150.0))})
    stats = tool.analyze([RECORD], gapped)
    # D (24) falls between 20 and 30.
    assert (stats["outside"], stats["below"], stats["above"], stats["gap"]) == (3, 1, 1, 1)


def test_suggestion_for_160_px_images():
    settings = tool.Settings(
        num_grids=(24, 20, 12, 8, 6),
        scale_ranges=((1, 20), (10, 40), (20, 80), (40, 160), (80, 2048)),
        sigma=0.2,
        num_classes=6,
        short_side=160,
        max_size=256,
    )
    grids, ranges, reasons = tool.suggest(settings, max_scale=3000.4)
    # Ranges: COCO's x 160/800 = x 0.2, first lower 1, last upper up to the largest scale.
    assert ranges == ((1, 19), (10, 38), (19, 77), (38, 154), (77, 3001))
    # Grids: COCO's (40, 36, 24, 16, 12) capped at 160 / (8, 8, 16, 32, 32) = (20, 20, 10, 5, 5).
    assert grids == (20, 20, 10, 5, 5)
    assert len(reasons) == 2 and "800" in reasons[0]
    with pytest.raises(ValueError, match="5 FPN levels"):
        tool.suggest(SETTINGS, 10)


def test_settings_from_config_bad_resize():
    cfg = tool._load_config(None, [])
    assert [s.short_side for s in tool.settings_from_config(cfg, "test")] == [800]
    with pytest.raises(ValueError, match="'train' or 'test'"):
        tool.settings_from_config(cfg, "val")


def test_command_line(tmp_path, capsys):
    name = "analyze_hand_" + uuid.uuid4().hex[:8]
    DatasetCatalog.register(name, lambda: [RECORD])
    try:
        histogram = tmp_path / "scales.png"
        argv = ["--dataset", name, "--resize", "test", "--histogram", str(histogram)]
        argv += ["INPUT.MIN_SIZE_TEST", "200", "MODEL.SOLOV2.NUM_CLASSES", "2"]
        assert tool.main(argv) == 0
        printed = capsys.readouterr().out
        assert f"{name}: 1 images, 5 objects; resized to short side 200" in printed
        # COCO grids capped at 224 / (8, 8, 16, 32, 32) = (28, 28, 14, 7, 7).
        assert "MODEL.SOLOV2.NUM_GRIDS: [28, 28, 14, 7, 7]" in printed
        assert cv2.imread(str(histogram)) is not None
        with pytest.raises(SystemExit):
            tool.main(["--dataset", "no_such_dataset_" + name])
        assert "is not registered" in capsys.readouterr().err
    finally:
        DatasetCatalog.remove(name)
