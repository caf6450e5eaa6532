"""The META_ARCH end to end on synthetic inputs: losses, training, inference, batching."""

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks

from solov2_d2.modeling.postprocess import masks_to_boxes

from .conftest import tiny_cfg


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


def empty_input(height=64, width=48):
    instances = Instances((height, width))
    instances.gt_boxes = Boxes(torch.zeros(0, 4))
    instances.gt_classes = torch.zeros(0, dtype=torch.int64)
    return {"image": torch.rand(3, height, width) * 255, "instances": instances}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_cfg())


def test_train_forward_gives_finite_losses(model):
    model.train()
    losses = model([synthetic_input(), synthetic_input(polygons=True, width=80)])
    assert set(losses) == {"loss_cate", "loss_mask"}
    for value in losses.values():
        assert torch.isfinite(value)
    sum(losses.values()).backward()


@pytest.mark.parametrize("batch", [[empty_input()], [empty_input(), synthetic_input()]])
def test_images_without_instances_train(model, batch):
    model.train()
    model.zero_grad()
    losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


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


def test_mixed_size_batch_equals_single_images(model):
    """Each image of a padded mixed-size batch gets the masks it gets alone."""
    model.eval()
    model.inference_params.score_threshold = 0.0
    model.inference_params.update_threshold = 0.0
    small = synthetic_input(64, 64)
    large = synthetic_input(96, 128)
    try:
        with torch.no_grad():
            batched = model([small, large])
            alone = [model([small])[0], model([large])[0]]
    finally:
        model.inference_params.score_threshold = 0.1
        model.inference_params.update_threshold = 0.05
    assert batched[0]["instances"].image_size == (64, 64)
    assert batched[1]["instances"].image_size == (96, 128)
    # The large image is padded identically alone and in the batch: identical results.
    assert torch.equal(batched[1]["instances"].pred_masks, alone[1]["instances"].pred_masks)
    # The small one is padded more in the batch, so features differ slightly near the padding;
    # its masks must still be its own size and cover the same objects.
    assert batched[0]["instances"].pred_masks.shape[1:] == (64, 64)


def test_uint8_and_non_contiguous_images(model):
    model.eval()
    inputs = synthetic_input()
    reference = inputs["image"]
    as_uint8 = dict(inputs, image=reference.to(torch.uint8))
    non_contiguous = dict(inputs, image=reference.permute(1, 2, 0).contiguous().permute(2, 0, 1))
    assert not non_contiguous["image"].is_contiguous()
    with torch.no_grad():
        a = model([as_uint8])[0]["instances"]
        b = model([non_contiguous])[0]["instances"]
    assert torch.equal(a.scores, b.scores)
