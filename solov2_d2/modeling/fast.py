"""Inference-time transforms that make a SOLOv2 model faster without changing what it predicts.

``optimize_for_inference(model)`` rewrites a model in place for inference:

1. Frozen batch norm is folded into the convolution before it. Detectron2's ResNet (and any
   ``detectron2.layers.Conv2d`` with a ``norm``) applies ``FrozenBatchNorm2d``, an affine map
   ``y = x * scale + shift`` per channel, after each convolution; the same map applied to the
   convolution's weights and bias gives one convolution and saves a full pass over every
   activation. Eval-mode ``nn.BatchNorm2d`` is folded the same way. GroupNorm (SOLOv2's heads)
   depends on the activations and is left alone.
2. On the CPU, 4-D weights are converted to channels-last (NHWC). oneDNN's convolutions then run
   on NHWC activations directly instead of reordering every input and output, which is several
   times faster for the wide, thin early layers of a ResNet; every later op (GroupNorm,
   interpolation, max pooling, addition) has an NHWC kernel as well.

3. On the CPU, the wide 3x3 stride-1 convolutions run by Winograd's F(4x4, 3x3)
   (``winograd.py``): 36 instead of 144 multiplications per 4x4 output tile. Those of the kernel
   head (its two towers and predictors), every level's tiles in one matrix product since the
   levels share the towers, and elsewhere those with at least ``MIN_WINOGRAD_CHANNELS`` input
   and output channels (the FPN's output convs, the mask-feature head, ResNet's res3 to res5).

All three change float rounding only: folding computes ``conv(x, w * s) + b'`` instead of
``conv(x, w) * s + b``, NHWC convolutions sum in another order, Winograd with other
coefficients. A model keeps its detections (same instances and classes; scores and masks differ
by float rounding, a detection at a threshold may flip: ``tests/test_fast_path.py`` and
``benchmarks/inference.py``). The transformed model is meant for inference only: its batch norm
statistics are baked into the weights.

``SOLOv2.forward`` applies them by itself (``MODEL.SOLOV2.FAST_INFERENCE``, the default): in
eval mode on the CPU without autograd it runs ``InferenceCopy``, an optimized copy of its
networks, and leaves its own modules as built (they train, save and export unchanged).
``MODEL.SOLOV2.FAST_INFERENCE False`` gives the exact form, whose predictions are bitwise those
of the straightforward implementation (``postprocess_single_image_reference``): use it where
results must reproduce bit for bit (regression tests, comparisons with another code base).
``optimize_for_inference(model)`` transforms a model in place, for scripts that want the fast
networks themselves (the benchmarks).
"""

import copy
import logging
import threading
from itertools import chain
from typing import Optional, Sequence

import torch
from torch import nn

from .winograd import WinogradConv2d, is_winograd_eligible

__all__ = [
    "MIN_WINOGRAD_CHANNELS",
    "InferenceCopy",
    "fold_frozen_batchnorm",
    "optimize_for_inference",
    "use_winograd",
    "use_winograd_in_kernel_head",
]

# Winograd outside the kernel head only for convs this wide: ResNet's 64-channel res2 measured
# faster direct; from 128 channels on (res3, the mask-feature head) F(4x4, 3x3) gains
# (README "Performance").
MIN_WINOGRAD_CHANNELS = 128


def _foldable_norm(norm) -> bool:
    from detectron2.layers import FrozenBatchNorm2d

    if isinstance(norm, FrozenBatchNorm2d):
        return True
    # Eval-mode batch norm is the same per-channel affine map (SyncBatchNorm included).
    return (
        isinstance(norm, nn.modules.batchnorm._BatchNorm)
        and not norm.training
        and norm.track_running_stats
        and norm.running_mean is not None
    )


@torch.no_grad()
def _fold_into_conv(conv: nn.Conv2d, norm) -> None:
    """``conv`` followed by ``norm`` -> one ``conv``; the affine map is computed in float64."""
    weight = norm.weight if norm.weight is not None else torch.ones_like(norm.running_mean)
    bias = norm.bias if norm.bias is not None else torch.zeros_like(norm.running_mean)
    scale = weight.double() * (norm.running_var.double() + norm.eps).rsqrt()
    shift = bias.double() - norm.running_mean.double() * scale
    dtype = conv.weight.dtype
    folded_weight = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
    folded_bias = shift if conv.bias is None else conv.bias.double() * scale + shift
    conv.weight = nn.Parameter(folded_weight.to(dtype), requires_grad=conv.weight.requires_grad)
    conv.bias = nn.Parameter(folded_bias.to(dtype), requires_grad=conv.weight.requires_grad)


def fold_frozen_batchnorm(model: nn.Module) -> int:
    """Folds every foldable ``norm`` of a ``detectron2.layers.Conv2d`` into its weights, in place.

    Detectron2's conv wrapper runs ``conv -> norm -> activation``; after folding, ``norm`` is
    ``None`` and the conv carries the bias. Returns the number of folded norms.
    """
    folded = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and _foldable_norm(getattr(module, "norm", None)):
            _fold_into_conv(module, module.norm)
            module.norm = None
            folded += 1
    return folded


def use_winograd_in_kernel_head(model: nn.Module) -> int:
    """Replaces the 3x3 stride-1 convs of ``model.ins_head``'s towers and predictors by
    ``WinogradConv2d``, in place; returns how many. Models without a SOLOv2 kernel head: 0."""
    head = getattr(model, "ins_head", None)
    replaced = 0
    for name in ("cate_tower", "kernel_tower", "cate_pred", "kernel_pred"):
        part = getattr(head, name, None)
        if isinstance(part, nn.Sequential):
            for index, layer in enumerate(part):
                if is_winograd_eligible(layer):
                    part[index] = WinogradConv2d(layer)
                    replaced += 1
        elif part is not None and is_winograd_eligible(part):
            setattr(head, name, WinogradConv2d(part))
            replaced += 1
    return replaced


def _replace_child(parent: nn.Module, name: str, old: nn.Module, new: nn.Module) -> None:
    """``parent.name = new``, and the same in plain lists the parent keeps beside its
    submodules (Detectron2's FPN runs its convs from ``output_convs``, a list)."""
    setattr(parent, name, new)
    for value in vars(parent).values():
        if isinstance(value, list):
            for index, item in enumerate(value):
                if item is old:
                    value[index] = new


def use_winograd(model: nn.Module, min_channels: int = MIN_WINOGRAD_CHANNELS) -> int:
    """``use_winograd_in_kernel_head``, and every other 3x3 stride-1 conv of ``model`` with at
    least ``min_channels`` input and output channels replaced by ``WinogradConv2d``, in place;
    returns how many convs were replaced in all."""
    replaced = use_winograd_in_kernel_head(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (
                is_winograd_eligible(child)
                and min(child.in_channels, child.out_channels) >= min_channels
            ):
                _replace_child(parent, name, child, WinogradConv2d(child))
                replaced += 1
    return replaced


def optimize_for_inference(
    model: nn.Module, channels_last: Optional[bool] = None, winograd: Optional[bool] = None
) -> nn.Module:
    """Makes ``model`` faster for inference, in place, and returns it (in eval mode).

    Args:
        model: a SOLOv2 model (any module works: the transforms look for convs with a foldable
            ``norm``, for 4-D weights and for a SOLOv2 kernel head).
        channels_last: convert to NHWC; default: on the CPU only (on GPUs NCHW is the better
            default for float32 convolutions).
        winograd: the wide 3x3 convs by F(4x4, 3x3) (``use_winograd``); default: on the CPU
            only (on GPUs cuDNN picks its own algorithms).
    """
    model.eval()
    fold_frozen_batchnorm(model)
    first = next(model.parameters(), None)
    on_cpu = first is not None and first.device.type == "cpu"
    if channels_last is None:
        channels_last = on_cpu
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if winograd is None:
        winograd = on_cpu
    if winograd:
        use_winograd(model)
    if getattr(model, "fast_inference", False):
        model.fast_inference = False  # already the fast form: no second, optimized copy
    return model


class InferenceCopy:
    """The optimized copy of a model's networks that its eval-mode CPU forwards run
    (``MODEL.SOLOV2.FAST_INFERENCE``), built at the first such call and rebuilt whenever a weight
    or buffer of the originals changed (loaded, trained, moved: every in-place change bumps a
    tensor's version counter). A plain attribute, not a submodule: no state-dict keys, and the
    model's own modules are never modified, so it trains and saves as built. The copy costs
    several times the networks' weights in memory (channels-last weights, and Winograd's
    transformed filters, 4x each 3x3 filter, beside the originals; README "Known limits")."""

    _announced = False

    def __init__(self):
        self._key = None
        self._networks = None
        self._lock = threading.Lock()  # concurrent first calls build one copy

    def __deepcopy__(self, memo):
        return InferenceCopy()  # a copied model builds its own (its tensors are new)

    @staticmethod
    def _version_key(modules: Sequence[nn.Module]):
        tensors = chain.from_iterable(chain(m.parameters(), m.buffers()) for m in modules)
        # Inference tensors have no version counter; their storage identifies them.
        return tuple(
            (t.data_ptr(), t.device, None if t.is_inference() else t._version) for t in tensors
        )

    def networks(
        self, model: nn.Module, names: Sequence[str] = ("backbone", "ins_head", "mask_head")
    ) -> nn.ModuleDict:
        """The optimized copies of ``model``'s ``names`` submodules, as a ``ModuleDict``."""
        originals = [getattr(model, name) for name in names]
        key = self._version_key(originals)
        with self._lock:
            if self._networks is not None and key == self._key:
                return self._networks
            self._networks = None  # free the old copy before building the new one
            with torch.inference_mode(False), torch.no_grad():
                networks = optimize_for_inference(
                    copy.deepcopy(nn.ModuleDict(zip(names, originals)))
                )
            self._networks, self._key = networks, key
            if not InferenceCopy._announced:
                InferenceCopy._announced = True
                logging.getLogger(__name__).info(
                    "SOLOv2 CPU inference runs an optimized copy of the networks (frozen batch "
                    "norm folded, channels-last, Winograd convs; same detections, last float "
                    "bits differ); MODEL.SOLOV2.FAST_INFERENCE=False runs the exact form."
                )
            return networks
