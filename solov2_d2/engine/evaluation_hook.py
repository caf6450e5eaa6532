"""Mask AP on a small fixed val subset every N iterations, for a learning curve during training.

Detectron2's ``EvalHook`` evaluates the whole test set, which on a CPU costs as much as hundreds of
training iterations; this hook scores only the first ``num_images`` images of a dataset, so that a
few points of a learning curve cost a few percent of the training time. The subset is scored
against the dataset's own COCO ground truth (``COCOEvaluator.evaluate(img_ids=...)``), so its APs
are those of the full evaluation restricted to the subset's images.
"""

import contextlib
import io
import logging
import os
import time
from typing import List, Optional

import torch
from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.engine import HookBase
from detectron2.evaluation.evaluator import inference_context
from detectron2.utils import comm

from ..compat import build_coco_evaluator
from ..data.checks import get_dataset_dicts
from ..data.mapper import SOLOv2DatasetMapper

__all__ = ["SubsetEvalHook", "SUBSET_PREFIX"]

logger = logging.getLogger(__name__)

# Prefix of the scalars the hook puts into the EventStorage: "val_subset/segm/AP", ...
SUBSET_PREFIX = "val_subset"


def _unwrapped(model):
    # DistributedDataParallel's forward may communicate; the subset is scored by one process.
    return model.module if hasattr(model, "module") else model


class SubsetEvalHook(HookBase):
    """Every ``period`` iterations (and after the last one when it is a multiple), COCO segm/bbox
    AP of the first ``num_images`` images of ``dataset_name``, put into the trainer's
    EventStorage as ``val_subset/segm/AP``, ``val_subset/bbox/AP``, ... (so Detectron2's
    JSONWriter writes them to its metrics.json) together with ``val_subset/seconds``, the time
    the evaluation took. Only the main process evaluates; the others wait for it.

    Insert it before Detectron2's ``PeriodicWriter`` so that its scalars are written in the same
    step, with a ``period`` no shorter than the writer's (20 in ``DefaultTrainer``): the storage
    keeps only the latest value of a scalar until it is written.
    """

    def __init__(self, cfg, dataset_name: str, period: int, num_images: int):
        if period <= 0:
            raise ValueError(f"period must be a positive number of iterations, got {period}")
        if num_images <= 0:
            raise ValueError(f"num_images must be positive, got {num_images}")
        self._cfg = cfg
        self._dataset_name = dataset_name
        self._period = int(period)
        self._num_images = int(num_images)
        self._loader = None
        self._image_ids: Optional[List[int]] = None
        self.history: List[dict] = []

    def _build(self):
        dataset = get_dataset_dicts(
            self._dataset_name, training=False, num_classes=self._cfg.MODEL.SOLOV2.NUM_CLASSES
        )
        subset = dataset[: self._num_images]
        if len(subset) < self._num_images:
            logger.warning(
                "%s has %d images, fewer than the %d asked for the subset evaluation",
                self._dataset_name,
                len(subset),
                self._num_images,
            )
        self._image_ids = [record["image_id"] for record in subset]
        self._loader = build_detection_test_loader(
            subset, mapper=SOLOv2DatasetMapper(self._cfg, is_train=False), num_workers=0
        )

    def evaluate(self, model) -> dict:
        """{"segm": {...}, "bbox": {...}} of the model on the subset (COCOEvaluator's results)."""
        if self._loader is None:
            self._build()
        output_dir = None
        if not hasattr(MetadataCatalog.get(self._dataset_name), "json_file"):
            # COCOEvaluator converts a dataset without a COCO file into one there.
            output_dir = os.path.join(self._cfg.OUTPUT_DIR, "inference", SUBSET_PREFIX)
        # distributed=False: only this process evaluates, so nothing may be gathered.
        evaluator = build_coco_evaluator(
            self._dataset_name, output_dir=output_dir, distributed=False
        )
        evaluator.reset()
        model = _unwrapped(model)
        # COCOEvaluator logs its full tables at INFO and pycocotools prints its summary: one line
        # per subset evaluation is enough.
        quiet = [logging.getLogger(name) for name in ("detectron2.evaluation", "solov2_d2.compat")]
        levels = [log.level for log in quiet]
        try:
            for log in quiet:
                log.setLevel(logging.WARNING)
            with inference_context(model), torch.no_grad():
                for inputs in self._loader:
                    evaluator.process(inputs, model(inputs))
            with contextlib.redirect_stdout(io.StringIO()):
                return evaluator.evaluate(img_ids=self._image_ids)
        finally:
            for log, level in zip(quiet, levels):
                log.setLevel(level)

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if next_iter % self._period != 0:
            return
        if comm.is_main_process():
            start = time.perf_counter()
            results = self.evaluate(self.trainer.model)
            seconds = time.perf_counter() - start
            scalars = {
                f"{SUBSET_PREFIX}/{task}/{metric}": value
                for task, metrics in results.items()
                for metric, value in metrics.items()
            }
            scalars[f"{SUBSET_PREFIX}/seconds"] = seconds
            self.trainer.storage.put_scalars(**scalars, smoothing_hint=False)
            self.history.append({"iteration": self.trainer.iter, "seconds": seconds, **results})
            logger.info(
                "Iteration %d: mask AP %.1f on the first %d images of %s (%.1f s)",
                next_iter,
                results["segm"]["AP"],
                len(self._image_ids),
                self._dataset_name,
                seconds,
            )
        comm.synchronize()
