import torch

from solov2_d2.modeling.postprocess import (
    InferenceParams,
    maskness,
    masks_to_boxes,
    point_nms,
    postprocess_single_image,
)


def test_point_nms_keeps_2x2_local_maxima():
    heat = torch.tensor([[[[0.1, 0.9, 0.2], [0.8, 0.3, 0.4], [0.5, 0.6, 0.7]]]])
    out = point_nms(heat)
    # Each cell is compared with itself and its up, left and up-left neighbours (2x2, pad 1).
    # 0.1: vs nothing else -> kept. 0.9 vs 0.1 -> kept. 0.2 vs 0.9 -> dropped.
    # 0.8 vs 0.1 -> kept. 0.3 vs 0.1,0.9,0.8 -> dropped. 0.4 vs 0.9,0.2,0.3 -> dropped.
    # 0.5 vs 0.8 -> dropped. 0.6 vs 0.8,0.3,0.5 -> dropped. 0.7 vs 0.3,0.4,0.6 -> kept.
    expected = torch.tensor([[[[0.1, 0.9, 0.0], [0.8, 0.0, 0.0], [0.0, 0.0, 0.7]]]])
    assert torch.equal(out, expected)


def test_maskness_is_mean_soft_value_inside_binary_mask():
    soft = torch.tensor([[[0.9, 0.7], [0.2, 0.6]]])
    binary = soft > 0.5
    areas = binary.sum(dim=(1, 2)).float()
    assert torch.allclose(maskness(soft, binary, areas), torch.tensor([(0.9 + 0.7 + 0.6) / 3]))


def test_masks_to_boxes_tight_and_empty():
    masks = torch.zeros(2, 5, 6, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True
    masks[0, 4, 0] = True
    boxes = masks_to_boxes(masks)
    assert torch.equal(boxes, torch.tensor([[0.0, 1.0, 5.0, 5.0], [0.0, 0.0, 0.0, 0.0]]))
    assert masks_to_boxes(torch.zeros(0, 5, 6, dtype=torch.bool)).shape == (0, 4)


def _two_block_problem():
    """A 4x4 mask feature with 2 channels: channel 0 lights the top-left 2x2 block, channel 1
    the bottom-right one. Kernel (1, 0) therefore predicts the first block, (0, 1) the second."""
    feature = torch.full((2, 4, 4), -10.0)
    feature[0, :2, :2] = 10.0
    feature[1, 2:, 2:] = 10.0
    kernels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    scores = torch.tensor([[0.9, 0.0], [0.0, 0.8], [0.7, 0.0], [0.05, 0.05]])
    # Cell 2 predicts a 4-pixel mask but sits on a level of stride 8: too small, dropped.
    strides = torch.tensor([1.0, 1.0, 8.0, 1.0])
    return scores, kernels, feature, strides


def test_postprocess_hand_case():
    scores, kernels, feature, strides = _two_block_problem()
    out = postprocess_single_image(
        scores, kernels, feature, strides, (16, 16), (16, 16), InferenceParams()
    )
    sig10 = torch.sigmoid(torch.tensor(10.0))
    assert torch.equal(out.pred_classes, torch.tensor([0, 1]))
    # Different classes: Matrix NMS does not decay; the score is category x maskness (= sig(10)).
    assert torch.allclose(out.scores, torch.stack([0.9 * sig10, 0.8 * sig10]))
    # A 2x2 block of a 4x4 map, bilinearly upsampled x4. Output pixel k samples input coordinate
    # (k + 0.5) / 4 - 0.5; the weight on the block along one axis is 1 for k <= 5, 0.875 (k=6),
    # 0.625 (k=7), 0.375 (k=8). The 2-D value is the product: > 0.5 on the 8x8 block except its
    # corner (7, 7), where 0.625^2 = 0.39.
    expected = torch.zeros(2, 16, 16, dtype=torch.bool)
    expected[0, :8, :8] = True
    expected[0, 7, 7] = False
    expected[1, 8:, 8:] = True
    expected[1, 8, 8] = False
    assert out.pred_masks.dtype == torch.bool
    assert torch.equal(out.pred_masks, expected)
    assert torch.equal(out.pred_boxes.tensor, torch.tensor([[0.0, 0, 8, 8], [8.0, 8, 16, 16]]))


def test_postprocess_crops_padding_then_resizes():
    scores, kernels, feature, strides = _two_block_problem()
    # The image is 12x16 inside the 16x16 padded input, and the output is requested at 24x32.
    out = postprocess_single_image(
        scores, kernels, feature, strides, (12, 16), (24, 32), InferenceParams()
    )
    assert out.image_size == (24, 32)
    assert out.pred_masks.shape == (2, 24, 32)
    # First block: rows 0..7 of 12 -> 0..15 of 24, columns 0..7 of 16 -> 0..15 of 32.
    assert torch.equal(out.pred_boxes.tensor[0], torch.tensor([0.0, 0.0, 16.0, 16.0]))
    # Second block: rows 8..11 of 12 -> 16..23, columns 8..15 -> 16..31.
    assert torch.equal(out.pred_boxes.tensor[1], torch.tensor([16.0, 16.0, 32.0, 24.0]))


def test_postprocess_same_class_duplicates_are_decayed():
    scores, kernels, feature, strides = _two_block_problem()
    scores[1] = torch.tensor([0.8, 0.0])
    kernels[1] = torch.tensor([1.0, 0.0])  # the same block, same class, lower score
    out = postprocess_single_image(
        scores, kernels, feature, strides, (16, 16), (16, 16), InferenceParams()
    )
    sig10 = torch.sigmoid(torch.tensor(10.0))
    # IoU 1 -> gaussian decay exp(-2 * 1) of the second one (compensation of the first is 0).
    expected = torch.stack([0.9 * sig10, 0.8 * sig10 * torch.exp(torch.tensor(-2.0))])
    assert torch.allclose(out.scores, expected)
    greedy = postprocess_single_image(
        scores, kernels, feature, strides, (16, 16), (16, 16), InferenceParams(nms_type="mask")
    )
    assert len(greedy) == 1


def test_postprocess_no_candidates_is_well_typed():
    scores, kernels, feature, strides = _two_block_problem()
    out = postprocess_single_image(
        scores * 0, kernels, feature, strides, (16, 16), (20, 30), InferenceParams()
    )
    assert len(out) == 0
    assert out.image_size == (20, 30)
    assert out.pred_masks.shape == (0, 20, 30) and out.pred_masks.dtype == torch.bool
    assert out.scores.dtype == torch.float32 and out.pred_classes.dtype == torch.int64
    assert out.pred_boxes.tensor.shape == (0, 4)
