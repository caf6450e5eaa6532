"""SOLOv2 for Detectron2. Importing this package registers the "SOLOv2" META_ARCHITECTURE."""

from .config import add_solov2_config
from .modeling.matrix_nms import mask_nms, matrix_nms
from .modeling.solov2 import SOLOv2

__all__ = ["add_solov2_config", "SOLOv2", "matrix_nms", "mask_nms"]
