#!/usr/bin/env python
"""SOLOv2 inference as a user gets it: each implementation in its own plain Python process.

The speed a user sees is that of a process that builds the model, loads a checkpoint and calls
it, nothing else; settings that only our benchmark scripts make do not count. This script
prepares one checkpoint and one set of inputs per model, then starts, alternately, fresh Python
processes that each do exactly that:

- ``ours``: ``build_model(cfg)``, ``DetectionCheckpointer(model).load(path)``, ``model.eval()``,
  ``model([input])`` under ``torch.no_grad`` for each image: the standard API, nothing else
  called (whatever the model arranges for itself, such as keeping freed memory at its first CPU
  inference, counts; see ``solov2_d2/memory.py``).
- ``official``: the same build and checkpoint, then the official code's inference: the same
  network (which equals the official network for the same weights) followed by
  ``official_style.official_style_postprocess`` (the official ``get_seg_single``'s operations in
  its order), under ``torch.no_grad``, with glibc's default allocator settings, as the official
  code runs.
- ``onnxruntime`` / ``openvino`` / ``openvino-bf16`` (``--backends``): the same weights exported
  to ONNX once (``solov2_d2.export.export_model``, the graph with the fixed-size postprocess
  inside), then in the child only ``load_exported(path, backend, precision)`` and
  ``predictor([input])``: the deployment path (OpenVINO at float32, its default here, and at
  bfloat16, whose accuracy cost shows in the agreement columns).

Weights: random (seed 0), calibrated as in ``benchmarks/inference.py`` (FrozenBN statistics of
the first image, the category bias shifted so that ``--candidates`` cells x classes pass
SCORE_THR), saved once; the images are ``common.synthetic_scene`` (seeds 0-3) at the model's test
size. Each child times every image of every run (after ``--warmup`` untimed runs) and saves the
predictions of the first two images, which the parent compares (``inference.compare``).

    .venv/bin/python benchmarks/plain_process.py                 # R50-FPN and Light-512
    .venv/bin/python benchmarks/plain_process.py --configs R50-FPN --rounds 1 --runs 1 --no-write
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    ROOT,
    load_average,
    machine_header,
    markdown_table,
    write_report,
)

IMPLEMENTATIONS = ("official", "ours")
# Exported models (``tools/export_model.py``'s ``export_model``, ONNX), loaded with
# ``solov2_d2.export.load_exported`` and called like the model.
EXPORTED = ("onnxruntime", "openvino", "openvino-bf16")
SAVED_IMAGES = 2
_ALLOCATOR_SWITCH = "SOLOV2_D2_RETAIN_FREED_MEMORY"


# ------------------------------------------------------------------------------------ child
def _load_model(config_file, weights):
    """The standard API and nothing else: ``build_model``, ``DetectionCheckpointer.load``,
    ``eval``. Returns (cfg, model)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from solov2_d2 import add_solov2_config

    cfg = get_cfg()
    add_solov2_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.MODEL.WEIGHTS = weights
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return cfg, model.eval()


def _child(args) -> None:
    """One implementation in this (fresh) process; writes the timings and predictions."""
    sys.path.insert(0, ROOT)
    inputs = torch.load(args.inputs)

    if args.child in EXPORTED:  # the deployment path: no PyTorch model in the process
        from solov2_d2.export import load_exported

        backend, _, precision = args.child.partition("-")
        exported = load_exported(args.exported, backend=backend, precision=precision or "f32")

        def predict(image_input):
            return exported([image_input])

    elif args.child == "ours":
        _, model = _load_model(args.config_file, args.weights)

        def predict(image_input):
            with torch.no_grad():
                return model([image_input])

    else:
        from common import staged_inference
        from official_style import official_style_postprocess

        _, model = _load_model(args.config_file, args.weights)

        def predict(image_input):
            with torch.no_grad():
                return staged_inference(model, [image_input], official_style_postprocess)

    times = []
    for run in range(args.warmup + args.runs):
        per_image = []
        for image_input in inputs:
            start = time.perf_counter()
            outputs = predict(image_input)
            per_image.append(time.perf_counter() - start)
        if run >= args.warmup:
            times.append(per_image)
    saved = []
    for image_input in inputs[:SAVED_IMAGES]:
        instances = predict(image_input)[0]["instances"]
        saved.append({k: v for k, v in instances.get_fields().items()})
        saved[-1]["pred_boxes"] = instances.pred_boxes.tensor
        saved[-1]["image_size"] = instances.image_size
    torch.save(saved, args.output + ".pth")
    with open(args.output, "w") as f:
        json.dump({"times": times, "threads": torch.get_num_threads()}, f)
    del outputs


# ----------------------------------------------------------------------------------- parent
def _prepare(name, config_file, candidates, directory):
    """Calibrated weights and inputs of one model, saved under ``directory``."""
    import inference
    from common import synthetic_scene
    from detectron2.config import get_cfg

    from solov2_d2 import add_solov2_config

    cfg = get_cfg()
    add_solov2_config(cfg)
    cfg.merge_from_file(config_file)
    height, width = inference.test_size(cfg)
    images = [synthetic_scene(height, width, seed)[0] for seed in range(4)]
    inputs = [{"image": image, "height": height, "width": width} for image in images]
    _, model, _, shift = inference.build_models(config_file, "cpu", candidates, inputs[0])
    weights = os.path.join(directory, f"{name}.pth")
    torch.save({"model": model.state_dict()}, weights)
    inputs_path = os.path.join(directory, f"{name}_inputs.pth")
    torch.save(inputs, inputs_path)
    counts = inference.count_candidates(model, inputs)
    return weights, inputs_path, f"{height} x {width}", shift, counts


def _export(name, config_file, weights, directory):
    from solov2_d2.export import export_model

    cfg, model = _load_model(config_file, weights)
    return export_model(cfg, model, os.path.join(directory, name + "_onnx"), "onnx")


def _run_child(implementation, config_file, weights, inputs, output, args, exported=None):
    env = dict(os.environ)
    env.pop(_ALLOCATOR_SWITCH, None)  # the user's default: whatever the model arranges
    command = [sys.executable, os.path.abspath(__file__), "--child", implementation]
    command += ["--config-file", config_file, "--weights", weights, "--inputs", inputs]
    command += ["--output", output, "--runs", str(args.runs), "--warmup", str(args.warmup)]
    if exported:
        command += ["--exported", exported]
    start = time.time()
    subprocess.run(command, check=True, env=env)
    with open(output) as f:
        result = json.load(f)
    result["wall"] = time.time() - start
    return result


def _as_instances(saved):
    from detectron2.structures import Boxes, Instances

    results = []
    for fields in saved:
        instances = Instances(fields.pop("image_size"))
        boxes = fields.pop("pred_boxes")
        for key, value in fields.items():
            instances.set(key, value)
        instances.pred_boxes = Boxes(boxes)
        results.append({"instances": instances})
    return results


def main():
    import inference

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(inference.CONFIGS))
    parser.add_argument("--rounds", type=int, default=2, help="processes per implementation")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of the images per process")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first, per process")
    parser.add_argument("--candidates", type=int, default=300, help="calibration target")
    parser.add_argument(
        "--backends",
        nargs="*",
        default=list(EXPORTED),
        choices=list(EXPORTED),
        help="exported backends to time as well (none: just ours and the official inference)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--child", choices=IMPLEMENTATIONS + EXPORTED, help=argparse.SUPPRESS)
    parser.add_argument("--exported", help=argparse.SUPPRESS)
    parser.add_argument("--config-file", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    header = machine_header(torch.device("cpu"))
    print(header, flush=True)
    start = time.time()
    rows, notes, lines = [], [], []
    with tempfile.TemporaryDirectory(prefix="solov2_plain_") as directory:
        for name in args.configs:
            config_file = os.path.join(ROOT, inference.CONFIGS[name])
            weights, inputs, size, shift, counts = _prepare(
                name, config_file, args.candidates, directory
            )
            notes.append(
                f"- {name}: {size} input, category bias shifted by {shift:+.3f}; candidates per "
                f"image {', '.join(map(str, counts))}."
            )
            implementations = IMPLEMENTATIONS + tuple(args.backends)
            exported = _export(name, config_file, weights, directory) if args.backends else None
            per_image = {impl: [] for impl in implementations}
            walls = {impl: [] for impl in implementations}
            predictions = {}
            for round_index in range(args.rounds):
                for impl in implementations:
                    output = os.path.join(directory, f"{name}_{impl}_{round_index}.json")
                    result = _run_child(impl, config_file, weights, inputs, output, args, exported)
                    per_image[impl] += [t for run in result["times"] for t in run]
                    walls[impl].append(result["wall"])
                    predictions[impl] = _as_instances(torch.load(output + ".pth"))
                    print(
                        f"   {name} {impl} round {round_index + 1}: median "
                        f"{1000 * statistics.median(per_image[impl]):.0f} ms per image",
                        file=sys.stderr,
                        flush=True,
                    )
            agreements = {
                impl: inference.compare(predictions["official"], predictions[impl])
                for impl in implementations
            }
            agreement = agreements["ours"]
            baseline = statistics.median(per_image["official"])
            ours = statistics.median(per_image["ours"])
            for impl in implementations:
                median = statistics.median(per_image[impl])
                rows.append(
                    [
                        name,
                        size,
                        impl,
                        f"{1000 * median:.0f}",
                        f"{1000 * min(per_image[impl]):.0f}",
                        f"{1000 * max(per_image[impl]):.0f}",
                        f"{baseline / median:.2f}x",
                        "-" if impl == "official" else f"{ours / median:.2f}x",
                        f"{statistics.median(walls[impl]):.0f}",
                        "-" if impl == "official" else inference.verdict(agreements[impl]),
                        "-" if impl == "official" else f"{agreements[impl]['max_score_diff']:.1e}",
                    ]
                )
                if impl in EXPORTED:
                    met = "met" if ours / median >= 1.5 and agreements[impl]["same"] else "NOT met"
                    lines.append(
                        f"- {name} {impl}: {ours / median:.2f}x ours end to end (target >= 1.5x "
                        f"with the same detections: {met})."
                    )
            speedup = baseline / ours
            if name == "R50-FPN":
                met = "met" if speedup >= 2.5 and agreement["same"] else "NOT met"
                lines.append(
                    f"- R50-FPN 800 x 1216: ours {speedup:.2f}x the official inference, each in "
                    f"its own plain process (target >= 2.5x with the same detections: {met}; "
                    f"{inference.verdict(agreement)})."
                )
            lines.append(
                f"- {name}: max score difference {agreement['max_score_diff']:.1e}, min mask IoU "
                f"{agreement['min_mask_iou']:.5f} over the first {SAVED_IMAGES} images."
            )
    table = markdown_table(
        [
            "model",
            "input",
            "implementation",
            "median (ms per image)",
            "min",
            "max",
            "speed-up vs official",
            "vs ours",
            "process wall (s)",
            "detections vs official",
            "max score diff",
        ],
        rows,
        "lll" + "r" * 6 + "lr",
    )
    body = "\n\n".join(
        [
            f"Per-image latency of `model([image])` (batch 1), {args.rounds} fresh process(es) per "
            f"implementation, alternating, each timing {args.runs} run(s) over 4 images after "
            f"{args.warmup} untimed run(s); implementations and weights: see the docstring of "
            f"benchmarks/plain_process.py. Load average at the end: {load_average():.2f}; wall "
            f"time {time.time() - start:.0f} s.",
            "Inputs:\n\n" + "\n".join(notes),
            table,
            "Targets:\n\n" + "\n".join(lines),
        ]
    )
    print()
    print(body)
    if not args.no_write:
        path = write_report(
            "plain_process.md",
            "SOLOv2 inference in plain processes",
            "plain_process.py",
            header,
            body,
        )
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
