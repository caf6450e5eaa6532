"""Checks of user datasets: what SOLOv2 trains on, what it skips with a warning, where it stops.

Users bring messy COCO-style datasets. Everything here either lets an image train normally, skips
the one bad part with a warning that names the annotation, or stops with a ``DatasetError`` that
names the dataset, the file and the annotation id and says what is wrong. README.md
has the full table; in short:

Stops (``DatasetError``)
    an empty dataset; image files that are missing (all listed before training starts) or cannot
    be decoded; an image whose size differs from the height/width recorded for it (with a hint
    when an EXIF orientation explains it); a category id that the JSON does not declare, or that
    does not fit MODEL.SOLOV2.NUM_CLASSES; a malformed box or mask (not numbers, an odd number of
    polygon coordinates, NaN/inf, an RLE or mask array of another size); 32-bit and float images.
Skips with a warning naming the annotation
    polygons with fewer than 3 points or zero area (the other polygons of the annotation stay), and
    annotations left without any mask (no segmentation, only such polygons, an empty RLE).
Trains normally
    images without annotations or with crowd annotations only (negatives), grayscale, palette,
    RGBA (alpha dropped) and 16-bit images (scaled to 8 bit), EXIF-rotated images.

Detectron2's dataset dicts only carry an annotation's COCO ``id`` when the loader keeps it:
``register_coco_instances`` / ``load_coco_json`` here do (Detectron2's drop it); without an id,
messages name the annotation by its position in the image's list.
"""

import contextlib
import json
import logging
import math
import os
from collections import Counter
from operator import mul
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as d2_utils
from detectron2.data.datasets import load_coco_json as d2_load_coco_json
from detectron2.utils.file_io import PathManager
from PIL import Image

__all__ = [
    "DatasetError",
    "ImageSizeError",
    "read_image",
    "check_image_size",
    "check_annotations",
    "get_dataset_dicts",
    "find_undeclared_categories",
    "load_coco_json",
    "register_coco_instances",
]

logger = logging.getLogger(__name__)

# How many problems an aggregated message lists before "... and N more".
MAX_LISTED = 10
_EXIF_ORIENTATION = 274
# EXIF orientations that turn the stored pixels by 90 degrees (width and height swap).
_AXIS_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class DatasetError(ValueError):
    """A problem in a dataset that training or evaluation cannot go on with. The message names
    the dataset, file and annotation, and what is wrong."""


class ImageSizeError(DatasetError, d2_utils.SizeMismatchError):
    """An image whose decoded size differs from the height/width its dataset dict records
    (also a Detectron2 ``SizeMismatchError``)."""


def describe_image(record: Dict) -> str:
    image_id = record.get("image_id")
    suffix = "" if image_id is None else f" (image_id {image_id})"
    return f"image {record.get('file_name', '<no file_name>')}{suffix}"


def describe_annotation(annotation: Dict, index: int) -> str:
    if isinstance(annotation, dict) and annotation.get("id") is not None:
        return f"annotation id {annotation['id']}"
    return f"annotation #{index} of the image (no 'id' field)"


def _listed(items: Sequence[str]) -> str:
    shown = "\n  ".join(items[:MAX_LISTED])
    more = f"\n  ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return "\n  " + shown + more


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

try:  # Detectron2's EXIF handling, so that we rotate exactly as its read_image does
    from detectron2.data.detection_utils import _apply_exif_orientation
except ImportError:  # pragma: no cover - not in the Detectron2 versions we support
    from PIL.ImageOps import exif_transpose as _apply_exif_orientation


def _exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # broken EXIF blocks: Detectron2 ignores them too
        return 1


def _to_eight_bit(image: Image.Image, file_name: str) -> Image.Image:
    """16-bit grayscale as 8-bit (the high byte, as Pillow itself reads 16-bit RGB PNGs), instead
    of the clipping of ``Image.convert``; 32-bit and float images stop with a clear message."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        values = np.asarray(image)
        if image.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise DatasetError(
                f"Image {file_name} is a 32-bit integer image with values in "
                f"[{values.min()}, {values.max()}]; only 8- and 16-bit images are supported: "
                "convert it to 8 bit per channel"
            )
        return Image.fromarray((values.astype(np.uint32) >> 8).astype(np.uint8))
    if image.mode == "F":
        raise DatasetError(
            f"Image {file_name} is a floating-point image (PIL mode F), which is not supported: "
            "convert it to 8 bit per channel"
        )
    return image


def read_image(file_name: str, format: Optional[str] = None) -> Tuple[np.ndarray, int]:
    """Reads an image like Detectron2's ``read_image`` (EXIF orientation applied, ``format`` as
    there), but decodes it fully right away and names the file in every error.

    Also: 16-bit grayscale images are scaled to 8 bit (Detectron2 clips them to white), RGBA and
    palette images lose their alpha (as with Detectron2), 32-bit and float images stop.

    Returns:
        (HWC array, EXIF orientation of the file: 1 when none)
    """
    try:
        with PathManager.open(file_name, "rb") as stream:
            image = Image.open(stream)
            image.load()  # Image.open is lazy: truncated or corrupt data fails here
    except FileNotFoundError:
        raise DatasetError(f"Image file not found: {file_name}") from None
    except IsADirectoryError:
        raise DatasetError(f"Image file {file_name} is a directory") from None
    except Image.DecompressionBombError as error:
        raise DatasetError(f"Image file {file_name} is too large to decode: {error}") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise DatasetError(
            f"Cannot decode image file {file_name} (corrupt, truncated or not an image): {error}"
        ) from error
    orientation = _exif_orientation(image)
    image = _apply_exif_orientation(image)
    image = _to_eight_bit(image, file_name)
    return d2_utils.convert_PIL_to_numpy(image, format), orientation


def check_image_size(record: Dict, image: np.ndarray, orientation: int = 1) -> None:
    """Raises ``ImageSizeError`` if the decoded image's size differs from the record's
    height/width; fills them in when the record has none (as Detectron2 does).

    Height and width, like the annotations, are in the frame of the image as displayed, i.e.
    after its EXIF orientation (Detectron2's convention, and what annotation tools show).
    """
    height, width = image.shape[:2]
    expected_height = record.get("height", height)
    expected_width = record.get("width", width)
    if (expected_height, expected_width) != (height, width):
        message = (
            f"{describe_image(record)}: the file decodes to width x height = {width} x {height} "
            f"but the dataset records {expected_width} x {expected_height}."
        )
        if orientation in _AXIS_SWAPPING_ORIENTATIONS and (expected_height, expected_width) == (
            width,
            height,
        ):
            message += (
                f" The file has EXIF orientation {orientation}, which turns it by 90 degrees when "
                "loaded, and the recorded size is that of the stored, unturned pixels: the "
                "annotations were probably made on the unturned image. Height, width and "
                "annotations must be in the turned (displayed) frame: re-export them from a tool "
                "that applies EXIF orientation, or turn the pixels and drop the EXIF tag (e.g. "
                "PIL.ImageOps.exif_transpose) and annotate that."
            )
        elif orientation != 1:
            message += f" (The file has EXIF orientation {orientation}, which is applied.)"
        else:
            message += " Fix the height/width of the image in the annotation file."
        raise ImageSizeError(message)
    record["height"], record["width"] = height, width


# --------------------------------------------------------------------------------------------
# Annotations
# --------------------------------------------------------------------------------------------


class _Where:
    """ "image X (image_id N), annotation id M", formatted only when a message needs it."""

    __slots__ = ("record", "annotation", "index")

    def __init__(self, record, annotation, index):
        self.record, self.annotation, self.index = record, annotation, index

    def __format__(self, spec):
        return f"{describe_image(self.record)}, {describe_annotation(self.annotation, self.index)}"

    def __str__(self):
        return self.__format__("")


def _polygon_area(coords: Sequence[float]) -> float:
    """Shoelace area of a flat [x0, y0, x1, y1, ...] polygon, in pure Python (fast on lists)."""
    xs, ys = coords[0::2], coords[1::2]
    twice = sum(map(mul, xs, ys[1:] + ys[:1])) - sum(map(mul, xs[1:] + xs[:1], ys))
    return abs(twice) / 2.0


def _malformation(polygon) -> str:
    """Why a polygon is not a flat list of numbers (the slow path, for the message only)."""
    if isinstance(polygon, np.ndarray):
        polygon = polygon.reshape(-1).tolist()
    if not isinstance(polygon, (list, tuple)):
        return f"a polygon must be a flat list of numbers, got {type(polygon).__name__}"
    for value in polygon:
        if isinstance(value, (bool, str, bytes)) or not isinstance(value, (int, float, np.number)):
            return f"a polygon holds {value!r}, not a number (polygons are [x0, y0, x1, y1, ...])"
    return "a polygon holds something that is not a number"


def _check_polygons(segmentation, where, errors: List[str], warnings: List[str]):
    """The usable polygons of a segmentation (a list of flat polygons).

    Fast on valid data (the whole of COCO in seconds): the shoelace area is computed right away
    and is NaN/inf exactly when a coordinate is, and raises TypeError on anything not a number;
    only then are the coordinates looked at one by one, for the message.
    """
    kept = []
    for index, polygon in enumerate(segmentation):
        coords = polygon.reshape(-1).tolist() if isinstance(polygon, np.ndarray) else polygon
        try:
            if not isinstance(coords, (list, tuple)):
                raise TypeError
            area = _polygon_area(coords)
        except TypeError:
            errors.append(f"{where}: polygon {index} is malformed: {_malformation(polygon)}")
            continue
        if len(coords) % 2:
            errors.append(
                f"{where}: polygon {index} has an odd number of coordinates ({len(coords)}); "
                "polygons are flat [x0, y0, x1, y1, ...] lists"
            )
        elif not math.isfinite(area):
            errors.append(f"{where}: polygon {index} has NaN or infinite coordinates")
        elif len(coords) < 6:
            warnings.append(
                f"{where}: polygon {index} has {len(coords) // 2} point(s), fewer than 3: skipped"
            )
        elif area == 0.0:
            warnings.append(f"{where}: polygon {index} has zero area: skipped")
        else:
            kept.append(polygon)
    return kept


def _check_rle(segmentation: Dict, size, where: str, errors: List[str], warnings: List[str]):
    if "counts" not in segmentation or "size" not in segmentation:
        errors.append(f"{where}: an RLE segmentation needs 'size' and 'counts'")
        return None
    rle_size = [int(v) for v in segmentation["size"]]
    if size is not None and rle_size != list(size):
        errors.append(
            f"{where}: the RLE mask is height x width = {rle_size[0]} x {rle_size[1]} but the "
            f"image is {size[0]} x {size[1]}"
        )
        return None
    try:
        if isinstance(segmentation["counts"], list):  # uncompressed RLE
            segmentation = mask_util.frPyObjects(segmentation, *rle_size)
        area = float(mask_util.area(segmentation))
    except Exception as error:
        errors.append(f"{where}: the RLE segmentation cannot be decoded: {error}")
        return None
    if area == 0:
        warnings.append(f"{where}: the RLE mask is empty: annotation skipped")
        return None
    return segmentation


def _check_mask_array(mask: np.ndarray, size, where: str, errors: List[str], warnings):
    if mask.ndim != 2 or (size is not None and tuple(mask.shape) != tuple(size)):
        errors.append(
            f"{where}: the mask array has shape {tuple(mask.shape)}, the image is "
            f"{tuple(size) if size is not None else '?'} (height, width)"
        )
        return None
    if not mask.any():
        warnings.append(f"{where}: the mask array is empty: annotation skipped")
        return None
    # As RLE: Detectron2's transforms take polygons and RLE, not arrays.
    return mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))


def _check_box(annotation: Dict, where, errors: List[str]) -> None:
    box = annotation.get("bbox")
    if type(box) is list and len(box) == 4 and "bbox_mode" in annotation:  # fast path
        try:
            if all(map(_is_number, box)) and math.isfinite(box[0] + box[1] + box[2] + box[3]):
                return
        except TypeError:
            pass
    if box is None or "bbox_mode" not in annotation:
        errors.append(f"{where}: has no 'bbox' / 'bbox_mode'")
        return
    values = list(box.reshape(-1) if isinstance(box, np.ndarray) else box)
    if len(values) != 4 or not all(map(_is_number, values)):
        errors.append(f"{where}: bbox {box!r} is not 4 numbers")
    elif not all(map(math.isfinite, values)):
        errors.append(f"{where}: bbox {box!r} has NaN or infinite values")


def _check_category(annotation: Dict, where, num_classes, errors: List[str]) -> None:
    category = annotation.get("category_id")
    if type(category) is not int and (
        isinstance(category, (bool, np.bool_)) or not isinstance(category, (int, np.integer))
    ):
        errors.append(f"{where}: category_id {category!r} is not an integer")
    elif num_classes is not None and not 0 <= category < num_classes:
        errors.append(
            f"{where}: category_id {category} is outside the {num_classes} classes of the model "
            f"(contiguous ids 0..{num_classes - 1}; MODEL.SOLOV2.NUM_CLASSES = {num_classes})"
        )


def check_annotations(
    record: Dict, num_classes: Optional[int] = None
) -> Tuple[List[Dict], List[str], List[str]]:
    """Checks the annotations of one dataset dict (Detectron2's format, contiguous category ids).

    Crowd annotations are passed through unchecked (the mapper drops them). A non-crowd one must
    have an integer category_id (in ``[0, num_classes)`` when given), a finite 4-number bbox with
    its bbox_mode, and a mask: polygons (lists of numbers), an RLE dict or an (H, W) array.

    Returns:
        (annotations to use, errors, warnings). Polygons with < 3 points or zero area are dropped
        from their annotation, an annotation left without a mask is dropped, each with a warning;
        RLE with uncompressed counts and mask arrays come back as compressed RLE. Each error or
        warning names the file and the annotation.
    """
    errors: List[str] = []
    warnings: List[str] = []
    kept: List[Dict] = []
    height, width = record.get("height"), record.get("width")
    size = (height, width) if height is not None and width is not None else None
    for index, annotation in enumerate(record.get("annotations") or []):
        where = _Where(record, annotation, index)
        if not isinstance(annotation, dict):
            errors.append(f"{where}: is a {type(annotation).__name__}, not a dict")
            continue
        if annotation.get("iscrowd", 0):
            kept.append(annotation)
            continue
        num_errors = len(errors)
        _check_category(annotation, where, num_classes, errors)
        _check_box(annotation, where, errors)
        segmentation = annotation.get("segmentation")
        if isinstance(segmentation, np.ndarray):
            segmentation = _check_mask_array(segmentation, size, where, errors, warnings)
        elif isinstance(segmentation, dict):
            segmentation = _check_rle(segmentation, size, where, errors, warnings)
        elif isinstance(segmentation, (list, tuple)) and len(segmentation) > 0:
            polygons = _check_polygons(segmentation, where, errors, warnings)
            if not polygons and len(errors) == num_errors:
                warnings.append(f"{where}: no usable polygon left: annotation skipped")
            segmentation = polygons or None
        elif segmentation is None or isinstance(segmentation, (list, tuple)):
            warnings.append(
                f"{where}: has no mask (segmentation missing or empty); SOLOv2 learns from masks: "
                "annotation skipped"
            )
            segmentation = None
        else:
            errors.append(
                f"{where}: segmentation of type {type(segmentation).__name__} is neither "
                "polygons, RLE nor a mask array"
            )
            segmentation = None
        if len(errors) == num_errors and segmentation is not None:
            if segmentation is not annotation.get("segmentation"):
                annotation = dict(annotation, segmentation=segmentation)
            kept.append(annotation)
    return kept, errors, warnings


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


def find_undeclared_categories(json_file: str) -> Tuple[List[str], List[int]]:
    """Annotations of a COCO JSON whose category_id is not among its declared categories.

    Returns (one description per offending annotation, the declared ids).
    """
    with PathManager.open(json_file, "r") as stream:
        coco = json.load(stream)
    declared = sorted({category["id"] for category in coco.get("categories", [])})
    files = {image.get("id"): image.get("file_name") for image in coco.get("images", [])}
    problems = []
    for annotation in coco.get("annotations", []):
        category = annotation.get("category_id")
        if category not in declared:
            image_id = annotation.get("image_id")
            problems.append(
                f"annotation id {annotation.get('id')} (image_id {image_id}, "
                f"{files.get(image_id, '<unknown image>')}) has category_id {category}"
            )
    return problems, declared


def _undeclared_category_error(json_file: str, dataset_name) -> Optional[DatasetError]:
    problems, declared = find_undeclared_categories(json_file)
    if not problems:
        return None
    name = f"Dataset {dataset_name!r} ({json_file})" if dataset_name else json_file
    return DatasetError(
        f"{name}: {len(problems)} annotation(s) use a category_id that the file's 'categories' "
        f"do not declare (declared ids: {declared}):{_listed(problems)}\nDeclare the category "
        "in 'categories' or correct the annotations."
    )


def _annotations_without_valid_polygons(json_file: str) -> List[str]:
    """Annotations that Detectron2's load_coco_json drops because none of their polygons has an
    even number (>= 6) of coordinates."""
    with PathManager.open(json_file, "r") as stream:
        coco = json.load(stream)
    dropped = []
    for annotation in coco.get("annotations", []):
        segmentation = annotation.get("segmentation")
        if isinstance(segmentation, list) and segmentation:
            if not any(
                isinstance(p, list) and len(p) % 2 == 0 and len(p) >= 6 for p in segmentation
            ):
                dropped.append(
                    f"annotation id {annotation.get('id')} (image_id {annotation.get('image_id')})"
                )
    return dropped


class _MessageCatcher(logging.Handler):
    def __init__(self, needle: str):
        super().__init__(logging.WARNING)
        self.needle = needle
        self.caught = False

    def emit(self, record):
        if self.needle in record.getMessage():
            self.caught = True


@contextlib.contextmanager
def _catching(logger_name: str, needle: str):
    catcher = _MessageCatcher(needle)
    target = logging.getLogger(logger_name)
    target.addHandler(catcher)
    try:
        yield catcher
    finally:
        target.removeHandler(catcher)


def load_coco_json(json_file, image_root, dataset_name=None, extra_annotation_keys=None):
    """Detectron2's ``load_coco_json`` that also keeps each annotation's ``id`` (so that our
    messages can name it), names the annotations behind its errors, and lists the annotations it
    drops for having no polygon of at least 3 points (Detectron2 only counts them)."""
    keys = list(extra_annotation_keys or [])
    if "id" not in keys:
        keys.append("id")
    with _catching(d2_load_coco_json.__module__, "without valid segmentation") as dropped:
        try:
            dicts = d2_load_coco_json(json_file, image_root, dataset_name, keys)
        except KeyError as error:
            better = _undeclared_category_error(json_file, dataset_name)
            if better is not None:
                raise better from error
            raise
    if dropped.caught:
        logger.warning(
            "%s: these annotations have no polygon of at least 3 points and were skipped:%s",
            json_file,
            _listed(_annotations_without_valid_polygons(json_file)),
        )
    return dicts


def register_coco_instances(name: str, metadata: Dict, json_file: str, image_root: str) -> None:
    """Detectron2's ``register_coco_instances`` with this module's ``load_coco_json``."""
    DatasetCatalog.register(name, lambda: load_coco_json(json_file, image_root, name))
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="coco", **metadata
    )


def _load_dataset(name: str) -> List[Dict]:
    try:
        dicts = DatasetCatalog.get(name)
    except KeyError as error:
        # Detectron2's load_coco_json on an undeclared category id: name the annotations.
        json_file = MetadataCatalog.get(name).get("json_file", None)
        if "category_id" in str(error) and json_file:
            better = _undeclared_category_error(json_file, name)
            if better is not None:
                raise better from error
        raise
    if not isinstance(dicts, list):  # a torch Dataset: nothing to check here
        return dicts
    if len(dicts) == 0:
        metadata = MetadataCatalog.get(name)
        source = ", ".join(
            f"{key} {metadata.get(key)}" for key in ("json_file", "image_root") if metadata.get(key)
        )
        raise DatasetError(
            f"Dataset {name!r} is empty: its loader returned no images"
            + (f" ({source})" if source else "")
            + ". Check that the annotation file lists images and that the split is not empty."
        )
    return dicts


def _check_files(dicts: List[Dict], label: str) -> None:
    """Every local image file exists; lists the missing ones (remote paths are not checked)."""
    missing = [
        record["file_name"]
        for record in dicts
        if "://" not in str(record.get("file_name", "://"))
        and not os.path.isfile(record["file_name"])
    ]
    if missing:
        raise DatasetError(f"{label}: {len(missing)} image file(s) not found:{_listed(missing)}")


def _check_num_classes(names: Sequence[str], num_classes: Optional[int]) -> None:
    if num_classes is None:
        return
    for name in names:
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes is not None and len(classes) != num_classes:
            raise DatasetError(
                f"Dataset {name!r} has {len(classes)} classes but MODEL.SOLOV2.NUM_CLASSES is "
                f"{num_classes}: set MODEL.SOLOV2.NUM_CLASSES {len(classes)}"
            )


def get_dataset_dicts(
    names,
    *,
    training: bool,
    num_classes: Optional[int] = None,
    filter_empty: bool = False,
    check_files: bool = True,
) -> List[Dict]:
    """The dataset dicts of registered datasets, checked, for training or evaluation.

    Stops with a ``DatasetError`` on an empty dataset, missing image files, a class count that is
    not ``num_classes``, and (training) on malformed annotations, all of them listed. For
    training, the annotations are cleaned as in ``check_annotations`` (skipped parts logged once,
    here), and images without non-crowd annotations are kept as negatives, or dropped when
    ``filter_empty`` (Detectron2's DATALOADER.FILTER_EMPTY_ANNOTATIONS); either way the counts
    are logged.
    """
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise DatasetError("No dataset given (DATASETS.TRAIN / DATASETS.TEST is empty)")
    per_dataset = [_load_dataset(name) for name in names]
    _check_num_classes(names, num_classes)  # after loading: load_coco_json sets thing_classes
    if not all(isinstance(dicts, list) for dicts in per_dataset):
        return per_dataset[0] if len(per_dataset) == 1 else sum(map(list, per_dataset), [])
    label = "Dataset " + ", ".join(repr(name) for name in names)
    dicts = [record for dicts in per_dataset for record in dicts]
    if training:
        dicts = _clean_training_dicts(dicts, label, num_classes, filter_empty)
    if check_files:
        _check_files(dicts, label)
    return dicts


def _clean_training_dicts(dicts, label, num_classes, filter_empty) -> List[Dict]:
    errors: List[str] = []
    warnings: List[str] = []
    cleaned = []
    kinds = Counter()
    for record in dicts:
        if "annotations" in record:
            annotations, record_errors, record_warnings = check_annotations(record, num_classes)
            errors += record_errors
            warnings += record_warnings
            record = dict(record, annotations=annotations)
        if any(not a.get("iscrowd", 0) for a in record.get("annotations") or []):
            kinds["with objects"] += 1
        elif record.get("annotations"):
            kinds["crowd-only"] += 1
        else:
            kinds["without annotations"] += 1
        cleaned.append(record)
    if errors:
        raise DatasetError(f"{label}: {len(errors)} malformed annotation(s):{_listed(errors)}")
    if warnings:
        logger.warning(
            f"{label}: {len(warnings)} annotation problem(s) skipped:{_listed(warnings)}"
        )
    negatives = kinds["crowd-only"] + kinds["without annotations"]
    if negatives:
        what = (
            f"{kinds['without annotations']} without annotations and {kinds['crowd-only']} with "
            "crowd annotations only"
        )
        if filter_empty:
            cleaned = [
                r
                for r in cleaned
                if any(not a.get("iscrowd", 0) for a in r.get("annotations") or [])
            ]
            logger.info(
                f"{label}: dropped {negatives} of {len(dicts)} images ({what}): "
                "DATALOADER.FILTER_EMPTY_ANNOTATIONS is True"
            )
        else:
            logger.info(
                f"{label}: {negatives} of {len(dicts)} images ({what}) train as negatives "
                "(DATALOADER.FILTER_EMPTY_ANNOTATIONS is False)"
            )
    if not cleaned:
        raise DatasetError(
            f"{label}: no training image left: all {len(dicts)} images have no (non-crowd) "
            "annotation and DATALOADER.FILTER_EMPTY_ANNOTATIONS is True; set it to False to train "
            "on them as negatives, or check the annotations"
        )
    return cleaned
