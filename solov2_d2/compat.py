"""The few differences between Detectron2 v0.6 (our sdist build) and today's upstream main.

Everything else in solov2_d2 uses APIs present in both.
"""

import contextlib
import copy
import functools
import importlib.machinery
import io
import logging

from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator

__all__ = [
    "has_compiled_ops",
    "detectron2_install_path",
    "build_coco_evaluator",
    "SOLOv2COCOEvaluator",
    "default_trainer_checkpoints_optimizer",
    "restart_data_loader_iterator",
]

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def detectron2_install_path() -> str:
    """ "compiled" for a build whose ``detectron2._C`` is a compiled extension that loads,
    "sdist" for tools/install_detectron2.py's v0.6 build whose ``_C`` is a stand-in, "missing"
    if there is no loadable ``_C`` (none at all, or one that fails to load, e.g. built against
    another torch)."""
    try:
        from detectron2 import _C
    except ImportError:
        return "missing"
    if getattr(_C, "INSTALL_PATH", None) == "sdist":
        return "sdist"
    extension = str(getattr(_C, "__file__", "")).endswith(
        tuple(importlib.machinery.EXTENSION_SUFFIXES)
    )
    return "compiled" if extension else "missing"


def has_compiled_ops() -> bool:
    return detectron2_install_path() == "compiled"


def build_coco_evaluator(dataset_name, output_dir=None, tasks=("segm", "bbox"), **kwargs):
    """``COCOEvaluator`` for SOLOv2's outputs: segm, and bbox from the tight mask boxes.

    The fast C++ COCO evaluator is used only where the compiled ops exist.
    """
    kwargs.setdefault("use_fast_impl", has_compiled_ops())
    return SOLOv2COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_dir, **kwargs)


class SOLOv2COCOEvaluator(COCOEvaluator):
    """``COCOEvaluator`` that scores a model without a single detection as AP 0, not NaN.

    Detectron2 (v0.6 and main) skips the COCO API when there are no predictions at all and
    reports every metric as NaN. Here the COCO API runs on the empty detection set instead:
    metrics with ground truth come out 0.0, those without (e.g. APs on a dataset without small
    objects, a class absent from the split) NaN, exactly as with detections.
    """

    def _eval_predictions(self, predictions, img_ids=None):
        super()._eval_predictions(predictions, img_ids=img_ids)
        if not getattr(self, "_do_evaluation", True):
            return
        if any(len(p.get("instances", ())) for p in predictions):
            return
        for task in [t for t in self._results if t in ("segm", "bbox")]:
            self._results[task] = self._results_without_detections(task, img_ids)
        logger.warning(
            "The model detected nothing on any of the %d images: %s AP reported as 0.0",
            len(predictions),
            "/".join(t for t in self._results if t in ("segm", "bbox")),
        )

    def _results_without_detections(self, task, img_ids):
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        ground_truth = self._coco_api
        with contextlib.redirect_stdout(io.StringIO()):
            detections = COCO()
            detections.dataset = {
                "images": list(ground_truth.dataset.get("images", [])),
                "categories": copy.deepcopy(ground_truth.dataset.get("categories", [])),
                "annotations": [],
            }
            detections.createIndex()
            evaluation = COCOeval(ground_truth, detections, task)
            if img_ids is not None:
                evaluation.params.imgIds = img_ids
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        return self._derive_coco_results(
            evaluation, task, class_names=self._metadata.get("thing_classes")
        )


def default_trainer_checkpoints_optimizer() -> bool:
    """Whether Detectron2's DefaultTrainer saves and loads its optimizer state in checkpoints
    (upstream main does; v0.6 does not, so a resumed run loses SGD momentum)."""
    return "load_state_dict" in vars(DefaultTrainer)


def restart_data_loader_iterator(simple_trainer) -> None:
    """Makes a SimpleTrainer draw from a fresh iterator of its data loader: v0.6 creates the
    iterator eagerly in ``__init__`` (``_data_loader_iter``), main lazily
    (``_data_loader_iter_obj``)."""
    if "_data_loader_iter_obj" in vars(simple_trainer):
        simple_trainer._data_loader_iter_obj = None
    else:
        simple_trainer._data_loader_iter = iter(simple_trainer.data_loader)
