"""ECLIPSE (Kim, Yu, Hwang, CVPR 2024): continual panoptic segmentation by visual prompt tuning.

The base step trains a Mask2Former whose classifier scores each class with a sigmoid (a sigmoid
focal loss over the K+1 logits, no-object included) and, by default, is a 3-layer MLP per step.
At every later step t the whole model trained before is frozen; the step adds

* P prompt queries: their features (``prompt_feat``) and positional embeddings (``prompt_embed``,
  one per decoder layer with deep prompts, one for all layers with shallow ones), which go through
  the frozen decoder layers like the base queries;
* a mask-embedding MLP for them (``prompt_mask_embed``, ``CONT.ECLIPSE.PROMPT_MASK_MLP``);
* the classifier of its classes: their rows of ``class_embed`` (and, with ``DEEP_CLS``, the
  hidden layers ``class_hidden``).

Query groups (group 0 the base queries, group s the prompts of step s) never see each other: each
group runs through the decoder on its own, so a step's training cannot change what the earlier
groups predict. In training only the step's group runs; in inference all groups run and their
predictions are concatenated (Q + t P queries). Each group answers for its own step's classes:
the other steps' class logits are set to -10, and the logit manipulation sets the group's
no-object logit to ``logit(delta * min(1, sum of the sigmoids of the other steps' classes))``
(delta > 0: a query that looks like another step's class is suppressed) or to
``logit(|delta| * sigmoid(no-object))`` (delta < 0), probabilities clamped to [0.001, 0.999]
(``clovaai/ECLIPSE`` ``mask2former/modeling/transformer_decoder/mask2former_transformer_decoder.py``
``forward_prediction_heads``). ``CONT.ECLIPSE.LOGIT_MANIPULATION False`` leaves no-object alone.

Shapes: B images, Q base queries, P prompts per step, C hidden channels, K classes seen so far.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.data import MetadataCatalog

from ..data.scenario import build_scenario
from ..modeling.transformer_decoder.mask2former_transformer_decoder import (
    MLP,
    TRANSFORMER_DECODER_REGISTRY,
    MultiScaleMaskedTransformerDecoder,
)
from .defaults import setting_default, setting_value
from .classifier import class_embed
from .method import METHOD_REGISTRY, ContinualMethod

__all__ = [
    "ECLIPSE",
    "EclipseTransformerDecoder",
    "EclipseSettings",
    "SigmoidFocalLoss",
    "eclipse_settings",
    "manipulate_logits",
]

DECODER_NAME = "EclipseTransformerDecoder"
# Logit given to the other steps' classes of a query group: sigmoid(-10) ~ 4.5e-5, as the code.
OFF_LOGIT = -10.0
# clovaai/ECLIPSE's sigmoid_to_logit clamps probabilities to this range.
PROB_CLAMP = (0.001, 0.999)
# How a step's prompts and class rows start (CONT.ECLIPSE.INIT): "distinct" prompts and rows, or
# the identical copies of clovaai/ECLIPSE's code (EclipseTransformerDecoder.init_group,
# ECLIPSE.init_new_classes).
INITS = ("distinct", "eclipse-code")


@dataclass(frozen=True)
class EclipseSettings:
    """ECLIPSE's hyper-parameters for a config, per-setting defaults resolved."""

    step_classes: Tuple[int, ...]  # classes of each step up to the config's model
    num_prompts: int
    deep_prompts: bool
    prompt_mask_mlp: bool
    deep_cls: bool
    train_no_object: bool
    logit_manipulation: bool
    deltas: Tuple[float, ...]  # one per query group
    init: str  # how a step's prompts and classes start (INITS)
    inc_class_weight: float
    inc_max_iter: int  # < 0: the engine's
    inc_base_lr: float  # < 0: the engine's


def _full_scenario(cfg):
    """The config's scenario, from a step config too (whose NUM_CLASSES is the step's)."""
    dataset = cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else None
    classes = MetadataCatalog.get(dataset).get("stuff_classes", None) if dataset else None
    full = cfg.clone()
    full.defrost()
    if classes is not None:
        full.MODEL.SEM_SEG_HEAD.NUM_CLASSES = len(classes)
    return build_scenario(full)


def eclipse_settings(cfg, num_classes: Optional[int] = None) -> EclipseSettings:
    """
    Args:
        cfg: a continual config (a scenario's or a step's).
        num_classes: classes of the model (default MODEL.SEM_SEG_HEAD.NUM_CLASSES): it tells how
            many steps the model has seen.
    """
    scenario = _full_scenario(cfg)
    if scenario is None:
        raise ValueError(
            f"{DECODER_NAME} (CONT.METHOD eclipse) needs a continual config: CONT.TASK or "
            "CONT.STEP_CLASSES"
        )
    if num_classes is None:
        num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    seen = [scenario.num_seen(t) for t in range(scenario.num_steps)]
    if num_classes not in seen:
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.NUM_CLASSES={num_classes} is not the classes seen after any step "
            f"of {scenario.task!r} ({seen})"
        )
    steps = seen.index(num_classes) + 1
    e = cfg.CONT.ECLIPSE
    dataset, task = scenario.dataset, scenario.task
    num_prompts = int(setting_default("CONT.ECLIPSE.NUM_PROMPTS", e.NUM_PROMPTS, dataset, task))
    if num_prompts < 1:
        raise ValueError(f"CONT.ECLIPSE.NUM_PROMPTS={num_prompts} must be >= 1 (or -1: by setting)")
    if e.LOGIT_DELTAS:
        deltas = [float(d) for d in e.LOGIT_DELTAS]
    else:
        base = setting_value("CONT.ECLIPSE.LOGIT_DELTAS[0]", dataset, task)
        deltas = [base, setting_value("CONT.ECLIPSE.LOGIT_DELTAS[1:]", dataset, task)]
    bad = [d for d in deltas if not -1 <= d <= 1]
    if bad:
        raise ValueError(
            f"CONT.ECLIPSE.LOGIT_DELTAS={list(e.LOGIT_DELTAS)}: values must be in [-1, 1]"
        )
    if e.INIT not in INITS:
        raise ValueError(f"CONT.ECLIPSE.INIT={e.INIT!r}; valid: {list(INITS)}")
    # One per group; a shorter list repeats its last value (as the code does).
    deltas = (deltas + [deltas[-1]] * steps)[:steps]
    return EclipseSettings(
        step_classes=tuple(len(s) for s in scenario.steps[:steps]),
        num_prompts=num_prompts,
        deep_prompts=bool(e.DEEP_PROMPTS),
        prompt_mask_mlp=bool(e.PROMPT_MASK_MLP),
        deep_cls=bool(e.DEEP_CLS),
        train_no_object=bool(e.TRAIN_NO_OBJECT),
        logit_manipulation=bool(e.LOGIT_MANIPULATION),
        deltas=tuple(deltas),
        init=str(e.INIT),
        inc_class_weight=setting_default(
            "CONT.ECLIPSE.INC_CLASS_WEIGHT", e.INC_CLASS_WEIGHT, dataset, task
        ),
        inc_max_iter=int(
            setting_default("CONT.ECLIPSE.INC_MAX_ITER", e.INC_MAX_ITER, dataset, task)
        ),
        inc_base_lr=setting_default("CONT.ECLIPSE.INC_BASE_LR", e.INC_BASE_LR, dataset, task),
    )


def _logit(p: Tensor) -> Tensor:
    p = p.clamp(*PROB_CLAMP)
    return torch.log(p / (1 - p))


def manipulate_logits(
    logits: Tensor,
    query_groups: Sequence[int],
    class_groups: Sequence[int],
    deltas: Sequence[float],
    manipulate: bool = True,
) -> Tensor:
    """
    ECLIPSE's inference-time logits: each query group keeps its own step's class logits, the
    other steps' become -10, and its no-object logit is manipulated by its delta (module
    docstring).

    Args:
        logits: (B, sum(query_groups), sum(class_groups) + 1) class logits, no-object last.
        query_groups: queries of each group, in order (group s answers for step s's classes).
        class_groups: classes of each step, in order.
        deltas: one per group.
        manipulate: False: the no-object logits are left as they are.

    Returns:
        a new tensor of the same shape.
    """
    if not len(query_groups) == len(class_groups) == len(deltas):
        raise ValueError(
            f"{len(query_groups)} query groups, {len(class_groups)} class groups, "
            f"{len(deltas)} deltas: one each per step"
        )
    num_classes = sum(class_groups)
    if logits.shape[1] != sum(query_groups) or logits.shape[2] != num_classes + 1:
        raise ValueError(f"logits {tuple(logits.shape)} for groups {query_groups} x {class_groups}")
    out = logits.clone()
    q0 = c0 = 0
    for nq, nc, delta in zip(query_groups, class_groups, deltas):
        own = torch.zeros(num_classes, dtype=torch.bool, device=logits.device)
        own[c0 : c0 + nc] = True
        group = logits[:, q0 : q0 + nq]
        other = group[..., :-1][..., ~own]
        if manipulate and delta > 0:
            evidence = other.sigmoid().sum(-1).clamp(0.0, 1.0)
            out[:, q0 : q0 + nq, -1] = _logit(evidence * delta)
        elif manipulate and delta < 0:
            out[:, q0 : q0 + nq, -1] = _logit(group[..., -1].sigmoid() * -delta)
        cls = out[:, q0 : q0 + nq, :-1]
        cls[..., ~own] = OFF_LOGIT
        out[:, q0 : q0 + nq, :-1] = cls
        q0, c0 = q0 + nq, c0 + nc
    return out


def _hidden_mlp(dim: int) -> nn.Sequential:
    """The two hidden layers of a 3-layer MLP classifier (its last layer is rows of
    ``class_embed``)."""
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU())


@TRANSFORMER_DECODER_REGISTRY.register()
class EclipseTransformerDecoder(MultiScaleMaskedTransformerDecoder):
    """
    Mask2Former's decoder with ECLIPSE's prompt groups (module docstring). The base queries and
    their heads keep Mask2Former's names; group s > 0 is ``prompt_feat[s-1]``,
    ``prompt_embed[s-1]`` and ``prompt_mask_embed[s-1]``; ``class_hidden[s]`` are step s's hidden
    classifier layers (``DEEP_CLS``), ``no_object_hidden`` no-object's. ``class_embed`` keeps the
    library's layout (K+1 rows [step 0, step 1, ..., no-object]), so the classifier grows as any
    other.
    """

    @configurable
    def __init__(
        self,
        in_channels: int,
        mask_classification: bool = True,
        *,
        step_classes: Sequence[int],
        num_prompts: int,
        deep_prompts: bool = True,
        prompt_mask_mlp: bool = True,
        deep_cls: bool = True,
        deltas: Sequence[float] = (),
        logit_manipulation: bool = True,
        **kwargs,
    ):
        """
        Args:
            step_classes: classes of each step the model has seen (their sum is ``num_classes``).
            num_prompts: P, prompts of each step after the base one.
            deep_prompts: one positional embedding per layer (False: one for all layers).
            prompt_mask_mlp: each prompt group has its own mask-embedding MLP.
            deep_cls: per-step 3-layer MLP classifiers (False: linear).
            deltas: logit-manipulation deltas, one per group.
            logit_manipulation: manipulate no-object at inference (see :func:`manipulate_logits`).
            kwargs: :class:`MultiScaleMaskedTransformerDecoder`'s arguments.
        """
        super().__init__(in_channels, mask_classification, **kwargs)
        if not mask_classification:
            raise ValueError(f"{DECODER_NAME} needs mask classification")
        if sum(step_classes) != self.num_classes:
            raise ValueError(f"steps of {list(step_classes)} classes for {self.num_classes}")
        if len(deltas) != len(step_classes):
            raise ValueError(f"{len(deltas)} deltas for {len(step_classes)} query groups")
        self.step_classes = [int(c) for c in step_classes]
        self.num_prompts = int(num_prompts)
        self.deep_prompts = bool(deep_prompts)
        self.deltas = [float(d) for d in deltas]
        self.logit_manipulation = bool(logit_manipulation)
        hidden_dim = self.query_feat.weight.shape[1]
        increments = len(step_classes) - 1
        self.prompt_feat = nn.ModuleList(
            nn.Embedding(num_prompts, hidden_dim) for _ in range(increments)
        )
        if self.deep_prompts:
            self.prompt_embed = nn.ModuleList(
                nn.ModuleList(nn.Embedding(num_prompts, hidden_dim) for _ in range(self.num_layers))
                for _ in range(increments)
            )
        else:
            self.prompt_embed = nn.ModuleList(
                nn.Embedding(num_prompts, hidden_dim) for _ in range(increments)
            )
        self.prompt_mask_embed = None
        if prompt_mask_mlp:
            mask_dim = self.mask_embed.layers[-1].out_features
            self.prompt_mask_embed = nn.ModuleList(
                MLP(hidden_dim, hidden_dim, mask_dim, 3) for _ in range(increments)
            )
        self.class_hidden = None
        self.no_object_hidden = None
        if deep_cls:
            self.class_hidden = nn.ModuleList(_hidden_mlp(hidden_dim) for _ in step_classes)
            self.no_object_hidden = _hidden_mlp(hidden_dim)

    @classmethod
    def from_config(cls, cfg, in_channels, mask_classification):
        ret = super().from_config(cfg, in_channels, mask_classification)
        s = eclipse_settings(cfg)
        ret.update(
            step_classes=s.step_classes,
            num_prompts=s.num_prompts,
            deep_prompts=s.deep_prompts,
            prompt_mask_mlp=s.prompt_mask_mlp,
            deep_cls=s.deep_cls,
            deltas=s.deltas,
            logit_manipulation=s.logit_manipulation,
        )
        return ret

    @property
    def num_groups(self) -> int:
        return len(self.step_classes)

    def group_prefixes(self, group: int) -> List[str]:
        """Module-name prefixes (relative to this decoder) of the parameters group ``group > 0``
        adds: its prompts, mask MLP and hidden classifier layers."""
        prefixes = [f"prompt_feat.{group - 1}.", f"prompt_embed.{group - 1}."]
        if self.prompt_mask_embed is not None:
            prefixes.append(f"prompt_mask_embed.{group - 1}.")
        if self.class_hidden is not None:
            prefixes.append(f"class_hidden.{group}.")
        return prefixes

    @torch.no_grad()
    def init_group(self, group: int, init: str = "distinct") -> None:
        """
        Start a step's parameters: its mask MLP as a copy of the base's, its hidden classifier
        layers as a copy of no-object's (clovaai/ECLIPSE ``maskformer_model.py``
        ``copy_*_weights``), and its prompts by ``init``:

        * ``"distinct"``: prompt i starts as base query ``i * Q // P`` (its features, and its
          positional embedding at every layer): P different queries that already find objects
          (P > Q repeats base queries);
        * ``"eclipse-code"``: every prompt is the mean of the base queries
          (``copy_prompt_embed_weights``). The P prompts are then identical: in every image they
          predict the same mask and class, the matching pairs them with the targets arbitrarily,
          and they part only slowly (synthetic_shapes 10-10, 200 iterations at 2.5e-4: 0.16
          apart at norm 2.5, all predicting one class; the code's schedules run 16000).

        Args:
            group: the step's query group (> 0).
            init: one of ``INITS``.
        """
        if init not in INITS:
            raise ValueError(f"prompt init {init!r}; valid: {list(INITS)}")
        feat, pos = self.query_feat.weight, self.query_embed.weight
        if init == "distinct":
            rows = torch.arange(self.num_prompts, device=feat.device) * feat.shape[0]
            feat, pos = feat[rows // self.num_prompts], pos[rows // self.num_prompts]
        else:
            feat = feat.mean(0, keepdim=True).expand(self.num_prompts, -1)
            pos = pos.mean(0, keepdim=True).expand(self.num_prompts, -1)
        self.prompt_feat[group - 1].weight.copy_(feat)
        embeds = self.prompt_embed[group - 1]
        for e in embeds if self.deep_prompts else [embeds]:
            e.weight.copy_(pos)
        if self.prompt_mask_embed is not None:
            self.prompt_mask_embed[group - 1].load_state_dict(self.mask_embed.state_dict())
        if self.class_hidden is not None:
            self.class_hidden[group].load_state_dict(self.no_object_hidden.state_dict())

    def predict_class(self, decoder_output: Tensor) -> Tensor:
        # Each step's logits from its own rows, so that a group's logits for old classes are
        # computed by exactly the same operations (shapes included) at every later step.
        w, b = self.class_embed.weight, self.class_embed.bias
        out, start = [], 0
        for s, n in enumerate(self.step_classes):
            h = (
                decoder_output
                if self.class_hidden is None
                else self.class_hidden[s](decoder_output)
            )
            out.append(F.linear(h, w[start : start + n], b[start : start + n]))
            start += n
        h = (
            decoder_output
            if self.no_object_hidden is None
            else self.no_object_hidden(decoder_output)
        )
        out.append(F.linear(h, w[-1:], b[-1:]))
        return torch.cat(out, dim=-1)

    def _group_queries(self, group: int, layer: int) -> Tuple[Tensor, Tensor]:
        """(features (N, C) at the start, positional embeddings (N, C) of ``layer``)."""
        if group == 0:
            return self.query_feat.weight, self.query_embed.weight
        embeds = self.prompt_embed[group - 1]
        pos = embeds[layer].weight if self.deep_prompts else embeds.weight
        return self.prompt_feat[group - 1].weight, pos

    def _run_group(self, group: int, src, pos, sizes, mask_features: Tensor):
        """Class and mask predictions of one group, before the first layer and after each."""
        mask_head = self.mask_embed
        if group > 0 and self.prompt_mask_embed is not None:
            mask_head = self.prompt_mask_embed[group - 1]
        bs = mask_features.shape[0]
        output = self._group_queries(group, 0)[0].unsqueeze(1).repeat(1, bs, 1)
        classes, masks = [], []
        logits, mask, attn_mask = self._heads(output, mask_features, mask_head, sizes[0])
        classes.append(logits)
        masks.append(mask)
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            query_pos = self._group_queries(group, i)[1].unsqueeze(1).repeat(1, bs, 1)
            output = self.transformer_cross_attention_layers[i](
                output, src[level], memory_mask=attn_mask, pos=pos[level], query_pos=query_pos
            )
            output = self.transformer_self_attention_layers[i](output, query_pos=query_pos)
            output = self.transformer_ffn_layers[i](output)
            is_last = i == self.num_layers - 1
            next_size = None if is_last else sizes[(i + 1) % self.num_feature_levels]
            logits, mask, attn_mask = self._heads(output, mask_features, mask_head, next_size)
            classes.append(logits)
            masks.append(mask)
        return classes, masks

    def _heads(self, output: Tensor, mask_features: Tensor, mask_head: nn.Module, size):
        decoder_output = self.decoder_norm(output).transpose(0, 1)  # (B, N, C)
        logits = self.predict_class(decoder_output)
        mask = torch.einsum("bqc,bchw->bqhw", mask_head(decoder_output), mask_features)
        attn_mask = None if size is None else self.attention_mask(mask, size)
        return logits, mask, attn_mask

    def forward(
        self, x: List[Tensor], mask_features: Tensor, mask: Optional[Tensor] = None
    ) -> Dict[str, object]:
        """
        As Mask2Former's decoder. Training: the predictions of the last group only (the base
        queries at step 0, the step's prompts later). Inference: all groups, concatenated in
        order, with the other steps' logits switched off and no-object manipulated.
        """
        del mask
        if len(x) != self.num_feature_levels:
            raise ValueError(f"{DECODER_NAME} expects {self.num_feature_levels} feature levels")
        src, pos, sizes = [], [], []
        for i, feat in enumerate(x):
            sizes.append(feat.shape[-2:])
            pos.append(self.pe_layer(feat).flatten(2).permute(2, 0, 1))
            level = self.input_proj[i](feat).flatten(2) + self.level_embed.weight[i][None, :, None]
            src.append(level.permute(2, 0, 1))

        groups = [self.num_groups - 1] if self.training else list(range(self.num_groups))
        runs = [self._run_group(g, src, pos, sizes, mask_features) for g in groups]
        layers = self.num_layers + 1
        classes = [torch.cat([r[0][i] for r in runs], dim=1) for i in range(layers)]
        masks = [torch.cat([r[1][i] for r in runs], dim=1) for i in range(layers)]
        if not self.training and self.num_groups > 1:
            sizes_q = [self.query_feat.weight.shape[0]] + [self.num_prompts] * (self.num_groups - 1)
            classes = [
                manipulate_logits(
                    c, sizes_q, self.step_classes, self.deltas, self.logit_manipulation
                )
                for c in classes
            ]
        return {
            "pred_logits": classes[-1],
            "pred_masks": masks[-1],
            "aux_outputs": self._aux_outputs(classes, masks),
        }

    def extra_repr(self) -> str:
        return (
            f"step_classes={self.step_classes}, num_prompts={self.num_prompts}, deep_prompts="
            f"{self.deep_prompts}, deltas={self.deltas}, logit_manipulation="
            f"{self.logit_manipulation}"
        )


class SigmoidFocalLoss:
    """
    ECLIPSE's classification loss (``clovaai/ECLIPSE`` ``continual/method_wrapper/loss.py``
    ``sigmoid_focal_loss``, used with ``CONT.SOFTCLS False``): each of the K+1 logits of every
    query is a binary problem (the target one-hot over K+1, no-object included), the loss
    ``alpha * BCE * (1 - p_t)^gamma`` averaged over all B Q (K+1) entries and multiplied by 50
    (the code's constant). A ``ClassLoss`` for the set criterion.
    """

    SCALE = 50.0

    def __init__(self, alpha: float = 5.0, gamma: float = 1.0):
        if alpha <= 0 or gamma < 0:
            raise ValueError(
                f"CONT.ECLIPSE.FOCAL_ALPHA={alpha} must be > 0 and FOCAL_GAMMA={gamma} >= 0"
            )
        self.alpha = float(alpha)
        self.gamma = float(gamma)

    def __call__(self, logits: Tensor, target_classes: Tensor, class_weight: Tensor) -> Tensor:
        del class_weight  # the focal term discounts the easy no-object entries instead
        logits = logits.float()
        target = F.one_hot(target_classes, logits.shape[-1]).to(logits)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        p = logits.sigmoid()
        p_t = p * target + (1 - p) * (1 - target)
        return self.SCALE * (self.alpha * bce * (1 - p_t).pow(self.gamma)).mean()

    def __repr__(self) -> str:
        return f"SigmoidFocalLoss(alpha={self.alpha}, gamma={self.gamma}, scale={self.SCALE})"


def _eval_mode_pre_hook(module: nn.Module, inputs) -> None:
    # A frozen batch norm normalises with its running statistics (and leaves them alone) in
    # training too, as detectron2's FrozenBN in ECLIPSE's pretrained backbone.
    module.training = False


@METHOD_REGISTRY.register()
class ECLIPSE(ContinualMethod):
    """ECLIPSE: frozen model, prompt queries with their own heads per step, logit manipulation."""

    keeps_old_classifier = True

    def __init__(self, cfg, scenario, step: int):
        super().__init__(cfg, scenario, step)
        mf = cfg.MODEL.MASK_FORMER
        if self.per_pixel:
            raise ValueError(
                "CONT.METHOD eclipse prompts the transformer decoder: it needs mask classification "
                "(MODEL.MASK_FORMER.PER_PIXEL False)"
            )
        wrong = [
            f"{k}={v!r} (needs {w!r})"
            for k, v, w in (
                ("MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME", mf.TRANSFORMER_DECODER_NAME, DECODER_NAME),
                ("MODEL.MASK_FORMER.CLASS_ACTIVATION", mf.CLASS_ACTIVATION, "sigmoid"),
            )
            if v != w
        ]  # fmt: skip
        if wrong:
            raise ValueError(
                "CONT.METHOD eclipse: " + ", ".join(wrong) + ": set them for every step, the base "
                "included (the *-eclipse.yaml configs do)"
            )
        self.settings = eclipse_settings(cfg, scenario.num_seen(step))
        self.keeps_no_object_row = not self.settings.train_no_object
        self.loss = SigmoidFocalLoss(cfg.CONT.ECLIPSE.FOCAL_ALPHA, cfg.CONT.ECLIPSE.FOCAL_GAMMA)

    def class_loss(self) -> SigmoidFocalLoss:
        return self.loss

    def base_key(self) -> str:
        s = self.settings
        return f"eclipse base: sigmoid classifier, deep_cls={s.deep_cls}, {self.loss!r}"

    def step_config_overrides(self) -> Dict:
        s = self.settings
        out = {"MODEL.MASK_FORMER.CLASS_WEIGHT": s.inc_class_weight}
        if s.inc_max_iter > 0:
            out["SOLVER.MAX_ITER"] = s.inc_max_iter
        if s.inc_base_lr > 0:
            out["SOLVER.BASE_LR"] = s.inc_base_lr
        return out

    def _decoder(self, student: nn.Module) -> EclipseTransformerDecoder:
        decoder = student.sem_seg_head.predictor
        if not isinstance(decoder, EclipseTransformerDecoder):
            raise TypeError(
                f"CONT.METHOD eclipse needs {DECODER_NAME}, got {type(decoder).__name__}"
            )
        return decoder

    def _own_prefixes(self, student: nn.Module) -> List[str]:
        """Parameter-name prefixes of what this step trains."""
        decoder = self._decoder(student)
        prefixes = ["sem_seg_head.predictor." + p for p in decoder.group_prefixes(self.step)]
        # The new classes' rows; the old ones and no-object are restored after every step
        # (keeps_old_classifier / keeps_no_object_row).
        prefixes.append("sem_seg_head.predictor.class_embed.")
        if self.settings.train_no_object and decoder.no_object_hidden is not None:
            prefixes.append("sem_seg_head.predictor.no_object_hidden.")
        return prefixes

    def prepare_student(self, student: nn.Module) -> None:
        """At step t > 0: everything but the step's own parameters frozen, and the frozen batch
        norms and dropouts kept in inference mode."""
        if self.step == 0:
            return
        own = tuple(self._own_prefixes(student))
        for name, p in student.named_parameters():
            p.requires_grad_(name.startswith(own))
        # The classifier is one tensor for all steps: the rows of other steps get no gradient
        # (their logits still shape the prompts' loss), as in the code, where they are separate
        # frozen layers; the gradient-norm clipping then sees the same gradients. Weight decay
        # still reaches them: the step trainer restores them (keeps_old_classifier).
        embed = class_embed(student)
        keep = torch.zeros(embed.weight.shape[0], 1, dtype=embed.weight.dtype)
        keep[self.num_old : self.num_old + self.num_new] = 1
        if self.settings.train_no_object:
            keep[-1] = 1
        keep = keep.to(embed.weight.device)
        embed.weight.register_hook(lambda g: g * keep)
        embed.bias.register_hook(lambda g: g * keep[:, 0])
        for module in student.modules():
            if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.Dropout)):
                module.register_forward_pre_hook(_eval_mode_pre_hook)

    def added_state_keys(self, student: nn.Module) -> List[str]:
        if self.step == 0:
            return []
        prefixes = tuple(
            "sem_seg_head.predictor." + p for p in self._decoder(student).group_prefixes(self.step)
        )
        return [k for k in student.state_dict() if k.startswith(prefixes)]

    def init_new_classes(self, class_embed: nn.Module) -> None:
        """
        The new classes' rows start as no-object's (clovaai/ECLIPSE ``copy_no_obj_weights``), with
        ``CONT.ECLIPSE.INIT distinct`` plus each row's own random initialisation (``nn.Linear``'s,
        which the rows hold when this runs). The code's identical rows give every new class the
        same logit on every query; AdamW moves a weight by about the learning rate per step at
        most, so they part only over a long schedule (synthetic_shapes 10-10, distinct prompts,
        200 iterations at 2.5e-4: rows 0.15 apart at norm 0.76, one class predicted for all).
        """
        with torch.no_grad():
            rows = slice(self.num_old, self.num_old + self.num_new)
            if self.settings.init == "distinct":
                class_embed.weight[rows] += class_embed.weight[-1]
            else:
                class_embed.weight[rows] = class_embed.weight[-1]
            class_embed.bias[rows] = class_embed.bias[-1]

    def init_new_step(self, student: nn.Module) -> None:
        self._decoder(student).init_group(self.step, self.settings.init)

    def extra_repr(self) -> str:
        s = self.settings
        return (
            f"{super().extra_repr()}, prompts={s.num_prompts} (deep={s.deep_prompts}, mask_mlp="
            f"{s.prompt_mask_mlp}), deep_cls={s.deep_cls}, train_no_object={s.train_no_object}, "
            f"logit_manipulation={s.logit_manipulation} (deltas {list(s.deltas)}), init={s.init}"
        )
