"""Loading published SOLOv2 weights: mmdetection 2.x / 3.x and official SOLO checkpoints next to
ours and AdelaiDet's.

* ``convert``: format detection and the key mapping (pure functions).
* ``checkpointer``: ``SOLOv2Checkpointer`` (safe reading, in-memory conversion, exact-fit checks,
  the fine-tuning rule) and ``convert_checkpoint_file``.
* ``predictor``: ``SOLOv2Predictor``, a ``DefaultPredictor`` that loads through it (not imported
  here, to keep ``import solov2_d2`` free of ``detectron2.engine``).
* ``catalog``: published weights by name (``mmdet://...``, ``solo://...``) and the PathManager
  handler that serves them, registered when this package is imported.
"""

from .catalog import CATALOG, PUBLISHED_WEIGHTS, PublishedWeights, register_handler
from .checkpointer import (
    CheckpointMismatchError,
    SOLOv2Checkpointer,
    UnsafeCheckpointError,
    check_converted_state,
    convert_checkpoint_file,
    read_weights,
)
from .convert import CheckpointFormatError, convert_state_dict, detect_format

register_handler()

__all__ = [
    "CATALOG",
    "PUBLISHED_WEIGHTS",
    "PublishedWeights",
    "SOLOv2Checkpointer",
    "CheckpointMismatchError",
    "CheckpointFormatError",
    "UnsafeCheckpointError",
    "check_converted_state",
    "convert_checkpoint_file",
    "convert_state_dict",
    "detect_format",
    "read_weights",
]
