#!/usr/bin/env python
"""The main job run by `make demo`: a complete continual scenario on the built-in synthetic dataset.

Synthetic panoptic 10-10 on CPU: the base step (10 classes), then the second step (10 new classes,
without labels for the old ones), for each method. Every method starts from a base trained with its
own step-0 losses: fine-tuning, MiB and PLOP share Mask2Former's base, CoMFormer trains its own
(softmax masks and focal loss); joint trains each step's model anew on all data. Ends with the steps
x old/new/all PQ and mIoU table of every method and their plots:

    ft         fine-tuning: forgets the old classes (the lower bound);
    joint      all images and labels of the classes seen so far, trained offline (the upper bound);
    comformer  distils the old model and pseudo-labels the old classes.

The dataset is generated on first use under $DETECTRON2_DATASETS (default: the checkout's datasets/).
"""
import argparse
import os
import subprocess
import sys
import time

import comformer  # noqa: F401  (registers datasets, model parts and methods)
from comformer.continual import METHOD_REGISTRY
from comformer.engine import load_results, plot_results, results_table
from comformer.engine.bases import base_owners
from comformer.engine.trainer import load_config
from comformer.utils.io import atomic_write_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = {
    "default": "configs/synthetic/panoptic-segmentation/continual/10-10.yaml",
    "comformer": "configs/synthetic/panoptic-segmentation/continual/10-10-comformer.yaml",
}


def method_config(method: str) -> str:
    """The scenario config a method runs with (CoMFormer's sets softmax masks for every step)."""
    return os.path.join(REPO, CONFIGS.get(method, CONFIGS["default"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--base-iters", type=int, default=800, help="iterations of the base step")
    parser.add_argument("--iters-per-class", type=int, default=15, help="incremental iterations per new class")
    parser.add_argument("--methods", nargs="+", default=["ft", "joint", "comformer"])
    parser.add_argument("--output-dir", default="./output/demo")
    args = parser.parse_args()
    registered = {name.lower() for name, _ in METHOD_REGISTRY}
    unknown = [m for m in args.methods if m.lower() not in registered]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; valid: {', '.join(sorted(registered))}")
    methods = list(dict.fromkeys(m.lower() for m in args.methods))
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        parser.error(f"--device {args.device!r}: use cpu or cuda")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: CUDA is not available on this machine (use cpu)")
    for name in ("base_iters", "iters_per_class"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if os.path.isfile(args.output_dir):
        parser.error(f"--output-dir {args.output_dir} is a file, not a folder")

    def opts(method):
        return [
            "MODEL.DEVICE", args.device,
            "CONT.METHOD", method,
            "SOLVER.MAX_ITER", str(args.base_iters),
            "CONT.INC_ITERS_PER_CLASS", str(args.iters_per_class),
            "OUTPUT_DIR", os.path.join(args.output_dir, method),
        ]  # fmt: skip

    owners = base_owners({m: load_config(method_config(m), opts(m)) for m in methods})
    start = time.time()
    # Owners first: they train the bases the other methods adopt.
    for method in sorted(methods, key=lambda m: (owners[m] != m, methods.index(m))):
        cmd = [sys.executable, os.path.join(REPO, "tools/train_net.py"), "--quiet", "--config-file", method_config(method), *opts(method)]
        if owners[method] != method:
            base = os.path.join(args.output_dir, owners[method], "step0", "model_final.pth")
            cmd += ["CONT.BASE_WEIGHTS", base]
        print(f"\n=== {method} (base: {owners[method]}'s): {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, check=True, cwd=REPO)

    all_rows = [r for m in methods for r in load_results(os.path.join(args.output_dir, m))]
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
