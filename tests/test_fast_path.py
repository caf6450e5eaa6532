"""The fast inference path gives the plain path's predictions.

- ``postprocess_single_image`` (the model's) against ``postprocess_single_image_reference``
  (every candidate upsampled, dense Matrix NMS): bitwise equal, on random candidates and on a
  model's head outputs.
- ``optimize_for_inference`` (FrozenBN folded, channels-last, Winograd): the same detections up
  to float rounding, i.e. same number of instances and classes, scores within 1e-4, mask IoU
  >= 0.999.
- The CPU forward's optimized copy (``MODEL.SOLOV2.FAST_INFERENCE``): the same, with the model's
  own modules untouched and the copy following changes of the weights.
"""

import copy

import pytest
import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling import build_model
from torch import nn

from solov2_d2.modeling import mask_upsample
from solov2_d2.modeling import postprocess as postprocess_module
from solov2_d2.modeling.fast import fold_frozen_batchnorm, optimize_for_inference
from solov2_d2.modeling.postprocess import (
    InferenceParams,
    postprocess_single_image,
    postprocess_single_image_reference,
)

from .conftest import tiny_cfg


def assert_bitwise_equal(a, b):
    assert a.image_size == b.image_size
    assert torch.equal(a.pred_classes, b.pred_classes)
    assert torch.equal(a.scores, b.scores)
    assert torch.equal(a.pred_masks, b.pred_masks)
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)


def assert_same_detections(a, b, score_tol=1e-4, min_iou=0.999):
    """Same instances up to float rounding: matched by class and score (ranks may swap where two
    scores are within rounding of each other), then per-instance mask IoU."""
    assert len(a) == len(b) > 0
    free = list(range(len(b)))
    for i in range(len(a)):
        options = [
            j
            for j in free
            if b.pred_classes[j] == a.pred_classes[i]
            and abs(float(b.scores[j] - a.scores[i])) <= score_tol
        ]
        assert options, f"instance {i} (class {int(a.pred_classes[i])}) has no match"
        ious = []
        for j in options:
            union = (a.pred_masks[i] | b.pred_masks[j]).sum()
            ious.append(float((a.pred_masks[i] & b.pred_masks[j]).sum() / union.clamp(min=1)))
        best = max(range(len(options)), key=ious.__getitem__)
        assert ious[best] >= min_iou
        free.remove(options[best])


# ------------------------------------------------------------------------------- postprocess
def random_head_outputs(seed, num_cells=60, num_classes=3, channels=8, size=(12, 16)):
    """Candidates with overlapping, same- and cross-class masks of various sizes."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_cells, num_classes, generator=generator) ** 3
    kernels = torch.randn(num_cells, channels, generator=generator)
    feature = torch.randn(channels, *size, generator=generator)
    strides = torch.tensor([1.0, 2.0, 4.0, 8.0]).repeat_interleave(num_cells // 4)
    return scores, kernels, feature, strides


PARAMS = [
    InferenceParams(score_threshold=0.05),
    InferenceParams(score_threshold=0.05, nms_kernel="linear", nms_pre=20, max_per_image=7),
    InferenceParams(score_threshold=0.05, nms_type="mask"),
    InferenceParams(score_threshold=0.2, update_threshold=0.1, mask_threshold=0.6),
    InferenceParams(score_threshold=0.05, update_threshold=0.0, mask_threshold=-0.5),
]


# Feature 12 x 16 (padded 48 x 64) runs the final masks through PyTorch's upsampling; 20 x 24
# (padded 80 x 96, above PyTorch's small-output kernel switch) through the C++ kernel where it is
# built, except for the small resized output (50 x 60).
SIZES = [
    ((12, 16), (48, 64), (48, 64)),
    ((12, 16), (40, 60), (40, 60)),
    ((12, 16), (40, 60), (75, 90)),
    ((20, 24), (80, 96), (80, 96)),
    ((20, 24), (77, 90), (77, 90)),
    ((20, 24), (77, 90), (130, 150)),
    ((20, 24), (77, 90), (61, 70)),
    ((20, 24), (77, 90), (50, 60)),
]


@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("feature_size, image_size, output_size", SIZES)
def test_postprocess_equals_reference_bitwise(params, feature_size, image_size, output_size):
    for seed in range(3):
        scores, kernels, feature, strides = random_head_outputs(seed, size=feature_size)
        args = (scores, kernels, feature, strides, image_size, output_size, params)
        fast = postprocess_single_image(*args)
        assert len(fast) > 0
        assert_bitwise_equal(fast, postprocess_single_image_reference(*args))


def test_postprocess_chunking_does_not_change_results(monkeypatch):
    scores, kernels, feature, strides = random_head_outputs(7, num_cells=120)
    args = (scores, kernels, feature, strides, (40, 60), (50, 70), InferenceParams(0.05))
    whole = postprocess_single_image(*args)
    # Rows reduced 5 at a time, masks upsampled 2 at a time (the last chunks partial).
    monkeypatch.setattr(postprocess_module, "_ELEMENTS_PER_CHUNK", 5 * 12 * 16)
    monkeypatch.setattr(mask_upsample, "_OUTPUT_PIXELS_PER_CHUNK", 2 * 48 * 64)
    chunked = postprocess_single_image(*args)
    assert len(whole) > 3
    assert_bitwise_equal(whole, chunked)


def test_postprocess_reads_channels_last_features_without_copy():
    feature = torch.randn(1, 8, 12, 16).contiguous(memory_format=torch.channels_last)[0]
    matrix = postprocess_module._feature_matrix(feature)
    assert matrix.data_ptr() == feature.data_ptr()
    assert torch.equal(matrix, feature.reshape(8, -1))


def test_postprocess_no_survivors_is_well_typed():
    scores, kernels, feature, strides = random_head_outputs(0)
    for params in (InferenceParams(score_threshold=1.0), InferenceParams(update_threshold=2.0)):
        args = (scores, kernels, feature, strides, (48, 64), (30, 40), params)
        out = postprocess_single_image(*args)
        assert len(out) == 0 and out.pred_masks.shape == (0, 30, 40)


# ------------------------------------------------------------------------------ model level
def synthetic_images():
    """Two images of different sizes (a padded batch) with a few bright and dark shapes.

    The outputs are requested at 4x the input size, as a test-time resize would: at 64 px a
    single pixel that float rounding moves across the mask threshold is 0.1% of a small mask,
    right at the IoU criterion meant for image-size masks."""
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for height, width in ((64, 80), (48, 64)):
        image = torch.full((3, height, width), 60.0)
        for _ in range(4):
            y = torch.randint(0, height - 16, (1,), generator=generator)
            x = torch.randint(0, width - 16, (1,), generator=generator)
            image[:, y : y + 16, x : x + 16] = torch.rand(3, 1, 1, generator=generator) * 255
        inputs.append({"image": image, "height": 4 * height, "width": 4 * width + 8})
    return inputs


def frozen_bn_cfg():
    """tiny_cfg with a FrozenBN ResNet (as the COCO configs) instead of GroupNorm."""
    cfg = tiny_cfg()
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.FPN.NORM = ""
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    return cfg


def randomize_frozen_batchnorm(model, seed=0):
    """Non-trivial statistics, scaled so that activations stay O(1) through the ResNet."""
    generator = torch.Generator().manual_seed(seed)

    def set_statistics(module, inputs):
        x = inputs[0]
        count = module.num_features
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)) + 0.01)
        module.weight.copy_(0.5 + torch.rand(count, generator=generator))
        module.bias.copy_(0.2 * torch.randn(count, generator=generator))

    norms = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    hooks = [m.register_forward_pre_hook(set_statistics) for m in norms]
    with torch.no_grad():
        model.backbone(model.preprocess_image(synthetic_images()[:1]).tensor)
    for hook in hooks:
        hook.remove()
    return len(norms)


def make_detections(model):
    """An untrained model's scores sit near the 0.01 prior: lower the thresholds to let its
    detections through. Its mask logits are also near 0, where float rounding flips pixels
    that a trained model's confident masks do not have: the kernels are scaled up 10x."""
    model.inference_params.score_threshold = 0.0101
    model.inference_params.update_threshold = 0.0
    model.inference_params.max_per_image = 1000
    with torch.no_grad():
        model.ins_head.kernel_pred.weight.mul_(10.0)


def test_fold_frozen_batchnorm_matches_conv_then_norm():
    torch.manual_seed(0)
    for bias in (False, True):
        norm = FrozenBatchNorm2d(8)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        conv = Conv2d(4, 8, 3, padding=1, bias=bias, norm=norm)
        x = torch.randn(2, 4, 9, 11)
        with torch.no_grad():
            expected = conv(x)
            assert fold_frozen_batchnorm(conv) == 1
            assert conv.norm is None and conv.bias is not None
            torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)


def test_fold_eval_batchnorm_but_not_training_batchnorm():
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(8)
    norm.running_mean.normal_()
    norm.running_var.uniform_(0.5, 2.0)
    conv = Conv2d(4, 8, 1, bias=False, norm=norm)
    assert fold_frozen_batchnorm(conv) == 0  # training-mode batch norm uses batch statistics
    conv.eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        expected = conv(x)
        assert fold_frozen_batchnorm(conv) == 1
        torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def frozen_bn_model():
    torch.manual_seed(0)
    model = build_model(frozen_bn_cfg()).eval()
    assert randomize_frozen_batchnorm(model) > 10
    make_detections(model)
    return model


def test_optimize_for_inference_folds_and_converts(frozen_bn_model):
    model = optimize_for_inference(copy.deepcopy(frozen_bn_model))
    assert not model.training
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)


@pytest.mark.parametrize("cfg_name", ["frozen_bn", "group_norm"])
def test_optimized_model_gives_the_same_detections(frozen_bn_model, cfg_name):
    if cfg_name == "frozen_bn":
        plain = copy.deepcopy(frozen_bn_model)
    else:
        torch.manual_seed(0)
        plain = build_model(tiny_cfg()).eval()
        make_detections(plain)
    fast = optimize_for_inference(copy.deepcopy(plain))
    plain.fast_inference = False  # the exact form (MODEL.SOLOV2.FAST_INFERENCE=False)
    inputs = synthetic_images()
    with torch.no_grad():
        images = plain.preprocess_image(inputs)
        features = plain.backbone(images.tensor)
        heads = plain.ins_head(features)
        mask_feature = plain.mask_head(features)
        reference = plain.inference(
            *heads, mask_feature, images, inputs, postprocess=postprocess_single_image_reference
        )
        assert_bitwise_equal_results(plain(inputs), reference)
    with torch.inference_mode():
        # The plain model is the exact form: inference_mode changes no bit either.
        assert_bitwise_equal_results(plain(inputs), reference)
        optimized = fast(inputs)
    for a, b in zip(reference, optimized):
        assert_same_detections(a["instances"], b["instances"])


def assert_bitwise_equal_results(results, others):
    assert len(results) == len(others)
    # Two lists of empty results would be equal whatever the model did.
    assert any(len(r["instances"]) > 0 for r in results)
    for a, b in zip(results, others):
        assert_bitwise_equal(a["instances"], b["instances"])


def test_optimized_model_batch_equals_single_images(frozen_bn_model):
    """Channels-last features of a batch are sliced per image: each image keeps its result."""
    fast = optimize_for_inference(copy.deepcopy(frozen_bn_model))
    inputs = synthetic_images()
    inputs = [inputs[0], dict(inputs[0])]  # same size: no padding difference
    with torch.inference_mode():
        batched = fast(inputs)
        alone = fast(inputs[:1])
    assert_same_detections(batched[1]["instances"], alone[0]["instances"])


def test_winograd_across_the_network(frozen_bn_model):
    """``use_winograd`` outside the kernel head: the wide 3x3 convs of the ResNet and the FPN
    (the FPN runs its convs from a plain list, which must hold the new modules too)."""
    from solov2_d2.modeling.fast import use_winograd
    from solov2_d2.modeling.winograd import WinogradConv2d, is_winograd_eligible

    fast = optimize_for_inference(copy.deepcopy(frozen_bn_model), winograd=False)
    # By default: the kernel head's 6 convs, and ResNet-18's res3 (128 channels), res4 (256) and
    # res5 (512) have 3 each (the first block's first conv has stride 2); the rest of tiny_cfg
    # is 64 wide.
    assert use_winograd(copy.deepcopy(fast)) == 15
    replaced = use_winograd(fast, min_channels=64)
    fpn = fast.backbone
    assert all(isinstance(conv, WinogradConv2d) for conv in fpn.output_convs)
    assert [getattr(fpn, f"fpn_output{i}") for i in (5, 4, 3, 2)] == fpn.output_convs
    # Every eligible conv wide enough was replaced; ResNet-18's res2 has 3 of them (its first
    # conv reads the 32-channel stem).
    assert not any(
        is_winograd_eligible(m) and min(m.in_channels, m.out_channels) >= 64 for m in fast.modules()
    )
    res2 = [m for m in fast.backbone.bottom_up.res2.modules() if isinstance(m, WinogradConv2d)]
    assert len(res2) == 3 and replaced >= 15 + 3 + 4
    inputs = synthetic_images()
    with torch.inference_mode():
        expected, actual = frozen_bn_model(inputs), fast(inputs)
    assert any(len(r["instances"]) > 0 for r in expected)
    for a, b in zip(expected, actual):
        assert_same_detections(a["instances"], b["instances"])


def test_cpu_inference_runs_an_optimized_copy_and_leaves_the_model_as_built(frozen_bn_model):
    """MODEL.SOLOV2.FAST_INFERENCE (default): ``model(inputs)`` in eval mode on the CPU without
    autograd runs an optimized copy of the networks; the model's own modules, weights and
    state dict stay as built, the copy follows changes of the weights, and the exact form is
    one flag away (and taken whenever autograd records)."""
    from solov2_d2.modeling.winograd import WinogradConv2d

    assert tiny_cfg().MODEL.SOLOV2.FAST_INFERENCE
    cfg = frozen_bn_cfg()
    cfg.MODEL.SOLOV2.FAST_INFERENCE = False
    assert not build_model(cfg).fast_inference
    model = copy.deepcopy(frozen_bn_model)
    assert model.fast_inference and model._inference_copy._networks is None
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = synthetic_images()

    def exact():
        model.fast_inference = False
        try:
            with torch.no_grad():
                return model(inputs)
        finally:
            model.fast_inference = True

    with torch.no_grad():
        fast = model(inputs)
    copied = model._inference_copy._networks
    assert any(isinstance(m, WinogradConv2d) for m in copied.modules())
    reference = exact()
    assert any(len(r["instances"]) > 0 for r in reference)
    for a, b in zip(reference, fast):
        assert_same_detections(a["instances"], b["instances"])
    # Really the other form: some score differs in its last bits.
    assert any(
        not torch.equal(a["instances"].scores, b["instances"].scores)
        for a, b in zip(reference, fast)
    )
    # The model itself is untouched: same keys and bits, FrozenBN in place, no Winograd module.
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, WinogradConv2d) for m in model.modules())
    # Reused while the weights stay; rebuilt after an in-place change (a load, a training step).
    with torch.no_grad():
        model(inputs)
    assert model._inference_copy._networks is copied
    with torch.no_grad():
        model.ins_head.cate_pred.bias.add_(0.5)
        changed = model(inputs)
    assert model._inference_copy._networks is not copied
    changed_reference = exact()
    assert sum(len(r["instances"]) for r in changed_reference) != sum(
        len(r["instances"]) for r in reference
    )
    for a, b in zip(changed_reference, changed):
        assert_same_detections(a["instances"], b["instances"])
    # With autograd recording, the modules as built; without, the cached copy (which was made
    # before the hook, so the hook sees only the model's own backbone run).
    runs = []
    hook = model.backbone.register_forward_pre_hook(lambda module, args: runs.append(module))
    for a, b in zip(changed_reference, model(inputs)):
        assert_same_detections(a["instances"], b["instances"])
    with torch.no_grad():
        model(inputs)
    hook.remove()
    assert len(runs) == 1 and runs[0] is model.backbone
    # A copy of the model does not carry the cached networks.
    assert copy.deepcopy(model)._inference_copy._networks is None
