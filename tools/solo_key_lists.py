#!/usr/bin/env python
"""Writes tests/data/solo_keys/<model>.json: the parameter and buffer names and shapes of the
official SOLOv2 checkpoints (github.com/WXinlong/SOLO), without downloading them.

    python tools/solo_key_lists.py            # (re)write the nine lists
    python tools/solo_key_lists.py --check    # exit 1 if a stored list differs from the rules

The rules below encode the official modules as read from their source, not from this project's
model (that would test our code against itself):

- SOLO is built on mmdetection v1.0.0. Its ResNet / ResNeXt (mmdet/models/backbones/resnet.py,
  resnext.py): torchvision names (conv1, bn1, layer{1..4}.{j}.conv{k}, bn{k}, downsample.0/.1);
  BasicBlock (depth 18/34: two 3x3 convs) or Bottleneck (1x1, 3x3, 1x1, expansion 4); ResNeXt
  width = floor(planes * base_width / 64) * groups, the 3x3 conv grouped. v1.0.0 builds the
  deformable conv2 through build_conv_layer (changelog: "Encapsulate the DCN in ResNe(X)t into a
  ConvModule & Conv_layers", #1894), so its offset conv is a child: conv2.conv_offset.{weight,
  bias}, 18 (DCN) or 27 (DCNv2) channels per deformable group, no bias on the deformable conv.
- FPN (mmdet/models/necks/fpn.py): lateral_convs.{i}.conv and fpn_convs.{i}.conv, ConvModules
  without norm, hence with bias; p6 by max-pooling (no parameters; num_outs 5, no extra convs).
- SOLOv2Head / SOLOv2LightHead (mmdet/models/anchor_heads/solov2_head.py, solov2_light_head.py):
  cate_convs / kernel_convs, stacked_convs ConvModules each (3x3, GN named "gn", no bias); the
  first kernel conv takes in_channels + 2 (coordinates); use_dcn_in_tower puts type_dcn in every
  tower conv (SOLOv2Head) or in the last one only (SOLOv2LightHead); solo_cate (num_classes - 1
  outputs: the configs' 81 count the background) and solo_kernel (ins_out_channels), plain 3x3
  convs with bias.
- MaskFeatHead (mmdet/models/mask_heads/mask_feat_head.py): convs_all_levels.{i}.conv{j}
  ConvModules (3x3, GN, no bias; level i has i convs, level 0 one; the top level's first conv
  takes in_channels + 2), conv_pred.0 a 1x1 ConvModule with GN to num_classes channels; conv_cfg
  (DCNv2 in the R101/X101-DCN configs) applies to all of them, the 1x1 included.
- Checkpoint prefixes are the detector's attributes: backbone., neck., mask_feat_head., bbox_head.

The same rules with mmdetection 3.x's names (``--publisher mmdet``) reproduce
../shared/reference/mmdet/*.json exactly; tests/test_model_zoo.py checks that, which is how the
shapes of these rules are checked against a second, independent list.

Like the mmdet lists, the lists hold no ``num_batches_tracked`` entries (shape [] BatchNorm
counters, which real checkpoints saved by PyTorch do contain).
"""

import argparse
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "tests", "data", "solo_keys")

# Architectures of the official configs (WXinlong/SOLO configs/solov2/<config>.py), as read there.
_FULL = dict(stacked_convs=4, feat_channels=512, ins_out_channels=256, light_head=False)
_LIGHT = dict(stacked_convs=2, feat_channels=256, ins_out_channels=128, light_head=False)
OFFICIAL_MODELS = {
    "SOLOv2_R50_1x": dict(config="solov2_r50_fpn_8gpu_1x.py", depth=50, **_FULL),
    "SOLOv2_R50_3x": dict(config="solov2_r50_fpn_8gpu_3x.py", depth=50, **_FULL),
    "SOLOv2_R101_3x": dict(config="solov2_r101_fpn_8gpu_3x.py", depth=101, **_FULL),
    "SOLOv2_R101_DCN_3x": dict(
        config="solov2_r101_dcn_fpn_8gpu_3x.py",
        depth=101,
        backbone_dcn="DCNv2",
        head_dcn="DCNv2",
        mask_feat_dcn="DCNv2",
        **_FULL,
    ),
    "SOLOv2_X101_DCN_3x": dict(
        config="solov2_x101_dcn_fpn_8gpu_3x.py",
        depth=101,
        groups=64,
        base_width=4,
        backbone_dcn="DCNv2",
        head_dcn="DCNv2",
        mask_feat_dcn="DCNv2",
        **_FULL,
    ),
    "SOLOv2_Light_448_R18_3x": dict(
        config="solov2_light_448_r18_fpn_8gpu_3x.py", depth=18, **_LIGHT
    ),
    "SOLOv2_Light_448_R34_3x": dict(
        config="solov2_light_448_r34_fpn_8gpu_3x.py", depth=34, **_LIGHT
    ),
    "SOLOv2_Light_448_R50_3x": dict(
        config="solov2_light_448_r50_fpn_8gpu_3x.py", depth=50, **_LIGHT
    ),
    "SOLOv2_Light_512_DCN_R50_3x": dict(
        config="solov2_light_512_dcn_r50_fpn_8gpu_3x.py",
        depth=50,
        stacked_convs=3,
        feat_channels=256,
        ins_out_channels=128,
        light_head=True,
        backbone_dcn="DCN",
        head_dcn="DCN",
    ),
}

# The same architectures in mmdetection 3.x (configs/solov2/<name>.py there), for the cross-check.
MMDET_MODELS = {
    "solov2_r50_fpn_1x_coco": dict(depth=50, **_FULL),
    "solov2_r50_fpn_ms-3x_coco": dict(depth=50, **_FULL),
    "solov2_r101_fpn_ms-3x_coco": dict(depth=101, **_FULL),
    "solov2_r101-dcn_fpn_ms-3x_coco": dict(
        depth=101, backbone_dcn="DCNv2", head_dcn="DCNv2", mask_feat_dcn="DCNv2", **_FULL
    ),
    "solov2_x101-dcn_fpn_ms-3x_coco": dict(
        depth=101,
        groups=64,
        base_width=4,
        backbone_dcn="DCNv2",
        head_dcn="DCNv2",
        mask_feat_dcn="DCNv2",
        **_FULL,
    ),
    "solov2-light_r18_fpn_ms-3x_coco": dict(depth=18, **_LIGHT),
    "solov2-light_r34_fpn_ms-3x_coco": dict(depth=34, **_LIGHT),
    "solov2-light_r50_fpn_ms-3x_coco": dict(depth=50, **_LIGHT),
    # dcn_apply_to_all_conv=False: DCNv2 in the last tower conv only.
    "solov2-light_r50-dcn_fpn_ms-3x_coco": dict(
        depth=50,
        stacked_convs=3,
        feat_channels=256,
        ins_out_channels=128,
        light_head=True,
        backbone_dcn="DCNv2",
        head_dcn="DCNv2",
    ),
}

# Module names of the two publishers (the shapes are the same).
NAMES = {
    "solo": dict(
        cate_convs="bbox_head.cate_convs",
        kernel_convs="bbox_head.kernel_convs",
        cate_pred="bbox_head.solo_cate",
        kernel_pred="bbox_head.solo_kernel",
        mask_feat="mask_feat_head",
        conv_pred="mask_feat_head.conv_pred.0",
    ),
    "mmdet": dict(
        cate_convs="mask_head.cls_convs",
        kernel_convs="mask_head.kernel_convs",
        cate_pred="mask_head.conv_cls",
        kernel_pred="mask_head.conv_kernel",
        mask_feat="mask_head.mask_feature_head",
        conv_pred="mask_head.mask_feature_head.conv_pred",
    ),
}

STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
OFFSET_CHANNELS = {"DCN": 2, "DCNv2": 3}  # per kernel tap and deformable group


def _bn(keys, prefix, channels):
    for suffix in ("weight", "bias", "running_mean", "running_var"):
        keys.append([prefix + "." + suffix, [channels]])


def _conv(keys, prefix, out_ch, in_ch, k, groups=1, bias=False, dcn=None):
    keys.append([prefix + ".weight", [out_ch, in_ch // groups, k, k]])
    if bias:
        keys.append([prefix + ".bias", [out_ch]])
    if dcn is not None:
        # deformable_groups 1; the offset conv sees all input channels (no groups), with bias.
        offset = OFFSET_CHANNELS[dcn] * k * k
        keys.append([prefix + ".conv_offset.weight", [offset, in_ch, k, k]])
        keys.append([prefix + ".conv_offset.bias", [offset]])


def backbone_keys(depth, groups=1, base_width=64, dcn=None):
    keys = []
    _conv(keys, "backbone.conv1", 64, 3, 7)
    _bn(keys, "backbone.bn1", 64)
    basic = depth in (18, 34)
    expansion = 1 if basic else 4
    inplanes = 64
    for stage, num_blocks in enumerate(STAGE_BLOCKS[depth]):
        planes = 64 * 2**stage
        stage_dcn = dcn if stage > 0 else None  # stage_with_dcn=(False, True, True, True)
        for block in range(num_blocks):
            p = "backbone.layer{}.{}".format(stage + 1, block)
            if basic:
                _conv(keys, p + ".conv1", planes, inplanes, 3)
                _bn(keys, p + ".bn1", planes)
                _conv(keys, p + ".conv2", planes, planes, 3)
                _bn(keys, p + ".bn2", planes)
            else:
                width = planes if groups == 1 else math.floor(planes * base_width / 64) * groups
                _conv(keys, p + ".conv1", width, inplanes, 1)
                _bn(keys, p + ".bn1", width)
                _conv(keys, p + ".conv2", width, width, 3, groups=groups, dcn=stage_dcn)
                _bn(keys, p + ".bn2", width)
                _conv(keys, p + ".conv3", planes * expansion, width, 1)
                _bn(keys, p + ".bn3", planes * expansion)
            if block == 0 and (stage > 0 or inplanes != planes * expansion):
                _conv(keys, p + ".downsample.0", planes * expansion, inplanes, 1)
                _bn(keys, p + ".downsample.1", planes * expansion)
            inplanes = planes * expansion
    return keys, [64 * 2**s * expansion for s in range(4)]


def neck_keys(in_channels, out_channels=256):
    keys = []
    for i, ch in enumerate(in_channels):
        _conv(keys, "neck.lateral_convs.{}.conv".format(i), out_channels, ch, 1, bias=True)
    for i in range(len(in_channels)):
        _conv(keys, "neck.fpn_convs.{}.conv".format(i), out_channels, out_channels, 3, bias=True)
    return keys


def _gn(keys, prefix, channels):
    keys.append([prefix + ".weight", [channels]])
    keys.append([prefix + ".bias", [channels]])


def mask_feat_keys(names, in_channels=256, channels=128, out_channels=256, dcn=None):
    keys = []
    for level in range(4):  # start_level 0 .. end_level 3
        for j in range(max(1, level)):
            p = "{}.convs_all_levels.{}.conv{}".format(names["mask_feat"], level, j)
            if j == 0:
                in_ch = in_channels + 2 if level == 3 else in_channels
            else:
                in_ch = channels
            _conv(keys, p + ".conv", channels, in_ch, 3, dcn=dcn)
            _gn(keys, p + ".gn", channels)
    _conv(keys, names["conv_pred"] + ".conv", out_channels, channels, 1, dcn=dcn)
    _gn(keys, names["conv_pred"] + ".gn", out_channels)
    return keys


def head_keys(
    names,
    stacked_convs,
    feat_channels,
    ins_out_channels,
    light_head,
    dcn=None,
    in_channels=256,
    num_classes=80,
):
    kernel, cate = [], []
    for i in range(stacked_convs):
        last = i == stacked_convs - 1
        conv_dcn = dcn if (dcn is not None and (last or not light_head)) else None
        for tower, out, extra in ((kernel, "kernel_convs", 2), (cate, "cate_convs", 0)):
            in_ch = in_channels + extra if i == 0 else feat_channels
            p = "{}.{}".format(names[out], i)
            _conv(tower, p + ".conv", feat_channels, in_ch, 3, dcn=conv_dcn)
            _gn(tower, p + ".gn", feat_channels)
    keys = cate + kernel
    _conv(keys, names["cate_pred"], num_classes, feat_channels, 3, bias=True)
    _conv(keys, names["kernel_pred"], ins_out_channels, feat_channels, 3, bias=True)
    return keys


def model_keys(arch, publisher="solo"):
    names = NAMES[publisher]
    backbone, channels = backbone_keys(
        arch["depth"], arch.get("groups", 1), arch.get("base_width", 64), arch.get("backbone_dcn")
    )
    keys = backbone + neck_keys(channels)
    head = head_keys(
        names,
        arch["stacked_convs"],
        arch["feat_channels"],
        arch["ins_out_channels"],
        arch["light_head"],
        arch.get("head_dcn"),
    )
    mask = mask_feat_keys(
        names, out_channels=arch["ins_out_channels"], dcn=arch.get("mask_feat_dcn")
    )
    # mmdet 3.x nests the mask feature head in the mask head (after the towers and predictors);
    # SOLO's detector registers mask_feat_head before bbox_head.
    return keys + (head + mask if publisher == "mmdet" else mask + head)


def official_document(name):
    arch = OFFICIAL_MODELS[name]
    return {
        "config": "configs/solov2/" + arch["config"],
        "source": "github.com/WXinlong/SOLO, derived by tools/solo_key_lists.py",
        "keys": model_keys(arch, "solo"),
    }


def _dumps(document):
    """JSON with one [name, shape] per line (readable diffs)."""
    head = ",\n".join(
        "  {}: {}".format(json.dumps(k), json.dumps(v)) for k, v in document.items() if k != "keys"
    )
    keys = ",\n".join("    " + json.dumps(entry) for entry in document["keys"])
    return "{\n" + head + ',\n  "keys": [\n' + keys + "\n  ]\n}\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare, write nothing")
    args = parser.parse_args(argv)
    os.makedirs(OUT_DIR, exist_ok=True)
    differ = []
    for name in OFFICIAL_MODELS:
        path = os.path.join(OUT_DIR, name + ".json")
        text = _dumps(official_document(name))
        if args.check:
            if not os.path.exists(path) or open(path).read() != text:
                differ.append(path)
        else:
            with open(path, "w") as f:
                f.write(text)
            print("wrote", os.path.relpath(path, ROOT))
    for path in differ:
        print("differs from the rules:", os.path.relpath(path, ROOT))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
