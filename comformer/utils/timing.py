"""Named wall-clock sections of a training step, for profiling (``bench/train_step.py``).

Code marks a section with ``with timed("matching"): ...``. Timing is off by default, and then
``timed`` returns one shared do-nothing context manager: no clock is read, no device is
synchronised, nothing is recorded, so marked code runs and computes exactly as unmarked code.

When enabled (:func:`enable_timing`), each section's *exclusive* time is accumulated: a section
entered inside another is subtracted from the outer one, so the totals of a step add up to the
step's time without double counting (e.g. "losses" excludes the "matching" done inside the
criterion). With ``synchronize=True`` the CUDA device is synchronised at every section boundary,
so that asynchronous kernels are charged to the section that launched them (this slows the step a
little, and is needed only on CUDA).

Not thread-safe: sections are meant for the training loop's own thread.
"""

import contextlib
import functools
from collections import defaultdict
from time import perf_counter
from typing import Callable, Dict, List

import torch

__all__ = [
    "timed",
    "timed_function",
    "enable_timing",
    "timing_enabled",
    "reset_timing",
    "timing_totals",
    "timing_counts",
]

_NULL = contextlib.nullcontext()


class _State:
    enabled = False
    synchronize = False
    totals: Dict[str, float] = defaultdict(float)
    counts: Dict[str, int] = defaultdict(int)
    # Open sections: [name, start time, seconds spent in nested sections].
    stack: List[list] = []


def _sync() -> None:
    if _State.synchronize and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class _Section:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        _sync()
        _State.stack.append([self.name, perf_counter(), 0.0])
        return self

    def __exit__(self, *exc):
        _sync()
        name, start, nested = _State.stack.pop()
        elapsed = perf_counter() - start
        _State.totals[name] += elapsed - nested
        _State.counts[name] += 1
        if _State.stack:
            _State.stack[-1][2] += elapsed
        return False


def timed(name: str):
    """
    A context manager timing the section ``name`` when timing is enabled; otherwise a shared
    no-op context manager.

    Args:
        name: the section, e.g. "matching"; sections with the same name add up.
    """
    if not _State.enabled:
        return _NULL
    return _Section(name)


def timed_function(name: str) -> Callable[[Callable], Callable]:
    """Decorator: every call of the function is the section ``name`` (see :func:`timed`)."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with timed(name):
                return fn(*args, **kwargs)

        return wrapper

    return decorate


def enable_timing(enabled: bool = True, *, synchronize: bool = False) -> None:
    """
    Args:
        enabled: turn timing on or off (off: :func:`timed` is a no-op).
        synchronize: synchronise the CUDA device at section boundaries (use it on CUDA).
    """
    if _State.stack:
        raise RuntimeError(f"enable_timing called inside the timed section {_State.stack[-1][0]!r}")
    _State.enabled = bool(enabled)
    _State.synchronize = bool(synchronize)


def timing_enabled() -> bool:
    return _State.enabled


def reset_timing() -> None:
    """Forget the accumulated totals (open sections are kept)."""
    _State.totals.clear()
    _State.counts.clear()


def timing_totals() -> Dict[str, float]:
    """Exclusive seconds per section since the last :func:`reset_timing`."""
    return dict(_State.totals)


def timing_counts() -> Dict[str, int]:
    """How many times each section was entered since the last :func:`reset_timing`."""
    return dict(_State.counts)
