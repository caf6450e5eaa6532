"""``SOLOv2Checkpointer``: Detectron2's checkpointer that also reads published SOLOv2 weights.

What it adds to ``DetectionCheckpointer``:

* every file but Detectron2's own ``.pkl`` / ``.pyth`` model-zoo formats is read with
  ``torch.load(weights_only=True)``: a checkpoint that needs more than tensors and plain
  containers to unpickle (a pickled callable can run code) is refused, never loaded in full;
* mmdetection 2.x / 3.x and official SOLO SOLOv2 checkpoints are recognized by their keys,
  converted in memory (``convert.py``) and logged ("mmdetection SOLOv2 checkpoint, converted");
* such a converted checkpoint must match the model exactly: a missing, unexpected or
  differently shaped tensor fails, naming the first one and the config key to change. The one
  tolerated difference is the category predictor of another class count (fine-tuning), for every
  format: it stays freshly initialized and a "fine-tuning: ..." line says so.

Our own checkpoints and AdelaiDet's load exactly as with ``DetectionCheckpointer`` (same keys,
same tolerance, Detectron2's warnings), with a config-key hint added to shape warnings.
"""

import logging
import os
import pickle
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .convert import (
    CheckpointFormatError,
    convert_state_dict,
    describe_source,
    detect_format,
    source_versions,
    unwrap_checkpoint,
)

__all__ = [
    "SOLOv2Checkpointer",
    "UnsafeCheckpointError",
    "CheckpointMismatchError",
    "read_checkpoint",
    "read_weights",
    "convert_checkpoint_file",
    "config_key_for",
    "check_converted_state",
    "CATEGORY_PREDICTOR",
]

logger = logging.getLogger(__name__)

# The only tensors allowed to differ in shape from a checkpoint (fine-tuning on other classes).
CATEGORY_PREDICTOR = ("ins_head.cate_pred.weight", "ins_head.cate_pred.bias")

# Input normalization of every mmdetection / official SOLO model (RGB, ImageNet statistics).
MMDET_PIXEL_MEAN = (123.675, 116.28, 103.53)
MMDET_PIXEL_STD = (58.395, 57.12, 57.375)

# Marks, inside a loaded checkpoint dict, the format it was converted from (popped before use).
_FORMAT_KEY = "__solov2_d2_format__"


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint that ``torch.load(weights_only=True)`` refuses to unpickle."""


class CheckpointMismatchError(ValueError):
    """A converted checkpoint whose tensors do not fit the model built from the config."""


def read_checkpoint(path: str) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with a clear error.

    weights_only unpickles tensors, numbers, strings and containers only; anything else (a
    class instance, a callable, a numpy array) fails here and is never constructed. There is no
    fallback to full unpickling: a downloaded file is untrusted."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            "{}: refused to load. The file holds more than tensors and plain containers, and "
            "unpickling it could run code, so solov2_d2 reads checkpoints with "
            "torch.load(weights_only=True) only. If it is a training checkpoint you trust (e.g. "
            "mmengine's, with its message hub), extract its state_dict in the framework that "
            "wrote it and save that alone. torch said: {}".format(path, _first_line(error))
        ) from None


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    unsupported = [line for line in lines if "Unsupported" in line or "GLOBAL" in line]
    return (unsupported or lines or [type(error).__name__])[0].strip()


def read_weights(path: str) -> Tuple[Dict[str, Any], Dict[str, Any], Optional[str], str]:
    """A checkpoint file as (state dict under our names, the rest of the checkpoint, format,
    description). Format is "ours", "mmdet", "solo", or None for weights of no SOLOv2 layout
    (e.g. an ImageNet backbone), returned as they are. Safe to call on untrusted files."""
    checkpoint = read_checkpoint(path)
    state, rest = unwrap_checkpoint(checkpoint, source=path)
    fmt = detect_format(state)
    description = describe_source(fmt) if fmt else "checkpoint"
    if fmt in ("mmdet", "solo"):
        state = convert_state_dict(state, fmt, source=path)
    return state, rest, fmt, description


def convert_checkpoint_file(src: str, dst: str, source: Optional[str] = None) -> Tuple[str, int]:
    """Writes the weights of checkpoint ``src`` (any format of ``read_weights``) under our names
    to ``dst``, a ``.pth`` that Detectron2's plain ``DetectionCheckpointer`` loads:
    ``{"model": state dict, "__author__": ..., "meta": {...}}``, and nothing else of ``src``
    (no optimizer state: our own training checkpoints come out as weights for release). The
    file appears atomically (written beside it, then renamed). ``source`` names the input in the
    metadata (default ``src``). Returns (format, number of tensors)."""
    if not dst.endswith(".pth"):
        raise ValueError(
            "{}: write converted weights as .pth (torch.save, read back with weights_only=True); "
            "Detectron2 reads a .pkl with pickle.load, which can run code".format(dst)
        )
    state, rest, fmt, description = read_weights(src)
    if fmt is None:
        raise CheckpointFormatError(
            "{}: its keys are of no SOLOv2 layout solov2_d2 knows (ours/AdelaiDet, mmdetection, "
            "official SOLO); first keys: {}".format(src, ", ".join(list(state)[:5]))
        )
    tensors = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointFormatError(
                "{}: {} is a {}, not a tensor".format(src, name, type(value).__name__)
            )
        tensors[name] = value.detach().cpu().contiguous()
    versions = source_versions(rest)
    data = {
        "model": tensors,
        "__author__": "solov2_d2 (converted from a {}{})".format(
            description, " of " + versions if versions else ""
        ),
        "meta": {"source": source or src, "format": fmt, "versions": versions},
    }
    directory = os.path.dirname(os.path.abspath(dst))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, ".{}.{}.tmp".format(os.path.basename(dst), os.getpid()))
    try:
        torch.save(data, temporary)
        os.replace(temporary, dst)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return fmt, len(tensors)


def _dim_differs(checkpoint_shape, model_shape, dim: int) -> bool:
    return (
        checkpoint_shape is not None
        and model_shape is not None
        and len(checkpoint_shape) > dim
        and len(model_shape) > dim
        and checkpoint_shape[dim] != model_shape[dim]
    )


def _offset_key(name, problem, checkpoint_shape, model_shape):
    if name.startswith("backbone."):
        if problem == "shape":
            return "MODEL.RESNETS.DEFORM_MODULATED (27 offset channels: True, 18: False)"
        return "MODEL.RESNETS.DEFORM_ON_PER_STAGE"
    if problem == "shape":
        return "MODEL.SOLOV2.TYPE_DCN (DCNv2: 27 offset channels per 3x3, DCN: 18)"
    if name.startswith("ins_head."):
        return "MODEL.SOLOV2.USE_DCN_IN_INSTANCE (and DCN_INSTANCE_CONVS)"
    return "MODEL.SOLOV2.USE_DCN_IN_MASK_FEATURE"


def _instance_head_key(name, problem, checkpoint_shape, model_shape):
    first_dim = _dim_differs(checkpoint_shape, model_shape, 0)
    if name.startswith("ins_head.cate_pred."):
        return "MODEL.SOLOV2.NUM_CLASSES" if first_dim else "MODEL.SOLOV2.INSTANCE_CHANNELS"
    if name.startswith("ins_head.kernel_pred."):
        return "MODEL.SOLOV2.NUM_KERNELS" if first_dim else "MODEL.SOLOV2.INSTANCE_CHANNELS"
    if problem != "shape":
        return "MODEL.SOLOV2.NUM_INSTANCE_CONVS (and MODEL.SOLOV2.NORM: GN)"
    if re.match(r"ins_head\.\w+_tower\.0\.weight", name) and not first_dim:
        return "MODEL.FPN.OUT_CHANNELS (the towers' input)"
    return "MODEL.SOLOV2.INSTANCE_CHANNELS"


def _mask_head_key(name, problem, checkpoint_shape, model_shape):
    first_dim = _dim_differs(checkpoint_shape, model_shape, 0)
    if problem != "shape":
        if name.startswith("mask_head.conv_pred."):
            return "MODEL.SOLOV2.NORM (GN)"
        return "MODEL.SOLOV2.MASK_IN_FEATURES (and MODEL.SOLOV2.NORM: GN)"
    if name.startswith("mask_head.conv_pred."):
        return "MODEL.SOLOV2.NUM_MASKS" if first_dim else "MODEL.SOLOV2.MASK_CHANNELS"
    if ".conv0.0.weight" in name and not first_dim:
        return "MODEL.FPN.OUT_CHANNELS (the mask head's input)"
    return "MODEL.SOLOV2.MASK_CHANNELS"


def _fpn_key(name, problem, checkpoint_shape, model_shape):
    if ".norm." in name:
        return "MODEL.FPN.NORM"
    if problem != "shape":
        return "MODEL.FPN.IN_FEATURES"
    if _dim_differs(checkpoint_shape, model_shape, 0):
        return "MODEL.FPN.OUT_CHANNELS"
    return "MODEL.RESNETS.DEPTH (the FPN's input channels; RES2_OUT_CHANNELS: 64 for R18/34)"


def _resnet_key(name, problem, checkpoint_shape, model_shape):
    if ".norm." in name and problem != "shape":
        return "MODEL.RESNETS.NORM (FrozenBN)"
    if name.startswith("backbone.bottom_up.stem."):
        return "MODEL.RESNETS.STEM_OUT_CHANNELS"
    if problem != "shape":
        return "MODEL.RESNETS.DEPTH"
    if name.endswith(".conv2.weight") and _dim_differs(checkpoint_shape, model_shape, 1):
        return "MODEL.RESNETS.NUM_GROUPS / MODEL.RESNETS.WIDTH_PER_GROUP"
    return "MODEL.RESNETS.DEPTH (or NUM_GROUPS / WIDTH_PER_GROUP, RES2_OUT_CHANNELS: 64 for R18/34)"


# Which part of the model a tensor belongs to -> how to name its config key.
_CONFIG_KEY_RULES = (
    (lambda name: "conv_offset" in name or "conv2_offset" in name, _offset_key),
    (lambda name: name.startswith("ins_head."), _instance_head_key),
    (lambda name: name.startswith("mask_head."), _mask_head_key),
    (lambda name: name.startswith("backbone.fpn_"), _fpn_key),
    (lambda name: name.startswith("backbone.bottom_up."), _resnet_key),
)


def config_key_for(name: str, problem: str, checkpoint_shape=None, model_shape=None) -> str:
    """The config key(s) that decide tensor ``name`` of our model, for ``problem`` "missing" (in
    the model, not the checkpoint), "unexpected" (the reverse) or "shape"."""
    for applies, key in _CONFIG_KEY_RULES:
        if applies(name):
            return key(name, problem, checkpoint_shape, model_shape)
    return "the model's config"


def _is_class_count_difference(name: str, checkpoint_shape, model_shape) -> bool:
    return (
        name in CATEGORY_PREDICTOR
        and len(checkpoint_shape) == len(model_shape)
        and tuple(checkpoint_shape[1:]) == tuple(model_shape[1:])
    )


def check_converted_state(
    model_shapes: Dict[str, Sequence[int]],
    checkpoint_shapes: Dict[str, Sequence[int]],
    source: str,
    description: str,
) -> List[str]:
    """Checks a converted checkpoint against the model, both given as name -> shape.

    Returns the category-predictor tensors that differ only in the class count (left to the
    checkpointer's fine-tuning path); raises ``CheckpointMismatchError`` for anything else that
    is missing, unexpected or differently shaped, naming the first such tensor (in the model's
    order, then the checkpoint's) and the config key that decides it."""
    problems = []
    class_count = []
    for name, shape in model_shapes.items():
        if name not in checkpoint_shapes:
            problems.append((name, "missing", None, tuple(shape)))
        elif tuple(checkpoint_shapes[name]) != tuple(shape):
            if _is_class_count_difference(name, checkpoint_shapes[name], shape):
                class_count.append(name)
            else:
                problems.append((name, "shape", tuple(checkpoint_shapes[name]), tuple(shape)))
    for name, shape in checkpoint_shapes.items():
        if name not in model_shapes:
            problems.append((name, "unexpected", tuple(shape), None))
    if not problems:
        return class_count
    name, problem, checkpoint_shape, model_shape = problems[0]
    what = {
        "missing": "the model has {} {} that the checkpoint lacks".format(name, model_shape),
        "unexpected": "the checkpoint has {} {} that the model lacks".format(
            name, checkpoint_shape
        ),
        "shape": "{} is {} in the checkpoint but {} in the model".format(
            name, checkpoint_shape, model_shape
        ),
    }[problem]
    raise CheckpointMismatchError(
        "{}: this {} does not fit the model built from the config: {} ({} mismatching tensors in "
        "all). Change {} to match the checkpoint (for published weights, start from the "
        "matching config in configs/).".format(
            source,
            description,
            what,
            len(problems),
            config_key_for(name, problem, checkpoint_shape, model_shape),
        )
    )


class SOLOv2Checkpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that reads checkpoints with ``weights_only=True`` and converts
    mmdetection / official SOLO SOLOv2 weights in memory (module docstring). A drop-in
    replacement: same constructor, ``load``, ``resume_or_load`` and ``save``."""

    def _load_file(self, filename: str) -> Dict[str, Any]:
        if filename.endswith((".pkl", ".pyth")):
            # Detectron2's own model-zoo formats (ImageNet backbones, Caffe2 / pycls weights).
            return super()._load_file(filename)
        loaded = read_checkpoint(filename)
        try:
            state, rest = unwrap_checkpoint(loaded, source=filename)
            fmt = detect_format(state)
        except CheckpointFormatError:
            if isinstance(loaded, dict) and "model" not in loaded:
                loaded = {"model": loaded}
            return loaded  # what DetectionCheckpointer returns; it reports the problem itself
        if fmt not in ("mmdet", "solo"):
            # Ours, AdelaiDet's, or foreign weights of no SOLOv2 layout: as Detectron2 does.
            return loaded if "model" in loaded else dict(rest, model=state)
        converted = convert_state_dict(state, fmt, source=filename)
        versions = source_versions(rest)
        self.logger.info(
            "%s, converted (%d tensors%s): %s",
            describe_source(fmt),
            len(converted),
            "; " + versions if versions else "",
            filename,
        )
        return {
            "model": converted,
            _FORMAT_KEY: fmt,
            "__source__": filename,
        }

    def _load_model(self, checkpoint: Dict[str, Any]):
        fmt = checkpoint.pop(_FORMAT_KEY, None)
        source = checkpoint.pop("__source__", "checkpoint")
        if fmt in ("mmdet", "solo"):
            model_shapes = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
            checkpoint_shapes = {k: tuple(v.shape) for k, v in checkpoint["model"].items()}
            check_converted_state(model_shapes, checkpoint_shapes, source, describe_source(fmt))
            self._check_pytorch_style(source, fmt)
        return super()._load_model(checkpoint)

    def _check_pytorch_style(self, source: str, fmt: str) -> None:
        """mmdet's and official SOLO's ResNets stride in the 3x3 conv (pytorch style) and read
        RGB images normalized with ImageNet statistics: a model built otherwise gets every tensor
        and computes something else. The stride is architecture (an error), the normalization a
        warning (its keys may be set on purpose)."""
        bottom_up = getattr(getattr(self.model, "backbone", None), "bottom_up", None)
        block = getattr(bottom_up, "res3", None)
        conv1 = getattr(block[0], "conv1", None) if block is not None and len(block) else None
        # Only bottlenecks have the choice (BasicBlocks, R18/R34, stride in their 3x3 conv1).
        bottleneck = conv1 is not None and tuple(getattr(conv1, "kernel_size", (1, 1))) == (1, 1)
        if bottleneck and tuple(getattr(conv1, "stride", (1, 1))) != (1, 1):
            raise CheckpointMismatchError(
                "{}: the {} was trained with a pytorch-style ResNet (stride 2 in the 3x3 conv), "
                "the model strides in the 1x1 conv: set MODEL.RESNETS.STRIDE_IN_1X1 False".format(
                    source, describe_source(fmt)
                )
            )
        mean = getattr(self.model, "pixel_mean", None)
        std = getattr(self.model, "pixel_std", None)
        if mean is None or std is None:
            return
        expected = (torch.tensor(MMDET_PIXEL_MEAN), torch.tensor(MMDET_PIXEL_STD))
        if not (
            torch.allclose(mean.flatten().cpu().float(), expected[0])
            and torch.allclose(std.flatten().cpu().float(), expected[1])
        ):
            self.logger.warning(
                "%s: the %s expects RGB input normalized with mean %s and std %s; the model has "
                "MODEL.PIXEL_MEAN %s, MODEL.PIXEL_STD %s. Unless that is intended, set "
                "INPUT.FORMAT RGB and those two keys.",
                source,
                describe_source(fmt),
                list(MMDET_PIXEL_MEAN),
                list(MMDET_PIXEL_STD),
                [round(float(v), 3) for v in mean.flatten()],
                [round(float(v), 3) for v in std.flatten()],
            )

    def _log_incompatible_keys(self, incompatible) -> None:
        """The category predictor of another class count is the fine-tuning case: one info line
        instead of Detectron2's two warnings. Other shape differences get the config key."""
        class_count = [
            (name, ckpt, model)
            for name, ckpt, model in incompatible.incorrect_shapes
            if _is_class_count_difference(name, ckpt, model)
        ]
        if class_count:
            names = {name for name, _, _ in class_count}
            incompatible.incorrect_shapes[:] = [
                entry for entry in incompatible.incorrect_shapes if entry[0] not in names
            ]
            incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in names]
            self.logger.info(
                "fine-tuning: the checkpoint's category predictor has %d classes, the model "
                "(MODEL.SOLOV2.NUM_CLASSES) %d: %s left at their initialization, every other "
                "weight loaded",
                class_count[0][1][0],
                class_count[0][2][0],
                ", ".join(sorted(names)),
            )
        for name, ckpt, model in incompatible.incorrect_shapes:
            self.logger.warning(
                "%s: %s in the checkpoint, %s in the model; it is decided by %s",
                name,
                ckpt,
                model,
                config_key_for(name, "shape", ckpt, model),
            )
        super()._log_incompatible_keys(incompatible)
