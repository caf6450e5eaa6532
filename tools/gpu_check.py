#!/usr/bin/env python
"""Manual check on a CUDA machine: mixed-precision training and CUDA inference of the tiny model.

    .venv/bin/python tools/gpu_check.py [--iterations 60]

CI has no GPU and Detectron2 v0.6's AMPTrainer asserts CUDA, so tests/test_amp.py covers half
precision on the CPU only (bfloat16 autocast). This script checks, on CUDA:

1. one batch through the tiny test model (tests/conftest.py) in float32 and under float16
   autocast: the mask logits are float32, the losses finite and within 1% of float32;
2. train_net.Trainer with SOLVER.AMP.ENABLED (Detectron2's AMPTrainer: autocast + GradScaler)
   and without, from the same seed on a generated shapes split: every AMP loss finite, the
   first iteration's losses within 1% (same weights, same batch), the last five iterations'
   mean within 25% (the trajectories part: GradScaler skips its first overflowing steps);
3. the AMP-trained weights in eval mode on CUDA and on the CPU (TF32 off, score and update
   thresholds lowered to 0.03): the heads' outputs within 1e-4 of their range, and the same
   instances (classes, scores within 2e-3, mask IoU >= 0.97) apart from ones whose score lies
   within 0.01 of a threshold; at least one instance compared.

``--device cpu`` runs what a CPU allows (bfloat16 autocast in 1, no AMP run in 2, the float32
weights CPU against CPU in 3): a check of the script itself, not of CUDA. Exits non-zero on the
first failure.
"""

import argparse
import copy
import dataclasses
import logging
import os
import sys
import tempfile
import uuid

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.engine import HookBase  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

import solov2_d2.modeling.solov2 as solov2_module  # noqa: E402
import train_net  # noqa: E402
from solov2_d2.data import register_shapes_dataset  # noqa: E402
from tests.conftest import tiny_cfg  # noqa: E402
from tests.test_solov2_model import synthetic_input  # noqa: E402

LOSS_NAMES = ("loss_cate", "loss_mask")


def check(condition, message):
    print(("ok    " if condition else "FAIL  ") + message, flush=True)
    if not condition:
        sys.exit(1)


def relative_difference(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def check_autocast_forward(device, autocast_dtype):
    cfg = tiny_cfg()
    cfg.MODEL.DEVICE = device
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = [synthetic_input(), synthetic_input(polygons=True, width=80)]
    mask_dtypes = []
    losses_function = solov2_module.solov2_losses

    def recording_losses(category_logits, category_targets, mask_logits, *args, **kwargs):
        mask_dtypes.append(mask_logits.dtype)
        return losses_function(category_logits, category_targets, mask_logits, *args, **kwargs)

    solov2_module.solov2_losses = recording_losses
    try:
        reference = model(batch)
        with torch.autocast(device, dtype=autocast_dtype):
            mixed = model(batch)
    finally:
        solov2_module.solov2_losses = losses_function
    check(mask_dtypes[-1] == torch.float32, f"mask logits under autocast: {mask_dtypes[-1]}")
    for name in LOSS_NAMES:
        value, expected = mixed[name].item(), reference[name].item()
        check(
            mixed[name].dtype == torch.float32
            and torch.isfinite(mixed[name])
            and relative_difference(value, expected) < 0.01,
            f"{name} under {autocast_dtype} autocast {value:.6f}, float32 {expected:.6f}",
        )


class LossHistory(HookBase):
    def __init__(self):
        self.values = []

    def after_step(self):
        self.values.append({k: self.trainer.storage.history(k).latest() for k in LOSS_NAMES})


def train(dataset, output_dir, device, iterations, amp):
    cfg = tiny_cfg(num_classes=6)
    cfg.MODEL.DEVICE = device
    cfg.DATASETS.TRAIN = (dataset,)
    cfg.DATASETS.TEST = ()
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.INPUT.MIN_SIZE_TRAIN = (96,)
    cfg.INPUT.MAX_SIZE_TRAIN = 128
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.SOLVER.MAX_ITER = iterations
    cfg.SOLVER.WARMUP_ITERS = 5
    cfg.SOLVER.STEPS = ()
    cfg.SOLVER.CHECKPOINT_PERIOD = 10**6
    cfg.SOLVER.AMP.ENABLED = amp
    cfg.SEED = 3
    cfg.OUTPUT_DIR = output_dir
    torch.manual_seed(0)
    trainer = train_net.Trainer(cfg)
    history = LossHistory()
    trainer.register_hooks([history])
    trainer.resume_or_load(resume=False)
    trainer.train()
    scale = trainer._trainer.grad_scaler.get_scale() if amp else None
    return trainer.model, history.values, scale


def check_training(device, iterations, workdir):
    dataset = "gpu_check_shapes_" + uuid.uuid4().hex[:8]
    register_shapes_dataset(
        dataset, root=os.path.join(workdir, "shapes"), num_images=32, seed=0, max_side=128
    )
    try:
        fp32_model, full_precision, _ = train(
            dataset, os.path.join(workdir, "fp32"), device, iterations, amp=False
        )
        if device != "cuda":
            print("skip  AMP training: Detectron2's AMPTrainer requires CUDA", flush=True)
            return fp32_model
        model, mixed, scale = train(
            dataset, os.path.join(workdir, "amp"), device, iterations, amp=True
        )
    finally:
        DatasetCatalog.remove(dataset)
        MetadataCatalog.remove(dataset)
    print(f"      GradScaler scale after {iterations} iterations: {scale}")
    check_training_losses(mixed, full_precision, iterations)
    return model


def check_training_losses(mixed, full_precision, iterations):
    for i, (amp_values, fp32_values) in enumerate(zip(mixed, full_precision)):
        print(
            f"      iteration {i}: "
            + "  ".join(
                f"{name} AMP {amp_values[name]:.5f} float32 {fp32_values[name]:.5f}"
                for name in LOSS_NAMES
            )
        )
    check(
        len(mixed) == iterations
        and all(torch.isfinite(torch.tensor(list(v.values()))).all() for v in mixed),
        f"{iterations} AMP iterations, every loss finite",
    )
    for name in LOSS_NAMES:
        first_amp, first_fp32 = mixed[0][name], full_precision[0][name]
        check(
            relative_difference(first_amp, first_fp32) < 0.01,
            f"first-iteration {name}: AMP {first_amp:.6f}, float32 {first_fp32:.6f}",
        )
        last_amp = sum(v[name] for v in mixed[-5:]) / 5
        last_fp32 = sum(v[name] for v in full_precision[-5:]) / 5
        check(
            relative_difference(last_amp, last_fp32) < 0.25,
            f"last-5 mean {name}: AMP {last_amp:.6f}, float32 {last_fp32:.6f}",
        )


def head_outputs(model, batch):
    outputs = {}

    def keep(name):
        def hook(module, args, output):
            outputs[name] = output

        return hook

    handles = [
        model.ins_head.register_forward_hook(keep("ins_head")),
        model.mask_head.register_forward_hook(keep("mask_head")),
    ]
    try:
        with torch.no_grad():
            results = model(batch)
    finally:
        for handle in handles:
            handle.remove()
    (category_logits, kernels), mask_feature = outputs["ins_head"], outputs["mask_head"]
    return list(category_logits) + list(kernels) + [mask_feature], results


def comparable(instances, params, margin=0.01):
    """The instances whose score is clear of the score and update thresholds, best first."""
    scores = instances.scores
    clear = ((scores - params.score_threshold).abs() > margin) & (
        (scores - params.update_threshold).abs() > margin
    )
    kept = instances[clear]
    return kept[kept.scores.argsort(descending=True)]


def check_inference(model, device):
    # TF32 (on by default for cuDNN convolutions) would leave only ~3 significant digits.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = model.eval()
    # Lower thresholds than the config's 0.1 / 0.05: a model trained for a few dozen iterations
    # scores few cells that high, and the comparison needs instances.
    model.inference_params = dataclasses.replace(
        model.inference_params, score_threshold=0.03, update_threshold=0.03
    )
    on_cpu = copy.deepcopy(model).to("cpu")
    batch = [synthetic_input(96, 128), synthetic_input(polygons=True, width=112)]
    device_heads, device_results = head_outputs(model, batch)
    cpu_heads, cpu_results = head_outputs(on_cpu, batch)
    worst = max(
        ((a.cpu() - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
        for a, b in zip(device_heads, cpu_heads)
    )
    check(worst < 1e-4, f"head outputs {device} vs CPU: largest difference {worst:.2e} of range")
    compared = 0
    for image, (ours, theirs) in enumerate(zip(device_results, cpu_results)):
        a = comparable(ours["instances"].to("cpu"), model.inference_params)
        b = comparable(theirs["instances"], model.inference_params)
        check(
            len(a) == len(b), f"image {image}: {len(a)} vs {len(b)} instances clear of thresholds"
        )
        compared += len(a)
        if len(a) == 0:
            continue
        intersection = (a.pred_masks & b.pred_masks).flatten(1).sum(1).float()
        union = (a.pred_masks | b.pred_masks).flatten(1).sum(1).float().clamp_min(1)
        check(
            torch.equal(a.pred_classes, b.pred_classes)
            and (a.scores - b.scores).abs().max() < 2e-3
            and (intersection / union).min() >= 0.97,
            f"image {image}: same classes, scores within 2e-3, mask IoU >= 0.97 "
            f"(min {(intersection / union).min():.4f})",
        )
    check(compared > 0, f"{compared} instances compared (if none: more --iterations)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available here (use --device cpu to check the script itself)")
    print(f"torch {torch.__version__}, device {args.device}", flush=True)
    # Detectron2's INFO log (model printout, metrics every 20 iterations) would bury the check
    # lines; setup_logger is cached, so the trainer's own call keeps this level.
    setup_logger()
    logging.getLogger("detectron2").setLevel(logging.WARNING)
    autocast_dtype = torch.float16 if args.device == "cuda" else torch.bfloat16
    check_autocast_forward(args.device, autocast_dtype)
    with tempfile.TemporaryDirectory() as workdir:
        model = check_training(args.device, args.iterations, workdir)
    check_inference(model, args.device)
    print("all checks passed")


if __name__ == "__main__":
    main()
