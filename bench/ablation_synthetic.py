#!/usr/bin/env python
"""Ablations on the synthetic benchmark: which part of a method decides what it learns.

Each variant is a method with a few config options changed (the distillation weight, the
pseudo-labels, the focal loss, the step's budget); it runs through tools/train_net.py exactly as
the benchmark's runs do (bench/continual_synthetic.py, same configs and seeds), so a variant with
no change reproduces the benchmark's row. Variants whose base is trained the same way share one
base; bases finished elsewhere (the demo's output, the benchmark's work folder) are adopted with
--bases instead of being trained again, when their recorded base signature matches.

    .venv/bin/python bench/ablation_synthetic.py --scenarios 10-10 --seeds 0 --jobs 2 \\
        --bases output/demo --opts CONT.INC_ITERS_PER_CLASS 20
    .venv/bin/python bench/ablation_synthetic.py --list          # the variants

Prints old / new / all PQ and mIoU after the last step (mean ± sd over seeds) and writes
bench/results/ablation_<dataset>.json, rewritten after every run (the same command goes on).
"""

import argparse
import json
import os
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from continual_synthetic import (  # noqa: E402
    DATASETS,
    method_config,
    results_recorder,
    runs_env,
    summarize,
)

# name: (method, config options changed from the benchmark's run of that method, what it tests)
VARIANTS = {
    "comformer": ("comformer", [], "CoMFormer as in the benchmark (KD weight 10)"),
    "comformer-kd0": ("comformer", ["CONT.COMFORMER.KD_WEIGHT", "0.0"], "no logit distillation"),
    "comformer-kd1": ("comformer", ["CONT.COMFORMER.KD_WEIGHT", "1.0"], "KD weight 1"),
    "comformer-kd100": ("comformer", ["CONT.COMFORMER.KD_WEIGHT", "100.0"], "KD weight 100"),
    "comformer-nopl": ("comformer", ["CONT.COMFORMER.PSEUDO_LABELS", "False"], "no pseudo-labels"),
    "comformer-ce": (
        "comformer",
        ["CONT.COMFORMER.FOCAL", "False"],
        "Mask2Former's cross-entropy instead of the focal loss, base included",
    ),
    "comformer-inc50": (
        "comformer",
        ["CONT.INC_ITERS_PER_CLASS", "50"],
        "50 iterations per new class",
    ),
    "mib": ("mib", [], "MiB's mask port as in the benchmark (KD weight 200)"),
    "mib-kd10": ("mib", ["CONT.MIB.KD_WEIGHT", "10.0"], "MiB with CoMFormer's KD weight 10"),
    "mib-kd0": ("mib", ["CONT.MIB.KD_WEIGHT", "0.0"], "MiB without distillation"),
}
DEFAULT = ["comformer-kd0", "comformer-kd1", "comformer-kd100", "comformer-nopl", "comformer-ce",
           "comformer-inc50", "mib-kd10", "mib-kd0"]  # fmt: skip


def finished_bases(folders):
    """base signature -> model_final.pth of every finished base step (step0/done.json) under folders."""
    found = {}
    for folder in folders:
        if not os.path.isdir(folder):
            raise SystemExit(f"--bases {folder}: not a folder")
        for done in sorted(Path(folder).rglob("step0/done.json")):
            signature = json.loads(done.read_text()).get("base_signature")
            weights = done.parent / "model_final.pth"
            if signature and weights.is_file():
                found.setdefault(signature, str(weights))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="shapes")
    parser.add_argument("--scenarios", nargs="+", default=["10-10"])
    parser.add_argument("--variants", nargs="+", default=DEFAULT)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs in parallel (one torch thread each)"
    )
    parser.add_argument(
        "--bases",
        nargs="+",
        default=[],
        metavar="DIR",
        help="folders holding finished base steps to adopt (e.g. output/demo)",
    )
    parser.add_argument("--workdir", default=None, help="default output/ablation_<dataset>")
    parser.add_argument(
        "--output", default=None, help="default bench/results/ablation_<dataset>.json"
    )
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    parser.add_argument(
        "--opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="options of every run (e.g. CONT.INC_ITERS_PER_CLASS 20)",
    )
    args = parser.parse_args()  # fmt: skip
    if args.list:
        for name, (method, opts, what) in VARIANTS.items():
            print(f"{name:18s} {method:10s} {' '.join(opts) or '-':40s} {what}")
        return 0
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; valid: {', '.join(VARIANTS)}")

    import comformer  # noqa: F401  (registers datasets and methods)
    from comformer.engine.bases import base_signature
    from comformer.engine.compare import run_with_own_bases
    from comformer.engine.trainer import load_config

    workdir = REPO / (args.workdir or f"output/ablation_{args.dataset}")
    output = REPO / (args.output or f"bench/results/ablation_{args.dataset}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    env = runs_env(args.jobs)
    bases = finished_bases(args.bases)
    runs, lock = [], threading.Lock()

    record = results_recorder(output, args, runs, lock)

    for seed in args.seeds:
        planned = []
        for task in args.scenarios:
            for variant in args.variants:
                method, changes, _ = VARIANTS[variant]
                path = str(method_config(args.dataset, task, method))
                out = workdir / task / f"seed{seed}" / variant
                opts = ["SEED", str(seed), "CONT.METHOD", method, "CONT.VIS_IMAGES", "0",
                        *args.opts, *changes, "OUTPUT_DIR", str(out)]  # fmt: skip
                adopted = bases.get(base_signature(load_config(path, opts)))
                if adopted:
                    opts = opts[:-2] + ["CONT.BASE_WEIGHTS", adopted] + opts[-2:]
                    print(f"{task} seed {seed} {variant}: base from {adopted}", flush=True)
                planned.append(((task, seed, variant), path, opts))
        run_with_own_bases(planned, train_net=str(REPO / "tools/train_net.py"), jobs=args.jobs,
                           env=env, on_done=record)  # fmt: skip

    summary, lines = summarize(runs, args.dataset)
    print("\n" + "\n".join(lines))
    output.write_text(json.dumps({"args": vars(args), "summary": summary, "runs": runs}, indent=1))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
