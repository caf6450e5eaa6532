"""Every YAML under configs/ builds a model; AdelaiDet-style SOLOv2 YAMLs merge and build.

Parameter counts are checked against closed forms of the architecture (paper Sec. 3.2 heads with
CoordConv, GroupNorm with affine weights and no conv biases), which are easy to redo by hand.
"""

import gc
import glob
import os

import pytest
import torch
import yaml
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from solov2_d2 import add_solov2_config

from .conftest import ROOT, tiny_cfg, write_tiny_config

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
CONFIG_NAMES = [os.path.basename(path) for path in CONFIGS]

# One ResNet res4 bottleneck block, 1024 -> 256 -> 256 -> 1024 channels, FrozenBN (no parameters):
# 1x1 + 3x3 + 1x1 convs without biases. R101 has 23 such blocks, R50 has 6.
RES4_BLOCK_PARAMETERS = 1024 * 256 + 256 * 256 * 9 + 256 * 1024


def load_config(path):
    cfg = get_cfg()
    add_solov2_config(cfg)
    cfg.merge_from_file(path)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg


def count(module):
    return sum(p.numel() for p in module.parameters())


def kernel_head_parameters(cfg):
    """Category and kernel towers (NUM_INSTANCE_CONVS 3x3 convs each on the FPN's channels; the
    kernel tower's input has 2 coordinate channels more) and their 3x3 output convs (with
    biases)."""
    sol = cfg.MODEL.SOLOV2
    c, n = sol.INSTANCE_CHANNELS, sol.NUM_INSTANCE_CONVS
    per_norm = 2 * c if sol.NORM == "GN" else c  # GN weight + bias, or the conv's bias
    in_channels = cfg.MODEL.FPN.OUT_CHANNELS

    def tower(first_in):
        return 9 * first_in * c + (n - 1) * 9 * c * c + n * per_norm

    coord = 2 if sol.USE_COORD_CONV else 0
    return (
        tower(in_channels)
        + tower(in_channels + coord)
        + 9 * c * sol.NUM_CLASSES
        + sol.NUM_CLASSES
        + 9 * c * sol.NUM_KERNELS
        + sol.NUM_KERNELS
    )


def mask_head_parameters(cfg):
    """Level l of the mask feature head has max(l, 1) 3x3 convs (the first on the FPN's
    channels), the coarsest one gets 2 coordinate channels; then a 1x1 conv to NUM_MASKS
    channels. Every conv is followed by GN."""
    sol = cfg.MODEL.SOLOV2
    assert sol.NORM == "GN"
    c, in_channels, levels = (
        sol.MASK_CHANNELS,
        cfg.MODEL.FPN.OUT_CHANNELS,
        len(sol.MASK_IN_FEATURES),
    )
    total = 0
    for level in range(levels):
        first_in = in_channels + (2 if level == levels - 1 and level > 0 else 0)
        convs = max(level, 1)
        total += 9 * first_in * c + (convs - 1) * 9 * c * c + convs * 2 * c
    return total + c * sol.NUM_MASKS + 2 * sol.NUM_MASKS


@pytest.fixture(scope="module")
def parameter_counts():
    """{config name: (backbone, kernel head, mask head) parameter counts}; each model is built,
    counted and deleted before the next one (R101 is ~65 M parameters)."""
    counts = {}
    for path in CONFIGS:
        model = build_model(load_config(path))
        counts[os.path.basename(path)] = (
            count(model.backbone),
            count(model.ins_head),
            count(model.mask_head),
            count(model),
        )
        del model
        gc.collect()
    return counts


def test_configs_folder_has_the_expected_configs():
    assert set(CONFIG_NAMES) >= {
        "Base-SOLOv2.yaml",
        "SOLOv2_R50_1x.yaml",
        "SOLOv2_R50_3x.yaml",
        "SOLOv2_R101_3x.yaml",
        "SOLOv2_Light_448_R50_3x.yaml",
        "SOLOv2_Light_512_R50_3x.yaml",
        "SOLOv2_demo_cpu.yaml",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=CONFIG_NAMES)
def test_every_config_builds_a_model_with_the_heads_it_describes(path, parameter_counts):
    cfg = load_config(path)
    assert cfg.MODEL.META_ARCHITECTURE == "SOLOv2"
    backbone, kernel_head, mask_head, total = parameter_counts[os.path.basename(path)]
    assert kernel_head == kernel_head_parameters(cfg)
    assert mask_head == mask_head_parameters(cfg)
    assert total == backbone + kernel_head + mask_head


def test_parameter_counts_of_known_architectures(parameter_counts):
    backbone = {name: counts[0] for name, counts in parameter_counts.items()}
    # R101 - R50: 17 more res4 blocks, nothing else.
    assert (
        backbone["SOLOv2_R101_3x.yaml"] - backbone["SOLOv2_R50_3x.yaml"]
        == 17 * RES4_BLOCK_PARAMETERS
        == 18_939_904
    )
    # The schedules and input sizes do not change the network.
    assert parameter_counts["SOLOv2_R50_1x.yaml"] == parameter_counts["SOLOv2_R50_3x.yaml"]
    assert parameter_counts["SOLOv2_R50_1x.yaml"] == parameter_counts["Base-SOLOv2.yaml"]
    assert (
        parameter_counts["SOLOv2_Light_448_R50_3x.yaml"]
        == parameter_counts["SOLOv2_Light_512_R50_3x.yaml"]
    )
    # The full R50 kernel head worked out by hand: towers 256->512 (kernel: 258->512) then
    # 3 x 512->512, GN on each conv; cate_pred 512->80, kernel_pred 512->256 (3x3, biases).
    cate_tower = 9 * 256 * 512 + 3 * 9 * 512 * 512 + 4 * 2 * 512
    kernel_tower = 9 * 258 * 512 + 3 * 9 * 512 * 512 + 4 * 2 * 512
    outputs = 9 * 512 * 80 + 80 + 9 * 512 * 256 + 256
    assert parameter_counts["SOLOv2_R50_1x.yaml"][1] == cate_tower + kernel_tower + outputs
    # Light heads are thinner and the demo model is far smaller than both.
    totals = {name: counts[3] for name, counts in parameter_counts.items()}
    assert (
        totals["SOLOv2_demo_cpu.yaml"]
        < totals["SOLOv2_Light_448_R50_3x.yaml"]
        < totals["SOLOv2_R50_1x.yaml"]
        < totals["SOLOv2_R101_3x.yaml"]
    )


def test_demo_cpu_config_runs_inference_on_a_64px_image():
    cfg = load_config(os.path.join(ROOT, "configs", "SOLOv2_demo_cpu.yaml"))
    # Untrained: let every candidate through so that the outputs have something in them.
    cfg.MODEL.SOLOV2.SCORE_THR = 0.0
    cfg.MODEL.SOLOV2.UPDATE_THR = 0.0
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = torch.randint(0, 256, (3, 64, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = model([{"image": image.float(), "height": 64, "width": 64}])
    assert len(outputs) == 1
    instances = outputs[0]["instances"]
    assert instances.image_size == (64, 64)
    n = len(instances)
    assert 0 < n <= cfg.MODEL.SOLOV2.MAX_PER_IMG
    assert instances.pred_masks.shape == (n, 64, 64) and instances.pred_masks.dtype == torch.bool
    assert instances.pred_masks.flatten(1).any(dim=1).all()  # no empty mask survives
    assert instances.pred_boxes.tensor.shape == (n, 4)
    assert ((instances.pred_classes >= 0) & (instances.pred_classes < 6)).all()
    scores = instances.scores
    assert ((scores >= 0) & (scores <= 1)).all()
    assert torch.equal(scores, scores.sort(descending=True).values)


def test_tiny_yaml_helper_matches_tiny_cfg(tmp_path):
    """conftest.write_tiny_config (for the command-line tests) is the model of tiny_cfg."""
    cfg = get_cfg()
    add_solov2_config(cfg)
    cfg.merge_from_file(write_tiny_config(tmp_path, num_classes=5))
    assert yaml.safe_load(cfg.MODEL.dump()) == yaml.safe_load(tiny_cfg(5).MODEL.dump())


# ------------------------------------------------------------------------ AdelaiDet-style YAMLs

# Written for these tests in AdelaiDet's layout: a base file with the shared settings and a leaf
# with _BASE_, every MODEL.SOLOV2 key given explicitly under AdelaiDet's names. Values that differ
# from the defaults show that each key reaches the model.
ADELAIDET_STYLE_BASE = {
    "MODEL": {
        "META_ARCHITECTURE": "SOLOv2",
        "MASK_ON": True,
        "BACKBONE": {"NAME": "build_resnet_fpn_backbone"},
        "RESNETS": {"OUT_FEATURES": ["res2", "res3", "res4", "res5"]},
        "FPN": {"IN_FEATURES": ["res2", "res3", "res4", "res5"]},
        "SOLOV2": {
            "INSTANCE_IN_FEATURES": ["p2", "p3", "p4", "p5", "p6"],
            "FPN_INSTANCE_STRIDES": [8, 8, 16, 32, 32],
            "FPN_SCALE_RANGES": [[1, 96], [48, 192], [96, 384], [192, 768], [384, 2048]],
            "SIGMA": 0.2,
            "NUM_GRIDS": [40, 36, 24, 16, 12],
            "NUM_CLASSES": 80,
            "USE_DCN_IN_INSTANCE": False,
            "TYPE_DCN": "DCN",
            "USE_COORD_CONV": True,
            "PRIOR_PROB": 0.01,
            "NORM": "GN",
            "NMS_PRE": 500,
            "SCORE_THR": 0.1,
            "UPDATE_THR": 0.05,
            "MASK_THR": 0.5,
            "MAX_PER_IMG": 100,
            "NMS_TYPE": "matrix",
            "NMS_KERNEL": "gaussian",
            "NMS_SIGMA": 2,
            "LOSS": {
                "FOCAL_USE_SIGMOID": True,
                "FOCAL_ALPHA": 0.25,
                "FOCAL_GAMMA": 2.0,
                "FOCAL_WEIGHT": 1.0,
                "DICE_WEIGHT": 3.0,
            },
        },
    },
    "DATASETS": {"TRAIN": ["coco_2017_train"], "TEST": ["coco_2017_val"]},
    "SOLVER": {"IMS_PER_BATCH": 16, "BASE_LR": 0.01, "WARMUP_FACTOR": 0.01},
    "INPUT": {"MIN_SIZE_TRAIN": [800], "MASK_FORMAT": "bitmask"},
    "VERSION": 2,
}
ADELAIDET_STYLE_LEAF = {
    "_BASE_": "Base-SOLOv2.yaml",
    "MODEL": {
        "WEIGHTS": "detectron2://ImageNetPretrained/MSRA/R-50.pkl",
        "RESNETS": {"DEPTH": 50},
        "SOLOV2": {
            "INSTANCE_IN_FEATURES": ["p3", "p4", "p5", "p6"],
            "FPN_INSTANCE_STRIDES": [8, 16, 32, 32],
            "FPN_SCALE_RANGES": [[1, 64], [32, 128], [64, 256], [128, 2048]],
            "NUM_GRIDS": [32, 24, 16, 12],
            "NUM_CLASSES": 20,
            "INSTANCE_IN_CHANNELS": 256,
            "INSTANCE_CHANNELS": 128,
            "NUM_INSTANCE_CONVS": 2,
            "NUM_KERNELS": 64,
            "MASK_IN_FEATURES": ["p2", "p3", "p4"],
            "MASK_IN_CHANNELS": 256,
            "MASK_CHANNELS": 64,
            "NUM_MASKS": 64,
            "SCORE_THR": 0.2,
            "MASK_THR": 0.4,
            "MAX_PER_IMG": 50,
            "NMS_KERNEL": "linear",
            "NMS_SIGMA": 3,
            "LOSS": {"FOCAL_ALPHA": 0.3, "DICE_WEIGHT": 2.5},
        },
    },
    "INPUT": {"MIN_SIZE_TRAIN": [640, 672, 704], "MIN_SIZE_TRAIN_SAMPLING": "choice"},
    "SOLVER": {"STEPS": [60000, 80000], "MAX_ITER": 90000},
    "OUTPUT_DIR": "training_dir/SOLOv2_R50_custom",
}


def write_adelaidet_style(folder, leaf=ADELAIDET_STYLE_LEAF):
    with open(os.path.join(folder, "Base-SOLOv2.yaml"), "w") as stream:
        yaml.safe_dump(ADELAIDET_STYLE_BASE, stream)
    path = os.path.join(folder, "SOLOv2_R50_custom.yaml")
    with open(path, "w") as stream:
        yaml.safe_dump(leaf, stream)
    return path


def test_adelaidet_style_yaml_merges_and_builds(tmp_path):
    cfg = load_config(write_adelaidet_style(str(tmp_path)))
    sol = cfg.MODEL.SOLOV2
    assert list(sol.NUM_GRIDS) == [32, 24, 16, 12]
    assert [list(r) for r in sol.FPN_SCALE_RANGES] == [[1, 64], [32, 128], [64, 256], [128, 2048]]
    assert sol.LOSS.FOCAL_GAMMA == 2.0 and sol.LOSS.DICE_WEIGHT == 2.5

    model = build_model(cfg)
    assert model.ins_head.in_features == ["p3", "p4", "p5", "p6"]
    assert model.ins_head.in_strides == [8, 16, 32, 64]
    assert model.ins_head.instance_strides == [8, 16, 32, 32]
    assert model.ins_head.num_grids == [32, 24, 16, 12]
    assert model.num_grids is model.ins_head.num_grids  # one owner
    assert model.mask_head.in_features == ["p2", "p3", "p4"]
    assert model.mask_head.output_stride == 4
    assert model.scale_ranges == [(1, 64), (32, 128), (64, 256), (128, 2048)]
    assert model.num_classes == 20
    assert (model.focal_alpha, model.focal_gamma) == (0.3, 2.0)
    assert model.dice_weight == 2.5
    params = model.inference_params
    assert (params.score_threshold, params.mask_threshold) == (0.2, 0.4)
    assert (params.max_per_image, params.nms_kernel, params.nms_sigma) == (50, "linear", 3.0)
    assert model.ins_head.cate_pred.out_channels == 20
    assert model.ins_head.kernel_pred.out_channels == 64
    assert count(model.ins_head) == kernel_head_parameters(cfg)
    assert count(model.mask_head) == mask_head_parameters(cfg)
    # One grid cell per location of every level, 32^2 + 24^2 + 16^2 + 12^2.
    assert model.cell_strides.numel() == 1024 + 576 + 256 + 144


def test_adelaidet_style_model_runs_a_training_step(tmp_path):
    """The merged AdelaiDet-style config trains: a forward pass with one ground-truth object."""
    from detectron2.structures import Boxes, Instances, PolygonMasks

    cfg = load_config(write_adelaidet_style(str(tmp_path)))
    torch.manual_seed(0)
    model = build_model(cfg).train()
    instances = Instances((64, 64))
    instances.gt_boxes = Boxes(torch.tensor([[8.0, 8.0, 40.0, 48.0]]))
    instances.gt_classes = torch.tensor([3])
    instances.gt_masks = PolygonMasks([[[8.0, 8.0, 40.0, 8.0, 40.0, 48.0, 8.0, 48.0]]])
    losses = model([{"image": torch.rand(3, 64, 64) * 255, "instances": instances}])
    assert set(losses) == {"loss_cate", "loss_mask"}
    assert all(torch.isfinite(value) and value > 0 for value in losses.values())


def test_misspelled_solov2_key_is_rejected(tmp_path):
    leaf = {"_BASE_": "Base-SOLOv2.yaml", "MODEL": {"SOLOV2": {"NUM_GRID": [40, 36, 24, 16, 12]}}}
    with pytest.raises(KeyError, match="NUM_GRID"):
        load_config(write_adelaidet_style(str(tmp_path), leaf))
