"""Dataset mapper for SOLOv2: Detectron2's ``DatasetMapper`` with input checks that name the file.

What differs from Detectron2's mapper (see solov2_d2/data/checks.py and README.md):

* images are read with ``checks.read_image``: fully decoded at once, 16-bit grayscale scaled to
  8 bit instead of clipped, missing and corrupt files reported by name;
* the image size is checked against the dataset dict with a hint when EXIF orientation explains a
  mismatch;
* (training) annotations go through ``checks.check_annotations``: degenerate polygons and
  annotations without a mask are skipped with a warning naming the annotation id (once per
  annotation and process), malformed ones stop with a ``DatasetError``; an image without an
  "annotations" list trains as a negative (empty ``Instances``) instead of failing in the model;
* masks are always loaded (SOLOv2 needs them) and any other error is re-raised naming the file.
"""

import copy
import logging

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as d2_utils
from detectron2.data import transforms as T

from .checks import DatasetError, check_annotations, check_image_size, describe_image, read_image

logger = logging.getLogger(__name__)

# Annotations already warned about in this process: a bad annotation is reported once, not every
# time its image comes round again.
_WARNED = set()
_MAX_WARNED = 10000


def _warn_once(message: str) -> None:
    if message in _WARNED:
        return
    if len(_WARNED) < _MAX_WARNED:
        _WARNED.add(message)
    logger.warning(message)


class SOLOv2DatasetMapper(DatasetMapper):
    """Detectron2's ``DatasetMapper`` (masks on, boxes recomputed from masks after cropping) with
    the input checks of ``solov2_d2.data.checks``; every failure names the image file."""

    @configurable
    def __init__(self, is_train: bool = True, *, num_classes=None, **kwargs):
        """
        Args:
            num_classes: when given, training annotations must have a category_id in
                ``[0, num_classes)`` (a ``DatasetError`` naming the annotation otherwise).
            is_train, kwargs: as for Detectron2's ``DatasetMapper``.
        """
        super().__init__(is_train, **kwargs)
        self.num_classes = num_classes

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        args = super().from_config(cfg, is_train)
        args["use_instance_mask"] = True
        if "SOLOV2" in cfg.MODEL:
            args["num_classes"] = cfg.MODEL.SOLOV2.NUM_CLASSES
        return args

    def __call__(self, dataset_dict):
        try:
            return self._map(copy.deepcopy(dataset_dict))
        except DatasetError:
            raise  # names the file already
        except Exception as error:
            message = "while loading {}: {}: {}".format(
                describe_image(dataset_dict), type(error).__name__, error
            )
            try:
                wrapped = type(error)(message)
            except Exception:  # exception types with other constructor arguments
                wrapped = DatasetError(message)
            raise wrapped from error

    def _map(self, record):
        image, orientation = read_image(record["file_name"], format=self.image_format)
        check_image_size(record, image, orientation)

        sem_seg = None
        if "sem_seg_file_name" in record:
            sem_seg = d2_utils.read_image(record.pop("sem_seg_file_name"), "L").squeeze(2)
        aug_input = T.AugInput(image, sem_seg=sem_seg)
        transforms = self.augmentations(aug_input)
        image, sem_seg = aug_input.image, aug_input.sem_seg
        image_shape = image.shape[:2]
        record["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg is not None:
            record["sem_seg"] = torch.as_tensor(sem_seg.astype("long"))
        if self.proposal_topk is not None:
            d2_utils.transform_proposals(
                record, image_shape, transforms, proposal_topk=self.proposal_topk
            )

        if not self.is_train:
            record.pop("annotations", None)
            return record

        annotations, errors, warnings = check_annotations(record, self.num_classes)
        if errors:
            raise DatasetError("malformed annotation(s):\n  " + "\n  ".join(errors))
        for warning in warnings:
            _warn_once(warning)
        # An image without annotations (or with crowd ones only) is a negative: empty Instances.
        record["annotations"] = annotations
        self._transform_annotations(record, transforms, image_shape)
        return record
