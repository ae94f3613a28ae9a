"""How far a run has come: a line at every tenth of a training run (and at least every few minutes)
with its iteration, loss, speed and ETA, and for a scenario the step headers and the ETA of the
whole scenario, from the iterations of the steps left and the speed measured so far.

detectron2's own iteration lines (every 20 iterations, with the step's ETA) are unchanged; on a
quiet console (``comformer.engine.console``) they go to the log file only and these lines remain.
"""

import datetime
import time
from typing import Dict, List, Optional, Sequence

from detectron2.engine import HookBase
from detectron2.utils import comm

from ..data.scenario import Scenario
from .console import PROGRESS

__all__ = ["format_duration", "describe_classes", "ScenarioProgress", "ProgressHook"]


def format_duration(seconds: float) -> str:
    """``1 day, 2:03:04`` style, whole seconds."""
    return str(datetime.timedelta(seconds=int(round(max(seconds, 0.0)))))


def describe_classes(ids: Sequence[int], names: Optional[Sequence[str]] = None) -> str:
    """Class ids as ranges ("10-19", "3, 7-9"); with names when there are at most three."""
    ids = list(ids)
    if names is not None and len(ids) <= 3:
        return ", ".join(f"{c} {names[c].strip()}" for c in ids)
    parts: List[str] = []
    start = prev = None
    for c in ids + [None]:
        if start is not None and c is not None and c == prev + 1:
            prev = c
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = c
    shown = ", ".join(parts[:8]) + (", ..." if len(parts) > 8 else "")
    return shown


class ScenarioProgress:
    """
    Progress of a scenario run: which steps remain, their iterations, the measured seconds per
    training iteration and per evaluation; logs the step headers and computes the scenario's ETA.
    """

    def __init__(
        self,
        scenario: Scenario,
        iterations: Dict[int, int],
        title: str,
        class_names: Optional[Sequence[str]] = None,
    ):
        """
        Args:
            scenario: the scenario.
            iterations: training iterations of each step this run will run (0: not trained, e.g.
                an adopted base), in run order.
            title: names the run in the headers.
            class_names: the dataset's class names (shown for steps of at most three classes).
        """
        self.scenario = scenario
        self.iterations = dict(iterations)
        self.title = title
        self.class_names = class_names
        self.sec_per_iter: Optional[float] = None
        self.sec_per_eval: Optional[float] = None
        self._left = list(self.iterations)  # steps not finished, in run order

    def _position(self, step: int) -> str:
        return f"{step + 1}/{self.scenario.num_steps}"

    def eta(self, step: int, iters_left: int) -> Optional[float]:
        """Seconds until the scenario ends: ``iters_left`` of ``step``, the iterations of the
        steps after it, and an evaluation per step left; None before any speed is measured."""
        if self.sec_per_iter is None:
            return None
        later = [s for s in self._left if s != step]
        iters = iters_left + sum(self.iterations[s] for s in later)
        evals = len(later) + (1 if step in self._left else 0)
        return iters * self.sec_per_iter + evals * (self.sec_per_eval or 0.0)

    def start_step(self, step: int) -> None:
        """Log the header of ``step``."""
        classes = self.scenario.steps[step]
        iters = self.iterations.get(step, 0)
        eta = self.eta(step, iters)
        PROGRESS.info(
            f"[{self.title}] step {step} ({self._position(step)}): classes "
            f"{describe_classes(classes, self.class_names)} ({len(classes)} new, "
            f"{self.scenario.num_seen(step)} seen), "
            + (f"{iters} iterations" if iters else "no training")
            + ("" if eta is None else f"; scenario ETA {format_duration(eta)}")
        )

    def skip_step(self, step: int, folder: str) -> None:
        self._left = [s for s in self._left if s != step]
        PROGRESS.info(
            f"[{self.title}] step {step} ({self._position(step)}) is finished ({folder}): skipped"
        )

    def finish_step(self, step: int, train_seconds: float, eval_seconds: float, summary: str):
        """Record the step's measured times and log its one-line summary."""
        self._left = [s for s in self._left if s != step]
        self.sec_per_eval = eval_seconds
        PROGRESS.info(
            f"[{self.title}] step {step} done in {format_duration(train_seconds + eval_seconds)} "
            f"(evaluation {format_duration(eval_seconds)}): {summary}"
        )


class ProgressHook(HookBase):
    """
    Logs ``iter i/N  loss  s/it  ETA`` (and the scenario's ETA) to the progress logger at every
    tenth of the run and at least every ``min_interval`` seconds, on the main process.
    """

    def __init__(
        self,
        max_iter: int,
        *,
        label: str = "",
        scenario: Optional[ScenarioProgress] = None,
        step: int = -1,
        min_interval: float = 300.0,
    ):
        """
        Args:
            max_iter: the run's iterations.
            label: prefix of the lines (e.g. "[10-10 ft] step 1").
            scenario: the scenario's progress, for its ETA (``step`` is the step trained).
            min_interval: seconds after which a line is logged even between tenths.
        """
        self.max_iter = max_iter
        self.label = label
        self.scenario = scenario
        self.step = step
        self.min_interval = min_interval
        self._t0 = None  # time after the first iteration of this run
        self._iter0 = 0
        self._last_line = 0.0
        self._next_mark = 0

    def _marks(self) -> List[int]:
        return sorted({max(1, round(self.max_iter * k / 10)) for k in range(1, 11)})

    def before_train(self):
        done = self.trainer.start_iter
        self._next_mark = next((m for m in self._marks() if m > done), self.max_iter + 1)

    def after_step(self):
        now = time.perf_counter()
        iteration = self.trainer.iter + 1  # iterations done
        if self._t0 is None:
            # the first iteration builds caches and workers: the speed is measured after it
            self._t0, self._iter0, self._last_line = now, iteration, now
            return
        speed = (now - self._t0) / max(iteration - self._iter0, 1)
        if self.scenario is not None:
            self.scenario.sec_per_iter = speed
        due = iteration >= self._next_mark or now - self._last_line >= self.min_interval
        if not due or not comm.is_main_process():
            return
        self._next_mark = next((m for m in self._marks() if m > iteration), self.max_iter + 1)
        self._last_line = now
        histories = self.trainer.storage.histories()
        loss = histories.get("total_loss")
        parts = [f"{self.label} iter {iteration}/{self.max_iter}".strip()]
        if loss is not None:
            parts.append(f"loss {loss.median(20):.3f}")
        parts.append(f"{speed:.2f} s/it")
        parts.append(f"ETA {format_duration((self.max_iter - iteration) * speed)}")
        if self.scenario is not None:
            eta = self.scenario.eta(self.step, self.max_iter - iteration)
            if eta is not None:
                parts.append(f"scenario ETA {format_duration(eta)}")
        PROGRESS.info("  ".join(parts))
