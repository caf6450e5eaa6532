"""``add_solov2_config``: every SOLOv2 option with its default.

Key names and defaults follow AdelaiDet's SOLOv2 so that its YAML files load unchanged. Keys that
AdelaiDet does not have are marked "(solov2_d2)".

The heads take their input channels and strides from the backbone (``backbone.output_shape()``).
``INSTANCE_IN_CHANNELS`` and ``MASK_IN_CHANNELS`` stay because AdelaiDet's YAMLs set them; they
are checked, not used: building the model fails if they disagree with the backbone's channels.
"""

from detectron2.config import CfgNode as CN


def add_solov2_config(cfg):
    """Adds ``cfg.MODEL.SOLOV2`` and, unless the config has it already, ``cfg.SOLVER.OPTIMIZER``
    to a Detectron2 config, in place. Nothing else changes."""
    _C = cfg
    _C.MODEL.SOLOV2 = CN()

    # ---- Instance (kernel + category) head ----
    # FPN levels the kernel head runs on, coarse grids on coarse levels; any number of them.
    _C.MODEL.SOLOV2.INSTANCE_IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    # Stride each level is resized to before its grid: ceil(padded input size / stride). The
    # defaults halve p2 and bring p6 to p5's size (paper Sec. 3.1).
    _C.MODEL.SOLOV2.FPN_INSTANCE_STRIDES = [8, 8, 16, 32, 32]
    # sqrt(box area) range, in input pixels, of the objects each level is responsible for.
    _C.MODEL.SOLOV2.FPN_SCALE_RANGES = ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))
    # Center-region scale: a cell is positive within SIGMA * half box size of the mass center.
    _C.MODEL.SOLOV2.SIGMA = 0.2
    # Channels of the FPN features fed to the kernel head. Checked, not used: the head takes them
    # from the backbone, and a different value here means a YAML written for another backbone.
    _C.MODEL.SOLOV2.INSTANCE_IN_CHANNELS = 256
    # Channels inside the category and kernel towers.
    _C.MODEL.SOLOV2.INSTANCE_CHANNELS = 512
    # Number of 3x3 conv + norm + ReLU blocks in each tower.
    _C.MODEL.SOLOV2.NUM_INSTANCE_CONVS = 4
    # Deformable convs in the category and kernel towers (the convs DCN_INSTANCE_CONVS names).
    _C.MODEL.SOLOV2.USE_DCN_IN_INSTANCE = False
    # Kind of the heads' deformable convs: "DCN" (v1) or "DCNv2" (modulated); read only when
    # USE_DCN_IN_INSTANCE or USE_DCN_IN_MASK_FEATURE is True.
    _C.MODEL.SOLOV2.TYPE_DCN = "DCN"
    # (solov2_d2) Which convs of both towers are deformable: "all" (the official SOLOv2Head, mmdet
    # R101/X101-DCN) or "last" (the official and mmdet Light-DCN heads). AdelaiDet reads
    # USE_DCN_IN_INSTANCE but builds plain convs.
    _C.MODEL.SOLOV2.DCN_INSTANCE_CONVS = "all"
    # S: the S x S grid of each instance level (read by the kernel head only).
    _C.MODEL.SOLOV2.NUM_GRIDS = [40, 36, 24, 16, 12]
    # Number of object categories (the category branch's outputs).
    _C.MODEL.SOLOV2.NUM_CLASSES = 80
    # Length of each predicted dynamic kernel (= NUM_MASKS for 1x1 kernels, paper Sec. 3.2).
    _C.MODEL.SOLOV2.NUM_KERNELS = 256
    # Normalization in the heads: "GN" (32 groups), "BN" (per level in the shared kernel-head
    # towers), or "" / "none" (the convs get biases).
    _C.MODEL.SOLOV2.NORM = "GN"
    # Append normalized (x, y) coordinates to the kernel branch input (CoordConv).
    _C.MODEL.SOLOV2.USE_COORD_CONV = True
    # Prior probability used to initialize the category branch's bias (focal loss init).
    _C.MODEL.SOLOV2.PRIOR_PROB = 0.01

    # ---- Mask feature head ----
    # FPN levels fused into the unified mask feature F at 1/4 scale: consecutive, from p2.
    _C.MODEL.SOLOV2.MASK_IN_FEATURES = ["p2", "p3", "p4", "p5"]
    # Channels of the FPN features fed to the mask feature head; checked, not used (as
    # INSTANCE_IN_CHANNELS).
    _C.MODEL.SOLOV2.MASK_IN_CHANNELS = 256
    # Channels inside the mask feature head.
    _C.MODEL.SOLOV2.MASK_CHANNELS = 128
    # Channels E of the mask feature F (the dynamic kernels' input width).
    _C.MODEL.SOLOV2.NUM_MASKS = 256
    # (solov2_d2) Every conv of the mask feature head deformable, the 1x1 conv_pred included
    # (TYPE_DCN), as the official and mmdet R101/X101-DCN models.
    _C.MODEL.SOLOV2.USE_DCN_IN_MASK_FEATURE = False

    # ---- Inference ----
    # (solov2_d2) Eval-mode CPU forwards without autograd run an optimized copy of the networks
    # (modeling/fast.py: FrozenBN folded, channels-last, Winograd); False: the exact form.
    _C.MODEL.SOLOV2.FAST_INFERENCE = True
    # Candidates kept (by maskness-rescored score) before NMS.
    _C.MODEL.SOLOV2.NMS_PRE = 500
    # Category score threshold for a grid cell to become a candidate.
    _C.MODEL.SOLOV2.SCORE_THR = 0.1
    # Score threshold after Matrix NMS decay.
    _C.MODEL.SOLOV2.UPDATE_THR = 0.05
    # Threshold that binarizes soft masks.
    _C.MODEL.SOLOV2.MASK_THR = 0.5
    # Detections kept per image.
    _C.MODEL.SOLOV2.MAX_PER_IMG = 100
    # "matrix" (Matrix NMS, paper Sec. 4) or "mask" (greedy mask NMS).
    _C.MODEL.SOLOV2.NMS_TYPE = "matrix"
    # Matrix NMS decay function: "gaussian" or "linear".
    _C.MODEL.SOLOV2.NMS_KERNEL = "gaussian"
    # Sigma of the gaussian decay, exp(-sigma * iou^2).
    _C.MODEL.SOLOV2.NMS_SIGMA = 2
    # (solov2_d2) IoU above which greedy mask NMS drops a mask (AdelaiDet reuses MASK_THR, 0.5).
    _C.MODEL.SOLOV2.MASK_NMS_IOU_THR = 0.5

    # ---- Losses ----
    _C.MODEL.SOLOV2.LOSS = CN()
    # Sigmoid focal loss for the category branch (softmax is not implemented).
    _C.MODEL.SOLOV2.LOSS.FOCAL_USE_SIGMOID = True
    # Focal loss alpha.
    _C.MODEL.SOLOV2.LOSS.FOCAL_ALPHA = 0.25
    # Focal loss gamma.
    _C.MODEL.SOLOV2.LOSS.FOCAL_GAMMA = 2.0
    # Weight of the category loss.
    _C.MODEL.SOLOV2.LOSS.FOCAL_WEIGHT = 1.0
    # Weight of the dice mask loss (lambda in paper Eq. 1).
    _C.MODEL.SOLOV2.LOSS.DICE_WEIGHT = 3.0
    # (solov2_d2) Count positives over all processes so N processes train as one process of the
    # whole batch; False: per process, as the official code (solov2_d2/modeling/losses.py).
    _C.MODEL.SOLOV2.LOSS.NORM_ACROSS_PROCESSES = True

    # ---- Solver (solov2_d2) ----
    if "OPTIMIZER" not in _C.SOLVER:
        # "SGD" (Detectron2's, used by every COCO config) or "ADAMW" (the from-scratch CPU demo).
        _C.SOLVER.OPTIMIZER = "SGD"
