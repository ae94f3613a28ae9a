"""detectron2 trainer for comformer models: optimizer, schedule, data and evaluators from the config."""
import itertools
import logging
import os
import weakref
from typing import Any, Dict, List

import torch

from detectron2.config import get_cfg
from detectron2.data import build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.projects.deeplab import add_deeplab_config
from detectron2.projects.deeplab import build_lr_scheduler as build_poly_lr_scheduler
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import add_comformer_config
from ..data.mappers import build_train_mapper
from ..evaluation import build_evaluator
from ..utils.io import AtomicDetectionCheckpointer

__all__ = ["Trainer", "build_optimizer", "setup_cfg"]

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
        id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.weight.requires_grad
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


class Trainer(DefaultTrainer):
    """DefaultTrainer with comformer's data mappers, optimizer, poly schedule and evaluators, and
    checkpoints written atomically."""

    def build_hooks(self):
        # DefaultTrainer made its checkpointer just before; the hooks must save through ours.
        self.checkpointer = AtomicDetectionCheckpointer(
            self.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        return super().build_hooks()

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=build_train_mapper(cfg))

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
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda"):
        # autocast on CPU is slow and not what the papers trained with: AMP is a CUDA-only option.
        logger.warning("SOLVER.AMP.ENABLED ignored on MODEL.DEVICE=%s (AMP is CUDA-only)", cfg.MODEL.DEVICE)
        cfg.SOLVER.AMP.ENABLED = False
    cfg.freeze()
    default_setup(cfg, args)
    # detectron2 sets up its own loggers; comformer's messages go to the same console and log file.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="comformer", abbrev_name="cf")
    return cfg
