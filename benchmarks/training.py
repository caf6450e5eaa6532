#!/usr/bin/env python
"""One SOLOv2 training step, stage by stage: R50-FPN, batch 2 at 512 px, synthetic instances.

Model: configs/SOLOv2_R50_1x.yaml with MODEL.WEIGHTS "" (random weights, seed 0; FrozenBN
statistics calibrated on the first image as in benchmarks/inference.py, so that activations
and losses are those of a sane network), in training mode with the config's frozen stem and
res2 (BACKBONE.FREEZE_AT 2). Inputs: two 512 x 768 synthetic images, each with 8 random
ellipses / rectangles (``common.synthetic_scene``) as ground-truth instances of random classes
(BitMasks, boxes from the masks; shapes hidden by later ones are dropped).

Each step is split into

- forward: preprocess, backbone+FPN, kernel/category head and mask-feature head
  (``common.forward_to_heads``: the model's public pieces, as ``SOLOv2.forward`` calls them);
- target assignment: ``assign_targets_single_image`` for each image, with the arguments
  ``SOLOv2.losses`` gives it (the model's ``num_grids``, ``scale_ranges``, ``sigma``,
  ``num_classes``), called on its own right after each step, so that the step runs the
  model's code untouched;
- loss: the rest of ``SOLOv2.losses`` (its time minus the target assignment's): positive
  kernels, their masks as one matmul, focal and dice losses;
- backward: ``sum(losses).backward()``;
- optimizer: an SGD step (momentum 0.9, the config's weight decay, and the learning rate of the
  schedule's first iteration, BASE_LR x WARMUP_FACTOR: at the full rate a randomly initialized
  model diverges within a step and its mask logits saturate).

The table gives the median of each stage and of the step totals over the timed steps, after
warm-up steps.

    .venv/bin/python benchmarks/training.py            # full run (minutes)
    .venv/bin/python benchmarks/training.py --quick    # smoke run
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    ROOT,
    PeakMemory,
    StageTimer,
    add_malloc_option,
    apply_malloc_option,
    calibrate_frozen_batchnorm,
    forward_to_heads,
    load_average,
    machine_header,
    markdown_table,
    medians_ms,
    synchronize,
    synthetic_scene,
    write_report,
)
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402

from solov2_d2 import add_solov2_config  # noqa: E402
from solov2_d2.modeling.target_assigner import assign_targets_single_image  # noqa: E402

CONFIG = "configs/SOLOv2_R50_1x.yaml"
STAGES = ("forward", "target assignment", "loss", "backward", "optimizer")


def training_inputs(height, width, batch, num_shapes, num_classes):
    inputs = []
    for seed in range(batch):
        image, masks = synthetic_scene(height, width, seed, num_shapes)
        masks = masks[masks.flatten(1).any(dim=1)]
        generator = torch.Generator().manual_seed(100 + seed)
        instances = Instances((height, width))
        instances.gt_masks = BitMasks(masks)
        instances.gt_boxes = Boxes(BitMasks(masks).get_bounding_boxes().tensor)
        instances.gt_classes = torch.randint(0, num_classes, (len(masks),), generator=generator)
        inputs.append({"image": image, "instances": instances, "height": height, "width": width})
    return inputs


def assignment_seconds(model, gt_instances, padded_size, device) -> float:
    """Time of ``assign_targets_single_image`` for every image, with the arguments that
    ``SOLOv2.losses`` passes (the benchmark's ground truth is BitMasks already)."""
    synchronize(device)
    start = time.perf_counter()
    for instances in gt_instances:
        assign_targets_single_image(
            instances.gt_masks.tensor,
            instances.gt_boxes.tensor,
            instances.gt_classes,
            padded_size,
            model.num_grids,
            model.scale_ranges,
            model.sigma,
            model.num_classes,
        )
    synchronize(device)
    return time.perf_counter() - start


def train_step(model, optimizer, inputs, device):
    """SOLOv2.forward's training path, stage by stage; returns (losses, {stage: seconds})."""
    timer = StageTimer(device)
    heads = forward_to_heads(model, inputs, timer)
    forward = sum(timer.times.values())
    gt_instances = [x["instances"].to(device) for x in inputs]
    losses = model.losses(
        heads.category_logits, heads.kernel_preds, heads.mask_feature, gt_instances, heads.images
    )
    timer.mark("loss")
    total = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    timer.mark("backward")
    optimizer.step()
    timer.mark("optimizer")
    assignment = assignment_seconds(
        model, gt_instances, tuple(heads.images.tensor.shape[-2:]), device
    )
    times = dict(timer.times, forward=forward)
    times["target assignment"] = assignment
    times["loss"] -= assignment  # SOLOv2.losses ran the assignment too
    return {k: float(v) for k, v in losses.items()}, {stage: times[stage] for stage in STAGES}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--instances", type=int, default=8, help="shapes drawn per image")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up, 1 step")
    parser.add_argument("--no-write", action="store_true", help="print only")
    add_malloc_option(parser)
    args = parser.parse_args()
    allocator_note = apply_malloc_option(args)
    if args.quick:
        args.steps, args.warmup = 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available")

    header = machine_header(device) + allocator_note
    print(header, flush=True)
    cfg = get_cfg()
    add_solov2_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, CONFIG))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = args.device
    torch.manual_seed(0)
    model = build_model(cfg)
    inputs = training_inputs(
        args.height, args.width, args.batch, args.instances, cfg.MODEL.SOLOV2.NUM_CLASSES
    )
    calibrate_frozen_batchnorm(model, inputs[0])
    model.train()
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.SOLVER.BASE_LR * cfg.SOLVER.WARMUP_FACTOR,
        momentum=0.9,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
    )

    # The staged step must compute the model's own losses: check once (no update).
    reference = {k: float(v) for k, v in model(inputs).items()}
    losses, _ = train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), inputs, device)
    assert losses == reference, (losses, reference)

    start = time.time()
    for _ in range(args.warmup):
        train_step(model, optimizer, inputs, device)
    runs = []
    for step in range(args.steps):
        losses, times = train_step(model, optimizer, inputs, device)
        runs.append(times)
        print(f"step {step + 1}/{args.steps}: {losses}", file=sys.stderr, flush=True)
    with PeakMemory(device) as memory:
        train_step(model, optimizer, inputs, device)
    ms = medians_ms(runs)

    num_instances = [len(x["instances"]) for x in inputs]
    table = markdown_table(
        [f"{stage} (ms)" for stage in STAGES] + ["step (ms)", "peak memory (MiB)"],
        [[f"{ms[s]:.0f}" for s in STAGES] + [f"{ms['total']:.0f}", f"{memory.mib:.0f}"]],
    )
    shares = markdown_table(
        [f"{stage}" for stage in STAGES],
        [[f"{100 * ms[s] / ms['total']:.1f}%" for s in STAGES]],
    )
    share = ms["target assignment"] / ms["total"]
    body = "\n\n".join(
        [
            f"R50-FPN ({CONFIG}), batch {args.batch} of {args.height} x {args.width} synthetic "
            f"images with {num_instances} ground-truth instances; median of {args.steps} steps "
            f"after {args.warmup} warm-up step(s); stages: see the docstring of "
            f"benchmarks/training.py. Peak memory: {memory.method}, one extra step. Load "
            f"average at the end: {load_average():.2f}; wall time {time.time() - start:.0f} s.",
            table,
            "Share of the step:\n\n" + shares,
            f"Target: target assignment {100 * share:.2f}% of a training step (<= 5%: "
            f"{'met' if share <= 0.05 else 'NOT met'}).",
        ]
    )
    print()
    print(body)
    if args.quick or args.no_write:
        return
    suffix = "" if device.type == "cpu" else "_" + device.type
    suffix += "_default_malloc" if args.default_malloc else ""
    path = write_report(
        f"training{suffix}.md", "SOLOv2 training-step benchmark", "training.py", header, body
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
