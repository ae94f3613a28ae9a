"""The continual-method interface and registry.

A method decides, for one step of a scenario:

* how the student's classification loss differs from Mask2Former's (:meth:`ContinualMethod.class_loss`);
* how the classifier rows of the new classes start (:meth:`ContinualMethod.init_new_classes`);
* which classes the step's targets keep (:attr:`ContinualMethod.trains_on_all_seen`);
* whether the step continues from the previous step's model or trains a new one from the base
  step's starting point and schedule (:attr:`ContinualMethod.offline`);
* whether it needs the previous step's model (:attr:`ContinualMethod.needs_teacher`);
* what it learns from the step's training data before the step starts
  (:meth:`ContinualMethod.before_step`, run when :attr:`ContinualMethod.needs_step_data`: one pass
  over the step's training images with the teacher, e.g. PLOP's entropy thresholds);
* the training losses of a batch (:meth:`ContinualMethod.losses`), from a :class:`StepBatch`: the
  batch's images and targets, the student's and the teacher's predictions, and the student's
  matched set losses. This is all a method reads of a batch.

A method that changes what the step trains rather than how (ECLIPSE: the model trained before is
frozen, the step adds parameters of its own) also uses the hooks below, each a no-op by default:
:meth:`~ContinualMethod.step_config_overrides` (config values of its increments),
:meth:`~ContinualMethod.prepare_student` (freezing, once the student is built),
:meth:`~ContinualMethod.added_state_keys` and :meth:`~ContinualMethod.init_new_step` (parameters
the step adds to the previous step's, and their initialisation), and
:attr:`~ContinualMethod.keeps_old_classifier` / :attr:`~ContinualMethod.keeps_no_object_row`.

Shapes follow ``comformer.modeling``: B images, Q queries, K classes (logits have K+1 entries,
no-object last), h w the mask-prediction size. A per-pixel student (``MODEL.MASK_FORMER.PER_PIXEL``,
``comformer.modeling.per_pixel``) predicts C channels per pixel instead: the K classes, plus a last
no-object channel on datasets without a background class (:attr:`ContinualMethod.per_pixel`,
:attr:`ContinualMethod.background_channel`).
"""

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

from torch import Tensor, nn

from detectron2.structures import ImageList
from detectron2.utils.registry import Registry

from ..modeling.criterion import ClassLoss
from ..modeling.per_pixel import PixelLoss

__all__ = [
    "METHOD_REGISTRY",
    "ContinualMethod",
    "Prediction",
    "StepBatch",
    "StepData",
    "build_method",
]

METHOD_REGISTRY = Registry("CONTINUAL_METHOD")
METHOD_REGISTRY.__doc__ = """
Continual methods. A member is a ``ContinualMethod`` subclass constructed as
``Method(cfg, scenario, step)``; ``CONT.METHOD`` names it case-insensitively (``FT`` is "ft").
"""


@dataclass
class Prediction:
    """
    One model's view of a batch.

    Attributes:
        features: the backbone's feature maps by name ("res2" .. "res5"), (B, C, H_f, W_f).
        outputs: the head's prediction dict: "pred_logits" (B, Q, K+1), "pred_masks"
            (B, Q, h, w), "aux_outputs" (one such dict per auxiliary decoder layer) and
            "mask_features" (B, C, h, w), the pixel decoder's per-pixel embeddings. A per-pixel
            model's: "sem_logits" (B, C, h, w) and "mask_features".
        mask_activation: how the model normalises masks: "sigmoid" or "softmax" (across queries;
            a per-pixel model's is its config's, unused).
    """

    features: Dict[str, Tensor]
    outputs: Dict
    mask_activation: str


@dataclass
class StepBatch:
    """
    What a method's :meth:`~ContinualMethod.losses` may read of one training batch.

    Attributes:
        images: the normalised, padded batch (``images.tensor`` (B, 3, H, W)).
        targets: per image {"labels" (N_b,) int64 model indices, "masks" (N_b, H, W)} of the
            step's ground truth; for a per-pixel student one dict {"sem_seg": (B, H, W) int64},
            each pixel's channel index or the ignore value (see
            :class:`~comformer.modeling.per_pixel.PerPixelCriterion`, which also reads an optional
            "pixel_weight").
        student: the student's predictions (with autograd).
        teacher: the frozen previous-step model's predictions (no autograd; its logits have
            K_old+1 entries, a per-pixel teacher's K_old (+1) channels), or None when the method
            needs no teacher or at step 0.
        set_losses: ``set_losses(outputs, targets)``: the student's Hungarian-matched losses of
            a prediction dict against targets, already weighted (Mask2Former's class, mask and dice
            losses, deep supervision included; the class loss is the method's :meth:`class_loss`);
            for a per-pixel student its per-pixel classification loss ``loss_ce``.
    """

    images: ImageList
    targets: Union[List[Dict[str, Tensor]], Dict[str, Tensor]]
    student: Prediction
    teacher: Optional[Prediction]
    set_losses: Callable[[Dict, List[Dict[str, Tensor]]], Dict[str, Tensor]]


@dataclass
class StepData:
    """
    What a method's :meth:`~ContinualMethod.before_step` may read: the step's training data, once,
    and the teacher.

    Attributes:
        batches: a callable returning an iterable over this process's share of the step's
            training images, each image once, as ``(images, targets)`` pairs prepared as in
            :class:`StepBatch` (the training mapper's augmentation, seeded per image, so a rerun
            reads the same pixels). In distributed training each process reads its share: reduce
            what is counted over processes.
        teacher: ``teacher(images) -> Prediction`` the previous step's model, without autograd;
            None at step 0.
    """

    batches: Callable[[], Iterable[Tuple[ImageList, Any]]]
    teacher: Optional[Callable[[ImageList], Prediction]]


class ContinualMethod:
    """
    The interface of a continual method, and fine-tuning's behaviour: the step's classes with the
    ordinary Mask2Former losses, no teacher. Subclasses override the attributes and methods below.
    """

    # Whether the step needs the previous step's model at training time.
    needs_teacher: bool = False
    # Whether targets keep every class seen so far (joint training) or only the step's classes.
    trains_on_all_seen: bool = False
    # Whether the step trains a new model from MODEL.WEIGHTS with the base step's schedule
    # (SOLVER.MAX_ITER, SOLVER.BASE_LR) instead of continuing from the previous step's model.
    offline: bool = False
    # Whether the method reasons about where old classes hide in the step's images (unbiased
    # losses, distillation, pseudo-labels). On a dataset with a background class, a mask
    # classification model must then treat the background as no-object (CONT.BACKGROUND), so that
    # old-class pixels are unlabelled rather than labelled background.
    reasons_about_old_classes: bool = False
    # Whether :meth:`before_step` must run (a pass over the step's training data before training).
    needs_step_data: bool = False
    # Whether the old classes' classifier rows stay exactly as loaded in increments (restored after
    # every optimizer step, as CONT.FREEZE_OLD_CLASSIFIER does), and whether the no-object row does
    # too.
    keeps_old_classifier: bool = False
    keeps_no_object_row: bool = False

    def __init__(self, cfg, scenario, step: int):
        """
        Args:
            cfg: the step's config.
            scenario: the ``Scenario`` being run.
            step: the step trained with this method.
        """
        self.cfg = cfg
        self.scenario = scenario
        self.step = step
        self.num_old = scenario.num_seen(step - 1) if step > 0 else 0
        self.num_new = len(scenario.steps[step])
        # The student's head: per-pixel classifier or mask classification.
        self.per_pixel = bool(cfg.MODEL.MASK_FORMER.PER_PIXEL)
        if self.reasons_about_old_classes and scenario.has_bg_class and not self.per_pixel:
            raise ValueError(
                f"CONT.METHOD={cfg.CONT.METHOD!r} on {scenario.dataset!r}, whose background class "
                "is a class of this mask classification model (CONT.BACKGROUND "
                f"{cfg.CONT.BACKGROUND!r}): old classes would be labelled background, where the "
                "method's unbiased losses and pseudo-labels cannot reach them. Use CONT.BACKGROUND "
                "'auto' or 'no-object' (CoMFormer's convention), or a per-pixel head "
                "(MODEL.MASK_FORMER.PER_PIXEL, MiB's convention)"
            )

    @property
    def background_channel(self) -> int:
        """
        The per-pixel student's background channel, what MiB and PLOP call the background: the
        dataset's background class (its model index, a class of step 0, so an old class from
        step 1 on) when it has one, else the no-object channel (the last, ``num_old + num_new``),
        which stands for the unlabelled pixels and the classes of other steps.
        """
        if self.scenario.has_bg_class:
            return self.scenario.order.index(self.scenario.background)
        return self.num_old + self.num_new

    @property
    def background_row(self) -> int:
        """The background's classifier row for :meth:`init_new_classes`: the per-pixel student's
        background class, or -1, the last row (no-object)."""
        if self.per_pixel and self.scenario.has_bg_class:
            return self.background_channel
        return -1

    def class_loss(self) -> Optional[Union[ClassLoss, PixelLoss]]:
        """The student's classification loss: for mask classification
        ``f(logits, target_classes, class_weight)`` (see
        :class:`~comformer.modeling.criterion.SetCriterion`), for a per-pixel student a
        :data:`~comformer.modeling.per_pixel.PixelLoss`; None: the model's own."""
        return None

    def init_new_classes(self, class_embed: nn.Module) -> None:
        """
        Initialise the classifier rows of the new classes, in place, after the old weights were
        loaded. ``class_embed`` (an ``nn.Linear``, or the per-pixel head's 1x1 ``nn.Conv2d``) has
        one output per row of its ``weight`` and ``bias``: ``num_old + num_new + 1`` laid out
        [old, new, no-object], or for a per-pixel student on a dataset with a background class
        ``num_old + num_new``. Default: keep the fresh random initialisation.
        """

    def before_step(self, data: StepData) -> None:
        """
        Learn what the method needs from the step's training data before training (called once
        per run of a step, resumed runs included, when :attr:`needs_step_data`). Default: nothing.
        """

    def losses(self, batch: StepBatch) -> Dict[str, Tensor]:
        """Weighted training losses of one batch (summed by the trainer)."""
        return batch.set_losses(batch.student.outputs, batch.targets)

    def step_config_overrides(self) -> Dict[str, Any]:
        """Config values of an increment (step > 0, not offline) that the method sets, e.g.
        ``{"SOLVER.MAX_ITER": 16000}``; applied by the step configuration after its own. Default:
        none."""
        return {}

    def prepare_student(self, student: nn.Module) -> None:
        """Called once when the step's student is built, before its weights are loaded and the
        optimizer is built (e.g. to set ``requires_grad``). Default: nothing."""

    def added_state_keys(self, student: nn.Module) -> List[str]:
        """State-dict keys of the student that the previous step's model does not have (parameters
        this step adds); they keep the student's initialisation until :meth:`init_new_step`.
        Default: none."""
        return []

    def init_new_step(self, student: nn.Module) -> None:
        """Initialise what the step adds, in place, after the previous step's weights were loaded
        and :meth:`init_new_classes` ran (not when a step resumes from its own checkpoint).
        Default: nothing."""

    def base_key(self) -> str:
        """
        What sets this method's base step (step 0) apart from fine-tuning's, as a string: methods
        with equal keys (and equal model configs) train the same base model and may share it.
        Default: the classification loss; a method whose step 0 differs otherwise overrides it.
        """
        return repr(self.class_loss())

    def extra_repr(self) -> str:
        return f"step={self.step}, old={self.num_old}, new={self.num_new}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


def build_method(cfg, scenario, step: int) -> ContinualMethod:
    """The method named by ``cfg.CONT.METHOD`` for ``step`` of ``scenario``."""
    by_lower = {name.lower(): name for name, _ in METHOD_REGISTRY}
    name = by_lower.get(cfg.CONT.METHOD.lower())
    if name is None:
        raise KeyError(
            f"CONT.METHOD={cfg.CONT.METHOD!r} is not a registered method; valid: "
            f"{', '.join(sorted(by_lower))}"
        )
    return METHOD_REGISTRY.get(name)(cfg, scenario, step)
