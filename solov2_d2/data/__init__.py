from .mapper import SOLOv2DatasetMapper
from .shapes import (
    SHAPES_CLASSES,
    SHAPES_COLORS,
    ensure_generated,
    generate_shapes_split,
    register_builtin_shapes,
    register_shapes_dataset,
)

# Registering names is cheap: images are generated on first use (see shapes.py).
register_builtin_shapes()

__all__ = [
    "SOLOv2DatasetMapper",
    "SHAPES_CLASSES",
    "SHAPES_COLORS",
    "ensure_generated",
    "generate_shapes_split",
    "register_builtin_shapes",
    "register_shapes_dataset",
]
