"""Keep freed memory in the process so that large tensors do not pay page faults on every use.

PyTorch allocates CPU tensors with the C library's ``malloc``. glibc serves blocks above its mmap
threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps them when they are freed, so every
large tensor starts as untouched pages that the kernel must fault in and zero one 4 KiB page at
a time. At 800 x 1216 most of SOLOv2's activations (a ResNet stage output is 60-250 MB at batch
1-4) and its output masks (100 x 800 x 1216 bools = 97 MB) are such blocks: measured on the
2-core CI machine, allocating and filling 97 MB costs 39 ms fresh and 3.4 ms in reused memory,
and the R50-FPN backbone takes 1.59 s per image at batch 1 (2.28 s at batch 4) with glibc's
defaults against 0.92 s (1.08 s) with freed memory kept (benchmarks/results/inference*.md).

``retain_freed_memory()`` raises glibc's mmap threshold and trim threshold (``mallopt``) so that
large blocks come from the heap and freed ones stay there for the next forward pass; this is the
same effect for which PyTorch's CPU performance guide recommends jemalloc or tcmalloc. The price:
the process keeps its heap at its high-water mark instead of returning memory between
iterations, and that mark sits above the peak working set (PyTorch's 64-byte aligned requests
are slightly larger than the blocks they free, so the heap grows for a few iterations until
freed blocks coalesce; the R50 benchmark's peak resident memory per forward pass rose from 675
to 807 MiB). Call it once at start-up in processes that run many forward passes (evaluation,
serving, training); ``train_net.py``, ``demo.py``, ``tools/demo_pipeline.py`` and the benchmarks
do, unless the environment sets ``SOLOV2_D2_RETAIN_FREED_MEMORY=0``.

A plain process that only builds the model and calls it gets the same: ``SOLOv2`` calls
``arrange_for_cpu_inference()`` at its first inference on a CPU, which applies the setting (same
environment switch) and logs once what it did, so the speed the README reports is the speed of
``model(inputs)`` without any set-up of ours.
"""

import ctypes
import ctypes.util
import logging
import os
import sys

__all__ = ["arrange_for_cpu_inference", "retain_freed_memory"]

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks below the mmap threshold come from the heap. Some glibc versions refuse values above
# 32 MiB (mallopt returns 0); then 32 MiB, glibc's own upper limit, is the next best thing.
_MMAP_THRESHOLDS = (1 << 30, 32 << 20)
_TRIM_THRESHOLD = (1 << 31) - 1

_ENV = "SOLOV2_D2_RETAIN_FREED_MEMORY"
_state = {"applied": False, "announced": False}


def retain_freed_memory(enable: bool = None) -> bool:
    """Makes glibc keep freed memory for reuse (see the module docstring); idempotent.

    Args:
        enable: ``None`` reads ``SOLOV2_D2_RETAIN_FREED_MEMORY`` (default on; "0" turns it off).

    Returns:
        True when the setting is in effect (now or from an earlier call), False when it is turned
        off or the C library is not glibc (macOS, musl: their allocators behave differently and are
        left alone).
    """
    if enable is None:
        enable = os.environ.get(_ENV, "1").strip() not in ("0", "false", "False", "no", "")
    if not enable:
        return _state["applied"]
    if _state["applied"]:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # only glibc has it: the parameters below are glibc's
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success.
    ok = any(mallopt(_M_MMAP_THRESHOLD, value) == 1 for value in _MMAP_THRESHOLDS)
    ok = mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and ok
    _state["applied"] = ok
    return ok


def arrange_for_cpu_inference() -> bool:
    """``retain_freed_memory()`` once per process, with one log line saying what was done.

    Called by ``SOLOv2`` at inference on a CPU; cheap after the first call. Returns whether freed
    memory is retained.
    """
    applied = retain_freed_memory()
    if not _state.get("announced"):
        _state["announced"] = True
        logger = logging.getLogger(__name__)
        if applied:
            logger.info(
                "CPU inference: glibc keeps freed memory for reuse (mallopt mmap/trim thresholds "
                "raised, solov2_d2/memory.py); %s=0 keeps glibc's defaults.",
                _ENV,
            )
        else:
            logger.info(
                "CPU inference: glibc's default allocator settings kept (%s).",
                (
                    "turned off by {}".format(_ENV)
                    if os.environ.get(_ENV, "1").strip() in ("0", "false", "False", "no", "")
                    else "not glibc, or mallopt refused"
                ),
            )
    return applied
