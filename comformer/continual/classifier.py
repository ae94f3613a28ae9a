"""The growing classifier: carrying a step's weights into the next step's larger model.

Class logits are laid out [old classes, new classes, extra], where extra is the no-object row
(always in mask classification; in the per-pixel head on datasets without a background class, see
``comformer.modeling.per_pixel``) or nothing (the per-pixel head on a dataset with a background
class, which is then one of the classes). Growing inserts the new rows after the old classes,
before the extra row; every other parameter is copied unchanged.
"""
from typing import Dict, Iterable, Optional, Union

import torch
from torch import nn

__all__ = [
    "CLASSIFIER_KEYS",
    "CLASSIFIER_WEIGHT_KEYS",
    "class_embed",
    "grow_classifier_state_dict",
]

# State-dict entries with one row per class (plus the extra row, if any).
CLASSIFIER_KEYS = (
    # mask classification: the transformer decoder's linear classifier, and the criterion's
    # per-class weights
    "sem_seg_head.predictor.class_embed.weight",
    "sem_seg_head.predictor.class_embed.bias",
    "criterion.empty_weight",
    # the per-pixel head's 1x1 convolution
    "sem_seg_head.predictor.weight",
    "sem_seg_head.predictor.bias",
)
# The weight entry of each kind of classifier (what a checkpoint's class count is read from).
CLASSIFIER_WEIGHT_KEYS = (
    "sem_seg_head.predictor.class_embed.weight",
    "sem_seg_head.predictor.weight",
)


def class_embed(student: torch.nn.Module) -> Union[nn.Linear, nn.Conv2d]:
    """The student's classifier: ``sem_seg_head.predictor.class_embed`` (a linear layer over the
    queries) or, for the per-pixel head, ``sem_seg_head.predictor`` (a 1x1 convolution). Both
    hold one row per output along the first dimension of ``weight`` and ``bias``."""
    if getattr(student, "per_pixel", False):
        return student.sem_seg_head.predictor
    return student.sem_seg_head.predictor.class_embed


def grow_classifier_state_dict(
    old_state: Dict[str, torch.Tensor],
    new_model_state: Dict[str, torch.Tensor],
    num_old: int,
    extra_rows: Optional[int] = None,
    added_keys: Iterable[str] = (),
) -> Dict[str, torch.Tensor]:
    """
    Combine the previous step's weights with a freshly built larger model.

    Args:
        old_state: the previous step's state dict (classifier with ``num_old + e`` rows, e the
            extra rows, 0 or 1).
        new_model_state: the new model's state dict (``num_old + num_new + e`` rows); its rows
            for the new classes are kept (their initialisation is the method's business), and so
            is ``criterion.empty_weight``, which the criterion computes from its own config.
        num_old: classes of the previous step.
        extra_rows: e, when known (``comformer.modeling.classifier_extra_rows(cfg)``); None:
            read from the old classifier's shape (0 or 1).
        added_keys: entries the new model adds (a method's new parameters, see
            ``ContinualMethod.added_state_keys``): taken from the new model, absent from the old.

    Returns:
        a state dict for the new model: old weights bit for bit, new class rows from the new model.
    """
    out = {}
    added = set(added_keys)
    missing = sorted(set(new_model_state) - set(old_state) - added)
    unexpected = sorted(set(old_state) - set(new_model_state))
    if missing or unexpected:
        raise KeyError(
            "the previous step's checkpoint does not fit this model: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]} (a different architecture?)"
        )
    for name, new in new_model_state.items():
        if name in added and name not in old_state:
            out[name] = new
            continue
        old = old_state[name]
        if name == "criterion.empty_weight":
            out[name] = new.clone()
            continue
        if name in CLASSIFIER_KEYS:
            extra = old.shape[0] - num_old
            if extra not in ((0, 1) if extra_rows is None else (extra_rows,)):
                raise ValueError(
                    f"the previous step's {name} has {old.shape[0]} rows, expected {num_old} "
                    f"classes (+ no-object) (a checkpoint of another scenario or step?)"
                )
            if new.shape[0] < old.shape[0] or new.shape[1:] != old.shape[1:]:
                raise ValueError(f"{name}: cannot grow {tuple(old.shape)} into {tuple(new.shape)}")
            grown = new.clone()
            grown[:num_old] = old[:num_old]
            if extra:
                grown[-1] = old[-1]
            out[name] = grown
            continue
        if old.shape != new.shape:
            raise ValueError(
                f"{name}: checkpoint shape {tuple(old.shape)} != model shape {tuple(new.shape)}"
            )
        out[name] = old
    return out
