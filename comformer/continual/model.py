"""The continual model: a Mask2Former student composed with a method and a teacher.

One step of a scenario trains ``ContinualModel(student, method, teacher)``:

* the student is the plain ``MaskFormer`` of ``comformer.modeling`` (mask classification or the
  per-pixel head), built for the classes seen so far (``MODEL.SEM_SEG_HEAD.NUM_CLASSES``), its
  classification loss the method's (:meth:`~comformer.continual.method.ContinualMethod.class_loss`);
* the teacher (:class:`~comformer.continual.teacher.Teacher`) is the previous step's model,
  outside the module tree;
* the method turns one :class:`~comformer.continual.method.StepBatch` into the losses.

The student predicts classes in the scenario's order (old ones first, the growing classifier);
inference maps them back to the dataset's class ids, so evaluators and visualisers see the
dataset's label space, with probability 0 for classes not learned yet.

Checkpoints hold the student alone (its state dict is Mask2Former's): save and load
``model.student``.
"""

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from detectron2.modeling import build_model

from ..modeling import build_criterion
from .method import ContinualMethod, Prediction, StepBatch
from .teacher import Teacher

__all__ = [
    "ContinualModel",
    "build_continual_model",
    "to_dataset_classes",
    "scores_to_dataset_classes",
]


def to_dataset_classes(
    mask_cls: torch.Tensor, class_ids: Sequence[int], num_dataset_classes: int
) -> torch.Tensor:
    """
    Class logits in the model's order -> logits over the dataset's class ids.

    Args:
        mask_cls: (..., K + 1) logits; entry i < K is class ``class_ids[i]``, the last no-object.
        class_ids: the K dataset class ids the model predicts.
        num_dataset_classes: the dataset's class count.

    Returns:
        (..., num_dataset_classes + 1); classes the model does not predict get -inf
        (probability 0), no-object stays last.
    """
    if mask_cls.shape[-1] != len(class_ids) + 1:
        raise ValueError(f"{mask_cls.shape[-1] - 1} class logits for {len(class_ids)} class ids")
    shape = mask_cls.shape[:-1] + (num_dataset_classes + 1,)
    out = mask_cls.new_full(shape, float("-inf"))
    index = torch.as_tensor(list(class_ids), device=mask_cls.device)
    out[..., index] = mask_cls[..., :-1]
    out[..., -1] = mask_cls[..., -1]
    return out


def scores_to_dataset_classes(
    scores: torch.Tensor, class_ids: Sequence[int], num_dataset_classes: int
) -> torch.Tensor:
    """
    Per-class scores in the model's order -> scores over the dataset's class ids.

    Args:
        scores: (K, H, W); row i is class ``class_ids[i]``.
        class_ids: the K dataset class ids the model predicts.
        num_dataset_classes: the dataset's class count.

    Returns:
        (num_dataset_classes, H, W), 0 for the classes the model does not predict.
    """
    if scores.shape[0] != len(class_ids):
        raise ValueError(f"{scores.shape[0]} class scores for {len(class_ids)} class ids")
    out = scores.new_zeros((num_dataset_classes,) + tuple(scores.shape[1:]))
    out[torch.as_tensor(list(class_ids), device=scores.device)] = scores
    return out


class ContinualModel(nn.Module):
    """
    The model one step trains and evaluates; follows detectron2's model contract
    (``forward(list[dict])``: weighted losses in training, one result dict per image in
    inference, in the dataset's class ids).
    """

    def __init__(
        self,
        student: nn.Module,
        *,
        class_ids: Sequence[int],
        num_dataset_classes: int,
        method: Optional[ContinualMethod] = None,
        teacher: Optional[Teacher] = None,
    ):
        """
        Args:
            student: a ``MaskFormer`` predicting ``len(class_ids)`` classes.
            class_ids: the dataset class id of each of the student's classes, in its order.
            num_dataset_classes: the dataset's class count.
            method: computes the training losses; None: the student's own (fine-tuning).
            teacher: the previous step's model, for methods that need one.
        """
        super().__init__()
        if student.num_classes != len(class_ids):
            raise ValueError(
                f"the student predicts {student.num_classes} classes but {len(class_ids)} class "
                "ids were given (MODEL.SEM_SEG_HEAD.NUM_CLASSES must be the classes seen so far)"
            )
        bad = [c for c in class_ids if not 0 <= c < num_dataset_classes]
        if bad:
            raise ValueError(f"class ids {bad} are not in [0, {num_dataset_classes})")
        self.student = student
        self.class_ids = [int(c) for c in class_ids]
        self.num_dataset_classes = int(num_dataset_classes)
        self.method = method
        # Kept out of the module tree (see comformer.continual.teacher).
        self.teacher = teacher

    def forward(self, batched_inputs: List[Dict]):
        student = self.student
        images = student.preprocess_images(batched_inputs)
        features, outputs = student.predict(images)
        if not self.training and getattr(student, "per_pixel", False):
            # Probabilities are remapped after the softmax: a -inf logit would not survive the
            # bilinear upsampling (0 x inf).
            results = student.inference(outputs, batched_inputs, images)
            for r in results:
                r["sem_seg"] = scores_to_dataset_classes(
                    r["sem_seg"], self.class_ids, self.num_dataset_classes
                )
            return results
        if not self.training:
            logits = to_dataset_classes(
                outputs["pred_logits"], self.class_ids, self.num_dataset_classes
            )
            return student.inference({**outputs, "pred_logits": logits}, batched_inputs, images)
        targets = student.prepare_targets(batched_inputs, images)
        batch = StepBatch(
            images=images,
            targets=targets,
            student=Prediction(features, outputs, student.mask_activation),
            teacher=None if self.teacher is None else self.teacher.predict(images),
            set_losses=lambda out, tgt: student.weighted_losses(student.criterion(out, tgt)),
        )
        if self.method is None:
            return batch.set_losses(outputs, targets)
        return self.method.losses(batch)

    def prepare_batch(self, batched_inputs: List[Dict]):
        """``(images, targets)`` of training inputs, as :meth:`forward` gives them to the method
        (the normalised, padded batch and the student's targets)."""
        images = self.student.preprocess_images(batched_inputs)
        return images, self.student.prepare_targets(batched_inputs, images)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, teacher={self.teacher!r}"


def build_continual_model(
    cfg,
    scenario,
    step: int,
    method: Optional[ContinualMethod] = None,
    previous_state: Optional[Dict[str, torch.Tensor]] = None,
) -> ContinualModel:
    """
    The model of ``step``: a student built from ``cfg`` (whose
    ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` is the classes seen up to the step, as the engine's step
    configuration sets it) with the method's classification loss, composed with the method and,
    when the method needs one, the teacher.

    Args:
        cfg: the step's config.
        scenario: the scenario.
        step: the step.
        method: the step's method; None: a model for inference (or fine-tuning).
        previous_state: the previous step's final state dict, the teacher's weights (needed
            when ``step > 0`` and ``method.needs_teacher``).

    The student is built before the teacher, so its fresh weights (the new classes' rows) do not
    depend on whether the method has a teacher.
    """
    seen = scenario.seen_classes(step)
    if cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES != len(seen):
        raise ValueError(
            f"step {step} of {scenario.task!r} predicts the {len(seen)} classes seen so far, but "
            f"MODEL.SEM_SEG_HEAD.NUM_CLASSES={cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES}: build the "
            "step's config with comformer.engine.step_config"
        )
    student = build_model(cfg)
    if method is not None:
        method.prepare_student(student)
    class_loss = method.class_loss() if method is not None else None
    if class_loss is not None:
        student.criterion = build_criterion(cfg, class_loss=class_loss).to(student.device)
    teacher = None
    if method is not None and method.needs_teacher and step > 0:
        if previous_state is None:
            raise ValueError(f"step {step} of {method!r} needs the previous step's weights")
        teacher = Teacher.from_checkpoint(cfg, previous_state, scenario.num_seen(step - 1))
    return ContinualModel(
        student,
        class_ids=seen,
        num_dataset_classes=scenario.num_classes,
        method=method,
        teacher=teacher,
    )
