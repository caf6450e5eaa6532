"""Published SOLOv2 weights: mmdetection 2.x / 3.x and official SOLO checkpoints (issue 12).

Pure key mapping on hand-written dicts; synthetic checkpoints with the published names and shapes
(../shared/reference/mmdet/*.json, tests/data/solo_keys/*.json) loaded into the models of our
configs/mmdet/ and configs/solo/ configs; Detectron2's plain checkpointer on converted files and on
``mmdet://`` names served by a local HTTP server; refusal of pickled code; mismatch messages; the
fine-tuning rule; ``train_net.py --eval-only`` on an mmdetection file.
"""

import http.server
import json
import logging
import os
import threading
from collections import OrderedDict

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager

from solov2_d2 import add_solov2_config
from solov2_d2.checkpoint import (
    CATALOG,
    CheckpointFormatError,
    CheckpointMismatchError,
    PublishedWeights,
    SOLOv2Checkpointer,
    UnsafeCheckpointError,
    check_converted_state,
    convert_state_dict,
    detect_format,
)
from solov2_d2.checkpoint.convert import unwrap_checkpoint

from .conftest import ROOT, SHARED, load_tool

MMDET_REFERENCE = os.path.join(SHARED, "reference", "mmdet")
SOLO_KEYS = os.path.join(ROOT, "tests", "data", "solo_keys")


# ---- pure mapping ---------------------------------------------------------------------------


def _values(keys):
    """key -> a distinct scalar tensor, so that a swapped pair shows."""
    return OrderedDict((key, torch.tensor(float(i))) for i, key in enumerate(keys))


# One key per rule: mmdetection 2.x / 3.x name -> ours (the table, written out by hand).
MMDET_BY_HAND = {
    "backbone.conv1.weight": "backbone.bottom_up.stem.conv1.weight",
    "backbone.bn1.running_var": "backbone.bottom_up.stem.conv1.norm.running_var",
    "backbone.layer1.0.conv3.weight": "backbone.bottom_up.res2.0.conv3.weight",
    "backbone.layer2.3.bn2.bias": "backbone.bottom_up.res3.3.conv2.norm.bias",
    "backbone.layer4.0.downsample.0.weight": "backbone.bottom_up.res5.0.shortcut.weight",
    "backbone.layer4.0.downsample.1.running_mean": "backbone.bottom_up.res5.0.shortcut.norm."
    "running_mean",
    "backbone.layer3.5.conv2.conv_offset.weight": "backbone.bottom_up.res4.5.conv2_offset.weight",
    "neck.lateral_convs.0.conv.weight": "backbone.fpn_lateral2.weight",
    "neck.lateral_convs.3.conv.bias": "backbone.fpn_lateral5.bias",
    "neck.fpn_convs.2.conv.weight": "backbone.fpn_output4.weight",
    "mask_head.kernel_convs.0.conv.weight": "ins_head.kernel_tower.0.weight",
    "mask_head.kernel_convs.2.gn.bias": "ins_head.kernel_tower.7.bias",
    "mask_head.kernel_convs.3.conv.conv_offset.bias": "ins_head.kernel_tower.9.conv_offset.bias",
    "mask_head.cls_convs.1.conv.weight": "ins_head.cate_tower.3.weight",
    "mask_head.cls_convs.1.gn.weight": "ins_head.cate_tower.4.weight",
    "mask_head.conv_cls.weight": "ins_head.cate_pred.weight",
    "mask_head.conv_kernel.bias": "ins_head.kernel_pred.bias",
    "mask_head.mask_feature_head.convs_all_levels.3.conv2.conv.weight": "mask_head."
    "convs_all_levels.3.conv2.0.weight",
    "mask_head.mask_feature_head.convs_all_levels.0.conv0.gn.bias": "mask_head.convs_all_levels."
    "0.conv0.1.bias",
    "mask_head.mask_feature_head.convs_all_levels.2.conv1.conv.conv_offset.weight": "mask_head."
    "convs_all_levels.2.conv1.0.conv_offset.weight",
    "mask_head.mask_feature_head.conv_pred.conv.weight": "mask_head.conv_pred.0.weight",
    "mask_head.mask_feature_head.conv_pred.conv.conv_offset.bias": "mask_head.conv_pred.0."
    "conv_offset.bias",
    "mask_head.mask_feature_head.conv_pred.gn.weight": "mask_head.conv_pred.1.weight",
}

# Official SOLO's head names (the backbone and neck are the same rules as mmdet's).
SOLO_BY_HAND = {
    "backbone.layer1.2.bn3.weight": "backbone.bottom_up.res2.2.conv3.norm.weight",
    "backbone.layer2.0.conv2_offset.bias": "backbone.bottom_up.res3.0.conv2_offset.bias",
    "neck.fpn_convs.0.conv.bias": "backbone.fpn_output2.bias",
    "bbox_head.kernel_convs.1.conv.weight": "ins_head.kernel_tower.3.weight",
    "bbox_head.cate_convs.3.gn.bias": "ins_head.cate_tower.10.bias",
    "bbox_head.cate_convs.0.conv.conv_offset.weight": "ins_head.cate_tower.0.conv_offset.weight",
    "bbox_head.solo_cate.bias": "ins_head.cate_pred.bias",
    "bbox_head.solo_kernel.weight": "ins_head.kernel_pred.weight",
    "mask_feat_head.convs_all_levels.1.conv0.conv.weight": "mask_head.convs_all_levels.1.conv0."
    "0.weight",
    "mask_feat_head.convs_all_levels.3.conv0.gn.weight": "mask_head.convs_all_levels.3.conv0.1."
    "weight",
    "mask_feat_head.conv_pred.0.conv.weight": "mask_head.conv_pred.0.weight",
    "mask_feat_head.conv_pred.0.gn.bias": "mask_head.conv_pred.1.bias",
}


@pytest.mark.parametrize("fmt, table", [("mmdet", MMDET_BY_HAND), ("solo", SOLO_BY_HAND)])
def test_each_rule_maps_its_key_and_keeps_the_value(fmt, table):
    state = _values(table)
    converted = convert_state_dict(state, fmt)
    assert list(converted) == [table[key] for key in state]
    for theirs, ours in table.items():
        assert converted[ours] is state[theirs], theirs


def test_num_batches_tracked_dropped_and_unknown_key_named():
    state = _values(["backbone.bn1.weight", "backbone.bn1.num_batches_tracked"])
    assert list(convert_state_dict(state, "mmdet")) == ["backbone.bottom_up.stem.conv1.norm.weight"]

    state = _values(["backbone.conv1.weight", "mask_head.conv_cls.weight", "neck.fpn_convs.4.x"])
    with pytest.raises(CheckpointFormatError, match=r"my\.pth: key 'neck\.fpn_convs\.4\.x'"):
        convert_state_dict(state, "mmdet", source="my.pth")
    # An official name is unknown under mmdet's rules (bbox_head vs mask_head), and vice versa.
    with pytest.raises(CheckpointFormatError, match="bbox_head.solo_cate.weight"):
        convert_state_dict(_values(["bbox_head.solo_cate.weight"]), "mmdet")
    with pytest.raises(CheckpointFormatError, match="mask_head.conv_cls.weight"):
        convert_state_dict(_values(["mask_head.conv_cls.weight"]), "solo")


def test_format_detection_and_wrappers():
    assert detect_format(_values(["ins_head.cate_pred.weight"])) == "ours"
    assert detect_format(_values(["backbone.bottom_up.stem.conv1.weight"])) == "ours"
    assert detect_format(_values(["mask_head.mask_feature_head.conv_pred.gn.bias"])) == "mmdet"
    assert detect_format(_values(["mask_feat_head.conv_pred.0.gn.bias"])) == "solo"
    # An ImageNet backbone: not a SOLOv2 layout, left to Detectron2.
    assert detect_format(_values(["conv1.weight", "layer1.0.conv1.weight"])) is None
    with pytest.raises(CheckpointFormatError, match=r"not SOLOv2's \(mask_head\.conv_mask_list"):
        detect_format(_values(["backbone.conv1.weight", "mask_head.conv_mask_list.0.weight"]))

    weights = _values(["backbone.conv1.weight"])
    for wrapped in ({"state_dict": weights, "meta": {}}, {"model": weights}, weights):
        state, _ = unwrap_checkpoint(wrapped)
        assert state == weights
    state, rest = unwrap_checkpoint({"state_dict": {"module." + k: v for k, v in weights.items()}})
    assert state == weights and rest == {}
    with pytest.raises(CheckpointFormatError, match="x.pth: expected a dict of weights"):
        unwrap_checkpoint([1, 2], source="x.pth")


# ---- synthetic published checkpoints --------------------------------------------------------


def _reference(path):
    if not os.path.exists(path):
        pytest.skip("{} is not here (../shared beside this clone)".format(path))
    with open(path) as stream:
        return [(name, tuple(shape)) for name, shape in json.load(stream)["keys"]]


def _with_bn_counters(keys):
    """The keys as PyTorch saves them: every BatchNorm also has num_batches_tracked (shape [])."""
    out = []
    for name, shape in keys:
        out.append((name, shape))
        if name.endswith(".running_var"):
            out.append((name[: -len("running_var")] + "num_batches_tracked", ()))
    return out


def _synthetic(keys, seed=0):
    generator = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for name, shape in keys:
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(1000, dtype=torch.long)
        elif name.endswith("running_var"):  # positive, as a variance (the fine-tuning test trains)
            state[name] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[name] = torch.randn(shape, generator=generator) * 0.1
    return state


def _cfg(config, *opts):
    cfg = get_cfg()
    add_solov2_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", config))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""] + list(opts))
    return cfg


def _build(config, *opts):
    torch.manual_seed(0)
    return build_model(_cfg(config, *opts)).eval()


def _log_text(caplog, level=logging.INFO):
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= level)


def _warnings(caplog):
    return _log_text(caplog, logging.WARNING)


@pytest.fixture(scope="module")
def mmdet_r50():
    """(weights with mmdet names, the model of configs/mmdet/solov2_r50_fpn_1x_coco.yaml)."""
    keys = _reference(os.path.join(MMDET_REFERENCE, "solov2_r50_fpn_1x_coco.json"))
    return _synthetic(_with_bn_counters(keys)), _build("mmdet/solov2_r50_fpn_1x_coco.yaml")


def _assert_spot_checks(model, state):
    """Tensors found by hand in both models' layouts (not through the mapping)."""
    up = model.backbone.bottom_up
    assert torch.equal(up.stem.conv1.weight, state["backbone.conv1.weight"])
    assert torch.equal(up.stem.conv1.norm.running_var, state["backbone.bn1.running_var"])
    assert torch.equal(up.res3[1].conv2.weight, state["backbone.layer2.1.conv2.weight"])
    assert torch.equal(up.res5[0].shortcut.norm.bias, state["backbone.layer4.0.downsample.1.bias"])
    assert torch.equal(model.backbone.fpn_lateral4.bias, state["neck.lateral_convs.2.conv.bias"])
    assert torch.equal(model.backbone.fpn_output2.weight, state["neck.fpn_convs.0.conv.weight"])


def test_mmdet_checkpoints_load_exactly(mmdet_r50, tmp_path, caplog):
    """mmdet 3 ({"state_dict", "meta"} from mmengine) and mmdet 2 (mmcv's, with meta CLASSES and
    the config text) files of the published R50 1x names: every tensor of the model from the
    checkpoint, no missing or unexpected key, the format logged."""
    state, model = mmdet_r50
    wrappers = {
        "mmdet3": {"meta": {"mmengine_version": "0.10.4", "dataset_meta": {"classes": ("a",)}}},
        "mmdet2": {"meta": {"mmdet_version": "2.24.0", "CLASSES": ("person",), "config": "x"}},
    }
    head = model.ins_head
    for name, wrapper in wrappers.items():
        path = str(tmp_path / "{}.pth".format(name))
        torch.save(dict(wrapper, state_dict=state), path)
        with torch.no_grad():
            for value in model.state_dict().values():  # parameters and FrozenBN buffers
                value.zero_()
        caplog.clear()
        with caplog.at_level(logging.INFO):
            SOLOv2Checkpointer(model).load(path)
        log = _log_text(caplog)
        assert "mmdetection SOLOv2 checkpoint, converted (333 tensors" in log, log
        assert ("mmdet 2.24.0" if name == "mmdet2" else "mmengine 0.10.4") in log
        assert not _warnings(caplog), _warnings(caplog)

        _assert_spot_checks(model, state)
        assert torch.equal(head.kernel_tower[4].weight, state["mask_head.kernel_convs.1.gn.weight"])
        assert torch.equal(head.cate_tower[9].weight, state["mask_head.cls_convs.3.conv.weight"])
        assert torch.equal(head.cate_pred.bias, state["mask_head.conv_cls.bias"])
        assert torch.equal(head.kernel_pred.weight, state["mask_head.conv_kernel.weight"])
        feature = "mask_head.mask_feature_head."
        levels = model.mask_head.convs_all_levels
        assert torch.equal(
            levels[3].conv1[1].bias, state[feature + "convs_all_levels.3.conv1.gn.bias"]
        )
        assert torch.equal(
            levels[0].conv0[0].weight, state[feature + "convs_all_levels.0.conv0.conv.weight"]
        )
        assert torch.equal(
            model.mask_head.conv_pred[1].weight, state[feature + "conv_pred.gn.weight"]
        )
        # And all of them: 333 tensors, each equal to one of the checkpoint (none left as zero).
        loaded = model.state_dict()
        assert len(loaded) == 333
        originals = {tuple(v.flatten()[:4].tolist()) for v in state.values() if v.dim()}
        for key, value in loaded.items():
            assert tuple(value.flatten()[:4].tolist()) in originals, key


def test_official_solo_checkpoint_loads_exactly(tmp_path, caplog):
    """The official R50 1x names (tests/data/solo_keys, from the official modules' source) in the
    model of configs/solo/solov2_r50_fpn_8gpu_1x.yaml."""
    keys = _reference(os.path.join(SOLO_KEYS, "SOLOv2_R50_1x.json"))
    state = _synthetic(_with_bn_counters(keys), seed=1)
    model = _build("solo/solov2_r50_fpn_8gpu_1x.yaml")
    path = str(tmp_path / "SOLOv2_R50_1x.pth")
    torch.save(
        {"meta": {"mmdet_version": "1.0.0+unknown", "config": "x"}, "state_dict": state}, path
    )
    with caplog.at_level(logging.INFO):
        SOLOv2Checkpointer(model).load(path)
    assert "official SOLO (WXinlong/SOLO) SOLOv2 checkpoint, converted" in _log_text(caplog)
    assert not _warnings(caplog), _warnings(caplog)
    _assert_spot_checks(model, state)
    head = model.ins_head
    assert torch.equal(head.cate_tower[1].weight, state["bbox_head.cate_convs.0.gn.weight"])
    assert torch.equal(head.kernel_tower[6].weight, state["bbox_head.kernel_convs.2.conv.weight"])
    assert torch.equal(head.cate_pred.weight, state["bbox_head.solo_cate.weight"])
    assert head.cate_pred.weight.shape[0] == 80  # num_classes=81 counts the background
    assert torch.equal(head.kernel_pred.bias, state["bbox_head.solo_kernel.bias"])
    mask = model.mask_head
    assert torch.equal(mask.conv_pred[0].weight, state["mask_feat_head.conv_pred.0.conv.weight"])
    assert torch.equal(mask.conv_pred[1].bias, state["mask_feat_head.conv_pred.0.gn.bias"])
    assert torch.equal(
        mask.convs_all_levels[2].conv1[0].weight,
        state["mask_feat_head.convs_all_levels.2.conv1.conv.weight"],
    )


@pytest.mark.parametrize(
    "reference, config",
    [
        (
            os.path.join(MMDET_REFERENCE, "solov2_r101-dcn_fpn_ms-3x_coco.json"),
            "mmdet/solov2_r101-dcn_fpn_ms-3x_coco.yaml",
        ),
        (
            os.path.join(SOLO_KEYS, "SOLOv2_R101_DCN_3x.json"),
            "solo/solov2_r101_dcn_fpn_8gpu_3x.yaml",
        ),
    ],
)
def test_dcn_key_lists_fit_their_configs(reference, config):
    """Names and shapes of the R101-DCN checkpoints, converted, against the models of their
    configs (deformable backbone and heads): an exact fit, offset convs included."""
    keys = _reference(reference)
    fmt = "mmdet" if "/mmdet/" in reference else "solo"
    converted = convert_state_dict(OrderedDict(_with_bn_counters(keys)), fmt)
    try:
        model = build_model(_cfg(config))
    except Exception as error:  # noqa: BLE001 (the reason goes into the skip)
        pytest.skip("the DCN model of {} does not build here: {}".format(config, error))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    offsets = [k for k in shapes if "offset" in k]
    # res3-res5 blocks (4 + 23 + 3), both towers (2 x 4), the mask head's levels (1 + 1 + 2 + 3)
    # and conv_pred: one offset conv each, weight and bias.
    assert len(offsets) == 2 * ((4 + 23 + 3) + 2 * 4 + (1 + 1 + 2 + 3) + 1), offsets[:3]
    assert check_converted_state(shapes, converted, config, fmt) == []


# ---- Detectron2's plain checkpointer: converted files and published names -----------------


@pytest.fixture(scope="module")
def light_r18(tmp_path_factory):
    """An mmdet-format file of the published light R18 names (small) and its config name."""
    keys = _reference(os.path.join(MMDET_REFERENCE, "solov2-light_r18_fpn_ms-3x_coco.json"))
    state = _synthetic(_with_bn_counters(keys), seed=2)
    path = str(tmp_path_factory.mktemp("light") / "solov2_light_r18_fpn_3x_coco_x.pth")
    torch.save({"meta": {"mmdet_version": "2.24.0"}, "state_dict": state}, path)
    return path, state, "mmdet/solov2-light_r18_fpn_ms-3x_coco.yaml"


def _assert_light_loaded(model, state):
    up = model.backbone.bottom_up
    assert torch.equal(up.res3[0].conv1.weight, state["backbone.layer2.0.conv1.weight"])
    assert torch.equal(up.res3[0].shortcut.weight, state["backbone.layer2.0.downsample.0.weight"])
    assert torch.equal(
        model.backbone.fpn_lateral2.weight, state["neck.lateral_convs.0.conv.weight"]
    )
    assert torch.equal(
        model.ins_head.kernel_tower[3].weight, state["mask_head.kernel_convs.1.conv.weight"]
    )
    assert torch.equal(model.ins_head.cate_pred.weight, state["mask_head.conv_cls.weight"])


def test_plain_detectron2_checkpointer_loads_a_converted_file(light_r18, tmp_path, caplog):
    tool = load_tool("convert_checkpoint")

    source, state, config = light_r18
    out = str(tmp_path / "converted.pth")
    assert tool.main([source, out, "--config-file", os.path.join(ROOT, "configs", config)]) == 0
    model = _build(config)
    with caplog.at_level(logging.WARNING):
        DetectionCheckpointer(model).load(out)  # Detectron2's own, no solov2_d2 code involved
    assert not _warnings(caplog), _warnings(caplog)
    _assert_light_loaded(model, state)
    saved = torch.load(out, weights_only=True)
    assert set(saved) == {"model", "__author__", "meta"}
    assert saved["meta"]["format"] == "mmdet"

    # The tool exports our own checkpoints too: weights only, the rest (here "iteration") dropped.
    ours = str(tmp_path / "ours.pth")
    torch.save({"model": model.state_dict(), "iteration": 7}, ours)
    assert tool.main([ours, str(tmp_path / "export.pth")]) == 0
    exported = torch.load(str(tmp_path / "export.pth"), weights_only=True)
    assert "iteration" not in exported and exported["meta"]["format"] == "ours"
    assert torch.equal(
        exported["model"]["ins_head.cate_pred.bias"], state["mask_head.conv_cls.bias"]
    )
    with pytest.raises(ValueError, match=r"out\.pkl: write converted weights as \.pth"):
        tool.main([source, str(tmp_path / "out.pkl")])


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    """A local HTTP server of ``tmp_path / "www"``: (root folder, base URL, requested paths)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = type("Handler", (_CountingHandler,), {"requests": []})

    def make(*args, **kwargs):
        return handler(*args, directory=str(root), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, "http://127.0.0.1:{}".format(server.server_address[1]), handler.requests
    server.shutdown()
    server.server_close()


def test_published_name_is_downloaded_once_and_converted_into_the_cache(
    light_r18, http_root, tmp_path, monkeypatch
):
    import shutil

    source, state, config = light_r18
    root, base, requests = http_root
    (root / "solov2").mkdir()
    shutil.copy(source, str(root / "solov2" / os.path.basename(source)))
    name = "mmdet://solov2-light_r18_fpn_ms-3x_coco"
    url = "{}/solov2/{}".format(base, os.path.basename(source))
    monkeypatch.setitem(CATALOG, name, PublishedWeights(name, url, 29.7))
    cache = tmp_path / "cache"
    monkeypatch.setenv("FVCORE_CACHE", str(cache))

    model = _build(config)
    DetectionCheckpointer(model).load(name)  # Detectron2's own checkpointer, through the handler
    _assert_light_loaded(model, state)
    assert len(requests) == 1
    downloaded = cache / "solov2" / os.path.basename(source)
    converted = cache / "solov2" / (os.path.basename(source)[: -len(".pth")] + ".solov2_d2.pth")
    assert downloaded.is_file() and converted.is_file()
    assert torch.load(str(converted), weights_only=True)["meta"]["source"] == name

    # Again, and again as a fresh process would (iopath's in-memory URL map emptied): the cache.
    other = _build(config)
    SOLOv2Checkpointer(other).load(name)
    PathManager._path_handlers["http://"].cache_map.clear()
    DetectionCheckpointer(other).load(name)
    _assert_light_loaded(other, state)
    assert len(requests) == 1, requests

    with pytest.raises(ValueError, match="Known mmdet:// names: .*solov2_r50_fpn_1x_coco"):
        PathManager.get_local_path("mmdet://solov2_r50_fpn_2x")


# ---- untrusted files ------------------------------------------------------------------------


def _leave_mark(path):
    with open(path, "w") as stream:
        stream.write("code ran")
    return torch.zeros(1)


class _Payload:
    """Unpickles as a call of ``_leave_mark(path)``: code run by loading a checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return _leave_mark, (self.path,)


def test_pickled_callable_is_refused_and_never_runs(tmp_path, light_r18):
    weights = {"backbone.conv1.weight": torch.zeros(1)}
    control_mark, mark = tmp_path / "control.txt", tmp_path / "mark.txt"
    control = str(tmp_path / "control.pth")
    torch.save({"state_dict": weights, "meta": {"x": _Payload(str(control_mark))}}, control)
    torch.load(control, weights_only=False)  # what full unpickling would do: the code runs
    assert control_mark.read_text() == "code ran"

    evil = str(tmp_path / "evil.pth")
    torch.save({"state_dict": weights, "meta": {"x": _Payload(str(mark))}}, evil)
    model = _build(light_r18[2])
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pth: refused to load") as error:
        SOLOv2Checkpointer(model).load(evil)
    assert "weights_only=True" in str(error.value) and "_leave_mark" in str(error.value)
    tool = load_tool("convert_checkpoint")

    with pytest.raises(UnsafeCheckpointError):
        tool.main([evil, str(tmp_path / "out.pth")])
    assert not mark.exists()
    assert not (tmp_path / "out.pth").exists()


# ---- mismatches and fine-tuning -------------------------------------------------------------


def _converted_shapes(reference):
    keys = _reference(os.path.join(MMDET_REFERENCE, reference))
    return convert_state_dict(OrderedDict(keys), "mmdet")


def test_mismatch_names_the_tensor_and_the_config_key(mmdet_r50):
    _, model = mmdet_r50
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    deeper = _converted_shapes("solov2_r101_fpn_ms-3x_coco.json")
    with pytest.raises(CheckpointMismatchError) as error:
        check_converted_state(shapes, deeper, "r101.pth", "mmdetection SOLOv2 checkpoint")
    message = str(error.value)
    # R101 has 23 res4 blocks, R50 6: the first extra one, 17 blocks x 15 tensors extra in all.
    assert "r101.pth: this mmdetection SOLOv2 checkpoint does not fit" in message
    assert "the checkpoint has backbone.bottom_up.res4.6.conv1.weight (256, 1024, 1, 1)" in message
    assert "(255 mismatching tensors in all)" in message
    assert "Change MODEL.RESNETS.DEPTH" in message

    narrower = _converted_shapes("solov2-light_r50_fpn_ms-3x_coco.json")
    with pytest.raises(CheckpointMismatchError) as error:
        check_converted_state(shapes, narrower, "light.pth", "mmdetection SOLOv2 checkpoint")
    message = str(error.value)
    assert (
        "ins_head.cate_tower.0.weight is (256, 256, 3, 3) in the checkpoint but (512, 256, 3, 3) "
        "in the model" in message
    ), message
    assert "Change MODEL.SOLOV2.INSTANCE_CHANNELS" in message

    other_classes = dict(_converted_shapes("solov2_r50_fpn_1x_coco.json"))
    other_classes["ins_head.cate_pred.weight"] = (3, 512, 3, 3)
    other_classes["ins_head.cate_pred.bias"] = (3,)
    assert check_converted_state(shapes, other_classes, "x", "y") == list(
        ("ins_head.cate_pred.weight", "ins_head.cate_pred.bias")
    )
    other_classes["ins_head.kernel_pred.bias"] = (128,)
    with pytest.raises(CheckpointMismatchError, match="Change MODEL.SOLOV2.NUM_KERNELS"):
        check_converted_state(shapes, other_classes, "x", "y")
    dcn = _converted_shapes("solov2_r101-dcn_fpn_ms-3x_coco.json")
    only_offsets = dict(_converted_shapes("solov2_r50_fpn_1x_coco.json"))
    only_offsets.update(
        {k: v for k, v in dcn.items() if k.startswith("backbone.bottom_up.res3.0.")}
    )
    with pytest.raises(CheckpointMismatchError) as error:
        check_converted_state(shapes, only_offsets, "x", "y")
    assert "backbone.bottom_up.res3.0.conv2_offset.weight (27, 128, 3, 3)" in str(error.value)
    assert "MODEL.RESNETS.DEFORM_ON_PER_STAGE" in str(error.value)


def test_loading_a_mismatching_file_fails_before_changing_the_model(light_r18, mmdet_r50):
    _, model = mmdet_r50
    before = model.backbone.fpn_lateral2.weight.clone()
    with pytest.raises(CheckpointMismatchError) as error:
        SOLOv2Checkpointer(model).load(light_r18[0])
    assert (
        "backbone.fpn_lateral2.weight is (256, 64, 1, 1) in the checkpoint but (256, 256, 1, 1)"
        in str(error.value)
    )
    assert "MODEL.RESNETS.DEPTH" in str(error.value)
    assert torch.equal(model.backbone.fpn_lateral2.weight, before)


def test_stride_in_1x1_model_is_refused_for_pytorch_style_weights(mmdet_r50, tmp_path):
    state, _ = mmdet_r50
    path = str(tmp_path / "r50.pth")
    torch.save({"state_dict": state, "meta": {}}, path)
    model = _build("mmdet/solov2_r50_fpn_1x_coco.yaml", "MODEL.RESNETS.STRIDE_IN_1X1", "True")
    with pytest.raises(CheckpointMismatchError, match="set MODEL.RESNETS.STRIDE_IN_1X1 False"):
        SOLOv2Checkpointer(model).load(path)


def test_fine_tuning_on_other_classes_keeps_all_but_the_category_predictor(light_r18, caplog):
    """The COCO checkpoint (80 classes) into NUM_CLASSES 3: everything loaded but cate_pred, which
    keeps the model's initialization (focal-loss prior bias), and the log says so."""
    path, state, config = light_r18
    model = _build(config, "MODEL.SOLOV2.NUM_CLASSES", "3")
    init_weight = model.ins_head.cate_pred.weight.clone()
    init_bias = model.ins_head.cate_pred.bias.clone()
    with caplog.at_level(logging.INFO):
        SOLOv2Checkpointer(model).load(path)
    log = _log_text(caplog)
    assert (
        "fine-tuning: the checkpoint's category predictor has 80 classes, the model "
        "(MODEL.SOLOV2.NUM_CLASSES) 3: ins_head.cate_pred.bias, ins_head.cate_pred.weight left at "
        "their initialization, every other weight loaded" in log
    ), log
    assert not _warnings(caplog), _warnings(caplog)
    assert torch.equal(model.ins_head.cate_pred.weight, init_weight)
    # log(0.01 / 0.99), the prior of PRIOR_PROB 0.01
    assert torch.allclose(init_bias, torch.full((3,), -4.59512), atol=1e-5)
    assert torch.equal(model.ins_head.cate_pred.bias, init_bias)
    up = model.backbone.bottom_up
    assert torch.equal(up.res3[0].conv1.weight, state["backbone.layer2.0.conv1.weight"])
    assert torch.equal(
        model.ins_head.cate_tower[0].weight, state["mask_head.cls_convs.0.conv.weight"]
    )
    assert torch.equal(model.ins_head.kernel_pred.bias, state["mask_head.conv_kernel.bias"])
    assert torch.equal(
        model.mask_head.conv_pred[1].bias, state["mask_head.mask_feature_head.conv_pred.gn.bias"]
    )


def test_train_net_eval_only_with_an_mmdet_file(light_r18, tmp_path, monkeypatch):
    """``train_net.py --eval-only MODEL.WEIGHTS <mmdet file>`` evaluates the converted weights (the
    evaluation itself is replaced: the model it gets is what matters here)."""
    from detectron2.engine import default_argument_parser

    import train_net

    path, state, config = light_r18
    tested = []
    monkeypatch.setattr(
        train_net.Trainer, "test", classmethod(lambda cls, cfg, m: tested.append(m) or {})
    )
    args = default_argument_parser().parse_args(
        ["--config-file", os.path.join(ROOT, "configs", config), "--eval-only"]
        + ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", path, "OUTPUT_DIR", str(tmp_path)]
    )
    assert train_net.main(args) == {}
    (model,) = tested
    _assert_light_loaded(model, state)


def test_fine_tuning_recipe_trains_from_an_mmdet_file(light_r18, tmp_path, caplog):
    """The recipe: a COCO config of configs/mmdet/, another dataset and NUM_CLASSES, MODEL.WEIGHTS
    the published file; Trainer.resume_or_load(resume=False) loads it (the trainer's checkpointer
    and its checkpoint hook are SOLOv2Checkpointers), and an iteration trains."""
    import uuid

    from detectron2.data import DatasetCatalog, MetadataCatalog

    import train_net
    from solov2_d2.data import register_shapes_dataset

    path, state, config = light_r18
    name = "formats_shapes_" + uuid.uuid4().hex[:8]
    register_shapes_dataset(
        name,
        root=str(tmp_path / "shapes"),
        split="train",
        num_images=2,
        seed=0,
        min_side=64,
        max_side=96,
    )
    try:
        cfg = _cfg(
            config,
            *["MODEL.WEIGHTS", path, "MODEL.SOLOV2.NUM_CLASSES", "6", "OUTPUT_DIR", str(tmp_path)],
            *["DATASETS.TRAIN", "('{}',)".format(name), "DATASETS.TEST", "()"],
            *["DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TRAIN", "(96,)"],
            *["INPUT.MAX_SIZE_TRAIN", "128", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "1"],
            *["SOLVER.CHECKPOINT_PERIOD", "1000", "SOLVER.WARMUP_ITERS", "1"],
        )
        trainer = train_net.Trainer(cfg)
        assert isinstance(trainer.checkpointer, SOLOv2Checkpointer)
        hooks = [h for h in trainer._hooks if hasattr(h, "checkpointer")]
        assert hooks and all(h.checkpointer is trainer.checkpointer for h in hooks)
        with caplog.at_level(logging.INFO):
            trainer.resume_or_load(resume=False)
        assert "fine-tuning: the checkpoint's category predictor has 80 classes" in _log_text(
            caplog
        )
        _assert_light_loaded_but_classes(trainer.model, state)
        trainer.train()
        assert trainer.iter == 1 and os.path.isfile(str(tmp_path / "model_final.pth"))
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _assert_light_loaded_but_classes(model, state):
    up = model.backbone.bottom_up
    assert torch.equal(up.res3[0].conv1.weight, state["backbone.layer2.0.conv1.weight"])
    assert torch.equal(model.ins_head.kernel_pred.weight, state["mask_head.conv_kernel.weight"])
    assert model.ins_head.cate_pred.weight.shape[0] == 6


def test_demo_predictor_loads_an_mmdet_file(light_r18):
    """demo.py's SOLOv2Predictor: DefaultPredictor with MODEL.WEIGHTS an mmdetection file."""
    import numpy as np

    from solov2_d2.checkpoint.predictor import SOLOv2Predictor

    path, state, config = light_r18
    cfg = _cfg(config, "MODEL.WEIGHTS", path, "INPUT.MIN_SIZE_TEST", "64")
    cfg.freeze()
    predictor = SOLOv2Predictor(cfg)
    _assert_light_loaded(predictor.model, state)
    assert predictor.cfg.MODEL.WEIGHTS == path
    outputs = predictor(np.zeros((64, 80, 3), dtype=np.uint8))
    assert outputs["instances"].image_size == (64, 80)
