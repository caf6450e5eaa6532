"""Final masks: the survivors' soft masks -> binary masks at the output size, with tight boxes.

SOLOv2 predicts masks at 1/4 of the padded input. As in the official inference, they are
upsampled x4 (bilinear) to the padded input, cropped to the image, resized to the requested
output size (bilinear) and thresholded at MASK_THR.

What is computed (the definition every implementation here follows, bit for bit):

- one bilinear step along one axis, ``in`` -> ``out`` samples, ``align_corners=False``: equal
  sizes are the identity; otherwise, in float64, ``src = max((d + 0.5) * (in / out) - 0.5, 0)``,
  ``i0 = min(floor(src), in - 1)``, ``i1 = min(i0 + 1, in - 1)``, ``l1 = src - i0``, and the
  weights are rounded to float32: ``w1 = f32(l1)``, ``w0 = f32(1 - l1)``. The value is the float32
  ``a * w0 + b * w1`` (two rounded products, one rounded sum; no fused multiply-add);
- a 2-D resize is the step along the width, then the step along the height;
- final mask = ``resize(x4(soft)[:h, :w], output size) > f32(MASK_THR)``.

These are the weights of ``F.interpolate(mode="bilinear", align_corners=False)``; only the
rounding differs from it (PyTorch's CPU kernels round differently from one release and one
output size to the next). The values are within ``VALUE_ERROR_BOUND`` of the exact bilinear
values, so a mask can differ from ``F.interpolate``'s only at pixels whose value lies within about
that distance of the threshold (``tests/test_mask_upsample.py`` checks both in float64).

Two implementations of the definition:

- :func:`final_mask_values` in plain PyTorch ops (gathers, products, sums: IEEE-exact on every
  device and PyTorch release), used chunk by chunk on accelerators and without the C++ kernel;
- ``csrc/mask_upsample.cpp``, the same operations in the same order, one mask per task, keeping
  the intermediate rows in the cache and writing only the bool masks and the rows/columns each
  mask touches. It is used only after it gave the PyTorch ops' masks on every ``_check_cases``
  case in this process (``native.checked``); ``native_status()`` tells what is in use.
"""

from typing import Tuple

import torch

from . import native

__all__ = [
    "upsample_and_threshold",
    "final_mask_values",
    "masks_to_boxes",
    "boxes_from_flags",
    "native_status",
]

MASK_FEATURE_STRIDE = 4
# Largest distance of a final-mask value from the exact (real-number) bilinear value of the same
# float32 soft masks: four rounded steps of a convex combination of values in [0, 1].
VALUE_ERROR_BOUND = 1e-6
# Output pixels per step of the PyTorch path: bounded temporaries stay in the CPU caches and in
# memory the allocator reuses; on accelerators 2^28 float pixels (1 GiB) per buffer keep kernels
# busy while bounding memory for huge outputs (100 x 4000 x 6000 masks).
_OUTPUT_PIXELS_PER_CHUNK = {"cpu": 1 << 22}
_ACCELERATOR_PIXELS_PER_CHUNK = 1 << 28
_KERNEL_NAME = "final masks"


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


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight (x1, y1, x2, y2) boxes of (N, H, W) masks, in Detectron2's pixel convention
    (x2 = last column + 1, as ``BitMasks.get_bounding_boxes``, without its per-mask loop); an
    empty mask gives a zero box."""
    return boxes_from_flags(*mask_flags(masks))


# ---------------------------------------------------------------------------- definition
def _axis_taps(in_size: int, out_size: int, device):
    """(i0, i1, w0, w1) of the bilinear step ``in_size`` -> ``out_size`` (module docstring)."""
    positions = torch.arange(out_size, dtype=torch.float64, device=device)
    source = ((positions + 0.5) * (in_size / out_size) - 0.5).clamp_min(0.0)
    i0 = source.floor().long().clamp_max(in_size - 1)
    i1 = (i0 + 1).clamp_max(in_size - 1)
    l1 = source - i0
    return i0, i1, (1.0 - l1).float(), l1.float()


def _bilinear_step(values: torch.Tensor, dim: int, taps) -> torch.Tensor:
    i0, i1, w0, w1 = taps
    shape = [1] * values.dim()
    shape[dim] = -1
    return values.index_select(dim, i0) * w0.view(shape) + values.index_select(dim, i1) * w1.view(
        shape
    )


def _resize(values: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(..., H, W) float32 -> (..., *size): width step, then height step; equal sizes: as is."""
    height, width = values.shape[-2:]
    if width != size[1]:
        values = _bilinear_step(values, -1, _axis_taps(width, size[1], values.device))
    if height != size[0]:
        values = _bilinear_step(values, -2, _axis_taps(height, size[0], values.device))
    return values


def final_mask_values(
    soft_masks: torch.Tensor, image_size: Tuple[int, int], output_size: Tuple[int, int]
) -> torch.Tensor:
    """(k, Hf, Wf) float32 soft masks -> (k, *output_size) values of the module's definition:
    x4 bilinear to the padded input (only the image's rows and columns are computed), then a
    bilinear resize to ``output_size``."""
    feat_h, feat_w = soft_masks.shape[-2:]
    h, w = image_size
    device = soft_masks.device
    taps_x = [t[:w] for t in _axis_taps(feat_w, MASK_FEATURE_STRIDE * feat_w, device)]
    taps_y = [t[:h] for t in _axis_taps(feat_h, MASK_FEATURE_STRIDE * feat_h, device)]
    padded = _bilinear_step(_bilinear_step(soft_masks, -1, taps_x), -2, taps_y)
    return _resize(padded, output_size)


def _threshold_f32(threshold: float) -> float:
    """MASK_THR rounded to float32, the precision values are compared in."""
    return float(torch.tensor(threshold, dtype=torch.float32))


def _upsample_and_threshold_torch(soft_masks, image_size, output_size, threshold) -> torch.Tensor:
    """(k, Hf, Wf) soft masks -> (k, *output_size) bool masks of the definition, a few masks at a
    time, so no full-resolution float copy of all the masks exists at once."""
    num, feat_h, feat_w = soft_masks.shape
    out = torch.empty((num, *output_size), dtype=torch.bool, device=soft_masks.device)
    if num == 0:
        return out
    budget = _OUTPUT_PIXELS_PER_CHUNK.get(soft_masks.device.type, _ACCELERATOR_PIXELS_PER_CHUNK)
    padded_pixels = MASK_FEATURE_STRIDE**2 * feat_h * feat_w
    chunk = max(1, min(num, budget // max(padded_pixels, output_size[0] * output_size[1])))
    threshold = _threshold_f32(threshold)
    for start in range(0, num, chunk):
        values = final_mask_values(soft_masks[start : start + chunk], image_size, output_size)
        torch.gt(values, threshold, out=out[start : start + chunk])
    return out


# ------------------------------------------------------------------------------ C++ kernel
def _check_cases():
    """The cases the C++ kernel must reproduce before it is used, the same cases the tests
    check it on: soft values crowded within 5e-6 of the threshold and spread out; crops; resizes
    that enlarge, shrink, keep one axis or both; tiny and odd sizes; two thresholds."""
    generator = torch.Generator().manual_seed(0)

    def near(threshold, *shape):
        return threshold + (torch.rand(*shape, generator=generator) - 0.5) * 1e-5

    wide = torch.sigmoid(8 * torch.randn(2, 40, 50, generator=generator))
    cases = [
        (near(0.5, 3, 17, 16), (67, 62), (67, 62), 0.5),  # crop only
        (near(0.5, 3, 17, 16), (68, 64), (97, 131), 0.5),  # enlarge
        (near(0.5, 2, 16, 16), (64, 64), (64, 64), 0.5),  # small output, no resize
        (near(0.3, 2, 6, 7), (23, 25), (11, 40), 0.3),  # small; shrink one axis, enlarge other
        (near(0.5, 2, 26, 18), (82, 43), (201, 109), 0.5),
        (near(0.5, 2, 9, 33), (36, 130), (36, 71), 0.5),  # height kept, width shrunk
        (wide, (157, 197), (230, 311), 0.5),
        (wide, (160, 200), (61, 70), 0.3),  # shrink; a threshold that float32 rounds
        (wide[:, :1, :1].contiguous(), (3, 4), (5, 2), 0.5),  # a 1 x 1 feature map
        (torch.cat([wide[:1, :17, :16], near(0.5, 2, 17, 16)]), (68, 64), (68, 64), 0.5),
    ]
    for _ in range(6):  # random sizes and crops
        feat_h, feat_w = (int(v) for v in torch.randint(4, 40, (2,), generator=generator))
        image = (
            int(torch.randint(max(1, 4 * feat_h - 31), 4 * feat_h + 1, (1,), generator=generator)),
            int(torch.randint(max(1, 4 * feat_w - 31), 4 * feat_w + 1, (1,), generator=generator)),
        )
        output = tuple(int(v) for v in torch.randint(1, 300, (2,), generator=generator))
        cases.append((near(0.5, 2, feat_h, feat_w), image, output, 0.5))
    return cases


def _self_check(module):
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
            differ = int((masks != expected).sum()) if masks.shape == expected.shape else -1
            return (
                f"its masks differ from the PyTorch ops' in {differ} pixels "
                f"(check case {tuple(soft.shape)} -> {output_size})"
            )
    return None


def _kernel():
    return native.checked(_KERNEL_NAME, _self_check)


def native_status() -> str:
    """Which implementation the CPU path uses and why (runs the self-check if not yet run)."""
    _kernel()
    return native.checked_status(_KERNEL_NAME)


# ----------------------------------------------------------------------------------- entry
def upsample_and_threshold(
    soft_masks: torch.Tensor,
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
    threshold: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(k, Hf, Wf) soft masks at 1/4 of the padded input -> ((k, *output_size) bool masks,
    (k, 4) tight boxes): x4 bilinear to the padded input, crop ``image_size``, bilinear resize
    to ``output_size``, ``> threshold``, as the module docstring defines them."""
    output_size = (int(output_size[0]), int(output_size[1]))
    image_size = (int(image_size[0]), int(image_size[1]))
    on_cpu = soft_masks.device.type == "cpu" and soft_masks.dtype == torch.float32
    if soft_masks.shape[0] and on_cpu:
        module = _kernel()
        if module is not None:
            masks, rows_any, cols_any = module.upsample_threshold(
                soft_masks.contiguous(), *image_size, *output_size, float(threshold)
            )
            return masks, boxes_from_flags(rows_any, cols_any)
    masks = _upsample_and_threshold_torch(soft_masks.float(), image_size, output_size, threshold)
    return masks, masks_to_boxes(masks)
