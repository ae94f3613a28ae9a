#!/usr/bin/env python
"""What an ECLIPSE increment trains and costs next to a CoMFormer one.

Step 1 of the synthetic benchmark's 10-10 scenario
(configs/synthetic_shapes/panoptic-segmentation/continual/10-10-{comformer,eclipse}.yaml), each
method from a random step-0 model of its own architecture, with the real step-1 loader, optimizer
and detectron2 training step (``bench/train_step.py``'s ``MethodStep``; random images when the
data set is absent). Trainable parameters: those the optimizer updates (``requires_grad``), and
of them the ones that can change (ECLIPSE's classifier is one tensor whose old-class and no-object
rows are restored after every step). Step time: the two methods' steps alternated in one process
(comformer, eclipse, comformer, ...), so that load on a shared machine hits both alike; the median
of each and the median of the per-pair ratios.

    .venv/bin/python bench/eclipse_step.py                  # CPU, one torch thread
    .venv/bin/python bench/eclipse_step.py --iters 20 --warmup 5

Prints a table and writes bench/results/eclipse_step.json.
"""

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import train_step  # noqa: E402

CONFIG = "configs/synthetic_shapes/panoptic-segmentation/continual/{task}{suffix}.yaml"
METHODS = ("comformer", "eclipse")


def parameter_counts(runner) -> dict:
    """Trainable parameters of the step's student: all with requires_grad, and those that can
    change (minus the classifier rows the step restores)."""
    student = runner.model.student
    method = runner.model.method
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    restored_rows = 0
    if runner.cfg.CONT.FREEZE_OLD_CLASSIFIER or method.keeps_old_classifier:
        restored_rows = method.num_old + int(method.keeps_no_object_row)
    embed = student.sem_seg_head.predictor.class_embed
    restored = restored_rows * (embed.weight.shape[1] + 1) if embed.weight.requires_grad else 0
    return {
        "total": sum(p.numel() for p in student.parameters()),
        "requires_grad": trainable,
        "changing": trainable - restored,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--task", default="10-10")
    parser.add_argument("--iters", type=int, default=10, help="timed steps of each method")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", choices=("auto", "real", "random"), default="auto")
    parser.add_argument("--output", default=str(REPO / "bench/results/eclipse_step.json"))
    parser.add_argument("--opts", nargs="*", default=[], help="config overrides KEY VALUE ...")
    args = parser.parse_args()

    train_step.CONFIGS = {**train_step.CONFIGS, "cpu": CONFIG}
    step_args = SimpleNamespace(
        device="cpu", task=args.task, step=1, data=args.data, threads=args.threads,
        prefetch_factor=0, sharing_strategy=None, opts=args.opts,
    )  # fmt: skip
    train_step._setup_process(step_args)
    runners = {m: train_step.MethodStep(step_args, m) for m in METHODS}
    for _ in range(args.warmup):
        for r in runners.values():
            r.step()
    seconds = {m: [] for m in METHODS}
    for _ in range(args.iters):
        for m, r in runners.items():
            seconds[m].append(r.step()[0])
    ratios = [e / c for c, e in zip(seconds["comformer"], seconds["eclipse"])]
    result = {
        "task": args.task,
        "step": 1,
        "config": CONFIG.format(task=args.task, suffix="-<method>"),
        "data": runners["eclipse"].data,
        "iters": args.iters,
        "warmup": args.warmup,
        "torch_threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "methods": {
            m: {
                "parameters": parameter_counts(r),
                "step_seconds": seconds[m],
                "median_step": statistics.median(seconds[m]),
                "method": repr(r.model.method),
            }
            for m, r in runners.items()
        },
        "eclipse_vs_comformer": {
            "median_step_ratio": statistics.median(ratios),
            "per_pair": ratios,
        },
    }
    c, e = (result["methods"][m] for m in METHODS)
    result["eclipse_vs_comformer"]["changing_parameter_ratio"] = (
        e["parameters"]["changing"] / c["parameters"]["changing"]
    )

    print(
        f"\n{result['config']} step 1, data {result['data']}, {args.iters} alternated steps after "
        f"{args.warmup} warm-up, {args.threads} torch thread(s)\n"
    )
    print(
        "| method | parameters | trainable (requires_grad) | trainable (changing) | median s/step |"
    )
    print("|---|---:|---:|---:|---:|")
    for m in METHODS:
        r = result["methods"][m]
        p = r["parameters"]
        print(
            f"| {m} | {p['total']:,} | {p['requires_grad']:,} | {p['changing']:,} | "
            f"{r['median_step']:.3f} |"
        )
    ratio = result["eclipse_vs_comformer"]
    print(
        f"\neclipse / comformer: trainable (changing) {ratio['changing_parameter_ratio']:.4f}, "
        f"step time {ratio['median_step_ratio']:.2f}x (median of per-pair ratios)"
    )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
