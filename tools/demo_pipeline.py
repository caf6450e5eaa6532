#!/usr/bin/env python
"""`make demo`: the whole chain on a CPU, from nothing to a mask AP.

1. generate the built-in shapes dataset (train + val) under datasets/ if it is missing;
2. train SOLOv2 from scratch on its train split with configs/SOLOv2_demo_cpu.yaml
   (train_net.py's Trainer, Detectron2's standard flow), scoring mask AP on the first
   --eval-images val images every --eval-period iterations (a learning curve at a few % of the
   training time);
3. evaluate on the whole val split with COCOEvaluator (segm + bbox);
4. draw val predictions with Detectron2's Visualizer, enlarged, into <output>/vis/; a contact
   sheet of ground truth | predictions and the learning curve into <output>/;
5. write <output>/metrics.json (APs, per-class APs, timings) and print `mask AP <value>` as the
   very last line.

<output>/ holds, besides the checkpoints:
    metrics.json            the run's results (this script's summary, one JSON object)
    training_metrics.json   Detectron2's JSONWriter log (one JSON object per line: losses, the
                            subset APs "val_subset/segm/AP", the final "segm/AP", ...), the
                            "metrics.json" of a plain train_net.py run
    learning_curve.png, contact_sheet.png, vis/*.png
"""

import argparse
import json
import math
import os
import sys
import time

import cv2
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.engine import default_argument_parser, hooks  # noqa: E402
from detectron2.utils.events import (  # noqa: E402
    CommonMetricPrinter,
    JSONWriter,
    TensorboardXWriter,
)

import train_net  # noqa: E402
from solov2_d2.data import register_builtin_shapes  # noqa: E402
from solov2_d2.data.checks import get_dataset_dicts  # noqa: E402
from solov2_d2.engine.evaluation_hook import SubsetEvalHook  # noqa: E402
from solov2_d2.memory import retain_freed_memory  # noqa: E402
from solov2_d2.visualization import (  # noqa: E402
    contact_sheet,
    draw_predictions,
    match_instances,
    plot_learning_curve,
    read_metrics,
)

TRAINING_METRICS = "training_metrics.json"
# DefaultTrainer's PeriodicWriter period. The EventStorage keeps only the latest value of a scalar
# until a writer writes it, so the demo writes at least as often as it evaluates the subset.
WRITER_PERIOD = 20


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config-file", default=os.path.join(ROOT, "configs", "SOLOv2_demo_cpu.yaml")
    )
    parser.add_argument("--output", default=os.path.join(ROOT, "output", "demo"))
    parser.add_argument("--num-vis", type=int, default=12, help="val images to draw into vis/")
    parser.add_argument(
        "--sheet-images", type=int, default=8, help="val images in contact_sheet.png"
    )
    parser.add_argument(
        "--vis-scale", type=float, default=3.0, help="enlargement of the drawings (Visualizer)"
    )
    parser.add_argument(
        "--vis-threshold", type=float, default=0.3, help="lowest score drawn and matched"
    )
    parser.add_argument(
        "--eval-period",
        type=int,
        default=250,
        help="iterations between the subset evaluations of the learning curve (0: none)",
    )
    parser.add_argument(
        "--eval-images", type=int, default=16, help="val images of the subset evaluations"
    )
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    for name in ("num_vis", "sheet_images", "eval_period", "eval_images"):
        if getattr(args, name) < 0:
            parser.error("--{} must not be negative".format(name.replace("_", "-")))
    if args.vis_scale <= 0:
        parser.error("--vis-scale must be positive")
    return args


class DemoTrainer(train_net.Trainer):
    """train_net.Trainer plus the subset evaluations of the learning curve; Detectron2's
    per-iteration log goes to training_metrics.json, since metrics.json is the demo's summary."""

    eval_period = 0
    eval_images = 16

    def build_hooks(self):
        hook_list = super().build_hooks()
        if self.eval_period > 0:
            self.subset_hook = SubsetEvalHook(
                self.cfg, self.cfg.DATASETS.TEST[0], self.eval_period, self.eval_images
            )
            writers = [i for i, h in enumerate(hook_list) if isinstance(h, hooks.PeriodicWriter)]
            if writers:  # main process only
                # Evaluations closer than the writer's period would overwrite each other in the
                # storage before being written: write as often as they come (same writers, as
                # build_writers returns the ones already built).
                period = min(WRITER_PERIOD, self.eval_period)
                hook_list[writers[0]] = hooks.PeriodicWriter(self.build_writers(), period=period)
            # Before the PeriodicWriter, so that the APs are written with the step that computed
            # them.
            hook_list.insert(writers[0] if writers else len(hook_list), self.subset_hook)
        return hook_list

    def build_writers(self):
        # Detectron2's default_writers with the JSONWriter renamed. Built once: build_hooks hands
        # the same writers to its own PeriodicWriter.
        if getattr(self, "_demo_writers", None) is None:
            self._demo_writers = [
                CommonMetricPrinter(self.max_iter),
                JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, TRAINING_METRICS)),
                TensorboardXWriter(self.cfg.OUTPUT_DIR),
            ]
        return self._demo_writers


def predict_val(cfg, model, dataset_name, count):
    """[(RGB image, dataset dict, Instances on the CPU)] of the first ``count`` val images."""
    records = {
        r["file_name"]: r
        for r in get_dataset_dicts(
            dataset_name, training=False, num_classes=cfg.MODEL.SOLOV2.NUM_CLASSES
        )
    }
    loader = train_net.Trainer.build_test_loader(cfg, dataset_name)
    model.eval()
    predicted = []
    if count == 0:
        return predicted
    with torch.no_grad():
        for batch in loader:
            for inputs, outputs in zip(batch, model(batch)):
                image = read_image(inputs["file_name"], format="RGB")
                predicted.append(
                    (image, records[inputs["file_name"]], outputs["instances"].to("cpu"))
                )
                if len(predicted) >= count:
                    return predicted
    return predicted


def _image_name(record):
    return os.path.splitext(os.path.basename(record["file_name"]))[0]


def draw(predicted, metadata, output, num_vis, sheet_images, scale, threshold):
    """vis/<name>.png for the first ``num_vis`` entries and contact_sheet.png of the first
    ``sheet_images``; returns (drawings written, contact sheet path or None)."""
    vis_dir = os.path.join(output, "vis")
    os.makedirs(vis_dir, exist_ok=True)
    kept = [(image, record, inst[inst.scores >= threshold]) for image, record, inst in predicted]
    for image, record, instances in kept[:num_vis]:
        drawing = draw_predictions(image, instances, metadata, scale)
        path = os.path.join(vis_dir, _image_name(record) + ".png")
        cv2.imwrite(path, drawing[:, :, ::-1])
    if sheet_images == 0:
        return min(num_vis, len(kept)), None
    entries = []
    for image, record, instances in kept[:sheet_images]:
        matched, num_gt, num_pred = match_instances(record, instances)
        best = ", ".join("{:.0f}%".format(100 * s) for s in instances.scores.tolist()[:3])
        caption = "{}: {}/{} found, {} predicted (best {})".format(
            _image_name(record), matched, num_gt, num_pred, best or "-"
        )
        entries.append((image, record, instances, caption))
    sheet, _ = contact_sheet(entries, metadata, scale=scale, columns=2)
    sheet_path = os.path.join(output, "contact_sheet.png")
    cv2.imwrite(sheet_path, sheet[:, :, ::-1])
    return min(num_vis, len(kept)), sheet_path


def _json_number(value):
    # NaN (e.g. the AP of a class absent from val) is not JSON: null.
    return None if isinstance(value, float) and not math.isfinite(value) else value


def per_class_table(results, class_names):
    """({class: {"segm": AP, "bbox": AP}}, printable table) from COCOEvaluator's "AP-<class>"."""
    per_class = {
        name: {task: _json_number(results[task].get("AP-" + name)) for task in ("segm", "bbox")}
        for name in class_names
    }
    width = max([len("class")] + [len(name) for name in class_names])
    lines = ["{:<{w}}  {:>7}  {:>7}".format("class", "mask AP", "box AP", w=width)]
    for name, aps in per_class.items():
        cells = ["{:7.1f}".format(v) if v is not None else "    n/a" for v in aps.values()]
        lines.append("{:<{w}}  {}  {}".format(name, *cells, w=width))
    return per_class, "\n".join(lines)


def _shown_path(path):
    """The path relative to the repository when inside it, else absolute."""
    path = os.path.abspath(path)
    inside = os.path.commonpath([path, ROOT]) == ROOT
    return os.path.relpath(path, ROOT) if inside else path


def subset_curve(training_metrics):
    """[{"iteration", "segm_AP", "bbox_AP", "seconds"}] of the subset evaluations logged."""
    return [
        {
            "iteration": iteration + 1,
            "segm_AP": _json_number(record["val_subset/segm/AP"]),
            "bbox_AP": _json_number(record.get("val_subset/bbox/AP")),
            "seconds": round(record.get("val_subset/seconds", float("nan")), 2),
        }
        for iteration, record in read_metrics(training_metrics).items()
        if "val_subset/segm/AP" in record
    ]


def main(argv=None):
    args = parse_args(argv)
    retain_freed_memory()  # as train_net.main does
    started = time.time()
    register_builtin_shapes()
    d2_args = default_argument_parser().parse_args(
        ["--config-file", args.config_file]
        + (["--resume"] if args.resume else [])
        + ["OUTPUT_DIR", args.output]
        + list(args.opts)
    )
    cfg = train_net.setup(d2_args)
    for name in cfg.DATASETS.TRAIN + cfg.DATASETS.TEST:
        count = len(DatasetCatalog.get(name))  # generates the shapes splits if missing
        print("[demo] dataset {}: {} images".format(name, count), flush=True)
    generated = time.time()

    DemoTrainer.eval_period, DemoTrainer.eval_images = args.eval_period, args.eval_images
    trainer = DemoTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    # Training ends with the evaluation on cfg.DATASETS.TEST (Detectron2's EvalHook); its results
    # are only returned by train() when TEST.EXPECTED_RESULTS is set, so read them from the hook.
    results = getattr(trainer, "_last_eval_results", None)
    if not results:  # resumed after the last iteration: nothing was evaluated
        results = train_net.Trainer.test(cfg, trainer.model)
    trained = time.time()

    dataset_name = cfg.DATASETS.TEST[0]
    metadata = MetadataCatalog.get(dataset_name)
    predicted = predict_val(cfg, trainer.model, dataset_name, max(args.num_vis, args.sheet_images))
    num_vis, sheet_path = draw(
        predicted,
        metadata,
        args.output,
        args.num_vis,
        args.sheet_images,
        args.vis_scale,
        args.vis_threshold,
    )
    training_metrics = os.path.join(args.output, TRAINING_METRICS)
    plot_learning_curve(
        training_metrics,
        os.path.join(args.output, "learning_curve.png"),
        subset_label="first {} val images".format(args.eval_images),
        final_label="all val images",
        title=os.path.basename(args.config_file),
    )
    finished = time.time()

    per_class, table = per_class_table(results, metadata.thing_classes)
    curve = subset_curve(training_metrics)
    summary = {
        "config_file": _shown_path(args.config_file),
        "datasets": {"train": list(cfg.DATASETS.TRAIN), "test": list(cfg.DATASETS.TEST)},
        "max_iter": cfg.SOLVER.MAX_ITER,
        "segm": {k: _json_number(v) for k, v in results["segm"].items()},
        "bbox": {k: _json_number(v) for k, v in results["bbox"].items()},
        "per_class_AP": per_class,
        "subset_evaluations": {"images": args.eval_images, "points": curve},
        "seconds": {
            "dataset": round(generated - started, 1),
            "train_and_eval": round(trained - generated, 1),
            "subset_evaluations": round(sum(p["seconds"] for p in curve), 1),
            "pictures": round(finished - trained, 1),
            "total": round(finished - started, 1),
        },
        "torch_threads": torch.get_num_threads(),
    }
    with open(os.path.join(args.output, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("[demo] per-class AP on {} (n/a: class absent):".format(dataset_name))
    print(table)
    print("[demo] {} drawings in {}".format(num_vis, os.path.join(args.output, "vis")))
    for name in ("learning_curve.png",) + (("contact_sheet.png",) if sheet_path else ()):
        print("[demo] {}".format(os.path.join(args.output, name)))
    print("[demo] bbox AP {:.1f} (tight boxes of the masks)".format(results["bbox"]["AP"]))
    print("[demo] wall time {:.0f} s (see {}/metrics.json)".format(finished - started, args.output))
    print("mask AP {:.1f}".format(results["segm"]["AP"]))


if __name__ == "__main__":
    main()
