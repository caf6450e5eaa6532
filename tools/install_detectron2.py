#!/usr/bin/env python
"""Install Detectron2 into the running Python environment, honestly.

Detectron2 is not on the package registry under its own name. This script takes the first of
three paths that applies and prints which one it took:

1. ``keep``:    Detectron2 is already importable here: keep it untouched (a user's own build with
                compiled CUDA ops must survive ``make setup``).
2. ``source``:  ``$DETECTRON2_SOURCE`` names a Detectron2 source tree or archive (e.g. a checkout of
                the upstream repository): build and install it *with* its compiled ops.
3. ``sdist``:   build Detectron2 v0.6 from the registry's ``pb1-detectron2==0.6`` sdist, which
                ships the Python code but not ``detectron2/layers/csrc``. We install the Python
                code with a small ``detectron2/_C`` stand-in whose compiled ops raise a clear
                ``RuntimeError``, and apply two small fixes that upstream made later (PATCHES).

In every path, Detectron2's real runtime dependencies are installed explicitly (v0.6's own
``install_requires`` pins stale tools such as ``black==21.4b2`` that we do not want).
"""

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

SDIST_REQUIREMENT = "pb1-detectron2==0.6"

# Detectron2's runtime dependencies (v0.6 setup.py, without black/future/pydot/dataclasses, with the
# version windows that are known to work with v0.6's code).
RUNTIME_DEPS = [
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "omegaconf>=2.1,<2.4",
    "hydra-core>=1.1",
]

# (file, old text, new text, why). Applied to the sdist tree before it is installed.
PATCHES = [
    (
        "detectron2/data/transforms/transform.py",
        "interp=Image.LINEAR",
        "interp=Image.BILINEAR",
        "Pillow 10 removed Image.LINEAR (an alias of BILINEAR); upstream commit ff53992b.",
    ),
    (
        "detectron2/model_zoo/model_zoo.py",
        "import pkg_resources\n",
        "",
        "setuptools >= 82 no longer ships pkg_resources; configs are found next to the module.",
    ),
    (
        "detectron2/model_zoo/model_zoo.py",
        'cfg_file = pkg_resources.resource_filename(\n        "detectron2.model_zoo", '
        'os.path.join("configs", config_path)\n    )',
        'cfg_file = os.path.join(os.path.dirname(__file__), "configs", config_path)',
        "(same) the package-relative path that pkg_resources computed.",
    ),
]

# Replaces v0.6's setup.py, which builds the C++ extension unconditionally and pins stale tools.
SDIST_SETUP_PY = """\
# Written by solov2_d2/tools/install_detectron2.py: Detectron2 v0.6 Python code, no C++ extension.
from setuptools import find_packages, setup

PROJECTS = {
    "detectron2.projects.point_rend": "projects/PointRend/point_rend",
    "detectron2.projects.deeplab": "projects/DeepLab/deeplab",
    "detectron2.projects.panoptic_deeplab": "projects/Panoptic-DeepLab/panoptic_deeplab",
}

setup(
    name="detectron2",
    version="0.6",
    description="Detectron2 v0.6 (pb1-detectron2 sdist) without compiled ops",
    packages=find_packages(include=["detectron2", "detectron2.*"]) + list(PROJECTS),
    package_dir=PROJECTS,
    package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},
    python_requires=">=3.7",
)
"""

# The stand-in for the compiled extension. Every attribute other than the version helpers is an op
# that raises a RuntimeError naming itself and the way to a compiled build.
STANDIN_C_PY = '''\
"""Stand-in for Detectron2's compiled extension ``detectron2._C``.

Installed by solov2_d2's tools/install_detectron2.py (path "sdist"): the registry's
pb1-detectron2==0.6 sdist has no C++/CUDA sources, so deformable convolution, rotated boxes / NMS /
ROIAlign and the fast C++ COCO evaluator are not available. Everything else in Detectron2 works.
"""
import torch

INSTALL_PATH = "sdist"
_HOW_TO_FIX = (
    "This Detectron2 was installed from the pb1-detectron2==0.6 sdist without compiled ops. "
    "To get them, rerun `make setup` with DETECTRON2_SOURCE=/path/to/detectron2 (a source checkout "
    "or archive) after removing the current build: `.venv/bin/pip uninstall -y detectron2`."
)


def get_compiler_version():
    return (
        "none: pb1-detectron2==0.6 sdist, compiled ops replaced by a stand-in "
        "(install path: sdist)"
    )


def get_cuda_version():
    return "none (no compiled ops)"


def has_cuda():
    return False


class CompiledOpUnavailable(RuntimeError):
    pass


def _unavailable(name):
    def op(*args, **kwargs):
        raise CompiledOpUnavailable(
            "Detectron2 compiled op '{}' is not available. {}".format(name, _HOW_TO_FIX)
        )

    op.__name__ = name
    return op


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _unavailable(name)


# nms_rotated is reached through torch.ops.detectron2, not through this module.
_LIB = torch.library.Library("detectron2", "DEF")
_LIB.define("nms_rotated(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor")


def _nms_rotated(boxes, scores, iou_threshold):
    _unavailable("nms_rotated")()


_LIB.impl("nms_rotated", _nms_rotated, "CompositeExplicitAutograd")
'''


def log(msg):
    print("[install_detectron2] " + msg, flush=True)


def pip(*args):
    cmd = [sys.executable, "-m", "pip", *args]
    log("$ " + " ".join(cmd))
    subprocess.check_call(cmd)


def installed_detectron2():
    """Returns a description of an importable Detectron2, or None."""
    code = (
        "import detectron2, os\n"
        "try:\n"
        "    import detectron2._C as C\n"
        "    kind = getattr(C, 'INSTALL_PATH', 'compiled')\n"
        "except ImportError:\n"
        "    kind = 'no _C'\n"
        "print(detectron2.__version__, kind, os.path.dirname(detectron2.__file__))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def install_from_source(source):
    if not os.path.exists(source):
        raise SystemExit("DETECTRON2_SOURCE={!r} does not exist".format(source))
    log("path 2 (source): building Detectron2 with its compiled ops from " + source)
    # setup.py imports torch: build against the torch that is installed here.
    pip("install", "--no-build-isolation", "--no-deps", source)


def fetch_sdist(workdir):
    pip("download", "--no-deps", "--no-build-isolation", "-d", workdir, SDIST_REQUIREMENT)
    archives = glob.glob(os.path.join(workdir, "*.tar.gz"))
    if len(archives) != 1:
        raise SystemExit("expected one sdist archive in {}, found {}".format(workdir, archives))
    with tarfile.open(archives[0]) as tar:
        tar.extractall(workdir, filter="data")
    roots = [p for p in glob.glob(os.path.join(workdir, "*")) if os.path.isdir(p)]
    return roots[0]


def patch_sdist_tree(root):
    for rel, old, new, why in PATCHES:
        path = os.path.join(root, rel)
        with open(path) as f:
            text = f.read()
        if old not in text:
            raise SystemExit("patch does not apply to {}: {!r} not found".format(rel, old))
        with open(path, "w") as f:
            f.write(text.replace(old, new))
        log("patched {}: {}".format(rel, why))
    with open(os.path.join(root, "detectron2", "_C.py"), "w") as f:
        f.write(STANDIN_C_PY)
    with open(os.path.join(root, "setup.py"), "w") as f:
        f.write(SDIST_SETUP_PY)
    for stale in ("setup.cfg", "pyproject.toml"):
        if os.path.exists(os.path.join(root, stale)):
            os.remove(os.path.join(root, stale))
    shutil.rmtree(os.path.join(root, "pb1_detectron2.egg-info"), ignore_errors=True)


def install_from_sdist():
    log("path 3 (sdist): Detectron2 v0.6 from {} without compiled ops".format(SDIST_REQUIREMENT))
    with tempfile.TemporaryDirectory(prefix="d2-sdist-") as workdir:
        root = fetch_sdist(workdir)
        patch_sdist_tree(root)
        pip("install", "--no-build-isolation", "--no-deps", root)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--skip-deps", action="store_true", help="do not install Detectron2's runtime dependencies"
    )
    args = parser.parse_args()

    found = installed_detectron2()
    if found:
        log("path 1 (keep): Detectron2 already importable: {} -- keeping it".format(found))
    else:
        if not args.skip_deps:
            pip("install", *RUNTIME_DEPS)
        source = os.environ.get("DETECTRON2_SOURCE")
        if source:
            install_from_source(source)
        else:
            install_from_sdist()
        found = installed_detectron2()
        if not found:
            raise SystemExit("Detectron2 was installed but does not import; see the log above")
        log("installed: " + found)


if __name__ == "__main__":
    main()
