#!/usr/bin/env python
"""Joint (all classes at once) training on the synthetic dataset: does the model converge on CPU?

Trains the small CPU Mask2Former through tools/train_net.py for each seed, evaluates with detectron2's
COCOPanopticEvaluator and SemSegEvaluator, prints a table and writes JSON.

    .venv/bin/python bench/joint_synthetic.py --iters 1500 --seeds 0 1 2
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/synthetic/panoptic-segmentation/maskformer2_R18_cpu.yaml"


def run(seed: int, iters: int, output_dir: Path, extra: list) -> dict:
    cmd = [
        sys.executable,
        str(REPO / "tools/train_net.py"),
        "--config-file",
        str(REPO / CONFIG),
        "SEED",
        str(seed),
        "SOLVER.MAX_ITER",
        str(iters),
        "OUTPUT_DIR",
        str(output_dir),
        *extra,
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    wall = time.perf_counter() - start
    metrics = json.loads((output_dir / "metrics.json").read_text().splitlines()[-1])
    return {
        "seed": seed,
        "PQ": metrics["panoptic_seg/PQ"],
        "PQ_th": metrics["panoptic_seg/PQ_th"],
        "PQ_st": metrics["panoptic_seg/PQ_st"],
        "mIoU": metrics["sem_seg/mIoU"],
        "wall_s": wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--iters", type=int, default=1500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--output", default="bench/results/joint_synthetic.json")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="extra config overrides")
    args = parser.parse_args()

    rows = []
    for seed in args.seeds:
        out = REPO / "output" / "bench_joint_synthetic" / f"seed{seed}"
        rows.append(run(seed, args.iters, out, args.opts))

    keys = ["PQ", "PQ_th", "PQ_st", "mIoU", "wall_s"]
    print(f"\njoint training on synthetic_panoptic ({args.iters} iterations, CPU threads: "
          f"{os.cpu_count()})")
    print("| seed | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for r in rows:
        print(f"| {r['seed']} | " + " | ".join(f"{r[k]:.1f}" for k in keys) + " |")
    summary = {}
    if len(rows) > 1:
        summary = {k: (statistics.mean(r[k] for r in rows), statistics.stdev(r[k] for r in rows)) for k in keys}
        print("| mean ± sd | " + " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in summary.values()) + " |")
    output = REPO / args.output
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"iters": args.iters, "runs": rows, "summary": summary}, indent=2))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
