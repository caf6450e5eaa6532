"""The few differences between Detectron2 v0.6 (our sdist build) and today's upstream main.

Everything else in solov2_d2 uses APIs present in both.
"""

import contextlib
import copy
import functools
import importlib.machinery
import io
import logging
from typing import Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import DefaultTrainer
from detectron2.engine.launch import DEFAULT_TIMEOUT, _find_free_port
from detectron2.engine.launch import launch as _detectron2_launch
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

__all__ = [
    "has_compiled_ops",
    "detectron2_install_path",
    "build_coco_evaluator",
    "SOLOv2COCOEvaluator",
    "default_trainer_checkpoints_optimizer",
    "restart_data_loader_iterator",
    "launch",
    "ddp_for_cpu_models",
]

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def detectron2_install_path() -> str:
    """ "compiled" for a build whose ``detectron2._C`` is a compiled extension that loads,
    "sdist" for tools/install_detectron2.py's v0.6 build whose ``_C`` is a stand-in, "missing"
    if there is no loadable ``_C`` (none at all, or one that fails to load, e.g. built against
    another torch)."""
    try:
        from detectron2 import _C
    except ImportError:
        return "missing"
    if getattr(_C, "INSTALL_PATH", None) == "sdist":
        return "sdist"
    extension = str(getattr(_C, "__file__", "")).endswith(
        tuple(importlib.machinery.EXTENSION_SUFFIXES)
    )
    return "compiled" if extension else "missing"


def has_compiled_ops() -> bool:
    return detectron2_install_path() == "compiled"


def build_coco_evaluator(dataset_name, output_dir=None, tasks=("segm", "bbox"), **kwargs):
    """``COCOEvaluator`` for SOLOv2's outputs: segm, and bbox from the tight mask boxes.

    The fast C++ COCO evaluator is used only where the compiled ops exist.
    """
    kwargs.setdefault("use_fast_impl", has_compiled_ops())
    return SOLOv2COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_dir, **kwargs)


class SOLOv2COCOEvaluator(COCOEvaluator):
    """``COCOEvaluator`` that scores a model without a single detection as AP 0, not NaN.

    Detectron2 (v0.6 and main) skips the COCO API when there are no predictions at all and
    reports every metric as NaN. Here the COCO API runs on the empty detection set instead:
    metrics with ground truth come out 0.0, those without (e.g. APs on a dataset without small
    objects, a class absent from the split) NaN, exactly as with detections.
    """

    def _eval_predictions(self, predictions, img_ids=None):
        super()._eval_predictions(predictions, img_ids=img_ids)
        if not getattr(self, "_do_evaluation", True):
            return
        if any(len(p.get("instances", ())) for p in predictions):
            return
        for task in [t for t in self._results if t in ("segm", "bbox")]:
            self._results[task] = self._results_without_detections(task, img_ids)
        logger.warning(
            "The model detected nothing on any of the %d images: %s AP reported as 0.0",
            len(predictions),
            "/".join(t for t in self._results if t in ("segm", "bbox")),
        )

    def _results_without_detections(self, task, img_ids):
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        ground_truth = self._coco_api
        with contextlib.redirect_stdout(io.StringIO()):
            detections = COCO()
            detections.dataset = {
                "images": list(ground_truth.dataset.get("images", [])),
                "categories": copy.deepcopy(ground_truth.dataset.get("categories", [])),
                "annotations": [],
            }
            detections.createIndex()
            evaluation = COCOeval(ground_truth, detections, task)
            if img_ids is not None:
                evaluation.params.imgIds = img_ids
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        return self._derive_coco_results(
            evaluation, task, class_names=self._metadata.get("thing_classes")
        )


def default_trainer_checkpoints_optimizer() -> bool:
    """Whether Detectron2's DefaultTrainer saves and loads its optimizer state in checkpoints
    (upstream main does; v0.6 does not, so a resumed run loses SGD momentum)."""
    return "load_state_dict" in vars(DefaultTrainer)


def restart_data_loader_iterator(simple_trainer) -> None:
    """Makes a SimpleTrainer draw from a fresh iterator of its data loader: v0.6 creates the
    iterator eagerly in ``__init__`` (``_data_loader_iter``), main lazily
    (``_data_loader_iter_obj``)."""
    if "_data_loader_iter_obj" in vars(simple_trainer):
        simple_trainer._data_loader_iter_obj = None
    else:
        simple_trainer._data_loader_iter = iter(simple_trainer.data_loader)


def _detectron2_launch_runs_without_cuda() -> bool:
    """Detectron2 main's ``launch`` falls back to gloo when CUDA is unavailable; v0.6's asserts
    CUDA. The same change gave ``comm`` its ``create_local_process_group``, which tells them
    apart."""
    return hasattr(comm, "create_local_process_group")


def launch(
    main_func,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args=(),
    backend: Optional[str] = None,
    timeout=DEFAULT_TIMEOUT,
):
    """Detectron2's ``launch`` (same arguments; ``num_gpus_per_machine`` is the number of
    processes per machine), also on machines without CUDA and for CPU models.

    ``backend`` None means NCCL where CUDA is available, else gloo (Detectron2 main's rule);
    "gloo" forces gloo, which a model on the CPU needs even on a machine with GPUs (NCCL reduces
    only CUDA tensors). Detectron2's own ``launch`` runs whenever it would pick that backend
    itself; otherwise (gloo on v0.6, or gloo while CUDA is available) the processes are spawned
    here, each set up as Detectron2's worker sets them up, minus the CUDA device.
    """
    world_size = num_machines * num_gpus_per_machine
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    backend = backend.lower()
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    detectron2_picks = "nccl" if torch.cuda.is_available() else "gloo"
    if world_size == 1 or (
        backend == detectron2_picks
        and (backend == "nccl" or _detectron2_launch_runs_without_cuda())
    ):
        return _detectron2_launch(
            main_func,
            num_gpus_per_machine,
            num_machines=num_machines,
            machine_rank=machine_rank,
            dist_url=dist_url,
            args=args,
            timeout=timeout,
        )
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url=auto is only for single-machine jobs")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    mp.start_processes(
        _gloo_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
        start_method="spawn",
    )


def _gloo_worker(
    local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, args, timeout
):
    dist.init_process_group(
        backend="gloo",
        init_method=dist_url,
        world_size=world_size,
        rank=machine_rank * num_per_machine + local_rank,
        timeout=timeout,
    )
    # comm.get_local_rank()/get_local_size() read this group (v0.6 has no helper to build it).
    for machine in range(world_size // num_per_machine):
        ranks = list(range(machine * num_per_machine, (machine + 1) * num_per_machine))
        group = dist.new_group(ranks)
        if machine == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    main_func(*args)


@contextlib.contextmanager
def ddp_for_cpu_models():
    """While active, Detectron2's ``create_ddp_model`` (which DefaultTrainer calls) wraps a model
    whose parameters are all on the CPU without ``device_ids``: Detectron2 (v0.6 and main) passes
    ``device_ids=[local rank]``, which DistributedDataParallel rejects for CPU modules."""
    from detectron2.engine import defaults

    original = defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        if all(p.device.type == "cpu" for p in model.parameters()):
            kwargs.setdefault("device_ids", None)
        return original(model, **kwargs)

    defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        defaults.create_ddp_model = original
