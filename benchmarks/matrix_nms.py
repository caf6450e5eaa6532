#!/usr/bin/env python
"""Speed of Matrix NMS (paper Sec. 4) on realistic SOLOv2 candidates, against the dense reference.

For each candidate count N, times (median over repeated runs after a warm-up):
``matrix_nms`` with the gaussian and the linear kernel (same-class intersections from the C++
popcount kernel on the CPU where the extension is built, else the dense matmul),
``matrix_nms_dense`` (the official code's single (N, HW) @ (HW, N) matmul) and greedy
``mask_nms``; checks that ``matrix_nms`` gives the dense scores. Masks are 200 x 334, the
mask-feature size (1/4 of the input) of an 800 x 1333 COCO image. The header says which
intersections ``matrix_nms`` used. Prints a markdown table and writes it to
benchmarks/results/matrix_nms.md, with a plot in benchmarks/results/matrix_nms.png.

    .venv/bin/python benchmarks/matrix_nms.py            # full run (minutes)
    .venv/bin/python benchmarks/matrix_nms.py --quick    # smoke run
"""

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RESULTS_DIR, machine_header, markdown_table, write_report  # noqa: E402

from solov2_d2.modeling.matrix_nms import (  # noqa: E402
    mask_nms,
    matrix_nms,
    matrix_nms_dense,
    native_status,
)


def make_candidates(n, height, width, num_classes, seed):
    """Candidate masks shaped like SOLOv2's input to NMS, ranked by descending score.

    SOLOv2 predicts a mask from every grid cell near an object's center and on more than one FPN
    level, so the candidates come in clusters of near-duplicates of the same object (jittered
    position and scale), with a few assigned another class (class confusion). Objects have
    log-uniform sizes (many small, some large), a skewed class frequency (class 0 most common,
    as "person" in COCO), and are ellipses, rectangles or wobbly blobs. Larger objects get more
    candidates, as they cover more grid cells.

    Returns (masks (n, height, width) bool, labels (n,) int64, scores (n,) float32).
    """
    generator = torch.Generator().manual_seed(seed)

    def uniform(*shape):
        return torch.rand(*shape, generator=generator)

    num_objects = max(1, n // 10)
    class_frequency = torch.tensor([1.0 / (k + 1) for k in range(num_classes)])
    object_class = torch.multinomial(class_frequency, num_objects, True, generator=generator)
    log_min, log_max = math.log(8), math.log(0.7 * min(height, width))
    object_size = torch.exp(log_min + uniform(num_objects) * (log_max - log_min))
    object_aspect = torch.exp((uniform(num_objects) - 0.5) * 1.2)
    object_center = uniform(num_objects, 2) * torch.tensor([height, width])
    object_shape = torch.randint(0, 3, (num_objects,), generator=generator)
    object_confidence = 0.3 + 0.7 * uniform(num_objects)

    of_object = torch.multinomial(object_size.sqrt(), n, True, generator=generator)
    size = object_size[of_object] * (0.85 + 0.3 * uniform(n))
    aspect = object_aspect[of_object]
    half_height = (size * aspect / 2).clamp(min=2)
    half_width = (size / aspect / 2).clamp(min=2)
    center = object_center[of_object] + (uniform(n, 2) - 0.5) * 0.2 * size[:, None]
    labels = object_class[of_object].clone()
    confused = uniform(n) < 0.15
    labels[confused] = torch.randint(0, num_classes, (int(confused.sum()),), generator=generator)
    scores = object_confidence[of_object] * (0.3 + 0.7 * uniform(n))
    shape = object_shape[of_object]

    rows = torch.arange(height, dtype=torch.float32).view(1, -1, 1) + 0.5
    cols = torch.arange(width, dtype=torch.float32).view(1, 1, -1) + 0.5
    masks = torch.empty(n, height, width, dtype=torch.bool)
    for start in range(0, n, 64):  # chunks bound the float temporaries' memory
        chunk = slice(start, min(n, start + 64))
        dy = (rows - center[chunk, 0].view(-1, 1, 1)) / half_height[chunk].view(-1, 1, 1)
        dx = (cols - center[chunk, 1].view(-1, 1, 1)) / half_width[chunk].view(-1, 1, 1)
        ellipse = dy * dy + dx * dx <= 1
        rectangle = (dy.abs() <= 1) & (dx.abs() <= 1)
        blob = dy.abs() ** 3 + dx.abs() ** 3 + 0.3 * torch.sin(3 * dx + 2 * dy) <= 1
        kind = shape[chunk].view(-1, 1, 1)
        masks[chunk] = torch.where(kind == 0, ellipse, torch.where(kind == 1, rectangle, blob))
    order = torch.sort(scores, descending=True, stable=True).indices
    return masks[order], labels[order], scores[order].float()


def interleaved_median_ms(functions, repeats, warmup):
    """Median milliseconds of each function. The functions take turns within every repeat, so a
    burst of load from other processes slows all of them alike instead of one of them."""
    for function in functions.values():
        for _ in range(warmup):
            function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def cpu_seconds():
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat; None elsewhere."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / ticks, sum(fields) / ticks


def others_load(start_machine, start_own):
    """Share of the machine's CPU time that other processes used since the start: timings are
    only comparable between runs where it is small."""
    end_machine = cpu_seconds()
    if start_machine is None or end_machine is None:
        return "unknown"
    busy = end_machine[0] - start_machine[0] - (time.process_time() - start_own)
    return f"{100 * max(busy, 0.0) / (end_machine[1] - start_machine[1]):.0f}%"


def run(sizes, height, width, num_classes, repeats, warmup, seed):
    rows = []
    for num in sizes:
        masks, labels, scores = make_candidates(num, height, width, num_classes, seed)
        max_diff = max(
            (
                matrix_nms(masks, labels, scores, kernel=kernel)
                - matrix_nms_dense(masks, labels, scores, kernel=kernel)
            )
            .abs()
            .max()
            .item()
            for kernel in ("gaussian", "linear")
        )
        functions = {
            "gaussian": lambda: matrix_nms(masks, labels, scores),
            "linear": lambda: matrix_nms(masks, labels, scores, kernel="linear"),
            "dense": lambda: matrix_nms_dense(masks, labels, scores),
            "mask_nms": lambda: mask_nms(masks, labels, scores),
        }
        row = interleaved_median_ms(functions, repeats, warmup)
        row.update(N=num, classes=int(labels.unique().numel()), max_diff=max_diff)
        rows.append(row)
        print(f"N={num}: done", file=sys.stderr, flush=True)
    return rows


def results_table(rows):
    headers = [
        "N",
        "classes",
        "matrix_nms gaussian (ms)",
        "matrix_nms linear (ms)",
        "matrix_nms_dense gaussian (ms)",
        "mask_nms (ms)",
        "speed-up vs dense",
        "speed-up vs mask_nms",
        "max abs diff vs dense",
    ]
    body = [
        [
            row["N"],
            row["classes"],
            f"{row['gaussian']:.1f}",
            f"{row['linear']:.1f}",
            f"{row['dense']:.1f}",
            f"{row['mask_nms']:.1f}",
            f"{row['dense'] / row['gaussian']:.1f}x",
            f"{row['mask_nms'] / row['gaussian']:.2f}x",
            f"{row['max_diff']:.1e}",
        ]
        for row in rows
    ]
    return markdown_table(headers, body)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [row["N"] for row in rows]
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for key, label in (
        ("gaussian", "matrix_nms (gaussian)"),
        ("linear", "matrix_nms (linear)"),
        ("dense", "matrix_nms_dense (gaussian)"),
        ("mask_nms", "mask_nms (greedy)"),
    ):
        axes.plot(sizes, [row[key] for row in rows], marker="o", label=label)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("candidates N (200 x 334 masks)")
    axes.set_ylabel("median time (ms)")
    axes.set_title("Matrix NMS on CPU")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: N in {50, 200}, 3 runs, writes nothing"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200, 500, 1000])
    parser.add_argument("--height", type=int, default=200)
    parser.add_argument("--width", type=int, default=334)
    parser.add_argument("--classes", type=int, default=5, help="classes the candidates use")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-write", action="store_true", help="print only, keep benchmarks/results as it is"
    )
    args = parser.parse_args()
    sizes, repeats, warmup = args.sizes, args.repeats, 2
    if args.quick:
        sizes, repeats, warmup = [50, 200], 3, 1

    header = machine_header(torch.device("cpu"))
    print(header)
    start = cpu_seconds(), time.process_time()
    rows = run(sizes, args.height, args.width, args.classes, repeats, warmup, args.seed)
    # Decided on matrix_nms's first call, so known only now.
    path = native_status()
    header += f"; matrix_nms intersections: {path}"
    print(f"matrix_nms intersections: {path}")
    load_line = f"CPU time used by other processes during the run: {others_load(*start)}"
    print(load_line)
    table = results_table(rows)
    print(table)
    if args.quick or args.no_write:
        return
    write_report(
        "matrix_nms.md",
        "Matrix NMS benchmark",
        "matrix_nms.py",
        f"{header}. {load_line}.",
        f"Masks {args.height} x {args.width}, candidates from `make_candidates` (clusters of "
        f"near-duplicates, {args.classes} classes, seed {args.seed}); median of {repeats} runs "
        "after a warm-up, the four functions taking turns; `mask_areas` not given (each "
        "function computes them). Speed-ups are of `matrix_nms` (gaussian). Max abs diff: "
        "decayed scores of `matrix_nms` vs `matrix_nms_dense`, both kernels.\n\n" + table,
    )
    plot(rows, os.path.join(RESULTS_DIR, "matrix_nms.png"))
    print(f"wrote {RESULTS_DIR}/matrix_nms.md and matrix_nms.png")


if __name__ == "__main__":
    main()
