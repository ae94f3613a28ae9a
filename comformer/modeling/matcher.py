"""Hungarian matching of predicted masks to ground-truth segments.

Shapes: B images, Q queries, K classes (+1 no-object), N_b targets of image b, P points.
"""

from typing import Dict, List, Optional, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from detectron2.config import configurable
from detectron2.projects.point_rend.point_features import point_sample

from ..utils.timing import timed
from .mask_losses import (
    pairwise_dice_loss,
    pairwise_sigmoid_ce_loss,
    pairwise_softmax_ce_loss,
)

__all__ = ["HungarianMatcher", "MASK_ACTIVATIONS", "check_mask_activation"]

MASK_ACTIVATIONS = ("sigmoid", "softmax")


def check_mask_activation(mask_activation: str) -> str:
    """Return ``mask_activation`` if valid, else raise naming the config key and valid values."""
    if mask_activation not in MASK_ACTIVATIONS:
        raise ValueError(
            f"MODEL.MASK_FORMER.MASK_ACTIVATION={mask_activation!r} is not valid; "
            f"valid values: {', '.join(MASK_ACTIVATIONS)}"
        )
    return mask_activation


class HungarianMatcher(nn.Module):
    """
    One-to-one assignment of queries to the targets of each image, minimising a matching cost.

    There are more queries than targets; unmatched queries are supervised as no-object by the
    criterion. Masks are compared on one set of P uniformly random points per image, shared by all
    predicted and target masks of that image: the cost matrix then needs only a few matrix products.

    The cost of query i for target j is::

        C[i, j] = cost_class * (-p_i[class_j]) + cost_mask * CE(mask_i, mask_j)
                  + cost_dice * (1 - dice(mask_i, mask_j))

    with the mask terms chosen by ``mask_activation``:

    * ``"sigmoid"`` (Mask2Former): binary cross-entropy of the mask logits, dice of their sigmoid.
    * ``"softmax"`` (CoMFormer): at every point the mask logits of ALL Q queries are normalised by
      a (log-)softmax across queries; CE is ``-mean_p t_j * log p_i`` (points outside the target
      cost nothing, as in the criterion's loss) and dice is taken on the softmax probabilities.
      The softmax is taken at the sampled points: per point it only involves that point's values,
      and sampling logits then normalising keeps log-probabilities exact (no log of a bilinear
      blend of probabilities). fcdl94/CoMFormer's released ``SoftmaxMatcher`` instead uses the
      harmonic mean of class probability and dice; the weighted sum here keeps the matching cost
      aligned with the losses it is meant to approximate and honours the three cost weights.
    """

    @configurable
    def __init__(
        self,
        *,
        cost_class: float = 1.0,
        cost_mask: float = 1.0,
        cost_dice: float = 1.0,
        num_points: int = 12544,
        mask_activation: str = "sigmoid",
    ):
        """
        Args:
            cost_class: weight of the class cost.
            cost_mask: weight of the pairwise mask cross-entropy cost.
            cost_dice: weight of the pairwise dice cost.
            num_points: P, points sampled per image to compare masks.
            mask_activation: "sigmoid" or "softmax", see the class docstring.
        """
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_mask and cost_dice are all 0")
        if num_points <= 0:
            raise ValueError(
                f"MODEL.MASK_FORMER.TRAIN_NUM_POINTS={num_points} is not valid; must be > 0"
            )
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points
        self.mask_activation = check_mask_activation(mask_activation)

    @classmethod
    def from_config(cls, cfg):
        mf = cfg.MODEL.MASK_FORMER
        return {
            "cost_class": mf.CLASS_WEIGHT,
            "cost_mask": mf.MASK_WEIGHT,
            "cost_dice": mf.DICE_WEIGHT,
            "num_points": mf.TRAIN_NUM_POINTS,
            "mask_activation": mf.MASK_ACTIVATION,
        }

    @torch.no_grad()
    def forward(
        self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]]
    ) -> List[Tuple[Tensor, Tensor]]:
        """
        Args:
            outputs: ``{"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, H, W) mask logits}``.
            targets: B dicts ``{"labels": (N_b,) int64, "masks": (N_b, H', W') bool or float}``;
                target masks cover the same (padded) image as the predictions, at any resolution.

        Returns:
            B pairs ``(index_i, index_j)`` of int64 CPU tensors of length ``min(Q, N_b)``: query
            ``index_i[k]`` is matched to target ``index_j[k]``. Images without targets give empty
            tensors.
        """
        pred_logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
        if len(targets) != pred_logits.shape[0]:
            raise ValueError(
                f"HungarianMatcher: {len(targets)} targets for a batch of {pred_logits.shape[0]}"
            )
        with timed("matching"):
            costs = []
            for b, target in enumerate(targets):
                num_targets = target["labels"].shape[0]
                if target["masks"].shape[0] != num_targets:
                    raise ValueError(
                        f"HungarianMatcher: a target has {num_targets} labels but "
                        f"{target['masks'].shape[0]} masks; they must be equal (one mask per label)"
                    )
                # Images without targets draw no points (the random stream stays as it was).
                costs.append(
                    self.cost_matrix(pred_logits[b], pred_masks[b], target) if num_targets else None
                )
            return self._assign_all(costs)

    @classmethod
    def _assign_all(cls, costs: List[Optional[Tensor]]) -> List[Tuple[Tensor, Tensor]]:
        """Solve the assignment of each (Q, N_b) cost (None: no target), with one device-to-host
        copy for the whole batch (a copy per image is a synchronisation per image on CUDA)."""
        present = [c for c in costs if c is not None]
        flat = torch.cat([c.reshape(-1) for c in present]).cpu() if present else None
        out, offset = [], 0
        for cost in costs:
            if cost is None:
                empty = torch.empty(0, dtype=torch.int64)
                out.append((empty, empty.clone()))
                continue
            out.append(cls._assign(flat[offset : offset + cost.numel()].view(cost.shape)))
            offset += cost.numel()
        return out

    @torch.no_grad()
    def cost_matrix(
        self,
        logits: Tensor,
        masks: Tensor,
        target: Dict[str, Tensor],
        point_coords: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Matching cost of the queries of one image against its targets (see the class docstring).

        Args:
            logits: (Q, K+1) class logits.
            masks: (Q, H, W) mask logits.
            target: ``{"labels": (N,), "masks": (N, H', W')}``.
            point_coords: (P, 2) normalised (x, y) coordinates in [0, 1] where masks are compared;
                None draws ``num_points`` uniformly random ones.

        Returns:
            (Q, N) fp32 cost, on the predictions' device.
        """
        if point_coords is None:
            point_coords = torch.rand(self.num_points, 2, device=masks.device)
        point_coords = point_coords.to(device=masks.device, dtype=torch.float32)[None]
        # fp32 even under mixed precision: sums over thousands of points lose too much in fp16
        # and the assignment would depend on rounding.
        with torch.autocast(device_type=masks.device.type, enabled=False):
            class_prob = logits.float().softmax(-1)[:, target["labels"]]  # (Q, N)
            tgt_masks = target["masks"].to(device=masks.device, dtype=torch.float32)
            # Masks are sampled as the channels of one image, so every mask sees the same points.
            pred_points = point_sample(masks.float()[None], point_coords, align_corners=False)[0]
            tgt_points = point_sample(tgt_masks[None], point_coords, align_corners=False)[0]

            if self.mask_activation == "softmax":
                # Normalise over all Q queries before any per-query cost is formed.
                log_probs = pred_points.log_softmax(0)  # (Q, P)
                cost_mask = pairwise_softmax_ce_loss(log_probs, tgt_points)
                cost_dice = pairwise_dice_loss(log_probs.exp(), tgt_points)
            else:
                cost_mask = pairwise_sigmoid_ce_loss(pred_points, tgt_points)
                cost_dice = pairwise_dice_loss(pred_points.sigmoid(), tgt_points)
            return (
                self.cost_class * -class_prob
                + self.cost_mask * cost_mask
                + self.cost_dice * cost_dice
            )

    @staticmethod
    def _assign(cost: Tensor) -> Tuple[Tensor, Tensor]:
        """Solve the linear assignment of a (Q, N) cost matrix."""
        cost = cost.cpu()
        if not torch.isfinite(cost).all():
            raise FloatingPointError("HungarianMatcher: the matching cost has NaN/Inf entries")
        rows, cols = linear_sum_assignment(cost.numpy())
        return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
            f"cost_dice={self.cost_dice}, num_points={self.num_points}, "
            f"mask_activation={self.mask_activation!r}"
        )
