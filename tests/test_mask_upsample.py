"""Final masks: the C++ kernel gives PyTorch's masks bit for bit, and every fallback works."""

import pytest
import torch
import torch.nn.functional as F

from solov2_d2.modeling import mask_upsample, native
from solov2_d2.modeling.mask_upsample import (
    boxes_from_flags,
    mask_flags,
    native_status,
    upsample_and_threshold,
)


def reference_masks(soft, image_size, output_size, threshold):
    """The official order of operations with plain F.interpolate calls."""
    feat_h, feat_w = soft.shape[1:]
    padded = F.interpolate(soft[None], size=(4 * feat_h, 4 * feat_w), mode="bilinear")
    padded = padded[:, :, : image_size[0], : image_size[1]]
    if tuple(output_size) != tuple(image_size):
        padded = F.interpolate(padded, size=output_size, mode="bilinear")
    return padded[0] > threshold


def random_cases(count, seed=0):
    """Sizes above PyTorch's small-output kernel switch; soft values either spread out or all
    within 5e-6 of the threshold (where any rounding difference would show)."""
    generator = torch.Generator().manual_seed(seed)

    def randint(low, high):
        return int(torch.randint(low, high, (1,), generator=generator))

    cases = []
    while len(cases) < count:
        feat_h, feat_w = randint(6, 60), randint(6, 60)
        image = (
            randint(max(1, 4 * feat_h - 31), 4 * feat_h + 1),
            randint(max(1, 4 * feat_w - 31), 4 * feat_w + 1),
        )
        if len(cases) % 3 == 0:
            output = image
        else:
            output = (randint(1, 3 * image[0]), randint(1, 3 * image[1]))
        if not mask_upsample._native_applies(torch.zeros(1, feat_h, feat_w), image, output):
            continue
        threshold = (0.5, 0.3)[len(cases) % 2]
        if len(cases) % 4 < 2:
            soft = threshold + (torch.rand(2, feat_h, feat_w, generator=generator) - 0.5) * 1e-5
        else:
            soft = torch.sigmoid(6 * torch.randn(2, feat_h, feat_w, generator=generator))
        cases.append((soft, image, output, threshold))
    return cases


def native_module():
    module = mask_upsample._load_native()
    if module is None:
        pytest.skip(native_status())
    return module


def test_native_kernel_equals_pytorch_bitwise():
    module = native_module()
    pixels = 0
    for soft, image_size, output_size, threshold in random_cases(40):
        masks, rows_any, cols_any = module.upsample_threshold(
            soft, *image_size, *output_size, threshold
        )
        expected = reference_masks(soft, image_size, output_size, threshold)
        assert torch.equal(masks, expected), (tuple(soft.shape), image_size, output_size)
        expected_rows, expected_cols = mask_flags(expected)
        assert torch.equal(rows_any, expected_rows) and torch.equal(cols_any, expected_cols)
        pixels += expected.numel()
    assert pixels > 1_000_000


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "torch"])
def test_upsample_and_threshold_equals_reference(monkeypatch, use_native):
    if use_native:
        native_module()
    else:
        monkeypatch.setattr(mask_upsample, "_load_native", lambda: None)
    for soft, image_size, output_size, threshold in random_cases(12, seed=1):
        masks, boxes = upsample_and_threshold(soft, image_size, output_size, threshold)
        expected = reference_masks(soft, image_size, output_size, threshold)
        assert torch.equal(masks, expected)
        assert torch.equal(boxes, boxes_from_flags(*mask_flags(expected)))


def test_small_outputs_take_the_pytorch_path():
    """At most 128 for height + width, PyTorch rounds with another (vectorized) kernel."""
    soft = torch.zeros(1, 16, 16)  # padded 64 x 64: 128
    assert not mask_upsample._native_applies(soft, (64, 64), (64, 64))
    soft = torch.zeros(1, 17, 16)  # padded 68 x 64: 132
    assert mask_upsample._native_applies(soft, (68, 64), (68, 64))
    assert not mask_upsample._native_applies(soft, (68, 64), (60, 68))  # resized to 128
    assert mask_upsample._native_applies(soft, (68, 64), (60, 69))
    assert not mask_upsample._native_applies(soft.double(), (68, 64), (68, 64))


def test_boxes_from_flags_hand_case():
    masks = torch.zeros(3, 5, 6, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True
    masks[1, 4, 0] = True
    boxes = boxes_from_flags(*mask_flags(masks))
    assert boxes.tolist() == [[2, 1, 5, 3], [0, 4, 1, 5], [0, 0, 0, 0]]


@pytest.fixture
def fresh_loader(monkeypatch):
    monkeypatch.setattr(mask_upsample, "_native", {"module": None, "status": None})
    monkeypatch.setattr(native, "_state", {"module": None, "status": None})


class FlippingKernel:
    """A kernel that gets one pixel wrong: the self-check must reject it."""

    def upsample_threshold(self, soft, *sizes_and_threshold):
        image_h, image_w, out_h, out_w, threshold = sizes_and_threshold
        masks = mask_upsample._upsample_and_threshold_torch(
            soft, (image_h, image_w), (out_h, out_w), threshold
        )
        masks[0, 0, 0] = ~masks[0, 0, 0]
        return (masks, *mask_flags(masks))


def test_a_kernel_that_differs_from_pytorch_is_rejected(monkeypatch, fresh_loader):
    monkeypatch.setattr(mask_upsample, "_build", FlippingKernel)
    assert mask_upsample._load_native() is None
    assert "rejected" in native_status() and "differ from PyTorch" in native_status()
    soft, image_size, output_size, threshold = random_cases(1)[0]
    masks, _ = upsample_and_threshold(soft, image_size, output_size, threshold)
    assert torch.equal(masks, reference_masks(soft, image_size, output_size, threshold))


def test_a_failed_build_falls_back_with_the_reason(monkeypatch, fresh_loader):
    def no_compiler():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setenv("SOLOV2_D2_NATIVE", "1")
    monkeypatch.setattr(native, "_build", no_compiler)
    assert mask_upsample._load_native() is None
    assert native_status() == (
        "PyTorch path: C++ kernels not built (RuntimeError: Ninja is required to load C++ "
        "extensions)"
    )
    assert native.load() is None


def test_environment_variable_turns_the_kernels_off(monkeypatch, fresh_loader):
    monkeypatch.setenv("SOLOV2_D2_NATIVE", "0")
    monkeypatch.setattr(native, "_build", FlippingKernel)  # never reached
    assert mask_upsample._load_native() is None
    assert native.status() == "C++ kernels off (SOLOV2_D2_NATIVE=0)"
    assert native_status() == "PyTorch path: C++ kernels off (SOLOV2_D2_NATIVE=0)"
