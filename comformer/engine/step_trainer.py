"""The trainer of one step of a scenario."""

import logging
import os
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from detectron2.data.build import get_detection_dataset_dicts
from detectron2.engine import HookBase, hooks
from detectron2.utils import comm

from ..continual import (
    StepData,
    build_continual_model,
    build_method,
    class_embed,
    grow_classifier_state_dict,
)
from ..continual.classifier import CLASSIFIER_WEIGHT_KEYS
from ..data.mappers import build_train_mapper
from ..data.scenario import Scenario, register_step_dataset
from ..data.stream import TrainingStream, build_train_loader, derived_seed, seed_global_rngs
from ..modeling import classifier_extra_rows
from ..utils.io import load_checkpoint_state
from .progress import ProgressHook, ScenarioProgress
from .trainer import Trainer, _unwrap, build_optimizer

__all__ = ["StepTrainer", "FreezeOldClassesHook", "StepDataHook", "check_checkpoint_classes"]

logger = logging.getLogger(__name__)

# Third entry of the seed of a step's model initialisation, (SEED, step, _MODEL_INIT); the
# per-iteration seeds are (SEED, rank, iteration) with far smaller iterations.
_MODEL_INIT = 2**31 - 1


def check_checkpoint_classes(
    state: Dict[str, torch.Tensor], num_classes: int, path: str, extra_rows: int = 1
) -> None:
    """Raise a clear error unless the checkpoint ``path`` predicts ``num_classes`` classes with a
    classifier of ``num_classes + extra_rows`` rows (see ``comformer.continual.classifier``)."""
    keys = [k for k in CLASSIFIER_WEIGHT_KEYS if k in state]
    if not keys:
        raise KeyError(
            f"{path} has none of {list(CLASSIFIER_WEIGHT_KEYS)}: not a comformer / Mask2Former "
            "checkpoint"
        )
    found = state[keys[0]].shape[0] - extra_rows
    if found != num_classes:
        raise ValueError(
            f"{path} predicts {found} classes but the previous step of this scenario has "
            f"{num_classes}: the checkpoint belongs to another scenario or step (or to another "
            "head: MODEL.MASK_FORMER.PER_PIXEL)"
        )


class FreezeOldClassesHook(HookBase):
    """Keep the classifier rows of the old classes (and optionally the last, no-object row) exactly
    as loaded: restores them after every optimizer step (zeroing their gradients would not stop
    AdamW's weight decay). The rows are read when training starts, after the previous step's
    weights (or a checkpoint) are loaded."""

    def __init__(self, student: torch.nn.Module, num_old: int, no_object: bool = False):
        """
        Args:
            student: the trained ``MaskFormer``.
            num_old: the old classes, the classifier's first rows.
            no_object: keep the last row too.
        """
        self.num_old = num_old
        classifier = class_embed(student)
        self.params = [classifier.weight, classifier.bias]
        rows = list(range(num_old))
        if no_object:
            rows.append(classifier.weight.shape[0] - 1)
        self.rows = torch.as_tensor(rows, dtype=torch.long, device=classifier.weight.device)
        self.saved = None

    def before_train(self):
        self.saved = [p.detach()[self.rows].clone() for p in self.params]

    def after_step(self):
        with torch.no_grad():
            for p, saved in zip(self.params, self.saved):
                p[self.rows] = saved


class StepDataHook(HookBase):
    """
    Before training, lets the method read the step's training data once with the teacher
    (``ContinualMethod.before_step``, when the method ``needs_step_data``): this process's share of
    the step's training images, each once, mapped by the training mapper under generators seeded
    by ``(SEED, image index)`` (the training stream's rule, so a resumed run reads the same pixels),
    in batches of the training batch size, prepared by the continual model as in training.
    """

    def __init__(
        self, model, method, records: Sequence[dict], mapper, *, seed: int, batch_size: int
    ):
        """
        Args:
            model: the ``ContinualModel``.
            method: its method.
            records: the step's training records.
            mapper: the training mapper.
            seed: the training stream's seed.
            batch_size: images per batch of this process.
        """
        self.model = model
        self.method = method
        self.stream = TrainingStream(
            records,
            mapper,
            batch_size=batch_size,
            seed=seed,
            shuffle=False,
            rank=comm.get_rank(),
            world_size=comm.get_world_size(),
        )
        self.num_records = len(records)
        self.batch_size = batch_size

    def batches(self) -> Iterator:
        positions = range(self.stream.rank, self.num_records, self.stream.world_size)
        pending: List[dict] = []
        for position in positions:
            sample = self.stream.sample(position)
            if sample is not None:
                pending.append(sample)
            if len(pending) == self.batch_size:
                yield self.model.prepare_batch(pending)
                pending = []
        if pending:
            yield self.model.prepare_batch(pending)

    def before_train(self):
        teacher = self.model.teacher
        logger.info(f"{self.method!r}: reading the step's training images before training")
        self.method.before_step(
            StepData(batches=self.batches, teacher=None if teacher is None else teacher.predict)
        )


class StepTrainer(Trainer):
    """
    Trainer of one step: the step's dataset and label map, the continual model (student, method,
    teacher), and the previous step's weights carried into the grown classifier. Checkpoints and
    the optimizer hold the student alone.
    """

    def __init__(
        self,
        cfg,
        scenario: Scenario,
        step: int,
        previous_weights: Optional[str] = None,
        progress: Optional[ScenarioProgress] = None,
    ):
        """
        Args:
            cfg: the step's config (see ``comformer.engine.step_config``).
            scenario: the scenario.
            step: the step to train.
            previous_weights: the previous step's final checkpoint (required for step > 0).
            progress: the scenario's progress (its ETA in the progress lines), if any.
        """
        self.scenario = scenario
        self.step = step
        self.progress = progress
        self.previous_weights = previous_weights
        self.method = build_method(cfg, scenario, step)
        self._previous_state = None
        # An offline method (joint) trains the step's model anew: no previous weights.
        self.continues = step > 0 and not self.method.offline
        if self.continues:
            if not previous_weights or not os.path.isfile(previous_weights):
                raise FileNotFoundError(
                    f"step {step} of {scenario.task!r} starts from the previous step's final "
                    f"checkpoint, but {previous_weights!r} does not exist: run step {step - 1} first"
                )
            self._previous_state = load_checkpoint_state(previous_weights)
            check_checkpoint_classes(
                self._previous_state,
                scenario.num_seen(step - 1),
                previous_weights,
                classifier_extra_rows(cfg),
            )
        super().__init__(cfg)

    def build_model(self, cfg):
        if self.step > 0 and cfg.SEED >= 0:
            # The step's fresh weights (new class rows, prompts, a joint step's whole model) come
            # from (SEED, step), not from whatever the process drew before: a step run after the
            # previous one in the same process, in a new process (a resumed scenario, an adopted
            # base) or with other evaluation settings starts from the same model.
            seed_global_rngs(derived_seed(cfg.SEED, self.step, _MODEL_INIT))
        model = build_continual_model(
            cfg, self.scenario, self.step, self.method, previous_state=self._previous_state
        )
        logger.info(f"Step {self.step}: method {self.method}, teacher: {model.teacher}")
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model.student)

    @classmethod
    def checkpointed_module(cls, model: torch.nn.Module) -> torch.nn.Module:
        return _unwrap(model).student

    def build_train_loader(self, cfg):
        joint = self.method.trains_on_all_seen
        name = register_step_dataset(self.scenario, self.step, joint=joint)
        train_classes = self.scenario.seen_classes(self.step) if joint else None
        mapper = build_train_mapper(
            cfg, name, label_map=self.scenario.label_map(self.step, train_classes)
        )
        dataset = get_detection_dataset_dicts([name], filter_empty=False)
        self._step_records, self._step_mapper = dataset, mapper
        return build_train_loader(cfg, dataset, mapper)

    def build_progress_hook(self) -> ProgressHook:
        label = (
            f"[{self.progress.title}] step {self.step}" if self.progress else f"step {self.step}"
        )
        return ProgressHook(self.max_iter, label=label, scenario=self.progress, step=self.step)

    def build_hooks(self):
        # Evaluation happens once per step in the runner, with the split evaluator.
        result = [h for h in super().build_hooks() if not isinstance(h, hooks.EvalHook)]
        keeps_old = self.cfg.CONT.FREEZE_OLD_CLASSIFIER or self.method.keeps_old_classifier
        if self.continues and keeps_old:
            result.insert(
                0,
                FreezeOldClassesHook(
                    _unwrap(self.model).student,
                    self.scenario.num_seen(self.step - 1),
                    no_object=self.method.keeps_no_object_row,
                ),
            )
        if self.method.needs_step_data:
            result.insert(
                0,
                StepDataHook(
                    _unwrap(self.model),
                    self.method,
                    self._step_records,
                    self._step_mapper,
                    seed=self._stream.seed,
                    batch_size=self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size(),
                ),
            )
        return result

    def resume_or_load(self, resume: bool = True):
        """Resume this step from its last checkpoint (``resume`` and one exists); otherwise start
        the step: step 0 (and every step of an offline method) from MODEL.WEIGHTS, later steps
        from the previous step's weights with the classifier grown and the new classes
        initialised by the method."""
        if resume and self.checkpointer.has_checkpoint():
            super().resume_or_load(resume=True)
            return
        if not self.continues:
            super().resume_or_load(resume=False)  # MODEL.WEIGHTS, as the base step
            return
        student = _unwrap(self.model).student
        state = grow_classifier_state_dict(
            self._previous_state,
            student.state_dict(),
            self.scenario.num_seen(self.step - 1),
            classifier_extra_rows(self.cfg),
            added_keys=self.method.added_state_keys(student),
        )
        student.load_state_dict(state)
        self.method.init_new_classes(class_embed(student))
        self.method.init_new_step(student)
        self.start_iter = 0
