"""Several processes (torch.distributed, gloo on the CPU) train and evaluate as one process does.

Every run is a real ``python -m tests.test_distributed SPEC`` subprocess that goes through
``train_net.launch_main`` -> ``solov2_d2.compat.launch`` -> spawned ranks -> ``train_net.main``;
the entry point below only registers the (pre-generated) datasets in each rank and, for a test,
poisons a loss or kills the ranks. Each subprocess runs in its own session with a timeout, so a
hang fails the test instead of blocking the suite.

Why 2 processes x 1 image equal 1 process x 2 images here: every image is 64 x 64 (no resize, no
padding), so a one-process batch computes each image exactly as alone; GroupNorm everywhere (no
BatchNorm statistics across a batch); the train loader gives rank r the global stream positions
r, r + 2, ... with augmentations seeded by position, so the two ranks' batch j is the one-process
batch j; the losses count positives over both ranks (MODEL.SOLOV2.LOSS.NORM_ACROSS_PROCESSES);
the ranks convolve with PyTorch's per-image reference kernels, not oneDNN's (see ``_rank_main``).
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
import torch

from .conftest import ROOT, write_tiny_config

SIDE = 64
LAUNCH_TIMEOUT_S = 300
# Not 0: same images, same arithmetic, but the one-process run sums the two images' gradients
# inside each batched conv backward while DDP adds two per-image gradients, float32 sums in another
# order, and 4 SGD steps carry the differences on. Measured (v0.6 and main): max |difference| 1.2e-7
# on weights up to 4.6, where 2 iterations move weights by up to 1.7e-2 and the per-process
# normalization ends 8.9e-3 away (test_per_process_normalization_trains_differently).
WEIGHT_ATOL = 1e-6
WEIGHT_RTOL = 1e-5


# ------------------------------------------------------------------- the ranks' entry point


def _poison_losses(rank, call):
    """Makes the ``call``-th loss computation of ``rank`` return a NaN loss_mask."""
    from solov2_d2.modeling import solov2 as solov2_module

    original, calls = solov2_module.solov2_losses, []

    def poisoned(*args, **kwargs):
        losses = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == call:
            losses["loss_mask"] = losses["loss_mask"] * float("nan")
        return losses

    from detectron2.utils import comm

    if comm.get_rank() == rank:
        solov2_module.solov2_losses = poisoned


def _die_after(iteration):
    """Every rank exits at once, without cleanup (as if killed), after ``iteration``'s hooks."""
    from detectron2.engine import HookBase

    import train_net

    class DieAfter(HookBase):
        def after_step(self):
            if self.trainer.iter == iteration:
                os._exit(17)

    original = train_net.Trainer.build_hooks
    train_net.Trainer.build_hooks = lambda self: original(self) + [DieAfter()]


def _rank_main(args):
    from detectron2.utils import comm

    import train_net
    from solov2_d2.data import register_shapes_dataset

    spec = args.test_spec
    # The same thread count in every run: the reductions inside a kernel then split alike.
    torch.set_num_threads(1)
    # PyTorch's own convolution (im2col + GEMM per image) instead of oneDNN's, whose blocking over
    # a batch makes an image's activations differ in the last bits between a batch of 2 and of 1:
    # where a ReLU or the stem's max-pool then flips (an activation at 0, a tie), the gradient
    # moves by a whole term, not by rounding, and the comparison below would test the data.
    torch.backends.mkldnn.enabled = False
    for dataset in spec["datasets"]:
        register_shapes_dataset(**dataset)
    if spec.get("nan_at_call"):
        _poison_losses(spec["nan_rank"], spec["nan_at_call"])
    if spec.get("die_after") is not None:
        _die_after(spec["die_after"])
    results = train_net.main(args)
    if spec.get("results_file") and comm.is_main_process():
        with open(spec["results_file"], "w") as stream:
            json.dump(results, stream)


def _entry(spec_path):
    from detectron2.engine import default_argument_parser

    import train_net

    with open(spec_path) as stream:
        spec = json.load(stream)
    args = default_argument_parser().parse_args(spec["argv"])
    args.test_spec = spec
    train_net.launch_main(args, main_func=_rank_main)


# ------------------------------------------------------------------------------ helpers


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(tmp_path, argv, **spec):
    """Starts ``python -m tests.test_distributed`` on a spec; returns the Popen."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec_path = tmp_path / f"spec_{uuid.uuid4().hex[:8]}.json"
    spec_path.write_text(json.dumps(dict(spec, argv=[str(a) for a in argv])))
    return subprocess.Popen(
        [sys.executable, "-m", "tests.test_distributed", str(spec_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a timeout kills the ranks too
    )


def finish(process, timeout=LAUNCH_TIMEOUT_S):
    """(return code, output) of a started run; kills its whole process group after timeout."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"no exit within {timeout} s:\n{output[-6000:]}")
    return process.returncode, output


def run(tmp_path, argv, expect_success=True, **spec):
    code, output = finish(start(tmp_path, argv, **spec))
    if expect_success:
        assert code == 0, output[-6000:]
    return code, output


def final_weights(output_dir):
    path = os.path.join(str(output_dir), "model_final.pth")
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def max_difference(a, b):
    """max |a - b| over all tensors, and max of |a - b| - WEIGHT_RTOL * |b| (<= WEIGHT_ATOL iff
    torch.allclose holds everywhere)."""
    assert a.keys() == b.keys()
    absolute = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    excess = max(
        float(((a[k].double() - b[k].double()).abs() - WEIGHT_RTOL * b[k].double().abs()).max())
        for k in a
    )
    return absolute, excess


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def setup_files(tmp_path_factory):
    """Train (8) and val (4) shapes splits of 64 x 64 images, generated here once (the ranks
    only load them), and the tiny config on them: 4 SGD iterations of 2 images (1 per rank with
    2 processes), checkpoints after iterations 1 and 3."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from solov2_d2.data import register_shapes_dataset
    from solov2_d2.data.shapes import ensure_generated

    root = str(tmp_path_factory.mktemp("shapes"))
    tag = uuid.uuid4().hex[:8]
    sides = {"min_side": SIDE, "max_side": SIDE}
    datasets = [
        dict(name="dist_train_" + tag, root=root, split="train", num_images=8, seed=0, **sides),
        dict(name="dist_val_" + tag, root=root, split="val", num_images=4, seed=1, **sides),
    ]
    for dataset in datasets:
        register_shapes_dataset(**dataset)
        ensure_generated(dataset["name"])
    config = write_tiny_config(
        tmp_path_factory.mktemp("config"),
        num_classes=6,
        MODEL={"SOLOV2": {"SCORE_THR": 0.0, "UPDATE_THR": 0.0}},
        DATASETS={"TRAIN": [datasets[0]["name"]], "TEST": []},
        DATALOADER={"NUM_WORKERS": 0},
        INPUT={
            "MIN_SIZE_TRAIN": [SIDE],
            "MAX_SIZE_TRAIN": SIDE,
            "MIN_SIZE_TEST": SIDE,
            "MAX_SIZE_TEST": SIDE,
        },
        SOLVER={
            "IMS_PER_BATCH": 2,
            "BASE_LR": 0.01,
            "WARMUP_ITERS": 2,
            "STEPS": [],
            "MAX_ITER": 4,
            "CHECKPOINT_PERIOD": 2,
        },
        SEED=0,
    )
    yield {"config": config, "datasets": datasets, "val": datasets[1]["name"]}
    for dataset in datasets:
        DatasetCatalog.remove(dataset["name"])
        MetadataCatalog.remove(dataset["name"])


def train_argv(setup_files, output_dir, processes, *opts):
    return [
        "--config-file",
        setup_files["config"],
        "--num-gpus",
        processes,
        "--dist-url",
        "auto",
        "OUTPUT_DIR",
        output_dir,
        *opts,
    ]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, setup_files):
    output_dir = tmp_path_factory.mktemp("one_process")
    run(output_dir, train_argv(setup_files, output_dir, 1), datasets=setup_files["datasets"])
    return output_dir


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, setup_files):
    output_dir = tmp_path_factory.mktemp("two_processes")
    started = time.perf_counter()
    _, output = run(
        output_dir, train_argv(setup_files, output_dir, 2), datasets=setup_files["datasets"]
    )
    print(f"2-process training: {time.perf_counter() - started:.1f} s")
    return output_dir, output


# -------------------------------------------------------------------------------- tests


def test_resumable_loader_shards_like_training_sampler_per_rank(monkeypatch):
    """Rank r of 2 gets TrainingSampler's rank-r stream (and, grouped, Detectron2's
    AspectRatioGroupedDataset over it); batch j of the two ranks is batch j of one process."""
    import itertools

    from detectron2.data.common import AspectRatioGroupedDataset
    from detectron2.data.samplers import TrainingSampler
    from detectron2.utils import comm

    from solov2_d2.engine import ResumableTrainLoader

    dicts = [{"file_name": f"{i}.png", "width": 40 + 7 * (i % 3), "height": 50} for i in range(11)]

    def names(loader, count):
        return [[d["file_name"] for d in batch] for batch in itertools.islice(loader, count)]

    def loader(world_size, rank, batch, grouping):
        monkeypatch.setattr(comm, "get_world_size", lambda: world_size)
        monkeypatch.setattr(comm, "get_rank", lambda: rank)
        sampler = TrainingSampler(len(dicts), seed=5)
        ours = ResumableTrainLoader(
            dicts,
            dict,
            total_batch_size=batch * world_size,
            seed=5,
            aspect_ratio_grouping=grouping,
        )
        stream = (dicts[i] for i in sampler)
        if grouping:
            expected = AspectRatioGroupedDataset(stream, batch)
        else:
            expected = (list(itertools.islice(stream, batch)) for _ in itertools.count())
        return names(ours, 9), names(expected, 9)

    for grouping in (False, True):
        for rank in (0, 1):
            got, expected = loader(2, rank, 3, grouping)
            assert got == expected, (grouping, rank)
    ranks = [loader(2, rank, 1, False)[0] for rank in (0, 1)]
    single, _ = loader(1, 0, 2, False)
    assert [a + b for a, b in zip(*ranks)] == single


@pytest.mark.slow
def test_two_processes_train_to_the_weights_of_one_process_with_twice_the_batch(
    one_process_run, two_process_run
):
    one, two = final_weights(one_process_run), final_weights(two_process_run[0])
    absolute, excess = max_difference(two, one)
    print(f"max |w_2proc - w_1proc| = {absolute:.3g}")
    assert excess <= WEIGHT_ATOL, absolute


@pytest.mark.slow
def test_per_process_normalization_trains_differently(tmp_path, setup_files, one_process_run):
    """The official per-process normalization (NORM_ACROSS_PROCESSES False): 2 x 1 image is not 1
    x 2 images. Also shows that the tolerance above tells the two apart."""
    output_dir = tmp_path / "per_process"
    argv = train_argv(
        setup_files, output_dir, 2, "MODEL.SOLOV2.LOSS.NORM_ACROSS_PROCESSES", "False"
    )
    run(output_dir, argv, datasets=setup_files["datasets"])
    absolute, excess = max_difference(final_weights(output_dir), final_weights(one_process_run))
    print(f"per-process normalization: max |w_2proc - w_1proc| = {absolute:.3g}")
    assert excess > 10 * WEIGHT_ATOL, absolute


@pytest.mark.slow
def test_killed_two_process_run_resumes_to_the_uninterrupted_weights(
    tmp_path, setup_files, two_process_run
):
    output_dir = tmp_path / "killed"
    argv = train_argv(setup_files, output_dir, 2)
    code, output = run(
        output_dir, argv, expect_success=False, datasets=setup_files["datasets"], die_after=2
    )
    assert code != 0, output[-3000:]
    assert (output_dir / "model_0000001.pth").exists()
    assert not (output_dir / "model_final.pth").exists()

    _, output = run(output_dir, ["--resume"] + argv, datasets=setup_files["datasets"])
    assert "Starting training from iteration 2" in output, output[-3000:]
    expected = final_weights(two_process_run[0])
    got = final_weights(output_dir)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


@pytest.mark.slow
def test_two_process_evaluation_equals_one_process_evaluation(
    tmp_path, setup_files, one_process_run
):
    weights = os.path.join(str(one_process_run), "model_final.pth")
    outcomes = {}
    for processes in (1, 2):
        output_dir = tmp_path / f"eval_{processes}"
        results_file = str(tmp_path / f"results_{processes}.json")
        argv = train_argv(setup_files, output_dir, processes, "MODEL.WEIGHTS", weights)
        argv[2:2] = ["--eval-only"]
        argv += ["DATASETS.TEST", f"['{setup_files['val']}']"]
        run(tmp_path, argv, datasets=setup_files["datasets"], results_file=results_file)
        predictions = output_dir / "inference" / setup_files["val"] / "coco_instances_results.json"
        with open(results_file) as stream:
            results = json.load(stream)
        outcomes[processes] = (results, json.loads(predictions.read_text()))
    (results_1, predictions_1), (results_2, predictions_2) = outcomes[1], outcomes[2]
    assert predictions_1 and {p["image_id"] for p in predictions_1} == {
        p["image_id"] for p in predictions_2
    }
    assert predictions_2 == predictions_1
    assert set(results_1) == {"segm", "bbox"} and results_2.keys() == results_1.keys()
    for task, metrics in results_1.items():
        for metric, value in metrics.items():
            other = results_2[task][metric]
            assert other == value or (math.isnan(other) and math.isnan(value)), (task, metric)


@pytest.mark.slow
def test_nan_loss_on_one_rank_stops_every_rank_naming_rank_iteration_and_term(
    tmp_path, setup_files
):
    """Two "machines" of one process each (--num-machines 2 --machine-rank r): no common parent
    terminates the other rank, each must stop by itself. Rank 1's loss_mask is NaN at
    iteration 1 (its second loss computation)."""
    dist_url = f"tcp://127.0.0.1:{free_port()}"
    started = time.perf_counter()
    processes = []
    for machine in (0, 1):
        output_dir = tmp_path / "nan"
        argv = train_argv(setup_files, output_dir, 1)
        argv[argv.index("auto")] = dist_url
        argv[2:2] = ["--num-machines", "2", "--machine-rank", str(machine)]
        spec = dict(datasets=setup_files["datasets"], nan_rank=1, nan_at_call=2)
        processes.append(start(tmp_path, argv, **spec))
    outcomes = [finish(process, timeout=240) for process in processes]
    elapsed = time.perf_counter() - started
    print(f"both ranks exited {elapsed:.1f} s after the start")
    (code_0, output_0), (code_1, output_1) = outcomes
    assert code_0 != 0 and code_1 != 0
    assert (
        "Non-finite loss at iteration 1 on another process (rank 1: loss_mask); this process "
        "(rank 0) stops too" in output_0
    ), output_0[-4000:]
    assert "Non-finite loss at iteration 1 on rank 1: loss_mask = nan (finite: loss_cate" in (
        output_1
    ), output_1[-4000:]


if __name__ == "__main__":
    _entry(sys.argv[1])
