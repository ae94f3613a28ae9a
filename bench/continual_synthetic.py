#!/usr/bin/env python
"""Continual methods compared on a synthetic panoptic benchmark (CPU by default).

Every run goes through tools/train_net.py with the scenario's config (``<task>-comformer.yaml`` for
CoMFormer: softmax masks and the focal loss at every step, its base included;
``<task>-eclipse.yaml`` for ECLIPSE: its prompted decoder and sigmoid classifier), so the numbers
are the ones a user gets.
Each method starts from a base trained with its own step-0 losses: per seed and scenario, the
methods with equal base signatures (comformer/engine/bases.py; ft, mib and plop share Mask2Former's
base, CoMFormer and ECLIPSE train their own) share one base run, trained by the first of
them in alphabetical order, whatever the order of --methods. ``joint`` trains every step offline
(the upper bound). Prints old / new / all PQ and mIoU after the last step (mean ± sd over seeds) and
writes the JSON (default bench/results/continual_<dataset>.json).

    .venv/bin/python bench/continual_synthetic.py --seeds 0 1 2            # the benchmark
    .venv/bin/python bench/continual_synthetic.py --methods ft comformer --seeds 0 --scenarios 10-10
    .venv/bin/python bench/continual_synthetic.py --jobs 2                  # two runs at a time

The JSON is rewritten after every run, so an interrupted benchmark keeps what it measured; the same
command again goes on (finished steps are skipped, a killed step resumes from its checkpoint).
Extra config options go after --opts (e.g. --opts CONT.COMFORMER.KD_WEIGHT 2); a row of a method
with options of its own is a --variant (LABEL METHOD KEY VALUE ...). Runs of earlier
invocations (other seeds, say) join the table and the JSON with --include:

    .venv/bin/python bench/continual_synthetic.py --seeds 1 2 --include bench/results/seed0.json \
        --output bench/results/all_seeds.json
    .venv/bin/python bench/continual_synthetic.py --seeds --include a.json b.json --output c.json
"""

import argparse
import json
import math
import os
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATASETS = {
    # name: config template ({task}, {suffix} "", "-comformer" or "-eclipse")
    "shapes": "configs/synthetic_shapes/panoptic-segmentation/continual/{task}{suffix}.yaml",
    "synthetic": "configs/synthetic/panoptic-segmentation/continual/{task}{suffix}.yaml",
}
METHODS = ("ft", "joint", "mib", "plop", "comformer", "eclipse")
# Methods whose every step needs a config of its own (model architecture or activations).
OWN_CONFIG = ("comformer", "eclipse")
KEYS = ("PQ_old", "PQ_new", "PQ_all", "mIoU_old", "mIoU_new", "mIoU_all")


def method_config(dataset: str, task: str, method: str) -> Path:
    suffix = f"-{method}" if method in OWN_CONFIG else ""
    return REPO / DATASETS[dataset].format(task=task, suffix=suffix)


def _mean_sd(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _included_runs(paths, planned, opts, parser):
    """Runs of earlier results JSONs, checked: same extra options, none also run now, no duplicates."""
    included, seen = [], set()
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
            earlier = data["runs"]
            earlier_opts = data["args"].get("opts", [])
        except (OSError, ValueError, KeyError, TypeError) as e:
            parser.error(f"--include {path}: not a results JSON of this benchmark ({e})")
        if list(earlier_opts) != list(opts):
            parser.error(f"--include {path}: its runs used --opts {earlier_opts}, these use {opts}; "
                         "a table must compare runs made with the same options")  # fmt: skip
        for run in earlier:
            key = (run["task"], run["seed"], run["method"])
            if key in planned:
                parser.error(
                    f"--include {path}: {key} is also run now; leave it out of --seeds/--methods"
                )
            if key in seen:
                parser.error(f"--include {path}: {key} is in more than one included file")
            seen.add(key)
            included.append(run)
    return included


def runs_env(jobs: int) -> dict:
    """Environment of the training processes: OMP_NUM_THREADS as set, else cores / jobs."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    return env


def results_recorder(output: Path, args, runs: list, lock, variants=None):
    """The ``on_done`` of run_with_own_bases: reads a finished run's results.json, adds its last
    step to ``runs`` (key (task, seed, name)) and rewrites ``output``, so an interrupted benchmark
    keeps what it measured. ``variants``: label -> (method, extra options), recorded with the run.
    """

    def record(key, out):
        task, seed, name = key
        rows = json.loads((Path(out) / "results.json").read_text())
        last = rows[-1]
        entry = {"task": task, "seed": seed, "method": name, "steps": rows,
                 **{k: last.get(k) for k in KEYS}}  # fmt: skip
        if variants and name in variants:
            entry["variant_of"], entry["variant_opts"] = variants[name]
        with lock:
            runs.append(entry)
            output.write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
            print(f"{task} seed {seed} {name}: "
                  + ", ".join(f"{k} {last.get(k, float('nan')):.1f}" for k in KEYS), flush=True)  # fmt: skip

    return record


def summarize(runs, dataset):
    """Mean ± sd over seeds per scenario and method, as JSON rows and as a markdown table."""
    seeds = sorted({r["seed"] for r in runs})
    title = f"synthetic {dataset} panoptic, after the last step; mean ± sd over seeds {seeds}"
    lines = [title, "| scenario | method | seeds | " + " | ".join(KEYS) + " |",
             "|---|---|---:|" + "---:|" * len(KEYS)]  # fmt: skip
    summary = []
    tasks = list(dict.fromkeys(r["task"] for r in runs))
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    methods += sorted({r["method"] for r in runs} - set(methods))
    for task in tasks:
        for method in methods:
            sel = [r for r in runs if r["task"] == task and r["method"] == method]
            if not sel:
                continue
            stats = {k: _mean_sd([r[k] for r in sel]) for k in KEYS}
            summary.append({"task": task, "method": method, "seeds": sorted(r["seed"] for r in sel),
                            **{k: list(v) for k, v in stats.items()}})  # fmt: skip
            cells = " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in stats.values())
            lines.append(f"| {task} | {method} | {len(sel)} | {cells} |")
    return summary, lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="shapes")
    parser.add_argument("--scenarios", nargs="+", default=["10-10", "10-2"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="*",
        default=[0, 1, 2],
        help="seeds to run; none (--seeds with no value) only tabulates --include",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs in parallel (one torch thread each)"
    )
    parser.add_argument("--workdir", default=None, help="default output/bench_continual_<dataset>")
    parser.add_argument(
        "--output", default=None, help="default bench/results/continual_<dataset>.json"
    )
    parser.add_argument(
        "--include",
        nargs="+",
        default=[],
        metavar="JSON",
        help="results JSON of earlier runs (e.g. other seeds) to add to the table",
    )
    parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        default=[],
        metavar="LABEL METHOD [KEY VALUE ...]",
        help="a row LABEL: METHOD's config with these options after --opts (repeatable), e.g. "
        "--variant eclipse-x4 eclipse CONT.INC_ITERS_PER_CLASS 80",
    )
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args()

    import comformer  # noqa: F401  (registers datasets and methods)
    from comformer.continual import METHOD_REGISTRY
    from comformer.engine.compare import run_with_own_bases

    registered = {name.lower() for name, _ in METHOD_REGISTRY}
    unknown = [m for m in args.methods if m not in registered]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; valid: {', '.join(sorted(registered))}")
    # Rows: label -> (method, its extra options); a method runs as itself.
    rows = {m: (m, []) for m in args.methods}
    for variant in args.variant:
        if len(variant) < 2 or len(variant) % 2:
            parser.error(f"--variant {' '.join(variant)}: expected LABEL METHOD [KEY VALUE ...]")
        label, method, extra = variant[0], variant[1], variant[2:]
        if method not in registered:
            parser.error(f"--variant {label}: unknown method {method!r}; valid: "
                         f"{', '.join(sorted(registered))}")  # fmt: skip
        if label in rows or label in registered:
            parser.error(f"--variant {label}: the label is taken (a method or another variant)")
        rows[label] = (method, extra)
    workdir = REPO / (args.workdir or f"output/bench_continual_{args.dataset}")
    output = REPO / (args.output or f"bench/results/continual_{args.dataset}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    env = runs_env(args.jobs)

    def opts(task, label, seed):
        out = workdir / task / f"seed{seed}" / label
        method, extra = rows[label]
        return out, ["SEED", str(seed), "MODEL.DEVICE", args.device, "CONT.METHOD", method,
                     "CONT.VIS_IMAGES", "0", "OUTPUT_DIR", str(out), *args.opts, *extra]  # fmt: skip

    planned = {(task, seed, m) for task in args.scenarios for seed in args.seeds for m in rows}
    included = _included_runs(args.include, planned, args.opts, parser)
    runs, lock = list(included), threading.Lock()

    variants = {label: row for label, row in rows.items() if label not in args.methods}
    record = results_recorder(output, args, runs, lock, variants)

    # Per seed, runs whose bases have the same signature (same losses, base classes and config,
    # whatever the scenario) share one base run (comformer/engine/compare.py).
    for seed in args.seeds:
        start = time.perf_counter()
        owners = run_with_own_bases(
            [
                (
                    (task, seed, label),
                    str(method_config(args.dataset, task, rows[label][0])),
                    opts(task, label, seed)[1],
                )
                for task in args.scenarios
                for label in rows
            ],
            train_net=str(REPO / "tools/train_net.py"),
            jobs=args.jobs,
            env=env,
            on_done=record,
        )
        with lock:
            for entry in runs:
                key = (entry["task"], entry["seed"], entry["method"])
                if key in owners:
                    entry["base_of"] = "{}/{}".format(owners[key][0], owners[key][2])
            print(f"seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)

    summary, lines = summarize(runs, args.dataset)
    print("\n" + "\n".join(lines))
    output.write_text(json.dumps({"args": vars(args), "summary": summary, "runs": runs}, indent=1))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
