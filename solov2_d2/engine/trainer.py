"""What train_net.Trainer adds to Detectron2's DefaultTrainer for faults and resumption."""

import logging
import math
from typing import Dict, List, Optional

import torch

from ..compat import default_trainer_checkpoints_optimizer, restart_data_loader_iterator

__all__ = ["SOLOv2TrainerMixin", "non_finite_loss_error"]

logger = logging.getLogger(__name__)


class _LossRecorder:
    """Forward hook keeping the last training loss dict and the files of its batch (detached, no
    device sync), so that a non-finite loss can be explained. It holds no trainer reference."""

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


def non_finite_loss_error(
    iteration: int, losses: Optional[Dict[str, torch.Tensor]], files: List[str], cause=None
) -> FloatingPointError:
    """A FloatingPointError naming the iteration, the non-finite loss term(s) and the batch."""
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


class SOLOv2TrainerMixin:
    """Mixed into a ``DefaultTrainer`` subclass (``class Trainer(SOLOv2TrainerMixin,
    DefaultTrainer)``):

    * checkpoints hold the optimizer state (Detectron2 v0.6's DefaultTrainer leaves it out, so a
      resumed run restarted SGD momentum from zero) and the train loader's seed;
    * ``resume_or_load`` restarts a ``ResumableTrainLoader`` at the resumed iteration, so the
      resumed run trains on the batches the interrupted one would have had;
    * a NaN/inf loss stops training with a ``FloatingPointError`` naming the iteration, the
      offending loss term(s) and the batch's files (instead of Detectron2's bare loss dict).
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        self._loss_recorder = _LossRecorder()
        self.model.register_forward_hook(self._loss_recorder)
        self._loader_state = None

    def run_step(self):
        self._loss_recorder.clear()
        try:
            super().run_step()
        except FloatingPointError as error:
            recorder = self._loss_recorder
            raise non_finite_loss_error(
                self.iter, recorder.losses, recorder.files, error
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
