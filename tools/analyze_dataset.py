#!/usr/bin/env python
"""How a registered dataset meets a config's grids and scale ranges, and what to set instead.

python tools/analyze_dataset.py --dataset solov2_shapes_train \
    --config-file configs/SOLOv2_demo_cpu.yaml
python tools/analyze_dataset.py --dataset my_train --config-file my.yaml --resize test \
    --histogram scales.png

For every object, after the config's resize (``--resize train``: ResizeShortestEdge to each of
INPUT.MIN_SIZE_TRAIN, capped at MAX_SIZE_TRAIN, as the training mapper picks one of them;
``--resize test``: MIN_SIZE_TEST / MAX_SIZE_TEST), this counts:

* its scale sqrt(w * h) of the box, against MODEL.SOLOV2.FPN_SCALE_RANGES: which levels train it,
  and whether it falls outside every range (then the target assigner clamps it into the first or
  last level);
* whether its box is thinner than one mask-feature pixel (4 input pixels): its mask target is
  then a sliver or nothing at 1/4 resolution, a usual reason for missed small objects;
* how many grid cells of each level its center region makes positive, with the very rule training
  uses (solov2_d2.modeling.target_assigner.assign_targets_single_image, SIGMA, the 3 x 3 clip);

then suggests NUM_GRIDS and FPN_SCALE_RANGES with the reason, and writes a histogram of the scales
with the ranges drawn over it.
"""

import argparse
import math
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.data import detection_utils as d2_utils  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402

from solov2_d2.modeling.target_assigner import assign_targets_single_image  # noqa: E402

# SOLO's COCO recipe (configs/Base-SOLOv2.yaml): grids and ranges tuned for a short side of 800.
COCO_SHORT_SIDE = 800
COCO_NUM_GRIDS = (40, 36, 24, 16, 12)
COCO_SCALE_RANGES = ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))
MASK_STRIDE = 4  # the unified mask feature is at 1/4 of the input (SOLOv2 Sec. 3.2)


@dataclass(frozen=True)
class Settings:
    """What the counting needs from a config, for one resize."""

    num_grids: Tuple[int, ...]
    scale_ranges: Tuple[Tuple[float, float], ...]
    sigma: float
    num_classes: int
    short_side: int
    max_size: int
    size_divisibility: int = 32
    instance_strides: Tuple[int, ...] = (8, 8, 16, 32, 32)
    mask_stride: int = MASK_STRIDE


def settings_from_config(cfg, resize: str = "train") -> List[Settings]:
    """One Settings per short side the config's resize can produce (``resize`` train or test)."""
    sol = cfg.MODEL.SOLOV2
    if resize == "train":
        if cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "range":
            low, high = cfg.INPUT.MIN_SIZE_TRAIN
            short_sides = sorted({int(low), int(high)})  # the two ends of the range
        else:
            short_sides = sorted({int(s) for s in cfg.INPUT.MIN_SIZE_TRAIN})
        max_size = int(cfg.INPUT.MAX_SIZE_TRAIN)
    elif resize == "test":
        short_sides, max_size = [int(cfg.INPUT.MIN_SIZE_TEST)], int(cfg.INPUT.MAX_SIZE_TEST)
    else:
        raise ValueError(f"resize must be 'train' or 'test', got {resize!r}")
    return [
        Settings(
            num_grids=tuple(int(s) for s in sol.NUM_GRIDS),
            scale_ranges=tuple((float(lo), float(hi)) for lo, hi in sol.FPN_SCALE_RANGES),
            sigma=float(sol.SIGMA),
            num_classes=int(sol.NUM_CLASSES),
            short_side=short,
            max_size=max_size,
            # The FPN pads to 32 (ResNet-FPN's size_divisibility); the grids cover the padded
            # image, as in training.
            size_divisibility=32,
            instance_strides=tuple(int(s) for s in sol.FPN_INSTANCE_STRIDES),
        )
        for short in short_sides
    ]


def image_objects(record: dict, settings: Settings):
    """(scales, min_sides, cells) of the objects of one dataset dict after the resize:
    float64 (K,) sqrt(w * h) and min(w, h) of the boxes in resized pixels, and int64 (K, L) the
    number of positive grid cells of each object on each level, from the target assigner."""
    height, width = int(record["height"]), int(record["width"])
    new_h, new_w = T.ResizeShortestEdge.get_output_shape(
        height, width, settings.short_side, settings.max_size
    )
    transforms = T.TransformList([T.ResizeTransform(height, width, new_h, new_w)])
    annotations = [
        d2_utils.transform_instance_annotations(dict(a), transforms, (new_h, new_w))
        for a in record.get("annotations", [])
        if not a.get("iscrowd", 0)
    ]
    levels = len(settings.num_grids)
    if not annotations:
        return np.zeros(0), np.zeros(0), np.zeros((0, levels), dtype=np.int64)
    instances = d2_utils.annotations_to_instances(
        annotations, (new_h, new_w), mask_format="bitmask"
    )
    boxes = instances.gt_boxes.tensor
    sides = (boxes[:, 2:] - boxes[:, :2]).double()
    scales = torch.sqrt(sides[:, 0] * sides[:, 1]).numpy()
    min_sides = sides.min(dim=1).values.numpy()
    divisor = settings.size_divisibility
    padded = (math.ceil(new_h / divisor) * divisor, math.ceil(new_w / divisor) * divisor)
    classes = instances.gt_classes.clamp(0, settings.num_classes - 1)  # classes do not matter
    targets = assign_targets_single_image(
        instances.gt_masks.tensor,
        boxes,
        classes,
        padded,
        settings.num_grids,
        settings.scale_ranges,
        settings.sigma,
        settings.num_classes,
        settings.mask_stride,
    )
    cells = np.stack(
        [
            torch.bincount(owners, minlength=len(annotations)).numpy()
            for owners in targets.positive_instances
        ],
        axis=1,
    )
    return scales, min_sides, cells


def analyze(records: Sequence[dict], settings: Settings) -> Dict[str, object]:
    """Counts over a dataset for one Settings. Keys:

    objects, images; scales (float64 array); below / above / gap: objects whose scale is under
    the smallest lower bound, over the largest upper bound, or between two ranges; outside (their
    sum); thinner_than_mask_pixel: boxes with min(w, h) < mask_stride; without_cells: objects no
    level gives a cell (an empty mask after the resize); levels: per level {"grid", "range",
    "in_range" (scale inside the range), "objects" (with >= 1 cell there, clamped ones included),
    "cells" (total), "cells_per_object" (min, median, max over those objects)}.
    """
    all_scales, all_min_sides, all_cells = [], [], []
    for record in records:
        scales, min_sides, cells = image_objects(record, settings)
        all_scales.append(scales)
        all_min_sides.append(min_sides)
        all_cells.append(cells)
    levels = len(settings.num_grids)
    scales = np.concatenate(all_scales) if all_scales else np.zeros(0)
    min_sides = np.concatenate(all_min_sides) if all_min_sides else np.zeros(0)
    cells = np.concatenate(all_cells) if all_cells else np.zeros((0, levels), dtype=np.int64)
    lowest = min(lo for lo, _ in settings.scale_ranges)
    highest = max(hi for _, hi in settings.scale_ranges)
    in_range = np.stack(
        [(scales >= lo) & (scales <= hi) for lo, hi in settings.scale_ranges], axis=1
    ).reshape(len(scales), levels)
    outside = ~in_range.any(axis=1)
    below, above = outside & (scales < lowest), outside & (scales > highest)
    level_stats = []
    for level, (grid, scale_range) in enumerate(zip(settings.num_grids, settings.scale_ranges)):
        owned = cells[:, level][cells[:, level] > 0]
        level_stats.append(
            {
                "grid": grid,
                "range": scale_range,
                "in_range": int(in_range[:, level].sum()),
                "objects": int(len(owned)),
                "cells": int(owned.sum()),
                "cells_per_object": (
                    (int(owned.min()), float(np.median(owned)), int(owned.max()))
                    if len(owned)
                    else None
                ),
            }
        )
    return {
        "images": len(records),
        "objects": int(len(scales)),
        "scales": scales,
        "below": int(below.sum()),
        "above": int(above.sum()),
        "gap": int((outside & ~below & ~above).sum()),
        "outside": int(outside.sum()),
        "thinner_than_mask_pixel": int((min_sides < settings.mask_stride).sum()),
        "without_cells": int((cells.sum(axis=1) == 0).sum()),
        "levels": level_stats,
    }


def suggest(settings: Settings, max_scale: float) -> Tuple[Tuple[int, ...], tuple, List[str]]:
    """(NUM_GRIDS, FPN_SCALE_RANGES, reasons) for images resized to ``settings.short_side``.

    Ranges: SOLO's COCO ranges are tuned for a short side of 800 and an object's scale grows
    with the resize, so they are scaled by short_side / 800 (lowest bound kept at 1, highest at
    least the largest scale seen). Grids: a grid counts cells across the image, so SOLO's COCO
    grids stay meaningful at any image size, except that a level's grid finer than its feature map
    (padded short side / FPN_INSTANCE_STRIDES) only repeats feature pixels: capped there.
    """
    levels = len(settings.num_grids)
    if levels != len(COCO_NUM_GRIDS):
        raise ValueError(f"suggestions assume SOLO's 5 FPN levels, the config has {levels}")
    factor = settings.short_side / COCO_SHORT_SIDE
    ranges = [[round(lo * factor), round(hi * factor)] for lo, hi in COCO_SCALE_RANGES]
    ranges[0][0] = 1
    ranges[-1][1] = max(ranges[-1][1], 2048, int(math.ceil(max_scale)))
    divisor = settings.size_divisibility
    padded_short = math.ceil(settings.short_side / divisor) * divisor
    feature_sides = [padded_short // stride for stride in settings.instance_strides]
    grids = tuple(min(g, side) for g, side in zip(COCO_NUM_GRIDS, feature_sides))
    reasons = [
        f"FPN_SCALE_RANGES: SOLO's COCO ranges x {settings.short_side}/{COCO_SHORT_SIDE} "
        "(they are tuned for a short side of 800; object scales shrink with the resize), "
        "lowest bound 1 and highest >= the largest object so that none falls outside",
        f"NUM_GRIDS: SOLO's COCO grids {list(COCO_NUM_GRIDS)} (cells across the image, "
        "independent of its size) capped at each level's feature size "
        f"{feature_sides} (padded short side {padded_short} / strides "
        f"{list(settings.instance_strides)}): a finer grid only repeats feature pixels",
    ]
    return grids, tuple(tuple(r) for r in ranges), reasons


def _fmt_range(scale_range) -> str:
    return "{:g}-{:g}".format(*scale_range)


def format_report(name: str, settings: Settings, stats: Dict[str, object]) -> str:
    """The analysis as plain-text tables."""
    scales = stats["scales"]
    objects = stats["objects"]
    lines = [
        f"{name}: {stats['images']} images, {objects} objects; resized to short side "
        f"{settings.short_side} (max {settings.max_size}); SIGMA {settings.sigma:g}",
    ]
    if objects:
        quantiles = np.percentile(scales, [0, 1, 5, 25, 50, 75, 95, 99, 100])
        lines.append(
            "object scale sqrt(w*h) in px: "
            + ", ".join(
                f"{label} {value:.1f}"
                for label, value in zip(
                    ("min", "p1", "p5", "p25", "median", "p75", "p95", "p99", "max"), quantiles
                )
            )
        )

    def share(count):
        return f"{count} ({100.0 * count / objects:.1f}%)" if objects else str(count)

    header = f"{'level':>5}  {'grid':>4}  {'range':>9}  {'in range':>15}  {'trained':>15}  "
    header += f"{'cells':>6}  {'cells/object min/median/max':>27}"
    lines += ["", header]
    for level, entry in enumerate(stats["levels"]):
        per_object = entry["cells_per_object"]
        per_object = "{} / {:g} / {}".format(*per_object) if per_object else "-"
        lines.append(
            f"{level:>5}  {entry['grid']:>4}  {_fmt_range(entry['range']):>9}  "
            f"{share(entry['in_range']):>15}  {share(entry['objects']):>15}  "
            f"{entry['cells']:>6}  {per_object:>27}"
        )
    lines += [
        "",
        f"outside every range: {share(stats['outside'])} (below {stats['below']}, above "
        f"{stats['above']}, between ranges {stats['gap']}); training clamps them into the first "
        "or last level",
        f"thinner than a mask-feature pixel (min(w, h) < {settings.mask_stride} px): "
        f"{share(stats['thinner_than_mask_pixel'])}",
        f"without any positive cell (empty mask after the resize): {share(stats['without_cells'])}",
    ]
    return "\n".join(lines)


def plot_histogram(scales: np.ndarray, scale_ranges, path: str, title: str = "") -> None:
    """Histogram of the object scales (log bins) with each level's range as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    positive = scales[scales > 0]
    low = max(0.5, float(positive.min()) / 1.2) if len(positive) else 1.0
    high = max(float(positive.max()) * 1.2, low * 2) if len(positive) else 100.0
    bins = np.geomspace(low, high, 40)
    axis.hist(positive, bins=bins, color="0.35", zorder=3)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    top = axis.get_ylim()[1]
    for level, (lo, hi) in enumerate(scale_ranges):
        color = colors[level % len(colors)]
        axis.axvspan(max(lo, low), min(hi, high), color=color, alpha=0.12, zorder=1)
        axis.plot([max(lo, low), min(hi, high)], [top * (0.97 - 0.05 * level)] * 2, color=color,
                  linewidth=3, label=f"level {level}: {_fmt_range((lo, hi))}")  # fmt: skip
    axis.axvline(MASK_STRIDE, color="k", linestyle="--", label="one mask-feature pixel (4 px)")
    axis.set_xscale("log")
    axis.set_xlim(low, high)
    axis.set_xlabel("object scale sqrt(w*h) after the resize (px)")
    axis.set_ylabel("objects")
    axis.legend(fontsize=8, loc="upper right")
    if title:
        axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _load_config(config_file: Optional[str], opts: Sequence[str]):
    from detectron2.config import get_cfg

    from solov2_d2 import add_solov2_config

    cfg = get_cfg()
    add_solov2_config(cfg)
    cfg.merge_from_file(config_file or os.path.join(ROOT, "configs", "Base-SOLOv2.yaml"))
    cfg.merge_from_list(list(opts))
    return cfg


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, help="a name registered in DatasetCatalog")
    parser.add_argument(
        "--config-file", default=None, help="default: configs/Base-SOLOv2.yaml (COCO)"
    )
    parser.add_argument("--resize", choices=("train", "test"), default="train")
    parser.add_argument(
        "--histogram",
        default=None,
        help="PNG to write; default output/analyze_dataset/<dataset>_scales.png",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)

    import solov2_d2.data  # noqa: F401  (registers the built-in shapes datasets)

    if args.dataset not in DatasetCatalog.list():
        parser.error(
            f"dataset {args.dataset!r} is not registered; registered: "
            + ", ".join(sorted(DatasetCatalog.list()))
        )
    cfg = _load_config(args.config_file, args.opts)
    records = DatasetCatalog.get(args.dataset)
    if not records:
        parser.error(f"dataset {args.dataset!r} is empty")
    histogram = args.histogram or os.path.join(
        ROOT, "output", "analyze_dataset", f"{args.dataset}_scales.png"
    )
    os.makedirs(os.path.dirname(os.path.abspath(histogram)), exist_ok=True)
    for settings in settings_from_config(cfg, args.resize):
        stats = analyze(records, settings)
        print(format_report(args.dataset, settings, stats))
        grids, ranges, reasons = suggest(settings, float(np.max(stats["scales"], initial=0)))
        print("\nsuggested (short side {}):".format(settings.short_side))
        print("  MODEL.SOLOV2.NUM_GRIDS: {}".format(list(grids)))
        print(
            "  MODEL.SOLOV2.FPN_SCALE_RANGES: ({})".format(
                ", ".join("({}, {})".format(lo, hi) for lo, hi in ranges)
            )
        )
        for reason in reasons:
            print("  - " + reason)
        print(
            "  (a starting point from the object sizes, not a trained result: on the built-in "
            "shapes data the demo's own grids scored higher, see the README)"
        )
        with_suggestion = suggested_settings(settings, grids, ranges)
        print("\nwith the suggestion:")
        print(format_report(args.dataset, with_suggestion, analyze(records, with_suggestion)))
        path = histogram
        if len(settings_from_config(cfg, args.resize)) > 1:
            path = os.path.splitext(histogram)[0] + f"_{settings.short_side}.png"
        plot_histogram(
            stats["scales"],
            settings.scale_ranges,
            path,
            title=f"{args.dataset}, short side {settings.short_side}",
        )
        print(f"\nhistogram: {path}\n")
    return 0


def suggested_settings(settings: Settings, grids, ranges) -> Settings:
    return Settings(**{**settings.__dict__, "num_grids": tuple(grids), "scale_ranges": ranges})


if __name__ == "__main__":
    sys.exit(main())
