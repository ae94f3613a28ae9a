"""The configuration of one step of a scenario: its folder, model size, iterations and learning
rate, and the class groups its results are reported on."""

import os
from typing import Dict, List, Tuple

from ..continual import build_method
from ..data.scenario import Scenario

__all__ = ["step_dir", "step_iterations", "increment_lr_steps", "step_config", "step_splits"]


def step_dir(output_dir: str, step: int) -> str:
    """``OUTPUT_DIR/step<t>``: the folder of step ``t``."""
    return os.path.join(output_dir, f"step{step}")


def _trains_offline(cfg, scenario: Scenario, step: int) -> bool:
    """Whether the step trains like the base step: step 0, or a method that trains every step's
    model anew (the joint upper bound)."""
    return step == 0 or build_method(cfg, scenario, step).offline


def step_iterations(cfg, scenario: Scenario, step: int) -> int:
    """Iterations of ``step``: SOLVER.MAX_ITER for the base step (and every step of an offline
    method such as ``joint``); for increments the method's own (``step_config_overrides``, e.g.
    ECLIPSE's per-setting iterations), else CONT.INC_ITERS_PER_CLASS x new classes, else
    CONT.INC_MAX_ITER, else SOLVER.MAX_ITER."""
    if _trains_offline(cfg, scenario, step):
        return cfg.SOLVER.MAX_ITER
    method_iters = build_method(cfg, scenario, step).step_config_overrides().get("SOLVER.MAX_ITER")
    if method_iters is not None:
        return int(method_iters)
    if cfg.CONT.INC_ITERS_PER_CLASS > 0:
        return cfg.CONT.INC_ITERS_PER_CLASS * len(scenario.steps[step])
    if cfg.CONT.INC_MAX_ITER > 0:
        return cfg.CONT.INC_MAX_ITER
    return cfg.SOLVER.MAX_ITER


def increment_lr_steps(cfg, iterations: int) -> Tuple[int, ...]:
    """
    SOLVER.STEPS of an increment of ``iterations`` iterations. SOLVER.STEPS counts the base
    step's iterations; an increment places its milestones at the same fractions of its own length
    (CONT.INC_LR_STEPS None), at the fractions CONT.INC_LR_STEPS lists, or nowhere (``[]``).
    Milestones the base never reaches (beyond SOLVER.MAX_ITER) stay unreached.
    """
    fractions = cfg.CONT.INC_LR_STEPS
    if fractions is None:
        base = cfg.SOLVER.MAX_ITER
        fractions = [s / base for s in cfg.SOLVER.STEPS if s < base]
    else:
        bad = [f for f in fractions if not (isinstance(f, (int, float)) and 0 < f < 1)]
        if bad:
            raise ValueError(
                f"CONT.INC_LR_STEPS={list(fractions)}: fractions of the increment's iterations "
                f"must lie in (0, 1) (bad: {bad}); [] keeps the rate constant, None scales "
                "SOLVER.STEPS"
            )
    return tuple(sorted(max(1, round(f * iterations)) for f in fractions))


def step_config(cfg, scenario: Scenario, step: int):
    """
    The frozen config of one step: its folder, the classifier size (the classes seen so far,
    ``MODEL.SEM_SEG_HEAD.NUM_CLASSES``), iterations and learning rate. An increment continues from
    the previous step (no MODEL.WEIGHTS, CONT.INC_BASE_LR, milestones by
    :func:`increment_lr_steps`); the base step and every step of an
    offline method start from MODEL.WEIGHTS with the base schedule.
    """
    out = cfg.clone()
    out.defrost()
    out.CONT.STEP = scenario.check_step(step)
    out.OUTPUT_DIR = step_dir(cfg.OUTPUT_DIR, step)
    out.MODEL.SEM_SEG_HEAD.NUM_CLASSES = scenario.num_seen(step)
    if scenario.background >= 0 and not scenario.background_is_class:
        # the model has no background class: uncovered pixels are background
        out.MODEL.MASK_FORMER.TEST.SEMANTIC_BACKGROUND_CLASS = scenario.background
    out.SOLVER.MAX_ITER = step_iterations(cfg, scenario, step)
    out.SOLVER.WARMUP_ITERS = min(out.SOLVER.WARMUP_ITERS, out.SOLVER.MAX_ITER // 10)
    if not _trains_offline(cfg, scenario, step):
        if cfg.CONT.INC_BASE_LR > 0:
            out.SOLVER.BASE_LR = cfg.CONT.INC_BASE_LR
        out.MODEL.WEIGHTS = ""  # the previous step's weights are loaded by the trainer
        overrides = build_method(cfg, scenario, step).step_config_overrides()
        if overrides:
            out.merge_from_list([x for kv in overrides.items() for x in kv])
            out.SOLVER.WARMUP_ITERS = min(out.SOLVER.WARMUP_ITERS, out.SOLVER.MAX_ITER // 10)
        out.SOLVER.STEPS = increment_lr_steps(cfg, out.SOLVER.MAX_ITER)
    # The runner evaluates once per step with the split evaluator.
    out.TEST.EVAL_PERIOD = 0
    out.freeze()
    return out


def step_splits(scenario: Scenario, step: int) -> Dict[str, List[int]]:
    """Class groups reported after ``step``: old (base step), new (all later steps), each step.
    A background that is no-object for the model is still an old class (as in MiB's tables)."""
    base = list(scenario.steps[0])
    if scenario.background >= 0 and not scenario.background_is_class:
        base = [scenario.background] + base
    splits = {"old": base}
    if step > 0:
        splits["new"] = [c for s in scenario.steps[1 : step + 1] for c in s]
    for i in range(step + 1):
        splits[f"step{i}"] = base if i == 0 else list(scenario.steps[i])
    return splits
