#!/usr/bin/env python
"""End-to-end SOLOv2 inference latency: the official code's inference against our two forms.

Models: R50-FPN (configs/SOLOv2_R50_1x.yaml) at 800 x 1216 and SOLOv2-Light-512
(configs/SOLOv2_Light_512_R50_3x.yaml) at 512 x 778 (padded to 512 x 800), both with
MODEL.WEIGHTS "" on the chosen device. Every run processes the same 4 images, one per forward
call (batch 1) or all in one call (batch 4), so per-image costs compare the same work. Each
forward call is split into preprocess (normalize + pad), backbone+FPN, heads (kernel/category
head and mask-feature head) and postprocess (everything after the heads up to the final
image-size binary masks and boxes); the table gives, per image, the median of each stage and of
the totals over the timed runs, after a warm-up run (the first runs of a process create oneDNN
primitives and are slower).

Three PyTorch forms of the same weights run in the same process, their timed runs interleaved
(and the exported forms below, in the same loop):

- official: the model as built (NCHW, FrozenBatchNorm2d after every backbone conv), run under
  ``torch.no_grad`` like Detectron2's evaluator, with ``official_style.official_style_postprocess``:
  the official ``get_seg_single``'s operations in its order (candidate masks by ``F.conv2d`` at
  1/4 resolution, dense official Matrix NMS, only the final detections upsampled with
  ``F.interpolate``). The baseline every speed-up is reported against.
- exact: the same model object under ``torch.inference_mode`` with its own
  ``postprocess_single_image`` (masks thresholded and counted at 1/4 resolution, class-aware
  box-restricted ``matrix_nms``, only the final detections upsampled, chunk by chunk, with the
  defined rounding of ``mask_upsample.py``). This is what ``SOLOv2.forward`` does with
  ``MODEL.SOLOV2.FAST_INFERENCE False`` (and whenever autograd records or off the CPU).
  Its predictions equal ``postprocess_single_image_reference``'s bit for bit (tests); against
  the official form they agree to float rounding (matmul vs conv2d soft masks, the upsampling's
  defined rounding vs ``F.interpolate``'s), which the comparison columns show.
- fast: exact plus ``optimize_for_inference`` (FrozenBN folded into the convs, channels-last and
  the 3x3 convs of >= 128 channels by Winograd F(4x4, 3x3) on the CPU): what ``SOLOv2.forward``
  runs by default on the CPU (``MODEL.SOLOV2.FAST_INFERENCE``, an optimized copy of the
  networks). Faster convolutions, float rounding of a different order, so scores and masks may
  differ in the last bits and a detection at a threshold may flip (counted below).

Exported forms (``--backends``, default onnxruntime and openvino-f32; openvino-bf16 on request):
the same calibrated model exported with ``solov2_d2.export.export_model`` to ONNX in a temporary
folder, run through ``load_exported`` (ONNX Runtime, OpenVINO at f32 or bf16), timed in the same
loop as the PyTorch forms. Their stages are "preprocess" (normalize + pad), "graph" (the whole
exported graph: network, fixed-size postprocess, Matrix NMS) and "postprocess" (final upsample and
boxes, the PyTorch model's own code); the graph takes one image per call, so at batch 4 it runs
four times. A runtime that is not installed is skipped (printed).

Every form's predictions are compared with the official form's: number of instances, classes,
scores, masks (bitwise, or per-instance IoU and the largest score difference).

Every form runs through ``common.staged_inference``: the model's own public pieces
(``preprocess_image``, ``backbone``, ``ins_head``, ``mask_head``, ``inference`` with the form's
``postprocess``), timed between them; a check at the start asserts that it gives
``SOLOv2.forward``'s predictions bit for bit.

Memory. Unless ``--default-malloc`` is given, the process first calls
``solov2_d2.memory.retain_freed_memory()`` (all forms share the process and the setting):
with glibc's defaults every tensor above 32 MiB is a fresh mmap whose pages are faulted in on
every forward pass, a large share of a CPU forward pass at 800 x 1216
(``benchmarks/results/inference_default_malloc.md`` against ``inference.md``).

Weights. Random weights (seed 0) give an untrained model whose category scores all sit at the
focal-loss prior (0.01) and whose activations, with identity FrozenBN statistics, grow without
bound through the ResNet. So that the benchmark sees what a trained model does, two
deterministic changes are made before both forms are built from the same weights:

1. Every FrozenBatchNorm2d gets the statistics of its input on the benchmark's first image
   (running mean / variance; data-dependent initialization), and a random affine part
   (gamma uniform in [0.5, 1.5], beta normal with std 0.2, seed 1). Activations stay O(1), and
   folding the batch norm into the convs is not a no-op.
2. The category branch's bias (``ins_head.cate_pred.bias``) is shifted by one constant for all
   classes, chosen on the first image such that ``--candidates`` (default 300) grid cells x
   classes survive point NMS with a score above SCORE_THR (0.1): the shift moves every logit
   alike, so it does not change which cells are local maxima. The other images get a few
   hundred as well (printed).

The dynamic kernels and the mask feature are left as initialized: the candidates' masks are
the (random-feature) responses to the image's shapes, edges and texture, median area a few %
of the image (printed), scattered over the image rather than compact like real objects'. Mask
upsampling, area and maskness cost the same for any shape; the class-aware Matrix NMS, which
skips pixels outside the masks' boxes, saves less than it would on real, compact masks.

The images are synthetic: a plain background with 12 random ellipses and rectangles in random
colours, plus a little noise (seeds 0-3).

    .venv/bin/python benchmarks/inference.py                  # full run (minutes)
    .venv/bin/python benchmarks/inference.py --quick          # smoke run, batch 1, 1 run
    .venv/bin/python benchmarks/inference.py --device cuda    # on a GPU -> inference_cuda.md
    .venv/bin/python benchmarks/inference.py --default-malloc # glibc's default allocator settings
"""

import argparse
import copy
import functools
import importlib
import math
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    RESULTS_DIR,
    ROOT,
    PeakMemory,
    StageTimer,
    add_malloc_option,
    apply_malloc_option,
    calibrate_frozen_batchnorm,
    forward_to_heads,
    load_average,
    machine_header,
    markdown_table,
    medians_ms,
    staged_inference,
    synthetic_scene,
    write_report,
)
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from official_style import official_style_postprocess  # noqa: E402

from solov2_d2 import add_solov2_config  # noqa: E402
from solov2_d2.modeling.fast import optimize_for_inference  # noqa: E402
from solov2_d2.modeling.postprocess import (  # noqa: E402
    point_nms,
    postprocess_single_image,
)

CONFIGS = {
    "R50-FPN": "configs/SOLOv2_R50_1x.yaml",
    "Light-512": "configs/SOLOv2_Light_512_R50_3x.yaml",
}
ASPECT = 1216 / 800  # the benchmark images' width / height
STAGES = ("preprocess", "backbone+FPN", "heads", "graph", "postprocess")
FORMS = ("official", "exact", "fast")
# Exported form -> (load_exported backend, precision).
EXPORTED_FORMS = {
    "onnxruntime": ("onnxruntime", "f32"),
    "openvino-f32": ("openvino", "f32"),
    "openvino-bf16": ("openvino", "bf16"),
}
ALL_FORMS = FORMS + tuple(EXPORTED_FORMS)


# ------------------------------------------------------------------------------------ inputs
def test_size(cfg):
    """Short side MIN_SIZE_TEST, long side at ASPECT (at most MAX_SIZE_TEST), as the test-time
    ResizeShortestEdge would give an 800 x 1216 image."""
    height = cfg.INPUT.MIN_SIZE_TEST
    width = min(int(round(height * ASPECT)), cfg.INPUT.MAX_SIZE_TEST)
    return height, width


# ----------------------------------------------------------------------------------- weights
@torch.no_grad()
def calibrate_category_bias(model, image_input, target: int) -> float:
    """Shifts ``cate_pred.bias`` so that ``target`` cells x classes pass SCORE_THR after point
    NMS on this image; returns the shift."""
    threshold = model.inference_params.score_threshold
    category_logits = forward_to_heads(model, [image_input]).category_logits
    # Point NMS keeps the 2x2 local maxima; a common shift of all logits keeps the same ones.
    maxima = [
        level[F.max_pool2d(level, 2, stride=1, padding=1)[..., :-1, :-1] == level]
        for level in category_logits
    ]
    ranked = torch.cat(maxima).sort(descending=True).values
    between = 0.5 * (ranked[target - 1] + ranked[target])
    shift = math.log(threshold / (1 - threshold)) - float(between)
    model.ins_head.cate_pred.bias.add_(shift)
    return shift


@torch.no_grad()
def count_candidates(model, inputs):
    """Cells x classes above SCORE_THR after point NMS, per image."""
    category_logits = forward_to_heads(model, inputs).category_logits
    threshold = model.inference_params.score_threshold
    scores = torch.cat([point_nms(level.sigmoid()).flatten(1) for level in category_logits], 1)
    return (scores > threshold).sum(dim=1).tolist()


def build_models(config_file: str, device: str, candidates: int, image_input):
    cfg = get_cfg()
    add_solov2_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = device
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    calibrate_frozen_batchnorm(model, image_input)
    shift = calibrate_category_bias(model, image_input, candidates)
    fast = optimize_for_inference(copy.deepcopy(model))
    return cfg, model, fast, shift


# ----------------------------------------------------------------------------------- running
def run_once(model, inputs, postprocess, context, device):
    """SOLOv2.forward's inference path, stage by stage (``common.staged_inference``) under
    ``context``; returns (results, {stage: seconds})."""
    timer = StageTimer(device)
    with context():
        results = staged_inference(model, inputs, postprocess, timer)
    return results, timer.times


def pytorch_forms(model, fast, device):
    """[(form, runner)] of the three PyTorch forms (``FORMS``), each runner ``run_once`` with
    the form's model, postprocess and grad context."""
    return [
        (form, functools.partial(run_once, net, postprocess=post, context=context, device=device))
        for form, net, post, context in (
            ("official", model, official_style_postprocess, torch.no_grad),
            ("exact", model, postprocess_single_image, torch.inference_mode),
            ("fast", fast, postprocess_single_image, torch.inference_mode),
        )
    ]


def run_exported_once(exported, inputs, device):
    """An exported model (``load_exported``) on ``inputs``, one graph call per image, through its
    public steps (``preprocess``, ``run_graph``, ``to_instances``, which its ``__call__`` is made
    of), timed between them; returns (results, {stage: seconds})."""
    timer = StageTimer(device)
    results = []
    for inputs_of_image in inputs:
        image = inputs_of_image["image"]
        tensor = exported.preprocess(image)
        timer.mark("preprocess")
        detections = exported.run_graph(tensor)
        timer.mark("graph")
        image_size = tuple(int(size) for size in image.shape[-2:])
        output_size = (
            int(inputs_of_image.get("height", image_size[0])),
            int(inputs_of_image.get("width", image_size[1])),
        )
        results.append(exported.to_instances(detections, image_size, output_size))
        timer.mark("postprocess")
    return results, timer.times


def run_images(runner, inputs, batch):
    """All ``inputs``, ``batch`` images per call of ``runner`` (inputs -> (results, stage
    times)); returns (results, summed stage times)."""
    results, times = [], {}
    for start in range(0, len(inputs), batch):
        chunk_results, chunk_times = runner(inputs[start : start + batch])
        results += chunk_results
        for stage, seconds in chunk_times.items():
            times[stage] = times.get(stage, 0.0) + seconds
    return results, times


SCORE_TOLERANCE = 1e-4
IOU_TOLERANCE = 0.999
# "The same detections" of the speed targets: the export issue's tolerance (matched by class,
# scores within 1e-4, mask IoU >= 0.99), the one tests/test_export.py holds the runtimes to.
SAME_DETECTIONS_IOU = 0.99


def _mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


def compare(reference, candidate):
    """Agreement of two lists of {"instances": Instances}, image by image.

    "identical" is the benchmark's definition: the same number of instances, and a one-to-one
    matching in which every pair has the same class, scores within SCORE_TOLERANCE and mask IoU
    >= IOU_TOLERANCE. "same" (the speed targets' "same detections"): the same with mask IoU
    >= SAME_DETECTIONS_IOU. Instances are matched, not compared by rank, because two detections
    whose scores differ by less than float rounding may trade places. "bitwise": all outputs
    equal.
    """
    summary = dict(bitwise=True, identical=True, same=True, instances=0, unmatched=0, swapped=0)
    summary.update(max_score_diff=0.0, min_mask_iou=1.0)
    for a, b in zip(reference, candidate):
        a, b = a["instances"].to("cpu"), b["instances"].to("cpu")
        summary["instances"] += len(a)
        if len(a) != len(b):
            summary.update(bitwise=False, identical=False, same=False)
            summary["unmatched"] += abs(len(a) - len(b))
        elif not (
            torch.equal(a.scores, b.scores)
            and torch.equal(a.pred_classes, b.pred_classes)
            and torch.equal(a.pred_masks, b.pred_masks)
            and torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        ):
            summary["bitwise"] = False
        free = set(range(len(b)))
        for i in range(len(a)):
            # Same class and a close score; among those, the best mask.
            options = [
                j
                for j in free
                if int(b.pred_classes[j]) == int(a.pred_classes[i])
                and abs(float(b.scores[j]) - float(a.scores[i])) <= SCORE_TOLERANCE
            ]
            if not options:
                summary["unmatched"] += 1
                summary.update(identical=False, same=False)
                continue
            ious = [_mask_iou(a.pred_masks[i], b.pred_masks[j]) for j in options]
            best = max(range(len(options)), key=ious.__getitem__)
            j = options[best]
            free.discard(j)
            summary["swapped"] += int(j != i)
            score_diff = abs(float(b.scores[j]) - float(a.scores[i]))
            summary["max_score_diff"] = max(summary["max_score_diff"], score_diff)
            summary["min_mask_iou"] = min(summary["min_mask_iou"], ious[best])
    summary["identical"] &= summary["min_mask_iou"] >= IOU_TOLERANCE
    summary["same"] &= summary["min_mask_iou"] >= SAME_DETECTIONS_IOU
    return summary


def mask_statistics(results):
    """Median area and median box area of the final masks, as fractions of the image."""
    areas, box_areas = [], []
    for result in results:
        instances = result["instances"]
        if len(instances) == 0:
            continue
        pixels = instances.image_size[0] * instances.image_size[1]
        areas.append(instances.pred_masks.flatten(1).sum(dim=1).double() / pixels)
        box_areas.append(instances.pred_boxes.area().double() / pixels)
    if not areas:
        return float("nan"), float("nan")
    return torch.cat(areas).median().item(), torch.cat(box_areas).median().item()


def exported_forms(cfg, model, backends, device, check_inputs, export_dir, notes):
    """[(form, runner)] of the requested exported backends that are installed; each runner is
    checked once to give its ``load_exported`` model's own predictions bit for bit."""
    if not backends:
        return []
    if device.type != "cpu":
        notes.append("- exported backends: CPU only here, skipped on " + str(device))
        return []
    from solov2_d2.export import export_model, load_exported

    path = None
    forms = []
    for form in backends:
        backend, precision = EXPORTED_FORMS[form]
        try:
            importlib.import_module(backend)
        except ImportError:
            notes.append(f"- {form}: {backend} is not installed, skipped")
            continue
        if path is None:
            path = export_model(cfg, copy.deepcopy(model), export_dir, "onnx")
        exported = load_exported(path, backend=backend, precision=precision)
        runner = functools.partial(run_exported_once, exported, device=device)
        direct = exported(check_inputs)
        staged, _ = runner(check_inputs)
        assert compare(direct, staged)["bitwise"], f"run_exported_once differs from {form}"
        forms.append((form, runner))
    return forms


def benchmark_config(name, config_file, args, device, rows, notes, export_dir):
    print(f"== {name}: {config_file}", file=sys.stderr, flush=True)
    cfg_probe = get_cfg()
    add_solov2_config(cfg_probe)
    cfg_probe.merge_from_file(config_file)
    height, width = test_size(cfg_probe)
    num_images = max(args.batch_sizes)
    images = [synthetic_scene(height, width, seed)[0] for seed in range(num_images)]
    all_inputs = [{"image": image, "height": height, "width": width} for image in images]
    cfg, model, fast, shift = build_models(config_file, args.device, args.candidates, all_inputs[0])
    forms = pytorch_forms(model, fast, device)
    forms += exported_forms(cfg, model, args.backends, device, all_inputs[:1], export_dir, notes)
    candidates = count_candidates(model, all_inputs)

    # The stage-by-stage runner must be the model's forward: check once, bitwise.
    with torch.inference_mode():
        direct = model(all_inputs[:1])
    staged, _ = run_once(model, all_inputs[:1], postprocess_single_image, torch.no_grad, device)
    assert compare(direct, staged)["bitwise"], "run_once differs from SOLOv2.forward"
    area, box_area = mask_statistics(direct)
    notes.append(
        f"- {name}: {height} x {width} input, category bias shifted by {shift:+.3f}; "
        f"candidates (cells x classes above SCORE_THR after point NMS) per image: "
        f"{', '.join(map(str, candidates))}; image 1: {len(direct[0]['instances'])} final "
        f"detections, median mask area {100 * area:.1f}% of the image, median box area "
        f"{100 * box_area:.0f}%."
    )

    # Every batch size processes the same images (batch 1: one call per image), so that the
    # per-image costs compare the same work.
    for batch in args.batch_sizes:
        runs = {form: [] for form, _ in forms}
        outputs = {}
        for _ in range(args.warmup):
            for form, runner in forms:
                run_images(runner, all_inputs, batch)
        for repeat in range(args.runs):
            for form, runner in forms:
                outputs[form], times = run_images(runner, all_inputs, batch)
                runs[form].append(times)
            print(f"   batch {batch}: run {repeat + 1}/{args.runs}", file=sys.stderr, flush=True)
        agreement = {form: compare(outputs["official"], outputs[form]) for form in outputs}
        for form, runner in forms:
            with PeakMemory(device) as memory:
                runner(all_inputs[:batch])
            per_image = {k: v / num_images for k, v in medians_ms(runs[form]).items()}
            rows.append(
                dict(
                    config=name,
                    size=f"{height}x{width}",
                    batch=batch,
                    form=form,
                    ms=per_image,
                    memory=memory.mib,
                    memory_method=memory.method,
                    agreement=agreement[form],
                )
            )
        del outputs


# ----------------------------------------------------------------------------------- reports
def latency_table(rows):
    headers = ["model", "input", "batch", "form"] + [f"{s} (ms)" for s in STAGES]
    headers += ["total (ms)", "postprocess share", "peak memory (MiB)"]
    body = []
    for row in rows:
        ms = row["ms"]
        body.append(
            [row["config"], row["size"], row["batch"], row["form"]]
            + [f"{ms[s]:.0f}" if s in ms else "-" for s in STAGES]
            + [
                f"{ms['total']:.0f}",
                f"{100 * ms['postprocess'] / ms['total']:.1f}%",
                f"{row['memory']:.0f}",
            ]
        )
    return markdown_table(headers, body, "llrl" + "r" * (len(headers) - 4))


def pairs(rows):
    """(official row, other form's row) per model, batch and other form."""
    by_key = {(r["config"], r["batch"], r["form"]): r for r in rows}
    for (config, batch, form), row in by_key.items():
        if form == "official":
            for other in ALL_FORMS[1:]:
                if (config, batch, other) in by_key:
                    yield row, by_key[(config, batch, other)]


def verdict(agreement) -> str:
    if agreement["bitwise"]:
        text = "bitwise identical"
    elif agreement["identical"]:
        text = "identical"
    elif agreement["same"]:
        text = (
            f"the same detections (min mask IoU {agreement['min_mask_iou']:.4f}: < "
            f"{IOU_TOLERANCE}, >= {SAME_DETECTIONS_IOU})"
        )
    elif agreement["unmatched"]:
        text = f"NOT the same: {agreement['unmatched']} unmatched"
    else:  # all matched by class and score, some mask below SAME_DETECTIONS_IOU
        iou = agreement["min_mask_iou"]
        text = f"NOT the same: min mask IoU {iou:.4f} < {SAME_DETECTIONS_IOU}"
    if agreement["swapped"]:
        text += f", {agreement['swapped']} swapped ranks"
    return f"{text} ({agreement['instances']} instances)"


def _ratio(a, b, stage) -> str:
    return f"{a[stage] / b[stage]:.2f}x" if stage in a and stage in b else "-"


def speedup_table(rows):
    headers = [
        "model",
        "batch",
        "form",
        "end-to-end speed-up",
        "backbone+FPN",
        "heads",
        "postprocess",
        "predictions vs official",
        "max score diff",
        "min mask IoU",
    ]
    body = []
    for baseline, other in pairs(rows):
        a, b, agreement = baseline["ms"], other["ms"], other["agreement"]
        body.append(
            [
                baseline["config"],
                baseline["batch"],
                other["form"],
                f"{a['total'] / b['total']:.2f}x",
                _ratio(a, b, "backbone+FPN"),
                _ratio(a, b, "heads"),
                f"{a['postprocess'] / b['postprocess']:.1f}x",
                verdict(agreement),
                f"{agreement['max_score_diff']:.1e}",
                f"{agreement['min_mask_iou']:.5f}",
            ]
        )
    return markdown_table(headers, body, "lrl" + "r" * 4 + "lrr")


def target_lines(rows):
    by_key = {(r["config"], r["batch"], r["form"]): r for r in rows}
    lines = []
    baseline = by_key.get(("R50-FPN", 1, "official"))
    for form in FORMS[1:]:
        row = by_key.get(("R50-FPN", 1, form))
        if not (baseline and row):
            continue
        speedup = baseline["ms"]["total"] / row["ms"]["total"]
        agreement = row["agreement"]
        identical = verdict(agreement)
        lines.append(
            f"- R50-FPN 800 x 1216, batch 1, {form}: {speedup:.2f}x faster than official, "
            f"predictions {identical} (all forms in one process here; the >= 2.5x target is "
            "judged with each in its own plain process: benchmarks/plain_process.py)."
        )
    for form in FORMS[1:]:
        row = by_key.get(("R50-FPN", 1, form))
        if row:
            share = row["ms"]["postprocess"] / row["ms"]["total"]
            lines.append(
                f"- Postprocess share of the {form} end-to-end time at 800 x 1216, batch 1: "
                f"{100 * share:.1f}% = {row['ms']['postprocess']:.0f} of {row['ms']['total']:.0f} "
                f"ms (target <= 10%: {'met' if share <= 0.10 else 'NOT met'})."
            )
    for config in CONFIGS:
        exact = by_key.get((config, 1, "exact"))
        for form in EXPORTED_FORMS:
            row = by_key.get((config, 1, form))
            if exact and row:
                speedup = exact["ms"]["total"] / row["ms"]["total"]
                agreement = row["agreement"]
                lines.append(
                    f"- {config}, batch 1, {form}: {speedup:.2f}x the exact PyTorch form end to "
                    f"end (target >= 1.5x with the same detections: "
                    f"{'met' if speedup >= 1.5 and agreement['same'] else 'NOT met'}; "
                    f"vs official: {verdict(agreement)})."
                )
        for form in ALL_FORMS:
            one, four = by_key.get((config, 1, form)), by_key.get((config, 4, form))
            if one and four:
                per_one, per_four = one["ms"]["total"], four["ms"]["total"]
                lines.append(
                    f"- {config} {form}: batch 4 costs {per_four:.0f} ms per image against "
                    f"{per_one:.0f} ms at batch 1 (target: less per image: "
                    f"{'met' if per_four < per_one else 'NOT met'})."
                )
    return lines


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['config']} b{r['batch']} {r['form']}" for r in rows]
    figure, axes = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    left = [0.0] * len(rows)
    for stage in STAGES:
        widths = [r["ms"].get(stage, 0.0) for r in rows]
        axes.barh(labels, widths, left=left, label=stage)
        left = [a + b for a, b in zip(left, widths)]
    axes.invert_yaxis()
    axes.set_xlabel("median time per image (ms)")
    axes.set_title("SOLOv2 inference: the official form, our forms, exported backends")
    axes.legend(loc="lower right", fontsize="small")
    axes.grid(True, axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--runs", type=int, default=10, help="timed runs per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--candidates", type=int, default=300, help="calibration target")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 1, 1 timed run")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--backends",
        nargs="*",
        default=["onnxruntime", "openvino-f32"],
        choices=list(EXPORTED_FORMS),
        help="exported forms to time beside the PyTorch ones (none: give the flag alone)",
    )
    add_malloc_option(parser)
    args = parser.parse_args()
    allocator_note = apply_malloc_option(args)
    if args.quick:
        args.batch_sizes, args.runs, args.warmup = [1], 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available")

    header = machine_header(device) + allocator_note
    print(header, flush=True)
    start = time.time()
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="solov2_inference_") as export_root:
        for name in args.configs:
            config_file = os.path.join(ROOT, CONFIGS[name])
            export_dir = os.path.join(export_root, name)
            benchmark_config(name, config_file, args, device, rows, notes, export_dir)
    end_load = load_average()
    num_images = max(args.batch_sizes)

    method = rows[0]["memory_method"]
    body = "\n\n".join(
        [
            f"Times are milliseconds per image: each run processes the same {num_images} images, "
            f"`batch` images per forward call; median of {args.runs} timed runs after "
            f"{args.warmup} warm-up run(s), the forms' runs interleaved. Forms, stages and "
            "the weight calibration: see the docstring of benchmarks/inference.py. Peak memory "
            f"(of one forward call of `batch` images): {method}. Load average at the end: "
            f"{end_load:.2f}; wall time {time.time() - start:.0f} s.",
            "Calibration and inputs:\n\n" + "\n".join(notes),
            latency_table(rows),
            speedup_table(rows),
            "Targets:\n\n" + "\n".join(target_lines(rows)),
        ]
    )
    print()
    print(body)
    if args.quick or args.no_write:
        return
    suffix = "" if device.type == "cpu" else "_" + device.type
    suffix += "_default_malloc" if args.default_malloc else ""
    path = write_report(
        f"inference{suffix}.md", "SOLOv2 inference benchmark", "inference.py", header, body
    )
    plot(rows, os.path.join(RESULTS_DIR, f"inference{suffix}.png"))
    print(f"wrote {path} and inference{suffix}.png")


if __name__ == "__main__":
    main()
