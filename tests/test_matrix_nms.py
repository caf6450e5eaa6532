"""Matrix NMS (paper Sec. 4, Eq. 4-5) and greedy mask NMS.

Hand cases use 4x4 masks made of whole columns, so every IoU is a ratio of column counts. With
f the kernel, candidate j is decayed by min_i f(iou_ij) / f(iou_{.,i}), where iou_ij is 0 unless
i is ranked above j with the same label, and iou_{.,i} = max_k iou_ki (the compensation).
"""

import math

import pytest
import torch

from solov2_d2.modeling import matrix_nms as matrix_nms_module
from solov2_d2.modeling import native
from solov2_d2.modeling.matrix_nms import mask_nms, matrix_nms, matrix_nms_dense


def column_masks(*column_sets, size=4):
    """One (size x size) mask per set of columns, all rows filled: IoU = shared / union columns."""
    masks = torch.zeros(len(column_sets), size, size, dtype=torch.bool)
    for index, columns in enumerate(column_sets):
        masks[index][:, list(columns)] = True
    return masks


# A > B > C, one class. A = cols {0,1}, B = cols {1,2}, C = cols {1,2,3}.
# iou(A,B) = 1/3 (1 shared of 3), iou(A,C) = 1/4, iou(B,C) = 2/3.
# Compensation: iou_{.,A} = 0, iou_{.,B} = 1/3, iou_{.,C} = max(1/4, 2/3) = 2/3.
CHAIN_MASKS = column_masks({0, 1}, {1, 2}, {1, 2, 3})
CHAIN_LABELS = torch.tensor([0, 0, 0])
CHAIN_SCORES = torch.tensor([0.9, 0.8, 0.7])


def test_gaussian_chain_by_hand():
    # f(x) = exp(-2 x^2).
    # B: i=A f(1/3)/f(0) = exp(-2/9); i=B f(0)/f(1/3) = exp(2/9); i=C f(0)/f(2/3) = exp(8/9).
    # C: i=A f(1/4)/f(0) = exp(-1/8); i=B f(2/3)/f(1/3) = exp(-8/9 + 2/9) = exp(-2/3);
    #    i=C exp(8/9). Min exp(-2/3): the compensation of B lifts C from exp(-8/9).
    expected = torch.tensor([0.9, 0.8 * math.exp(-2 / 9), 0.7 * math.exp(-2 / 3)])
    out = matrix_nms(CHAIN_MASKS, CHAIN_LABELS, CHAIN_SCORES, kernel="gaussian", sigma=2.0)
    assert torch.allclose(out, expected, atol=1e-6)


def test_gaussian_sigma_is_used():
    # sigma = 0.5: B decays by exp(-0.5/9); C by f(2/3)/f(1/3) = exp(-0.5 (4/9 - 1/9)) = exp(-1/6).
    expected = torch.tensor([0.9, 0.8 * math.exp(-0.5 / 9), 0.7 * math.exp(-1 / 6)])
    out = matrix_nms(CHAIN_MASKS, CHAIN_LABELS, CHAIN_SCORES, kernel="gaussian", sigma=0.5)
    assert torch.allclose(out, expected, atol=1e-6)


def test_linear_chain_by_hand():
    # f(x) = 1 - x.
    # B: i=A (1 - 1/3) / 1 = 2/3; i=B 1 / (2/3) = 3/2; i=C 1 / (1/3) = 3. Min 2/3.
    # C: i=A (1 - 1/4) / 1 = 3/4; i=B (1 - 2/3) / (1 - 1/3) = 1/2; i=C 3. Min 1/2 (1/3 without
    #    the compensation of B).
    expected = torch.tensor([0.9, 0.8 * 2 / 3, 0.7 * 1 / 2])
    out = matrix_nms(CHAIN_MASKS, CHAIN_LABELS, CHAIN_SCORES, kernel="linear")
    assert torch.allclose(out, expected, atol=1e-6)


def test_dense_reference_matches_hand_values_too():
    for kernel in ("gaussian", "linear"):
        fast = matrix_nms(CHAIN_MASKS, CHAIN_LABELS, CHAIN_SCORES, kernel=kernel)
        dense = matrix_nms_dense(CHAIN_MASKS, CHAIN_LABELS, CHAIN_SCORES, kernel=kernel)
        assert torch.equal(fast, dense)


def test_exact_duplicates():
    # A = B = C = cols {0,1}, D = cols {1,2}; iou(X,D) = 1/3 for X in A,B,C.
    # Compensation: A 0, B 1, C 1, D 1/3.
    masks = column_masks({0, 1}, {0, 1}, {0, 1}, {1, 2})
    labels = torch.zeros(4, dtype=torch.long)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    # Linear. B: i=A (1-1)/1 = 0. C: i=A 0 (i=B is 0/0, taken as +inf, not NaN). D: i=A 2/3;
    # i=B, i=C (2/3)/0 = +inf; i=D 1/(2/3) = 3/2. Min 2/3.
    out = matrix_nms(masks, labels, scores, kernel="linear")
    assert torch.allclose(out, torch.tensor([0.9, 0.0, 0.0, 0.6 * 2 / 3]), atol=1e-6)
    assert torch.equal(out, matrix_nms_dense(masks, labels, scores, kernel="linear"))
    # Gaussian, f(x) = exp(-2 x^2). B: i=A f(1) = exp(-2). C: i=A exp(-2); i=B f(1)/f(1) = 1.
    # D: i=A f(1/3) = exp(-2/9); i=B f(1/3)/f(1) = exp(16/9). Min exp(-2/9).
    out = matrix_nms(masks, labels, scores, kernel="gaussian")
    expected = torch.tensor([0.9, 0.8 * math.exp(-2), 0.7 * math.exp(-2), 0.6 * math.exp(-2 / 9)])
    assert torch.allclose(out, expected, atol=1e-6)


def test_other_classes_do_not_decay():
    masks = column_masks({0, 1}, {0, 1}, {0, 1})
    scores = torch.tensor([0.9, 0.8, 0.7])
    for kernel in ("gaussian", "linear"):
        out = matrix_nms(masks, torch.tensor([0, 1, 2]), scores, kernel=kernel)
        assert torch.equal(out, scores)


def test_empty_and_single_input():
    empty = matrix_nms(
        torch.zeros(0, 4, 4, dtype=torch.bool), torch.zeros(0).long(), torch.zeros(0)
    )
    assert empty.shape == (0,) and empty.dtype == torch.float32
    single = matrix_nms(column_masks({2}), torch.tensor([3]), torch.tensor([0.4]))
    assert torch.equal(single, torch.tensor([0.4]))


def test_unsorted_input_is_ranked_internally():
    permutation = torch.tensor([2, 0, 1])
    for kernel in ("gaussian", "linear"):
        sorted_out = matrix_nms(CHAIN_MASKS, CHAIN_LABELS, CHAIN_SCORES, kernel=kernel)
        out = matrix_nms(
            CHAIN_MASKS[permutation], CHAIN_LABELS[permutation], CHAIN_SCORES[permutation], kernel
        )
        assert torch.equal(out, sorted_out[permutation])


def test_equal_scores_keep_input_order():
    # A = cols {0,1}, B = cols {1,2}, iou 1/3, equal scores: the first given ranks higher.
    masks = column_masks({0, 1}, {1, 2})
    labels, scores = torch.tensor([0, 0]), torch.tensor([0.5, 0.5])
    out = matrix_nms(masks, labels, scores)
    assert torch.allclose(out, torch.tensor([0.5, 0.5 * math.exp(-2 / 9)]), atol=1e-7)
    out = matrix_nms(masks.flip(0), labels, scores)
    assert torch.allclose(out, torch.tensor([0.5, 0.5 * math.exp(-2 / 9)]), atol=1e-7)


def test_mask_areas_and_mask_dtypes():
    areas = CHAIN_MASKS.sum(dim=(1, 2))
    reference = matrix_nms(CHAIN_MASKS, CHAIN_LABELS, CHAIN_SCORES)
    assert torch.equal(
        matrix_nms(CHAIN_MASKS, CHAIN_LABELS, CHAIN_SCORES, mask_areas=areas), reference
    )
    for dtype in (torch.uint8, torch.float32):
        assert torch.equal(matrix_nms(CHAIN_MASKS.to(dtype), CHAIN_LABELS, CHAIN_SCORES), reference)


def test_two_empty_masks_count_as_identical():
    # A = cols {0,1}, E1 = E2 = empty, D = cols {1,2}; iou(A,D) = 1/3, iou(E1,E2) = 1 (both
    # empty: union 0), any empty mask with a non-empty one 0. Compensation: E2 1, D 1/3.
    # Gaussian: E2 decays by f(1) = exp(-2) from E1; D by f(1/3) = exp(-2/9) from A.
    masks = column_masks({0, 1}, set(), set(), {1, 2})
    labels, scores = torch.zeros(4, dtype=torch.long), torch.tensor([0.9, 0.8, 0.7, 0.6])
    out = matrix_nms(masks, labels, scores)
    expected = torch.tensor([0.9, 0.8, 0.7 * math.exp(-2), 0.6 * math.exp(-2 / 9)])
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.equal(out, matrix_nms_dense(masks, labels, scores))


def random_candidates(num, height, width, num_classes, seed):
    """Clusters of jittered rectangles (near-duplicates of a few objects), mixed classes."""
    generator = torch.Generator().manual_seed(seed)
    num_objects = max(1, num // 8)
    centers = torch.rand(num_objects, 2, generator=generator) * torch.tensor([height, width])
    sizes = 3 + torch.rand(num_objects, 2, generator=generator) * torch.tensor([height, width]) / 2
    of_object = torch.randint(0, num_objects, (num,), generator=generator)
    jitter = 1 + 0.3 * (torch.rand(num, 4, generator=generator) - 0.5)
    half = sizes[of_object] / 2
    low = (centers[of_object] - half * jitter[:, :2]).round().long()
    high = (centers[of_object] + half * jitter[:, 2:]).round().long()
    rows = torch.arange(height)[None, :, None]
    cols = torch.arange(width)[None, None, :]
    masks = (
        (rows >= low[:, 0, None, None])
        & (rows < high[:, 0, None, None])
        & (cols >= low[:, 1, None, None])
        & (cols < high[:, 1, None, None])
    )
    # Mostly the object's class, sometimes another one (class confusion).
    labels = of_object % num_classes
    confused = torch.rand(num, generator=generator) < 0.2
    labels[confused] = torch.randint(0, num_classes, (int(confused.sum()),), generator=generator)
    scores = torch.rand(num, generator=generator)
    return masks, labels, scores


def intersection_kernel():
    kernel = native.checked(
        matrix_nms_module._KERNEL_NAME, matrix_nms_module._intersection_self_check
    )
    if kernel is None:
        pytest.skip(native.status())
    return kernel


@pytest.mark.parametrize("seed, num", [(0, 40), (1, 120), (2, 300)])
def test_matches_dense_reference_on_random_clusters(seed, num):
    """matrix_nms takes the popcount kernel here; the dense reference, one float matmul."""
    intersection_kernel()
    masks, labels, scores = random_candidates(num, 72, 120, num_classes=4, seed=seed)
    for kernel in ("gaussian", "linear"):
        fast = matrix_nms(masks, labels, scores, kernel=kernel)
        dense = matrix_nms_dense(masks, labels, scores, kernel=kernel)
        assert (dense < scores).any()  # something was decayed
        assert torch.equal(fast, dense)


def test_without_the_kernel_matrix_nms_is_the_dense_computation(monkeypatch):
    monkeypatch.setattr(native, "checked", lambda name, check: None)
    masks, labels, scores = random_candidates(60, 30, 40, num_classes=3, seed=4)
    assert torch.equal(matrix_nms(masks, labels, scores), matrix_nms_dense(masks, labels, scores))


def test_intersection_kernel_counts_exactly_what_the_dense_matmul_counts():
    """The self-check's cases (so the self-check is exactly as strong as this test)."""
    kernel = intersection_kernel()
    assert matrix_nms_module._intersection_self_check(kernel) is None
    for masks, labels in matrix_nms_module._intersection_check_cases():
        dense, _ = matrix_nms_module._dense_intersections(masks, labels, False)
        same = labels[:, None] == labels[None, :]
        assert torch.equal(kernel.same_class_intersections(masks, labels), dense * same)


def test_mask_nms_by_hand():
    # A = cols {0,1}, B = cols {0,1,2}, C = cols {1,2}. iou(A,B) = 2/3 > 0.5: B dropped.
    # iou(B,C) = 2/3, but B is not kept; iou(A,C) = 1/3 <= 0.5: C kept.
    masks = column_masks({0, 1}, {0, 1, 2}, {1, 2})
    keep = mask_nms(masks, torch.tensor([0, 0, 0]), torch.tensor([0.9, 0.8, 0.7]))
    assert keep.tolist() == [True, False, True]
    # Unsorted input: the same decisions, in the input order.
    keep = mask_nms(masks.flip(0), torch.tensor([0, 0, 0]), torch.tensor([0.7, 0.8, 0.9]))
    assert keep.tolist() == [True, False, True]
    # iou(A,B) = 2/3 is not above 0.7: both kept; iou(B,C) = 2/3 too.
    keep = mask_nms(masks, torch.tensor([0, 0, 0]), torch.tensor([0.9, 0.8, 0.7]), 0.7)
    assert keep.tolist() == [True, True, True]


def test_mask_nms_threshold_is_strict_and_class_aware():
    # cols {0,1} vs cols {0,1,2,3}: IoU exactly 1/2, not above 0.5.
    masks = column_masks({0, 1}, {0, 1, 2, 3})
    assert mask_nms(masks, torch.tensor([0, 0]), torch.tensor([0.9, 0.8])).tolist() == [True, True]
    same = column_masks({0, 1}, {0, 1}, {0, 1})
    keep = mask_nms(same, torch.tensor([0, 1, 0]), torch.tensor([0.9, 0.8, 0.7]))
    assert keep.tolist() == [True, True, False]


def test_mask_nms_matches_sequential_greedy():
    masks, labels, scores = random_candidates(120, 40, 64, num_classes=3, seed=4)
    flat = masks.flatten(1).float()
    inter = flat @ flat.T
    iou = inter / (flat.sum(1)[:, None] + flat.sum(1)[None, :] - inter)
    kept = []
    for candidate in torch.sort(scores, descending=True, stable=True).indices.tolist():
        if all(labels[k] != labels[candidate] or iou[k, candidate] <= 0.5 for k in kept):
            kept.append(candidate)
    expected = torch.zeros(len(scores), dtype=torch.bool)
    expected[kept] = True
    assert torch.equal(mask_nms(masks, labels, scores), expected)


def test_mask_nms_empty():
    keep = mask_nms(torch.zeros(0, 4, 4, dtype=torch.bool), torch.zeros(0).long(), torch.zeros(0))
    assert keep.shape == (0,) and keep.dtype == torch.bool


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="gaussian"):
        matrix_nms(CHAIN_MASKS, CHAIN_LABELS, CHAIN_SCORES, kernel="exp")
    with pytest.raises(ValueError, match="labels"):
        matrix_nms(CHAIN_MASKS, CHAIN_LABELS[:2], CHAIN_SCORES)
    with pytest.raises(ValueError, match="masks"):
        mask_nms(CHAIN_MASKS[0], CHAIN_LABELS, CHAIN_SCORES)
