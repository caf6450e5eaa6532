"""Helpers shared by the benchmark scripts: machine header, timing, the staged forward pass,
peak memory, report files, synthetic data.

The scripts run as ``.venv/bin/python benchmarks/<name>.py``, so this module is imported as
``common`` (the script's folder is first on ``sys.path``) and puts the repository root on the
path for ``solov2_d2``.
"""

import ctypes
import gc
import os
import platform
import resource
import statistics
import sys
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
from detectron2.structures import ImageList

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def machine_header(device: torch.device) -> str:
    """One line naming the machine: CPU, threads, torch version, the device, the load."""
    line = (
        f"Machine: {cpu_model()}, {os.cpu_count()} logical cores, "
        f"torch.get_num_threads() = {torch.get_num_threads()}, torch {torch.__version__}, "
        f"device {device}"
    )
    if device.type == "cuda":
        line += f" ({torch.cuda.get_device_name(device)})"
    return line + f", load average at start {load_average():.2f}"


def add_malloc_option(parser) -> None:
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's default allocator settings (no retain_freed_memory)",
    )


def apply_malloc_option(args) -> str:
    """Calls ``retain_freed_memory`` unless ``--default-malloc``; returns the machine header's
    note on the allocator setting."""
    from solov2_d2.memory import retain_freed_memory

    if not args.default_malloc and retain_freed_memory(True):
        return "; freed memory retained (retain_freed_memory)"
    return "; glibc's default allocator settings"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Wall-clock time of consecutive stages of one run, synchronizing the device at each mark
    (asynchronous GPU work is counted in the stage that launched it)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: Dict[str, float] = {}
        synchronize(device)
        self._last = time.perf_counter()

    def mark(self, stage: str) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        self.times[stage] = self.times.get(stage, 0.0) + now - self._last
        self._last = now


# ------------------------------------------------------------------------ staged forward pass
class HeadOutputs(NamedTuple):
    """What ``SOLOv2.forward`` has computed when its heads are done."""

    images: ImageList
    category_logits: List[torch.Tensor]
    kernel_preds: List[torch.Tensor]
    mask_feature: torch.Tensor


def forward_to_heads(model, inputs: List[Dict], timer: Optional[StageTimer] = None) -> HeadOutputs:
    """``SOLOv2.forward`` up to the heads, through the model's public pieces (``preprocess_image``,
    ``backbone``, ``ins_head``, ``mask_head``), so that the benchmarks time the model's own code.
    With a ``timer``, marks the stages "preprocess", "backbone+FPN" and "heads"."""
    mark = timer.mark if timer is not None else (lambda stage: None)
    images = model.preprocess_image(inputs)
    mark("preprocess")
    features = model.backbone(images.tensor)
    mark("backbone+FPN")
    category_logits, kernel_preds = model.ins_head(features)
    mask_feature = model.mask_head(features)
    mark("heads")
    return HeadOutputs(images, category_logits, kernel_preds, mask_feature)


def staged_inference(
    model, inputs: List[Dict], postprocess: Callable, timer: Optional[StageTimer] = None
) -> List[Dict]:
    """``SOLOv2.forward``'s inference path as ``forward_to_heads`` and ``model.inference`` with the
    given ``postprocess`` (a "postprocess" stage with a ``timer``); returns the model's results."""
    heads = forward_to_heads(model, inputs, timer)
    results = model.inference(
        heads.category_logits,
        heads.kernel_preds,
        heads.mask_feature,
        heads.images,
        inputs,
        postprocess=postprocess,
    )
    if timer is not None:
        timer.mark("postprocess")
    return results


def medians_ms(runs: List[Dict[str, float]]) -> Dict[str, float]:
    """Per-stage median over runs, plus the median of the runs' totals, in milliseconds."""
    stages = list(runs[0])
    result = {stage: 1000 * statistics.median(run[stage] for run in runs) for stage in stages}
    result["total"] = 1000 * statistics.median(sum(run.values()) for run in runs)
    return result


class PeakMemory:
    """Peak memory added while the ``with`` block runs, in MiB (``self.mib`` after the block).

    GPU: ``torch.cuda.max_memory_allocated`` above what was allocated at the start (tensors only,
    not the caching allocator's reserve). CPU on Linux: the peak resident set size (VmHWM, reset
    through /proc/self/clear_refs at the start) above the resident size at the start; this sees
    every allocation, torch's included, which ``tracemalloc`` does not. Elsewhere: the growth of
    ``getrusage`` ru_maxrss, which only shows a peak above the process's earlier peak.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.mib = float("nan")
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated() above the allocation at the start"
        elif _can_reset_peak_rss():
            self.method = (
                "peak resident set size (Linux VmHWM, reset via /proc/self/clear_refs) above the "
                "resident size at the start, after glibc's malloc_trim returned freed heap memory"
            )
        else:
            self.method = "growth of getrusage() ru_maxrss (lower bound)"

    def __enter__(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        elif _can_reset_peak_rss():
            _release_free_heap()
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
            self._start = _status_kib("VmRSS") * 1024
        else:
            self._start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif _can_reset_peak_rss():
            peak = _status_kib("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.mib = (peak - self._start) / 2**20
        return False


def _release_free_heap() -> None:
    """Returns memory that glibc keeps after frees to the OS, so that the resident size at the
    start of a measurement is what is in use (else a run reusing it looks free)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _can_reset_peak_rss() -> bool:
    try:
        _status_kib("VmHWM")
        return os.access("/proc/self/clear_refs", os.W_OK)
    except (OSError, KeyError):
        return False


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence], align: str = "") -> str:
    """A markdown table; ``align`` has one character per column, "l" or "r" (default "r")."""
    align = align or "r" * len(headers)
    separator = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(separator) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(filename: str, title: str, script: str, header: str, body: str) -> str:
    """Writes ``# title``, the command line, the machine header and ``body`` to
    benchmarks/results/``filename``; returns the path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, filename)
    command = " ".join([f"benchmarks/{script}"] + sys.argv[1:])
    with open(path, "w") as report:
        report.write(f"# {title}\n\n`{command}`\n\n{header}\n\n{body.rstrip()}\n")
    return path


# ------------------------------------------------------------------------------ synthetic data
def synthetic_scene(height: int, width: int, seed: int, num_shapes: int = 12):
    """A synthetic photo: a plain background with random ellipses and rectangles in random
    colours (later ones on top), plus a little noise.

    Returns ``(image, masks)``: (3, height, width) uint8 and the (num_shapes, height, width) bool
    visible part of each shape (possibly empty when covered).
    """
    generator = torch.Generator().manual_seed(seed)

    def uniform(*shape):
        return torch.rand(*shape, generator=generator)

    image = (uniform(3, 1, 1) * 255).expand(3, height, width).clone()
    ys = torch.arange(height, dtype=torch.float32).view(-1, 1)
    xs = torch.arange(width, dtype=torch.float32).view(1, -1)
    masks = torch.zeros(num_shapes, height, width, dtype=torch.bool)
    for index in range(num_shapes):
        center_y, center_x = (uniform(2) * torch.tensor([height, width])).tolist()
        radius_y = 0.03 * height + uniform(1).item() * height / 3
        radius_x = 0.03 * width + uniform(1).item() * width / 3
        colour = uniform(3) * 255
        if uniform(1).item() < 0.5:
            inside = ((ys - center_y) / radius_y) ** 2 + ((xs - center_x) / radius_x) ** 2 <= 1
        else:
            inside = ((ys - center_y).abs() <= radius_y) & ((xs - center_x).abs() <= radius_x)
        image[:, inside] = colour[:, None]
        masks[:index] &= ~inside
        masks[index] = inside
    image += 2.0 * torch.randn(3, height, width, generator=generator)
    return image.clamp(0, 255).round().to(torch.uint8), masks


@torch.no_grad()
def calibrate_frozen_batchnorm(model, image_input, seed: int = 1) -> int:
    """Gives every FrozenBatchNorm2d of ``model`` the statistics of its input on one image
    (data-dependent initialization) and a random affine part (gamma in [0.5, 1.5], beta with
    std 0.2), in one forward pass of the backbone. Random weights with identity statistics let
    activations grow without bound through a ResNet; these keep them O(1), as in a trained
    model, and make folding the norms into the convs a real change. Returns the count."""
    from detectron2.layers import FrozenBatchNorm2d

    generator = torch.Generator().manual_seed(seed)

    def set_statistics(module, inputs):
        x = inputs[0]
        count = module.num_features
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)) + 1e-3)
        module.weight.copy_(0.5 + torch.rand(count, generator=generator).to(x.device))
        module.bias.copy_(0.2 * torch.randn(count, generator=generator).to(x.device))

    norms = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    hooks = [m.register_forward_pre_hook(set_statistics) for m in norms]
    was_training = model.training
    model.eval()
    try:
        model.backbone(model.preprocess_image([image_input]).tensor)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return len(norms)
