#!/usr/bin/env python
"""Continual methods compared on the synthetic panoptic scenarios (CPU by default).

For each seed, the base step is trained once and every method of every scenario with that many base
classes continues from that same base model (as the papers compare methods); each run goes through tools/train_net.py, so the numbers
are the ones a user gets from the configs. Prints old / new / all PQ and mIoU after the last step
(mean ± sd over seeds) and writes bench/results/continual_synthetic.json.

    .venv/bin/python bench/continual_synthetic.py --scenarios 10-10 10-2 --seeds 0 1 2
    .venv/bin/python bench/continual_synthetic.py --methods ft comformer --base-iters 300   # quicker
    .venv/bin/python bench/continual_synthetic.py --jobs 2   # seeds in parallel, 1 thread each

The JSON is rewritten after every run, so an interrupted benchmark keeps what it measured; run the
same command again to go on (finished steps are skipped, a killed step resumes from its checkpoint).

By default the shared base model uses softmax masks across queries (CoMFormer's architecture) and
every method runs with them, so the methods differ only in their incremental-step losses. With
--per-activation, methods using sigmoid masks (ft, joint, mib, plop by default) continue from a
second base trained with sigmoid masks (twice the base cost).
"""
import argparse
import json
import threading
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/synthetic/panoptic-segmentation/continual/{task}.yaml"
METHODS = ("ft", "joint", "mib", "plop", "comformer")
KEYS = ("PQ_old", "PQ_new", "PQ_all", "mIoU_old", "mIoU_new", "mIoU_all")


def _train(task, method, seed, out, activation, base_weights, args, env) -> float:
    cmd = [
        sys.executable,
        str(REPO / "tools/train_net.py"),
        "--config-file",
        str(REPO / CONFIG.format(task=task)),
        "--resume",  # a rerun skips finished steps and continues a killed one
        "CONT.METHOD", method,
        "SEED", str(seed),
        "MODEL.DEVICE", args.device,
        "MODEL.MASK_FORMER.MASK_ACTIVATION", activation,
        "SOLVER.MAX_ITER", str(args.base_iters),
        "CONT.INC_ITERS_PER_CLASS", str(args.iters_per_class),
        "CONT.VIS_IMAGES", "0",
        "OUTPUT_DIR", str(out),
    ]  # fmt: skip
    if activation == "sigmoid":
        cmd += ["CONT.COMFORMER.SOFTMAX_MASKS", "False"]
    if base_weights:
        cmd += ["CONT.BASE_WEIGHTS", str(base_weights)]
    start = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{task} seed {seed} {method} failed (exit {proc.returncode}); see {log.name}")
    return time.perf_counter() - start


def _mean_sd(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", default=["10-10", "10-2"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--base-iters", type=int, default=800)
    parser.add_argument("--iters-per-class", type=int, default=15)
    parser.add_argument("--per-activation", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run in parallel")
    parser.add_argument("--workdir", default="output/bench_continual_synthetic")
    parser.add_argument("--output", default="bench/results/continual_synthetic.json")
    args = parser.parse_args()

    env = dict(os.environ)
    if args.jobs > 1:
        # one torch thread per job: oversubscribed cores make every step several times slower
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    runs, lock = [], threading.Lock()
    output = REPO / args.output
    output.parent.mkdir(parents=True, exist_ok=True)

    def run_seed(seed):
        base = {}  # (activation, number of base classes) -> step-0 weights of this seed
        for task in args.scenarios:
            num_base = task.split("-")[0]
            for method in args.methods:
                activation = "softmax"
                if args.per_activation and method != "comformer":
                    activation = "sigmoid"
                out = REPO / args.workdir / task / f"seed{seed}" / method
                out.parent.mkdir(parents=True, exist_ok=True)
                key = (activation, num_base)
                wall = _train(task, method, seed, out, activation, base.get(key), args, env)
                base.setdefault(key, out / "step0" / "model_final.pth")
                rows = json.loads((out / "results.json").read_text())
                last = rows[-1]
                run = {"task": task, "seed": seed, "method": method, "activation": activation,
                       "wall_s": wall, "steps": rows, **{k: last.get(k) for k in KEYS}}  # fmt: skip
                with lock:
                    runs.append(run)
                    output.write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
                    print(f"{task} seed {seed} {method}: " + ", ".join(
                        f"{k} {last.get(k, float('nan')):.1f}" for k in KEYS) + f" ({wall:.0f} s)",
                        flush=True)  # fmt: skip

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in [pool.submit(run_seed, seed) for seed in args.seeds]:
            future.result()

    summary = []
    print(f"\nsynthetic panoptic, after the last step; mean ± sd over seeds {args.seeds}; base "
          f"{args.base_iters} it, {args.iters_per_class} it per new class")
    print("| scenario | method | " + " | ".join(KEYS) + " |")
    print("|---|---|" + "---:|" * len(KEYS))
    for task in args.scenarios:
        for method in args.methods:
            sel = [r for r in runs if r["task"] == task and r["method"] == method]
            stats = {k: _mean_sd([r[k] for r in sel]) for k in KEYS}
            summary.append({"task": task, "method": method, **{k: list(v) for k, v in stats.items()}})
            cells = " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in stats.values())
            print(f"| {task} | {method} | {cells} |")
    output.write_text(json.dumps({"args": vars(args), "summary": summary, "runs": runs}, indent=1))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
