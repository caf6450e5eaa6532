"""solov2_d2's two CPU kernels (``csrc/``), compiled with the package as ``solov2_d2._C``.

- ``upsample_threshold`` (``csrc/mask_upsample.cpp``): the final masks, see ``mask_upsample.py``.
- ``same_class_intersections`` (``csrc/mask_intersections.cpp``): the integer pixel counts
  Matrix NMS needs, see ``matrix_nms.py``.

``setup.py`` builds them when the package is installed with torch already present
(``pip install --no-build-isolation -e .``, which ``make setup`` runs), as Detectron2 builds its
``_C``; nothing is compiled at run time. Each kernel computes exactly what the PyTorch code it
replaces computes, and each user (``checked``) verifies that on fixed cases, once per process,
before relying on it. Where the extension is missing (no compiler at install time, a plain
``pip install .`` with build isolation), was built against another torch, or fails its check,
a warning says why and the PyTorch code is used: same results, slower.
``SOLOV2_D2_NATIVE=0`` turns the kernels off.
"""

import logging
import os
import threading
from typing import Callable, Optional

import torch

__all__ = ["load", "status", "checked", "checked_status"]

logger = logging.getLogger(__name__)

_ENV = "SOLOV2_D2_NATIVE"
_REBUILD = "reinstall solov2_d2 with `pip install --no-build-isolation -e .` (or `make setup`)"
# One lock for loading and self-checking: concurrent first calls (a server's threads) wait for
# the one that decides, and nobody sees a kernel before its check has passed.
_lock = threading.RLock()
_state = {"module": None, "status": None}
_checked = {}  # kernel name -> (module or None, status line)


def _import():
    from solov2_d2 import _C

    return _C


def _load_locked():
    if os.environ.get(_ENV, "1").strip() in ("0", "false", "False", "no"):
        return None, f"C++ kernels off ({_ENV}=0)"
    try:
        module = _import()
    except ModuleNotFoundError as error:
        if error.name not in ("solov2_d2._C", "_C"):
            raise
        return None, f"C++ kernels not compiled (solov2_d2._C is missing; {_REBUILD})"
    except ImportError as error:  # e.g. undefined symbols: built against another torch
        first_line = (str(error).strip().splitlines() or [""])[0]
        problem = f"C++ kernels unusable (ImportError: {first_line}; {_REBUILD})"
        logger.warning("solov2_d2: %s", problem)
        return None, problem
    built_for = module.torch_version()
    if built_for != torch.__version__:
        problem = (
            f"C++ kernels built against torch {built_for}, running {torch.__version__} "
            f"({_REBUILD})"
        )
        logger.warning("solov2_d2: %s", problem)
        return None, problem
    return module, f"C++ kernels compiled for torch {built_for}"


def load():
    """The compiled module, or None (then ``status()`` says why)."""
    with _lock:
        if _state["status"] is None:
            _state["module"], _state["status"] = _load_locked()
        return _state["module"]


def status() -> str:
    """ "C++ kernels compiled for torch X", or why they are off / missing / unusable."""
    load()
    return _state["status"]


def checked(name: str, self_check: Callable[[object], Optional[str]]):
    """The compiled module if ``self_check(module)`` finds no problem (it returns None, or a
    description of what differs), else None. Decided once per ``name`` and process, under the
    lock, and published only after the check finished."""
    with _lock:
        if name not in _checked:
            module = load()
            if module is None:
                _checked[name] = (None, "PyTorch path: " + _state["status"])
            else:
                problem = self_check(module)
                if problem:
                    line = f"PyTorch path: C++ kernel rejected ({problem})"
                    logger.warning("solov2_d2: %s: %s", name, line)
                    _checked[name] = (None, line)
                else:
                    _checked[name] = (module, f"C++ kernel (self-checked; {_state['status']})")
        return _checked[name][0]


def checked_status(name: str) -> Optional[str]:
    """What ``checked(name, ...)`` decided, or None if it has not run yet."""
    with _lock:
        return _checked[name][1] if name in _checked else None


def _forget():
    """Tests only: decide again on the next call."""
    with _lock:
        _state.update(module=None, status=None)
        _checked.clear()
