"""A server calls one model from several threads: the results equal the sequential ones."""

import threading

import torch
from detectron2.modeling import build_model

from solov2_d2.modeling import native
from solov2_d2.modeling.fast import InferenceCopy

from .conftest import tiny_cfg

NUM_THREADS = 4


def _inputs(seed):
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(3, 96, 128, generator=generator) * 255
    image[:, 20:60, 30:90] = 230.0  # a bright block, so masks have structure
    return [{"image": image, "height": 150, "width": 200}]


def _as_tuple(outputs):
    instances = outputs[0]["instances"]
    return (
        instances.pred_masks,
        instances.pred_boxes.tensor,
        instances.scores,
        instances.pred_classes,
    )


def test_concurrent_calls_equal_sequential_calls():
    cfg = tiny_cfg()
    # An untrained model scores every class at PRIOR_PROB (0.01): thresholds below it give
    # detections to compare.
    cfg.MODEL.SOLOV2.SCORE_THR = 0.005
    cfg.MODEL.SOLOV2.UPDATE_THR = 0.0
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        expected = [_as_tuple(model(_inputs(seed))) for seed in range(NUM_THREADS)]
    assert all(result[0].shape[0] > 0 and result[0].any() for result in expected)

    # The first calls of the threads race for the kernels' loading and self-checks too, and for
    # the build of the CPU inference copy (MODEL.SOLOV2.FAST_INFERENCE): one is built, the same.
    native._forget()
    model._inference_copy = InferenceCopy()
    results = [None] * NUM_THREADS
    errors = []
    barrier = threading.Barrier(NUM_THREADS)

    def work(seed):
        try:
            barrier.wait()
            with torch.no_grad():
                for _ in range(2):
                    results[seed] = _as_tuple(model(_inputs(seed)))
        except Exception as error:  # reported below, with the thread's input
            errors.append((seed, error))

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(NUM_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for seed in range(NUM_THREADS):
        for got, want in zip(results[seed], expected[seed]):
            assert torch.equal(got, want), seed
    assert model._inference_copy._networks is not None
