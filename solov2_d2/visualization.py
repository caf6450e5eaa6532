"""Pictures of a training run: enlarged drawings, a GT | prediction contact sheet, a learning curve.

Everything is drawn with Detectron2's ``Visualizer``; only the arrangement is ours. Small images
(the demo's are 128-192 px) are drawn enlarged (``scale``), because the Visualizer's labels have a
minimum font size in output pixels: at scale 1 a label is larger than most objects.
"""

import contextlib
import json
import math
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util
from detectron2.structures import Instances
from detectron2.utils.visualizer import ColorMode, Visualizer

__all__ = [
    "fixed_colour_jitter",
    "draw_predictions",
    "draw_ground_truth",
    "enlarged",
    "match_instances",
    "contact_sheet",
    "read_metrics",
    "plot_learning_curve",
]

CAPTION_HEIGHT = 28  # output pixels of the caption strip under each GT | prediction pair
GAP = 8  # white pixels between panels and cells
MATCH_IOU = 0.5


@contextlib.contextmanager
def fixed_colour_jitter(seed: int = 0):
    """The Visualizer jitters each instance's colour (and picks colours for classes without
    ``thing_colors``) with NumPy's global generator: seed it while drawing, so that the same
    predictions give the same picture in every run, and restore the caller's state after."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _visualizer(image: np.ndarray, metadata, scale: float) -> Visualizer:
    # SEGMENTATION mode colours by class (metadata.thing_colors), so that a ground-truth object
    # and its prediction have (nearly) the same colour side by side.
    return Visualizer(image, metadata, scale=scale, instance_mode=ColorMode.SEGMENTATION)


def enlarged(image: np.ndarray, scale: float) -> np.ndarray:
    """The RGB image as the Visualizer renders it at ``scale`` with nothing drawn on it."""
    return Visualizer(image, None, scale=scale).output.get_image()


def draw_predictions(image: np.ndarray, instances: Instances, metadata, scale: float) -> np.ndarray:
    """RGB ``image`` (H, W, 3) with ``instances`` drawn, enlarged ``scale`` times (the same
    picture for the same instances in every run)."""
    with fixed_colour_jitter():
        return _visualizer(image, metadata, scale).draw_instance_predictions(instances).get_image()


def draw_ground_truth(image: np.ndarray, record: dict, metadata, scale: float) -> np.ndarray:
    """RGB ``image`` with the annotations of its dataset dict ``record`` drawn, enlarged (the
    same picture in every run)."""
    with fixed_colour_jitter():
        return _visualizer(image, metadata, scale).draw_dataset_dict(record).get_image()


def _ground_truth_masks(record: dict, height: int, width: int) -> List[np.ndarray]:
    masks = []
    for annotation in record.get("annotations", []):
        segmentation = annotation["segmentation"]
        if isinstance(segmentation, list):  # polygons
            rle = mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation["counts"], list):  # uncompressed RLE
            rle = mask_util.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
        masks.append(mask_util.decode(rle).astype(bool))
    return masks


def match_instances(record: dict, instances: Instances, iou_threshold: float = MATCH_IOU):
    """(matched, num_gt, num_predictions): ground-truth objects of ``record`` found by a
    prediction of the same class with mask IoU >= ``iou_threshold``, matched greedily in order of
    decreasing score, each prediction and each object at most once (COCO's matching at one IoU).
    """
    height, width = record["height"], record["width"]
    gt_masks = _ground_truth_masks(record, height, width)
    gt_classes = [annotation["category_id"] for annotation in record.get("annotations", [])]
    if len(instances) and tuple(instances.image_size) != (height, width):
        raise ValueError(
            f"predictions of size {tuple(instances.image_size)} for an image of {(height, width)}"
        )
    order = np.argsort(-instances.scores.numpy(), kind="stable") if len(instances) else []
    pred_masks = instances.pred_masks.numpy().astype(bool) if len(instances) else None
    pred_classes = instances.pred_classes.tolist() if len(instances) else []
    if gt_masks and len(instances):
        # All prediction x object mask IoUs at once; the greedy matching below only reads them.
        gt_flat = np.stack(gt_masks).reshape(len(gt_masks), -1).astype(np.int64)
        pred_flat = pred_masks.reshape(len(instances), -1).astype(np.int64)
        intersections = pred_flat @ gt_flat.T
        unions = pred_flat.sum(1)[:, None] + gt_flat.sum(1)[None, :] - intersections
        ious = np.where(unions > 0, intersections / np.maximum(unions, 1), 0.0)
    taken = [False] * len(gt_masks)
    matched = 0
    for index in order:
        best, best_iou = -1, iou_threshold
        for gt_index in range(len(gt_masks)):
            if taken[gt_index] or gt_classes[gt_index] != pred_classes[index]:
                continue
            iou = ious[index, gt_index]
            if iou >= best_iou:
                best, best_iou = gt_index, iou
        if best >= 0:
            taken[best] = True
            matched += 1
    return matched, len(gt_masks), len(instances)


def _caption_strip(text: str, width: int) -> np.ndarray:
    strip = np.full((CAPTION_HEIGHT, width, 3), 255, dtype=np.uint8)
    cv2.putText(
        strip, text, (4, CAPTION_HEIGHT - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1,
        cv2.LINE_AA,
    )  # fmt: skip
    return strip


def contact_sheet(
    entries: Sequence[Tuple[np.ndarray, dict, Instances, str]],
    metadata,
    scale: float = 3.0,
    columns: int = 2,
) -> Tuple[np.ndarray, List[Dict[str, Tuple[int, int, int, int]]]]:
    """A grid of ``columns`` GT | prediction pairs per row, each with a caption line under it.

    entries: (RGB image, dataset dict with "annotations", predicted Instances, caption) each.
    Returns (RGB sheet, layout): ``layout[i]`` has the (top, left, height, width) in the sheet
    of entry i's "ground_truth" and "prediction" panels and of its "caption".
    """
    if not entries:
        raise ValueError("contact_sheet needs at least one (image, record, instances, caption)")
    if columns <= 0:
        raise ValueError(f"columns must be positive, got {columns}")
    pairs = []
    for image, record, instances, caption in entries:
        pairs.append(
            (
                draw_ground_truth(image, record, metadata, scale),
                draw_predictions(image, instances, metadata, scale),
                caption,
            )
        )
    panel_height = max(gt.shape[0] for gt, _, _ in pairs)
    panel_width = max(gt.shape[1] for gt, _, _ in pairs)
    cell_height = panel_height + CAPTION_HEIGHT + GAP
    cell_width = 2 * panel_width + 2 * GAP
    rows = math.ceil(len(pairs) / columns)
    used_columns = min(columns, len(pairs))
    sheet = np.full((rows * cell_height, used_columns * cell_width, 3), 255, dtype=np.uint8)
    layout = []
    for index, (gt, prediction, caption) in enumerate(pairs):
        top = (index // columns) * cell_height
        left = (index % columns) * cell_width
        right = left + panel_width + GAP
        sheet[top : top + gt.shape[0], left : left + gt.shape[1]] = gt
        sheet[top : top + prediction.shape[0], right : right + prediction.shape[1]] = prediction
        caption_top = top + panel_height
        sheet[caption_top : caption_top + CAPTION_HEIGHT, left : left + cell_width - GAP] = (
            _caption_strip(caption, cell_width - GAP)
        )
        layout.append(
            {
                "ground_truth": (top, left, gt.shape[0], gt.shape[1]),
                "prediction": (top, right, prediction.shape[0], prediction.shape[1]),
                "caption": (caption_top, left, CAPTION_HEIGHT, cell_width - GAP),
            }
        )
    return sheet, layout


def read_metrics(path: str) -> Dict[int, dict]:
    """Detectron2's JSONWriter file (one JSON object per line) as {iteration: merged scalars};
    a later line wins (a resumed run rewrites the iterations after its checkpoint)."""
    by_iteration: Dict[int, dict] = {}
    with open(path) as stream:
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{path}, line {number}: not a JSON object ({error})") from None
            if "iteration" not in record:
                raise ValueError(f"{path}, line {number}: no 'iteration' (not a JSONWriter file?)")
            by_iteration.setdefault(int(record["iteration"]), {}).update(record)
    return dict(sorted(by_iteration.items()))


def plot_learning_curve(
    metrics_path: str,
    output_path: str,
    subset_key: str = "val_subset/segm/AP",
    final_key: str = "segm/AP",
    subset_label: str = "val subset",
    final_label: str = "full val",
    title: Optional[str] = None,
) -> dict:
    """Losses (top, log scale) and mask AP (bottom) over iterations from a Detectron2
    metrics.json, as a PNG. The subset APs are points joined by a line, the last full
    evaluation (``final_key``) a star. Returns {"losses": [...names], "subset_points": n,
    "final": (iteration, AP) or None}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    loss_names = sorted(
        {key for record in records.values() for key in record if key.startswith("loss")}
    )
    if "total_loss" in {key for record in records.values() for key in record}:
        loss_names = ["total_loss"] + loss_names
    if not loss_names:
        raise ValueError(f"{metrics_path} holds no loss (no key 'total_loss' or 'loss*')")
    figure, (loss_axis, ap_axis) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for name in loss_names:
        points = [(i, r[name]) for i, r in records.items() if _finite_positive(r.get(name))]
        if points:
            xs, ys = zip(*points)
            loss_axis.plot(xs, ys, label=name, linewidth=2.0 if name == "total_loss" else 1.2)
    loss_axis.set_yscale("log")
    loss_axis.set_ylabel("loss (smoothed, log scale)")
    loss_axis.legend(fontsize=8)
    loss_axis.grid(True, alpha=0.3)
    if title:
        loss_axis.set_title(title)

    subset = [(i, r[subset_key]) for i, r in records.items() if _finite(r.get(subset_key))]
    # Iterations count from 0 in the storage; plot the number of iterations trained.
    if subset:
        xs, ys = zip(*subset)
        ap_axis.plot([x + 1 for x in xs], ys, "o-", label=f"mask AP, {subset_label}")
    final = [(i, r[final_key]) for i, r in records.items() if _finite(r.get(final_key))]
    final_point = None
    if final:
        # Logged after training, where Detectron2's storage iteration is max_iter: no + 1.
        iteration, value = final[-1]
        final_point = (iteration, value)
        ap_axis.plot(
            [iteration],
            [value],
            "*",
            markersize=16,
            label=f"mask AP, {final_label}: {value:.1f}",
        )
    ap_axis.set_xlabel("iteration")
    ap_axis.set_ylabel("mask AP")
    ap_axis.grid(True, alpha=0.3)
    if subset or final:
        ap_axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(output_path, dpi=100)
    plt.close(figure)
    return {"losses": loss_names, "subset_points": len(subset), "final": final_point}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _finite_positive(value) -> bool:
    return _finite(value) and value > 0
