"""The growing classifier: carrying a step's weights into the next step's larger model.

Class logits are laid out [old classes, new classes, no-object], so growing inserts the new rows
before the no-object row; every other parameter is copied unchanged.
"""
from typing import Dict

import torch

__all__ = ["CLASSIFIER_KEYS", "class_embed", "grow_classifier_state_dict"]

# State-dict entries with one row per class plus no-object.
CLASSIFIER_KEYS = (
    "sem_seg_head.predictor.class_embed.weight",
    "sem_seg_head.predictor.class_embed.bias",
    "criterion.empty_weight",
)


def class_embed(student: torch.nn.Module) -> torch.nn.Linear:
    """The student's classifier (``sem_seg_head.predictor.class_embed``, the module behind the
    first two :data:`CLASSIFIER_KEYS`)."""
    return student.sem_seg_head.predictor.class_embed


def grow_classifier_state_dict(
    old_state: Dict[str, torch.Tensor], new_model_state: Dict[str, torch.Tensor], num_old: int
) -> Dict[str, torch.Tensor]:
    """
    Combine the previous step's weights with a freshly built larger model.

    Args:
        old_state: the previous step's state dict (classifier with ``num_old + 1`` rows).
        new_model_state: the new model's state dict (``num_old + num_new + 1`` rows); its rows
            for the new classes are kept (their initialisation is the method's business), and so
            is ``criterion.empty_weight``, which the criterion computes from its own config.
        num_old: classes of the previous step.

    Returns:
        a state dict for the new model: old weights bit for bit, new class rows from the new model.
    """
    out = {}
    missing = sorted(set(new_model_state) - set(old_state))
    unexpected = sorted(set(old_state) - set(new_model_state))
    if missing or unexpected:
        raise KeyError(
            "the previous step's checkpoint does not fit this model: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]} (a different architecture?)"
        )
    for name, new in new_model_state.items():
        old = old_state[name]
        if name == "criterion.empty_weight":
            out[name] = new.clone()
            continue
        if name in CLASSIFIER_KEYS:
            if old.shape[0] != num_old + 1:
                raise ValueError(
                    f"the previous step's {name} has {old.shape[0] - 1} classes, expected {num_old} "
                    "(a checkpoint of another scenario or step?)"
                )
            if new.shape[0] < old.shape[0] or new.shape[1:] != old.shape[1:]:
                raise ValueError(f"{name}: cannot grow {tuple(old.shape)} into {tuple(new.shape)}")
            grown = new.clone()
            grown[:num_old] = old[:num_old]
            grown[-1] = old[-1]
            out[name] = grown
            continue
        if old.shape != new.shape:
            raise ValueError(
                f"{name}: checkpoint shape {tuple(old.shape)} != model shape {tuple(new.shape)}"
            )
        out[name] = old
    return out
