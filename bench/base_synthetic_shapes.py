#!/usr/bin/env python
"""The benchmark's base model on CPU: is it good within 5 minutes?

Trains the base step (10 classes) of the synthetic benchmark's panoptic 10-10 scenario through
tools/train_net.py (``CONT.STEP 0``), once per mask activation (sigmoid: Mask2Former, MiB, PLOP;
softmax across queries: CoMFormer), and evaluates it on the 200 validation images with the
continual evaluator (the 10 base classes; later classes are void). Prints the training time, the
wall time and CPU time of the whole command (start-up, training, evaluation; on a machine shared
with other jobs the CPU time is what the wall time would be alone), PQ and mIoU, and writes
bench/results/base_synthetic_shapes.json. The target: PQ >= 50 and mIoU >= 70 in at most 5
minutes of training on 2 CPU cores, one process with one torch thread.

    .venv/bin/python bench/base_synthetic_shapes.py
    .venv/bin/python bench/base_synthetic_shapes.py --activations softmax --seeds 0 1 2
    .venv/bin/python bench/base_synthetic_shapes.py SOLVER.MAX_ITER 300   # config overrides last
"""

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/synthetic_shapes/panoptic-segmentation/continual/10-10.yaml"
KEYS = ("PQ_all", "PQ_th", "PQ_st", "mIoU_all")
TARGET = {"PQ_all": 50.0, "mIoU_all": 70.0, "train_s": 300.0}


def _seconds(hms: str) -> float:
    h, m, s = (float(x) for x in hms.split(":"))
    return 3600 * h + 60 * m + s


def run(activation: str, seed: int, args) -> dict:
    out = REPO / "output" / "bench_base_synthetic_shapes" / f"{activation}-seed{seed}"
    shutil.rmtree(out, ignore_errors=True)  # a finished step would be skipped
    out.mkdir(parents=True)
    cmd = [
        sys.executable,
        str(REPO / "tools/train_net.py"),
        "--config-file", str(REPO / args.config),
        "CONT.STEP", "0",
        "CONT.VIS_IMAGES", "0",
        "MODEL.MASK_FORMER.MASK_ACTIVATION", activation,
        "DATALOADER.NUM_WORKERS", str(args.num_workers),
        "SEED", str(seed),
        "OUTPUT_DIR", str(out),
        *args.opts,
    ]  # fmt: skip
    # this checkout's comformer, whatever the interpreter has installed
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    env.setdefault("OMP_NUM_THREADS", "1")
    load_before = os.getloadavg()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(out / "bench.log", "w") as log:
        subprocess.run(cmd, check=True, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the command and its loader worker: what the wall time would be on an idle
    # machine, give or take the worker's share, when other jobs compete for the cores.
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    text = (out / "bench.log").read_text()
    # detectron2: "Overall training speed: 498 iterations in 0:03:59 (0.4811 s / it)"
    speed = re.search(
        r"Overall training speed: (\d+) iterations in ([\d:]+) \(([\d.]+) s / it\)", text
    )
    total = re.search(r"Total training time: ([\d:]+)", text)
    row = json.loads((out / "results.json").read_text())[-1]
    return {
        "activation": activation,
        "seed": seed,
        "iterations": row["iterations"],
        "train_s": _seconds(total.group(1)) if total else float("nan"),
        "s_per_iter": float(speed.group(3)) if speed else float("nan"),
        "wall_s": wall,
        "cpu_s": cpu,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        **{k: row[k] for k in KEYS},
        "per_class": {k: v for k, v in row.items() if k.startswith(("PQ-", "IoU-"))},
        "command": " ".join(cmd[1:]),
    }


def meets(r: dict) -> bool:
    return (
        r["PQ_all"] >= TARGET["PQ_all"]
        and r["mIoU_all"] >= TARGET["mIoU_all"]
        and r["train_s"] <= TARGET["train_s"]
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--activations", nargs="+", default=["sigmoid", "softmax"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--output", default="bench/results/base_synthetic_shapes.json")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides")
    args = parser.parse_args()

    rows = []
    for activation in args.activations:
        for seed in args.seeds:
            rows.append(run(activation, seed, args))
            print(f"{activation} seed {seed}: " + ", ".join(f"{k} {rows[-1][k]:.1f}" for k in KEYS))

    cols = ("iterations", "train_s", "wall_s", "cpu_s", *KEYS)
    print(
        f"\nbase step of {args.config} (10 classes), OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', '1')}, {os.cpu_count()} CPUs"
    )
    print("| masks | seed | " + " | ".join(cols) + " | target |")
    print("|---|---:|" + "---:|" * len(cols) + "---|")
    for r in rows:
        values = " | ".join(f"{r[k]:.0f}" if k == "iterations" else f"{r[k]:.1f}" for k in cols)
        print(
            f"| {r['activation']} | {r['seed']} | {values} | {'met' if meets(r) else 'NOT met'} |"
        )
    summary = {}
    for activation in args.activations:
        mine = [r for r in rows if r["activation"] == activation]
        if len(mine) > 1:
            summary[activation] = {
                k: (statistics.mean(r[k] for r in mine), statistics.stdev(r[k] for r in mine))
                for k in ("train_s", *KEYS)
            }
    output = REPO / args.output
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps(
            {
                "config": args.config,
                "target": TARGET,
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "runs": rows,
                "summary": summary,
            },
            indent=2,
        )
    )
    print(f"wrote {output}")
    return 0 if all(meets(r) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
