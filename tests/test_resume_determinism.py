"""A run killed mid-training and resumed with ``--resume`` ends with the very weights of an
uninterrupted run (CPU, same seed): iteration, optimizer and LR-scheduler state come back from the
checkpoint, and the train loader continues with the batches (and augmentations) the interrupted
run would have had next, see solov2_d2/engine/loader.py.
"""

import uuid

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import HookBase

import train_net
from solov2_d2.data import SOLOv2DatasetMapper, register_shapes_dataset
from solov2_d2.engine import ResumableTrainLoader, build_resumable_train_loader

from .conftest import tiny_cfg

MAX_ITER = 6
CHECKPOINT_PERIOD = 2  # checkpoints after iterations 1, 3 and 5
KILL_AFTER = 4  # iteration 4 ran, but its checkpoint would only come after iteration 5


@pytest.fixture(scope="module")
def shapes_train(tmp_path_factory):
    name = "resume_shapes_" + uuid.uuid4().hex[:8]
    root = str(tmp_path_factory.mktemp("shapes"))
    register_shapes_dataset(
        name, root=root, split="train", num_images=8, seed=0, min_side=64, max_side=96
    )
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def make_cfg(dataset, output_dir, seed=7, grouping=False, workers=0):
    cfg = tiny_cfg(num_classes=6)
    cfg.DATASETS.TRAIN = (dataset,)
    cfg.DATASETS.TEST = ()
    cfg.DATALOADER.NUM_WORKERS = workers
    cfg.DATALOADER.ASPECT_RATIO_GROUPING = grouping
    # Random resize among two sizes and random flips: the augmentation RNG matters.
    cfg.INPUT.MIN_SIZE_TRAIN = (64, 80)
    cfg.INPUT.MAX_SIZE_TRAIN = 96
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.MAX_ITER = MAX_ITER
    cfg.SOLVER.CHECKPOINT_PERIOD = CHECKPOINT_PERIOD
    cfg.SOLVER.WARMUP_ITERS = 2
    cfg.SOLVER.STEPS = (4,)  # the LR drops between the checkpoint and the end
    cfg.SEED = seed
    cfg.OUTPUT_DIR = str(output_dir)
    return cfg


class _Killed(Exception):
    pass


class KillAfter(HookBase):
    """Stands for a process killed right after an iteration that no checkpoint covers."""

    def __init__(self, iteration):
        self.iteration = iteration

    def after_step(self):
        if self.trainer.iter == self.iteration:
            raise _Killed(f"killed after iteration {self.iteration}")


def snapshot(trainer):
    momentum = {
        i: state["momentum_buffer"].clone()
        for i, state in enumerate(trainer.optimizer.state.values())
        if state.get("momentum_buffer") is not None
    }
    return {
        "weights": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        "momentum": momentum,
        "lr": [group["lr"] for group in trainer.optimizer.param_groups],
        "scheduler": trainer.scheduler.state_dict()["last_epoch"],
    }


@pytest.mark.slow
def test_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(shapes_train, tmp_path):
    torch.manual_seed(0)
    uninterrupted = train_net.Trainer(make_cfg(shapes_train, tmp_path / "uninterrupted"))
    uninterrupted.resume_or_load(resume=False)
    uninterrupted.train()
    expected = snapshot(uninterrupted)

    output_dir = tmp_path / "killed"
    torch.manual_seed(0)
    killed = train_net.Trainer(make_cfg(shapes_train, output_dir))
    killed.register_hooks([KillAfter(KILL_AFTER)])
    killed.resume_or_load(resume=False)
    with pytest.raises(_Killed):
        killed.train()
    assert (output_dir / "model_0000003.pth").exists()
    assert not (output_dir / "model_0000005.pth").exists()
    checkpoint = torch.load(
        output_dir / "model_0000003.pth", map_location="cpu", weights_only=False
    )
    assert checkpoint["iteration"] == 3
    assert "optimizer" in checkpoint["trainer"]["_trainer"]  # Detectron2 v0.6 leaves it out
    assert checkpoint["trainer"]["train_loader"]["seed"] == 7

    # A fresh process would draw another random init and, with SEED -1, another seed: neither
    # may matter, the checkpoint has the weights and the loader's seed.
    torch.manual_seed(1)
    resumed = train_net.Trainer(make_cfg(shapes_train, output_dir, seed=123))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 4
    assert resumed.data_loader.seed == 7
    resumed.train()
    assert resumed.iter == MAX_ITER
    got = snapshot(resumed)

    assert got["weights"].keys() == expected["weights"].keys()
    for name, value in expected["weights"].items():
        assert torch.equal(got["weights"][name], value), name
    assert got["momentum"].keys() == expected["momentum"].keys() and got["momentum"]
    for index, value in expected["momentum"].items():
        assert torch.equal(got["momentum"][index], value), index
    assert got["lr"] == expected["lr"] and got["scheduler"] == expected["scheduler"]


def _batches(loader, count):
    out = []
    for batch in loader:
        out.append(
            [
                (
                    inputs["file_name"],
                    inputs["image"].clone(),
                    inputs["instances"].gt_masks.tensor.clone(),
                )
                for inputs in batch
            ]
        )
        if len(out) == count:
            return out


def _assert_same(a, b):
    assert len(a) == len(b)
    for batch_a, batch_b in zip(a, b):
        assert [x[0] for x in batch_a] == [x[0] for x in batch_b]
        for (_, image_a, masks_a), (_, image_b, masks_b) in zip(batch_a, batch_b):
            assert torch.equal(image_a, image_b) and torch.equal(masks_a, masks_b)


@pytest.mark.parametrize("grouping", [False, True])
def test_restarted_loader_continues_with_the_same_batches_for_any_worker_count(
    shapes_train, tmp_path, grouping
):
    """Batch j (files, augmented pixels, masks) is the same from a loader started at 0, one
    restarted at 3 from a checkpointed state, with 0 or 2 workers."""
    cfg = make_cfg(shapes_train, tmp_path, grouping=grouping)
    mapper = SOLOv2DatasetMapper(cfg, is_train=True)
    reference_loader = build_resumable_train_loader(cfg, mapper)
    assert isinstance(reference_loader, ResumableTrainLoader)
    reference = _batches(reference_loader, 7)
    # 7 batches of 2 from 8 images: the stream crosses an epoch.
    assert len({x[0] for batch in reference for x in batch}) == 8

    state = reference_loader.state_dict()
    for workers in (0, 2):
        cfg.DATALOADER.NUM_WORKERS = workers
        cfg.SEED = 99  # the seed comes from the checkpointed state
        loader = build_resumable_train_loader(cfg, mapper)
        loader.restart(3, state)
        _assert_same(_batches(loader, 4), reference[3:])
    if not grouping:  # the stream itself is Detectron2's TrainingSampler stream
        from detectron2.data.samplers import TrainingSampler

        indices = iter(TrainingSampler(8, seed=7))
        dicts = DatasetCatalog.get(shapes_train)
        expected = [dicts[next(indices)]["file_name"] for _ in range(14)]
        assert [x[0] for batch in reference for x in batch] == expected
