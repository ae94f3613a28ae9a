"""Set criterion of Mask2Former / CoMFormer: classification, mask and dice losses after matching.

Shapes: B images, Q queries, K classes (K = no-object index), N_b targets of image b, M matched
pairs in the batch, P points per mask.
"""

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.utils.comm import get_world_size

from .mask_losses import dice_loss, sigmoid_ce_loss, softmax_ce_loss
from .matcher import HungarianMatcher, check_mask_activation

__all__ = [
    "SetCriterion",
    "ClassLoss",
    "build_loss_weight_dict",
    "uncertain_point_coords",
    "uncertain_point_grid",
]

Indices = List[Tuple[Tensor, Tensor]]
# A classification loss replacing Mask2Former's: (logits (B, Q, K+1), target classes (B, Q) int64
# with K for no-object, per-class weights (K+1,)) -> scalar.
ClassLoss = Callable[[Tensor, Tensor, Tensor], Tensor]


def build_loss_weight_dict(
    class_weight: float, mask_weight: float, dice_weight: float, num_aux: int
) -> Dict[str, float]:
    """
    Loss weights of the final prediction and of ``num_aux`` auxiliary (deep supervision) ones.

    Returns:
        ``{"loss_ce", "loss_mask", "loss_dice"}`` and the same keys suffixed ``_0 .. _{num_aux-1}``.
    """
    base = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
    weights = dict(base)
    for i in range(num_aux):
        weights.update({f"{k}_{i}": v for k, v in base.items()})
    return weights


def _uncertainty_of_logits(point_logits: Tensor) -> Tensor:
    # A sigmoid mask is least certain where its logit is near 0 (probability 0.5).
    return -point_logits.abs()


def _uncertainty_of_probs(point_probs: Tensor) -> Tensor:
    # For softmax masks the same rule on probabilities: 2p - 1 is 0 at p = 0.5 (CoMFormer).
    return -(2 * point_probs - 1).abs()


def _sample_at(input: Tensor, grid: Tensor) -> Tensor:
    """detectron2's ``point_sample`` for points already in grid_sample's [-1, 1] coordinates:
    (M, C, H, W) at (M, P, 2) -> (M, C, P). ``point_sample`` maps [0, 1] coordinates with
    ``2 * u - 1`` first, which is exact for the values ``torch.rand`` draws (multiples of 2^-24),
    so sampling at ``2 * u - 1`` computed once gives the same values."""
    return F.grid_sample(input, grid.unsqueeze(2), align_corners=False).squeeze(3)


def uncertain_point_grid(
    pred: Tensor,
    uncertainty: Callable[[Tensor], Tensor],
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
) -> Tensor:
    """
    PointRend's training points (detectron2's ``get_uncertain_point_coords_with_randomness``, which
    Mask2Former uses): ``int(num_points * oversample_ratio)`` uniform candidates per mask, the
    ``int(importance_sample_ratio * num_points)`` most uncertain of them, then uniform points up to
    ``num_points``; in grid_sample's [-1, 1] coordinates.

    The same random draws in the same order as detectron2's, so the same points: ``uniform_(-1,
    1)`` turns each 24-bit draw ``u`` into ``2 u - 1`` exactly where ``torch.rand`` gives ``u`` and
    ``point_sample`` computes ``2 u - 1`` (exact in float32), without the two passes over the
    candidates that the conversion costs. The uncertain points are taken with an unsorted top-k
    and a gather (detectron2 sorts them by uncertainty and indexes a flattened copy, which cost a
    third of the function on CPU): their order within a mask differs, which changes the losses
    (means over points) by float rounding only.

    Args:
        pred: (M, 1, H, W) predictions the uncertainty is measured on.
        uncertainty: (M, 1, P') sampled predictions -> (M, 1, P') uncertainties.

    Returns:
        (M, num_points, 2) coordinates in [-1, 1].
    """
    num_masks = pred.shape[0]
    num_candidates = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    grid = torch.empty(num_masks, num_candidates, 2, device=pred.device).uniform_(-1, 1)
    scores = uncertainty(_sample_at(pred, grid))[:, 0]
    idx = torch.topk(scores, k=num_uncertain, dim=1, sorted=False)[1]
    chosen = torch.gather(grid, 1, idx.unsqueeze(-1).expand(-1, -1, 2))
    if num_points > num_uncertain:
        rest = torch.empty(num_masks, num_points - num_uncertain, 2, device=pred.device)
        chosen = torch.cat([chosen, rest.uniform_(-1, 1)], dim=1)
    return chosen


def uncertain_point_coords(
    pred: Tensor,
    uncertainty: Callable[[Tensor], Tensor],
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
) -> Tensor:
    """:func:`uncertain_point_grid` in [0, 1] coordinates (detectron2's), (M, num_points, 2)."""
    grid = uncertain_point_grid(
        pred, uncertainty, num_points, oversample_ratio, importance_sample_ratio
    )
    return (grid + 1) / 2


def _stack_target_masks(masks: Sequence[Tensor], like: Tensor) -> Tensor:
    """
    Concatenate per-image target masks, zero-padding them to a common size at the bottom/right
    (where images of a batch are padded), so that normalised point coordinates agree.

    Args:
        masks: B tensors (N_b, H_b, W_b).
        like: tensor whose device and dtype the result takes.

    Returns:
        (sum N_b, max H_b, max W_b).
    """
    height = max(m.shape[-2] for m in masks)
    width = max(m.shape[-1] for m in masks)
    padded = [F.pad(m.to(like), (0, width - m.shape[-1], 0, height - m.shape[-2])) for m in masks]
    return torch.cat(padded, dim=0)


class SetCriterion(nn.Module):
    """
    Losses of a set prediction after Hungarian matching, with deep supervision.

    Step 1: match queries to targets (``matcher``), separately for the final prediction and each
    auxiliary one. Step 2: supervise matched pairs (class and mask), and unmatched queries as
    no-object.

    Losses (all unweighted; ``weight_dict`` is kept for the caller to apply):

    * ``loss_ce``: cross-entropy over K+1 classes for every query, weighted by ``empty_weight``
      (1 for real classes, ``eos_coef`` for no-object); unmatched queries target class K.
    * ``loss_mask`` / ``loss_dice``, on P importance-sampled points per matched mask (PointRend's
      ``get_uncertain_point_coords_with_randomness``: ``oversample_ratio * P`` random candidates,
      the ``importance_sample_ratio * P`` most uncertain kept, the rest uniformly random), each
      summed over masks and divided by ``num_masks``:

      - ``mask_activation="sigmoid"`` (Mask2Former): sigmoid BCE averaged over points, and dice
        on the sigmoid; uncertainty ``-|logit|``.
      - ``mask_activation="softmax"`` (CoMFormer, ``SoftmaxKDSetCriterion.loss_masks`` in
        fcdl94/CoMFormer ``continual/method_wrapper/set_criterion.py``): the masks of an image are
        normalised by a softmax (and a log-softmax) across ALL its queries on the full prediction
        map; the matched ones are then sampled. Points are chosen per matched mask as in the
        sigmoid case, with uncertainty ``-|2p - 1|`` on the probabilities. ``loss_mask`` is the
        cross-entropy ``-t * log p`` (a point counts for the query matched to the target covering
        it; uncovered points add 0), averaged over the P points of each mask; ``loss_dice`` is
        the dice loss on the probabilities (no sigmoid). Both are summed over masks and divided by
        ``num_masks``, like the sigmoid losses.

    ``num_masks`` is the number of target masks in the batch, summed over workers and divided by
    the world size (the per-worker average), at least 1.

    ``class_loss`` replaces the weighted cross-entropy of ``loss_ce`` by another function of the
    same targets (continual methods: MiB's unbiased cross-entropy, CoMFormer's focal loss).
    """

    @configurable
    def __init__(
        self,
        num_classes: int,
        *,
        matcher: nn.Module,
        weight_dict: Dict[str, float],
        eos_coef: float,
        losses: Sequence[str] = ("labels", "masks"),
        num_points: int,
        oversample_ratio: float,
        importance_sample_ratio: float,
        mask_activation: str = "sigmoid",
        class_loss: Optional[ClassLoss] = None,
    ):
        """
        Args:
            num_classes: K, the number of classes without no-object.
            matcher: called as ``matcher(outputs, targets)``, returns one ``(index_i, index_j)``
                pair of index tensors per image (see :class:`HungarianMatcher`).
            weight_dict: loss name -> weight; stored for the meta-architecture, not applied here.
            eos_coef: classification weight of the no-object class.
            losses: which of "labels", "masks" to compute.
            num_points: P, points per mask for the mask losses.
            oversample_ratio: candidates per point for importance sampling (>= 1).
            importance_sample_ratio: fraction of the P points chosen by uncertainty, in [0, 1].
            mask_activation: "sigmoid" or "softmax", see the class docstring.
            class_loss: called as ``class_loss(logits, target_classes, empty_weight)`` instead of
                the weighted cross-entropy; None: Mask2Former's loss.
        """
        super().__init__()
        unknown = [loss for loss in losses if loss not in self._loss_names()]
        if unknown:
            raise ValueError(
                f"SetCriterion: unknown losses {unknown}; valid: {sorted(self._loss_names())}"
            )
        if num_classes < 1:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES={num_classes} is not valid; must be >= 1"
            )
        if num_points < 1:
            raise ValueError(
                f"MODEL.MASK_FORMER.TRAIN_NUM_POINTS={num_points} is not valid; must be >= 1"
            )
        if oversample_ratio < 1:
            raise ValueError(
                f"MODEL.MASK_FORMER.OVERSAMPLE_RATIO={oversample_ratio} is not valid; must be >= 1"
            )
        if not 0 <= importance_sample_ratio <= 1:
            raise ValueError(
                f"MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO={importance_sample_ratio} is not "
                "valid; must be in [0, 1]"
            )
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = eos_coef
        self.losses = list(losses)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.mask_activation = check_mask_activation(mask_activation)
        self.class_loss = class_loss

        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        # Persistent: Mask2Former checkpoints carry it as ``criterion.empty_weight``.
        self.register_buffer("empty_weight", empty_weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The no-object weight is a hyper-parameter of this run, not a learned value: a checkpoint
        # trained with another MODEL.MASK_FORMER.NO_OBJECT_WEIGHT must not override the config.
        # The entry is still consumed (and its shape checked) so Mask2Former checkpoints load.
        key = prefix + "empty_weight"
        if key in state_dict and state_dict[key].shape == self.empty_weight.shape:
            state_dict = {**state_dict, key: self.empty_weight.detach().clone()}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_config(cls, cfg, class_loss: Optional[ClassLoss] = None):
        mf = cfg.MODEL.MASK_FORMER
        num_aux = mf.DEC_LAYERS - 1 if mf.DEEP_SUPERVISION else 0
        return {
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "matcher": HungarianMatcher(cfg),
            "weight_dict": build_loss_weight_dict(
                mf.CLASS_WEIGHT, mf.MASK_WEIGHT, mf.DICE_WEIGHT, num_aux
            ),
            "eos_coef": mf.NO_OBJECT_WEIGHT,
            "losses": ["labels", "masks"],
            "num_points": mf.TRAIN_NUM_POINTS,
            "oversample_ratio": mf.OVERSAMPLE_RATIO,
            "importance_sample_ratio": mf.IMPORTANCE_SAMPLE_RATIO,
            "mask_activation": mf.MASK_ACTIVATION,
            "class_loss": class_loss,
        }

    def _loss_names(self) -> Dict[str, Callable]:
        return {"labels": self.loss_labels, "masks": self.loss_masks}

    # ------------------------------------------------------------------ losses
    def loss_labels(
        self,
        outputs: Dict[str, Tensor],
        targets: List[Dict[str, Tensor]],
        indices: Indices,
        num_masks: float,
    ) -> Dict[str, Tensor]:
        """
        Classification loss.

        Args:
            outputs: needs "pred_logits" (B, Q, K+1).
            targets: B dicts with "labels" (N_b,).
            indices: the matching, one ``(index_i, index_j)`` per image.
            num_masks: unused (the cross-entropy is a weighted mean over queries).

        Returns:
            ``{"loss_ce": scalar}``.
        """
        logits = outputs["pred_logits"].float()
        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device
        )
        batch_idx, query_idx = self._src_permutation_idx(indices)
        matched_labels = [t["labels"][j] for t, (_, j) in zip(targets, indices)]
        target_classes[batch_idx, query_idx] = torch.cat(matched_labels).to(logits.device)
        if self.class_loss is not None:
            return {"loss_ce": self.class_loss(logits, target_classes, self.empty_weight)}
        loss = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)
        return {"loss_ce": loss}

    def loss_masks(
        self,
        outputs: Dict[str, Tensor],
        targets: List[Dict[str, Tensor]],
        indices: Indices,
        num_masks: float,
    ) -> Dict[str, Tensor]:
        """
        Mask losses on importance-sampled points of the matched masks.

        Args:
            outputs: needs "pred_masks" (B, Q, H, W) mask logits.
            targets: B dicts with "masks" (N_b, H', W').
            indices: the matching, one ``(index_i, index_j)`` per image.
            num_masks: normaliser of the sums over masks.

        Returns:
            ``{"loss_mask": scalar, "loss_dice": scalar}``.
        """
        pred_masks = outputs["pred_masks"]
        src_idx = self._src_permutation_idx(indices)
        if src_idx[0].numel() == 0:
            # Nothing matched in the whole batch: zero losses that still belong to the graph, so
            # that every parameter gets a (zero) gradient in distributed training.
            zero = pred_masks.sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero.clone()}

        tgt_masks = _stack_target_masks([t["masks"] for t in targets], like=pred_masks)
        tgt_masks = tgt_masks[self._tgt_flat_idx(targets, indices)][:, None]  # (M, 1, H', W')

        if self.mask_activation == "softmax":
            # The normalisation needs every query of the image, so it runs on the full map before
            # the matched masks are picked; fp32 because the log of small probabilities underflows
            # in fp16.
            log_probs = pred_masks.float().log_softmax(1)[src_idx][:, None]  # (M, 1, H, W)
            probs = log_probs.exp()
            point_grid, point_labels = self._sample_points(probs, tgt_masks, _uncertainty_of_probs)
            # One sampling pass for both maps: the bilinear weights are computed once, each
            # channel's values are those of sampling it alone.
            point_probs, point_log_probs = _sample_at(
                torch.cat([probs, log_probs], dim=1), point_grid
            ).unbind(1)
            return {
                "loss_mask": softmax_ce_loss(point_log_probs, point_labels, num_masks),
                "loss_dice": dice_loss(point_probs, point_labels, num_masks),
            }

        logits = pred_masks[src_idx][:, None]  # (M, 1, H, W)
        point_grid, point_labels = self._sample_points(logits, tgt_masks, _uncertainty_of_logits)
        point_logits = _sample_at(logits, point_grid)[:, 0]
        return {
            "loss_mask": sigmoid_ce_loss(point_logits, point_labels, num_masks),
            "loss_dice": dice_loss(point_logits.sigmoid(), point_labels, num_masks),
        }

    def _sample_points(
        self, pred: Tensor, tgt_masks: Tensor, uncertainty: Callable[[Tensor], Tensor]
    ) -> Tuple[Tensor, Tensor]:
        """
        Args:
            pred: (M, 1, H, W) predictions the uncertainty is measured on.
            tgt_masks: (M, 1, H', W') targets.
            uncertainty: maps (M, 1, P) sampled predictions to (M, 1, P) uncertainties.

        Returns:
            point coordinates (M, P, 2) in grid_sample's [-1, 1], and target values there (M,
            P).
        """
        # Choosing points is not differentiable and must not keep the candidates' graph.
        with torch.no_grad():
            point_grid = uncertain_point_grid(
                pred,
                uncertainty,
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
            )
            point_labels = _sample_at(tgt_masks, point_grid)[:, 0]
        return point_grid, point_labels

    # ------------------------------------------------------------------ indices
    @staticmethod
    def _src_permutation_idx(indices: Indices) -> Tuple[Tensor, Tensor]:
        """(batch index, query index) of every matched query."""
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        query_idx = torch.cat([src for src, _ in indices])
        return batch_idx, query_idx

    @staticmethod
    def _tgt_flat_idx(targets: List[Dict[str, Tensor]], indices: Indices) -> Tensor:
        """Index of every matched target in the concatenation of all images' targets."""
        offsets, total = [], 0
        for t in targets:
            offsets.append(total)
            total += len(t["labels"])
        return torch.cat([tgt + off for off, (_, tgt) in zip(offsets, indices)])

    # ------------------------------------------------------------------ forward
    def get_num_masks(self, targets: List[Dict[str, Tensor]], device: torch.device) -> float:
        """Number of target masks per worker (summed over workers / world size), at least 1."""
        num_masks = torch.as_tensor(
            [float(sum(len(t["labels"]) for t in targets))], dtype=torch.float, device=device
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(num_masks)
        return torch.clamp(num_masks / get_world_size(), min=1).item()

    def _check_targets(self, targets: List[Dict[str, Tensor]], num_images: int) -> None:
        """Raise a clear error for malformed targets (an out-of-range label would otherwise end
        as an opaque index error, or a device-side assert on GPU)."""
        if len(targets) != num_images:
            raise ValueError(f"SetCriterion: {len(targets)} targets for a batch of {num_images}")
        for i, t in enumerate(targets):
            missing = [k for k in ("labels", "masks") if k not in t]
            if missing:
                raise KeyError(f"SetCriterion: targets[{i}] lacks {missing}; needs labels, masks")
        if not targets:
            return
        labels = torch.cat([t["labels"].reshape(-1).to(targets[0]["labels"]) for t in targets])
        # One host sync per batch, not per image.
        if ((labels < 0) | (labels >= self.num_classes)).any():
            raise ValueError(
                f"SetCriterion: target labels must be in [0, {self.num_classes - 1}] "
                f"(num_classes={self.num_classes}; {self.num_classes} is no-object), got "
                f"min {int(labels.min())}, max {int(labels.max())}"
            )

    def compute_losses(
        self,
        outputs: Dict[str, Tensor],
        targets: List[Dict[str, Tensor]],
        indices: Indices,
        num_masks: float,
    ) -> Dict[str, Tensor]:
        """All requested losses of one prediction (final or auxiliary) given its matching."""
        loss_fns = self._loss_names()
        losses = {}
        for name in self.losses:
            losses.update(loss_fns[name](outputs, targets, indices, num_masks))
        return losses

    def forward(
        self,
        outputs: Dict[str, Union[Tensor, List[Dict[str, Tensor]]]],
        targets: List[Dict[str, Tensor]],
        return_indices: bool = False,
    ) -> Union[Dict[str, Tensor], Tuple[Dict[str, Tensor], Indices]]:
        """
        Args:
            outputs: the transformer decoder's output: "pred_logits" (B, Q, K+1), "pred_masks"
                (B, Q, H, W) and optionally "aux_outputs", a list of dicts with the same two keys.
            targets: B dicts ``{"labels": (N_b,) int64, "masks": (N_b, H', W')}``; N_b may be 0.
            return_indices: also return the matching of the final prediction.

        Returns:
            dict of unweighted losses: "loss_ce", "loss_mask", "loss_dice" for the final
            prediction and the same suffixed ``_i`` for ``aux_outputs[i]``; with
            ``return_indices``, also the final matching (one ``(index_i, index_j)`` per image).
        """
        self._check_targets(targets, num_images=outputs["pred_logits"].shape[0])
        main = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        indices = self.matcher(main, targets)
        num_masks = self.get_num_masks(targets, outputs["pred_logits"].device)

        losses = self.compute_losses(main, targets, indices, num_masks)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            # Each layer is matched on its own: its best assignment may differ from the final one.
            aux_indices = self.matcher(aux, targets)
            aux_losses = self.compute_losses(aux, targets, aux_indices, num_masks)
            losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
        if return_indices:
            return losses, indices
        return losses

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, eos_coef={self.eos_coef}, losses={self.losses}, "
            f"num_points={self.num_points}, oversample_ratio={self.oversample_ratio}, "
            f"importance_sample_ratio={self.importance_sample_ratio}, "
            f"mask_activation={self.mask_activation!r}"
            + ("" if self.class_loss is None else f", class_loss={self.class_loss!r}")
        )
