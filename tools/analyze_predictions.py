#!/usr/bin/env python
"""Where a model's mask AP is lost: missed objects, wrong classes, or object sizes.

python tools/analyze_predictions.py \
    --gt datasets/solov2_shapes/annotations/instances_val.json \
    --results output/demo/inference/solov2_shapes_val/coco_instances_results.json

For the COCO segmentation results that Detectron2's COCOEvaluator writes, against the COCO json
they were evaluated on, this reports per object-area bin (pixels of the annotation's ``area``):

* found: the share of ground-truth objects that some prediction overlaps with mask IoU >= 0.5
  (whatever its class): what the masks and the grid cells achieve;
* class right: of the found objects, the share whose highest-scoring such prediction has the
  ground truth's class: what the category branch achieves (chance is 1 / number of classes);
* the median over all objects of the best mask IoU any prediction reaches;

and the segm AP twice, class-aware (COCOeval as COCOEvaluator runs it) and with every class
merged into one ("agnostic"), over all objects and over objects of at least ``--min-area``.
The README's demo runs table reports these columns.
"""

import argparse
import contextlib
import copy
import io
import json
from collections import defaultdict
from typing import Dict, List, Sequence

import numpy as np
import pycocotools.mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

DEFAULT_AREA_BINS = (100.0, 400.0, 1600.0)
FOUND_IOU = 0.5


def _ground_truth_rles(annotation: Dict, height: int, width: int):
    segmentation = annotation["segmentation"]
    if isinstance(segmentation, list):  # polygons
        return mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):  # uncompressed RLE
        return mask_util.frPyObjects(segmentation, height, width)
    return segmentation


def segm_ap(gt: Dict, results: List[Dict], min_area: float = 0.0, agnostic: bool = False) -> float:
    """COCO segm AP (IoU 0.50:0.95, 100 detections), in percent, over objects of at least
    ``min_area`` px (COCOeval's area range, so smaller objects and detections are ignored, not
    counted as misses); ``agnostic``: every class merged into the first category."""
    if agnostic:
        gt = copy.deepcopy(gt)
        merged_id = gt["categories"][0]["id"]
        gt["categories"] = [gt["categories"][0]]
        for annotation in gt["annotations"]:
            annotation["category_id"] = merged_id
        results = [dict(r, category_id=merged_id) for r in results]
    if not results:
        return 0.0
    coco_gt = COCO()
    coco_gt.dataset = gt
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        evaluator = COCOeval(coco_gt, coco_dt, "segm")
        evaluator.params.areaRng = [[float(min_area), 1e10]]
        evaluator.params.areaRngLbl = ["all"]
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # [iou, recall, class]
    valid = precision[precision > -1]
    return float(100.0 * valid.mean()) if valid.size else float("nan")


def analyze(
    gt: Dict,
    results: List[Dict],
    area_bins: Sequence[float] = DEFAULT_AREA_BINS,
    min_area: float = 256.0,
) -> Dict:
    """The report as a dict (see the module docstring); ``area_bins`` are the bin edges."""
    images = {image["id"]: image for image in gt["images"]}
    gt_by_image, results_by_image = defaultdict(list), defaultdict(list)
    for annotation in gt["annotations"]:
        if not annotation.get("iscrowd", 0):
            gt_by_image[annotation["image_id"]].append(annotation)
    for result in results:
        results_by_image[result["image_id"]].append(result)

    edges = [0.0] + [float(e) for e in area_bins] + [float("inf")]
    rows = []  # (area, found, class right, best IoU) per ground-truth object
    for image_id, annotations in gt_by_image.items():
        height, width = images[image_id]["height"], images[image_id]["width"]
        gt_rles = [_ground_truth_rles(a, height, width) for a in annotations]
        predictions = results_by_image.get(image_id, [])
        if predictions:
            ious = mask_util.iou(
                [p["segmentation"] for p in predictions], gt_rles, [0] * len(gt_rles)
            )
            ious = np.asarray(ious, dtype=np.float64).reshape(len(predictions), len(gt_rles))
        else:
            ious = np.zeros((0, len(gt_rles)))
        for j, annotation in enumerate(annotations):
            column = ious[:, j]
            matches = np.flatnonzero(column >= FOUND_IOU)
            right = False
            if matches.size:
                best = matches[np.argmax([predictions[k]["score"] for k in matches])]
                right = predictions[best]["category_id"] == annotation["category_id"]
            best_iou = float(column.max()) if column.size else 0.0
            rows.append((float(annotation["area"]), bool(matches.size), right, best_iou))

    bins = []
    for low, high in zip(edges[:-1], edges[1:]):
        inside = [r for r in rows if low <= r[0] < high]
        found = sum(r[1] for r in inside)
        bins.append(
            {
                "area_range": [low, high],
                "objects": len(inside),
                "found": found / len(inside) if inside else float("nan"),
                "class_right": sum(r[2] for r in inside) / found if found else float("nan"),
            }
        )
    found = sum(r[1] for r in rows)
    return {
        "objects": len(rows),
        "found": found / len(rows) if rows else float("nan"),
        "class_right": sum(r[2] for r in rows) / found if found else float("nan"),
        "median_best_iou": float(np.median([r[3] for r in rows])) if rows else float("nan"),
        "bins": bins,
        "segm_AP": segm_ap(gt, results),
        "segm_AP_agnostic": segm_ap(gt, results, agnostic=True),
        "min_area": float(min_area),
        "segm_AP_min_area": segm_ap(gt, results, min_area=min_area),
        "segm_AP_agnostic_min_area": segm_ap(gt, results, min_area=min_area, agnostic=True),
    }


def format_report(report: Dict) -> str:
    lines = [
        "| object area (px) | objects | found (mask IoU >= 0.5) | class right (of found) |",
        "|---|---:|---:|---:|",
    ]
    for b in report["bins"] + [
        {"area_range": ["all", ""], **{k: report[k] for k in ("objects", "found", "class_right")}}
    ]:
        low, high = b["area_range"]
        label = "all" if low == "all" else "{:g}-{:g}".format(low, high)
        lines.append(
            "| {} | {} | {:.0%} | {:.0%} |".format(
                label, b["objects"], b["found"], b["class_right"]
            )
        )
    lines += [
        "",
        "median best mask IoU: {:.2f}".format(report["median_best_iou"]),
        "segm AP {:.1f}, classes merged {:.1f}; "
        "over objects >= {:g} px: {:.1f}, merged {:.1f}".format(
            report["segm_AP"],
            report["segm_AP_agnostic"],
            report["min_area"],
            report["segm_AP_min_area"],
            report["segm_AP_agnostic_min_area"],
        ),
    ]
    return "\n".join(lines)


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gt", required=True, help="the COCO json the results were scored on")
    parser.add_argument("--results", required=True, help="coco_instances_results.json")
    parser.add_argument(
        "--area-bins", type=float, nargs="+", default=list(DEFAULT_AREA_BINS), help="bin edges"
    )
    parser.add_argument("--min-area", type=float, default=256.0)
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    with open(args.gt) as f:
        gt = json.load(f)
    with open(args.results) as f:
        results = json.load(f)
    known = {image["id"] for image in gt["images"]}
    unknown = sorted({r["image_id"] for r in results} - known)
    if unknown:
        parser.error(
            "{} has predictions for image ids {} that {} does not have: not the json these "
            "results were evaluated on?".format(args.results, unknown[:5], args.gt)
        )
    report = analyze(gt, results, sorted(args.area_bins), args.min_area)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
