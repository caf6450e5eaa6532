"""Final masks: the survivors' soft masks -> binary masks at the output size, with tight boxes.

SOLOv2 predicts masks at 1/4 of the padded input. The official inference upsamples them x4
(bilinear) to the padded input, crops the image, resizes to the requested output size (bilinear)
and thresholds at MASK_THR. At 800 x 1216 that is ~1e8 interpolated values for 100 detections,
the largest part of the postprocess. Two implementations give the same masks, bit for bit:

- :func:`_upsample_and_threshold_torch`: two ``upsample_bilinear2d`` calls and a comparison, a
  few masks at a time into reused buffers (no full-resolution float copy of all masks at once).
- a small C++ kernel (``csrc/mask_upsample.cpp``, built by ``native.py``) that computes every
  value with the exact operations of PyTorch's CPU kernel, keeps the intermediate rows in the
  cache and writes only the bool masks and the rows/columns each mask touches: ~4x faster at
  800 x 1216.

The kernel is used only after it reproduced PyTorch on a set of check cases in this process
(values crowded around the threshold, crop and resize in both directions); if the compiler or
``ninja`` is missing, or the check fails (another PyTorch build could round differently), a
warning says why and the PyTorch path is used. ``SOLOV2_D2_NATIVE=0`` turns the kernels off;
``native_status()`` tells what is in use.
"""

import logging
from typing import Optional, Tuple

import torch

from . import native

__all__ = ["upsample_and_threshold", "boxes_from_flags", "native_status"]

logger = logging.getLogger(__name__)

MASK_FEATURE_STRIDE = 4
# Output pixels upsampled per step by the PyTorch path: bounded temporaries stay in the CPU
# caches and in memory the allocator reuses.
_OUTPUT_PIXELS_PER_CHUNK = 1 << 22
# PyTorch's CPU bilinear kernel switches to a differently rounded vectorized kernel when the
# output's height + width is at most this (aten/src/ATen/native/cpu/UpSampleKernel.cpp); the
# C++ kernel reproduces the generic one only.
_GENERIC_KERNEL_MIN_SIZE_SUM = 129

_native = {"module": None, "status": None}


# ----------------------------------------------------------------------------------- boxes
def boxes_from_flags(rows_any: torch.Tensor, cols_any: torch.Tensor) -> torch.Tensor:
    """Tight (x1, y1, x2, y2) boxes from (N, H) / (N, W) bool flags "the mask touches this row /
    column", in Detectron2's pixel convention (x2 = last column + 1); no pixel: a zero box."""
    if rows_any.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32, device=rows_any.device)
    h, w = rows_any.shape[1], cols_any.shape[1]
    # argmax finds the first True; on the flipped vector it finds the last one.
    y1 = rows_any.float().argmax(dim=1)
    y2 = h - rows_any.flip(1).float().argmax(dim=1)
    x1 = cols_any.float().argmax(dim=1)
    x2 = w - cols_any.flip(1).float().argmax(dim=1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    return boxes * rows_any.any(dim=1, keepdim=True)


def mask_flags(masks: torch.Tensor):
    """(N, H, W) masks -> (rows_any (N, H), cols_any (N, W)) bool."""
    # A max over a uint8 view is an order of magnitude faster than any() over bools on the CPU.
    values = masks.view(torch.uint8) if masks.dtype == torch.bool else (masks != 0).byte()
    return values.amax(dim=2) != 0, values.amax(dim=1) != 0


# ------------------------------------------------------------------------------ torch path
def _upsample_and_threshold_torch(soft_masks, image_size, output_size, threshold) -> torch.Tensor:
    """(k, Hf, Wf) soft masks -> (k, *output_size) bool masks: x4 to the padded input, crop the
    image, resize to the output size, threshold. Done a few masks at a time into reused buffers,
    so no full-resolution float copy of all the masks exists at once."""
    num, feat_h, feat_w = soft_masks.shape
    h, w = image_size
    padded_size = [feat_h * MASK_FEATURE_STRIDE, feat_w * MASK_FEATURE_STRIDE]
    resize = tuple(output_size) != (h, w)
    out = torch.empty((num, *output_size), dtype=torch.bool, device=soft_masks.device)
    if num == 0:
        return out
    # Cache-sized chunks on the CPU; on an accelerator larger ones (2^28 float pixels = 1 GiB per
    # buffer) keep kernels busy while bounding memory for huge outputs (100 x 4000 x 6000 masks).
    budget = _OUTPUT_PIXELS_PER_CHUNK if soft_masks.device.type == "cpu" else 1 << 28
    largest = max(padded_size[0] * padded_size[1], output_size[0] * output_size[1])
    chunk = max(1, min(num, budget // largest))
    padded_buffer = soft_masks.new_empty((1, chunk, *padded_size))
    output_buffer = soft_masks.new_empty((1, chunk, *output_size)) if resize else None
    inputs = soft_masks.unsqueeze(0)
    for start in range(0, num, chunk):
        end = min(num, start + chunk)
        padded = padded_buffer[:, : end - start]
        # F.interpolate(..., mode="bilinear", align_corners=False) writing into a buffer.
        torch.ops.aten.upsample_bilinear2d.out(
            inputs[:, start:end], padded_size, False, None, None, out=padded
        )
        masks = padded[:, :, :h, :w]
        if resize:
            masks = torch.ops.aten.upsample_bilinear2d.out(
                masks, list(output_size), False, None, None, out=output_buffer[:, : end - start]
            )
        # Resizing (h, w) to (h, w) is the identity (bilinear weights 1 and 0), so it is skipped.
        torch.gt(masks[0], threshold, out=out[start:end])
    return out


# ------------------------------------------------------------------------------ C++ kernel
def _check_cases():
    """Soft masks whose upsampled values crowd around 0.5, and sizes that crop, enlarge and
    shrink, all above PyTorch's small-output kernel switch (one just above it)."""
    generator = torch.Generator().manual_seed(0)
    near = 0.5 + (torch.rand(3, 17, 16, generator=generator) - 0.5) * 1e-5
    wide = torch.sigmoid(8 * torch.randn(2, 40, 50, generator=generator))
    return [
        (near, (67, 62), (67, 62), 0.5),  # 4 * (17 + 16) = 132: just above the switch; crop
        (near, (68, 64), (97, 131), 0.5),  # enlarge
        (wide, (157, 197), (230, 311), 0.5),
        (wide, (160, 200), (61, 70), 0.3),  # shrink; a threshold that float32 rounds
        (torch.cat([wide[:1, :17, :16], near[:2]]), (68, 64), (68, 64), 0.5),
    ]


def _self_check(module) -> Optional[str]:
    for soft, image_size, output_size, threshold in _check_cases():
        masks, rows_any, cols_any = module.upsample_threshold(
            soft.contiguous(), *image_size, *output_size, threshold
        )
        expected = _upsample_and_threshold_torch(soft, image_size, output_size, threshold)
        expected_rows, expected_cols = mask_flags(expected)
        if not (
            torch.equal(masks, expected)
            and torch.equal(rows_any, expected_rows)
            and torch.equal(cols_any, expected_cols)
        ):
            differ = int((masks != expected).sum())
            return (
                f"its masks differ from PyTorch {torch.__version__}'s in {differ} pixels "
                f"(check case {tuple(soft.shape)} -> {output_size})"
            )
    return None


def _build():
    return native.load()


def _load_native():
    """The compiled module if it reproduces PyTorch here, else None (``native_status`` says why)."""
    if _native["status"] is not None:
        return _native["module"]
    module = _build()
    if module is None:
        _native["status"] = "PyTorch path: " + native.status()
        return None
    problem = _self_check(module)
    if problem:
        _native["status"] = f"PyTorch path: C++ kernel rejected ({problem})"
        logger.warning("solov2_d2: %s", _native["status"])
        return None
    _native["module"] = module
    _native["status"] = "C++ kernel (checked against PyTorch " + torch.__version__ + ")"
    return module


def native_status() -> str:
    """Which implementation the CPU path uses and why; builds the kernel if it was not yet."""
    _load_native()
    return _native["status"]


def _native_applies(soft_masks, image_size, output_size) -> bool:
    if soft_masks.device.type != "cpu" or soft_masks.dtype != torch.float32:
        return False
    feat_h, feat_w = soft_masks.shape[1:]
    padded_sum = MASK_FEATURE_STRIDE * (feat_h + feat_w)
    resize = tuple(output_size) != tuple(image_size)
    output_sum = output_size[0] + output_size[1]
    return padded_sum >= _GENERIC_KERNEL_MIN_SIZE_SUM and (
        not resize or output_sum >= _GENERIC_KERNEL_MIN_SIZE_SUM
    )


# ----------------------------------------------------------------------------------- entry
def upsample_and_threshold(
    soft_masks: torch.Tensor,
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
    threshold: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(k, Hf, Wf) soft masks at 1/4 of the padded input -> ((k, *output_size) bool masks,
    (k, 4) tight boxes): x4 bilinear to the padded input, crop ``image_size``, bilinear resize
    to ``output_size``, ``> threshold``. Same masks from either implementation (see module)."""
    output_size = (int(output_size[0]), int(output_size[1]))
    image_size = (int(image_size[0]), int(image_size[1]))
    if soft_masks.shape[0] and _native_applies(soft_masks, image_size, output_size):
        module = _load_native()
        if module is not None:
            masks, rows_any, cols_any = module.upsample_threshold(
                soft_masks.contiguous(), *image_size, *output_size, float(threshold)
            )
            return masks, boxes_from_flags(rows_any, cols_any)
    masks = _upsample_and_threshold_torch(soft_masks, image_size, output_size, threshold)
    return masks, boxes_from_flags(*mask_flags(masks))
