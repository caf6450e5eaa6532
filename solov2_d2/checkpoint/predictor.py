"""``SOLOv2Predictor``: Detectron2's ``DefaultPredictor`` loading through ``SOLOv2Checkpointer``.

A module of its own so that ``import solov2_d2`` does not import ``detectron2.engine``.
"""

from detectron2.engine import DefaultPredictor

from .checkpointer import SOLOv2Checkpointer

__all__ = ["SOLOv2Predictor"]


class SOLOv2Predictor(DefaultPredictor):
    """``DefaultPredictor`` whose ``cfg.MODEL.WEIGHTS`` goes through ``SOLOv2Checkpointer``, so
    that it may be an mmdetection / official SOLO checkpoint too."""

    def __init__(self, cfg):
        weights = cfg.MODEL.WEIGHTS
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.WEIGHTS = ""  # DefaultPredictor's own DetectionCheckpointer loads nothing
        super().__init__(cfg)
        SOLOv2Checkpointer(self.model).load(weights)
        self.cfg.MODEL.WEIGHTS = weights
