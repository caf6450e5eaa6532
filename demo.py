#!/usr/bin/env python
"""Draw SOLOv2 predictions with Detectron2's Visualizer.

    python demo.py --config-file configs/SOLOv2_R50_3x.yaml --input images/ --output vis/ \
        --opts MODEL.WEIGHTS model.pth MODEL.DEVICE cpu

--input takes files, folders and glob patterns. Unreadable files are reported and skipped.
On the CPU the model runs its optimized inference copy (MODEL.SOLOV2.FAST_INFERENCE, the default;
README, Performance); --opts MODEL.SOLOV2.FAST_INFERENCE False draws with the exact form.
--backend onnxruntime / openvino / torch-export --model exported/model.onnx (or model.pt2) draws
with a model written by tools/export_model.py instead (README, "Deploy"); --config-file is then
optional and, when given, must match the model's JSON.
MODEL.WEIGHTS may be ours, AdelaiDet's, an mmdetection or official SOLO SOLOv2 checkpoint, or a
published name such as mmdet://solov2_r50_fpn_1x_coco (README, "Loading published weights").
"""

import argparse
import glob
import logging
import os
import sys

from detectron2.config import get_cfg
from detectron2.data import Metadata, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer

from solov2_d2 import add_solov2_config
from solov2_d2.checkpoint.predictor import SOLOv2Predictor
from solov2_d2.export import ExportedPredictor, check_config, metadata_path
from solov2_d2.memory import retain_freed_memory
from solov2_d2.visualization import fixed_colour_jitter

# demo.py --backend -> load_exported's backend.
EXPORTED_BACKENDS = {"onnxruntime": "onnxruntime", "openvino": "openvino", "torch-export": "torch"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
logger = logging.getLogger("solov2_d2.demo")


def get_parser():
    parser = argparse.ArgumentParser(description="SOLOv2 demo: draw predicted instance masks")
    parser.add_argument(
        "--config-file",
        metavar="FILE",
        help="path to config file (required with --backend pytorch; with an exported model, "
        "checked against its JSON)",
    )
    parser.add_argument(
        "--backend",
        choices=sorted(EXPORTED_BACKENDS) + ["pytorch"],
        default="pytorch",
        help="pytorch: the model of --config-file; the others run the exported --model",
    )
    parser.add_argument(
        "--model", metavar="FILE", help="an exported model (tools/export_model.py) for --backend"
    )
    parser.add_argument(
        "--input", nargs="+", required=True, help="image files, folders or glob patterns"
    )
    parser.add_argument(
        "--output", required=True, help="a folder for the PNGs (or a .png path for one input)"
    )
    parser.add_argument(
        "--confidence-threshold", type=float, default=0.3, help="minimum score to draw"
    )
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs"
    )
    return parser


def setup_cfg(args):
    cfg = get_cfg()
    add_solov2_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    return cfg


def expand_inputs(patterns):
    """Files, folders (their images, sorted) and glob patterns -> a list of paths."""
    paths = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            paths += sorted(
                os.path.join(pattern, name)
                for name in os.listdir(pattern)
                if name.lower().endswith(IMAGE_EXTENSIONS)
            )
        elif any(ch in pattern for ch in "*?["):
            paths += sorted(glob.glob(pattern))
        else:
            paths.append(pattern)
    return paths


def output_paths(output, paths):
    """Where each input's PNG goes: ``output`` itself for a single input named *.png, else
    ``output/<stem>.png`` (``<stem>_<ext>.png`` when two inputs share a stem, so that
    a.jpg and a.png do not overwrite each other)."""
    if output.lower().endswith(".png"):
        if len(paths) != 1:
            raise SystemExit(
                "--output {} is a .png file but there are {} inputs: give a folder".format(
                    output, len(paths)
                )
            )
        return [output]
    stems = [os.path.splitext(os.path.basename(p)) for p in paths]
    counts = {}
    for stem, _ in stems:
        counts[stem] = counts.get(stem, 0) + 1
    names = [
        stem + (("_" + ext.lstrip(".")) if counts[stem] > 1 and ext else "") + ".png"
        for stem, ext in stems
    ]
    return [os.path.join(output, name) for name in names]


def draw(predictor, metadata, image_bgr, confidence_threshold):
    instances = predictor(image_bgr)["instances"].to("cpu")
    instances = instances[instances.scores >= confidence_threshold]
    visualizer = Visualizer(image_bgr[:, :, ::-1], metadata, instance_mode=ColorMode.IMAGE)
    with fixed_colour_jitter():  # the same picture for the same predictions in every run
        return visualizer.draw_instance_predictions(instances), len(instances)


def build_predictor(args):
    """(predictor, metadata, input format) for ``args.backend``."""
    if args.backend == "pytorch":
        if not args.config_file:
            raise SystemExit("--backend pytorch needs --config-file")
        if args.model:
            raise SystemExit(
                "--model is an exported model: give it with --backend "
                + "/".join(sorted(EXPORTED_BACKENDS))
            )
        cfg = setup_cfg(args)
        metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
        predictor = SOLOv2Predictor(cfg)  # MODEL.WEIGHTS may be an mmdetection / SOLO checkpoint
        return predictor, metadata, cfg.INPUT.FORMAT
    if not args.model:
        raise SystemExit(f"--backend {args.backend} needs --model (tools/export_model.py's output)")
    if args.opts:
        raise SystemExit("--opts applies to --backend pytorch only")
    predictor = ExportedPredictor(args.model, EXPORTED_BACKENDS[args.backend])
    exported = predictor.model.metadata
    if args.config_file:
        check_config(setup_cfg(args), exported, metadata_path(predictor.model.path))
    metadata = Metadata(name="exported")
    if exported["class_names"]:
        metadata.thing_classes = exported["class_names"]
    return predictor, metadata, exported["input_format"]


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="solov2_d2")
    retain_freed_memory()  # solov2_d2/memory.py: no page faults for large tensors
    predictor, metadata, input_format = build_predictor(args)

    paths = expand_inputs(args.input)
    if not paths:
        logger.error("no input images found for %s", args.input)
        return 1
    targets = output_paths(args.output, paths)
    written, failed = 0, []
    for path, target in zip(paths, targets):
        try:
            image = read_image(path, format=input_format)
        except Exception as error:  # unreadable / missing / corrupt: report and go on
            logger.error("skipping %s: cannot read it as an image (%s)", path, error)
            failed.append(path)
            continue
        vis, count = draw(predictor, metadata, image, args.confidence_threshold)
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        vis.save(target)
        logger.info("%s: %d instances -> %s", path, count, target)
        written += 1
    logger.info("%d images written, %d skipped", written, len(failed))
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
