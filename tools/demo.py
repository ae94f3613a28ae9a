#!/usr/bin/env python
"""The main job run by `make demo`: a complete continual scenario on the built-in synthetic benchmark.

Synthetic panoptic 10-10 (synthetic_shapes: every class its own shape and colour) on CPU: the base
step (10 classes), then the second step (10 new classes, without labels for the old ones), for
each method, all three at once (a method adopting a base starts when that base is trained). Every method starts from a base trained with its own step-0
losses: fine-tuning's and joint's base is Mask2Former's, CoMFormer trains its own (softmax masks and
focal loss); joint trains the second step's model anew on all data. Ends with the steps x
old/new/all PQ and mIoU table and one plot comparing the methods (results.png):

    ft         fine-tuning: forgets the old classes (the lower bound);
    joint      all images and labels of the classes seen so far, trained offline (the upper bound);
    comformer  distils the old model and pseudo-labels the old classes.

The dataset is generated on first use under $DETECTRON2_DATASETS (default: the checkout's datasets/).
"""
import argparse
import os
import sys
import time
import warnings

# fvcore's import-time deprecation notice about torch.jit.script: nothing a user can act on
warnings.filterwarnings(
    "ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning
)

import comformer  # noqa: E402,F401  (registers datasets, model parts and methods)
from comformer.continual import METHOD_REGISTRY  # noqa: E402
from comformer.engine import load_results, results_table  # noqa: E402
from comformer.engine.compare import run_with_own_bases  # noqa: E402
from comformer.engine.results import plot_methods  # noqa: E402
from comformer.utils.io import atomic_write_text  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = {
    "default": "configs/synthetic_shapes/panoptic-segmentation/continual/10-10.yaml",
    "comformer": "configs/synthetic_shapes/panoptic-segmentation/continual/10-10-comformer.yaml",
}


def method_config(method: str) -> str:
    """The scenario config a method runs with (CoMFormer's sets softmax masks for every step)."""
    return os.path.join(REPO, CONFIGS.get(method, CONFIGS["default"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--base-iters", type=int, default=300, help="iterations of the base step")
    parser.add_argument("--iters-per-class", type=int, default=20, help="incremental iterations per new class")
    parser.add_argument("--jobs", type=int, default=3, help="training processes at a time (one torch thread each on CPU)")
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
    for name in ("base_iters", "iters_per_class", "jobs"):
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

    env = dict(os.environ)
    if args.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
    print(f"comformer demo: synthetic panoptic 10-10, methods {', '.join(methods)}, "
          f"{args.jobs} at a time; logs in {args.output_dir}/<method>.log", flush=True)
    start = time.time()

    def done(method, out):
        rows = load_results(out)
        last = rows[-1] if rows else {}
        print(f"  {method}: done after {time.time() - start:.0f} s; step {last.get('step')}: "
              f"PQ old {last.get('PQ_old', float('nan')):.1f} new {last.get('PQ_new', float('nan')):.1f}",
              flush=True)

    try:
        owners = run_with_own_bases(
            [(m, method_config(m), opts(m)) for m in methods],
            train_net=os.path.join(REPO, "tools/train_net.py"),
            jobs=args.jobs,
            env=env,
            extra_args=("--resume", "--quiet"),
            on_done=done,
            log_dir=args.output_dir,
        )
    except RuntimeError as e:  # a run failed: its log says why
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("bases: " + ", ".join(f"{m} from {owners[m]}'s" for m in methods), flush=True)

    all_rows = [r for m in methods for r in load_results(os.path.join(args.output_dir, m))]
    title = "synthetic benchmark, panoptic 10-10 (CPU demo)"
    table = results_table(all_rows, title)
    atomic_write_text(os.path.join(args.output_dir, "results.md"), table + "\n")
    by_method = {m: [r for r in all_rows if r["method"] == m] for m in methods}
    plot_methods(os.path.join(args.output_dir, "results.png"), by_method, title)
    print("\n" + table)
    print(f"\n{len(methods)} methods in {time.time() - start:.0f} s; table in {args.output_dir}/results.md, "
          f"plot in {args.output_dir}/results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
