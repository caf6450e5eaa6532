#!/usr/bin/env python
"""How fast can SOLOv2 inference be on this CPU in float32? Operation counts against the peak.

For each model of ``benchmarks/inference.py`` (R50-FPN at 800 x 1216, Light-512 at 512 x 778)
this script

1. counts the floating-point operations of every convolution of the network, per stage
   (backbone+FPN; heads: kernel/category head and mask-feature head), with forward hooks:
   2 per multiply-add, i.e. ``2 * output elements * input channels per group * kernel area``
   (biases, normalizations, activations, resizes and additions are not counted: they are
   memory-bound passes, and leaving them out only lowers the bound). The postprocess's one
   large operation, the dynamic convolution of the candidates' kernels with the mask feature
   (paper Eq. 2, ``2 * candidates * E * H/4 * W/4``), is counted the same way;
2. measures the attainable float32 rate of this machine: the best of a 2048^3 matmul and a
   512 -> 512 channel 3x3 convolution (channels-last, 64 x 64), both through PyTorch (MKL /
   oneDNN), with the process's threads, probed before every timed run (the machine's speed
   drifts; the fastest probe counts). Nothing that computes these convolutions directly runs
   faster than that;
3. times the official-style, exact and fast forms stage by stage, interleaved in this process
   (``inference.run_once``, freed memory kept for all of them), and prints each stage's rate.

The float32 bound of an image is (network + dynamic-convolution operations) / peak rate: the
time of an implementation that did nothing but these multiply-adds, at the peak, with no
memory traffic. Dividing a baseline's time by it gives the largest speed-up any float32
implementation of SOLOv2's definition can have over that baseline on this machine. Going below
the bound needs fewer operations (Winograd or FFT convolutions, pruning) or narrower arithmetic
(bfloat16, int8), and each of those changes the results.

``--official-ms MODEL=MS`` adds the official-style inference's time in its own plain process
(``benchmarks/plain_process.py``, which also pays the allocator's page faults) as a second
baseline.

    .venv/bin/python benchmarks/roofline.py
    .venv/bin/python benchmarks/roofline.py --official-ms R50-FPN=5400 Light-512=1900
"""

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import inference  # noqa: E402
from common import (  # noqa: E402
    ROOT,
    add_malloc_option,
    apply_malloc_option,
    forward_to_heads,
    load_average,
    machine_header,
    markdown_table,
    medians_ms,
    synthetic_scene,
    write_report,
)

NETWORK_STAGES = ("backbone+FPN", "heads")
STAGES = ("preprocess",) + NETWORK_STAGES + ("postprocess",)
TARGET_VS_OFFICIAL = 2.5
TARGET_EXPORTED_VS_OURS = 1.5


# ------------------------------------------------------------------------------ operation counts
def conv_flops(conv: nn.Conv2d, output: torch.Tensor) -> int:
    """Floating-point operations of one call of ``conv`` that produced ``output``: 2 per
    multiply-add (biases not counted)."""
    kernel_area = conv.kernel_size[0] * conv.kernel_size[1]
    return 2 * output.numel() * (conv.in_channels // conv.groups) * kernel_area


def is_winograd_conv(conv: nn.Conv2d) -> bool:
    """3x3, stride 1, dilation 1, ungrouped: the convolutions Winograd's F(4x4, 3x3) computes
    with 36 instead of 144 multiplications per 4x4 output tile."""
    return (
        tuple(conv.kernel_size) == (3, 3)
        and tuple(conv.stride) == (1, 1)
        and tuple(conv.dilation) == (1, 1)
        and conv.groups == 1
    )


def count_conv_flops(
    module: nn.Module, run: Callable[[], object], select: Callable[[nn.Conv2d], bool] = None
) -> int:
    """Total ``conv_flops`` of every ``nn.Conv2d`` inside ``module`` (those for which ``select``
    is true, if given) while ``run()`` executes."""
    total = [0]

    def add(conv, inputs, output):
        total[0] += conv_flops(conv, output)

    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    convs = [conv for conv in convs if select is None or select(conv)]
    handles = [conv.register_forward_hook(add) for conv in convs]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return total[0]


@torch.no_grad()
def network_flops(model, image_input) -> Dict[str, int]:
    """{stage: conv FLOPs} of the network on one image ("backbone+FPN", "heads"), "dynamic conv":
    the postprocess's candidate kernels x mask feature, and "3x3 stride 1": the part of the
    network's FLOPs in ``is_winograd_conv`` convolutions."""
    images = model.preprocess_image([image_input])
    features = {}

    def backbone():
        features.update(model.backbone(images.tensor))

    def heads():
        model.ins_head(features)
        model.mask_head(features)

    head_modules = nn.ModuleList([model.ins_head, model.mask_head])
    counts = {
        "backbone+FPN": count_conv_flops(model.backbone, backbone),
        "heads": count_conv_flops(head_modules, heads),
    }
    counts["3x3 stride 1"] = count_conv_flops(
        model.backbone, backbone, is_winograd_conv
    ) + count_conv_flops(head_modules, heads, is_winograd_conv)
    (candidates,) = inference.count_candidates(model, [image_input])
    mask_feature = forward_to_heads(model, [image_input]).mask_feature
    num_masks, height, width = mask_feature.shape[1:]
    counts["dynamic conv"] = 2 * candidates * num_masks * height * width
    return counts


# ------------------------------------------------------------------------------------ peak rate
def _best_rate(flops: float, run: Callable[[], object], repeats: int) -> float:
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return flops / best


@torch.no_grad()
def attainable_peak(repeats: int = 5) -> Dict[str, float]:
    """{probe: FLOP/s}: a 2048^3 float32 matmul and a 512 -> 512 channel 3x3 convolution at
    64 x 64 (channels-last), best of ``repeats``."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(2048, 2048, generator=generator)
    b = torch.randn(2048, 2048, generator=generator)
    x = torch.randn(1, 512, 64, 64, generator=generator).contiguous(
        memory_format=torch.channels_last
    )
    w = torch.randn(512, 512, 3, 3, generator=generator).contiguous(
        memory_format=torch.channels_last
    )
    return {
        "matmul 2048^3": _best_rate(2 * 2048**3, lambda: torch.mm(a, b), repeats),
        "conv 3x3 512->512 at 64x64": _best_rate(
            2 * 512 * 512 * 9 * 64 * 64, lambda: F.conv2d(x, w, padding=1), repeats
        ),
    }


# ----------------------------------------------------------------------------------- measuring
def measure_config(name, args, device, probes):
    """Stage times of the three forms and FLOP counts of model ``name``; appends a peak probe
    (``attainable_peak``) before every run to ``probes``."""
    config_file = os.path.join(ROOT, inference.CONFIGS[name])
    print(f"== {name}: {config_file}", file=sys.stderr, flush=True)
    probe = inference.get_cfg()
    inference.add_solov2_config(probe)
    probe.merge_from_file(config_file)
    height, width = inference.test_size(probe)
    inputs = [
        {"image": synthetic_scene(height, width, seed)[0], "height": height, "width": width}
        for seed in range(args.images)
    ]
    _, model, fast, _ = inference.build_models(config_file, args.device, args.candidates, inputs[0])
    per_image = [network_flops(model, one) for one in inputs]
    flops = {key: statistics.mean(c[key] for c in per_image) for key in per_image[0]}
    forms = dict(inference.pytorch_forms(model, fast, device))
    runs = {form: [] for form in forms}
    for repeat in range(args.warmup + args.runs):
        probes.append(attainable_peak())
        for form, runner in forms.items():
            _, times = inference.run_images(runner, inputs, 1)
            if repeat >= args.warmup:
                runs[form].append(times)
        print(f"   run {repeat + 1}/{args.warmup + args.runs}", file=sys.stderr, flush=True)
    ms = {form: {k: v / len(inputs) for k, v in medians_ms(r).items()} for form, r in runs.items()}
    return dict(name=name, size=f"{height} x {width}", flops=flops, ms=ms)


# ------------------------------------------------------------------------------------- reports
def stage_table(results, peak):
    headers = ["model", "stage", "GFLOP"]
    for form in inference.FORMS:
        headers += [f"{form} ms", f"{form} GFLOP/s"]
    headers += ["ms at the peak"]
    rows = []
    for result in results:
        flops, ms = result["flops"], result["ms"]
        stage_flops = {stage: flops[stage] for stage in NETWORK_STAGES}
        stage_flops["postprocess"] = flops["dynamic conv"]
        stage_flops["total"] = sum(stage_flops.values())
        for stage in NETWORK_STAGES + ("postprocess", "total"):
            row = [result["name"], stage if stage != "postprocess" else "postprocess (dyn. conv)"]
            row.append(f"{stage_flops[stage] / 1e9:.1f}")
            for form in inference.FORMS:
                seconds = ms[form][stage] / 1e3
                row += [f"{ms[form][stage]:.0f}", f"{stage_flops[stage] / seconds / 1e9:.0f}"]
            row.append(f"{stage_flops[stage] / peak * 1e3:.0f}")
            rows.append(row)
    return markdown_table(headers, rows, align="ll" + "r" * (len(headers) - 2))


WINOGRAD_SAVING = 144 / 36  # F(4x4, 3x3): multiplications per 4x4 output tile, direct / Winograd


def bound_ms(result, peak, winograd: bool = False) -> float:
    """Milliseconds per image of the network's and the dynamic convolution's FLOPs at ``peak``;
    with ``winograd``, the 3x3 stride-1 convolutions' share divided by ``WINOGRAD_SAVING``."""
    flops = result["flops"]
    total = sum(flops[stage] for stage in NETWORK_STAGES + ("dynamic conv",))
    if winograd:
        total -= flops["3x3 stride 1"] * (1 - 1 / WINOGRAD_SAVING)
    return total / peak * 1e3


def bound_table(results, peak, official_plain):
    """The float32 bound of each model against the forms' times."""
    headers = [
        "model",
        "float32 bound (ms)",
        "fast (ms)",
        "fast vs bound",
        "exact (ms)",
        "official here (ms)",
        "official, own process (ms)",
        "most possible vs official here",
        "most possible vs official, own process",
        "most possible vs exact",
    ]
    rows = []
    for result in results:
        bound = bound_ms(result, peak)
        ms = result["ms"]
        plain = official_plain.get(result["name"])
        rows.append(
            [
                f"{result['name']} {result['size']}",
                f"{bound:.0f}",
                f"{ms['fast']['total']:.0f}",
                f"{ms['fast']['total'] / bound:.2f}x",
                f"{ms['exact']['total']:.0f}",
                f"{ms['official']['total']:.0f}",
                f"{plain:.0f}" if plain else "-",
                f"{ms['official']['total'] / bound:.2f}x",
                f"{plain / bound:.2f}x" if plain else "-",
                f"{ms['exact']['total'] / bound:.2f}x",
            ]
        )
    return markdown_table(headers, rows, align="l" + "r" * (len(headers) - 1))


def winograd_table(results, peak, official_plain):
    """The bound if every 3x3 stride-1 convolution took Winograd F(4x4, 3x3)'s multiplications."""
    headers = [
        "model",
        "3x3 stride-1 share of the network's FLOPs",
        "bound with F(4x4,3x3) (ms)",
        "most possible vs official here",
        "most possible vs official, own process",
    ]
    rows = []
    for result in results:
        winograd = bound_ms(result, peak, winograd=True)
        network = sum(result["flops"][stage] for stage in NETWORK_STAGES)
        plain = official_plain.get(result["name"])
        rows.append(
            [
                f"{result['name']} {result['size']}",
                f"{result['flops']['3x3 stride 1'] / network:.0%}",
                f"{winograd:.0f}",
                f"{result['ms']['official']['total'] / winograd:.2f}x",
                f"{plain / winograd:.2f}x" if plain else "-",
            ]
        )
    return markdown_table(headers, rows, align="l" + "r" * (len(headers) - 1))


def _verdict(bound: float, needed: float) -> str:
    """Whether ``needed`` ms per image is possible when the operations alone take ``bound`` ms
    at the attainable rate."""
    if bound > needed:
        return "NOT reachable in float32 with these operations"
    return f"reachable only at {bound / needed:.0%} of the attainable rate over the whole image"


def verdict_lines(results, peak, official_plain):
    lines = []
    for result in results:
        bound = bound_ms(result, peak)
        ms = result["ms"]
        baselines = [("the official form in this process", ms["official"]["total"])]
        if result["name"] in official_plain:
            baselines.append(
                ("the official form in its own process", official_plain[result["name"]])
            )
        for label, baseline in baselines:
            needed = baseline / TARGET_VS_OFFICIAL
            lines.append(
                f"- {result['name']}: {TARGET_VS_OFFICIAL}x {label} ({baseline:.0f} ms) needs "
                f"{needed:.0f} ms per image; the float32 bound is {bound:.0f} ms, at most "
                f"{baseline / bound:.2f}x: {_verdict(bound, needed)}."
            )
        exact = ms["exact"]["total"]
        needed = exact / TARGET_EXPORTED_VS_OURS
        lines.append(
            f"- {result['name']}: an exported backend {TARGET_EXPORTED_VS_OURS}x the exact "
            f"PyTorch form ({exact:.0f} ms) needs {needed:.0f} ms; at most {exact / bound:.2f}x: "
            f"{_verdict(bound, needed)}."
        )
    return lines


def parse_official(values):
    official = {}
    for value in values:
        name, _, ms = value.partition("=")
        if name not in inference.CONFIGS or not ms:
            raise SystemExit(
                f"--official-ms expects MODEL=MS with MODEL in {list(inference.CONFIGS)}"
            )
        official[name] = float(ms)
    return official


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu only: the bound is a CPU's")
    parser.add_argument(
        "--configs", nargs="+", default=list(inference.CONFIGS), choices=list(inference.CONFIGS)
    )
    parser.add_argument("--images", type=int, default=2, help="synthetic images per run")
    parser.add_argument("--runs", type=int, default=3, help="timed runs")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--candidates", type=int, default=300, help="calibration target")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--official-ms", nargs="*", default=[], metavar="MODEL=MS", help="plain-process baseline"
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    add_malloc_option(parser)
    args = parser.parse_args()
    official_plain = parse_official(args.official_ms)
    allocator_note = apply_malloc_option(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type != "cpu":
        parser.error("the bound is measured for the CPU only")
    header = machine_header(device) + allocator_note
    print(header, flush=True)
    start = time.time()
    # The machine's speed drifts: the peak is probed before every run, and the bound uses the
    # fastest probe (the lowest bound, the most generous to any implementation).
    probes = [attainable_peak()]
    results = [measure_config(name, args, device, probes) for name in args.configs]
    probes.append(attainable_peak())
    rates = [max(probe.values()) for probe in probes]
    peak = max(rates)
    best = {name: max(probe[name] for probe in probes) for name in probes[0]}
    body = "\n\n".join(
        [
            f"Attainable float32 rate: {peak / 1e9:.0f} GFLOP/s, the fastest of {len(probes)} "
            f"probes (one before every run; their best rates ranged {min(rates) / 1e9:.0f} to "
            f"{peak / 1e9:.0f} GFLOP/s) of "
            + ", ".join(f"{probe} (best {rate / 1e9:.0f} GFLOP/s)" for probe, rate in best.items())
            + f". Times: milliseconds per image, median of {args.runs} timed runs over "
            f"{args.images} images after {args.warmup} warm-up run(s), forms interleaved "
            "(see the docstring of benchmarks/roofline.py and benchmarks/inference.py). "
            f"Load average at the end: {load_average():.2f}; wall time "
            f"{time.time() - start:.0f} s.",
            "Operations and rates per stage (GFLOP per image of direct convolutions; the "
            "postprocess row counts only its dynamic convolution, its time is the whole "
            "postprocess; the fast form computes its 3x3 convolutions of >= 128 channels by "
            "Winograd F(4x4, 3x3), with fewer multiplications, so its rates are effective, "
            "direct-convolution FLOPs per second):",
            stage_table(results, peak),
            "The float32 bound (network + dynamic convolution at the attainable rate) against "
            "the forms' times:",
            bound_table(results, peak, official_plain),
            "Fewer operations: the same bound if every 3x3 stride-1 convolution were computed "
            "with Winograd's F(4x4, 3x3) (36 instead of 144 multiplications per 4x4 output tile; "
            "transforms not counted):",
            winograd_table(results, peak, official_plain),
            "Targets:\n\n" + "\n".join(verdict_lines(results, peak, official_plain)),
        ]
    )
    print()
    print(body)
    if not args.no_write:
        path = write_report("roofline.md", "SOLOv2 float32 bound", "roofline.py", header, body)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
