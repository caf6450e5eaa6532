"""Final masks: one definition (mask_upsample.py), two implementations equal to it bit for bit,
and its distance to exact bilinear interpolation bounded in float64."""

import threading

import pytest
import torch
import torch.nn.functional as F

from solov2_d2.modeling import mask_upsample, native
from solov2_d2.modeling.mask_upsample import (
    VALUE_ERROR_BOUND,
    boxes_from_flags,
    final_mask_values,
    mask_flags,
    masks_to_boxes,
    native_status,
    upsample_and_threshold,
)


def exact_values(soft, image_size, output_size):
    """The bilinear values in float64 (F.interpolate's weights; rounding ~1e-16)."""
    feat_h, feat_w = soft.shape[1:]
    padded = F.interpolate(
        soft.double()[None], size=(4 * feat_h, 4 * feat_w), mode="bilinear", align_corners=False
    )[:, :, : image_size[0], : image_size[1]]
    if tuple(output_size) != tuple(image_size):
        padded = F.interpolate(padded, size=output_size, mode="bilinear", align_corners=False)
    return padded[0]


def interpolate_masks(soft, image_size, output_size, threshold):
    """The official order of operations with plain float32 F.interpolate calls."""
    feat_h, feat_w = soft.shape[1:]
    padded = F.interpolate(soft[None], size=(4 * feat_h, 4 * feat_w), mode="bilinear")
    padded = padded[:, :, : image_size[0], : image_size[1]]
    if tuple(output_size) != tuple(image_size):
        padded = F.interpolate(padded, size=output_size, mode="bilinear")
    return padded[0] > threshold


def native_module():
    module = mask_upsample._kernel()
    if module is None:
        pytest.skip(native_status())
    return module


@pytest.fixture
def fresh_native():
    native._forget()
    yield
    native._forget()


def test_definition_by_hand():
    """[0, 1] x4: positions (d + 0.5) / 4 - 0.5 clamped at 0 -> weights of the second value
    0, 0, 1/8, 3/8, 5/8, 7/8, and then the edge value; then cropped to 6 columns and resized to
    3 (positions 2d + 0.5: halfway between columns 0-1, 2-3, 4-5)."""
    soft = torch.tensor([[[0.0, 1.0]]])
    values = final_mask_values(soft, (4, 8), (4, 8))
    assert values[0].tolist() == [[0, 0, 0.125, 0.375, 0.625, 0.875, 1, 1]] * 4
    resized = final_mask_values(soft, (1, 6), (1, 3))
    assert resized[0].tolist() == [[0.0, 0.25, 0.75]]
    masks, boxes = upsample_and_threshold(soft, (4, 8), (4, 8), 0.5)
    assert masks[0, 0].tolist() == [False] * 4 + [True] * 4
    assert boxes.tolist() == [[4, 0, 8, 4]]


def test_values_are_within_the_bound_of_exact_bilinear():
    worst = 0.0
    for soft, image_size, output_size, _ in mask_upsample._check_cases():
        values = final_mask_values(soft, image_size, output_size)
        assert values.dtype == torch.float32 and values.shape[1:] == output_size
        error = (values.double() - exact_values(soft, image_size, output_size)).abs().max()
        worst = max(worst, float(error))
    assert 0 < worst <= VALUE_ERROR_BOUND


def test_masks_differ_from_interpolate_only_next_to_the_threshold():
    """Where rounding may differ, F.interpolate's float32 masks and ours agree except at pixels
    whose exact value is within the two error bounds of the threshold. The near-threshold
    cases make such pixels exist, so this would catch a bound that is too small."""
    compared = differing = 0
    for soft, image_size, output_size, threshold in mask_upsample._check_cases():
        masks, _ = upsample_and_threshold(soft, image_size, output_size, threshold)
        other = interpolate_masks(soft, image_size, output_size, threshold)
        exact = exact_values(soft, image_size, output_size)
        near = (exact - threshold).abs() <= 2 * VALUE_ERROR_BOUND
        assert torch.equal(masks[~near], other[~near])
        compared += masks.numel()
        differing += int((masks != other).sum())
    assert compared > 500_000 and differing > 0


def test_torch_path_chunks_give_the_unchunked_masks(monkeypatch):
    soft, image_size, output_size, threshold = mask_upsample._check_cases()[6]
    whole = final_mask_values(soft, image_size, output_size) > threshold
    monkeypatch.setitem(mask_upsample._OUTPUT_PIXELS_PER_CHUNK, "cpu", 1)  # one mask a chunk
    chunked = mask_upsample._upsample_and_threshold_torch(soft, image_size, output_size, threshold)
    assert whole.any() and torch.equal(chunked, whole)


def test_native_kernel_equals_the_torch_ops_bitwise():
    """The self-check's cases (so the self-check is exactly as strong as this test)."""
    module = native_module()
    assert mask_upsample._self_check(module) is None
    pixels = 0
    for soft, image_size, output_size, threshold in mask_upsample._check_cases():
        masks, rows_any, cols_any = module.upsample_threshold(
            soft.contiguous(), *image_size, *output_size, threshold
        )
        expected = mask_upsample._upsample_and_threshold_torch(
            soft, image_size, output_size, threshold
        )
        assert torch.equal(masks, expected), (tuple(soft.shape), image_size, output_size)
        expected_rows, expected_cols = mask_flags(expected)
        assert torch.equal(rows_any, expected_rows) and torch.equal(cols_any, expected_cols)
        pixels += expected.numel()
    assert pixels > 500_000


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "torch"])
def test_upsample_and_threshold_equals_the_definition(monkeypatch, use_native):
    if use_native:
        native_module()
    else:
        monkeypatch.setattr(mask_upsample, "_kernel", lambda: None)
    for soft, image_size, output_size, threshold in mask_upsample._check_cases():
        masks, boxes = upsample_and_threshold(soft, image_size, output_size, threshold)
        expected = final_mask_values(soft, image_size, output_size) > threshold
        assert torch.equal(masks, expected)
        assert torch.equal(boxes, masks_to_boxes(expected))


def test_boxes_from_flags_hand_case():
    masks = torch.zeros(3, 5, 6, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True
    masks[1, 4, 0] = True
    boxes = boxes_from_flags(*mask_flags(masks))
    assert boxes.tolist() == [[2, 1, 5, 3], [0, 4, 1, 5], [0, 0, 0, 0]]
    assert torch.equal(masks_to_boxes(masks), boxes)
    assert masks_to_boxes(torch.zeros(0, 5, 6, dtype=torch.bool)).shape == (0, 4)


class FlippingKernel:
    """A kernel that gets one pixel wrong: the self-check must reject it."""

    @staticmethod
    def torch_version():
        return torch.__version__

    def upsample_threshold(self, soft, *sizes_and_threshold):
        image_h, image_w, out_h, out_w, threshold = sizes_and_threshold
        masks = mask_upsample._upsample_and_threshold_torch(
            soft, (image_h, image_w), (out_h, out_w), threshold
        )
        masks[0, 0, 0] = ~masks[0, 0, 0]
        return (masks, *mask_flags(masks))


def test_a_kernel_that_differs_from_the_torch_ops_is_rejected(monkeypatch, fresh_native):
    monkeypatch.setenv("SOLOV2_D2_NATIVE", "1")
    monkeypatch.setattr(native, "_import", FlippingKernel)
    assert mask_upsample._kernel() is None
    assert "rejected" in native_status() and "differ from the PyTorch ops" in native_status()
    soft, image_size, output_size, threshold = mask_upsample._check_cases()[1]
    masks, _ = upsample_and_threshold(soft, image_size, output_size, threshold)
    assert torch.equal(masks, final_mask_values(soft, image_size, output_size) > threshold)


def test_a_missing_extension_falls_back_with_the_reason(monkeypatch, fresh_native):
    def missing():
        raise ModuleNotFoundError("No module named 'solov2_d2._C'", name="solov2_d2._C")

    monkeypatch.setenv("SOLOV2_D2_NATIVE", "1")
    monkeypatch.setattr(native, "_import", missing)
    assert mask_upsample._kernel() is None
    assert native_status().startswith(
        "PyTorch path: C++ kernels not compiled (solov2_d2._C is missing; reinstall"
    )


def test_an_extension_built_for_another_torch_is_refused(monkeypatch, fresh_native):
    class OtherTorch(FlippingKernel):
        @staticmethod
        def torch_version():
            return "1.0.0"

    monkeypatch.setenv("SOLOV2_D2_NATIVE", "1")
    monkeypatch.setattr(native, "_import", OtherTorch)
    assert native.load() is None
    assert native.status().startswith(
        f"C++ kernels built against torch 1.0.0, running {torch.__version__}"
    )


def test_an_extension_that_fails_to_import_is_refused(monkeypatch, fresh_native):
    def undefined_symbol():
        raise ImportError("_C.so: undefined symbol: _ZN3c10")

    monkeypatch.setenv("SOLOV2_D2_NATIVE", "1")
    monkeypatch.setattr(native, "_import", undefined_symbol)
    assert native.load() is None
    assert native.status().startswith("C++ kernels unusable (ImportError: _C.so: undefined")


def test_environment_variable_turns_the_kernels_off(monkeypatch, fresh_native):
    monkeypatch.setenv("SOLOV2_D2_NATIVE", "0")
    monkeypatch.setattr(native, "_import", FlippingKernel)  # never reached
    assert mask_upsample._kernel() is None
    assert native.status() == "C++ kernels off (SOLOV2_D2_NATIVE=0)"
    assert native_status() == "PyTorch path: C++ kernels off (SOLOV2_D2_NATIVE=0)"


def test_concurrent_first_calls_check_once_and_agree(monkeypatch, fresh_native):
    """Threads that all make the first call: the self-check runs once, nobody uses the kernel
    before it has passed, and every thread gets the single-threaded result."""
    module = native.load()
    if module is None:
        pytest.skip(native.status())
    native._forget()
    calls, started = [], threading.Barrier(4)
    real_check = mask_upsample._self_check

    def slow_check(candidate):
        calls.append(threading.get_ident())
        return real_check(candidate)

    monkeypatch.setattr(mask_upsample, "_self_check", slow_check)
    soft, image_size, output_size, threshold = mask_upsample._check_cases()[6]
    expected = final_mask_values(soft, image_size, output_size) > threshold
    results = [None] * 4

    def work(index):
        started.wait()
        results[index] = upsample_and_threshold(soft, image_size, output_size, threshold)[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert all(torch.equal(result, expected) for result in results)
