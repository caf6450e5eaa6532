"""Half precision: the losses are computed in float32 whatever the input type or autocast state.

float16 overflows in the dice sums (65504 is its largest value) and bfloat16 keeps 8 bits of them;
under autocast the ``kernels @ mask_feature`` product of ``SOLOv2.losses`` would run in the low
precision type too. Detectron2 v0.6's ``AMPTrainer`` asserts ``torch.cuda.is_available()`` in
``run_step``; with MODEL.DEVICE cpu, train_net.Trainer runs SOLVER.AMP.ENABLED as bfloat16
autocast instead (solov2_d2/engine/trainer.py), tested here; the CUDA float16 check is
``tools/gpu_check.py``.
"""

import math
import uuid

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import HookBase, SimpleTrainer
from detectron2.modeling import build_model

import solov2_d2.modeling.solov2 as solov2_module
import train_net
from solov2_d2.data import register_shapes_dataset
from solov2_d2.modeling.losses import dice_loss, sigmoid_focal_loss, solov2_losses

from .conftest import tiny_cfg
from .test_solov2_model import synthetic_input

LOSS_SETUP = dict(
    num_classes=4, focal_alpha=0.25, focal_gamma=2.0, focal_weight=1.0, dice_weight=3.0
)


def _loss_inputs():
    """Realistically sized inputs: 4 classes over 4 x 24 x 24 cells, 3 of them positive, and 3
    positive pairs with 100 x 168 masks (blobs of 3113 to 8901 pixels)."""
    generator = torch.Generator().manual_seed(0)
    num_cells = 4 * 24 * 24
    category_logits = torch.randn(num_cells, 4, generator=generator) * 2 - 5
    category_targets = torch.full((num_cells,), 4)
    category_targets[[5, 700, 1500]] = torch.tensor([0, 2, 3])
    rows = torch.arange(100).view(-1, 1)
    columns = torch.arange(168).view(1, -1)
    mask_targets = torch.stack(
        [
            ((rows - 50) ** 2 + (columns - 84) ** 2 < 40**2),
            ((rows - 30) ** 2 / 400 + (columns - 60) ** 2 / 2500 < 1),
            (rows > 20) & (rows < 90) & (columns > 10) & (columns < 140),
        ]
    ).to(torch.uint8)
    # Leaning towards the target, with noise: dice losses ~0.27, loss_cate ~10.9.
    mask_logits = (mask_targets.float() * 2 - 1) * 1.5 + 2 * torch.randn(
        mask_targets.shape, generator=generator
    )
    return category_logits, category_targets, mask_logits, mask_targets


@pytest.mark.parametrize(
    "dtype, rounding_tolerance",
    # Against the unrounded float32 inputs, the losses move with the input rounding: relative
    # 2^-11 (float16) and 2^-8 (bfloat16) on each logit, mostly averaging out. Measured over
    # three draws of these inputs: within 3.1e-5 (float16) and 2.8e-4 (bfloat16).
    [(torch.float16, 2e-4), (torch.bfloat16, 2e-3)],
)
def test_loss_path_in_half_precision_gives_the_float32_values(dtype, rounding_tolerance):
    category_logits, category_targets, mask_logits, mask_targets = _loss_inputs()
    reference = solov2_losses(
        category_logits, category_targets, mask_logits, mask_targets, **LOSS_SETUP
    )
    half_category = category_logits.to(dtype).requires_grad_()
    half_masks = mask_logits.to(dtype).requires_grad_()
    half = solov2_losses(half_category, category_targets, half_masks, mask_targets, **LOSS_SETUP)
    # The same (rounded) values given as float32: the same float32 computation.
    rounded = solov2_losses(
        half_category.detach().float(),
        category_targets,
        half_masks.detach().float(),
        mask_targets,
        **LOSS_SETUP,
    )
    for name in ("loss_cate", "loss_mask"):
        assert half[name].dtype == torch.float32, name
        assert reference[name] > 0.1, name  # not a degenerate, near-zero comparison
        torch.testing.assert_close(half[name], rounded[name], rtol=1e-6, atol=0)
        torch.testing.assert_close(
            half[name], reference[name], rtol=rounding_tolerance, atol=0, msg=name
        )
    (half["loss_cate"] + half["loss_mask"]).backward()
    for logits in (half_category, half_masks):
        assert logits.grad.dtype == dtype
        assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_focal_loss_of_half_logits_is_float32():
    logits = torch.tensor([[4.0, -2.5], [0.5, -9.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    for dtype in (torch.float16, torch.bfloat16):
        rounded = logits.to(dtype)
        got = sigmoid_focal_loss(rounded, targets.to(dtype))
        assert got.dtype == torch.float32
        torch.testing.assert_close(
            got, sigmoid_focal_loss(rounded.float(), targets), rtol=1e-6, atol=0
        )


def test_dice_of_a_large_confident_float16_mask_is_the_float32_value():
    """200 x 336 pixels at p = 0.99 (0.990234375 in float16) on an all-ones target: sum(p t) =
    66543.75 and sum(p^2) = 65893.9 exceed 65504, so float16 sums gave inf / inf = NaN."""
    height, width, eps = 200, 336, 1e-3
    probs = torch.full((1, height, width), 0.99, dtype=torch.float16)
    targets = torch.ones((1, height, width), dtype=torch.uint8)
    p, pixels = 0.990234375, height * width
    assert probs[0, 0, 0].item() == p
    # 1 - 2 p N / (p^2 N + N + 2 eps) = 4.8167e-5, about (1 - p)^2 / (1 + p^2)
    expected = 1 - 2 * p * pixels / ((p * p + 1) * pixels + 2 * eps)
    assert expected == pytest.approx(4.8167e-5, rel=1e-4)
    got = dice_loss(probs, targets, eps=eps)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, dice_loss(probs.float(), targets, eps=eps), rtol=1e-6, atol=0)
    # float32 sums of 67200 terms: ~1e-7 relative on the ratio, ~2e-3 relative on 1 - ratio.
    assert got.item() == pytest.approx(expected, rel=1e-2)

    # Through solov2_losses with float16 logits, logit(0.99) = 4.595 -> 4.59375.
    logits = torch.full((1, height, width), math.log(0.99 / 0.01), dtype=torch.float16)
    cells, cell_targets = torch.zeros((1, 4), dtype=torch.float16), torch.tensor([0])
    losses = solov2_losses(cells, cell_targets, logits, targets, **LOSS_SETUP)
    float32_losses = solov2_losses(
        cells.float(), cell_targets, logits.float(), targets, **LOSS_SETUP
    )
    assert torch.isfinite(losses["loss_mask"]) and losses["loss_mask"] > 0
    torch.testing.assert_close(losses, float32_losses, rtol=1e-6, atol=0)


@pytest.fixture
def capture_mask_logits(monkeypatch):
    """Records the dtypes of the category and mask logits that SOLOv2.losses hands over."""
    seen = []

    def recording_losses(category_logits, category_targets, mask_logits, *args, **kwargs):
        seen.append({"category": category_logits.dtype, "mask": mask_logits.dtype})
        return solov2_losses(category_logits, category_targets, mask_logits, *args, **kwargs)

    monkeypatch.setattr(solov2_module, "solov2_losses", recording_losses)
    return seen


def test_cpu_autocast_training_forward_is_finite_close_to_float32(capture_mask_logits):
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    model.train()
    batch = [synthetic_input(), synthetic_input(polygons=True, width=80)]
    float32_losses = model(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_losses = model(batch)
    # The heads ran in bfloat16 (autocast was on); the mask logits were computed in float32.
    assert capture_mask_logits == [
        {"category": torch.float32, "mask": torch.float32},
        {"category": torch.bfloat16, "mask": torch.float32},
    ]
    for name, reference in float32_losses.items():
        value = autocast_losses[name]
        assert value.dtype == torch.float32 and torch.isfinite(value), name
        # bfloat16 convolutions through a ResNet-18 + FPN: measured within 1.2e-3 relative of
        # float32 for three initializations.
        assert value.item() == pytest.approx(reference.item(), rel=1e-2), name
        assert value.item() != reference.item(), name  # autocast did change the computation
    sum(autocast_losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.fixture
def shapes_dataset(tmp_path):
    name = "amp_shapes_" + uuid.uuid4().hex[:8]
    register_shapes_dataset(
        name, root=str(tmp_path / "shapes"), num_images=4, seed=0, min_side=64, max_side=96
    )
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _amp_cfg(dataset, output_dir, max_iter):
    cfg = tiny_cfg(num_classes=6)
    cfg.DATASETS.TRAIN = (dataset,)
    cfg.DATASETS.TEST = ()
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MAX_SIZE_TRAIN = 96
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.SOLVER.WARMUP_ITERS = 1
    cfg.SOLVER.CHECKPOINT_PERIOD = 1000
    cfg.SOLVER.AMP.ENABLED = True
    cfg.OUTPUT_DIR = str(output_dir)
    return cfg


def test_amp_config_on_the_cpu_trains_under_bfloat16_autocast(shapes_dataset, tmp_path):
    """MODEL.DEVICE cpu: Detectron2's AMPTrainer (float16 + GradScaler, CUDA-only: v0.6 asserts
    torch.cuda.is_available() in run_step) is not built; the step runs under bfloat16 autocast."""
    cfg = _amp_cfg(shapes_dataset, tmp_path, max_iter=1)
    trainer = train_net.Trainer(cfg)
    assert type(trainer._trainer) is SimpleTrainer and trainer._cpu_bfloat16
    assert trainer.cfg.SOLVER.AMP.ENABLED and trainer.cfg.SOLVER.MAX_ITER == cfg.SOLVER.MAX_ITER
    cfg = _amp_cfg(shapes_dataset, tmp_path, max_iter=1)
    cfg.SOLVER.AMP.ENABLED = False
    assert not train_net.Trainer(cfg)._cpu_bfloat16


class _LossHistory(HookBase):
    def __init__(self):
        self.values = []

    def after_step(self):
        storage = self.trainer.storage
        self.values.append({k: storage.history(k).latest() for k in ("loss_cate", "loss_mask")})


def test_amp_trainer_steps_under_cpu_autocast_give_finite_losses(
    shapes_dataset, tmp_path, capture_mask_logits
):
    """train_net.Trainer with SOLVER.AMP.ENABLED on the CPU, 4 steps: the heads' outputs are
    bfloat16 (autocast is on), the mask logits of the loss float32, the losses finite and the
    weights updated and finite."""
    torch.manual_seed(0)
    trainer = train_net.Trainer(_amp_cfg(shapes_dataset, tmp_path, max_iter=4))
    assert type(trainer._trainer) is SimpleTrainer
    history = _LossHistory()
    trainer.register_hooks([history])
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.resume_or_load(resume=False)
    trainer.train()

    assert len(history.values) == 4
    for values in history.values:
        assert all(math.isfinite(v) and v > 0 for v in values.values()), history.values
    assert capture_mask_logits and all(
        seen == {"category": torch.bfloat16, "mask": torch.float32} for seen in capture_mask_logits
    )
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
