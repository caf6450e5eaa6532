"""SOLOv2 losses against values worked out by hand."""

import math

import pytest
import torch
from fvcore.nn import sigmoid_focal_loss as fvcore_sigmoid_focal_loss

from solov2_d2.modeling.losses import dice_loss, sigmoid_focal_loss, solov2_losses

LN2 = math.log(2.0)
# fvcore's focal loss computes in float32 whatever the input type: hand values agree to a few
# float32 ulps (measured: at most 9.2e-7 relative, at sigmoid(-3)).
FOCAL_REL = 5e-6


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_focal_loss_hand_values():
    logits = torch.tensor([0.0, 0.0, 2.0, -3.0], dtype=torch.float64)
    targets = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    expected = [
        # p = 0.5, positive: alpha * (1 - p)^2 * -log(p) = 0.25 * 0.25 * ln 2 = 0.043322
        0.25 * 0.25 * LN2,
        # p = 0.5, negative: (1 - alpha) * p^2 * -log(1 - p) = 0.75 * 0.25 * ln 2 = 0.129965
        0.75 * 0.25 * LN2,
        # p = sigmoid(2) = 0.880797, positive: 0.25 * 0.119203^2 * 0.126928 = 4.5090e-4
        0.25 * (1 - sigmoid(2.0)) ** 2 * -math.log(sigmoid(2.0)),
        # p = sigmoid(-3) = 0.047426, negative: 0.75 * 0.047426^2 * 0.048587 = 8.1963e-5
        0.75 * sigmoid(-3.0) ** 2 * -math.log(1 - sigmoid(-3.0)),
    ]
    loss = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0)
    assert loss.shape == logits.shape
    assert loss.dtype == torch.float32
    assert loss.tolist() == pytest.approx(expected, rel=FOCAL_REL)
    assert fvcore_sigmoid_focal_loss(
        logits, targets, alpha=0.25, gamma=2.0, reduction="none"
    ).tolist() == pytest.approx(expected, rel=FOCAL_REL)
    assert expected[2] == pytest.approx(4.5090e-4, rel=1e-4)
    assert expected[3] == pytest.approx(8.1963e-5, rel=1e-4)


def test_focal_loss_is_fvcores_with_solo_defaults():
    """Our name delegates to fvcore (bit for bit), keeping SOLO's defaults alpha = 0.25 and
    gamma = 2 (fvcore's default alpha = -1 would drop the alpha weighting)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 5, generator=generator) * 4
    targets = (torch.rand(64, 5, generator=generator) < 0.2).float()
    assert 0 < targets.sum() < targets.numel()
    ours = sigmoid_focal_loss(logits, targets)
    assert torch.equal(
        ours, fvcore_sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="none")
    )
    unweighted = fvcore_sigmoid_focal_loss(logits, targets, gamma=2.0, reduction="none")
    assert not torch.allclose(ours, unweighted)
    assert torch.allclose(sigmoid_focal_loss(logits, targets, alpha=-1.0), unweighted)


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (0.5, 1.5), (0.75, 0.0)])
def test_fvcore_focal_loss_matches_the_formula(alpha, gamma):
    """-alpha_t (1 - p_t)^gamma log(p_t), written here in float64 with log(p_t) =
    logsigmoid(+-logit), against fvcore's float32 computation over logits in about [-16, 16]."""
    generator = torch.Generator().manual_seed(1)
    # float32 logits, so that input rounding is no part of the comparison.
    logits = (torch.randn(200, 8, generator=generator) * 5).double()
    targets = (torch.rand(200, 8, generator=generator) < 0.3).double()
    signed = torch.where(targets > 0, logits, -logits)  # p_t = sigmoid(signed)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    prob_of_truth = torch.sigmoid(signed)
    expected = -alpha_t * (1 - prob_of_truth) ** gamma * torch.nn.functional.logsigmoid(signed)
    got = sigmoid_focal_loss(logits.float(), targets.float(), alpha=alpha, gamma=gamma)
    # Absolute slack of about one float32 ulp of |logit| <= 16: BCE-with-logits adds and removes
    # terms of that size, and 1 - p cancels for easy positives.
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    assert expected.max() > 1.0  # confidently wrong entries are in the sample


def test_focal_loss_gamma_zero_is_alpha_weighted_bce():
    logits = torch.tensor([[0.3, -1.2], [2.5, 0.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    weights = torch.tensor([[0.25, 0.75], [0.75, 0.25]])
    loss = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=0.0)
    assert torch.allclose(loss, weights * bce)


def test_focal_loss_is_stable_for_extreme_logits():
    # Confidently wrong at |logit| = 100: -log(p_t) = 100 and (1 - p_t)^2 = 1, so the losses are
    # 0.75 * 100 (negative predicted positive) and 0.25 * 100; log(sigmoid) would give inf.
    logits = torch.tensor([100.0, -100.0, 100.0], requires_grad=True)
    targets = torch.tensor([0.0, 1.0, 1.0])
    loss = sigmoid_focal_loss(logits, targets)
    assert loss.tolist() == pytest.approx([75.0, 25.0, 0.0])
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_dice_loss_hand_values_with_eps_in_both_terms():
    eps = 1e-3
    probs = torch.tensor(
        [
            [[1.0, 0.0], [0.0, 0.0]],  # perfect: a = 1, b = c = 1 + eps
            [[0.5, 0.5], [0.0, 0.0]],  # a = 0.5, b = 0.5 + eps, c = 1 + eps
            [[0.0, 0.0], [0.0, 0.0]],  # empty vs empty: a = 0, b = c = eps
        ],
        dtype=torch.float64,
    )
    targets = torch.tensor(
        [[[1, 0], [0, 0]], [[1, 0], [0, 0]], [[0, 0], [0, 0]]], dtype=torch.uint8
    )
    expected = [
        1 - 2 * 1.0 / (2 + 2 * eps),  # = eps / (1 + eps) = 9.990e-4
        1 - 2 * 0.5 / (1.5 + 2 * eps),  # = 1 - 1 / 1.502 = 0.334221
        1.0,
    ]
    loss = dice_loss(probs, targets, eps=eps)
    assert loss.shape == (3,)
    assert loss.tolist() == pytest.approx(expected, rel=1e-12)
    # eps counted once (1 - 1 / 1.501) would be off in the 4th digit.
    assert loss[1].item() == pytest.approx(0.334221, abs=1e-6)
    assert loss[0].item() == pytest.approx(9.99e-4, rel=1e-3)


def _loss_setup(num_positive_pairs=2):
    # 6 cells, 3 classes, background = 3; cells 0 and 3 are positive.
    category_logits = torch.zeros((6, 3), dtype=torch.float64, requires_grad=True)
    category_targets = torch.tensor([0, 3, 3, 2, 3, 3])
    mask_logits = torch.zeros((num_positive_pairs, 2, 2), dtype=torch.float64, requires_grad=True)
    mask_targets = torch.tensor([[[1, 1], [1, 1]], [[1, 0], [0, 0]]], dtype=torch.uint8)
    return category_logits, category_targets, mask_logits, mask_targets[:num_positive_pairs]


def test_solov2_losses_hand_values_and_normalization():
    category_logits, category_targets, mask_logits, mask_targets = _loss_setup()
    losses = solov2_losses(
        category_logits,
        category_targets,
        mask_logits,
        mask_targets,
        num_classes=3,
        focal_alpha=0.25,
        focal_gamma=2.0,
        focal_weight=2.0,
        dice_weight=3.0,
    )
    # All logits 0 (p = 0.5): a positive entry costs 0.25 * 0.25 ln2, a negative 0.75 * 0.25 ln2.
    # 2 positive entries and 6 * 3 - 2 = 16 negative ones: (0.125 + 16 * 0.1875) ln2 = 3.125 ln2,
    # divided by (2 positive cells + 1) and weighted by 2.
    assert losses["loss_cate"].item() == pytest.approx(2.0 * 3.125 * LN2 / 3, rel=FOCAL_REL)
    # Mask probs 0.5 everywhere, eps = 1e-3:
    #   pair 0, all-ones target: a = 2, b = 1 + eps, c = 4 + eps -> 1 - 4 / (5 + 2 eps)
    #   pair 1, one-pixel target: a = 0.5, b = 1 + eps, c = 1 + eps -> 1 - 1 / (2 + 2 eps)
    eps = 1e-3
    dice = [1 - 4 / (5 + 2 * eps), 1 - 1 / (2 + 2 * eps)]
    assert losses["loss_mask"].item() == pytest.approx(3.0 * sum(dice) / 2, rel=1e-12)
    (losses["loss_cate"] + losses["loss_mask"]).backward()
    assert torch.isfinite(category_logits.grad).all() and category_logits.grad.abs().sum() > 0
    assert torch.isfinite(mask_logits.grad).all() and mask_logits.grad.abs().sum() > 0


def test_no_positive_cells_divides_by_one():
    category_logits = torch.zeros((4, 2), dtype=torch.float64)
    category_targets = torch.full((4,), 2)
    losses = solov2_losses(
        category_logits,
        category_targets,
        torch.zeros((0, 3, 3)),
        torch.zeros((0, 3, 3), dtype=torch.uint8),
        num_classes=2,
        focal_alpha=0.25,
        focal_gamma=2.0,
        focal_weight=1.0,
        dice_weight=3.0,
    )
    # 8 negative entries at 0.75 * 0.25 ln2 each, over (0 + 1).
    assert losses["loss_cate"].item() == pytest.approx(8 * 0.1875 * LN2, rel=FOCAL_REL)


def test_no_positive_pairs_gives_finite_zero_mask_loss_with_gradient():
    category_logits, category_targets, mask_logits, mask_targets = _loss_setup(0)
    losses = solov2_losses(
        category_logits,
        category_targets,
        mask_logits,
        mask_targets,
        num_classes=3,
        focal_alpha=0.25,
        focal_gamma=2.0,
        focal_weight=1.0,
        dice_weight=3.0,
    )
    assert losses["loss_mask"].item() == 0.0
    assert losses["loss_mask"].requires_grad
    losses["loss_mask"].backward()
    assert mask_logits.grad is not None and mask_logits.grad.shape == (0, 2, 2)


@pytest.mark.parametrize(
    "bad_targets, message",
    [
        (torch.tensor([0, 3, 3, 4, 3, 3]), r"\[0, num_classes=3\]"),
        (torch.tensor([0, 3, -1, 2, 3, 3]), r"\[0, num_classes=3\]"),
        (torch.tensor([0, 3, 3]), "to match category_logits"),
    ],
)
def test_invalid_category_targets_raise(bad_targets, message):
    category_logits, _, mask_logits, mask_targets = _loss_setup()
    with pytest.raises(ValueError, match=message):
        solov2_losses(
            category_logits,
            bad_targets,
            mask_logits,
            mask_targets,
            num_classes=3,
            focal_alpha=0.25,
            focal_gamma=2.0,
            focal_weight=1.0,
            dice_weight=3.0,
        )


def test_mismatched_shapes_raise():
    category_logits, category_targets, mask_logits, mask_targets = _loss_setup()
    arguments = dict(focal_alpha=0.25, focal_gamma=2.0, focal_weight=1.0, dice_weight=3.0)
    with pytest.raises(ValueError, match="num_classes=4"):
        solov2_losses(
            category_logits, category_targets, mask_logits, mask_targets, num_classes=4, **arguments
        )
    with pytest.raises(ValueError, match="same shape"):
        solov2_losses(
            category_logits,
            category_targets,
            mask_logits,
            mask_targets[:1],
            num_classes=3,
            **arguments,
        )
