"""Training-loop pieces of train_net.Trainer: an exactly resumable train loader, optimizer state
in checkpoints, and non-finite losses reported by term."""

from .loader import ResumableTrainLoader, build_resumable_train_loader
from .optimizer import build_optimizer
from .trainer import SOLOv2TrainerMixin, non_finite_loss_error

__all__ = [
    "ResumableTrainLoader",
    "build_resumable_train_loader",
    "build_optimizer",
    "SOLOv2TrainerMixin",
    "non_finite_loss_error",
]
