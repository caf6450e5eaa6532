"""A training loader that a resumed run continues exactly where its checkpoint left off.

Detectron2's ``TrainingSampler`` restarts its index stream when a run resumes, so the resumed run
sees other batches than the run it continues; and the augmentations draw from numpy's global RNG
of whichever process maps the image, whose state no checkpoint holds. Here batch ``j`` of a run is
a pure function of (seed, j) and the dataset, batch size, grouping and rank:

* the index stream is the one of Detectron2's ``TrainingSampler`` (a ``torch.randperm`` per epoch
  from a generator seeded with ``seed``); rank ``r`` of ``W`` takes every ``W``-th index from ``r``;
* without aspect-ratio grouping, batch ``j`` is positions ``[j * b, (j + 1) * b)`` of the rank's
  stream (``b`` images per rank). With grouping, the stream is split into a landscape and a
  portrait bucket from the dataset dicts' width/height (Detectron2's rule), and a batch is emitted
  whenever a bucket is full; a resumed run replays this bookkeeping from the start (indices only,
  no image is read);
* each image's augmentations draw from numpy's, Python's and torch's (CPU) global RNGs seeded from
  (seed, the image's position in the stream), restored afterwards: an image at a given position is
  augmented the same way in every run, process and worker;
* with ``N`` workers, worker ``w`` maps the batches ``j = start + w (mod N)``. PyTorch's DataLoader
  hands out its workers' outputs round-robin, so batches arrive in order whatever ``N`` is.

So resuming at iteration ``k`` means starting at batch ``k``, and a resumed run gets the very
batches of an uninterrupted one, for any number of workers, with or without grouping. The seed is
saved in checkpoints (see ``SOLOv2TrainerMixin``), so runs with a random seed (``SEED -1``)
resume exactly too. Only ``DATALOADER.SAMPLER_TRAIN "TrainingSampler"`` is supported this way;
``build_resumable_train_loader`` falls back to Detectron2's loader for the other samplers.
"""

import contextlib
import itertools
import logging
import random
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import DatasetFromList
from detectron2.utils import comm
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

__all__ = ["ResumableTrainLoader", "build_resumable_train_loader"]

logger = logging.getLogger(__name__)


def _index_stream(size: int, seed: int, shuffle: bool) -> Iterator[int]:
    """The infinite index stream of Detectron2's TrainingSampler for the same seed."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    while True:
        if shuffle:
            yield from torch.randperm(size, generator=generator).tolist()
        else:
            yield from range(size)


def _sample_seed(seed: int, position: int) -> int:
    return int(np.random.SeedSequence([seed, position]).generate_state(1)[0])


@contextlib.contextmanager
def _seeded_global_rngs(seed: int):
    """numpy's, Python's and torch's CPU global RNGs seeded with ``seed``, then restored."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    torch_state = torch.get_rng_state()
    np.random.seed(seed)
    random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
        torch.set_rng_state(torch_state)


def _keep_batch(batch):
    """collate_fn of the DataLoader: a batch is already a list of mapped dicts."""
    return batch


class _BatchStream(IterableDataset):
    """Mapped batches from batch ``start`` on; in a DataLoader worker, only that worker's share."""

    def __init__(self, dataset, mapper, plan, start: int):
        self._dataset = dataset
        self._mapper = mapper
        self._plan = plan
        self._start = start

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for batch, samples in self._plan.batches(self._start):
            if (batch - self._start) % num_workers == worker:
                yield [self._map(position, index) for position, index in samples]

    def _map(self, position: int, index: int):
        with _seeded_global_rngs(_sample_seed(self._plan.seed, position)):
            mapped = self._mapper(self._dataset[index])
        if mapped is None:
            raise RuntimeError(
                f"The dataset mapper returned None for dataset index {index}: the resumable train "
                "loader does not resample; make the mapper raise or return a sample"
            )
        return mapped


class _BatchPlan:
    """Which dataset indices (and stream positions) make up each batch of one rank."""

    def __init__(self, size, seed, shuffle, batch_size, rank, world_size, landscape):
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.landscape = landscape  # None: no grouping; else a bool per dataset index

    def _positions(self, first: int) -> Iterator[Tuple[int, int]]:
        """(global position, index) of this rank's stream from its ``first``-th element on."""
        start = self.rank + first * self.world_size
        stream = enumerate(_index_stream(self.size, self.seed, self.shuffle))
        return itertools.islice(stream, start, None, self.world_size)

    def batches(self, start: int) -> Iterator[Tuple[int, List[Tuple[int, int]]]]:
        """(batch number, [(position, index), ...]) from batch ``start`` on."""
        size = self.batch_size
        if self.landscape is None:
            positions = self._positions(start * size)
            for batch in itertools.count(start):
                yield batch, list(itertools.islice(positions, size))
            return
        buckets: Tuple[list, list] = ([], [])
        batch = 0
        for position, index in self._positions(0):
            bucket = buckets[0 if self.landscape[index] else 1]
            bucket.append((position, index))
            if len(bucket) == size:
                if batch >= start:
                    yield batch, list(bucket)
                bucket.clear()
                batch += 1


class ResumableTrainLoader:
    """Iterable of training batches (lists of mapped dataset dicts) that can restart at any batch
    with the very batches an uninterrupted run would get there (see the module docstring).

    Args:
        dataset: list of dataset dicts.
        mapper: callable mapping one dataset dict to a model input.
        total_batch_size: images per iteration over all processes (SOLVER.IMS_PER_BATCH).
        seed: seed of the index stream and of the augmentations; None draws one shared by all
            processes (it is saved in checkpoints through ``state_dict``).
        shuffle: shuffle the index stream every epoch.
        aspect_ratio_grouping: batch landscape and portrait images separately (Detectron2's
            DATALOADER.ASPECT_RATIO_GROUPING); needs "width"/"height" in every dataset dict.
        num_workers: DataLoader worker processes (0: map in the main process).
    """

    def __init__(
        self,
        dataset: Sequence[Dict],
        mapper,
        *,
        total_batch_size: int,
        seed: Optional[int] = None,
        shuffle: bool = True,
        aspect_ratio_grouping: bool = False,
        num_workers: int = 0,
    ):
        world_size, rank = comm.get_world_size(), comm.get_rank()
        if total_batch_size <= 0 or total_batch_size % world_size:
            raise ValueError(
                f"SOLVER.IMS_PER_BATCH ({total_batch_size}) must be a positive multiple of the "
                f"number of processes ({world_size})"
            )
        if len(dataset) == 0:
            raise ValueError("The training dataset is empty")
        landscape = None
        if aspect_ratio_grouping:
            if all("width" in d and "height" in d for d in dataset):
                landscape = np.array([d["width"] > d["height"] for d in dataset], dtype=bool)
            else:
                logger.warning(
                    "DATALOADER.ASPECT_RATIO_GROUPING is on but some dataset dicts lack "
                    "width/height: batches are not grouped by aspect ratio"
                )
        self._dataset = DatasetFromList(list(dataset), copy=False)
        self._mapper = mapper
        self._num_workers = int(num_workers)
        self._plan = _BatchPlan(
            size=len(dataset),
            seed=int(seed) if seed is not None else comm.shared_random_seed(),
            shuffle=shuffle,
            batch_size=total_batch_size // world_size,
            rank=rank,
            world_size=world_size,
            landscape=landscape,
        )
        self._total_batch_size = total_batch_size
        self.start_batch = 0

    @property
    def seed(self) -> int:
        return self._plan.seed

    def __iter__(self):
        stream = _BatchStream(self._dataset, self._mapper, self._plan, self.start_batch)
        if self._num_workers == 0:
            return iter(stream)
        return iter(
            DataLoader(
                stream, batch_size=None, num_workers=self._num_workers, collate_fn=_keep_batch
            )
        )

    def state_dict(self) -> Dict:
        return {
            "seed": self._plan.seed,
            "total_batch_size": self._total_batch_size,
            "world_size": self._plan.world_size,
            "aspect_ratio_grouping": self._plan.landscape is not None,
            "dataset_size": self._plan.size,
        }

    def restart(self, start_batch: int, state: Optional[Dict] = None) -> None:
        """Makes the next ``iter()`` start at batch ``start_batch`` (the resumed iteration), with
        the seed of ``state`` (a ``state_dict`` from the checkpoint) when given."""
        self.start_batch = int(start_batch)
        if state is None:
            if start_batch > 0:
                logger.warning(
                    "Resuming at iteration %d from a checkpoint without train loader state: the "
                    "batches match the interrupted run only if it used the same SEED (>= 0)",
                    start_batch,
                )
            return
        self._plan.seed = int(state["seed"])
        changed = [
            key for key, value in self.state_dict().items() if state.get(key, value) != value
        ]
        if changed:
            logger.warning(
                "Resuming with other %s than the checkpointed run: the resumed run sees other "
                "batches than an uninterrupted one would",
                ", ".join(changed),
            )


def build_resumable_train_loader(cfg, mapper):
    """The training loader of ``cfg`` over checked dataset dicts (``solov2_d2.data.checks``):
    a ``ResumableTrainLoader`` for DATALOADER.SAMPLER_TRAIN "TrainingSampler", else Detectron2's
    loader (whose resumed runs see other batches)."""
    from detectron2.data import build_detection_train_loader

    from ..data.checks import get_dataset_dicts

    dicts = get_dataset_dicts(
        cfg.DATASETS.TRAIN,
        training=True,
        num_classes=cfg.MODEL.SOLOV2.NUM_CLASSES,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
    )
    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        logger.warning(
            "DATALOADER.SAMPLER_TRAIN %s: using Detectron2's train loader, whose index stream "
            "restarts when a run resumes (resumed runs see other batches)",
            cfg.DATALOADER.SAMPLER_TRAIN,
        )
        return build_detection_train_loader(cfg, mapper=mapper, dataset=dicts)
    return ResumableTrainLoader(
        dicts,
        mapper,
        total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        seed=cfg.SEED if cfg.SEED >= 0 else None,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
