"""The model zoo configs (configs/mmdet/, configs/solo/): each builds, loads a synthetic checkpoint
with its publisher's exact key names and shapes, and states the publisher's architecture,
preprocessing, test scale and inference settings. A converted mmdetection R50 checkpoint predicts
exactly what the same weights in AdelaiDet (= our) layout predict.

Expected values are the publishers', copied from their config files (named at each constant):
mmdetection 3.x configs/solov2/*.py and github.com/WXinlong/SOLO configs/solov2/*.py.
"""

import glob
import importlib.util
import json
import logging
import os
import re

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from solov2_d2 import add_solov2_config

from .conftest import ROOT, SHARED

MMDET_KEYS = os.path.join(SHARED, "reference", "mmdet")
SOLO_KEYS = os.path.join(ROOT, "tests", "data", "solo_keys")

# ---- Publishers' facts ----
# Preprocessing of every config of both publishers: mmdet's data_preprocessor
# (configs/solov2/solov2_r50_fpn_1x_coco.py: mean, std, bgr_to_rgb=True, pad_size_divisor=32) and
# SOLO's img_norm_cfg + Pad (configs/solov2/*.py: same mean/std, to_rgb=True, size_divisor=32).
MEAN = [123.675, 116.28, 103.53]
STD = [58.395, 57.12, 57.375]
PAD = 32
# test_cfg of every config of both (mmdet: filter_thr; SOLO: update_thr).
NMS = dict(nms_pre=500, score_thr=0.1, mask_thr=0.5, update_thr=0.05, kernel="gaussian",
           sigma=2.0, max_per_img=100)  # fmt: skip
# Heads: grids, strides, sigma (pos_scale) are the same in every config of both.
GRIDS = [40, 36, 24, 16, 12]
STRIDES = [8, 8, 16, 32, 32]
SIGMA = 0.2
RANGES_800 = ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))
RANGES_448 = ((1, 56), (28, 112), (56, 224), (112, 448), (224, 896))
RANGES_512 = ((1, 64), (32, 128), (64, 256), (128, 512), (256, 2048))
# SOLOv2Head: stacked_convs 4, feat_channels 512, kernel / mask feature out_channels 256; the
# mask feature head's feat_channels 128 everywhere.
FULL = dict(convs=4, channels=512, masks=256, ranges=RANGES_800, test=(800, 1333))
# Light (mmdet solov2-light_r50_fpn_ms-3x_coco.py, SOLO solov2_light_448_*.py): 2 convs of 256,
# 128 out channels, test scale (768, 448).
LIGHT = dict(convs=2, channels=256, masks=128, ranges=RANGES_448, test=(448, 768))
NO_DCN = dict(backbone_dcn=None, head_dcn=None, head_dcn_convs=None, mask_dcn=False)
DCNV2_ALL = dict(backbone_dcn="DCNv2", head_dcn="DCNv2", head_dcn_convs="all", mask_dcn=True)

# (config, publisher, model name (weights / key list), depth, groups, architecture)
ZOO = [
    ("mmdet/solov2_r50_fpn_1x_coco", "mmdet", 50, 1, dict(FULL, **NO_DCN)),
    ("mmdet/solov2_r50_fpn_ms-3x_coco", "mmdet", 50, 1, dict(FULL, **NO_DCN)),
    ("mmdet/solov2_r101_fpn_ms-3x_coco", "mmdet", 101, 1, dict(FULL, **NO_DCN)),
    ("mmdet/solov2_r101-dcn_fpn_ms-3x_coco", "mmdet", 101, 1, dict(FULL, **DCNV2_ALL)),
    ("mmdet/solov2_x101-dcn_fpn_ms-3x_coco", "mmdet", 101, 64, dict(FULL, **DCNV2_ALL)),
    ("mmdet/solov2-light_r18_fpn_ms-3x_coco", "mmdet", 18, 1, dict(LIGHT, **NO_DCN)),
    ("mmdet/solov2-light_r34_fpn_ms-3x_coco", "mmdet", 34, 1, dict(LIGHT, **NO_DCN)),
    ("mmdet/solov2-light_r50_fpn_ms-3x_coco", "mmdet", 50, 1, dict(LIGHT, **NO_DCN)),
    ("solo/solov2_r50_fpn_8gpu_1x", "SOLOv2_R50_1x", 50, 1, dict(FULL, **NO_DCN)),
    ("solo/solov2_r50_fpn_8gpu_3x", "SOLOv2_R50_3x", 50, 1, dict(FULL, **NO_DCN)),
    ("solo/solov2_r101_fpn_8gpu_3x", "SOLOv2_R101_3x", 101, 1, dict(FULL, **NO_DCN)),
    ("solo/solov2_r101_dcn_fpn_8gpu_3x", "SOLOv2_R101_DCN_3x", 101, 1, dict(FULL, **DCNV2_ALL)),
    ("solo/solov2_x101_dcn_fpn_8gpu_3x", "SOLOv2_X101_DCN_3x", 101, 64, dict(FULL, **DCNV2_ALL)),
    ("solo/solov2_light_448_r18_fpn_8gpu_3x", "SOLOv2_Light_448_R18_3x", 18, 1,
     dict(LIGHT, **NO_DCN)),
    ("solo/solov2_light_448_r34_fpn_8gpu_3x", "SOLOv2_Light_448_R34_3x", 34, 1,
     dict(LIGHT, **NO_DCN)),
    ("solo/solov2_light_448_r50_fpn_8gpu_3x", "SOLOv2_Light_448_R50_3x", 50, 1,
     dict(LIGHT, **NO_DCN)),
    # solov2_light_512_dcn_r50_fpn_8gpu_3x.py: backbone dcn type='DCN' in stages 2-4,
    # SOLOv2LightHead stacked_convs=3, seg_feat_channels=256, use_dcn_in_tower (its last conv),
    # type_dcn='DCN', ins_out_channels=128, 512 scale ranges, test img_scale (852, 512).
    ("solo/solov2_light_512_dcn_r50_fpn_8gpu_3x", "SOLOv2_Light_512_DCN_R50_3x", 50, 1,
     dict(convs=3, channels=256, masks=128, ranges=RANGES_512, test=(512, 852),
          backbone_dcn="DCN", head_dcn="DCN", head_dcn_convs="last", mask_dcn=False)),
]  # fmt: skip
# ResNeXt-101 64x4d (mmdet x101-dcn and SOLO x101_dcn: groups=64, base_width=4).
WIDTH_PER_GROUP = {1: 64, 64: 4}
# mmdet model names are their config names; "mmdet" above stands for that.
ZOO = [
    (c, os.path.basename(c) if p == "mmdet" else p, "mmdet" if p == "mmdet" else "solo", d, g, a)
    for c, p, d, g, a in ZOO
]
IDS = [entry[0] for entry in ZOO]
# Building and loading an R101 / X101 takes seconds each: those six are marked slow.
ZOO_LOADS = [
    pytest.param(*entry, id=entry[0], marks=[pytest.mark.slow] if entry[3] == 101 else [])
    for entry in ZOO
]


def zoo_cfg(config):
    cfg = get_cfg()
    add_solov2_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", config + ".yaml"))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def key_list(publisher, name):
    if publisher == "mmdet":
        path = os.path.join(MMDET_KEYS, name + ".json")
        if not os.path.isdir(SHARED):
            pytest.skip("../shared (mmdetection's key lists) is not beside this clone")
    else:
        path = os.path.join(SOLO_KEYS, name + ".json")
    with open(path) as f:
        return [(key, tuple(shape)) for key, shape in json.load(f)["keys"]]


def _key_rules():
    spec = importlib.util.spec_from_file_location(
        "solo_key_lists", os.path.join(ROOT, "tools", "solo_key_lists.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_zoo_config_is_tested():
    on_disk = {
        os.path.relpath(p, os.path.join(ROOT, "configs"))[: -len(".yaml")]
        for folder in ("mmdet", "solo")
        for p in glob.glob(os.path.join(ROOT, "configs", folder, "*.yaml"))
        if not os.path.basename(p).startswith("Base-")
    }
    assert on_disk == set(IDS)


def test_mmdet_zoo_is_every_published_checkpoint(shared_dir):
    """published_checkpoints.json lists six of them; mmdetection's README (configs/solov2/
    README.md) also publishes R101 ms-3x (39.1) and Light R34 (31.9). The light_r50-dcn key list
    has no published weights (in neither the README nor the metafile): no config for it."""
    with open(os.path.join(shared_dir, "reference", "mmdet", "published_checkpoints.json")) as f:
        published = {os.path.basename(e["config"])[: -len(".py")] for e in json.load(f)}
    ours = {name for _, name, publisher, *_ in ZOO if publisher == "mmdet"}
    assert published <= ours
    assert ours - published == {"solov2_r101_fpn_ms-3x_coco", "solov2-light_r34_fpn_ms-3x_coco"}


def test_key_rules_reproduce_mmdet_lists(shared_dir):
    """tools/solo_key_lists.py's rules (read from the official source), with mmdetection 3.x's
    module names, give mmdetection's nine lists exactly: names, shapes and order. And the stored
    official lists are what the rules give."""
    rules = _key_rules()
    for name, arch in rules.MMDET_MODELS.items():
        with open(os.path.join(shared_dir, "reference", "mmdet", name + ".json")) as f:
            expected = json.load(f)["keys"]
        assert rules.model_keys(arch, "mmdet") == expected, name
    assert rules.main(["--check"]) == 0


@pytest.mark.parametrize("config, name, publisher, depth, groups, arch", ZOO, ids=IDS)
def test_config_states_the_publishers_settings(config, name, publisher, depth, groups, arch):
    cfg = zoo_cfg(config)
    sol = cfg.MODEL.SOLOV2
    # Preprocessing and test scale.
    assert cfg.INPUT.FORMAT == "RGB"
    assert list(cfg.MODEL.PIXEL_MEAN) == MEAN and list(cfg.MODEL.PIXEL_STD) == STD
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == arch["test"]
    # Inference.
    got = (sol.NMS_PRE, sol.SCORE_THR, sol.MASK_THR, sol.UPDATE_THR, sol.NMS_KERNEL, sol.NMS_SIGMA,
           sol.MAX_PER_IMG, sol.NMS_TYPE)  # fmt: skip
    assert got == tuple(NMS.values()) + ("matrix",)
    # Backbone: style='pytorch', frozen_stages=1 (stem + res2), frozen BN, FPN 256.
    res = cfg.MODEL.RESNETS
    assert res.STRIDE_IN_1X1 is False and cfg.MODEL.BACKBONE.FREEZE_AT == 2
    assert res.NORM == "FrozenBN" and cfg.MODEL.FPN.OUT_CHANNELS == 256
    assert (res.DEPTH, res.NUM_GROUPS, res.WIDTH_PER_GROUP) == (
        depth,
        groups,
        WIDTH_PER_GROUP[groups],
    )
    deform = [False, True, True, True] if arch["backbone_dcn"] else [False] * 4
    assert list(res.DEFORM_ON_PER_STAGE) == deform
    if arch["backbone_dcn"]:
        assert res.DEFORM_MODULATED == (arch["backbone_dcn"] == "DCNv2")
        assert res.DEFORM_NUM_GROUPS == 1
    # Heads.
    assert (sol.NUM_INSTANCE_CONVS, sol.INSTANCE_CHANNELS) == (arch["convs"], arch["channels"])
    assert sol.NUM_MASKS == sol.NUM_KERNELS == arch["masks"]
    assert sol.MASK_CHANNELS == 128 and sol.NUM_CLASSES == 80
    assert list(sol.NUM_GRIDS) == GRIDS and list(sol.FPN_INSTANCE_STRIDES) == STRIDES
    assert sol.SIGMA == SIGMA
    assert tuple(tuple(r) for r in sol.FPN_SCALE_RANGES) == arch["ranges"]
    assert sol.USE_DCN_IN_INSTANCE == (arch["head_dcn"] is not None)
    if arch["head_dcn"]:
        assert (sol.TYPE_DCN, sol.DCN_INSTANCE_CONVS) == (arch["head_dcn"], arch["head_dcn_convs"])
    assert sol.USE_DCN_IN_MASK_FEATURE == arch["mask_dcn"]
    # The weights are the publisher's checkpoint.
    prefix = "mmdet://" if publisher == "mmdet" else "solo://"
    assert cfg.MODEL.WEIGHTS == prefix + name


def test_every_zoo_weights_name_is_in_the_catalog_with_the_publishers_url(shared_dir):
    from solov2_d2.checkpoint import CATALOG

    with open(os.path.join(shared_dir, "reference", "mmdet", "published_checkpoints.json")) as f:
        published = {os.path.basename(e["config"])[: -len(".py")]: e for e in json.load(f)}
    for config, name, publisher, *_ in ZOO:
        row = CATALOG[zoo_cfg(config).MODEL.WEIGHTS]
        if name in published:
            assert (row.url, row.mask_ap) == (
                published[name]["weights"],
                published[name]["mask_ap"],
            )
        if publisher == "solo":
            # The author's Hugging Face mirror (huggingface.co/xinlongwang/SOLO, file names in
            # upper case LIGHT).
            assert row.url == "https://huggingface.co/xinlongwang/SOLO/resolve/main/{}.pth".format(
                name.replace("Light", "LIGHT")
            )


def synthetic_checkpoint(keys, publisher, seed=0):
    """Random tensors with the publisher's names and shapes, in its file layout (mmcv's
    save_checkpoint: {"meta", "state_dict"}). Variances positive, as BatchNorm needs."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in keys:
        value = torch.randn(shape, generator=generator)
        state[key] = value.abs() + 0.5 if key.endswith("running_var") else value
    meta = {"mmdet_version": "3.3.0"} if publisher == "mmdet" else {"mmdet_version": "1.0.0"}
    return {"meta": meta, "state_dict": state}


@pytest.mark.parametrize("config, name, publisher, depth, groups, arch", ZOO_LOADS)
def test_publisher_checkpoint_loads_without_missing_or_unexpected_keys(
    config, name, publisher, depth, groups, arch, tmp_path, caplog
):
    from solov2_d2.checkpoint import SOLOv2Checkpointer

    keys = key_list(publisher, name)
    cfg = zoo_cfg(config)
    cfg.MODEL.WEIGHTS = ""
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert len(model.state_dict()) == len(keys)
    path = str(tmp_path / (name + ".pth"))
    checkpoint = synthetic_checkpoint(keys, publisher)
    torch.save(checkpoint, path)

    with caplog.at_level(logging.WARNING):
        SOLOv2Checkpointer(model).load(path)
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "not found" not in warnings and "unexpected" not in warnings.lower(), warnings
    assert "not used" not in warnings and "shape" not in warnings.lower(), warnings
    # Every tensor of the model now holds one of the checkpoint's tensors (a one-to-one
    # mapping: the multisets of values agree).
    loaded = sorted(float(v.double().sum()) for v in model.state_dict().values())
    given = sorted(float(v.double().sum()) for v in checkpoint["state_dict"].values())
    assert loaded == pytest.approx(given, rel=1e-6, abs=1e-6)
    # Preprocessing as the publisher's: mean/std on RGB, padded to a multiple of 32.
    assert model.pixel_mean.flatten().tolist() == pytest.approx(MEAN)
    assert model.pixel_std.flatten().tolist() == pytest.approx(STD)
    images = model.preprocess_image([{"image": torch.zeros(3, 50, 70)}])
    assert tuple(images.tensor.shape[-2:]) == (64, 96)


# ---- Converted mmdetection R50 vs the same weights in AdelaiDet layout ----
# mmdetection 3.x module names -> AdelaiDet / Detectron2 names, written here from the two
# publishers' key lists (../shared/reference/mmdet/solov2_r50_fpn_1x_coco.json and
# adelaidet_solov2_keys.json), independently of solov2_d2.checkpoint.
_RES = "backbone.bottom_up.res{s}.{1}."
_MMDET_TO_ADELAIDET = [
    (r"^backbone\.conv1\.", "backbone.bottom_up.stem.conv1."),
    (r"^backbone\.bn1\.", "backbone.bottom_up.stem.conv1.norm."),
    (r"^backbone\.layer(\d)\.(\d+)\.conv(\d)\.", _RES + "conv{2}."),
    (r"^backbone\.layer(\d)\.(\d+)\.bn(\d)\.", _RES + "conv{2}.norm."),
    (r"^backbone\.layer(\d)\.(\d+)\.downsample\.0\.", _RES + "shortcut."),
    (r"^backbone\.layer(\d)\.(\d+)\.downsample\.1\.", _RES + "shortcut.norm."),
    (r"^neck\.lateral_convs\.(\d)\.conv\.", "backbone.fpn_lateral{p}."),
    (r"^neck\.fpn_convs\.(\d)\.conv\.", "backbone.fpn_output{p}."),
    (r"^mask_head\.cls_convs\.(\d)\.conv\.", "ins_head.cate_tower.{c}."),
    (r"^mask_head\.cls_convs\.(\d)\.gn\.", "ins_head.cate_tower.{n}."),
    (r"^mask_head\.kernel_convs\.(\d)\.conv\.", "ins_head.kernel_tower.{c}."),
    (r"^mask_head\.kernel_convs\.(\d)\.gn\.", "ins_head.kernel_tower.{n}."),
    (r"^mask_head\.conv_cls\.", "ins_head.cate_pred."),
    (r"^mask_head\.conv_kernel\.", "ins_head.kernel_pred."),
    (r"^mask_head\.mask_feature_head\.convs_all_levels\.(\d)\.conv(\d)\.conv\.",
     "mask_head.convs_all_levels.{0}.conv{1}.0."),
    (r"^mask_head\.mask_feature_head\.convs_all_levels\.(\d)\.conv(\d)\.gn\.",
     "mask_head.convs_all_levels.{0}.conv{1}.1."),
    (r"^mask_head\.mask_feature_head\.conv_pred\.conv\.", "mask_head.conv_pred.0."),
    (r"^mask_head\.mask_feature_head\.conv_pred\.gn\.", "mask_head.conv_pred.1."),
]  # fmt: skip


def mmdet_to_adelaidet(name):
    """{i}: the i-th group; {s}: res stage (layer + 1); {p}: FPN level (index + 2); {c} / {n}:
    position of the i-th tower conv / its GroupNorm in the tower Sequential (conv, GN, ReLU)."""
    for pattern, template in _MMDET_TO_ADELAIDET:
        match = re.match(pattern, name)
        if match:
            g = match.groups()
            first = int(g[0]) if g else 0
            head = template.format(*g, s=first + 1, p=first + 2, c=3 * first, n=3 * first + 1)
            return head + name[match.end() :]
    raise KeyError(name)


def test_name_table_maps_mmdet_r50_onto_adelaidet_r50(shared_dir):
    """The test's own table is right: mmdet's R50 list maps onto AdelaiDet's R50 list, names and
    shapes (the category predictor aside: AdelaiDet's list is of an 8-class model)."""
    mmdet = key_list("mmdet", "solov2_r50_fpn_1x_coco")
    with open(os.path.join(shared_dir, "reference", "adelaidet_solov2_keys.json")) as f:
        adelaidet = {key: tuple(shape) for key, shape in json.load(f)}
    mapped = {mmdet_to_adelaidet(key): shape for key, shape in mmdet}
    assert set(mapped) == set(adelaidet)
    differ = {k for k in mapped if mapped[k] != adelaidet[k]}
    assert differ == {"ins_head.cate_pred.weight", "ins_head.cate_pred.bias"}


@pytest.mark.slow
def test_converted_mmdet_r50_predicts_as_the_same_weights_in_adelaidet_layout(shared_dir, tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer

    from solov2_d2.checkpoint import SOLOv2Checkpointer

    from .conftest import sharpen_untrained_heads

    config = "mmdet/solov2_r50_fpn_1x_coco"
    cfg = zoo_cfg(config)
    cfg.MODEL.WEIGHTS = ""
    # The weights: an initialized model with sharpened predictors (detections at the config's
    # thresholds), then written in mmdetection's layout by the table above.
    torch.manual_seed(0)
    source = sharpen_untrained_heads(build_model(cfg)).eval()
    ours = {k: v.clone() for k, v in source.state_dict().items()}
    by_ours = {mmdet_to_adelaidet(k): k for k, _ in key_list("mmdet", "solov2_r50_fpn_1x_coco")}
    assert set(by_ours) == set(ours)
    mmdet_state = {by_ours[k]: v for k, v in ours.items()}
    mmdet_path = str(tmp_path / "solov2_r50_fpn_1x_coco.pth")
    torch.save({"meta": {"mmdet_version": "3.3.0"}, "state_dict": mmdet_state}, mmdet_path)
    adelaidet_path = str(tmp_path / "adelaidet_r50.pth")
    torch.save({"model": ours}, adelaidet_path)

    torch.manual_seed(1)
    converted = build_model(cfg).eval()
    SOLOv2Checkpointer(converted).load(mmdet_path)
    torch.manual_seed(2)
    adelaidet = build_model(cfg).eval()
    DetectionCheckpointer(adelaidet).load(adelaidet_path)

    image = torch.rand(3, 160, 224, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        a = converted([{"image": image}])[0]["instances"]
        b = adelaidet([{"image": image}])[0]["instances"]
    assert len(b) > 0
    assert len(a) == len(b)
    assert torch.equal(a.scores, b.scores)
    assert torch.equal(a.pred_classes, b.pred_classes)
    assert torch.equal(a.pred_masks, b.pred_masks)
