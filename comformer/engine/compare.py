"""Run several continual methods on one scenario and seed, each from a base trained with its own
step-0 losses (:mod:`comformer.engine.bases`), as separate ``tools/train_net.py`` processes, a few
at a time: the demo and the benchmarks use it, so their numbers are those a user gets from the
configs.

A run is ``(key, config file, options)``; runs with equal base signatures share one base run
(the first key in sorted order trains it, the others wait for its base step to finish and adopt it
with ``CONT.BASE_WEIGHTS``), whatever the order the runs are given in.
"""
import os
import time
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

from .bases import base_owners
from .trainer import load_config

__all__ = ["Run", "run_with_own_bases"]

# (key, config file, config options ending with OUTPUT_DIR ...)
Run = Tuple[Hashable, str, List[str]]


def _output_dir(opts: Sequence[str]) -> str:
    for i in range(len(opts) - 2, -1, -1):
        if opts[i] == "OUTPUT_DIR":
            return str(opts[i + 1])
    raise ValueError("every run's options must set OUTPUT_DIR")


def run_with_own_bases(
    runs: Sequence[Run],
    *,
    train_net: str,
    jobs: int = 1,
    env: Optional[Dict[str, str]] = None,
    extra_args: Sequence[str] = ("--resume",),
    on_done: Optional[Callable[[Hashable, str], None]] = None,
    log_dir: Optional[str] = None,
) -> Dict[Hashable, Hashable]:
    """
    Run every scenario of ``runs`` through ``train_net`` (a path to tools/train_net.py), ``jobs``
    processes at a time, each method from its own kind of base.

    Args:
        runs: (key, config file, options); the options must set OUTPUT_DIR.
        train_net: path of tools/train_net.py.
        jobs: processes at a time.
        env: environment of the processes (default: this one).
        extra_args: command-line flags of every run (default ``--resume``: a rerun goes on).
        on_done: called with (key, output dir) after each successful run, from a worker thread.
        log_dir: each run's console goes to ``<log_dir>/<output dir name>.log`` (default: the
            output dir's parent).

    Returns:
        key -> key of the run whose base it used (itself for the runs that trained one).
    Raises:
        RuntimeError naming the failed run and its log, after the other runs ended.
    """
    configs = {key: load_config(path, opts) for key, path, opts in runs}
    owners = base_owners(configs)
    by_key = {key: (path, list(opts)) for key, path, opts in runs}
    done = {key: threading.Event() for key in by_key}
    failed: List[str] = []
    order = sorted(by_key, key=lambda k: (owners[k] != k, [r[0] for r in runs].index(k)))

    def run(key):
        path, opts = by_key[key]
        out = _output_dir(opts)
        cmd = [sys.executable, train_net, *extra_args, "--config-file", path, *opts]
        owner = owners[key]
        try:
            if owner != key:
                base_dir = os.path.join(_output_dir(by_key[owner][1]), "step0")
                # the owner's base step is finished when the runner writes its done.json; the
                # owner's later steps need not be waited for
                while not done[owner].is_set() and not os.path.isfile(
                    os.path.join(base_dir, "done.json")
                ):
                    time.sleep(1.0)
                cmd += ["CONT.BASE_WEIGHTS", os.path.join(base_dir, "model_final.pth")]
            folder = log_dir or os.path.dirname(os.path.abspath(out))
            os.makedirs(folder, exist_ok=True)
            log = os.path.join(folder, os.path.basename(os.path.normpath(out)) + ".log")
            with open(log, "w") as f:
                proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
            if proc.returncode != 0:
                failed.append(f"{key} (exit {proc.returncode}; see {log})")
            elif on_done is not None:
                on_done(key, out)
        finally:
            done[key].set()

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for future in [pool.submit(run, key) for key in order]:
            future.result()
    if failed:
        raise RuntimeError("failed runs: " + "; ".join(failed))
    return owners
