"""solov2_d2's two CPU kernels (``csrc/``), built on first use with PyTorch's ``cpp_extension``.

- ``upsample_threshold`` (``csrc/mask_upsample.cpp``): the final masks, see ``mask_upsample.py``.
- ``same_class_intersections`` (``csrc/mask_intersections.cpp``): the integer pixel counts
  Matrix NMS needs, see ``matrix_nms.py``.

Both give exactly what the PyTorch code they replace gives; each user checks that on fixed cases
before relying on it. The build takes ~40 s, once per machine (torch's extension cache; the name
carries a hash of the CPU's instruction-set flags because of ``-march=native``); ``make setup``
does it. Without a compiler or ``ninja`` the build fails, a warning says why, and the PyTorch
code is used (same results, slower). ``SOLOV2_D2_NATIVE=0`` turns the kernels off.
"""

import hashlib
import logging
import os
import platform
import sys

__all__ = ["load", "status"]

logger = logging.getLogger(__name__)

_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_SOURCES = ("bindings.cpp", "mask_upsample.cpp", "mask_intersections.cpp")
_ENV = "SOLOV2_D2_NATIVE"
_state = {"module": None, "status": None}


def _cpu_tag() -> str:
    """A short hash of the CPU's instruction-set flags: the kernels are built with -march=native,
    so machines sharing a home directory (and torch's build cache) get a build each."""
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    flags += " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def _build():
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA" notice
    from torch.utils import cpp_extension

    # `ninja` installed into the virtual environment is found even when it is not activated.
    bindir = os.path.dirname(sys.executable)
    if os.path.exists(os.path.join(bindir, "ninja")):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    # -ffp-contract=off: only the explicit fmaf calls of mask_upsample.cpp may fuse.
    flags = ["-O3", "-ffp-contract=off"]
    if platform.machine() in ("x86_64", "AMD64") and sys.platform.startswith("linux"):
        flags.append("-march=native")
    logger.info("building solov2_d2's CPU kernels (once per machine, ~40 s)")
    return cpp_extension.load(
        name="solov2_d2_ops_" + _cpu_tag(),
        sources=[os.path.join(_CSRC, name) for name in _SOURCES],
        extra_include_paths=[_CSRC],
        extra_cflags=flags,
        verbose=False,
    )


def load():
    """The compiled module, or None (then ``status()`` says why); builds it on the first call."""
    if _state["status"] is not None:
        return _state["module"]
    if os.environ.get(_ENV, "1").strip() in ("0", "false", "False", "no"):
        _state["status"] = f"C++ kernels off ({_ENV}=0)"
        return None
    try:
        module = _build()
    except Exception as error:  # no compiler, no ninja, no headers: the PyTorch code works
        message = str(error).strip()
        reason = message.splitlines()[0] if message else ""
        _state["status"] = f"C++ kernels not built ({type(error).__name__}: {reason})"
        logger.warning("solov2_d2: %s", _state["status"])
        return None
    _state["module"] = module
    _state["status"] = "C++ kernels built"
    return module


def status() -> str:
    """ "C++ kernels built", or why they are off / not built; builds them if not yet tried."""
    load()
    return _state["status"]
