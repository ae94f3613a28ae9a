"""
The training stream: the infinite, resumable sequence of mapped training samples, and the loader
built on it.

Sample ``p`` of the stream (over all processes) and its augmentation are a function of
``(SEED, p)``, so a run resumed at iteration ``i`` reads the batches the uninterrupted run read
there, and one process with batch ``2B`` reads what two processes with ``B`` each read
(:class:`TrainingStream`). The trainer's hook (``comformer.engine.trainer``) starts the stream at
the resumed iteration and re-seeds the global generators before every iteration.
"""

import contextlib
import itertools
import random
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils import data as torchdata

from detectron2.data.build import build_batch_data_loader
from detectron2.data.common import DatasetFromList
from detectron2.utils import comm

__all__ = [
    "TrainingStream",
    "build_train_loader",
    "find_stream",
    "derived_seed",
    "seed_global_rngs",
]


def derived_seed(*entropy: int) -> int:
    """A 32-bit seed from a tuple of non-negative integers, with no collisions between tuples that
    differ in one entry (unlike ``seed + position``, which makes runs with seeds 0 and 1 overlap).
    """
    return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1)[0])


def seed_global_rngs(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _seeded_cpu_rngs(seed: int):
    """Run a block under CPU generators seeded with ``seed``, restoring their state afterwards:
    detectron2's augmentations draw from the global generators, and the caller's stream of random
    numbers must not depend on how many samples were mapped in its process."""
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


class TrainingStream(torchdata.IterableDataset):
    """
    The infinite stream of mapped training samples of one process.

    Global position ``p`` = 0, 1, 2, ... counts samples over all processes. It holds the record
    ``order(p)``: records are reshuffled each epoch by a generator seeded with ``(seed, epoch)``;
    process ``r`` of ``W`` reads positions ``r, r + W, r + 2W, ...`` (as detectron2's
    TrainingSampler shards). The mapper (augmentation) of position ``p`` runs under generators
    seeded with ``(seed, p)``. So the batch of iteration ``i`` is a function of ``(seed, i)`` alone:
    :meth:`set_start_iter` makes a resumed run start where the uninterrupted one was, without
    replaying the skipped samples.

    DataLoader workers split the stream in chunks of one batch, worker ``w`` of ``N`` taking chunks
    ``w, w + N, ...``; the DataLoader returns the workers' batches round-robin, which is stream order.
    A mapper may return None (a skipped bad sample): the next position of the same worker fills in.
    """

    def __init__(
        self,
        records: Sequence[dict],
        mapper,
        *,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        """
        Args:
            records: the dataset's records (detectron2 dicts).
            mapper: callable record -> model input dict, or None to skip the record.
            batch_size: images per batch of this process.
            seed: non-negative seed of the order and the augmentation (the same on every process).
            shuffle: reshuffle each epoch; False reads the records in order.
            rank, world_size: this process and the number of processes.
        """
        if len(records) == 0:
            raise ValueError("the training dataset is empty")
        if seed < 0:
            raise ValueError(f"TrainingStream needs a seed >= 0, got {seed}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self._records = DatasetFromList(list(records), copy=False)
        self.mapper = mapper
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.start_iter = 0
        self._epoch_order = (-1, None)

    def set_start_iter(self, iteration: int) -> None:
        """Start at the batch of ``iteration`` (before the DataLoader iterator is created)."""
        self.start_iter = int(iteration)

    def position(self, local_index: int) -> int:
        """Global position of the ``local_index``-th sample of this process (0 = iteration 0)."""
        return local_index * self.world_size + self.rank

    def record_index(self, position: int) -> int:
        """Index of the record at global ``position``."""
        epoch, offset = divmod(position, len(self._records))
        if not self.shuffle:
            return offset
        if self._epoch_order[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self._records))
            self._epoch_order = (epoch, order)
        return int(self._epoch_order[1][offset])

    def sample(self, position: int):
        """The mapped sample at global ``position`` (None when the mapper skips it)."""
        record = self._records[self.record_index(position)]
        with _seeded_cpu_rngs(derived_seed(self.seed, position)):
            return self.mapper(record)

    def __iter__(self):
        info = torchdata.get_worker_info()
        num_workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        first = self.start_iter * self.batch_size
        skipped_in_a_row = 0
        for chunk in itertools.count(worker, num_workers):
            for k in range(first + chunk * self.batch_size, first + (chunk + 1) * self.batch_size):
                out = self.sample(self.position(k))
                if out is not None:
                    skipped_in_a_row = 0
                    yield out
                    continue
                skipped_in_a_row += 1
                if skipped_in_a_row >= len(self._records):
                    raise RuntimeError(
                        f"{skipped_in_a_row} training samples in a row were skipped as bad, as "
                        "many as the dataset has: no usable sample is left (see the warnings)"
                    )


def find_stream(loader) -> Optional[TrainingStream]:
    """The TrainingStream under a loader built by :func:`build_train_loader` (a DataLoader, or
    detectron2's aspect-ratio grouping around one)."""
    for _ in range(4):
        if isinstance(loader, TrainingStream):
            return loader
        loader = getattr(loader, "dataset", None)
    return None


def build_train_loader(cfg, records: Sequence[dict], mapper):
    """
    The training loader of this process: a :class:`TrainingStream` batched by detectron2's
    ``build_batch_data_loader`` (SOLVER.IMS_PER_BATCH over all processes, DATALOADER.NUM_WORKERS,
    DATALOADER.ASPECT_RATIO_GROUPING unless DETERMINISTIC).

    The seed is SEED, or when SEED < 0 one drawn at random and shared by the processes (a resumed
    run then reads other samples than the uninterrupted one would have).
    """
    world_size = comm.get_world_size()
    total = cfg.SOLVER.IMS_PER_BATCH
    if total <= 0 or total % world_size:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH={total} must be a positive multiple of the number of processes "
            f"({world_size}): it is the batch of all processes together"
        )
    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        raise ValueError(
            f"DATALOADER.SAMPLER_TRAIN={cfg.DATALOADER.SAMPLER_TRAIN!r}: comformer's resumable "
            "training stream shuffles uniformly; only 'TrainingSampler' is supported"
        )
    if cfg.DATALOADER.PREFETCH_BATCHES < 1:
        raise ValueError(
            f"DATALOADER.PREFETCH_BATCHES={cfg.DATALOADER.PREFETCH_BATCHES} is not valid; "
            "must be >= 1 (batches each loader worker keeps ready)"
        )
    strategy = cfg.DATALOADER.SHARING_STRATEGY
    if strategy:
        valid = sorted(torch.multiprocessing.get_all_sharing_strategies())
        if strategy not in valid:
            raise ValueError(
                f"DATALOADER.SHARING_STRATEGY={strategy!r} is not valid here; valid: {valid} or "
                "'' (torch's default)"
            )
        if cfg.DATALOADER.NUM_WORKERS > 0:
            torch.multiprocessing.set_sharing_strategy(strategy)
    seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed() % 2**31
    stream = TrainingStream(
        records,
        mapper,
        batch_size=total // world_size,
        seed=seed,
        rank=comm.get_rank(),
        world_size=world_size,
    )
    # Grouping batches by aspect ratio makes them depend on where the stream was started.
    grouping = cfg.DATALOADER.ASPECT_RATIO_GROUPING and not cfg.DETERMINISTIC
    loader_kwargs = {}
    if cfg.DATALOADER.NUM_WORKERS > 0:
        # the DataLoader yields single samples when grouping, whole batches otherwise
        per_item = total // world_size if grouping else 1
        loader_kwargs["prefetch_factor"] = cfg.DATALOADER.PREFETCH_BATCHES * per_item
    return build_batch_data_loader(
        stream,
        None,
        total,
        aspect_ratio_grouping=grouping,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        seed=seed,  # the workers' base seed, drawn from the loader's own generator
        **loader_kwargs,
    )
