"""The few differences between Detectron2 v0.6 (our sdist build) and today's upstream main.

Everything else in solov2_d2 uses APIs present in both.
"""
import functools

from detectron2.evaluation import COCOEvaluator

__all__ = ["has_compiled_ops", "detectron2_install_path", "build_coco_evaluator"]


@functools.lru_cache(maxsize=None)
def detectron2_install_path() -> str:
    """ "compiled" for a build with its C++/CUDA ops, "sdist" for tools/install_detectron2.py's
    v0.6 build whose ``detectron2._C`` is a stand-in, "missing" if there is no ``_C`` at all."""
    try:
        from detectron2 import _C
    except ImportError:
        return "missing"
    return getattr(_C, "INSTALL_PATH", "compiled")


def has_compiled_ops() -> bool:
    return detectron2_install_path() == "compiled"


def build_coco_evaluator(dataset_name, output_dir=None, tasks=("segm", "bbox"), **kwargs):
    """``COCOEvaluator`` for SOLOv2's outputs: segm, and bbox from the tight mask boxes.

    The fast C++ COCO evaluator is used only where the compiled ops exist.
    """
    kwargs.setdefault("use_fast_impl", has_compiled_ops())
    return COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_dir, **kwargs)
