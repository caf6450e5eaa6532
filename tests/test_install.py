"""The foundation: the venv's Detectron2 imports, its fixes hold, its compiled ops work or fail
clearly, and tools/install_detectron2.py takes the path it should (without rebuilding anything
here: decisions are checked with --dry-run, builds on small trees of their own)."""

import glob
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
import torch

from solov2_d2.compat import detectron2_install_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALLER = os.path.join(ROOT, "tools", "install_detectron2.py")
MAIN_ARCHIVES = sorted(
    glob.glob(os.path.join(ROOT, "..", "shared", "vendor", "detectron2-main-*.tar.gz"))
)

sys.path.insert(0, os.path.join(ROOT, "tools"))
try:
    import install_detectron2 as installer
finally:
    sys.path.pop(0)


def ops_are_compiled():
    """Decided here without solov2_d2.compat: ``detectron2._C`` is a compiled extension module
    (not the sdist's Python stand-in) that exports the fast COCO evaluator."""
    from detectron2 import _C

    extension = _C.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    return extension and "COCOevalAccumulate" in dir(_C)


sdist_only = pytest.mark.skipif(
    detectron2_install_path() != "sdist", reason="only for the sdist build without compiled ops"
)
compiled_only = pytest.mark.skipif(
    detectron2_install_path() != "compiled", reason="only for a build with compiled ops"
)


def run_installer(*args, env_updates=None, drop=("DETECTRON2_SOURCE",)):
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_updates or {})
    return subprocess.run(
        [sys.executable, INSTALLER, *args], capture_output=True, text=True, env=env
    )


def test_install_path_agrees_with_the_extension_module():
    assert detectron2_install_path() in ("sdist", "compiled")
    assert (detectron2_install_path() == "compiled") == ops_are_compiled()


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
    """In a fresh interpreter where ``import pkg_resources`` fails (as with setuptools >= 82),
    whatever setuptools this venv has."""
    code = textwrap.dedent("""
        import os, sys
        sys.modules["pkg_resources"] = None  # makes `import pkg_resources` raise ImportError
        from detectron2.model_zoo import get_config_file
        path = get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
        print(path, os.path.isfile(path))
        """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    path, exists = proc.stdout.split()
    assert exists == "True"
    assert path.endswith(
        os.path.join("configs", "COCO-InstanceSegmentation", "mask_rcnn_R_50_FPN_1x.yaml")
    )


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


@compiled_only
def test_compiled_rotated_box_ops_give_hand_computed_values():
    from detectron2.layers import nms_rotated
    from detectron2.structures import RotatedBoxes, pairwise_iou_rotated

    # 4x2 boxes, axis-aligned; the second is shifted by 1 along x: intersection 3x2 = 6,
    # union 8 + 8 - 6 = 10. The third is the first turned by 90 degrees: intersection 2x2 = 4,
    # union 12.
    boxes = torch.tensor(
        [[5.0, 5.0, 4.0, 2.0, 0.0], [6.0, 5.0, 4.0, 2.0, 0.0], [5.0, 5.0, 4.0, 2.0, 90.0]]
    )
    iou = pairwise_iou_rotated(RotatedBoxes(boxes), RotatedBoxes(boxes))
    expected = torch.tensor([[1.0, 0.6, 4 / 12], [0.6, 1.0, 4 / 12], [4 / 12, 4 / 12, 1.0]])
    torch.testing.assert_close(iou, expected, atol=1e-5, rtol=0)
    # At threshold 0.5 the second box (IoU 0.6 with the best one) goes, the third (1/3) stays.
    keep = nms_rotated(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)
    assert keep.tolist() == [0, 2]


# ---------------------------------------------------------------------------- the COCO evaluator


def _one_square_dataset(folder, name):
    """One 32x32 image with one 10x10 square of class 1, as a COCO json file."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    coco = {
        "images": [{"id": 1, "file_name": "image.jpg", "height": 32, "width": 32}],
        "categories": [{"id": 1, "name": "square"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [8, 8, 10, 10],
                "area": 100,
                "iscrowd": 0,
                "segmentation": [[8, 8, 18, 8, 18, 18, 8, 18]],
            }
        ],
    }
    json_file = os.path.join(folder, "instances.json")
    with open(json_file, "w") as f:
        json.dump(coco, f)
    register_coco_instances(name, {}, json_file, folder)
    DatasetCatalog.get(name)  # sets the metadata's id mapping (class 0 <-> category id 1)


def test_fast_coco_eval_is_used_iff_compiled_ops_exist(tmp_path, monkeypatch):
    """The evaluator the project's Trainer.build_evaluator returns uses Detectron2's fast C++
    COCOeval exactly when the compiled ops exist here, and scores a perfect prediction AP 100."""
    import detectron2.evaluation.coco_evaluation as coco_evaluation
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.structures import Boxes, Instances

    import train_net
    from solov2_d2.compat import build_coco_evaluator

    from .conftest import tiny_cfg

    name = "one_square_{}".format(os.getpid())
    _one_square_dataset(str(tmp_path), name)
    try:
        evaluators = train_net.Trainer.build_evaluator(tiny_cfg(1), name, str(tmp_path / "eval"))
        (evaluator,) = evaluators._evaluators
        direct = build_coco_evaluator(name, str(tmp_path / "direct"))
        expected = ops_are_compiled()
        assert evaluator._use_fast_impl is expected
        assert direct._use_fast_impl is expected

        used = []

        def counting(cls, label):
            class Counting(cls):
                def __init__(self, *args, **kwargs):
                    used.append(label)
                    super().__init__(*args, **kwargs)

            return Counting

        monkeypatch.setattr(coco_evaluation, "COCOeval", counting(coco_evaluation.COCOeval, "py"))
        monkeypatch.setattr(
            coco_evaluation, "COCOeval_opt", counting(coco_evaluation.COCOeval_opt, "fast")
        )
        mask = torch.zeros(1, 32, 32, dtype=torch.bool)
        mask[0, 8:18, 8:18] = True
        instances = Instances((32, 32))
        instances.pred_masks = mask
        instances.pred_boxes = Boxes(torch.tensor([[8.0, 8.0, 18.0, 18.0]]))
        instances.scores = torch.tensor([0.9])
        instances.pred_classes = torch.tensor([0])
        evaluator.reset()
        evaluator.process([{"image_id": 1, "height": 32, "width": 32}], [{"instances": instances}])
        results = evaluator.evaluate()
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)

    assert used == ["fast" if expected else "py"] * 2  # one COCOeval each for segm and bbox
    assert results["segm"]["AP"] == pytest.approx(100.0)
    assert results["bbox"]["AP"] == pytest.approx(100.0)


def test_collect_env_shows_install_path():
    out = subprocess.run(
        [sys.executable, "-m", "detectron2.utils.collect_env"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "detectron2" in out
    assert ("install path: sdist" in out) == (detectron2_install_path() == "sdist")


# --------------------------------------------------------------------- the installer's decisions


def test_installer_keeps_an_importable_detectron2():
    """Path 1: without DETECTRON2_SOURCE a second run keeps what is there (a user's compiled
    build must survive)."""
    proc = run_installer()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "path 1 (keep)" in proc.stdout


def _fake_source_tree(folder):
    """The files that make a folder a Detectron2 source tree for the installer (nothing that
    builds)."""
    for rel, text in {
        "setup.py": "raise SystemExit('not built in these tests')\n",
        "detectron2/__init__.py": '__version__ = "0.6"\n',
        "detectron2/layers/csrc/vision.cpp": "// empty\n",
    }.items():
        path = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    return folder


def test_a_set_detectron2_source_wins_over_the_installed_one(tmp_path):
    source = _fake_source_tree(str(tmp_path / "detectron2"))
    proc = run_installer("--dry-run", env_updates={"DETECTRON2_SOURCE": source})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "path 2 (source)" in proc.stdout
    assert "the build replaces Detectron2" in proc.stdout


def test_a_missing_detectron2_source_stops_with_its_name(tmp_path):
    missing = str(tmp_path / "no-such-detectron2")
    proc = run_installer("--dry-run", env_updates={"DETECTRON2_SOURCE": missing})
    assert proc.returncode != 0
    assert "DETECTRON2_SOURCE={!r} does not exist".format(missing) in proc.stderr


def test_a_build_from_the_same_source_is_kept():
    try:
        from detectron2 import _solov2_d2_install as record
    except ImportError:
        pytest.skip("this Detectron2 has no install record (not installed by this installer)")
    if record.INSTALL_PATH != "source":
        pytest.skip("this Detectron2 was not built from a DETECTRON2_SOURCE")
    if not os.path.exists(record.SOURCE) or installer.fingerprint(record.SOURCE) != (
        record.FINGERPRINT
    ):
        pytest.skip("the source this Detectron2 was built from is gone or has changed")
    proc = run_installer("--dry-run", env_updates={"DETECTRON2_SOURCE": record.SOURCE})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "path 1 (keep)" in proc.stdout
    assert "already built from this very source" in proc.stdout


def _found(ops, fingerprint="archive-sha256:aa", **extra):
    found = {
        "importable": True,
        "version": "0.6",
        "location": "/site-packages/detectron2",
        "record": {"install_path": "source", "source": "/d2.tar.gz", "fingerprint": fingerprint},
        "ops": ops,
    }
    found.update(extra)
    return found


@pytest.mark.parametrize(
    "found, source, fingerprint, path",
    [
        ({"importable": False}, None, None, "sdist"),
        ({"importable": False}, "/d2", "tree-sha256:bb", "source"),
        (_found("stand-in", fingerprint=None), None, None, "keep"),
        (_found("compiled"), None, None, "keep"),
        # A user's build whose ops no longer load (e.g. torch changed under it): not kept silently.
        (_found("broken", ops_error="ImportError: undefined symbol"), None, None, "refuse"),
        (_found("compiled"), "/d2.tar.gz", "archive-sha256:aa", "keep"),
        (_found("compiled"), "/d2.tar.gz", "archive-sha256:cc", "source"),  # the archive changed
        (_found("broken", ops_error="ImportError"), "/d2.tar.gz", "archive-sha256:aa", "source"),
        (_found("stand-in", fingerprint=None), "/d2", "tree-sha256:bb", "source"),
    ],
)
def test_installer_plan(found, source, fingerprint, path):
    assert installer.plan(found, source, fingerprint)[0] == path


def test_compile_jobs_are_capped_by_cores_and_memory():
    gib = 1024**3
    assert installer.compile_jobs({}, cpus=2, available_memory=20 * gib) == "2"
    assert installer.compile_jobs({}, cpus=16, available_memory=6 * gib) == "4"  # 1.5 GiB a job
    assert installer.compile_jobs({}, cpus=8, available_memory=gib) == "1"
    assert installer.compile_jobs({}, cpus=2, available_memory=None) == "2"
    assert installer.compile_jobs({"MAX_JOBS": "3"}, cpus=2, available_memory=gib) == "3"


# ------------------------------------------------------------------------ building from source


def test_the_source_tree_is_copied_not_written_to(tmp_path):
    source = _fake_source_tree(str(tmp_path / "detectron2"))
    os.makedirs(os.path.join(source, ".git"))
    with open(os.path.join(source, ".git", "HEAD"), "w") as f:
        f.write("ref: refs/heads/main\n")
    os.makedirs(os.path.join(source, "build", "temp"))
    with open(os.path.join(source, "detectron2", "_C.cpython-311-x86_64-linux-gnu.so"), "wb") as f:
        f.write(b"stale in-place build")
    before = installer.fingerprint(source)
    listing = sorted(
        os.path.relpath(os.path.join(d, n), source) for d, _, ns in os.walk(source) for n in ns
    )

    root = installer.copy_source_tree(source, str(tmp_path / "work"))
    installer.write_install_record(root, "source", source, before)

    assert not root.startswith(source)
    assert os.path.isfile(os.path.join(root, "detectron2", installer.RECORD_MODULE + ".py"))
    # Version control, earlier builds and compiled leftovers stay behind.
    for left_behind in (
        ".git",
        "build",
        os.path.join("detectron2", "_C.cpython-311-x86_64-linux-gnu.so"),
    ):
        assert not os.path.exists(os.path.join(root, left_behind))
    assert installer.fingerprint(source) == before
    assert (
        sorted(
            os.path.relpath(os.path.join(d, n), source) for d, _, ns in os.walk(source) for n in ns
        )
        == listing
    )
    # The fingerprint ignores the leftovers but not the sources.
    with open(os.path.join(source, "detectron2", "__init__.py"), "a") as f:
        f.write("# edited\n")
    assert installer.fingerprint(source) != before


def test_missing_build_prerequisites_are_named(tmp_path):
    root = _fake_source_tree(str(tmp_path / "detectron2"))
    with pytest.raises(SystemExit, match="a C\\+\\+ compiler: '/no/such/c\\+\\+' is not on PATH"):
        installer.check_build_prerequisites(root, environ={"CXX": "/no/such/c++"})
    os.remove(os.path.join(root, "detectron2", "layers", "csrc", "vision.cpp"))
    with pytest.raises(SystemExit, match="no detectron2/layers/csrc/vision.cpp"):
        installer.check_build_prerequisites(root, environ={})


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")
def test_a_failed_compile_names_the_missing_header(tmp_path):
    """The real path: pip builds a wheel from a tree whose extension includes a header that does
    not exist; the installer's message names that header and the log's place."""
    root = tmp_path / "tree"
    (root / "src").mkdir(parents=True)
    (root / "src" / "ops.cpp").write_text("#include <solov2_d2_no_such_header.h>\n")
    (root / "setup.py").write_text(
        "from setuptools import Extension, setup\n"
        "setup(name='failing-ops', version='0', ext_modules=[Extension('failing_ops', "
        "['src/ops.cpp'])])\n"
    )
    log_path = str(tmp_path / "build.log")
    with pytest.raises(SystemExit) as info:
        installer.build_wheel(str(root), str(tmp_path / "wheels"), log_path, "1")
    message = str(info.value)
    assert "the header solov2_d2_no_such_header.h is missing" in message
    assert log_path in message
    assert "solov2_d2_no_such_header.h" in open(log_path).read()


def _fake_installed_detectron2(folder, c_module_text, source_fingerprint="tree-sha256:dd"):
    package = os.path.join(folder, "detectron2")
    os.makedirs(package)
    with open(os.path.join(package, "__init__.py"), "w") as f:
        f.write('__version__ = "0.6"\n')
    with open(os.path.join(package, "_C.py"), "w") as f:
        f.write(c_module_text)
    installer.write_install_record(folder, "source", "/d2", source_fingerprint)
    return dict(os.environ, PYTHONPATH=folder)


def test_a_built_c_extension_that_does_not_import_is_rejected(tmp_path):
    """As with an extension built against another torch: checked in a fresh interpreter."""
    env = _fake_installed_detectron2(
        str(tmp_path),
        "raise ImportError('_C.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev')\n",
    )
    with pytest.raises(SystemExit) as info:
        installer.verify_compiled_build("tree-sha256:dd", env=env)
    message = str(info.value)
    assert "built but do not work: ImportError: _C.so: undefined symbol" in message
    assert "ABI mismatch" in message


def test_a_python_c_module_is_not_taken_for_compiled_ops(tmp_path):
    env = _fake_installed_detectron2(str(tmp_path), "def get_compiler_version():\n    return 'x'\n")
    with pytest.raises(SystemExit, match="detectron2._C is not a compiled extension"):
        installer.verify_compiled_build("tree-sha256:dd", env=env)
    with pytest.raises(SystemExit, match="a different Detectron2 is imported"):
        installer.verify_compiled_build("tree-sha256:ee", env=env)


# ----------------------------------------------------------------- the fixes, on the real files


@pytest.fixture(scope="module")
def sdist_tree(tmp_path_factory):
    """The real pb1-detectron2==0.6 sdist (from pip's cache or the registry), extracted."""
    folder = tmp_path_factory.mktemp("sdist")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--no-build-isolation",
            "-d",
            str(folder),
            installer.SDIST_REQUIREMENT,
        ],
        capture_output=True,
        text=True,
    )
    archives = glob.glob(str(folder / "*.tar.gz"))
    if proc.returncode != 0 or len(archives) != 1:
        last = (proc.stderr.strip().splitlines() or ["no archive"])[-1]
        pytest.skip(
            "the {} sdist cannot be obtained here: {}".format(installer.SDIST_REQUIREMENT, last)
        )
    with tarfile.open(archives[0]) as archive:
        archive.extractall(folder / "tree", filter="data")
    (root,) = glob.glob(str(folder / "tree" / "*"))
    return root


def _read(root, rel):
    path = os.path.join(root, rel)
    if not os.path.isfile(path):
        return ""
    with open(path) as f:
        return f.read()


@pytest.mark.slow
def test_installer_patches_apply_to_their_targets(sdist_tree, tmp_path):
    """Every fix's target text occurs exactly once in the real sdist file, the patched tree has
    none of the old texts left, and a tree where a target is missing stops the install."""
    for fix in installer.FIXES:
        text = _read(sdist_tree, fix.path)
        for old, _new in fix.edits:
            assert text.count(old) == 1, (fix.path, old)

    root = str(tmp_path / "sdist")
    shutil.copytree(sdist_tree, root)
    installer.patch_sdist_tree(root)
    for fix in installer.FIXES:
        text = _read(root, fix.path)
        for old, new in fix.edits:
            assert old not in text and new in text, (fix.path, old)
    assert "pkg_resources" not in _read(root, "detectron2/model_zoo/model_zoo.py")
    assert "Image.LINEAR" not in _read(root, "detectron2/data/transforms/transform.py")
    assert "ext_modules" not in _read(root, "setup.py")
    assert 'INSTALL_PATH = "sdist"' in _read(root, "detectron2/_C.py")

    # The same tree, patched once more: the targets are gone now, so the install stops.
    with pytest.raises(SystemExit, match="patch does not apply to detectron2/data/transforms"):
        installer.apply_fixes(root, installer.FIXES, required=True)


@pytest.mark.skipif(not MAIN_ARCHIVES, reason="no ../shared/vendor/detectron2-main-*.tar.gz")
def test_source_fixes_apply_to_detectron2_main(tmp_path):
    """On the main archive: the fixes main still needs have their targets exactly once and are
    applied by the source path; the others have no target there and are skipped."""
    root = installer.copy_source_tree(MAIN_ARCHIVES[-1], str(tmp_path))
    for fix in installer.FIXES:
        text = _read(root, fix.path)
        counts = [text.count(old) for old, _new in fix.edits]
        assert counts == [1 if fix.needed_by_main else 0] * len(fix.edits), (fix.path, counts)

    applied = installer.apply_fixes(root, installer.FIXES, required=False)
    assert applied == [fix.path for fix in installer.FIXES if fix.needed_by_main]
    model_zoo = _read(root, "detectron2/model_zoo/model_zoo.py")
    assert "pkg_resources" not in model_zoo
    assert 'os.path.join(os.path.dirname(__file__), "configs", config_path)' in model_zoo
