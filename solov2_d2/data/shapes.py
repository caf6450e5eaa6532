"""A procedurally generated instance-segmentation dataset of coloured shapes ("solov2_shapes").

Why it exists: ``make demo`` trains SOLOv2 from scratch on a laptop-class CPU in minutes, which no
real dataset allows. The images are still meant to be honest: several shape classes of widely
varied size (from 16 px, the smallest at which the six classes can still be told apart, to most of
the image), rotation, colour, texture and background, overlapping and occluding each other.

What an image contains
    * Classes (``SHAPES_CLASSES``): ellipse, triangle, rectangle, star, hexagon, cross. Every
      shape is a filled simple polygon, so a mask can only get a hole through occlusion, and the
      generator never lets that happen (see below).
    * Instance colour is drawn independently of the class, so the class can only be told from the
      shape. About a third of the instances are textured (stripes, checkerboard or noise).
    * Backgrounds are flat, a gradient, or smooth noise, with faint blurred patches that are not
      objects, and the whole image gets mild pixel noise and sometimes a slight blur.
    * A number of objects per image drawn uniformly from the split's range (``min_objects`` to
      ``max_objects``; 1 to 8 by default, see ``BUILTIN_SHAPES_DATASETS`` for the built-in
      splits); an object that cannot be placed by the rules below is left out. Later objects are
      painted over earlier ones; every annotation describes the VISIBLE region of its object.

How the annotations stay exact
    A placement is resampled when it would leave any object (earlier ones or itself) with a visible
    mask that has a hole, is less than ``MIN_VISIBLE_FRACTION`` of its unoccluded mask, is smaller
    than ``MIN_VISIBLE_PIXELS``, has a part smaller than ``MIN_PART_PIXELS``, or whose COCO polygons
    do not rasterize back to it with IoU >= ``MIN_POLYGON_IOU``. Visible masks may be split into
    several parts: an annotation stores one polygon per part (external contours). Polygons run along
    pixel corners, so pycocotools rasterizes them back to the exact visible pixels; where a lightly
    simplified polygon still matches closely (IoU >= ``SIMPLIFIED_POLYGON_IOU``) that one is stored
    instead, to keep the JSON small. ``area`` is the area of the rasterized polygons and ``bbox`` is
    the tight box of the polygons, so training and evaluation see the same thing.

On disk (under the root, see ``resolve_shapes_root``)
    ``<root>/<split>/000000.png ...`` and ``<root>/annotations/instances_<split>.json`` (plain COCO:
    images, annotations, categories with ids from 1, info, licenses). The same seed and parameters
    give byte-identical files; image ``i`` only depends on ``(seed, i)`` and the side range, so a
    smaller split is a prefix of a larger one. The JSON is written last, to a temporary name that
    is then renamed, so its presence means the split is complete; its ``info`` records the
    parameters, and a JSON written with other parameters (or a missing image) makes the split be
    generated again.

Registration and first use
    ``register_shapes_dataset`` / ``register_builtin_shapes`` only register: nothing is generated
    until the data is needed. ``DatasetCatalog.get(name)`` generates the split if it is missing,
    then loads it with ``load_coco_json``. The metadata's ``json_file`` points at the JSON, so
    Detectron2's ``COCOEvaluator`` evaluates against the very same file; since that evaluator reads
    the file when it is constructed, build it after ``DatasetCatalog.get(name)`` (Detectron2's own
    ``DefaultTrainer.test`` builds the test loader first, so it already does) or call
    ``ensure_generated(name)`` beforehand.
"""

import concurrent.futures
import functools
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BitMasks

__all__ = [
    "SHAPES_CLASSES",
    "SHAPES_COLORS",
    "SHAPES_ROOT_ENV",
    "BUILTIN_SHAPES_DATASETS",
    "resolve_shapes_root",
    "generate_shapes_split",
    "register_shapes_dataset",
    "register_builtin_shapes",
    "ensure_generated",
]

logger = logging.getLogger(__name__)

SHAPES_CLASSES: List[str] = ["ellipse", "triangle", "rectangle", "star", "hexagon", "cross"]
"""Class names, in contiguous-id order (COCO category id = contiguous id + 1)."""

SHAPES_COLORS: List[Tuple[int, int, int]] = [
    (230, 25, 75),
    (0, 130, 200),
    (60, 180, 75),
    (255, 200, 0),
    (145, 30, 180),
    (245, 130, 48),
]
"""One distinct RGB colour per class, for Detectron2's Visualizer (``thing_colors``)."""

SHAPES_ROOT_ENV = "SOLOV2_SHAPES_ROOT"
DEFAULT_SHAPES_ROOT = os.path.join("datasets", "solov2_shapes")

BUILTIN_SHAPES_DATASETS: Dict[str, Dict[str, object]] = {
    # Denser scenes than val, as copy-paste augmentation makes them: the same objects and rules,
    # more of them per image, so a training step of the same cost sees ~2x the instances.
    "solov2_shapes_train": {
        "split": "train",
        "num_images": 1000,
        "seed": 0,
        "min_objects": 3,
        "max_objects": 14,
    },
    "solov2_shapes_val": {"split": "val", "num_images": 100, "seed": 1},
}
"""Datasets registered by ``register_builtin_shapes``: name -> split parameters."""

# Bump whenever the generated content changes, so that splits on disk written by an older
# generator are regenerated instead of silently reused.
GENERATOR_VERSION = 2

# Default range of the number of objects drawn per image (a split may ask for another).
MIN_OBJECTS_PER_IMAGE = 1
MAX_OBJECTS_PER_IMAGE = 8
# Long side of an object's box, in pixels: a share of tiny objects, a share of objects spanning
# most of the image, and log-uniform sizes in between. The smallest is 16 px: below it the classes
# stop being shapes (tools/draw_shape_sizes.py: at 12 px a hexagon is an ellipse, a cross a
# star; at 16 px the hexagon's corners and the arms of stars and crosses, 3-4 px wide, show).
# Version 1 drew tiny objects of 5-12 px, which no one could classify.
TINY_OBJECT_PROBABILITY = 0.15
TINY_OBJECT_EXTENT = (16.0, 22.0)
LARGE_OBJECT_PROBABILITY = 0.15
LARGE_OBJECT_FRACTION = (0.5, 0.9)  # of the image's short side
# Share of an object's box that may stick out of the image on each axis (objects cut by the border).
MAX_BOX_OVERHANG = 0.15
# The in-image part of a new object must keep this share of the shape's geometric area.
MIN_IN_IMAGE_FRACTION = 0.6
PLACEMENT_ATTEMPTS = 25
COLOR_ATTEMPTS = 8
# RGB distance an object's mean colour keeps from the background under it and from the objects it
# overlaps or touches; without it some boundaries would be invisible, which no annotator would draw.
MIN_COLOR_DISTANCE = 60.0
TEXTURED_PROBABILITY = 0.35

# Occlusion limits. The visible share is of the object's unoccluded in-image mask; a part is a
# connected piece of a visible mask split by occluders.
MIN_VISIBLE_FRACTION = 0.4
MIN_VISIBLE_PIXELS = 10
MIN_PART_PIXELS = 4
# Stored polygons against the visible pixels: required, and enough to prefer simplified ones.
MIN_POLYGON_IOU = 0.9
SIMPLIFIED_POLYGON_IOU = 0.97
POLYGON_SIMPLIFY_EPSILON = 0.6


def resolve_shapes_root(root: Optional[str] = None) -> str:
    """Returns the absolute dataset root.

    Order: the ``root`` argument, else the ``SOLOV2_SHAPES_ROOT`` environment variable, else
    ``datasets/solov2_shapes`` under the current working directory.
    """
    if root is None:
        root = os.environ.get(SHAPES_ROOT_ENV) or DEFAULT_SHAPES_ROOT
    return os.path.abspath(os.path.expanduser(root))


# --------------------------------------------------------------------------------------------
# Shape geometry
# --------------------------------------------------------------------------------------------


def _regular_polygon(num_vertices: int, radii: Sequence[float], angle_offset: float) -> np.ndarray:
    angles = angle_offset + np.arange(num_vertices) * (2.0 * np.pi / num_vertices)
    radii = np.asarray(radii, dtype=np.float64)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _unit_shape(class_name: str, rng: np.random.Generator) -> np.ndarray:
    """Vertices (N, 2) of a shape of the class around the origin, with random proportions."""
    if class_name == "ellipse":
        vertices = _regular_polygon(64, np.ones(64), 0.0)
        vertices[:, 1] *= rng.uniform(0.55, 1.0)
        return vertices
    if class_name == "triangle":
        # Jittered around equilateral: varied, but never a sliver that reads as a line.
        angles = np.deg2rad(np.array([90.0, 210.0, 330.0]) + rng.uniform(-12.0, 12.0, 3))
        radii = rng.uniform(0.8, 1.0, 3)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    if class_name == "rectangle":
        half_height = rng.uniform(0.35, 1.0)
        return np.array(
            [[-1, -half_height], [1, -half_height], [1, half_height], [-1, half_height]]
        )
    if class_name == "star":
        radii = np.tile([1.0, rng.uniform(0.38, 0.52)], 5)
        return _regular_polygon(10, radii, np.pi / 2)
    if class_name == "hexagon":
        vertices = _regular_polygon(6, np.ones(6), 0.0)
        vertices[:, 1] *= rng.uniform(0.8, 1.0)
        return vertices
    if class_name == "cross":
        w = rng.uniform(0.22, 0.34)  # half the arm width, arms reach 1
        return np.array(
            [
                [w, 1], [w, w], [1, w], [1, -w], [w, -w], [w, -1],
                [-w, -1], [-w, -w], [-1, -w], [-1, w], [-w, w], [-w, 1],
            ]  # fmt: skip
        )
    raise ValueError(f"Unknown shape class {class_name!r}")


def _sample_extent(rng: np.random.Generator, short_side: int) -> float:
    """Long side, in pixels, of the box of a new object."""
    draw = rng.random()
    if draw < TINY_OBJECT_PROBABILITY:
        return rng.uniform(*TINY_OBJECT_EXTENT)
    if draw < TINY_OBJECT_PROBABILITY + LARGE_OBJECT_PROBABILITY:
        return rng.uniform(*LARGE_OBJECT_FRACTION) * short_side
    low, high = TINY_OBJECT_EXTENT[1], LARGE_OBJECT_FRACTION[0] * short_side
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _pose_shape(
    unit: np.ndarray, extent: float, rng: np.random.Generator, height: int, width: int
) -> np.ndarray:
    """Rotates and scales a unit shape to the extent and drops it somewhere on the image.

    Coordinates are continuous with pixel ``i`` covering ``[i, i + 1]`` (the COCO convention).
    """
    angle = rng.uniform(0.0, 2.0 * np.pi)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    vertices = unit @ rotation.T
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    vertices = (vertices - (low + high) / 2.0) * (extent / (high - low).max())
    box_size = (high - low) * (extent / (high - low).max())
    center = np.empty(2)
    for axis, side in ((0, width), (1, height)):
        margin = box_size[axis] * (0.5 - MAX_BOX_OVERHANG)
        center[axis] = rng.uniform(margin, max(side - margin, margin))
    return vertices + center


def _rasterize_shape(vertices: np.ndarray, height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    # OpenCV puts pixel centres on integers; 4 fractional bits keep the sub-pixel geometry.
    points = np.round((vertices - 0.5) * 16).astype(np.int32)
    cv2.fillPoly(mask, [points], 1, lineType=cv2.LINE_8, shift=4)
    return mask


# --------------------------------------------------------------------------------------------
# Masks and polygons
# --------------------------------------------------------------------------------------------


def _box_of(mask: np.ndarray) -> Tuple[int, int, int, int]:
    """(x0, y0, x1, y1), exclusive ends, of the non-zero pixels of a non-empty mask."""
    box = BitMasks(torch.from_numpy(mask[None] != 0)).get_bounding_boxes().tensor[0]
    return tuple(int(v) for v in box)


def _is_valid_visible_region(visible: np.ndarray, unoccluded_pixels: int) -> bool:
    """Whether a visible mask (a crop holding all of it) can be annotated exactly."""
    visible_pixels = int(visible.sum())
    if visible_pixels < max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * unoccluded_pixels):
        return False
    # The zero frame makes background that reaches the crop (or image) border count as outside,
    # not as a hole.
    padded = np.pad(visible, 1)
    _, _, stats, _ = cv2.connectedComponentsWithStats(padded, connectivity=8)
    if stats[1:, cv2.CC_STAT_AREA].min() < MIN_PART_PIXELS:
        return False
    _, hierarchy = cv2.findContours(padded, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return bool((hierarchy[0][:, 3] < 0).all())


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    previous, following = np.roll(points, 1, axis=0), np.roll(points, -1, axis=0)
    incoming, outgoing = points - previous, following - points
    cross = incoming[:, 0] * outgoing[:, 1] - incoming[:, 1] * outgoing[:, 0]
    dot = (incoming * outgoing).sum(axis=1)
    return points[(cross != 0) | (dot <= 0)]


def _exact_polygons(mask: np.ndarray) -> List[np.ndarray]:
    """Polygons along the pixel corners of each part of a hole-free mask, in mask coordinates.

    Contours of the mask upsampled 2x run through the centres of its boundary half-pixels; rounding
    those half-pixel indices up to whole pixels moves every contour point onto the outer corner of
    its pixel, so pycocotools rasterizes the polygons back to exactly the mask.
    """
    upsampled = np.pad(np.repeat(np.repeat(mask, 2, axis=0), 2, axis=1), 1)
    contours, _ = cv2.findContours(upsampled, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    polygons = []
    for contour in contours:
        corners = contour[:, 0, :] // 2  # (index - 1 for the padding + 1) // 2
        corners = corners[np.any(corners != np.roll(corners, 1, axis=0), axis=1)]
        corners = _drop_collinear(corners)
        if len(corners) >= 3:
            polygons.append(corners)
    return polygons


def _simplified_polygons(polygons: List[np.ndarray]) -> List[np.ndarray]:
    simplified = []
    for polygon in polygons:
        approx = cv2.approxPolyDP(polygon.reshape(-1, 1, 2), POLYGON_SIMPLIFY_EPSILON, True)[:, 0]
        if len(approx) >= 3 and cv2.contourArea(approx) > 0:
            simplified.append(approx)
    return simplified


def _rasterize_polygons(segmentation: List[List[float]], height: int, width: int) -> np.ndarray:
    """The mask pycocotools (hence Detectron2 and COCOeval) makes of a COCO polygon list."""
    rles = mask_util.frPyObjects(segmentation, height, width)
    return mask_util.decode(mask_util.merge(rles))


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return float((a & b).sum()) / float(max((a | b).sum(), 1))


def _annotate_mask(visible_crop: np.ndarray, x0: int, y0: int) -> Optional[List[List[int]]]:
    """COCO polygons for a visible mask given as a crop at (x0, y0), or None if none is faithful.

    Checked on the crop: pycocotools rasterizes a polygon the same way wherever it is translated
    by whole pixels.
    """
    height, width = visible_crop.shape
    exact = _exact_polygons(visible_crop)
    best, best_iou = None, 0.0
    for polygons in (_simplified_polygons(exact), exact):
        if not polygons:
            continue
        segmentation = [polygon.flatten().tolist() for polygon in polygons]
        iou = _mask_iou(_rasterize_polygons(segmentation, height, width), visible_crop)
        if iou > best_iou:
            best, best_iou = polygons, iou
        if iou >= SIMPLIFIED_POLYGON_IOU:
            break
    if best is None or best_iou < MIN_POLYGON_IOU:
        return None
    return [(polygon + (x0, y0)).flatten().tolist() for polygon in best]


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _blob_layer(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A soft-edged random blob in [0, 1], used for the faint background patches."""
    layer = np.zeros((height, width), dtype=np.float32)
    center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
    axes = (int(rng.integers(8, width // 2)), int(rng.integers(8, height // 2)))
    cv2.ellipse(layer, center, axes, rng.uniform(0, 180), 0, 360, 1.0, thickness=-1)
    # Heavy blur: a patch must not have the crisp outline that makes an object.
    return cv2.GaussianBlur(layer, (0, 0), sigmaX=0.25 * min(axes) + 2.0)


def _render_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    base = rng.uniform(0, 255, 3).astype(np.float32)
    kind = rng.choice(["flat", "gradient", "noise"])
    if kind == "flat":
        background = np.broadcast_to(base, (height, width, 3)).copy()
    elif kind == "gradient":
        other = rng.uniform(0, 255, 3).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        ramp = xs * np.cos(angle) + ys * np.sin(angle)
        ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
        background = base + ramp[..., None] * (other - base)
    else:
        grid = rng.integers(3, 10, 2)
        coarse = base + rng.uniform(-60, 60, (grid[0], grid[1], 3)).astype(np.float32)
        background = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(0, 4))):
        alpha = rng.uniform(0.1, 0.3) * _blob_layer(rng, height, width)[..., None]
        color = rng.uniform(0, 255, 3).astype(np.float32)
        background = background * (1 - alpha) + color * alpha
    return np.clip(background, 0, 255).astype(np.float32)


def _render_fill(
    rng: np.random.Generator, box: Tuple[int, int, int, int], base: np.ndarray
) -> np.ndarray:
    """Pixels (crop of the box) of an instance: flat colour or a texture built around it."""
    x0, y0, x1, y1 = box
    height, width = y1 - y0, x1 - x0
    if rng.random() >= TEXTURED_PROBABILITY:
        return np.broadcast_to(base, (height, width, 3)).astype(np.float32)
    if rng.random() < 0.5:
        second = base * rng.uniform(0.45, 0.75)
    else:
        second = base + (255 - base) * rng.uniform(0.3, 0.55)
    kind = rng.choice(["stripes", "checker", "noise"])
    if kind == "noise":
        noise = rng.normal(0, rng.uniform(12, 30), (height, width, 1)).astype(np.float32)
        return np.clip(base + noise, 0, 255)
    angle = rng.uniform(0, np.pi)
    # Image coordinates, so a texture does not move with the crop.
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    u = xs * np.cos(angle) + ys * np.sin(angle)
    if kind == "stripes":
        period = rng.uniform(3, 9)
        pattern = (u / period) % 1.0 < 0.5
    else:
        cell = rng.uniform(2.5, 8)
        v = -xs * np.sin(angle) + ys * np.cos(angle)
        pattern = (np.floor(u / cell) + np.floor(v / cell)) % 2 == 0
    return np.where(pattern[..., None], base, second).astype(np.float32)


def _finish_image(rng: np.random.Generator, canvas: np.ndarray) -> np.ndarray:
    if rng.random() < 0.3:
        canvas = cv2.GaussianBlur(canvas, (0, 0), sigmaX=rng.uniform(0.4, 0.9))
    canvas = canvas + rng.normal(0, rng.uniform(0, 6), canvas.shape).astype(np.float32)
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------------


@dataclass
class _Instance:
    category_id: int  # COCO id, from 1
    box: Tuple[int, int, int, int]  # of the unoccluded in-image mask: every crop below uses it
    unoccluded: np.ndarray  # crop, uint8
    visible: np.ndarray  # crop, uint8
    mean_color: np.ndarray
    segmentation: List[List[int]]


def _crop(array: np.ndarray, box: Tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return array[y0:y1, x0:x1]


def _boxes_overlap(a: Tuple[int, int, int, int], b: Tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _pick_fill(
    rng: np.random.Generator,
    box: Tuple[int, int, int, int],
    mask_crop: np.ndarray,
    background_color: np.ndarray,
    neighbor_colors: List[np.ndarray],
) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """A fill (crop) and its mean colour that stand out from what surrounds the object, or None."""
    inside = mask_crop.astype(bool)
    for _ in range(COLOR_ATTEMPTS):
        fill = _render_fill(rng, box, rng.uniform(0, 255, 3).astype(np.float32))
        mean_color = fill[inside].mean(axis=0)
        others = [background_color] + neighbor_colors
        if all(np.linalg.norm(mean_color - other) >= MIN_COLOR_DISTANCE for other in others):
            return fill, mean_color
    return None


def _try_place(
    rng: np.random.Generator,
    class_index: int,
    extent: float,
    background: np.ndarray,
    instances: List[_Instance],
) -> Optional[Tuple[_Instance, Dict[int, Tuple[np.ndarray, List[List[int]]]], np.ndarray]]:
    """One placement attempt; returns the instance, updates of earlier instances and its fill."""
    height, width = background.shape[:2]
    vertices = _pose_shape(
        _unit_shape(SHAPES_CLASSES[class_index], rng), extent, rng, height, width
    )
    mask = _rasterize_shape(vertices, height, width)
    pixels = int(mask.sum())
    if pixels < MIN_IN_IMAGE_FRACTION * cv2.contourArea(vertices.astype(np.float32)):
        return None
    if pixels < MIN_VISIBLE_PIXELS:
        return None
    box = _box_of(mask)
    mask_crop = _crop(mask, box)
    if not _is_valid_visible_region(mask_crop, pixels):
        return None

    # Occlusion of earlier instances, and who the new one touches (for the colour contrast).
    touching = cv2.dilate(mask, np.ones((3, 3), np.uint8))
    updates, neighbor_colors = {}, []
    for index, other in enumerate(instances):
        if not _boxes_overlap(box, other.box):
            continue
        if (_crop(touching, other.box) & other.visible).any():
            neighbor_colors.append(other.mean_color)
        visible = other.visible & (1 - _crop(mask, other.box))
        if visible.sum() == other.visible.sum():
            continue
        if not _is_valid_visible_region(visible, int(other.unoccluded.sum())):
            return None
        segmentation = _annotate_mask(visible, other.box[0], other.box[1])
        if segmentation is None:
            return None
        updates[index] = (visible, segmentation)

    background_color = background[mask.astype(bool)].mean(axis=0)
    picked = _pick_fill(rng, box, mask_crop, background_color, neighbor_colors)
    if picked is None:
        return None
    fill, mean_color = picked
    segmentation = _annotate_mask(mask_crop, box[0], box[1])
    if segmentation is None:
        return None
    instance = _Instance(
        category_id=class_index + 1,
        box=box,
        unoccluded=mask_crop,
        visible=mask_crop.copy(),
        mean_color=mean_color,
        segmentation=segmentation,
    )
    return instance, updates, fill


def _generate_image(
    rng: np.random.Generator, height: int, width: int, min_objects: int, max_objects: int
) -> Tuple[np.ndarray, List[_Instance]]:
    """An RGB uint8 image and its instances, in painting order."""
    background = _render_background(rng, height, width)
    canvas = background.copy()
    num_objects = int(rng.integers(min_objects, max_objects + 1))
    plans = [
        (int(rng.integers(len(SHAPES_CLASSES))), _sample_extent(rng, min(height, width)))
        for _ in range(num_objects)
    ]
    # Mostly large-to-small, as placing a large object over many small ones would rarely pass the
    # occlusion rules; the noise still puts small objects under large ones now and then.
    order_keys = [np.log(extent) + rng.normal(0, 0.5) for _, extent in plans]
    plans = [plans[i] for i in np.argsort(order_keys)[::-1]]
    instances: List[_Instance] = []
    while True:
        for class_index, extent in plans:
            attempts = (
                _try_place(rng, class_index, extent, background, instances)
                for _ in range(PLACEMENT_ATTEMPTS)
            )
            placed = next((result for result in attempts if result is not None), None)
            if placed is None:
                continue  # this object does not fit among the others: the image gets fewer
            instance, updates, fill = placed
            for index, (visible, segmentation) in updates.items():
                instances[index].visible = visible
                instances[index].segmentation = segmentation
            inside = instance.unoccluded.astype(bool)
            _crop(canvas, instance.box)[inside] = fill[inside]
            instances.append(instance)
        if instances:
            break
        # Nothing fit (rare: e.g. no contrasting colour); every image gets at least one object.
        plans = [(int(rng.integers(len(SHAPES_CLASSES))), _sample_extent(rng, min(height, width)))]
    return _finish_image(rng, canvas), instances


# --------------------------------------------------------------------------------------------
# Splits on disk
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SplitSpec:
    root: str
    split: str
    num_images: int
    seed: int
    min_side: int
    max_side: int
    min_objects: int = MIN_OBJECTS_PER_IMAGE
    max_objects: int = MAX_OBJECTS_PER_IMAGE

    @property
    def json_file(self) -> str:
        return _json_path(self.root, self.split)

    @property
    def image_root(self) -> str:
        return os.path.join(self.root, self.split)

    def generator_params(self) -> Dict[str, object]:
        params = asdict(self)
        del params["root"]  # the same files are valid wherever the folder is moved
        params["generator_version"] = GENERATOR_VERSION
        return params


def _json_path(root: str, split: str) -> str:
    return os.path.join(root, "annotations", f"instances_{split}.json")


def _write_atomically(path: str, data: bytes) -> None:
    """Writes a file under a temporary name, then renames it: readers never see a partial file."""
    directory = os.path.dirname(path)
    handle, temporary = tempfile.mkstemp(prefix=os.path.basename(path) + ".", dir=directory)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _check_split_args(
    split: str,
    num_images: int,
    min_side: int,
    max_side: int,
    min_objects: int = MIN_OBJECTS_PER_IMAGE,
    max_objects: int = MAX_OBJECTS_PER_IMAGE,
) -> None:
    if not split or os.sep in split or split.startswith("."):
        raise ValueError(f"split must be a plain folder name, got {split!r}")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if not 32 <= min_side <= max_side:
        raise ValueError(f"Need 32 <= min_side <= max_side, got {min_side} and {max_side}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(
            f"Need 1 <= min_objects <= max_objects, got {min_objects} and {max_objects}"
        )


def generate_shapes_split(
    root: str,
    split: str,
    num_images: int,
    seed: int,
    min_side: int = 128,
    max_side: int = 192,
    min_objects: int = MIN_OBJECTS_PER_IMAGE,
    max_objects: int = MAX_OBJECTS_PER_IMAGE,
    num_workers: Optional[int] = None,
) -> str:
    """Generates one split and returns the path of its COCO JSON.

    Writes ``<root>/<split>/<index:06d>.png`` and ``<root>/annotations/instances_<split>.json``,
    overwriting what is there; the JSON comes last and atomically. Deterministic: image ``i``
    depends only on ``(seed, i)`` and the side and object ranges, and the files are
    byte-identical for the same parameters.

    Args:
        root: dataset folder (created if needed).
        split: split name, e.g. "train"; also the name of the image folder.
        num_images: number of images (>= 1); every image has at least one object.
        seed: seed of the split.
        min_side, max_side: each image's height and width are drawn uniformly from this range.
        min_objects, max_objects: the number of objects to place in an image is drawn uniformly
            from this range (fewer are placed where the occlusion rules leave no room).
        num_workers: processes that draw the images (None: one per CPU core this process may
            use, at most 8; 0 or 1: this process). The files do not depend on it.
    """
    _check_split_args(split, num_images, min_side, max_side, min_objects, max_objects)
    spec = _SplitSpec(
        os.path.abspath(root),
        split,
        int(num_images),
        int(seed),
        min_side,
        max_side,
        int(min_objects),
        int(max_objects),
    )
    os.makedirs(spec.image_root, exist_ok=True)
    os.makedirs(os.path.dirname(spec.json_file), exist_ok=True)
    start = time.perf_counter()
    workers = _generation_workers(num_workers, spec.num_images)
    write_image = functools.partial(_write_split_image, spec)
    if workers > 1:
        # Images are independent (image i depends only on (seed, i)): the same files and JSON
        # as one process writes, in about 1/workers of the time.
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            chunk = max(1, spec.num_images // (8 * workers))
            written = list(pool.map(write_image, range(spec.num_images), chunksize=chunk))
    else:
        written = [write_image(index) for index in range(spec.num_images)]
    images, annotations = [], []
    for image, image_annotations in written:
        images.append(image)
        for annotation in image_annotations:
            annotations.append({"id": len(annotations) + 1, **annotation})
    coco = {
        "info": {
            "description": "solov2_shapes: procedurally generated shapes (solov2_d2)",
            "version": str(GENERATOR_VERSION),
            "contributor": "solov2_d2",
            "solov2_shapes": spec.generator_params(),
        },
        "licenses": [{"id": 1, "name": "Generated by solov2_d2, Apache-2.0", "url": ""}],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": index + 1, "name": name, "supercategory": "shape"}
            for index, name in enumerate(SHAPES_CLASSES)
        ],
    }
    _write_atomically(spec.json_file, json.dumps(coco, separators=(",", ":")).encode("utf-8"))
    logger.info(
        "Generated %d shapes images (%d objects) for split %r under %s in %.1f s",
        len(images),
        len(annotations),
        split,
        spec.root,
        time.perf_counter() - start,
    )
    return spec.json_file


def _generation_workers(num_workers: Optional[int], num_images: int) -> int:
    if num_workers is not None:
        return max(1, int(num_workers))
    if num_images < 50:  # a process pool costs more than it saves
        return 1
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1  # None where the count is unknown
    return min(cores, 8)


def _write_split_image(spec: "_SplitSpec", index: int) -> Tuple[Dict, List[Dict]]:
    """Draws image ``index`` of a split, writes its PNG, and returns its COCO image record and
    its annotations (without ids: they number the whole split)."""
    rng = np.random.default_rng(np.random.SeedSequence(spec.seed, spawn_key=(index,)))
    height = int(rng.integers(spec.min_side, spec.max_side + 1))
    width = int(rng.integers(spec.min_side, spec.max_side + 1))
    image, instances = _generate_image(rng, height, width, spec.min_objects, spec.max_objects)
    file_name = f"{index:06d}.png"
    encoded, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not encoded:
        raise RuntimeError(f"Could not encode image {file_name}")
    _write_atomically(os.path.join(spec.image_root, file_name), png.tobytes())
    image_id = index + 1
    record = {
        "id": image_id,
        "file_name": file_name,
        "height": height,
        "width": width,
        "license": 1,
    }
    return record, [_coco_annotation(instance, image_id, image) for instance in instances]


def _coco_annotation(instance: _Instance, image_id: int, image: np.ndarray) -> Dict[str, object]:
    segmentation = instance.segmentation
    points = np.concatenate([np.reshape(polygon, (-1, 2)) for polygon in segmentation])
    x0, y0 = points.min(axis=0)
    x1, y1 = points.max(axis=0)
    area = _rasterize_polygons(segmentation, image.shape[0], image.shape[1]).sum()
    return {
        "image_id": image_id,
        "category_id": instance.category_id,
        "segmentation": segmentation,
        "area": int(area),
        "bbox": [int(x0), int(y0), int(x1 - x0), int(y1 - y0)],
        "iscrowd": 0,
    }


def _is_split_complete(spec: _SplitSpec) -> bool:
    try:
        with open(spec.json_file, "rb") as stream:
            coco = json.load(stream)
    except (OSError, ValueError):
        return False
    if coco.get("info", {}).get("solov2_shapes") != spec.generator_params():
        return False
    return all(
        os.path.isfile(os.path.join(spec.image_root, image["file_name"]))
        for image in coco.get("images", [])
    )


def _ensure_split(spec: _SplitSpec) -> str:
    if not _is_split_complete(spec):
        if os.path.exists(spec.json_file):
            logger.warning("Regenerating %s: other parameters or missing images", spec.json_file)
        generate_shapes_split(
            spec.root,
            spec.split,
            spec.num_images,
            spec.seed,
            spec.min_side,
            spec.max_side,
            spec.min_objects,
            spec.max_objects,
        )
    return spec.json_file


# --------------------------------------------------------------------------------------------
# Detectron2 registration
# --------------------------------------------------------------------------------------------

_REGISTERED_SPECS: Dict[str, _SplitSpec] = {}


def _load_split(name: str, spec: _SplitSpec) -> List[Dict]:
    return load_coco_json(_ensure_split(spec), spec.image_root, dataset_name=name)


def register_shapes_dataset(
    name: str,
    root: Optional[str] = None,
    split: str = "train",
    num_images: int = 1000,
    seed: int = 0,
    min_side: int = 128,
    max_side: int = 192,
    min_objects: int = MIN_OBJECTS_PER_IMAGE,
    max_objects: int = MAX_OBJECTS_PER_IMAGE,
) -> None:
    """Registers a shapes split in Detectron2's DatasetCatalog and MetadataCatalog.

    Generates nothing: the split is written by the first ``DatasetCatalog.get(name)`` (or
    ``ensure_generated(name)``). The metadata has ``thing_classes``, ``thing_colors``,
    ``thing_dataset_id_to_contiguous_id``, ``json_file``, ``image_root`` and
    ``evaluator_type="coco"``. Registering a name again with the same parameters does nothing;
    with other parameters (or a name registered by someone else) it raises ``ValueError``.

    Args:
        name: dataset name.
        root: dataset folder; ``None`` resolves as in ``resolve_shapes_root``, at call time.
        split, num_images, seed, min_side, max_side, min_objects, max_objects: as in
            ``generate_shapes_split``. Datasets that share a root must not share a split name
            unless their parameters are equal.
    """
    _check_split_args(split, num_images, min_side, max_side, min_objects, max_objects)
    spec = _SplitSpec(
        resolve_shapes_root(root),
        split,
        int(num_images),
        int(seed),
        min_side,
        max_side,
        int(min_objects),
        int(max_objects),
    )
    if name in DatasetCatalog:
        if _REGISTERED_SPECS.get(name) == spec:
            return
        raise ValueError(f"Dataset {name!r} is already registered with other parameters")
    if name in _REGISTERED_SPECS and name in MetadataCatalog:
        # Our own earlier registration, since removed from the DatasetCatalog: start afresh.
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, functools.partial(_load_split, name, spec))
    MetadataCatalog.get(name).set(
        thing_classes=list(SHAPES_CLASSES),
        thing_colors=list(SHAPES_COLORS),
        # Same mapping as load_coco_json derives, known before anything is loaded.
        thing_dataset_id_to_contiguous_id={
            index + 1: index for index in range(len(SHAPES_CLASSES))
        },
        json_file=spec.json_file,
        image_root=spec.image_root,
        evaluator_type="coco",
    )
    _REGISTERED_SPECS[name] = spec


def ensure_generated(name: str) -> str:
    """Generates a registered shapes dataset if it is not on disk yet; returns its JSON path.

    Call it before building a ``COCOEvaluator`` without having called ``DatasetCatalog.get(name)``.
    """
    if name not in _REGISTERED_SPECS or name not in DatasetCatalog:
        raise ValueError(f"{name!r} is not a registered shapes dataset")
    return _ensure_split(_REGISTERED_SPECS[name])


def register_builtin_shapes(root: Optional[str] = None) -> None:
    """Registers "solov2_shapes_train" (1000 images, seed 0, 3 to 14 objects drawn per image) and
    "solov2_shapes_val" (100 images, seed 1, 1 to 8) under the root (see
    ``resolve_shapes_root``). Calling it again is harmless."""
    for name, params in BUILTIN_SHAPES_DATASETS.items():
        register_shapes_dataset(name, root=root, **params)
