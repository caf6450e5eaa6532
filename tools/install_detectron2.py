#!/usr/bin/env python
"""Install Detectron2 into the running Python environment, honestly.

Detectron2 is not on the package registry under its own name. This script takes one of three
paths and prints which one it took, and why:

1. ``keep``:    Detectron2 already imports here, with working compiled ops or the sdist stand-in,
                and ``$DETECTRON2_SOURCE`` asks for nothing else: keep it untouched (a user's own
                build with compiled CUDA ops must survive ``make setup``).
2. ``source``:  ``$DETECTRON2_SOURCE`` names a Detectron2 source tree or archive (e.g. a checkout of
                the upstream repository): build it *with* its compiled ops, from a temporary copy
                (the source is never written to), and install it in place of any other Detectron2
                here. A build from the very same source (same content fingerprint) is kept.
3. ``sdist``:   build Detectron2 v0.6 from the registry's ``pb1-detectron2==0.6`` sdist, which
                ships the Python code but not ``detectron2/layers/csrc``. We install the Python
                code with a small ``detectron2/_C`` stand-in whose compiled ops raise a clear
                ``RuntimeError``.

Both build paths apply small fixes that upstream made later or has not made yet (FIXES): all of
them must apply to the sdist; a source tree gets those whose target text it contains.

In every path, Detectron2's real runtime dependencies are installed explicitly (v0.6's own
``install_requires`` pins stale tools such as ``black==21.4b2`` that we do not want).

``--dry-run`` prints the path that would be taken, and why, and changes nothing.
"""

import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from typing import NamedTuple, Optional, Tuple

SDIST_REQUIREMENT = "pb1-detectron2==0.6"

# Detectron2's runtime dependencies (v0.6 setup.py, without black/future/pydot/dataclasses, with the
# version windows that are known to work with v0.6's code; main needs the same ones).
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
    "packaging",
]
# What compiling Detectron2's ops needs from the registry: ninja runs the compile jobs in parallel
# (MAX_JOBS); without it torch compiles one file after the other.
SOURCE_BUILD_DEPS = ["ninja"]

# Memory one compile job of Detectron2's C++ ops may take (g++ on a torch extension translation
# unit peaks around 1 GiB); MAX_JOBS is capped so that the jobs fit in the available memory.
MEMORY_PER_COMPILE_JOB = 1536 * 1024 * 1024

# The module every build path writes into the Detectron2 it installs, so that a later run can tell
# what is installed and from what.
RECORD_MODULE = "_solov2_d2_install"


class Fix(NamedTuple):
    """Edits to one file of a Detectron2 tree: each ``old`` text must occur exactly once."""

    path: str
    edits: Tuple[Tuple[str, str], ...]
    why: str
    # Whether Detectron2 main (the archive ../shared/vendor/detectron2-main-02b5c4e.tar.gz) still
    # needs it; the tests check this against the archive.
    needed_by_main: bool


FIXES = [
    Fix(
        "detectron2/data/transforms/transform.py",
        (("interp=Image.LINEAR", "interp=Image.BILINEAR"),),
        "Pillow 10 removed Image.LINEAR (an alias of BILINEAR); upstream commit ff53992b.",
        needed_by_main=False,
    ),
    Fix(
        "detectron2/model_zoo/model_zoo.py",
        (
            ("import pkg_resources\n", ""),
            (
                'cfg_file = pkg_resources.resource_filename(\n        "detectron2.model_zoo", '
                'os.path.join("configs", config_path)\n    )',
                'cfg_file = os.path.join(os.path.dirname(__file__), "configs", config_path)',
            ),
        ),
        "setuptools >= 82 no longer ships pkg_resources; the configs are found next to the module "
        "(the package-relative path that pkg_resources computed).",
        needed_by_main=True,
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
    "To get them, rerun `make setup DETECTRON2_SOURCE=/path/to/detectron2` (a source checkout "
    "or archive of Detectron2); that build replaces this one."
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

# Runs in a fresh interpreter (what is installed now, not what this process imported): prints one
# JSON object describing the importable Detectron2, or {"importable": false, ...}.
PROBE_CODE = r"""
import importlib.machinery, json, os, sys
out = {"importable": False}
try:
    import torch  # detectron2._C links libtorch: load it first
    import detectron2
except Exception as error:
    out["error"] = "{}: {}".format(type(error).__name__, error)
    print(json.dumps(out))
    sys.exit(0)
out.update(importable=True, version=getattr(detectron2, "__version__", "?"),
           location=os.path.dirname(os.path.abspath(detectron2.__file__)))
try:
    from detectron2 import _solov2_d2_install as record
    out["record"] = {"install_path": record.INSTALL_PATH, "source": record.SOURCE,
                     "fingerprint": record.FINGERPRINT}
except ImportError:
    out["record"] = None
try:
    from detectron2 import _C
except Exception as error:
    out["ops"] = "broken"
    out["ops_error"] = "{}: {}".format(type(error).__name__, error)
else:
    if getattr(_C, "INSTALL_PATH", None) == "sdist":
        out["ops"] = "stand-in"
    elif not str(getattr(_C, "__file__", "")).endswith(
        tuple(importlib.machinery.EXTENSION_SUFFIXES)
    ):
        out["ops"] = "broken"
        out["ops_error"] = "detectron2._C is not a compiled extension: {}".format(
            getattr(_C, "__file__", None))
    else:
        try:
            # One real op: a rotated box overlaps itself completely.
            box = torch.tensor([[5.0, 5.0, 4.0, 2.0, 30.0]])
            iou = float(torch.ops.detectron2.box_iou_rotated(box, box)[0, 0])
            _C.COCOevalAccumulate  # the fast COCO evaluator's entry point
        except Exception as error:
            out["ops"] = "broken"
            out["ops_error"] = "{}: {}".format(type(error).__name__, error)
        else:
            ok = abs(iou - 1.0) < 1e-5
            out["ops"] = "compiled" if ok else "broken"
            if not ok:
                out["ops_error"] = "box_iou_rotated of a box with itself is {}, not 1".format(iou)
print(json.dumps(out))
"""


def log(msg):
    print("[install_detectron2] " + msg, flush=True)


def pip(*args):
    cmd = [sys.executable, "-m", "pip", *args]
    log("$ " + " ".join(cmd))
    subprocess.check_call(cmd)


# ------------------------------------------------------------------------------ what is installed


def probe_detectron2(env=None):
    """Describes the Detectron2 that a fresh interpreter of this Python imports (a dict, see
    PROBE_CODE); ``ops`` is "compiled", "stand-in" or "broken" (with ``ops_error``)."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE_CODE], capture_output=True, text=True, env=env
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        # The interpreter itself died (e.g. a crash while loading an extension).
        detail = proc.stderr.strip().splitlines() or ["exit status {}".format(proc.returncode)]
        return {
            "importable": True,
            "version": "?",
            "location": "?",
            "record": None,
            "ops": "broken",
            "ops_error": "importing Detectron2 killed the interpreter: " + detail[-1],
        }
    return json.loads(lines[-1])


def describe(found):
    text = "Detectron2 {} at {}".format(found.get("version"), found.get("location"))
    record = found.get("record") or {}
    if record.get("install_path") == "source":
        text += ", built from {}".format(record.get("source"))
    ops = found.get("ops")
    if ops == "compiled":
        return text + ", compiled ops working"
    if ops == "stand-in":
        return text + ", no compiled ops (sdist stand-in)"
    return text + ", compiled ops do not work ({})".format(found.get("ops_error"))


def plan(found, source, fingerprint):
    """The path to take: ("keep" | "source" | "sdist" | "refuse", reason). Pure, for the tests.

    ``found``: probe_detectron2()'s answer; ``source``/``fingerprint``: $DETECTRON2_SOURCE and its
    content fingerprint, or None.
    """
    importable = bool(found and found.get("importable"))
    if source:
        if not importable:
            return "source", "no Detectron2 imports here yet"
        record = found.get("record") or {}
        if record.get("fingerprint") == fingerprint and found.get("ops") == "compiled":
            return "keep", "{} is already built from this very source".format(describe(found))
        return "source", "DETECTRON2_SOURCE is set: the build replaces " + describe(found)
    if not importable:
        return "sdist", "no Detectron2 imports here and DETECTRON2_SOURCE is not set"
    if found.get("ops") == "broken":
        return "refuse", (
            "{}. Rebuild it against this torch with `make setup DETECTRON2_SOURCE=/path/to/"
            "detectron2` (its compiled ops are then checked in a fresh interpreter), or remove it "
            "(`{} -m pip uninstall -y detectron2`) to get the v0.6 sdist build without compiled "
            "ops.".format(describe(found), sys.executable)
        )
    return "keep", describe(found)


# -------------------------------------------------------------------------------- source trees

# Never part of the build input: version control, earlier in-tree builds, compiled leftovers.
_SKIPPED_DIRS = {".git", ".hg", "build", "dist", "__pycache__", ".eggs"}
_SKIPPED_SUFFIXES = (".pyc", ".so", ".pyd", ".o")


def _skipped(name):
    return name in _SKIPPED_DIRS or name.endswith(".egg-info") or name.endswith(_SKIPPED_SUFFIXES)


def fingerprint(source):
    """sha256 of an archive's bytes, or of a source tree's files (paths and contents, without
    version-control and build leftovers): equal fingerprints mean an equal build input."""
    digest = hashlib.sha256()
    if os.path.isfile(source):
        with open(source, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return "archive-sha256:" + digest.hexdigest()
    for folder, dirs, files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if not _skipped(d))
        for name in sorted(f for f in files if not _skipped(f)):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, source).encode() + b"\0")
            if os.path.islink(path):
                digest.update(b"link:" + os.readlink(path).encode())
            else:
                with open(path, "rb") as f:
                    digest.update(f.read())
            digest.update(b"\0")
    return "tree-sha256:" + digest.hexdigest()


def _tree_root(folder):
    """The folder holding setup.py: ``folder`` itself or its only subfolder (archives wrap the
    tree in one top-level folder)."""
    if os.path.isfile(os.path.join(folder, "setup.py")):
        return folder
    subfolders = [p for p in glob.glob(os.path.join(folder, "*")) if os.path.isdir(p)]
    if len(subfolders) == 1 and os.path.isfile(os.path.join(subfolders[0], "setup.py")):
        return subfolders[0]
    return None


def copy_source_tree(source, workdir):
    """A private copy of the source (a folder, or a .tar.* / .tgz / .zip archive) under
    ``workdir``; returns its root. The build writes into the copy only."""
    target = os.path.join(workdir, "source")
    if os.path.isdir(source):
        shutil.copytree(
            source,
            target,
            symlinks=True,
            ignore=lambda folder, names: [n for n in names if _skipped(n)],
        )
    elif zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            archive.extractall(target)
    elif tarfile.is_tarfile(source):
        with tarfile.open(source) as archive:
            archive.extractall(target, filter="data")
    else:
        raise SystemExit(
            "DETECTRON2_SOURCE={!r} is neither a folder nor a .tar.gz/.tar/.zip archive".format(
                source
            )
        )
    root = _tree_root(target)
    if root is None or not os.path.isfile(os.path.join(root, "detectron2", "__init__.py")):
        raise SystemExit(
            "DETECTRON2_SOURCE={!r} is not a Detectron2 source tree: no setup.py next to a "
            "detectron2/ package (at the top or in its one top-level folder)".format(source)
        )
    return root


def apply_fixes(root, fixes, required):
    """Applies each fix whose target texts occur exactly once. ``required`` (the sdist, whose
    files are known): a fix that does not apply stops the install. Otherwise (a source tree of any
    version): a fix whose texts are all absent is not needed there and is skipped; one that applies
    only in part is left out with a warning."""
    applied = []
    for fix in fixes:
        path = os.path.join(root, fix.path)
        text = ""
        if os.path.isfile(path):
            with open(path) as f:
                text = f.read()
        counts = [text.count(old) for old, _new in fix.edits]
        if all(count == 1 for count in counts):
            for old, new in fix.edits:
                text = text.replace(old, new)
            with open(path, "w") as f:
                f.write(text)
            log("patched {}: {}".format(fix.path, fix.why))
            applied.append(fix.path)
            continue
        problems = "; ".join(
            "{!r} found {} times".format(old, count)
            for (old, _new), count in zip(fix.edits, counts)
            if count != 1
        )
        if required:
            raise SystemExit("patch does not apply to {}: {}".format(fix.path, problems))
        if not any(counts):
            log("not needed in this tree: {} ({})".format(fix.path, fix.why))
        else:
            log(
                "WARNING: left {} unpatched, it differs from what the fix expects ({}): {}".format(
                    fix.path, problems, fix.why
                )
            )
    return applied


def write_install_record(root, install_path, source, source_fingerprint):
    with open(os.path.join(root, "detectron2", RECORD_MODULE + ".py"), "w") as f:
        f.write(
            '"""Written by solov2_d2\'s tools/install_detectron2.py: how this Detectron2 was '
            'installed."""\n'
            "INSTALL_PATH = {!r}\nSOURCE = {!r}\nFINGERPRINT = {!r}\n".format(
                install_path, source, source_fingerprint
            )
        )


def compile_jobs(environ, cpus, available_memory):
    """MAX_JOBS for the compile: the user's value, else one job per usable core, no more jobs than
    fit in the available memory (at least one)."""
    if environ.get("MAX_JOBS", "").strip():
        return environ["MAX_JOBS"].strip()
    jobs = max(1, cpus)
    if available_memory:
        jobs = min(jobs, max(1, available_memory // MEMORY_PER_COMPILE_JOB))
    return str(jobs)


def _usable_cpus():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _available_memory():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_build_prerequisites(root, environ=None):
    """Names what the compile would miss before starting it (each costs a minute to discover
    from a failed build)."""
    environ = os.environ if environ is None else environ
    missing = []
    csrc = os.path.join(root, "detectron2", "layers", "csrc", "vision.cpp")
    if not os.path.isfile(csrc):
        missing.append(
            "the C++ sources (no detectron2/layers/csrc/vision.cpp: this tree cannot build the "
            "compiled ops; the registry's pb1-detectron2 sdist is such a tree, and `make setup` "
            "without DETECTRON2_SOURCE installs it)"
        )
    try:
        import torch.utils.cpp_extension  # noqa: F401
    except ImportError as error:
        missing.append("torch, which the build compiles against ({})".format(error))
    compiler = environ.get("CXX") or "c++"
    if shutil.which(compiler.split()[0]) is None:
        missing.append(
            "a C++ compiler: {!r} is not on PATH (set CXX, or install one, e.g. Debian's "
            "g++)".format(compiler)
        )
    include = sysconfig.get_paths()["include"]
    if not os.path.isfile(os.path.join(include, "Python.h")):
        missing.append(
            "the Python headers: no Python.h in {} (e.g. Debian's python3-dev)".format(include)
        )
    if missing:
        raise SystemExit(
            "cannot build Detectron2's compiled ops: missing " + "; and ".join(missing)
        )


# Compiler and linker messages that name the missing piece, most specific first.
_DIAGNOSES = [
    (r"fatal error: ([^:\s]+): No such file or directory", "the header {0} is missing"),
    (
        r"Killed signal terminated program (\S+)",
        "the compiler ({0}) was killed, usually for "
        "lack of memory: rerun with a lower MAX_JOBS (e.g. MAX_JOBS=1)",
    ),
    (r"No such file or directory: '([^']+)'", "the program or file {0} is missing"),
    (r"(\S+): (?:command )?not found", "the program {0} is not on PATH"),
    (r"cannot find -l(\S+)", "the library lib{0} is missing (linker)"),
    (r"(nvcc fatal[^\n]*)", "{0}"),
    (r"^(.*\berror\b: .*)$", "{0}"),
]


def diagnose_build_failure(output):
    """One line naming what the failed build lacked, from its output."""
    for pattern, message in _DIAGNOSES:
        match = re.search(pattern, output, flags=re.MULTILINE)
        if match:
            return message.format(*(g.strip() for g in match.groups()))
    tail = [line for line in output.strip().splitlines() if line.strip()]
    return tail[-1].strip() if tail else "no output"


def build_wheel(root, wheel_dir, log_path, jobs):
    """Compiles the tree into a wheel under ``wheel_dir`` (nothing is installed yet). A failed
    build ends in a SystemExit naming the missing piece and the full log's place."""
    env = dict(os.environ, MAX_JOBS=jobs)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-build-isolation",  # setup.py imports torch: build against the torch installed here
        "--no-deps",
        "--verbose",
        "--wheel-dir",
        wheel_dir,
        root,
    ]
    log("$ MAX_JOBS={} {}  (compiler output: {})".format(jobs, " ".join(cmd), log_path))
    with open(log_path, "w") as log_file:
        proc = subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=root)
    with open(log_path, errors="replace") as f:
        output = f.read()
    wheels = glob.glob(os.path.join(wheel_dir, "*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        raise SystemExit(
            "building Detectron2's compiled ops failed: {}. Full compiler output: {}".format(
                diagnose_build_failure(output), log_path
            )
        )
    return wheels[0]


def verify_compiled_build(source_fingerprint, env=None):
    """Checks in a fresh interpreter that the Detectron2 that imports now is the one just built
    and that its compiled ops load and run; returns the probe's answer."""
    found = probe_detectron2(env)
    if not found.get("importable"):
        raise SystemExit("the Detectron2 just built does not import: {}".format(found.get("error")))
    record = found.get("record") or {}
    if record.get("fingerprint") != source_fingerprint:
        raise SystemExit(
            "a different Detectron2 is imported instead of the one just built: {} (another "
            "installation earlier on sys.path, e.g. through PYTHONPATH?)".format(describe(found))
        )
    if found.get("ops") != "compiled":
        hint = ""
        if "undefined symbol" in str(found.get("ops_error")):
            hint = (
                " An undefined symbol means the extension was built against another torch "
                "(ABI mismatch): rebuild it with the torch installed here."
            )
        raise SystemExit(
            "Detectron2's compiled ops were built but do not work: {}.{}".format(
                found.get("ops_error"), hint
            )
        )
    return found


def _build_log_path():
    folder = sys.prefix if os.access(sys.prefix, os.W_OK) else tempfile.gettempdir()
    return os.path.join(folder, "detectron2-build.log")


def install_from_source(source, source_fingerprint):
    log("path 2 (source): building Detectron2 with its compiled ops from " + source)
    with tempfile.TemporaryDirectory(prefix="d2-source-") as workdir:
        root = copy_source_tree(source, workdir)
        check_build_prerequisites(root)
        apply_fixes(root, FIXES, required=False)
        write_install_record(root, "source", source, source_fingerprint)
        jobs = compile_jobs(os.environ, _usable_cpus(), _available_memory())
        wheel = build_wheel(root, os.path.join(workdir, "wheels"), _build_log_path(), jobs)
        pip("install", "--no-deps", "--force-reinstall", wheel)
    return verify_compiled_build(source_fingerprint)


# ------------------------------------------------------------------------------------- the sdist


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
    apply_fixes(root, FIXES, required=True)
    with open(os.path.join(root, "detectron2", "_C.py"), "w") as f:
        f.write(STANDIN_C_PY)
    write_install_record(root, "sdist", SDIST_REQUIREMENT, None)
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
    found = probe_detectron2()
    if not found.get("importable") or found.get("ops") != "stand-in":
        raise SystemExit("Detectron2 was installed but does not import: {}".format(found))
    return found


# ------------------------------------------------------------------------------------------ main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--skip-deps", action="store_true", help="do not install Detectron2's runtime dependencies"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the path that would be taken, change nothing"
    )
    args = parser.parse_args(argv)

    source: Optional[str] = os.environ.get("DETECTRON2_SOURCE", "").strip() or None
    source_fingerprint = None
    if source:
        source = os.path.abspath(os.path.expanduser(source))
        if not os.path.exists(source):
            raise SystemExit("DETECTRON2_SOURCE={!r} does not exist".format(source))
        source_fingerprint = fingerprint(source)

    found = probe_detectron2()
    path, reason = plan(found, source, source_fingerprint)
    names = {"keep": "path 1 (keep)", "source": "path 2 (source)", "sdist": "path 3 (sdist)"}
    if path == "refuse":
        raise SystemExit("[install_detectron2] refusing to keep a broken Detectron2: " + reason)
    log("{}: {}".format(names[path], reason))
    if args.dry_run or path == "keep":
        return

    if not args.skip_deps:
        pip("install", *RUNTIME_DEPS, *(SOURCE_BUILD_DEPS if path == "source" else []))
    if path == "source":
        found = install_from_source(source, source_fingerprint)
    else:
        found = install_from_sdist()
    log("installed: " + describe(found))


if __name__ == "__main__":
    main()
