#!/usr/bin/env python
"""Convert a SOLOv2 checkpoint to solov2_d2's names: a .pth Detectron2's plain checkpointer loads.

    python tools/convert_checkpoint.py IN OUT.pth [--config-file CFG [KEY VALUE ...]]

IN: a file, a URL or a published name (mmdet://solov2_r50_fpn_1x_coco, ...) holding an
mmdetection 2.x / 3.x or official SOLO SOLOv2 checkpoint, or one of ours / AdelaiDet's. OUT gets
the weights alone ({"model": ...}): for ours that is the export of a training checkpoint without
its optimizer state. IN is read with torch.load(weights_only=True). With --config-file the
result is loaded into the model of that config (plus KEY VALUE overrides) and must fit it
exactly, but for the category predictor of another NUM_CLASSES (fine-tuning).
"""

import argparse
import logging
import sys

from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger

from solov2_d2.checkpoint import convert_checkpoint_file

logger = logging.getLogger("solov2_d2.convert_checkpoint")


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("input", help="checkpoint file, URL, or mmdet:// / solo:// name")
    parser.add_argument("output", help="converted checkpoint, a .pth file")
    parser.add_argument(
        "--config-file", default="", help="check that the result loads into this config's model"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE")
    return parser


def check_fits(config_file, opts, weights):
    """The converted tensors against the model of ``config_file`` + ``opts``: names and shapes must
    match, but for the category predictor of another class count (returned, for the log)."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from solov2_d2 import add_solov2_config
    from solov2_d2.checkpoint import check_converted_state, read_weights

    cfg = get_cfg()
    add_solov2_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    model_shapes = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    state = read_weights(weights)[0]
    return check_converted_state(
        model_shapes, {k: tuple(v.shape) for k, v in state.items()}, weights, "converted checkpoint"
    )


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="solov2_d2")
    source = PathManager.get_local_path(args.input)
    fmt, count = convert_checkpoint_file(source, args.output, source=args.input)
    logger.info("%s: %s checkpoint, %d tensors -> %s", args.input, fmt, count, args.output)
    if args.config_file:
        class_count = check_fits(args.config_file, args.opts, args.output)
        logger.info(
            "%s fits the model of %s%s",
            args.output,
            args.config_file,
            (
                " (but for {}: fine-tuning on another class count)".format(", ".join(class_count))
                if class_count
                else ""
            ),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
