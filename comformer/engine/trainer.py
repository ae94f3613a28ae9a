"""
detectron2 trainer for comformer models: optimizer, schedule, data and evaluators from the config,
and what a run of days needs to be trusted:

- a training stream in which sample ``p`` and its augmentation are a function of ``(SEED, p)``, so a
  run resumed at iteration ``i`` reads the batches the uninterrupted run read there, and one process
  with batch ``2B`` reads what two processes with ``B`` each read (:class:`TrainingStream`);
- global random generators re-seeded from ``(SEED, rank, iteration)`` before every iteration, for
  the model's own randomness (point sampling, dropout);
- a stop on a non-finite loss before the optimizer step, naming the iteration and the loss terms
  (:class:`NonFiniteLossError`), so the weights in memory and the checkpoints stay good;
- checkpoints written atomically and read with ``torch.load(weights_only=True)``;
- multi-process training on CPU (gloo) as well as on GPUs.
"""

import contextlib
import itertools
import logging
import os
import random
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils import data as torchdata

from detectron2.config import get_cfg
from detectron2.data import get_detection_dataset_dicts
from detectron2.data.build import build_batch_data_loader
from detectron2.data.common import DatasetFromList
from detectron2.engine import AMPTrainer, DefaultTrainer, HookBase, SimpleTrainer, default_setup
from detectron2.engine.train_loop import TrainerBase
from detectron2.projects.deeplab import add_deeplab_config
from detectron2.projects.deeplab import build_lr_scheduler as build_poly_lr_scheduler
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import add_comformer_config
from ..data.mappers import build_train_mapper
from ..evaluation import build_evaluator
from ..utils.io import AtomicDetectionCheckpointer

__all__ = [
    "Trainer",
    "build_optimizer",
    "build_train_loader",
    "setup_cfg",
    "apply_determinism",
    "TrainingStream",
    "NonFiniteLossError",
    "check_finite_losses",
]

logger = logging.getLogger(__name__)

# Parameters that are embeddings or position tables: no weight decay beyond SOLVER.WEIGHT_DECAY_EMBED.
_EMBED_PARAM_NAMES = ("relative_position_bias_table", "absolute_pos_embed", "level_embed")


def _param_groups(cfg, model: torch.nn.Module) -> List[Dict[str, Any]]:
    """detectron2's parameter groups with Mask2Former's overrides: backbone lr multiplier, no weight
    decay on norms (SOLVER.WEIGHT_DECAY_NORM) and embeddings (SOLVER.WEIGHT_DECAY_EMBED)."""
    multiplier = cfg.SOLVER.BACKBONE_MULTIPLIER
    groups = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        lr_factor_func=lambda name: multiplier if name.startswith("backbone.") else 1.0,
        overrides={k: {"weight_decay": cfg.SOLVER.WEIGHT_DECAY_EMBED} for k in _EMBED_PARAM_NAMES},
    )
    # nn.Embedding weights are called "weight" like any other, so name overrides cannot reach them.
    embedding_params = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, torch.nn.Embedding) and m.weight.requires_grad
    }
    result = []
    for group in groups:
        embed = [p for p in group["params"] if id(p) in embedding_params]
        other = [p for p in group["params"] if id(p) not in embedding_params]
        if other:
            result.append({**group, "params": other})
        if embed:
            result.append({**group, "params": embed, "weight_decay": cfg.SOLVER.WEIGHT_DECAY_EMBED})
    return result


def _with_full_model_clipping(optimizer_cls, max_norm: float):
    """An optimizer class whose step first clips the global gradient norm over all its parameters."""

    class FullModelGradientClippingOptimizer(optimizer_cls):
        def step(self, closure=None):
            all_params = itertools.chain(*[g["params"] for g in self.param_groups])
            torch.nn.utils.clip_grad_norm_(all_params, max_norm)
            return super().step(closure=closure)

    return FullModelGradientClippingOptimizer


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW or SGD over ``_param_groups``, with SOLVER.CLIP_GRADIENTS (``full_model`` clips the
    norm of all gradients together; ``value``/``norm`` are detectron2's per-parameter clipping)."""
    optimizer_classes = {"ADAMW": torch.optim.AdamW, "SGD": torch.optim.SGD}
    name = cfg.SOLVER.OPTIMIZER
    if name not in optimizer_classes:
        raise ValueError(f"SOLVER.OPTIMIZER={name!r}; valid: {sorted(optimizer_classes)}")
    optimizer_cls = optimizer_classes[name]
    kwargs = {"momentum": cfg.SOLVER.MOMENTUM} if name == "SGD" else {}
    clip = cfg.SOLVER.CLIP_GRADIENTS
    full_model_clipping = clip.ENABLED and clip.CLIP_TYPE == "full_model"
    if full_model_clipping:
        optimizer_cls = _with_full_model_clipping(optimizer_cls, clip.CLIP_VALUE)
    optimizer = optimizer_cls(_param_groups(cfg, model), cfg.SOLVER.BASE_LR, **kwargs)
    return optimizer if full_model_clipping else maybe_add_gradient_clipping(cfg, optimizer)


# --------------------------------------------------------------------------- training data
def _derived_seed(*entropy: int) -> int:
    """A 32-bit seed from a tuple of non-negative integers, with no collisions between tuples that
    differ in one entry (unlike ``seed + position``, which makes runs with seeds 0 and 1 overlap).
    """
    return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1)[0])


def _seed_global_rngs(seed: int) -> None:
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
        with _seeded_cpu_rngs(_derived_seed(self.seed, position)):
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


def _find_stream(loader) -> Optional[TrainingStream]:
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


class TrainingStreamHook(HookBase):
    """
    Starts the training stream at the trainer's start iteration (after a resume), seeds the global
    generators from ``(seed, rank, iteration)`` before each iteration, and reports the bad samples
    the mapper skipped (INPUT.SKIP_BAD_SAMPLES): a warning per sample, the running total as the
    ``data/bad_samples_skipped`` metric, kept in checkpoints across resumes.
    """

    def __init__(self, stream: Optional[TrainingStream], seed: Optional[int]):
        """
        Args:
            stream: the trainer's stream (None: a loader of another kind; only seeding is done).
            seed: seed of the per-iteration generators; None: not re-seeded.
        """
        self._stream = stream
        self._seed = seed
        self._skipped_before = 0  # skipped in the runs this one resumes

    def before_train(self):
        if self._stream is not None:
            self._stream.set_start_iter(self.trainer.start_iter)

    def before_step(self):
        if self._seed is not None:
            _seed_global_rngs(_derived_seed(self._seed, comm.get_rank(), self.trainer.iter))

    @property
    def num_skipped(self) -> int:
        mapper = getattr(self._stream, "mapper", None)
        return self._skipped_before + int(getattr(mapper, "num_skipped", 0))

    def after_step(self):
        if getattr(getattr(self._stream, "mapper", None), "skip_bad_samples", False):
            self.trainer.storage.put_scalar(
                "data/bad_samples_skipped", self.num_skipped, smoothing_hint=False
            )

    def after_train(self):
        if self.num_skipped:
            logger.warning(
                f"{self.num_skipped} bad training sample(s) were skipped (INPUT.SKIP_BAD_SAMPLES); "
                "the warnings above name them"
            )

    def state_dict(self):
        return {"bad_samples_skipped": self.num_skipped}

    def load_state_dict(self, state_dict):
        self._skipped_before = int(state_dict.get("bad_samples_skipped", 0))


# ------------------------------------------------------------------------- numerical faults
class NonFiniteLossError(FloatingPointError):
    """A loss was NaN or infinite; raised before the backward pass, so no weight has changed."""

    def __init__(self, message: str, iteration: int, terms: Dict[str, float]):
        super().__init__(message)
        self.iteration = iteration
        self.terms = terms


def check_finite_losses(
    loss_dict: Dict[str, torch.Tensor],
    iteration: int,
    last_checkpoint: Union[str, Callable[[], str]] = "",
) -> None:
    """
    Raise :class:`NonFiniteLossError` unless every loss is finite, on every process.

    One ``isfinite`` over the summed losses per iteration (and one all-reduce of a flag when
    distributed, so that all processes stop together instead of waiting on each other); the terms
    are examined only on failure.

    Args:
        loss_dict: the model's losses of this iteration.
        iteration: the iteration, named in the error.
        last_checkpoint: the last checkpoint written, named in the error ("" for none), or a
            function returning it (called on failure only).
    """
    if not loss_dict:
        return
    total = torch.stack([v.detach().float().sum() for v in loss_dict.values()]).sum()
    finite = torch.isfinite(total).float()
    if comm.get_world_size() > 1:
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    if bool(finite > 0):
        return
    terms = {k: float(v.detach().float().sum()) for k, v in loss_dict.items()}
    bad = {k: v for k, v in terms.items() if not np.isfinite(v)}
    if bad:
        what = "loss term(s) " + ", ".join(f"{k}={v}" for k, v in bad.items())
    elif np.isfinite(float(total)):
        what = f"a loss on another process (rank {comm.get_rank()} had finite losses)"
    else:
        what = f"the sum of the loss terms (each finite, sum {float(total)}: overflow)"
    if callable(last_checkpoint):
        last_checkpoint = last_checkpoint()
    resume = (
        f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint yet"
    )
    raise NonFiniteLossError(
        f"non-finite loss at iteration {iteration}: {what}. Training stopped before the update, so "
        f"the weights are those after iteration {iteration - 1}; {resume}. Lower SOLVER.BASE_LR, "
        "enable SOLVER.CLIP_GRADIENTS, or check this iteration's data; then train again with "
        "--resume.",
        iteration,
        bad,
    )


class _FiniteLossCheck:
    """Forward hook of the trained model: checks the training losses as soon as they exist."""

    def __init__(self, trainer: "Trainer"):
        self._trainer = weakref.proxy(trainer)

    def __call__(self, module, inputs, output):
        if module.training and isinstance(output, dict):
            check_finite_losses(
                output, self._trainer.iter, self._trainer.checkpointer.get_checkpoint_file
            )


# ---------------------------------------------------------------------------------- trainer
def apply_determinism(cfg) -> None:
    """With DETERMINISTIC: deterministic torch kernels (a warning, not an error, for the few with
    none, e.g. grid_sample's CUDA backward), cuDNN without benchmark, and the cuBLAS workspace
    setting that deterministic CUDA matmuls require."""
    if not cfg.DETERMINISTIC:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def _wrap_distributed(model: torch.nn.Module) -> torch.nn.Module:
    """DistributedDataParallel over processes (detectron2's ``create_ddp_model`` gives a CPU model
    ``device_ids``, which DDP refuses; gloo training on CPU passes none)."""
    if comm.get_world_size() == 1:
        return model
    on_gpu = next(model.parameters()).is_cuda
    return DistributedDataParallel(
        model, device_ids=[comm.get_local_rank()] if on_gpu else None, broadcast_buffers=False
    )


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


class Trainer(DefaultTrainer):
    """
    DefaultTrainer with comformer's data mappers, optimizer, poly schedule and evaluators; the
    resumable training stream; a stop on non-finite losses; checkpoints written atomically and
    read with ``weights_only=True``; multi-process training on CPU as well as GPU.
    """

    def __init__(self, cfg):
        # DefaultTrainer.__init__, except for the DDP wrapper (CPU support), the checkpointer and
        # the loss check.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        apply_determinism(cfg)

        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        self._stream = _find_stream(data_loader)
        model = _wrap_distributed(model)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicDetectionCheckpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        _unwrap(model).register_forward_hook(_FiniteLossCheck(self))
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        seed = self._stream.seed if self._stream is not None else None
        self._stream_hook = TrainingStreamHook(self._stream, seed if self.cfg.SEED >= 0 else None)
        return [self._stream_hook] + super().build_hooks()

    @property
    def num_bad_samples(self) -> int:
        """Training samples skipped as bad (INPUT.SKIP_BAD_SAMPLES), resumed runs included."""
        return self._stream_hook.num_skipped

    @classmethod
    def build_train_loader(cls, cfg):
        records = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        )
        return build_train_loader(cfg, records, build_train_mapper(cfg))

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_poly_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_evaluator(cfg, dataset_name, output_folder)


def setup_cfg(args):
    """Config from ``args.config_file`` and ``args.opts`` on top of detectron2's, DeepLab's (poly
    schedule) and comformer's defaults; frozen, with detectron2's default_setup (logging, seed)."""
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_comformer_config(cfg)
    # detectron2 reads yaml with unsafe_load by default, running any !!python tag in the file;
    # comformer's configs need none, so a config is read like untrusted data.
    cfg.merge_from_file(args.config_file, allow_unsafe=False)
    cfg.merge_from_list(args.opts)
    if cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda"):
        # autocast on CPU is slow and not what the papers trained with: AMP is a CUDA-only option.
        logger.warning(
            "SOLVER.AMP.ENABLED ignored on MODEL.DEVICE=%s (AMP is CUDA-only)", cfg.MODEL.DEVICE
        )
        cfg.SOLVER.AMP.ENABLED = False
    cfg.freeze()
    default_setup(cfg, args)
    # detectron2 sets up its own loggers; comformer's messages go to the same console and log file.
    setup_logger(
        cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="comformer", abbrev_name="cf"
    )
    return cfg
