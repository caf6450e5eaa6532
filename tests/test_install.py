"""The foundation: the venv's Detectron2 imports, its fixes hold, missing compiled ops fail
clearly."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from solov2_d2.compat import detectron2_install_path, has_compiled_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sdist_only = pytest.mark.skipif(
    detectron2_install_path() != "sdist", reason="only for the sdist build without compiled ops"
)


def test_detectron2_core_modules_import():
    import detectron2.engine  # noqa: F401
    import detectron2.evaluation  # noqa: F401
    import detectron2.modeling  # noqa: F401
    import detectron2.utils.visualizer  # noqa: F401


def test_resize_shortest_edge_and_extent_transform_run():
    """Pillow >= 10 removed Image.LINEAR, which v0.6's ExtentTransform used as a default."""
    from detectron2.data import transforms as T

    image = np.random.RandomState(0).randint(0, 255, (60, 80, 3), dtype=np.uint8)
    resized = T.ResizeShortestEdge(30, 1000).get_transform(image).apply_image(image)
    assert resized.shape == (30, 40, 3)
    extent = T.ExtentTransform(src_rect=(0, 0, 40, 30), output_size=(15, 20)).apply_image(image)
    assert extent.shape == (15, 20, 3)


def test_model_zoo_config_lookup_without_pkg_resources():
    from detectron2.model_zoo import get_config_file

    path = get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    assert os.path.isfile(path)


def _nms_rotated():
    from detectron2.layers import nms_rotated

    nms_rotated(torch.zeros(1, 5), torch.ones(1), 0.5)


def _box_iou_rotated():
    from detectron2.structures import RotatedBoxes, pairwise_iou_rotated

    boxes = RotatedBoxes(torch.tensor([[5.0, 5.0, 4.0, 4.0, 0.0]]))
    pairwise_iou_rotated(boxes, boxes)


def _roi_align_rotated():
    from detectron2.layers import ROIAlignRotated

    ROIAlignRotated((2, 2), 1.0, 0)(torch.zeros(1, 1, 4, 4), torch.zeros(1, 6))


@sdist_only
@pytest.mark.parametrize(
    "call, op_name",
    [
        (_nms_rotated, "nms_rotated"),
        (_box_iou_rotated, "box_iou_rotated"),
        (_roi_align_rotated, "roi_align_rotated_forward"),
    ],
)
def test_compiled_ops_raise_clear_error(call, op_name):
    with pytest.raises(RuntimeError) as info:
        call()
    message = str(info.value)
    assert op_name in message
    assert "DETECTRON2_SOURCE" in message


@sdist_only
def test_fast_coco_eval_is_not_used_without_compiled_ops(tmp_path):
    assert not has_compiled_ops()


def test_collect_env_shows_install_path():
    out = subprocess.run(
        [sys.executable, "-m", "detectron2.utils.collect_env"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "detectron2" in out
    if detectron2_install_path() == "sdist":
        assert "install path: sdist" in out


def test_installer_keeps_an_importable_detectron2():
    """Path 1: a second run must keep what is there (a user's compiled build must survive)."""
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "install_detectron2.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "path 1 (keep)" in out


def test_installer_patches_apply_to_their_targets(tmp_path):
    """Each patch's old text must exist in the sdist layout it targets; a missing target fails
    loudly instead of installing an unpatched Detectron2."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import install_detectron2 as installer
    finally:
        sys.path.pop(0)
    root = tmp_path / "sdist"
    for rel, old, _new, _why in installer.PATCHES:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        text = path.read_text() if path.exists() else ""
        path.write_text(text + "prefix\n" + old + "\nsuffix\n")
    (root / "detectron2" / "__init__.py").write_text("")
    installer.patch_sdist_tree(str(root))
    for rel, old, new, _why in installer.PATCHES:
        text = (root / rel).read_text()
        assert new in text
    assert (root / "detectron2" / "_C.py").exists()
    assert "ext_modules" not in (root / "setup.py").read_text()

    (root / installer.PATCHES[0][0]).write_text("nothing to patch here\n")
    with pytest.raises(SystemExit, match="patch does not apply"):
        installer.patch_sdist_tree(str(root))
