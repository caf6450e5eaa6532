# Importing the package registers build_solov2_resnet_fpn_backbone in BACKBONE_REGISTRY.
from .backbone import build_solov2_resnet_fpn_backbone  # noqa: F401
