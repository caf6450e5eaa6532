"""What train_net.Trainer adds to Detectron2's DefaultTrainer for faults and resumption."""

import logging
import math
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from detectron2.utils import comm

from ..checkpoint import SOLOv2Checkpointer
from ..compat import (
    ddp_for_cpu_models,
    default_trainer_checkpoints_optimizer,
    restart_data_loader_iterator,
)

__all__ = ["SOLOv2TrainerMixin", "non_finite_loss_error"]

logger = logging.getLogger(__name__)


class _NonFiniteOnRanks(FloatingPointError):
    """Raised by ``_LossRecorder`` on every process when any process's loss is not finite."""

    def __init__(self, bad_terms: Dict[int, List[str]]):
        super().__init__(f"non-finite loss terms by rank: {bad_terms}")
        self.bad_terms = bad_terms


def _non_finite_terms_by_rank(losses: Dict[str, torch.Tensor]) -> Dict[int, List[str]]:
    """{rank: its non-finite loss terms} over all processes, from one all_reduce of a flag per
    (rank, term). Every process must call it with the same loss names."""
    names = sorted(losses)
    device = next(iter(losses.values())).device if losses else torch.device("cpu")
    if dist.get_backend() == dist.Backend.GLOO:
        device = torch.device("cpu")
    flags = torch.zeros(comm.get_world_size(), len(names), device=device)
    if names:
        flags[comm.get_rank()] = torch.stack(
            [~torch.isfinite(losses[name]).all() for name in names]
        ).to(flags)
    dist.all_reduce(flags)
    bad: Dict[int, List[str]] = {}
    for rank, term in flags.nonzero().tolist():
        bad.setdefault(rank, []).append(names[term])
    return bad


class _LossRecorder:
    """Forward hook keeping the last training loss dict and the files of its batch (detached, no
    device sync), so that a non-finite loss can be explained. It holds no trainer reference.

    With several processes it also checks, on every process, whether any process's loss is
    non-finite, and raises ``_NonFiniteOnRanks`` everywhere before the backward pass: Detectron2
    checks only on rank 0 (after the backward), so the other ranks would wait in the next
    collective until the timeout. This costs one small all_reduce and a device sync, which
    Detectron2's metrics already do every iteration.
    """

    def __init__(self):
        self.clear()

    def clear(self):
        self.losses: Optional[Dict[str, torch.Tensor]] = None
        self.files: List[str] = []

    def __call__(self, module, args, output):
        if not module.training or not isinstance(output, dict):
            return
        self.losses = {k: v.detach() for k, v in output.items() if isinstance(v, torch.Tensor)}
        batch = args[0] if args else None
        if isinstance(batch, (list, tuple)):
            self.files = [str(x.get("file_name", "?")) for x in batch if isinstance(x, dict)]
        if comm.get_world_size() > 1:
            bad = _non_finite_terms_by_rank(self.losses)
            if bad:
                raise _NonFiniteOnRanks(bad)


def non_finite_loss_error(
    iteration: int,
    losses: Optional[Dict[str, torch.Tensor]],
    files: List[str],
    cause=None,
    bad_terms_by_rank: Optional[Dict[int, List[str]]] = None,
) -> FloatingPointError:
    """A FloatingPointError naming the iteration, the non-finite loss term(s) and the batch; with
    ``bad_terms_by_rank`` (several processes) also the rank(s) whose loss is not finite."""
    if bad_terms_by_rank:
        rank = comm.get_rank()
        where = "; ".join(
            f"rank {r}: {', '.join(terms)}" for r, terms in sorted(bad_terms_by_rank.items())
        )
        if rank not in bad_terms_by_rank:
            return FloatingPointError(
                f"Non-finite loss at iteration {iteration} on another process ({where}); this "
                f"process (rank {rank}) stops too. The non-finite rank's log has the values and "
                "its batch."
            )
        iteration = f"{iteration} on rank {rank}"
    if not losses:
        return FloatingPointError(f"Non-finite loss at iteration {iteration}: {cause}")
    values = {name: float(value.float().sum()) for name, value in losses.items()}
    bad = {name: v for name, v in values.items() if not math.isfinite(v)}
    good = {name: v for name, v in values.items() if math.isfinite(v)}

    def listing(terms):
        return ", ".join(f"{name} = {value:.6g}" for name, value in terms.items())

    if bad:
        message = f"Non-finite loss at iteration {iteration}: {listing(bad)}"
        if good:
            message += f" (finite: {listing(good)})"
    else:
        message = (
            f"Non-finite loss at iteration {iteration}: the loss averaged over all processes is "
            f"not finite, this process's terms are ({listing(good)}), so another process's batch "
            f"has it. Detectron2 reported: {cause}"
        )
    if files:
        message += ". Batch: " + ", ".join(files)
    return FloatingPointError(
        message + ". Training stopped before the optimizer step, so the last checkpoint is "
        "unaffected. Usual causes: a learning rate too high for the batch size (SOLVER.BASE_LR, "
        "SOLVER.WARMUP_ITERS), a broken annotation in this batch, or fp16 overflow (SOLVER.AMP)."
    )


def _cpu_has_native_bfloat16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def _with_amp(cfg, enabled: bool):
    """A copy of ``cfg`` with SOLVER.AMP.ENABLED = ``enabled``, frozen if ``cfg`` was."""
    copy = cfg.clone()
    copy.defrost()
    copy.SOLVER.AMP.ENABLED = enabled
    if cfg.is_frozen():
        copy.freeze()
    return copy


class SOLOv2TrainerMixin:
    """Mixed into a ``DefaultTrainer`` subclass (``class Trainer(SOLOv2TrainerMixin,
    DefaultTrainer)``):

    * checkpoints hold the optimizer state (Detectron2 v0.6's DefaultTrainer leaves it out, so a
      resumed run restarted SGD momentum from zero) and the train loader's seed;
    * ``resume_or_load`` restarts a ``ResumableTrainLoader`` at the resumed iteration, so the
      resumed run trains on the batches the interrupted one would have had;
    * a NaN/inf loss stops training with a ``FloatingPointError`` naming the iteration, the
      offending loss term(s) and the batch's files (instead of Detectron2's bare loss dict).
    * with several processes, a NaN/inf loss on any of them stops all of them at that iteration,
      each naming the rank(s) and term(s) (Detectron2 stops only rank 0, the others hang);
    * ``MODEL.DEVICE cpu`` trains with several processes (gloo, see ``compat.launch``);
    * MODEL.WEIGHTS may be an mmdetection / official SOLO SOLOv2 checkpoint or an ``mmdet://``
      name (``SOLOv2Checkpointer``);
    * SOLVER.AMP.ENABLED with MODEL.DEVICE cpu trains under bfloat16 autocast.
    """

    def __init__(self, cfg):
        # SOLVER.AMP.ENABLED on the CPU: bfloat16 autocast around each step (run_step).
        # Detectron2 v0.6's AMPTrainer is CUDA-only (float16 + GradScaler): the base class gets
        # a SimpleTrainer.
        self._cpu_bfloat16 = cfg.SOLVER.AMP.ENABLED and torch.device(cfg.MODEL.DEVICE).type == "cpu"
        with ddp_for_cpu_models():  # MODEL.DEVICE cpu with several processes
            super().__init__(_with_amp(cfg, False) if self._cpu_bfloat16 else cfg)
        if self._cpu_bfloat16:
            # The trainer's own config (DefaultTrainer may have rescaled it) says AMP again.
            self.cfg = _with_amp(self.cfg, True)
            logger.info("SOLVER.AMP.ENABLED on the CPU: training steps run under bfloat16 autocast")
            if not _cpu_has_native_bfloat16():
                logger.warning(
                    "This CPU has no native bfloat16 (oneDNN reports none): bfloat16 is emulated "
                    "here, and a step can be an order of magnitude slower than in float32 (README, "
                    "Performance); SOLVER.AMP.ENABLED False trains in float32."
                )
        self._use_solov2_checkpointer()
        self._loss_recorder = _LossRecorder()
        self.model.register_forward_hook(self._loss_recorder)
        self._loader_state = None

    def _use_solov2_checkpointer(self):
        """Replaces DefaultTrainer's ``DetectionCheckpointer`` by a ``SOLOv2Checkpointer`` with
        the same model, folder and checkpointables (so MODEL.WEIGHTS may be an mmdetection or
        official SOLO checkpoint, solov2_d2/checkpoint), in the hooks that hold it too. Saving
        is Detectron2's unchanged."""
        old = self.checkpointer
        new = SOLOv2Checkpointer(
            old.model, old.save_dir, save_to_disk=old.save_to_disk, **old.checkpointables
        )
        for hook in self._hooks:
            for attribute in ("checkpointer", "_checkpointer"):
                if getattr(hook, attribute, None) is old:
                    setattr(hook, attribute, new)
        self.checkpointer = new

    def run_step(self):
        self._loss_recorder.clear()
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self._cpu_bfloat16):
                super().run_step()
        except FloatingPointError as error:
            recorder = self._loss_recorder
            raise non_finite_loss_error(
                self.iter,
                recorder.losses,
                recorder.files,
                error,
                getattr(error, "bad_terms", None),
            ) from error

    def state_dict(self):
        state = super().state_dict()
        state.setdefault("_trainer", self._trainer.state_dict())
        if hasattr(self.data_loader, "restart"):
            state["train_loader"] = self.data_loader.state_dict()
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if "_trainer" in state:
            if not default_trainer_checkpoints_optimizer():
                self._trainer.load_state_dict(state["_trainer"])
        else:
            logger.warning(
                "The checkpoint has no optimizer state (written by Detectron2 v0.6's "
                "DefaultTrainer?): the resumed run starts with fresh optimizer momentum"
            )
        self._loader_state = state.get("train_loader")

    def resume_or_load(self, resume=True):
        self._loader_state = None
        super().resume_or_load(resume=resume)
        if hasattr(self.data_loader, "restart"):
            self.data_loader.restart(self.start_iter, self._loader_state)
            restart_data_loader_iterator(self._trainer)
