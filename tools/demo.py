#!/usr/bin/env python
"""The main job run by `make demo`: a complete continual scenario on the built-in synthetic dataset.

Synthetic panoptic 10-10 on CPU: the base step (10 classes) is trained once, then the second step
(10 new classes, without labels for the old ones) is learned by each method from that same base
model. The model uses softmax masks across queries (CoMFormer's architecture) for every method, so
the methods differ only in how they learn the new step. Ends with the steps x old/new/all PQ and mIoU table of every method and their plots:

    fine-tuning (ft)  forgets the old classes;
    joint             sees old and new labels again: the upper bound;
    comformer         (when registered) distils the old model and pseudo-labels old classes.

The dataset is generated on first use under $DETECTRON2_DATASETS (default ./datasets).
"""
import argparse
import os
import subprocess
import sys
import time

import comformer  # noqa: F401  (registers datasets, model parts and methods)
from comformer.continual import METHOD_REGISTRY
from comformer.engine import load_results, plot_results, results_table
from comformer.utils.io import atomic_write_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = "configs/synthetic/panoptic-segmentation/continual/10-10.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--base-iters", type=int, default=800, help="iterations of the base step")
    parser.add_argument("--iters-per-class", type=int, default=15, help="incremental iterations per new class")
    parser.add_argument("--methods", nargs="+", default=None, help="default: ft, joint, comformer if registered")
    parser.add_argument("--output-dir", default="./output/demo")
    args = parser.parse_args()
    registered = {name.lower() for name, _ in METHOD_REGISTRY}
    methods = args.methods or [m for m in ("ft", "joint", "comformer") if m in registered]

    start = time.time()
    all_rows, base_weights = [], ""
    for method in methods:
        out = os.path.join(args.output_dir, method)
        opts = [
            "MODEL.DEVICE", args.device,
            "MODEL.MASK_FORMER.MASK_ACTIVATION", "softmax",
            "CONT.METHOD", method,
            "SOLVER.MAX_ITER", str(args.base_iters),
            "CONT.INC_ITERS_PER_CLASS", str(args.iters_per_class),
            "OUTPUT_DIR", out,
        ]  # fmt: skip
        if base_weights:
            # every method continues from the same base model, as in the papers' comparisons
            opts += ["CONT.BASE_WEIGHTS", base_weights]
        cmd = [sys.executable, os.path.join(REPO, "tools/train_net.py"), "--config-file", CONFIG, *opts]
        print(f"\n=== {method}: {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, check=True, cwd=REPO)
        all_rows += load_results(out)
        base_weights = base_weights or os.path.join(out, "step0", "model_final.pth")

    title = "synthetic panoptic 10-10 (CPU demo)"
    table = results_table(all_rows, title)
    atomic_write_text(os.path.join(args.output_dir, "results.md"), table + "\n")
    for method in methods:
        rows = [r for r in all_rows if r["method"] == method]
        plot_results(os.path.join(args.output_dir, f"results_{method}.png"), rows, f"{title}: {method}")
    print("\n" + table)
    print(f"\n{len(methods)} methods in {time.time() - start:.0f} s; table and plots in {args.output_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
