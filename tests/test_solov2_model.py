"""The META_ARCH end to end on synthetic inputs: losses, training, inference, batching."""

import copy
import math

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks

from solov2_d2.modeling.postprocess import masks_to_boxes
from solov2_d2.modeling.solov2 import _bitmasks
from solov2_d2.modeling.target_assigner import assign_targets_single_image

from .conftest import tiny_cfg
from .test_fast_path import assert_same_detections

# tiny_cfg: grids 12, 10, 8, 6, 4 -> 360 cells per image, 3 classes; LOSS.FOCAL_ALPHA 0.25,
# FOCAL_GAMMA 2, DICE_WEIGHT 3; PRIOR_PROB 0.01; masks at 1/4 of the padded input.
CELLS_PER_IMAGE = 12 * 12 + 10 * 10 + 8 * 8 + 6 * 6 + 4 * 4
NUM_CLASSES = 3
PRIOR = 0.01
# Focal loss of one (cell, class) element whose probability is the prior: a positive element
# (target 1) costs -alpha (1 - p)^2 log p, a negative one -(1 - alpha) p^2 log(1 - p).
FOCAL_POSITIVE_AT_PRIOR = -0.25 * (1 - PRIOR) ** 2 * math.log(PRIOR)  # 1.12838
FOCAL_NEGATIVE_AT_PRIOR = -0.75 * PRIOR**2 * math.log(1 - PRIOR)  # 7.5378e-7
DICE_EPS = 1e-3


def synthetic_input(height=64, width=64, polygons=False):
    """An image with a bright square (class 0) and a dark wide rectangle (class 1)."""
    image = torch.full((3, height, width), 40.0)
    masks = torch.zeros(2, height, width, dtype=torch.bool)
    masks[0, 8:28, 10:30] = True
    masks[1, 36:56, 12:52] = True
    image[:, masks[0]] = 230.0
    image[:, masks[1]] = 120.0
    instances = Instances((height, width))
    instances.gt_boxes = Boxes(torch.tensor([[10.0, 8, 30, 28], [12.0, 36, 52, 56]]))
    instances.gt_classes = torch.tensor([0, 1])
    if polygons:
        instances.gt_masks = PolygonMasks(
            [[[10, 8, 30, 8, 30, 28, 10, 28]], [[12, 36, 52, 36, 52, 56, 12, 56]]]
        )
    else:
        instances.gt_masks = BitMasks(masks)
    return {"image": image, "instances": instances, "height": height, "width": width}


def other_synthetic_input(height=64, width=64):
    """Another scene for the same grid: a large orange rectangle (class 2) in the upper right
    and a small white square (class 0) in the lower left, on a lighter background."""
    image = torch.full((3, height, width), 90.0)
    masks = torch.zeros(2, height, width, dtype=torch.bool)
    masks[0, 4:52, 20:60] = True
    masks[1, 46:60, 2:16] = True
    image[:, masks[0]] = torch.tensor([200.0, 60.0, 20.0])[:, None]
    image[:, masks[1]] = 250.0
    instances = Instances((height, width))
    instances.gt_boxes = Boxes(torch.tensor([[20.0, 4, 60, 52], [2.0, 46, 16, 60]]))
    instances.gt_classes = torch.tensor([2, 0])
    instances.gt_masks = BitMasks(masks)
    return {"image": image, "instances": instances, "height": height, "width": width}


def empty_input(height=64, width=48):
    instances = Instances((height, width))
    instances.gt_boxes = Boxes(torch.zeros(0, 4))
    instances.gt_classes = torch.zeros(0, dtype=torch.int64)
    return {"image": torch.rand(3, height, width) * 255, "instances": instances}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_cfg())


def targets_of(model, inputs, padded_size):
    instances = inputs["instances"]
    return assign_targets_single_image(
        _bitmasks(instances),
        instances.gt_boxes.tensor,
        instances.gt_classes,
        padded_size,
        model.num_grids,
        model.scale_ranges,
        model.sigma,
        model.num_classes,
    )


def counts_of(targets):
    """(positive cells, positive (instance, cell) pairs) of one image's targets."""
    positive_cells = sum(int((t != NUM_CLASSES).sum()) for t in targets.category_targets)
    pairs = sum(len(cells) for cells in targets.positive_cells)
    return positive_cells, pairs


def losses_at_prior_and_zero_mask_logits(targets_per_image):
    """The losses of a model whose category logits all equal the prior bias and whose mask
    logits are all 0 (sigmoid 0.5 everywhere), from the targets' counts alone.

    loss_cate = (P * focal+ + (N * C - P) * focal-) / (P + 1), P positive cells of all images;
    dice of a pair with |T| target pixels on an n-pixel mask feature:
    1 - 2 * 0.5 |T| / (n / 4 + |T| + 2 eps); loss_mask = 3 * mean over the pairs."""
    positives, elements, dice = 0, 0, []
    for targets in targets_per_image:
        positive_cells, _ = counts_of(targets)
        positives += positive_cells
        elements += CELLS_PER_IMAGE * NUM_CLASSES
        pixels = targets.mask_targets[0].numel() if len(targets.mask_targets) else 0
        for instance in torch.cat(targets.positive_instances).tolist():
            target_pixels = int(targets.mask_targets[instance].sum())
            dice.append(1 - target_pixels / (pixels / 4 + target_pixels + 2 * DICE_EPS))
    focal_sum = (
        positives * FOCAL_POSITIVE_AT_PRIOR + (elements - positives) * FOCAL_NEGATIVE_AT_PRIOR
    )
    loss_mask = 3 * sum(dice) / len(dice) if dice else 0.0
    return focal_sum / (positives + 1), loss_mask


def assert_finite_gradients(model):
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_losses_at_init_are_near_the_prior_implied_values(model):
    """At init the category logits are the PRIOR_PROB bias plus small N(0, 0.01)-weighted
    terms, the mask logits near 0: the losses lie near the values of exactly-prior logits and
    exactly-zero mask logits (at seed 0: loss_cate 5% and loss_mask 2% off them)."""
    model.train()
    model.zero_grad()
    batch = [synthetic_input(), synthetic_input(polygons=True, width=80)]
    losses = model(batch)
    assert set(losses) == {"loss_cate", "loss_mask"}
    padded_size = (64, 96)  # the batch pads both to the larger width, rounded up to 32
    expected_cate, expected_mask = losses_at_prior_and_zero_mask_logits(
        [targets_of(model, inputs, padded_size) for inputs in batch]
    )
    assert expected_cate > 0.5 and expected_mask > 1.0
    assert losses["loss_cate"].item() == pytest.approx(expected_cate, rel=0.15)
    assert losses["loss_mask"].item() == pytest.approx(expected_mask, rel=0.15)
    # The weighted dice loss lies in [0, 3] whatever the logits; here well inside.
    assert 0 < losses["loss_mask"].item() < 3
    sum(losses.values()).backward()
    assert_finite_gradients(model)


def zero_predictor_weights(model):
    """Category logits exactly the prior bias, kernels (hence mask logits) exactly 0."""
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed.ins_head.cate_pred.weight.zero_()
        zeroed.ins_head.kernel_pred.weight.zero_()
        zeroed.ins_head.kernel_pred.bias.zero_()
    return zeroed


def test_losses_with_zero_predictor_weights_equal_the_hand_computed_values(model):
    """64 x 64 synthetic image, by hand. Square: mass center (17.5, 19.5), 20 x 20 box, scale 20
    -> levels S=12 and S=10 (ranges 1-24, 12-48); sigma box +-2 px -> cells
    floor([15.5, 19.5] * S / 64) x floor([17.5, 21.5] * S / 64) = rows 2-3 x cols 3-4 (S=12),
    rows 2-3 x cols 2-3 (S=10): 8 cells. Rectangle: center (45.5, 31.5), 40 x 20, scale 28.3 ->
    S=10 and S=8; +-2 px rows, +-4 px cols -> rows 6-7 x cols 4-5 (S=10), row 5 x cols 3-4 (S=8):
    6 cells. 14 positive cells, no cell shared, 14 pairs. Mask targets at 16 x 16 (OpenCV's x1/4
    samples input pixels 4i+1 and 4i+2, a half-covered pair rounds to 1): square rows 2-6 x cols
    2-7 = 30 px, rectangle rows 9-13 x cols 3-12 = 50 px."""
    model.train()
    zeroed = zero_predictor_weights(model)
    with torch.no_grad():
        losses = zeroed([synthetic_input()])
    elements = CELLS_PER_IMAGE * NUM_CLASSES  # 1080
    expected_cate = (14 * FOCAL_POSITIVE_AT_PRIOR + (elements - 14) * FOCAL_NEGATIVE_AT_PRIOR) / 15
    square_dice = 1 - 30 / (64 + 30 + 2 * DICE_EPS)  # sum p^2 = 256 / 4 = 64
    rectangle_dice = 1 - 50 / (64 + 50 + 2 * DICE_EPS)
    expected_mask = 3 * (8 * square_dice + 6 * rectangle_dice) / 14
    assert expected_cate == pytest.approx(1.05321, abs=1e-5)
    assert expected_mask == pytest.approx(1.88900, abs=1e-5)
    assert losses["loss_cate"].item() == pytest.approx(expected_cate, rel=1e-5)
    assert losses["loss_mask"].item() == pytest.approx(expected_mask, rel=1e-5)

    # An image without instances: every element negative, normalized by 0 + 1; no mask pair.
    with torch.no_grad():
        empty = zeroed([empty_input()])
    assert float(empty["loss_cate"]) == pytest.approx(elements * FOCAL_NEGATIVE_AT_PRIOR, rel=1e-5)
    assert float(empty["loss_mask"]) == 0.0


@pytest.mark.parametrize("batch", [[empty_input()], [empty_input(), synthetic_input()]])
def test_images_without_instances_train(model, batch):
    model.train()
    model.zero_grad()
    losses = model(batch)
    total = sum(losses.values())
    total.backward()
    assert_finite_gradients(model)
    if len(batch) == 1:
        # Every cell is a negative near the prior: 1080 * 7.5e-7 = 8e-4 at exactly-prior logits,
        # a few times that at most with the init's spread (p^2 log(1 - p) grows like p^3).
        assert 4e-4 < losses["loss_cate"].item() < 4e-3
        assert losses["loss_mask"].item() == 0.0
    else:
        # Both pad to 64 x 64: the synthetic image's pairs, its own kernels and mask feature,
        # give the loss it gets alone.
        with torch.no_grad():
            alone = model(batch[1:])
        assert losses["loss_mask"].item() > 1.0
        assert losses["loss_mask"].item() == pytest.approx(float(alone["loss_mask"]), rel=1e-5)


def test_two_image_batch_losses_combine_the_single_image_losses(detecting_model):
    """A batch's losses are the positives-weighted combination of its images' losses:
    loss_cate = sum of focal sums / (all positive cells + 1), loss_mask = mean over all pairs.
    Each image must meet its own kernels, mask feature and category logits: a batch that gives
    image 1 image 0's (the mis-pairing this guards against) changes image 1's term by ~5%."""
    model = detecting_model.train()
    first, second = synthetic_input(), other_synthetic_input()
    try:
        with torch.no_grad():
            batch = model([first, second])
            alone = [model([first]), model([second])]
            # What image 1 would contribute with image 0's head outputs.
            mispaired = model([dict(first, instances=second["instances"])])
    finally:
        model.eval()
    counts = [counts_of(targets_of(model, inputs, (64, 64))) for inputs in (first, second)]
    (cells_first, pairs_first), (cells_second, pairs_second) = counts
    assert (cells_first, pairs_first) == (14, 14)  # see the hand count above
    assert cells_second > 0 and pairs_second > 0

    focal_sums = [float(a["loss_cate"]) * (cells + 1) for a, (cells, _) in zip(alone, counts)]
    expected_cate = sum(focal_sums) / (cells_first + cells_second + 1)
    mask_sums = [float(a["loss_mask"]) * pairs for a, (_, pairs) in zip(alone, counts)]
    expected_mask = sum(mask_sums) / (pairs_first + pairs_second)
    assert float(batch["loss_cate"]) == pytest.approx(expected_cate, rel=1e-5)
    assert float(batch["loss_mask"]) == pytest.approx(expected_mask, rel=1e-5)

    # The check can fail: the mis-paired terms lie far outside that tolerance.
    for name in ("loss_cate", "loss_mask"):
        correct, wrong = float(alone[1][name]), float(mispaired[name])
        assert abs(wrong - correct) > 0.02 * correct, name


@pytest.mark.slow
def test_thirty_steps_halve_the_loss():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = [synthetic_input()]
    history = []
    for _ in range(30):
        losses = model(batch)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(total.item())
    assert history[-1] < 0.5 * history[0], history


def test_inference_boxes_are_mask_extents_and_sizes_follow_request(model):
    model.eval()
    # Low thresholds so that an untrained model yields detections to check.
    model.inference_params.score_threshold = 0.0
    model.inference_params.update_threshold = 0.0
    inputs = synthetic_input()
    inputs["height"], inputs["width"] = 96, 100
    try:
        with torch.no_grad():
            (result,) = model([inputs])
    finally:
        model.inference_params.score_threshold = 0.1
        model.inference_params.update_threshold = 0.05
    instances = result["instances"]
    assert len(instances) > 0
    assert instances.image_size == (96, 100)
    assert instances.pred_masks.shape[1:] == (96, 100)
    assert instances.pred_masks.dtype == torch.bool
    assert torch.equal(instances.pred_boxes.tensor, masks_to_boxes(instances.pred_masks))


def test_inference_without_detections_is_well_typed(model):
    model.eval()
    model.inference_params.score_threshold = 1.1  # nothing can pass
    try:
        with torch.no_grad():
            (result,) = model([synthetic_input()])
    finally:
        model.inference_params.score_threshold = 0.1
    instances = result["instances"]
    assert len(instances) == 0
    assert instances.pred_masks.shape == (0, 64, 64)
    assert instances.pred_masks.device == model.device
    assert instances.scores.dtype == torch.float32
    assert instances.pred_classes.dtype == torch.int64


@pytest.mark.parametrize("form, score_tol", [("exact", 1e-5), ("fast", 1e-4)])
def test_mixed_size_batch_equals_single_images(detecting_model, form, score_tol):
    """Images of different sizes that pad to the same 64 x 64 tensor alone and in the batch get
    their single-image detections, each cropped to its own size and resized to its own request.
    (Float rounding of a batched forward may differ from single ones on some builds: same
    detections up to rounding, not bit for bit; the fast form's Winograd convolutions and
    oneDNN's kernels are chosen by shape, so its batch rounds further from one image's.)"""
    model = copy.deepcopy(detecting_model).eval()
    model.fast_inference = form == "fast"
    small = dict(other_synthetic_input(), height=100, width=90)
    small["image"] = small["image"][:, :50, :45]
    large = synthetic_input(64, 64)
    with torch.no_grad():
        batched = model([small, large])
        alone = [model([small])[0], model([large])[0]]
    assert batched[0]["instances"].image_size == (100, 90)
    assert batched[1]["instances"].image_size == (64, 64)
    for b, a in zip(batched, alone):
        assert_same_detections(b["instances"], a["instances"], score_tol=score_tol, min_iou=0.99)
        assert torch.equal(
            b["instances"].pred_boxes.tensor, masks_to_boxes(b["instances"].pred_masks)
        )
    # The two images' detections differ: a batch handing one image's results to both fails.
    assert len(alone[0]["instances"]) != len(alone[1]["instances"]) or not torch.allclose(
        alone[0]["instances"].scores, alone[1]["instances"].scores
    )


def on_canvas(inputs, height, width, model):
    """``inputs`` alone on a (height, width) canvas of the pixel mean, i.e. of zeros after
    normalization: the tensor a padded batch gives it."""
    image = inputs["image"]
    canvas = model.pixel_mean.to(image.dtype).expand(-1, height, width).clone()
    canvas[:, : image.shape[1], : image.shape[2]] = image
    return {"image": canvas}


def test_mixed_size_batch_gives_the_smaller_image_its_canvas_detections(detecting_model):
    """An image padded further in a batch than alone gets other detections than alone, as in
    the official implementation: the S x S grids and the mask feature cover the padded tensor,
    so its cells sit on other pixels. What it must get is its detections on the batch's padded
    tensor: the same scores and classes, and the same masks cropped to its size."""
    # On the exact form: the fast one (FAST_INFERENCE) rounds a batch of two otherwise than one
    # image (oneDNN and Winograd chunks pick by shape), which flips pixels of 64-pixel masks.
    model = copy.deepcopy(detecting_model).eval()
    model.fast_inference = False
    small, large = synthetic_input(64, 64), other_synthetic_input(96, 128)
    with torch.no_grad():
        batched = model([small, large])
        canvas = model([on_canvas(small, 96, 128, model)])[0]["instances"]
        alone_large = model([large])[0]["instances"]
    expected = Instances((64, 64))
    expected.pred_masks = canvas.pred_masks[:, :64, :64]
    expected.pred_boxes = Boxes(masks_to_boxes(expected.pred_masks))
    expected.scores = canvas.scores
    expected.pred_classes = canvas.pred_classes
    assert batched[0]["instances"].image_size == (64, 64)
    assert_same_detections(batched[0]["instances"], expected, score_tol=1e-5, min_iou=0.99)
    assert_same_detections(batched[1]["instances"], alone_large, score_tol=1e-5, min_iou=0.99)


def test_uint8_and_non_contiguous_images(detecting_model):
    """A uint8 image and a non-contiguous float one with the same values become the same
    contiguous float tensor before the backbone: the very same detections."""
    model = detecting_model.eval()
    inputs = synthetic_input()
    reference = inputs["image"]
    as_uint8 = dict(inputs, image=reference.to(torch.uint8))
    non_contiguous = dict(inputs, image=reference.permute(1, 2, 0).contiguous().permute(2, 0, 1))
    assert not non_contiguous["image"].is_contiguous()
    assert torch.equal(as_uint8["image"].float(), reference)  # integer pixel values
    with torch.no_grad():
        results = [model([x])[0]["instances"] for x in (inputs, as_uint8, non_contiguous)]
    assert len(results[0]) > 5
    for other in results[1:]:
        assert torch.equal(other.scores, results[0].scores)
        assert torch.equal(other.pred_classes, results[0].pred_classes)
        assert torch.equal(other.pred_masks, results[0].pred_masks)
