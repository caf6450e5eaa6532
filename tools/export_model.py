#!/usr/bin/env python
"""Export SOLOv2 to ONNX or a ``torch.export`` archive, with Detectron2's export-tool flags:

    python tools/export_model.py --config-file configs/SOLOv2_R50_3x.yaml --format onnx \
        --output exported/ MODEL.WEIGHTS model.pth

writes ``exported/model.onnx`` (``--format torch-export``: ``exported/model.pt2``) and its JSON
(``model.onnx.json``: input format, normalization, size divisibility, thresholds, class names,
versions). Run it with ``solov2_d2.export.load_exported`` or ``demo.py --backend``. MODEL.WEIGHTS
may be any checkpoint ``SOLOv2Checkpointer`` loads (ours, AdelaiDet's, mmdetection's, the
official SOLO's, mmdet:// and solo:// names). README, "Deploy".
"""

import argparse
import logging
import os
import sys

from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from solov2_d2 import add_solov2_config  # noqa: E402
from solov2_d2.checkpoint import SOLOv2Checkpointer  # noqa: E402
from solov2_d2.export import export_model  # noqa: E402
from solov2_d2.export.metadata import FORMATS  # noqa: E402

logger = logging.getLogger("solov2_d2.export")


def get_parser():
    parser = argparse.ArgumentParser(description="Export a SOLOv2 model for deployment.")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument("--format", choices=sorted(FORMATS), default="onnx")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument(
        "--max-candidates",
        type=int,
        default=None,
        help="how many (cell, class) pairs above SCORE_THR the graph processes; more set its "
        "overflow flag (default: twice MODEL.SOLOV2.NMS_PRE)",
    )
    parser.add_argument(
        "opts",
        default=[],
        nargs=argparse.REMAINDER,
        help="config overrides, KEY VALUE pairs (e.g. MODEL.WEIGHTS model.pth)",
    )
    return parser


def setup_cfg(args):
    cfg = get_cfg()
    add_solov2_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    # The graph is traced on the CPU: the runtimes here are CPU ones, and an exported graph
    # carries no device.
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="solov2_d2")
    cfg = setup_cfg(args)
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        SOLOv2Checkpointer(model).load(cfg.MODEL.WEIGHTS)
    else:
        logger.warning("MODEL.WEIGHTS is empty: exporting randomly initialized weights")
    path = export_model(cfg, model, args.output, args.format, args.max_candidates)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
