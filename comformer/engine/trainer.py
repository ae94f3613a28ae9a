"""
detectron2 trainer for comformer models: optimizer, schedule, data and evaluators from the config,
and what a run of days needs to be trusted:

- the resumable training stream of ``comformer.data.stream``, started at the resumed iteration;
- global random generators re-seeded from ``(SEED, rank, iteration)`` before every iteration, for
  the model's own randomness (point sampling, dropout);
- a stop on a non-finite loss before the optimizer step, naming the iteration and the loss terms
  (:class:`NonFiniteLossError`), so the weights in memory and the checkpoints stay good;
- checkpoints written atomically and read with ``torch.load(weights_only=True)``;
- multi-process training on CPU (gloo) as well as on GPUs.
"""

import itertools
import logging
import os
import weakref
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from detectron2.config import get_cfg
from detectron2.data import get_detection_dataset_dicts
from detectron2.engine import AMPTrainer, DefaultTrainer, HookBase, SimpleTrainer
from detectron2.engine.train_loop import TrainerBase
from detectron2.projects.deeplab import add_deeplab_config
from detectron2.projects.deeplab import build_lr_scheduler as build_poly_lr_scheduler
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import add_comformer_config
from ..data.datasets.register_custom import register_custom_from_config
from ..data.mappers import build_train_mapper
from ..data.stream import (
    TrainingStream,
    build_train_loader,
    derived_seed,
    find_stream,
    seed_global_rngs,
)
from ..evaluation import build_evaluator
from ..utils.io import AtomicDetectionCheckpointer
from .console import install_console_filter, quiet_default_setup
from .progress import ProgressHook

__all__ = [
    "Trainer",
    "build_optimizer",
    "setup_cfg",
    "load_config",
    "apply_determinism",
    "NonFiniteLossError",
    "check_finite_losses",
]

logger = logging.getLogger(__name__)

# Swin's position tables: no weight decay, as Mask2Former's trainer (the pixel decoder's level_embed,
# an nn.Parameter, gets SOLVER.WEIGHT_DECAY there too).
_NO_DECAY_PARAM_NAMES = ("relative_position_bias_table", "absolute_pos_embed")


def _param_groups(cfg, model: torch.nn.Module) -> List[Dict[str, Any]]:
    """detectron2's parameter groups with Mask2Former's overrides: backbone lr multiplier, weight decay
    SOLVER.WEIGHT_DECAY_NORM on norms and SOLVER.WEIGHT_DECAY_EMBED on nn.Embedding weights, none on
    Swin's position tables."""
    multiplier = cfg.SOLVER.BACKBONE_MULTIPLIER
    groups = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        lr_factor_func=lambda name: multiplier if name.startswith("backbone.") else 1.0,
        overrides={k: {"weight_decay": 0.0} for k in _NO_DECAY_PARAM_NAMES},
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
            seed_global_rngs(derived_seed(self._seed, comm.get_rank(), self.trainer.iter))

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
        self._stream = find_stream(data_loader)
        model = _wrap_distributed(model)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicDetectionCheckpointer(
            self.checkpointed_module(model), cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        _unwrap(model).register_forward_hook(_FiniteLossCheck(self))
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        seed = self._stream.seed if self._stream is not None else None
        self._stream_hook = TrainingStreamHook(self._stream, seed if self.cfg.SEED >= 0 else None)
        return [self._stream_hook] + super().build_hooks() + [self.build_progress_hook()]

    def build_progress_hook(self) -> ProgressHook:
        """The hook logging the run's progress for the console (``engine/progress.py``)."""
        return ProgressHook(self.max_iter)

    @classmethod
    def checkpointed_module(cls, model: torch.nn.Module) -> torch.nn.Module:
        """The module whose state dict the checkpoints hold: the model itself."""
        return _unwrap(model)

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


def load_config(config_file: str, opts=()):
    """
    A config from ``config_file`` and ``opts`` (KEY VALUE pairs) on top of detectron2's,
    DeepLab's (poly schedule) and comformer's defaults; not frozen, no logging set up. The
    datasets of ``DATASETS.CUSTOM`` are registered.
    """
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_comformer_config(cfg)
    # detectron2 reads yaml with unsafe_load by default, running any !!python tag in the file;
    # comformer's configs need none, so a config is read like untrusted data.
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file {config_file!r} does not exist")
    cfg.merge_from_file(config_file, allow_unsafe=False)
    try:
        cfg.merge_from_list(list(opts))
    except AssertionError as e:  # yacs asserts on command-line keys; a yaml key raises KeyError
        raise (KeyError if "Non-existent" in str(e) else ValueError)(
            f"{e} (in the command-line options)"
        ) from None
    # before anything reads the catalogs (scenario, model size, data loaders)
    register_custom_from_config(cfg)
    return cfg


def setup_cfg(args):
    """:func:`load_config` of ``args.config_file`` and ``args.opts``, frozen, with detectron2's
    default_setup (logging, seed); ``args.quiet`` (if present) keeps the console to what a user
    reads (see ``comformer.engine.console``)."""
    cfg = load_config(args.config_file, args.opts)
    if cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda"):
        # autocast on CPU is slow and not what the papers trained with: AMP is a CUDA-only option.
        logger.warning(
            "SOLVER.AMP.ENABLED ignored on MODEL.DEVICE=%s (AMP is CUDA-only)", cfg.MODEL.DEVICE
        )
        cfg.SOLVER.AMP.ENABLED = False
    cfg.freeze()
    quiet = bool(getattr(args, "quiet", False))
    quiet_default_setup(cfg, args, quiet)
    # detectron2 sets up its own loggers; comformer's messages go to the same console and log file.
    setup_logger(
        cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="comformer", abbrev_name="cf"
    )
    install_console_filter(quiet)
    return cfg
