"""The step runner: a whole continual scenario (base step, then every increment) in one command.

Layout of ``OUTPUT_DIR``::

    scenario.json              the scenario and method; another scenario may not reuse the folder
    step<t>/                   detectron2's usual output of step t (checkpoints, metrics.json, log)
    step<t>/done.json          written last: the step is finished (it is skipped on the next run)
    step<t>/vis/               validation images with the step's predictions
    results.json, results.csv  one row per finished step: old / new / all PQ and mIoU, per class
    results.md, results.png    the steps x old/new/all table and its plot
"""

import csv
import json
import logging
import math
import os
from typing import Dict, List, Optional

import numpy as np
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.build import get_detection_dataset_dicts
from detectron2.engine import hooks
from detectron2.modeling import build_model
from detectron2.utils import comm

from ..continual import FreezeOldClassesHook, build_method, grow_classifier_state_dict
from ..data.mappers import build_train_mapper
from ..data.scenario import Scenario, build_scenario, register_step_dataset
from ..evaluation.continual import ContinualEvaluator
from ..utils.io import (
    AtomicDetectionCheckpointer,
    atomic_write_json,
    atomic_write_text,
    load_checkpoint_state,
)
from .trainer import Trainer, build_train_loader

__all__ = [
    "ContinualTrainer",
    "step_config",
    "step_splits",
    "run_scenario",
    "load_results",
    "results_table",
]

logger = logging.getLogger(__name__)

# Columns of the per-step table: (results key, header).
TABLE_COLUMNS = (
    ("PQ_old", "PQ old"),
    ("PQ_new", "PQ new"),
    ("PQ_all", "PQ all"),
    ("mIoU_old", "mIoU old"),
    ("mIoU_new", "mIoU new"),
    ("mIoU_all", "mIoU all"),
)


def step_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"step{step}")


def step_iterations(cfg, scenario: Scenario, step: int) -> int:
    """Iterations of ``step``: SOLVER.MAX_ITER for the base step; for increments CONT.INC_ITERS_PER_CLASS
    x new classes, else CONT.INC_MAX_ITER, else SOLVER.MAX_ITER."""
    if step == 0:
        return cfg.SOLVER.MAX_ITER
    if cfg.CONT.INC_ITERS_PER_CLASS > 0:
        return cfg.CONT.INC_ITERS_PER_CLASS * len(scenario.steps[step])
    if cfg.CONT.INC_MAX_ITER > 0:
        return cfg.CONT.INC_MAX_ITER
    return cfg.SOLVER.MAX_ITER


def step_config(cfg, scenario: Scenario, step: int):
    """The frozen config of one step: its folder, iterations, learning rate."""
    out = cfg.clone()
    out.defrost()
    out.CONT.STEP = scenario.check_step(step)
    out.OUTPUT_DIR = step_dir(cfg.OUTPUT_DIR, step)
    out.SOLVER.MAX_ITER = step_iterations(cfg, scenario, step)
    out.SOLVER.WARMUP_ITERS = min(out.SOLVER.WARMUP_ITERS, out.SOLVER.MAX_ITER // 10)
    if step > 0:
        if cfg.CONT.INC_BASE_LR > 0:
            out.SOLVER.BASE_LR = cfg.CONT.INC_BASE_LR
        out.MODEL.WEIGHTS = ""  # the previous step's weights are loaded by the trainer
    # The runner evaluates once per step with the continual evaluator.
    out.TEST.EVAL_PERIOD = 0
    out.freeze()
    return out


def step_splits(scenario: Scenario, step: int) -> Dict[str, List[int]]:
    """Class groups reported after ``step``: old (base step), new (all later steps), each step."""
    splits = {"old": list(scenario.steps[0])}
    if step > 0:
        splits["new"] = [c for s in scenario.steps[1 : step + 1] for c in s]
    for i in range(step + 1):
        splits[f"step{i}"] = list(scenario.steps[i])
    return splits


class ContinualTrainer(Trainer):
    """
    Trainer of one step: the step's dataset and label map, the method's losses, the teacher, and
    the previous step's weights carried into the grown classifier.
    """

    def __init__(self, cfg, scenario: Scenario, step: int, previous_weights: Optional[str] = None):
        """
        Args:
            cfg: the step's config (see ``step_config``).
            scenario: the scenario.
            step: the step to train.
            previous_weights: the previous step's final checkpoint (required for step > 0).
        """
        self.scenario = scenario
        self.step = step
        self.previous_weights = previous_weights
        self.method = build_method(cfg, scenario, step)
        if step > 0:
            if not previous_weights or not os.path.isfile(previous_weights):
                raise FileNotFoundError(
                    f"step {step} of {scenario.task!r} starts from the previous step's final "
                    f"checkpoint, but {previous_weights!r} does not exist: run step {step - 1} first"
                )
            self._previous_state = load_checkpoint_state(previous_weights)
            _check_classes(self._previous_state, scenario.num_seen(step - 1), previous_weights)
        super().__init__(cfg)

    def build_model(self, cfg):
        model = build_model(cfg)
        self.method.configure_model(model)  # e.g. the method's own classification loss
        teacher = None
        if self.step > 0 and self.method.needs_teacher:
            teacher_cfg = cfg.clone()
            teacher_cfg.defrost()
            teacher_cfg.CONT.STEP = self.step - 1
            teacher = build_model(teacher_cfg)
            teacher.load_state_dict(self._previous_state)
        model.set_continual(self.method, teacher)
        logger.info(f"Step {self.step}: method {self.method}, teacher: {teacher is not None}")
        return model

    def build_train_loader(self, cfg):
        joint = self.method.trains_on_all_seen
        name = register_step_dataset(self.scenario, self.step, joint=joint)
        train_classes = self.scenario.seen_classes(self.step) if joint else None
        mapper = build_train_mapper(
            cfg, name, label_map=self.scenario.label_map(self.step, train_classes)
        )
        dataset = get_detection_dataset_dicts([name], filter_empty=False)
        return build_train_loader(cfg, dataset, mapper)

    def build_hooks(self):
        # Evaluation happens once per step in the runner, with the continual evaluator.
        result = [h for h in super().build_hooks() if not isinstance(h, hooks.EvalHook)]
        if self.step > 0 and self.cfg.CONT.FREEZE_OLD_CLASSIFIER:
            result.insert(
                0, FreezeOldClassesHook(self.model, self.scenario.num_seen(self.step - 1))
            )
        return result

    def resume_or_load(self, resume: bool = True):
        """Resume this step from its last checkpoint (``resume`` and one exists); otherwise start
        the step: step 0 from MODEL.WEIGHTS, later steps from the previous step's weights with the
        classifier grown and the new classes initialised by the method."""
        if resume and self.checkpointer.has_checkpoint():
            super().resume_or_load(resume=True)
            return
        if self.step == 0:
            super().resume_or_load(resume=False)
            return
        model = _unwrap(self.model)
        state = grow_classifier_state_dict(
            self._previous_state, model.state_dict(), self.scenario.num_seen(self.step - 1)
        )
        model.load_state_dict(state)
        self.method.init_new_classes(model)
        self.start_iter = 0


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _check_classes(state: Dict[str, torch.Tensor], num_classes: int, path: str) -> None:
    key = "sem_seg_head.predictor.class_embed.weight"
    if key not in state:
        raise KeyError(f"{path} has no {key}: not a comformer / Mask2Former checkpoint")
    found = state[key].shape[0] - 1
    if found != num_classes:
        raise ValueError(
            f"{path} predicts {found} classes but the previous step of this scenario has "
            f"{num_classes}: the checkpoint belongs to another scenario or step"
        )


# ----------------------------------------------------------------------------- evaluation
def evaluate_step(cfg, model, scenario: Scenario, step: int) -> Dict:
    """Old / new / all PQ and mIoU of the step's model on DATASETS.TEST[0], unseen classes void."""
    dataset = cfg.DATASETS.TEST[0]
    meta = MetadataCatalog.get(dataset)
    mf = cfg.MODEL.MASK_FORMER.TEST
    panoptic = mf.PANOPTIC_ON and meta.get("evaluator_type") == "coco_panoptic_seg"
    evaluator = ContinualEvaluator(
        dataset,
        seen_classes=scenario.seen_classes(step),
        splits=step_splits(scenario, step),
        panoptic=panoptic,
        semantic=mf.SEMANTIC_ON,
        output_dir=os.path.join(cfg.OUTPUT_DIR, "inference"),
    )
    return Trainer.test(cfg, model, evaluators=[evaluator])


def _flatten(results: Dict) -> Dict[str, float]:
    """{"panoptic_seg": {"PQ": ..}, "sem_seg": {"mIoU": ..}} -> PQ_all, PQ_old, mIoU_all, ..."""
    flat = {}
    pan = results.get("panoptic_seg", {})
    sem = results.get("sem_seg", {})
    for key, value in pan.items():
        flat["PQ_all" if key == "PQ" else key] = value
    for key, value in sem.items():
        flat["mIoU_all" if key == "mIoU" else key] = value
    return {k: float(v) for k, v in flat.items()}


def visualize_step(cfg, model, scenario: Scenario, step: int, num_images: int) -> List[str]:
    """Draw the step's predictions on the first ``num_images`` validation images."""
    if num_images <= 0:
        return []
    from detectron2.data import detection_utils as utils
    from detectron2.data.catalog import Metadata
    from detectron2.utils.visualizer import ColorMode, Visualizer

    dataset = cfg.DATASETS.TEST[0]
    meta = MetadataCatalog.get(dataset)
    # Mask2Former's convention: category ids index the full class list (stuff_classes), things too.
    vis_meta = Metadata(
        thing_classes=list(meta.stuff_classes),
        stuff_classes=list(meta.stuff_classes),
        thing_colors=list(meta.get("stuff_colors", [])) or None,
        stuff_colors=list(meta.get("stuff_colors", [])) or None,
    )
    out_dir = os.path.join(cfg.OUTPUT_DIR, "vis")
    os.makedirs(out_dir, exist_ok=True)
    records = DatasetCatalog.get(dataset)[:num_images]
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    written = []
    with torch.no_grad():
        for record in records:
            image = utils.read_image(record["file_name"], format=cfg.INPUT.FORMAT)
            tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
            pred = model([{"image": tensor, "height": image.shape[0], "width": image.shape[1]}])[0]
            vis = Visualizer(image, vis_meta, instance_mode=ColorMode.IMAGE)
            if "panoptic_seg" in pred:
                seg, info = pred["panoptic_seg"]
                drawn = vis.draw_panoptic_seg(seg.cpu(), info)
            else:
                drawn = vis.draw_sem_seg(pred["sem_seg"].argmax(0).cpu())
            name = os.path.splitext(os.path.basename(record["file_name"]))[0] + ".png"
            path = os.path.join(out_dir, name)
            drawn.save(path)
            written.append(path)
    model.train(was_training)
    return written


# -------------------------------------------------------------------------------- results
def load_results(output_dir: str) -> List[Dict]:
    path = os.path.join(output_dir, "results.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)


def _fmt(value) -> str:
    return (
        "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"
    )


def results_table(rows: List[Dict], title: str = "") -> str:
    """Markdown table: one line per step, old / new / all PQ and mIoU (columns absent are left out)."""
    columns = [(k, h) for k, h in TABLE_COLUMNS if any(k in r for r in rows)]
    lines = [f"### {title}", ""] if title else []
    lines.append("| method | step | classes | " + " | ".join(h for _, h in columns) + " |")
    lines.append("|---|---:|---:|" + "---:|" * len(columns))
    for r in rows:
        values = " | ".join(_fmt(r.get(k)) for k, _ in columns)
        lines.append(f"| {r['method']} | {r['step']} | {r['num_seen']} | {values} |")
    return "\n".join(lines)


def _write_csv(path: str, rows: List[Dict]) -> None:
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys and not isinstance(r[k], (dict, list))]
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def plot_results(path: str, rows: List[Dict], title: str) -> None:
    """PQ and mIoU (old / new / all) per step, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    steps = [r["step"] for r in rows]
    for ax, metric in zip(axes, ("PQ", "mIoU")):
        for part, style in (("all", "-o"), ("old", "--s"), ("new", ":^")):
            key = f"{metric}_{part}"
            values = [r.get(key, float("nan")) for r in rows]
            if all(v is None or math.isnan(v) for v in values):
                continue
            ax.plot(steps, values, style, label=part)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.set_xticks(steps)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def record_step(output_dir: str, row: Dict, title: str) -> List[Dict]:
    """Add (or replace) the row of a step in results.json/csv and rewrite the table and plot."""
    rows = [r for r in load_results(output_dir) if r["step"] != row["step"]] + [row]
    rows.sort(key=lambda r: r["step"])
    atomic_write_json(os.path.join(output_dir, "results.json"), rows)
    _write_csv(os.path.join(output_dir, "results.csv"), rows)
    atomic_write_text(os.path.join(output_dir, "results.md"), results_table(rows, title) + "\n")
    plot_results(os.path.join(output_dir, "results.png"), rows, title)
    return rows


# --------------------------------------------------------------------------------- runner
def _check_output_dir(cfg, scenario: Scenario) -> None:
    """The folder may only hold steps of the same scenario and method."""
    path = os.path.join(cfg.OUTPUT_DIR, "scenario.json")
    identity = {**scenario.signature(), "method": cfg.CONT.METHOD}
    if os.path.isfile(path):
        with open(path) as f:
            found = json.load(f)
        if found != identity:
            raise ValueError(
                f"OUTPUT_DIR={cfg.OUTPUT_DIR!r} holds the steps of another run "
                f"({found.get('task')!r}, method {found.get('method')!r}, mode {found.get('mode')!r}); "
                f"this run is {identity['task']!r}, method {identity['method']!r}, mode "
                f"{identity['mode']!r}: choose another OUTPUT_DIR"
            )
    elif comm.is_main_process():
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        atomic_write_json(path, identity)
    comm.synchronize()


def is_step_done(output_dir: str, step: int) -> bool:
    return os.path.isfile(os.path.join(step_dir(output_dir, step), "done.json"))


def run_scenario(cfg, resume: bool = False, eval_only: bool = False) -> List[Dict]:
    """
    Run the steps of the config's scenario (CONT.STEP, or all of them), each in OUTPUT_DIR/step<t>.

    Args:
        cfg: the (frozen) scenario config.
        resume: continue a half-finished step from its last checkpoint.
        eval_only: evaluate finished steps again instead of training.

    Returns:
        the rows of results.json.
    """
    scenario = build_scenario(cfg)
    if scenario is None:
        raise ValueError("run_scenario needs a continual config (CONT.TASK or CONT.STEP_CLASSES)")
    build_method(cfg, scenario, 0)  # unknown methods fail before anything runs
    _check_output_dir(cfg, scenario)
    title = f"{scenario.dataset} {scenario.task} ({scenario.mode}), method {cfg.CONT.METHOD}"
    steps = [cfg.CONT.STEP] if cfg.CONT.STEP >= 0 else list(range(scenario.num_steps))
    for step in steps:
        cfg_t = step_config(cfg, scenario, step)
        previous = (
            os.path.join(step_dir(cfg.OUTPUT_DIR, step - 1), "model_final.pth")
            if step > 0
            else None
        )
        if is_step_done(cfg.OUTPUT_DIR, step) and not eval_only:
            logger.info(f"Step {step} of {scenario.task} is finished ({cfg_t.OUTPUT_DIR}); skipped")
            continue
        os.makedirs(cfg_t.OUTPUT_DIR, exist_ok=True)
        skipped = None  # bad samples skipped in training (INPUT.SKIP_BAD_SAMPLES)
        if eval_only:
            model = build_model(cfg_t)
            AtomicDetectionCheckpointer(model).load(
                os.path.join(cfg_t.OUTPUT_DIR, "model_final.pth")
            )
        elif step == 0 and cfg.CONT.BASE_WEIGHTS:
            model = _adopt_base_weights(cfg_t, cfg.CONT.BASE_WEIGHTS, scenario)
        else:
            trainer = ContinualTrainer(cfg_t, scenario, step, previous_weights=previous)
            trainer.resume_or_load(resume=resume)
            trainer.train()
            model = trainer.model
            skipped = sum(comm.all_gather(trainer.num_bad_samples))
        results = evaluate_step(cfg_t, model, scenario, step)
        if comm.is_main_process():
            row = {
                "method": cfg.CONT.METHOD,
                "task": scenario.task,
                "step": step,
                "num_seen": scenario.num_seen(step),
                "num_new": len(scenario.steps[step]),
                "iterations": cfg_t.SOLVER.MAX_ITER,
                **_flatten(results),
            }
            if cfg.INPUT.SKIP_BAD_SAMPLES and skipped is not None:
                row["bad_samples_skipped"] = skipped
            rows = record_step(cfg.OUTPUT_DIR, row, title)
            visualize_step(cfg_t, model, scenario, step, cfg.CONT.VIS_IMAGES)
            atomic_write_json(os.path.join(cfg_t.OUTPUT_DIR, "done.json"), row)
            logger.info("\n" + results_table(rows, title))
        comm.synchronize()
    rows = load_results(cfg.OUTPUT_DIR)
    if comm.is_main_process():
        print("\n" + results_table(rows, title) + "\n")
        print(f"results: {os.path.join(cfg.OUTPUT_DIR, 'results.json')} (.csv, .md, .png)")
    return rows


def _adopt_base_weights(cfg_t, weights: str, scenario: Scenario):
    """Use a finished step-0 model (CONT.BASE_WEIGHTS) instead of training the base step."""
    state = load_checkpoint_state(weights)
    _check_classes(state, scenario.num_seen(0), weights)
    model = build_model(cfg_t)
    model.load_state_dict(state)
    if comm.is_main_process():
        AtomicDetectionCheckpointer(model, save_dir=cfg_t.OUTPUT_DIR).save("model_final")
    comm.synchronize()
    return model
