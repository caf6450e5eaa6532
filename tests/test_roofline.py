"""benchmarks/roofline.py's operation counts, which its float32 bound rests on: hand-computed
convolution counts, and the network's count against fvcore's independent one."""

import importlib.util
import os
import sys

import pytest
import torch
from torch import nn

from .conftest import ROOT


def _roofline():
    name = "solov2_d2_roofline"
    if name not in sys.modules:
        path = os.path.join(ROOT, "benchmarks", "roofline.py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def test_conv_flops_by_hand():
    roofline = _roofline()
    dense = nn.Conv2d(3, 8, 3, padding=1)
    grouped = nn.Conv2d(8, 8, 1, groups=4, bias=False)
    strided = nn.Conv2d(8, 4, (3, 5), stride=2, padding=(1, 2))
    x = torch.zeros(2, 3, 10, 12)
    # 2 x 8 x 10 x 12 outputs, each 3 channels x 9 taps of multiply-adds.
    assert roofline.conv_flops(dense, dense(x)) == 2 * (2 * 8 * 10 * 12) * 3 * 9 == 103680
    # Groups of 2 input channels, 1 tap.
    y = dense(x)
    assert roofline.conv_flops(grouped, grouped(y)) == 2 * (2 * 8 * 10 * 12) * 2 == 7680
    # Stride 2: a 5 x 6 output, 8 channels x 15 taps.
    assert roofline.conv_flops(strided, strided(y)) == 2 * (2 * 4 * 5 * 6) * 8 * 15 == 57600

    model = nn.Sequential(dense, nn.ReLU(), grouped, nn.Linear(12, 12), strided)
    assert roofline.count_conv_flops(model, lambda: model(x)) == 103680 + 7680 + 57600
    # Twice the calls, twice the count; the hooks are gone afterwards.
    assert roofline.count_conv_flops(model, lambda: (model(x), model(x))) == 2 * 168960
    assert all(not m._forward_hooks for m in model.modules())
    # Only the 3x3 stride-1 ungrouped conv is one Winograd's F(4x4, 3x3) computes.
    assert [roofline.is_winograd_conv(m) for m in (dense, grouped, strided)] == [True, False, False]
    assert roofline.count_conv_flops(model, lambda: model(x), roofline.is_winograd_conv) == 103680


def test_network_flops_match_fvcore(detecting_model):
    from fvcore.nn import FlopCountAnalysis

    roofline = _roofline()
    model = detecting_model
    generator = torch.Generator().manual_seed(0)
    image = (torch.rand(3, 96, 128, generator=generator) * 255).to(torch.uint8)
    image_input = {"image": image, "height": 96, "width": 128}
    counts = roofline.network_flops(model, image_input)

    with torch.no_grad():
        images = model.preprocess_image([image_input])
        analysis = FlopCountAnalysis(model.backbone, (images.tensor,))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        # fvcore counts one per multiply-add.
        assert counts["backbone+FPN"] == 2 * analysis.by_operator()["conv"]
        assert counts["backbone+FPN"] > 0

        features = model.backbone(images.tensor)
        heads = 0
        for head in (model.ins_head, model.mask_head):
            analysis = FlopCountAnalysis(head, (features,))
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            heads += analysis.by_operator()["conv"]
        assert counts["heads"] == 2 * heads

        (candidates,) = roofline.inference.count_candidates(model, [image_input])
        assert candidates > 0
        mask_feature = model.mask_head(features)
    num_masks, height, width = mask_feature.shape[1:]
    assert (height, width) == (96 // 4, 128 // 4)
    assert counts["dynamic conv"] == 2 * candidates * num_masks * height * width
    # The tiny model's backbone has 1x1 and strided convs, its heads 1x1 predictors.
    network = counts["backbone+FPN"] + counts["heads"]
    assert 0 < counts["3x3 stride 1"] < network


def test_bound_and_verdict_by_hand():
    roofline = _roofline()
    result = {
        "flops": {"backbone+FPN": 100e9, "heads": 50e9, "dynamic conv": 10e9, "3x3 stride 1": 90e9}
    }
    # 160 GFLOP at 100 GFLOP/s.
    assert roofline.bound_ms(result, 100e9) == pytest.approx(1600)
    # Winograd F(4x4, 3x3): the 90 GFLOP of 3x3 convs take 36/144 of their multiplications:
    # 160 - 67.5.
    assert roofline.bound_ms(result, 100e9, winograd=True) == pytest.approx(925)
    assert roofline._verdict(1600, 1500).startswith("NOT reachable")
    assert roofline._verdict(1000, 2000) == (
        "reachable only at 50% of the attainable rate over the whole image"
    )


def test_agreement_definitions_by_hand():
    """inference.compare, which the speed targets' "same detections" rest on: bitwise,
    identical (mask IoU >= 0.999) and the same (>= 0.99) by hand."""
    from detectron2.structures import Boxes, Instances

    compare = _roofline().inference.compare

    def result(scores, classes, masks):
        instances = Instances((10, 100))
        instances.scores = torch.tensor(scores)
        instances.pred_classes = torch.tensor(classes)
        instances.pred_masks = masks
        instances.pred_boxes = Boxes(torch.zeros(len(scores), 4))
        return [{"instances": instances}]

    masks = torch.zeros(2, 10, 100, dtype=torch.bool)
    masks[0, :, :50] = True  # 500 pixels
    masks[1, :, 50:] = True
    reference = result([0.9, 0.5], [1, 2], masks)
    assert compare(reference, reference)["bitwise"]
    # Two pixels off the first mask: IoU 498 / 500 = 0.996, the scores 5e-5 apart, swapped.
    moved = masks.clone()
    moved[0, 0, :2] = False
    other = result([0.5, 0.90005], [2, 1], moved[[1, 0]])
    summary = compare(reference, other)
    assert not summary["bitwise"] and not summary["identical"] and summary["same"]
    assert summary["swapped"] == 2 and summary["min_mask_iou"] == pytest.approx(0.996)
    # Ten pixels off (IoU 0.98): not the same; a class changed: unmatched.
    moved[0, 0, :10] = False
    assert not compare(reference, result([0.9, 0.5], [1, 2], moved))["same"]
    changed = compare(reference, result([0.9, 0.5], [1, 1], masks))
    assert changed["unmatched"] == 1 and not changed["same"]
