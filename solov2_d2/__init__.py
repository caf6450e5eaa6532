"""SOLOv2 for Detectron2. Importing this package registers the "SOLOv2" META_ARCHITECTURE and the
``mmdet://`` / ``solo://`` names of published weights with Detectron2's PathManager."""

from . import checkpoint  # noqa: F401  (registers the mmdet:// and solo:// handler)
from .config import add_solov2_config
from .modeling.matrix_nms import mask_nms, matrix_nms
from .modeling.solov2 import SOLOv2

__all__ = ["add_solov2_config", "SOLOv2", "matrix_nms", "mask_nms"]
