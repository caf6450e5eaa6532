"""The fixed-size postprocess (``static_postprocess.py``) against the eager one, and its export."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from solov2_d2.modeling.postprocess import InferenceParams, postprocess_single_image
from solov2_d2.modeling.static_postprocess import (
    default_max_candidates,
    instances_from_fixed_size,
    postprocess_fixed_size,
    stable_descending_order,
)


def _problem(seed, num_cells=None, num_classes=None, feat=None, dims=8, pass_rate=None):
    """Random heads' outputs with smooth masks (low-resolution features upsampled), so masks
    overlap, some are small enough for the area filter, and many candidates pass SCORE_THR."""
    g = torch.Generator().manual_seed(seed)

    def randint(low, high):
        return int(torch.randint(low, high, (1,), generator=g))

    num_cells = num_cells or randint(20, 120)
    num_classes = num_classes or randint(1, 7)
    feat_h, feat_w = feat or (randint(6, 40), randint(6, 40))
    coarse = torch.randn(1, dims, max(2, feat_h // 4), max(2, feat_w // 4), generator=g)
    feature = F.interpolate(coarse, size=(feat_h, feat_w), mode="bilinear")[0] * 3
    kernels = torch.randn(num_cells, dims, generator=g) - 0.3
    pass_rate = torch.rand(1, generator=g).item() * 0.6 + 0.05 if pass_rate is None else pass_rate
    scores = torch.rand(num_cells, num_classes, generator=g)
    scores = torch.where(torch.rand(num_cells, num_classes, generator=g) < pass_rate, scores, 0.0)
    strides = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0])[
        torch.randint(0, 5, (num_cells,), generator=g)
    ]
    strides = strides.sort().values  # levels in order, as the model concatenates them
    image_size = (4 * feat_h - randint(0, 4), 4 * feat_w - randint(0, 4))
    output_size = (randint(8, 4 * feat_h + 20), randint(8, 4 * feat_w + 20))
    return scores, kernels, feature, strides, image_size, output_size


def _compare(problem, params, max_candidates=None, expect_detections=True):
    scores, kernels, feature, strides, image_size, output_size = problem
    if max_candidates is None:
        max_candidates = scores.numel()
    expected = postprocess_single_image(
        scores, kernels, feature, strides, image_size, output_size, params
    )
    detections = postprocess_fixed_size(scores, kernels, feature, strides, params, max_candidates)
    assert detections.scores.shape == (params.max_per_image,)
    assert detections.soft_masks.shape == (params.max_per_image, *feature.shape[1:])
    assert not bool(detections.overflow)
    got = instances_from_fixed_size(detections, image_size, output_size, params)
    if expect_detections:
        assert len(expected) > 0
    assert len(got) == len(expected)
    assert got.image_size == expected.image_size
    assert torch.equal(got.pred_classes, expected.pred_classes)
    assert torch.equal(got.pred_masks, expected.pred_masks)
    assert torch.equal(got.pred_boxes.tensor, expected.pred_boxes.tensor)
    assert torch.allclose(got.scores, expected.scores, rtol=0, atol=1e-6)
    # Padding past num_valid is zeros.
    num = int(detections.num_valid)
    assert not detections.scores[num:].any() and not detections.labels[num:].any()
    assert not detections.soft_masks[num:].any()
    return detections, expected


def _num_candidates(problem, params):
    return int((problem[0] > params.score_threshold).sum())


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
@pytest.mark.parametrize("seed", range(25))
def test_matches_eager_on_random_problems(seed, kernel):
    params = InferenceParams(nms_kernel=kernel, nms_pre=60, max_per_image=25)
    problem = _problem(seed)
    assert _num_candidates(problem, params) >= 10
    _compare(problem, params)


def test_matches_eager_with_hundreds_of_candidates():
    params = InferenceParams()
    problem = _problem(100, num_cells=200, num_classes=5, feat=(24, 32), pass_rate=0.6)
    assert _num_candidates(problem, params) >= 300
    detections, expected = _compare(problem, params, default_max_candidates(params))
    assert len(expected) > 10


def test_more_candidates_than_nms_pre_and_max_per_image():
    params = InferenceParams(nms_pre=30, max_per_image=10, update_threshold=0.0)
    problem = _problem(7, num_cells=100, num_classes=3, feat=(20, 20), pass_rate=0.5)
    assert _num_candidates(problem, params) > 2 * params.nms_pre
    detections, expected = _compare(problem, params)
    assert len(expected) == params.max_per_image


def test_no_candidates():
    params = InferenceParams()
    scores, *rest = _problem(3)
    detections, _ = _compare((scores * 0, *rest), params, 64, expect_detections=False)
    assert int(detections.num_valid) == 0


@pytest.mark.parametrize("feat", [(16, 20), (300, 300)])
def test_one_candidate(feat):
    # 300 x 300 pixels are above the 32768-element grain from which PyTorch splits a one-row
    # reduction across threads: the eager maskness sum (one row) may then differ in its last
    # bits from this code's (K1 rows, one per thread), within the score tolerance.
    params = InferenceParams()
    scores, kernels, feature, strides, image_size, output_size = _problem(4, feat=feat)
    scores = torch.zeros_like(scores)
    strides = torch.ones_like(strides)
    scores[5, 0] = 0.9
    kernels[5] = feature.mean(dim=(1, 2)).sign()  # a mask that covers a good part of the map
    detections, expected = _compare(
        (scores, kernels, feature, strides, image_size, output_size), params, 50
    )
    assert len(expected) == 1


def test_everything_removed_by_area_filter():
    params = InferenceParams()
    scores, kernels, feature, strides, image_size, output_size = _problem(5)
    assert _num_candidates((scores,), params) > 0
    strides = torch.full_like(strides, float(feature[0].numel()))  # no mask can be larger
    detections, _ = _compare(
        (scores, kernels, feature, strides, image_size, output_size),
        params,
        expect_detections=False,
    )
    assert int(detections.num_valid) == 0


def _tied_problem(seed):
    """Many exactly equal scores: duplicated cells (same kernel, same scores) and classes."""
    scores, kernels, feature, strides, image_size, output_size = _problem(
        seed, num_cells=60, num_classes=3, feat=(20, 24), pass_rate=0.5
    )
    strides = torch.ones_like(strides)
    # Cells 0..19 copied to 20..39 and 40..59: exact duplicate masks, equal scores.
    kernels[20:40] = kernels[:20]
    kernels[40:] = kernels[:20]
    scores[20:40] = scores[:20]
    scores[40:] = scores[:20]
    scores[:, 1] = torch.where(scores[:, 1] > 0, scores[:, 0].clamp_min(0.2), 0.0)
    return scores, kernels, feature, strides, image_size, output_size


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ties_and_duplicates(seed, kernel):
    params = InferenceParams(nms_kernel=kernel, nms_pre=40, max_per_image=30)
    problem = _tied_problem(seed)
    scores = problem[0]
    passing = scores[scores > params.score_threshold]
    assert passing.numel() > passing.unique().numel() + 10  # many ties
    _compare(problem, params)


def _block_problem():
    """Disjoint 4x4 blocks, one feature channel each, so masks, maskness and scores are exactly
    equal: every detection ties with others, in the NMS_PRE and MAX_PER_IMG sorts alike (two
    same-class duplicates are decayed, equally)."""
    feature = torch.full((4, 16, 16), -10.0)
    for channel in range(4):
        feature[channel, 4 * channel : 4 * channel + 4, :4] = 10.0
    kernels = torch.eye(4).repeat(3, 1)  # cells 0-3, 4-7, 8-11: the same four blocks
    scores = torch.zeros(12, 3)
    scores[[1, 2, 6, 9, 11], [2, 0, 1, 2, 1]] = 0.7  # block 1 twice (classes 2 and 1), ...
    scores[[3, 4, 10], [0, 0, 0]] = 0.7  # ... blocks 3, 0 and 2 once in class 0
    strides = torch.ones(12)
    return scores, kernels, feature, strides, (64, 64), (64, 64)


@pytest.mark.parametrize("nms_pre, max_per_image", [(100, 100), (5, 100), (100, 3), (6, 4)])
def test_exact_ties_keep_candidate_order(nms_pre, max_per_image):
    params = InferenceParams(nms_pre=nms_pre, max_per_image=max_per_image)
    _, expected = _compare(_block_problem(), params)
    assert len(expected) == min(nms_pre, max_per_image, 8)
    # Six undecayed detections at 0.7 and two same-class duplicates decayed alike: ties only.
    _, counts = expected.scores.unique(return_counts=True)
    assert (counts >= 2).all() or len(expected) < 4


def test_stable_descending_order_equals_stable_sort():
    g = torch.Generator().manual_seed(0)
    keys = torch.randint(0, 5, (200,), generator=g).float()
    keys[::7] = -float("inf")
    positions = torch.arange(200)
    expected = torch.sort(keys, descending=True, stable=True).indices
    assert torch.equal(stable_descending_order(keys, positions, 200), expected)
    assert torch.equal(stable_descending_order(keys, positions, 17), expected[:17])
    # The tie-break keys need not be the positions, only ordered like them.
    assert torch.equal(stable_descending_order(keys, positions * 3 + 11, 50), expected[:50])


def test_overflow_flag():
    params = InferenceParams()
    problem = _problem(9, num_cells=80, num_classes=4)
    count = _num_candidates(problem, params)
    assert count > 20
    scores, kernels, feature, strides = problem[:4]
    at_limit = postprocess_fixed_size(scores, kernels, feature, strides, params, count)
    assert not bool(at_limit.overflow)
    _compare(problem, params, max_candidates=count)
    over = postprocess_fixed_size(scores, kernels, feature, strides, params, count - 1)
    assert bool(over.overflow)
    assert over.scores.shape == (params.max_per_image,)


def test_model_layouts():
    """The model passes transposed views (``category_scores[i].t()``, ``kernels[i].t()``); a
    channels-last mask feature reaches the matmul as a transposed matrix in both paths."""
    params = InferenceParams(nms_pre=50, max_per_image=30)
    scores, kernels, feature, strides, image_size, output_size = _problem(21, feat=(18, 26))
    scores = scores.t().contiguous().t()
    kernels = kernels.t().contiguous().t()
    assert not scores.is_contiguous() and not kernels.is_contiguous()
    _compare((scores, kernels, feature, strides, image_size, output_size), params)
    channels_last = feature[None].contiguous(memory_format=torch.channels_last)[0]
    assert not channels_last.is_contiguous()
    _compare((scores, kernels, channels_last, strides, image_size, output_size), params)


def test_mask_nms_type_is_refused():
    scores, kernels, feature, strides = _problem(1)[:4]
    with pytest.raises(ValueError, match="MODEL.SOLOV2.NMS_TYPE"):
        postprocess_fixed_size(
            scores, kernels, feature, strides, InferenceParams(nms_type="mask"), 100
        )


def test_default_max_candidates_is_a_multiple_of_nms_pre():
    params = InferenceParams()
    assert default_max_candidates(params) == 2 * params.nms_pre
    assert default_max_candidates(dataclasses.replace(params, nms_pre=7)) == 14


# ------------------------------------------------------------------------------------ export
class _Wrapper(torch.nn.Module):
    def __init__(self, params, max_candidates):
        super().__init__()
        self.params = params
        self.max_candidates = max_candidates

    def forward(self, category_scores, kernel_preds, mask_feature, cell_strides):
        return tuple(
            postprocess_fixed_size(
                category_scores,
                kernel_preds,
                mask_feature,
                cell_strides,
                self.params,
                self.max_candidates,
            )
        )


_EXPORT_PARAMS = {
    kernel: InferenceParams(nms_pre=40, max_per_image=20, nms_kernel=kernel)
    for kernel in ("gaussian", "linear")
}
_EXPORT_SIZES = [(16, 20), (24, 18), (33, 41)]


def _export_inputs(feat, seed=11):
    """Random inputs with exact duplicates (cells 40-49 repeat cells 0-9): tied scores, and IoU 1
    for the linear kernel's division by zero."""
    scores, kernels, feature, strides = _problem(
        seed, num_cells=50, num_classes=3, feat=feat, pass_rate=0.4
    )[:4]
    kernels[40:], scores[40:], strides[40:] = kernels[:10], scores[:10], strides[:10]
    return scores, kernels, feature, strides


def _exported_program(module):
    feat_h = torch.export.Dim("feat_h", min=2, max=512)
    feat_w = torch.export.Dim("feat_w", min=2, max=512)
    dynamic = ({}, {}, {1: feat_h, 2: feat_w}, {})
    return torch.export.export(module, _export_inputs((16, 20)), dynamic_shapes=dynamic)


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_torch_export_matches_eager_at_several_sizes(kernel):
    module = _Wrapper(_EXPORT_PARAMS[kernel], 60).eval()
    program = _exported_program(module)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any("topk" in t for t in targets)
    assert not any(name in t for t in targets for name in ("sort", "nonzero", "unique"))
    for feat in _EXPORT_SIZES:
        inputs = _export_inputs(feat)
        expected = module(*inputs)
        got = program.module()(*inputs)
        assert int(expected[3]) > 0
        assert got[2].shape == (20, *feat)
        for a, b in zip(got, expected):
            assert torch.equal(a, b)


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_onnx_runtime_matches_eager(tmp_path, kernel):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed (torch.onnx dynamo)")
    params = _EXPORT_PARAMS[kernel]
    module = _Wrapper(params, 60).eval()
    path = tmp_path / "postprocess.onnx"
    feat_h = torch.export.Dim("feat_h", min=2, max=512)
    feat_w = torch.export.Dim("feat_w", min=2, max=512)
    torch.onnx.export(
        module,
        _export_inputs((16, 20)),
        str(path),
        dynamo=True,
        opset_version=18,
        input_names=["category_scores", "kernel_preds", "mask_feature", "cell_strides"],
        output_names=["scores", "labels", "soft_masks", "num_valid", "overflow"],
        dynamic_shapes=({}, {}, {1: feat_h, 2: feat_w}, {}),
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for feat in _EXPORT_SIZES[:2]:
        inputs = _export_inputs(feat)
        expected = module(*inputs)
        got = session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})
        got = [torch.from_numpy(v) for v in got]
        assert int(expected[3]) > 0
        assert int(got[3]) == int(expected[3]) and bool(got[4]) == bool(expected[4])
        assert torch.equal(got[1], expected[1])
        assert torch.allclose(got[0], expected[0], rtol=0, atol=1e-6)
        threshold = params.mask_threshold
        assert torch.equal(got[2] > threshold, expected[2] > threshold)
