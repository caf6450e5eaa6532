#!/usr/bin/env python
"""`make demo`: the whole chain on a CPU, from nothing to a mask AP.

1. generate the built-in shapes dataset (train + val) under datasets/ if it is missing;
2. train SOLOv2 from scratch on its train split with configs/SOLOv2_demo_cpu.yaml
   (train_net.py's Trainer, Detectron2's standard flow);
3. evaluate on the val split with COCOEvaluator (segm + bbox);
4. draw val predictions with Detectron2's Visualizer into <output>/vis/;
5. print `mask AP <value>` as the very last line.
"""

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.engine import default_argument_parser  # noqa: E402
from detectron2.utils.visualizer import ColorMode, Visualizer  # noqa: E402

import train_net  # noqa: E402
from solov2_d2.data import register_builtin_shapes  # noqa: E402
from solov2_d2.engine.memory import retain_freed_memory  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config-file", default=os.path.join(ROOT, "configs", "SOLOv2_demo_cpu.yaml")
    )
    parser.add_argument("--output", default=os.path.join(ROOT, "output", "demo"))
    parser.add_argument("--num-vis", type=int, default=12, help="val images to draw")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser.parse_args(argv)


def visualize(cfg, model, dataset_name, out_dir, count):
    os.makedirs(out_dir, exist_ok=True)
    metadata = MetadataCatalog.get(dataset_name)
    loader = train_net.Trainer.build_test_loader(cfg, dataset_name)
    model.eval()
    written = 0
    with torch.no_grad():
        for batch in loader:
            for inputs, outputs in zip(batch, model(batch)):
                image = read_image(inputs["file_name"], format="RGB")
                instances = outputs["instances"].to("cpu")
                instances = instances[instances.scores >= 0.3]
                vis = Visualizer(image, metadata, instance_mode=ColorMode.IMAGE)
                name = os.path.splitext(os.path.basename(inputs["file_name"]))[0] + ".png"
                vis.draw_instance_predictions(instances).save(os.path.join(out_dir, name))
                written += 1
                if written >= count:
                    return written
    return written


def main(argv=None):
    args = parse_args(argv)
    retain_freed_memory()  # as train_net.main does
    started = time.time()
    register_builtin_shapes()
    for name in ("solov2_shapes_train", "solov2_shapes_val"):
        count = len(DatasetCatalog.get(name))
        print("[demo] dataset {}: {} images".format(name, count), flush=True)
    generated = time.time()

    d2_args = default_argument_parser().parse_args(
        ["--config-file", args.config_file]
        + (["--resume"] if args.resume else [])
        + ["OUTPUT_DIR", args.output]
        + list(args.opts)
    )
    cfg = train_net.setup(d2_args)
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    # Training ends with the evaluation on cfg.DATASETS.TEST (Detectron2's EvalHook); its results
    # are only returned by train() when TEST.EXPECTED_RESULTS is set, so read them from the hook.
    results = getattr(trainer, "_last_eval_results", None)
    if not results:  # resumed after the last iteration: nothing was evaluated
        results = train_net.Trainer.test(cfg, trainer.model)
    trained = time.time()

    num_vis = visualize(
        cfg, trainer.model, cfg.DATASETS.TEST[0], os.path.join(args.output, "vis"), args.num_vis
    )
    finished = time.time()
    summary = {
        "segm": results["segm"],
        "bbox": results["bbox"],
        "seconds": {
            "dataset": round(generated - started, 1),
            "train_and_eval": round(trained - generated, 1),
            "visualize": round(finished - trained, 1),
            "total": round(finished - started, 1),
        },
        "torch_threads": torch.get_num_threads(),
    }
    with open(os.path.join(args.output, "demo_results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("[demo] {} visualizations in {}".format(num_vis, os.path.join(args.output, "vis")))
    print("[demo] bbox AP {:.1f} (tight boxes of the masks)".format(results["bbox"]["AP"]))
    print(
        "[demo] wall time {:.0f} s (see {}/demo_results.json)".format(
            finished - started, args.output
        )
    )
    print("mask AP {:.1f}".format(results["segm"]["AP"]))


if __name__ == "__main__":
    main()
