"""benchmarks/official_style.py, the speed comparisons' baseline, computes what our postprocess
computes: same detections, scores to float rounding, masks up to pixels at the threshold."""

import importlib.util
import os

import pytest
import torch

from solov2_d2.modeling.postprocess import InferenceParams, postprocess_single_image

from .conftest import ROOT
from .test_static_postprocess import _problem


def _official_style():
    path = os.path.join(ROOT, "benchmarks", "official_style.py")
    spec = importlib.util.spec_from_file_location("solov2_d2_official_style", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
@pytest.mark.parametrize("seed", range(8))
def test_official_style_baseline_matches_ours(seed, kernel):
    params = InferenceParams(nms_kernel=kernel, nms_pre=60, max_per_image=25)
    problem = _problem(seed)
    ours = postprocess_single_image(*problem, params)
    baseline = _official_style().official_style_postprocess(*problem, params)
    assert len(ours) > 0
    assert len(baseline) == len(ours)
    assert torch.equal(baseline.pred_classes, ours.pred_classes)
    assert torch.allclose(baseline.scores, ours.scores, rtol=0, atol=1e-5)
    # F.interpolate vs our defined upsampling (mask_upsample.py): values agree to ~2e-7, so only
    # pixels whose value sits at MASK_THR may flip.
    differing = (baseline.pred_masks != ours.pred_masks).sum().item()
    assert differing <= 1e-3 * ours.pred_masks.numel()
    assert ours.pred_masks.flatten(1).any(1).all()


def test_official_matrix_nms_hand_case():
    # Three masks of one class sorted by score: B overlaps A with IoU 1/2, C is disjoint. Gaussian,
    # sigma 2: B decays by exp(-2 * 0.25) / exp(0) (A itself overlaps nothing above it).
    masks = torch.zeros(3, 2, 4, dtype=torch.bool)
    masks[0, :, 0:2] = True
    masks[1, :, 0:1] = True
    masks[2, :, 3:4] = True
    labels = torch.zeros(3, dtype=torch.long)
    scores = torch.tensor([0.9, 0.8, 0.7])
    areas = masks.flatten(1).sum(1).float()
    nms = _official_style().official_matrix_nms
    decayed = nms(masks, labels, scores, "gaussian", 2.0, areas)
    expected = torch.tensor([0.9, 0.8 * torch.exp(torch.tensor(-0.5)).item(), 0.7])
    assert torch.allclose(decayed, expected, atol=1e-7)
    linear = nms(masks, labels, scores, "linear", 2.0, areas)
    assert torch.allclose(linear, torch.tensor([0.9, 0.4, 0.7]), atol=1e-7)
    # Another class: no decay.
    assert torch.equal(nms(masks, torch.tensor([0, 1, 2]), scores, "gaussian", 2.0, areas), scores)
