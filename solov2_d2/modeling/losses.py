"""SOLOv2 training losses: L = L_cate + lambda * L_mask (SOLO paper, Eq. 1; lambda = 3).

L_cate is the sigmoid focal loss (RetinaNet, Lin et al. 2017) over every grid cell of every level;
L_mask is the dice loss (SOLO Sec. 3.3.2) between the predicted and target masks of the positive
(instance, cell) pairs. Normalizations follow the official implementation: the focal sum is divided
by (number of positive cells + 1), the dice loss is averaged over the positive pairs.

With several processes (DistributedDataParallel, which averages the gradients of the processes),
the official code counts the positives of each process's own images. Here, by default, the counts
are summed over all processes and each process's loss is ``world_size * its sum / global count``:
the averaged gradient is then the one of a single process training on all the images (and the
logged loss, which Detectron2 averages over processes, its loss).
``normalize_across_processes=False`` (config ``MODEL.SOLOV2.LOSS.NORM_ACROSS_PROCESSES False``)
gives the official per-process normalization.
"""

from typing import Dict, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.utils import comm
from fvcore.nn import sigmoid_focal_loss as _fvcore_sigmoid_focal_loss
from torch import Tensor

__all__ = ["sigmoid_focal_loss", "dice_loss", "solov2_losses"]


def _at_least_float32(tensor: Tensor) -> Tensor:
    """``tensor`` as float32 if it is a half type (or not floating), else unchanged (float64 stays
    float64). Loss sums run over whole masks: 200 x 336 pixels at p = 0.99 sum to 66528 > 65504,
    the float16 maximum, and bfloat16 keeps only 8 bits of such a sum."""
    if tensor.is_floating_point() and torch.finfo(tensor.dtype).bits >= 32:
        return tensor
    return tensor.float()


def sigmoid_focal_loss(
    logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Elementwise sigmoid focal loss, same shape as ``logits``, always float32.

    loss = -alpha_t * (1 - p_t) ** gamma * log(p_t), with p_t = p for positives and 1 - p for
    negatives, alpha_t = alpha for positives and 1 - alpha for negatives. ``targets`` are one-hot.
    This is fvcore's ``sigmoid_focal_loss`` (the same formula, with the log term from
    BCE-with-logits so that large |logits| stay finite) with SOLO's defaults: fvcore's own
    default ``alpha=-1`` means no alpha weighting. fvcore casts its inputs to float32, so half
    inputs are computed in float32 and float64 inputs lose their extra precision.
    """
    return _fvcore_sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none")


def dice_loss(mask_probs: Tensor, mask_targets: Tensor, eps: float = 1e-3) -> Tensor:
    """Per-instance dice loss (P,), 1 - 2 sum(p t) / (sum(p^2) + sum(t^2)) (SOLO Sec. 3.3.2).

    All dimensions but the first are flattened. As in the official implementation, ``eps`` is added
    to both squared sums (so 2 * eps in the denominator): an empty target with an empty prediction
    gives loss 1, not NaN. Half inputs are summed in float32 (they overflow or round away in their
    own type); the result is float32, or float64 for float64 inputs.
    """
    probs = _at_least_float32(mask_probs.flatten(1))
    targets = mask_targets.flatten(1).to(probs.dtype)
    overlap = (probs * targets).sum(dim=1)
    prob_energy = (probs * probs).sum(dim=1) + eps
    target_energy = (targets * targets).sum(dim=1) + eps
    return 1 - 2 * overlap / (prob_energy + target_energy)


def _counts_over_processes(counts: Tensor, across_processes: bool) -> Tuple[Tensor, int]:
    """(``counts`` summed over all processes, number of processes), or (``counts``, 1) for the
    per-process normalization or a single process. One all_reduce of a few integers."""
    world_size = comm.get_world_size()
    if not across_processes or world_size == 1:
        return counts, 1
    counts = counts.clone()
    dist.all_reduce(counts)
    return counts, world_size


def solov2_losses(
    category_logits: Tensor,
    category_targets: Tensor,
    mask_logits: Tensor,
    mask_targets: Tensor,
    num_classes: int,
    focal_alpha: float,
    focal_gamma: float,
    focal_weight: float,
    dice_weight: float,
    normalize_across_processes: bool = True,
) -> Dict[str, Tensor]:
    """The two SOLOv2 loss terms, already weighted.

    Args:
        category_logits: (M, num_classes) logits of every cell of every level and image.
        category_targets: (M,) int64 class ids, ``num_classes`` for background cells.
        mask_logits: (P, Hm, Wm) predicted mask logits of the positive (instance, cell) pairs.
        mask_targets: (P, Hm, Wm) 0/1 targets of those pairs.
        num_classes, focal_alpha, focal_gamma: focal loss setup.
        focal_weight, dice_weight: weights of the category and mask terms (lambda = dice_weight).
        normalize_across_processes: count the positive cells and pairs over all processes (see
            the module docstring); no effect in a single process. Every process must call this
            together then (it all-reduces the counts).

    Returns:
        {"loss_cate": focal_weight * sum(focal) / (num_positive_cells + 1),
         "loss_mask": dice_weight * mean over pairs of dice(sigmoid(mask_logits), mask_targets)},
        with the counts and the scaling of the module docstring under several processes,
        computed in float32 for float16/bfloat16 inputs (``loss_mask`` in float64 for float64
        mask logits; fvcore computes ``loss_cate`` in float32 always).
    """
    if category_logits.dim() != 2 or category_logits.shape[1] != num_classes:
        raise ValueError(
            f"category_logits must be (M, num_classes={num_classes}), got shape "
            f"{tuple(category_logits.shape)}"
        )
    if category_targets.shape != category_logits.shape[:1]:
        raise ValueError(
            f"category_targets must be ({category_logits.shape[0]},) to match category_logits, "
            f"got shape {tuple(category_targets.shape)}"
        )
    if category_targets.numel() > 0:
        lowest, highest = int(category_targets.min()), int(category_targets.max())
        if lowest < 0 or highest > num_classes:
            raise ValueError(
                f"category_targets must lie in [0, num_classes={num_classes}] (num_classes = "
                f"background), got values in [{lowest}, {highest}]"
            )
    if mask_logits.shape != mask_targets.shape:
        raise ValueError(
            f"mask_logits and mask_targets must have the same shape, got "
            f"{tuple(mask_logits.shape)} and {tuple(mask_targets.shape)}"
        )

    category_targets = category_targets.long()
    # One extra column for background, then dropped: background cells get an all-zero target row.
    one_hot = F.one_hot(category_targets, num_classes + 1)[:, :num_classes]
    focal = sigmoid_focal_loss(category_logits, one_hot, alpha=focal_alpha, gamma=focal_gamma)
    local_counts = torch.stack(
        [(category_targets != num_classes).sum(), category_targets.new_tensor(mask_logits.shape[0])]
    )
    counts, world_size = _counts_over_processes(local_counts, normalize_across_processes)
    num_positive_cells, num_pairs = counts
    # "+ 1" keeps images without any positive cell finite (official normalization). DDP divides
    # the summed gradients by world_size: the factor here undoes that.
    loss_cate = world_size * focal_weight * focal.sum() / (num_positive_cells + 1).to(focal.dtype)

    # The sigmoid too runs in float32: float16 probabilities step by 2^-11 near 1 and every
    # logit above ~8.3 gives p = 1 exactly.
    mask_logits = _at_least_float32(mask_logits)
    if mask_logits.shape[0] == 0:
        # No positive pair in this process's batch: a zero that still reaches mask_logits in the
        # graph, so backward (and DDP's used-parameter bookkeeping) treats the mask branch as
        # usual. (num_pairs > 0 here only when another process has pairs.)
        loss_mask = mask_logits.sum() * 0.0
    else:
        dice = dice_loss(torch.sigmoid(mask_logits), mask_targets)
        loss_mask = world_size * dice_weight * dice.sum() / num_pairs.to(dice.dtype)
    return {"loss_cate": loss_cate, "loss_mask": loss_mask}
