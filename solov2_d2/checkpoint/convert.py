"""Checkpoint formats of published SOLOv2 weights and their key mapping to ours.

Everything here is pure (dicts in, dicts out) and loads nothing from disk: the checkpointer
(``checkpointer.py``), the ``mmdet://`` / ``solo://`` handler (``catalog.py``) and
tools/convert_checkpoint.py share it.

Formats, told apart by their keys:

* ``"ours"``: solov2_d2's own names, which are AdelaiDet's (``backbone.bottom_up.*``,
  ``backbone.fpn_*``, ``ins_head.*``, ``mask_head.convs_all_levels.*``). Loaded as they are.
* ``"mmdet"``: mmdetection 2.x / 3.x ``SOLOV2Head`` (configs/solov2/): ``backbone.*`` (mmdet's
  ResNet), ``neck.*`` (FPN), ``mask_head.*`` with the mask feature branch at
  ``mask_head.mask_feature_head.*``. mmdet 3 reads the 2.x files unchanged (same keys).
* ``"solo"``: the official WXinlong/SOLO (mmdetection 1.x based): ``backbone.*``, ``neck.*``,
  ``bbox_head.*`` (``SOLOv2Head``) and ``mask_feat_head.*`` (``MaskFeatHead``).

All three foreign layouts are mmcv ``ConvModule``s (``.conv`` + ``.gn``) in the heads, torchvision
style ResNets (``layerN.B.convK`` / ``bnK`` / ``downsample``) and mmdet's FPN
(``lateral_convs`` / ``fpn_convs``); the mapping below is the one table for all of them.
"""

import re
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

__all__ = [
    "FORMAT_NAMES",
    "CheckpointFormatError",
    "detect_format",
    "unwrap_checkpoint",
    "convert_state_dict",
    "describe_source",
    "source_versions",
]

# How the log and the error messages name each format.
FORMAT_NAMES = {
    "ours": "solov2_d2 / AdelaiDet",
    "mmdet": "mmdetection SOLOv2",
    "solo": "official SOLO (WXinlong/SOLO) SOLOv2",
}


class CheckpointFormatError(ValueError):
    """A checkpoint whose keys are not one of the known SOLOv2 layouts, or a key that the
    mapping of its layout does not know."""


def _stage(match: "re.Match") -> str:
    # torchvision/mmdet ResNet stages are layer1..layer4; Detectron2's are res2..res5.
    return "res{}".format(int(match.group("stage")) + 1)


def _sub(template: str) -> Callable[["re.Match"], str]:
    """A replacement for ``re.Match``: ``template`` formatted with the match's named groups plus
    ``res`` (Detectron2's stage name), ``fpn`` (FPN level of index ``i``: 0 -> 2), ``conv`` and
    ``norm`` (indices 3i and 3i + 1 of our flat [conv, GN, ReLU] towers)."""

    def replace(match):
        groups = match.groupdict()
        values = dict(groups)
        if groups.get("stage") is not None:
            values["res"] = _stage(match)
        if groups.get("i") is not None:
            i = int(groups["i"])
            values.update(fpn=i + 2, conv=3 * i, norm=3 * i + 1)
        return template.format(**values)

    return replace


_P = r"(?P<p>weight|bias|running_mean|running_var)"
_W = r"(?P<p>weight|bias)"

# Backbone and neck: the same in mmdet 1.x (official SOLO), 2.x and 3.x.
_BACKBONE_RULES: List[Tuple[str, Callable]] = [
    (r"backbone\.conv1\.weight", _sub("backbone.bottom_up.stem.conv1.weight")),
    (r"backbone\.bn1\." + _P, _sub("backbone.bottom_up.stem.conv1.norm.{p}")),
    # Deformable conv2 of a bottleneck: mmcv's ModulatedDeformConv2dPack keeps its offset conv at
    # conv2.conv_offset; mmdet <= 1.0rc0 (and mmcv's _load_from_state_dict, which still upgrades
    # it) had it beside the conv, as conv2_offset. Detectron2's DeformBottleneckBlock has the
    # latter layout.
    (
        r"backbone\.layer(?P<stage>\d+)\.(?P<b>\d+)\.conv2(?:\.conv_offset|_offset)\." + _W,
        _sub("backbone.bottom_up.{res}.{b}.conv2_offset.{p}"),
    ),
    (
        r"backbone\.layer(?P<stage>\d+)\.(?P<b>\d+)\.conv(?P<k>\d)\.weight",
        _sub("backbone.bottom_up.{res}.{b}.conv{k}.weight"),
    ),
    (
        r"backbone\.layer(?P<stage>\d+)\.(?P<b>\d+)\.bn(?P<k>\d)\." + _P,
        _sub("backbone.bottom_up.{res}.{b}.conv{k}.norm.{p}"),
    ),
    (
        r"backbone\.layer(?P<stage>\d+)\.(?P<b>\d+)\.downsample\.0\.weight",
        _sub("backbone.bottom_up.{res}.{b}.shortcut.weight"),
    ),
    (
        r"backbone\.layer(?P<stage>\d+)\.(?P<b>\d+)\.downsample\.1\." + _P,
        _sub("backbone.bottom_up.{res}.{b}.shortcut.norm.{p}"),
    ),
    (r"neck\.lateral_convs\.(?P<i>\d+)\.conv\." + _W, _sub("backbone.fpn_lateral{fpn}.{p}")),
    (r"neck\.fpn_convs\.(?P<i>\d+)\.conv\." + _W, _sub("backbone.fpn_output{fpn}.{p}")),
]


def _tower_rules(prefix: str, towers: Mapping[str, str]) -> List[Tuple[str, Callable]]:
    """ConvModule towers ``<prefix><theirs>.<i>.conv`` / ``.gn`` -> ``ins_head.<ours>.<3i>`` /
    ``.<3i+1>``; a deformable conv's offset conv (``.conv.conv_offset``) goes with its conv."""
    rules = []
    for theirs, ours in towers.items():
        base = re.escape(prefix + theirs) + r"\.(?P<i>\d+)\."
        rules += [
            (
                base + r"conv\.conv_offset\." + _W,
                _sub("ins_head." + ours + ".{conv}.conv_offset.{p}"),
            ),
            (base + r"conv\." + _W, _sub("ins_head." + ours + ".{conv}.{p}")),
            (base + r"gn\." + _W, _sub("ins_head." + ours + ".{norm}.{p}")),
        ]
    return rules


def _mask_feature_rules(prefix: str, conv_pred: str) -> List[Tuple[str, Callable]]:
    """The mask feature branch: ``<prefix>convs_all_levels.<l>.conv<j>.conv`` / ``.gn`` ->
    ``mask_head.convs_all_levels.<l>.conv<j>.0`` / ``.1``, and ``<prefix><conv_pred>.conv`` /
    ``.gn`` -> ``mask_head.conv_pred.0`` / ``.1``."""
    level = re.escape(prefix) + r"convs_all_levels\.(?P<l>\d+)\.conv(?P<j>\d+)\."
    pred = re.escape(prefix + conv_pred) + r"\."
    ours = "mask_head.convs_all_levels.{l}.conv{j}"
    return [
        (level + r"conv\.conv_offset\." + _W, _sub(ours + ".0.conv_offset.{p}")),
        (level + r"conv\." + _W, _sub(ours + ".0.{p}")),
        (level + r"gn\." + _W, _sub(ours + ".1.{p}")),
        (pred + r"conv\.conv_offset\." + _W, _sub("mask_head.conv_pred.0.conv_offset.{p}")),
        (pred + r"conv\." + _W, _sub("mask_head.conv_pred.0.{p}")),
        (pred + r"gn\." + _W, _sub("mask_head.conv_pred.1.{p}")),
    ]


def _predictor_rules(prefix: str, cate: str, kernel: str) -> List[Tuple[str, Callable]]:
    return [
        (re.escape(prefix + cate) + r"\." + _W, _sub("ins_head.cate_pred.{p}")),
        (re.escape(prefix + kernel) + r"\." + _W, _sub("ins_head.kernel_pred.{p}")),
    ]


# mmdetection 2.x / 3.x: mmdet/models/dense_heads/solov2_head.py (SOLOV2Head, MaskFeatModule).
_MMDET_RULES = (
    _BACKBONE_RULES
    + _tower_rules("mask_head.", {"kernel_convs": "kernel_tower", "cls_convs": "cate_tower"})
    + _predictor_rules("mask_head.", cate="conv_cls", kernel="conv_kernel")
    + _mask_feature_rules("mask_head.mask_feature_head.", conv_pred="conv_pred")
)

# Official SOLO: mmdet/models/anchor_heads/solov2_head.py (SOLOv2Head) and
# mmdet/models/mask_heads/mask_feat_head.py (MaskFeatHead, conv_pred an nn.Sequential of one
# ConvModule, hence conv_pred.0).
_SOLO_RULES = (
    _BACKBONE_RULES
    + _tower_rules("bbox_head.", {"kernel_convs": "kernel_tower", "cate_convs": "cate_tower"})
    + _predictor_rules("bbox_head.", cate="solo_cate", kernel="solo_kernel")
    + _mask_feature_rules("mask_feat_head.", conv_pred="conv_pred.0")
)

_RULES = {
    fmt: [(re.compile(pattern + r"\Z"), replace) for pattern, replace in rules]
    for fmt, rules in (("mmdet", _MMDET_RULES), ("solo", _SOLO_RULES))
}


def _is_tensor_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(k, str) for k in value)


def unwrap_checkpoint(checkpoint: Any, source: str = "checkpoint") -> Tuple[Dict[str, Any], Dict]:
    """The weights of a loaded checkpoint and the rest of it.

    Accepts the wrappers in use: Detectron2/fvcore's ``{"model": ...}``, mmcv / mmengine's
    ``{"state_dict": ..., "meta": ...}`` (mmdet 1.x, 2.x and 3.x), and a bare state dict.
    A ``module.`` prefix on every key (a model saved inside DataParallel) is removed, as mmcv's
    ``load_checkpoint`` does. ``source`` names the file in errors."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointFormatError(
            "{}: expected a dict of weights, found a {}".format(source, type(checkpoint).__name__)
        )
    for key in ("state_dict", "model"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            state = checkpoint[key]
            rest = {k: v for k, v in checkpoint.items() if k != key}
            break
    else:
        state, rest = checkpoint, {}
    if not _is_tensor_dict(state):
        raise CheckpointFormatError("{}: it holds no named weights".format(source))
    if all(k.startswith("module.") for k in state):
        state = OrderedDict((k[len("module.") :], v) for k, v in state.items())
    return dict(state), rest


def detect_format(state: Mapping[str, Any]) -> Optional[str]:
    """``"ours"``, ``"mmdet"`` or ``"solo"`` from the keys of a state dict, or None for weights
    that are none of them (e.g. an ImageNet backbone), which are left to Detectron2."""
    keys = list(state)

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    if has("ins_head.") or has("backbone.bottom_up."):
        return "ours"
    if has("mask_head.mask_feature_head.") or has("mask_head.kernel_convs."):
        return "mmdet"
    if has("mask_feat_head.") or has("bbox_head.kernel_convs."):
        return "solo"
    if has("mask_head.") or has("bbox_head."):
        heads = sorted({k.split(".")[0] + "." + k.split(".")[1] for k in keys if "." in k})
        raise CheckpointFormatError(
            "an mmdetection-style checkpoint whose heads are not SOLOv2's ({}): solov2_d2 "
            "converts SOLOv2 checkpoints only (mmdetection's SOLOV2Head, official SOLO's "
            "SOLOv2Head + MaskFeatHead)".format(", ".join(h for h in heads if "head" in h))
        )
    return None


def convert_state_dict(state: Mapping[str, Any], fmt: str, source: str = "checkpoint") -> Dict:
    """``state`` (keys of format ``fmt``) under our names, in its order; values untouched.

    BatchNorm ``num_batches_tracked`` counters are dropped (Detectron2's FrozenBatchNorm2d has
    none). A key no rule of ``fmt`` maps fails with a ``CheckpointFormatError`` naming it and
    ``source``. ``"ours"`` returns a copy unchanged."""
    if fmt == "ours":
        return dict(state)
    if fmt not in _RULES:
        raise ValueError("unknown checkpoint format {!r} (known: {})".format(fmt, list(_RULES)))
    converted: Dict[str, Any] = OrderedDict()
    origin: Dict[str, str] = {}
    for key, value in state.items():
        if key.endswith(".num_batches_tracked"):
            continue
        for pattern, replace in _RULES[fmt]:
            match = pattern.match(key)
            if match:
                new_key = replace(match)
                break
        else:
            raise CheckpointFormatError(
                "{}: key {!r} of this {} checkpoint has no counterpart in solov2_d2's model "
                "(solov2_d2/checkpoint/convert.py maps backbone.*, neck.lateral_convs / "
                "fpn_convs and the SOLOv2 heads)".format(source, key, FORMAT_NAMES[fmt])
            )
        if new_key in converted:
            raise CheckpointFormatError(
                "{}: keys {!r} and {!r} both map to {!r}".format(
                    source, origin[new_key], key, new_key
                )
            )
        converted[new_key] = value
        origin[new_key] = key
    return dict(converted)


def describe_source(fmt: str) -> str:
    """``"mmdetection SOLOv2 checkpoint"`` and the like: how logs and errors name a format."""
    return FORMAT_NAMES[fmt] + " checkpoint"


def source_versions(rest: Mapping[str, Any]) -> str:
    """``"mmdet 2.24.0"`` and the like from a checkpoint's ``meta`` (mmcv writes
    ``mmdet_version``, mmengine ``mmengine_version``); "" without them."""
    meta = rest.get("meta") if isinstance(rest.get("meta"), Mapping) else {}
    versions = []
    for key, name in (("mmdet_version", "mmdet"), ("mmengine_version", "mmengine")):
        if isinstance(meta.get(key), str):
            versions.append("{} {}".format(name, meta[key]))
    return ", ".join(versions)
