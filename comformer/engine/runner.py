"""The scenario runner: a whole continual scenario (base step, then every increment) in one command.

Layout of ``OUTPUT_DIR``::

    scenario.json              the scenario and method; another scenario may not reuse the folder
    step<t>/                   detectron2's usual output of step t (checkpoints, metrics.json, log)
    step<t>/done.json          written last: the step is finished (it is skipped on the next run)
    step<t>/vis/               validation images with the step's predictions
    results.json, results.csv  one row per finished step: old / new / all PQ and mIoU, per class
    results.md, results.png    the steps x old/new/all table and its plot
"""

import json
import logging
import os
import time
from typing import Dict, List

from detectron2.data import MetadataCatalog
from detectron2.utils import comm

from ..continual import build_continual_model, build_method
from ..data.scenario import Scenario, build_scenario
from ..evaluation.split_evaluator import SplitEvaluator
from ..utils.io import AtomicDetectionCheckpointer, atomic_write_json, load_checkpoint_state
from .bases import base_signature
from .progress import ScenarioProgress
from .results import flatten_results, load_results, record_step, results_table, summary_line
from .step_config import step_config, step_dir, step_iterations, step_splits
from .step_trainer import StepTrainer, check_checkpoint_classes
from .trainer import Trainer
from .visualize import visualize_step

__all__ = ["run_scenario", "evaluate_step", "is_step_done"]

logger = logging.getLogger(__name__)


def evaluate_step(cfg, model, scenario: Scenario, step: int) -> Dict:
    """Old / new / all PQ and mIoU of the step's model on DATASETS.TEST[0], unseen classes void."""
    dataset = cfg.DATASETS.TEST[0]
    meta = MetadataCatalog.get(dataset)
    mf = cfg.MODEL.MASK_FORMER.TEST
    panoptic = mf.PANOPTIC_ON and meta.get("evaluator_type") == "coco_panoptic_seg"
    evaluator = SplitEvaluator(
        dataset,
        seen_classes=scenario.evaluated_classes(step),
        splits=step_splits(scenario, step),
        panoptic=panoptic,
        semantic=mf.SEMANTIC_ON,
        output_dir=os.path.join(cfg.OUTPUT_DIR, "inference"),
    )
    return Trainer.test(cfg, model, evaluators=[evaluator])


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
    to_run = [s for s in steps if eval_only or not is_step_done(cfg.OUTPUT_DIR, s)]
    adopts_base = bool(cfg.CONT.BASE_WEIGHTS) and not eval_only
    progress = ScenarioProgress(
        scenario,
        {
            s: 0 if eval_only or (s == 0 and adopts_base) else step_iterations(cfg, scenario, s)
            for s in to_run
        },
        title=f"{scenario.task} {cfg.CONT.METHOD}",
        class_names=MetadataCatalog.get(scenario.dataset).get("stuff_classes", None),
    )
    for step in steps:
        cfg_t = step_config(cfg, scenario, step)
        previous = (
            os.path.join(step_dir(cfg.OUTPUT_DIR, step - 1), "model_final.pth")
            if step > 0
            else None
        )
        if step not in to_run:
            progress.skip_step(step, cfg_t.OUTPUT_DIR)
            continue
        progress.start_step(step)
        started = time.perf_counter()
        os.makedirs(cfg_t.OUTPUT_DIR, exist_ok=True)
        skipped = None  # bad samples skipped in training (INPUT.SKIP_BAD_SAMPLES)
        if eval_only:
            model = build_continual_model(cfg_t, scenario, step)
            AtomicDetectionCheckpointer(model.student).load(
                os.path.join(cfg_t.OUTPUT_DIR, "model_final.pth")
            )
        elif step == 0 and cfg.CONT.BASE_WEIGHTS:
            model = _adopt_base_weights(cfg, cfg_t, cfg.CONT.BASE_WEIGHTS, scenario)
        else:
            trainer = StepTrainer(
                cfg_t, scenario, step, previous_weights=previous, progress=progress
            )
            trainer.resume_or_load(resume=resume)
            trainer.train()
            model = trainer.model
            skipped = sum(comm.all_gather(trainer.num_bad_samples))
        trained = time.perf_counter()
        results = evaluate_step(cfg_t, model, scenario, step)
        if comm.is_main_process():
            row = {
                "method": cfg.CONT.METHOD,
                "task": scenario.task,
                "step": step,
                "num_seen": scenario.num_seen(step),
                "num_new": len(scenario.steps[step]),
                "iterations": cfg_t.SOLVER.MAX_ITER,
                **flatten_results(results),
            }
            if cfg.INPUT.SKIP_BAD_SAMPLES and skipped is not None:
                row["bad_samples_skipped"] = skipped
            if step == 0:
                row["base_signature"] = base_signature(cfg)
            rows = record_step(cfg.OUTPUT_DIR, row, title)
            visualize_step(cfg_t, model, scenario, step, cfg.CONT.VIS_IMAGES)
            atomic_write_json(os.path.join(cfg_t.OUTPUT_DIR, "done.json"), row)
            logger.info("\n" + results_table(rows, title))
            now = time.perf_counter()
            progress.finish_step(step, trained - started, now - trained, summary_line(row))
        comm.synchronize()
    rows = load_results(cfg.OUTPUT_DIR)
    if comm.is_main_process():
        print("\n" + results_table(rows, title) + "\n")
        print(f"results: {os.path.join(cfg.OUTPUT_DIR, 'results.json')} (.csv, .md, .png)")
    return rows


def _adopt_base_weights(cfg, cfg_t, weights: str, scenario: Scenario):
    """
    Use a finished step-0 model (CONT.BASE_WEIGHTS) instead of training the base step. When the
    checkpoint's folder says how it was trained (the runner's ``done.json``), that must be how
    this run's method trains its base (:func:`~comformer.engine.bases.base_signature`).
    """
    done = os.path.join(os.path.dirname(os.path.abspath(weights)), "done.json")
    if os.path.isfile(done):
        with open(done) as f:
            found = json.load(f).get("base_signature")
        expected = base_signature(cfg)
        if found is not None and found != expected:
            raise ValueError(
                f"CONT.BASE_WEIGHTS={weights!r} is a base trained another way (signature "
                f"{found}) than method {cfg.CONT.METHOD!r} trains its base with this config "
                f"({expected}): e.g. CoMFormer's base uses softmax masks and the focal loss. Train "
                "this method's own base (leave CONT.BASE_WEIGHTS empty)"
            )
    state = load_checkpoint_state(weights)
    check_checkpoint_classes(state, scenario.num_seen(0), weights)
    model = build_continual_model(cfg_t, scenario, 0)
    model.student.load_state_dict(state)
    if comm.is_main_process():
        AtomicDetectionCheckpointer(model.student, save_dir=cfg_t.OUTPUT_DIR).save("model_final")
    comm.synchronize()
    return model
