#!/usr/bin/env python
"""Cost of one training step of each continual method, and where it goes.

Every method trains step 1 of the same scenario from the same randomly initialised step-0 model
(the teacher, when the method has one; the student starts from its weights, classifier grown as
between real steps), with the real step data loader, optimizer and detectron2 training step
(``SimpleTrainer.run_step``, or ``AMPTrainer.run_step`` with SOLVER.AMP): no checkpoint is needed.

Configs:
  --device cpu   (default) configs/synthetic/panoptic-segmentation/continual/10-10.yaml
                 (10-10-comformer.yaml for comformer: softmax masks), as configured (R18, 96 px
                 crops, batch 8), data from the synthetic dataset's step-1 loader
  --device cuda  configs/ade20k/panoptic-segmentation/continual/100-10.yaml (-comformer.yaml):
                 R50, 640 px crops, batch 8, AMP; random images and masks when ADE20K is absent
                 (--data random forces them)

CPU runs use one torch thread by default (--threads): on a machine shared with other jobs, torch's
default of one thread per core spins in its parallel regions while the cores are busy elsewhere,
which made steps 10-20x slower and their timings meaningless in our runs.

--prefetch-factor and --sharing-strategy try DataLoader settings without touching the trainer
(they change which process does the work, not the data).

Each method runs in its own process (a fresh peak-memory counter, one data loader at a time, as in
training): --warmup steps, then --iters timed steps; with --rounds > 1 the methods run again in the
reverse order and each method keeps its best round. Step-time ratios between methods come from one
more process that alternates the methods' steps (ft, joint, mib, ...; ft, joint, ...): a load change
on a shared machine then hits every method alike, which separate runs cannot promise.

The breakdown comes from ``comformer.utils.timing`` sections (exclusive times; on CUDA the device is
synchronised at section boundaries): data-loader wait, teacher forward, pseudo-labels, student
forward (backbone + head), matching (all decoder layers), losses + distillation (the rest of the
model's forward: targets, criterion, KD / POD), backward, optimizer step; "other" is the remainder
of the step (loss sum, zero_grad, metrics). Timing changes no number: sections only read clocks.

Prints a table, writes JSON (bench/results/train_step.json, train_step_cuda.json on CUDA) and checks
the targets: comformer step <= 1.15x ft step; matching <= 10% of a step; data-loader wait < 5% of a
step (CPU config).

    .venv/bin/python bench/train_step.py                       # CPU, all methods
    .venv/bin/python bench/train_step.py --methods ft comformer --iters 5
    python bench/train_step.py --device cuda
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = ("ft", "joint", "mib", "plop", "comformer")
SECTIONS = (
    "data loader",
    "teacher forward",
    "pseudo-labels",
    "student forward",
    "matching",
    "losses + distillation",
    "backward",
    "optimizer",
    "other",
)
CONFIGS = {
    "cpu": "configs/synthetic/panoptic-segmentation/continual/{task}{suffix}.yaml",
    "cuda": "configs/ade20k/panoptic-segmentation/continual/{task}{suffix}.yaml",
}
DEFAULT_TASK = {"cpu": "10-10", "cuda": "100-10"}
TARGETS = {"comformer_vs_ft": 1.15, "matching_share": 0.10, "data_share": 0.05}


# ----------------------------------------------------------------------------- one method
def _config(args, method: str):
    from detectron2.config import get_cfg
    from detectron2.projects.deeplab import add_deeplab_config

    from comformer.config import add_comformer_config

    suffix = f"-{method}" if method in ("comformer", "eclipse") else ""
    path = REPO / CONFIGS[args.device].format(task=args.task, suffix=suffix)
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_comformer_config(cfg)
    cfg.merge_from_file(str(path))
    opts = ["CONT.METHOD", method, "MODEL.DEVICE", args.device, "MODEL.WEIGHTS", ""]
    if args.device == "cuda":
        # The paper's setting at batch 8 on one GPU.
        opts += ["SOLVER.IMS_PER_BATCH", 8, "INPUT.CROP.SIZE", (640, 640)]
        opts += ["SOLVER.AMP.ENABLED", True]
    else:
        opts += ["SOLVER.AMP.ENABLED", False]
    cfg.merge_from_list(opts + list(args.opts))
    cfg.freeze()
    return cfg, path


def _random_batches(cfg, classes, num_batches: int = 4):
    """Random images and rectangle masks at the crop size, labelled with ``classes`` (model ids)."""
    import torch

    from detectron2.structures import BitMasks, Instances

    g = torch.Generator().manual_seed(0)
    h, w = cfg.INPUT.CROP.SIZE
    batches = []
    for _ in range(num_batches):
        batch = []
        for _ in range(cfg.SOLVER.IMS_PER_BATCH):
            n = int(torch.randint(5, 16, (1,), generator=g))
            masks = torch.zeros((n, h, w), dtype=torch.bool)
            for j in range(n):
                y0, x0 = (int(v) for v in torch.randint(0, h - 32, (2,), generator=g))
                dy, dx = (int(v) for v in torch.randint(32, h // 2, (2,), generator=g))
                masks[j, y0 : y0 + dy, x0 : x0 + dx] = True
            masks[1:] &= ~masks[:-1].cumsum(0).bool()  # non-overlapping, as panoptic segments
            keep = masks.flatten(1).any(1)
            inst = Instances((h, w))
            inst.gt_masks = BitMasks(masks[keep])
            pick = torch.randint(0, len(classes), (int(keep.sum()),), generator=g)
            inst.gt_classes = torch.as_tensor(classes, dtype=torch.int64)[pick]
            image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
            batch.append({"image": image, "instances": inst, "height": h, "width": w})
        batches.append(batch)

    def forever():
        while True:
            yield from batches

    return forever()


class _TimedLoader:
    """The data loader with every ``next`` timed as the "data loader" section."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        from comformer.utils.timing import timed

        iterator = iter(self.loader)
        while True:
            with timed("data loader"):
                batch = next(iterator)
            yield batch


def _time_sections(trainer, model):
    """Sections that live in code this benchmark does not own: hooks, no source change."""
    from detectron2.engine import HookBase

    from comformer.utils.timing import timed

    open_sections = {}

    def enter(name):
        section = timed(name)
        section.__enter__()
        open_sections[name] = section

    def leave(name):
        open_sections.pop(name).__exit__(None, None, None)

    # The model's whole forward is "losses + distillation" minus the sections nested in it.
    model.register_forward_pre_hook(lambda *_: enter("losses + distillation"))
    model.register_forward_hook(lambda *_: leave("losses + distillation"))
    model.student.backbone.register_forward_pre_hook(lambda *_: enter("student forward"))
    model.student.sem_seg_head.register_forward_hook(lambda *_: leave("student forward"))

    # run_step calls zero_grad right before backward and the hooks' after_backward right after.
    optimizer = trainer.optimizer
    zero_grad, step = optimizer.zero_grad, optimizer.step

    def timed_zero_grad(*a, **k):
        zero_grad(*a, **k)
        enter("backward")

    def timed_step(*a, **k):
        with timed("optimizer"):
            return step(*a, **k)

    optimizer.zero_grad, optimizer.step = timed_zero_grad, timed_step

    class _AfterBackward(HookBase):
        def after_backward(self):
            leave("backward")

    trainer.register_hooks([_AfterBackward()])


def _set_prefetch_factor(loader, prefetch_factor: int) -> None:
    """Samples each worker keeps ready, on the DataLoader under detectron2's wrappers (read when
    the iterator is created, so it may be set until then)."""
    import torch.utils.data as torchdata

    inner = loader
    for _ in range(4):
        if isinstance(inner, torchdata.DataLoader):
            if inner.num_workers > 0:
                inner.prefetch_factor = prefetch_factor
            return
        inner = getattr(inner, "dataset", None)
    raise TypeError(f"no DataLoader found under {type(loader).__name__} to set prefetch_factor")


def _setup_process(args) -> None:
    import torch

    if args.sharing_strategy:
        torch.multiprocessing.set_sharing_strategy(args.sharing_strategy)
    if args.threads > 0:
        torch.set_num_threads(args.threads)


class MethodStep:
    """One method's step-1 training set-up (models, loader, optimizer, detectron2 trainer) and a
    timed :meth:`step`."""

    def __init__(self, args, method: str):
        import torch

        from detectron2.data import DatasetCatalog
        from detectron2.engine import AMPTrainer, SimpleTrainer
        from detectron2.modeling import build_model
        from detectron2.utils.events import EventStorage

        import comformer  # noqa: F401  (registers datasets and model parts)
        from comformer.continual import (
            build_continual_model,
            build_method,
            class_embed,
            grow_classifier_state_dict,
        )
        from comformer.data.scenario import build_scenario, register_step_dataset
        from comformer.engine import StepTrainer, build_optimizer, step_config
        from comformer.engine.step_trainer import FreezeOldClassesHook

        self.method = method
        cfg, self.path = _config(args, method)
        self.cuda = cfg.MODEL.DEVICE.startswith("cuda")
        scenario = build_scenario(cfg)
        step = args.step
        self.raw_cfg = cfg
        cfg = self.cfg = step_config(cfg, scenario, step)
        torch.manual_seed(cfg.SEED if cfg.SEED >= 0 else 0)
        cont = build_method(cfg, scenario, step)

        # As StepTrainer.build_model / resume_or_load, with a random step-0 model instead of the
        # previous step's checkpoint.
        previous = build_model(step_config(self.raw_cfg, scenario, step - 1)).state_dict()
        model = self.model = build_continual_model(cfg, scenario, step, cont, previous)
        student = model.student
        num_old = scenario.num_seen(step - 1)
        added = cont.added_state_keys(student)
        student.load_state_dict(
            grow_classifier_state_dict(previous, student.state_dict(), num_old, added_keys=added)
        )
        cont.init_new_classes(class_embed(student))
        cont.init_new_step(student)
        model.train()
        optimizer = build_optimizer(cfg, student)

        data = args.data
        if data == "auto":
            try:
                DatasetCatalog.get(register_step_dataset(scenario, step, cont.trains_on_all_seen))
                data = "real"
            except FileNotFoundError as e:
                print(f"[{method}] dataset absent ({e}); random data", file=sys.stderr)
                data = "random"
        self.data = data
        if data == "real":
            # The very loader of StepTrainer (it only reads method, scenario and step).
            owner = SimpleNamespace(method=cont, scenario=scenario, step=step)
            loader = StepTrainer.build_train_loader(owner, cfg)
            if args.prefetch_factor:
                _set_prefetch_factor(loader, args.prefetch_factor)
        else:
            # Model class indices: joint trains on every class seen, the others on the new ones.
            first = 0 if cont.trains_on_all_seen else num_old
            loader = _random_batches(cfg, list(range(first, scenario.num_seen(step))))

        trainer_cls = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        trainer = self.trainer = trainer_cls(model, _TimedLoader(loader), optimizer)
        if cfg.CONT.FREEZE_OLD_CLASSIFIER or cont.keeps_old_classifier:
            hook = FreezeOldClassesHook(student, num_old, no_object=cont.keeps_no_object_row)
            trainer.register_hooks([hook])
            hook.before_train()  # the timed steps run before_step / after_step only
        _time_sections(trainer, model)
        trainer.storage = EventStorage(0)
        self.iter = 0

    def step(self):
        """One training step: (seconds, exclusive seconds per section)."""
        import torch

        from comformer.utils import timing

        timing.enable_timing(True, synchronize=self.cuda)
        timing.reset_timing()
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer = self.trainer
        with trainer.storage:
            trainer.iter = self.iter
            trainer.before_step()
            trainer.run_step()
            trainer.after_step()
        if self.cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        timing.enable_timing(False)
        self.iter += 1
        totals = timing.timing_totals()
        totals["other"] = elapsed - sum(totals.values())
        return elapsed, totals

    def info(self) -> dict:
        cfg = self.cfg
        return {
            "method": self.method,
            "config": str(self.path.relative_to(REPO)),
            "data": self.data,
            "mask_activation": cfg.MODEL.MASK_FORMER.MASK_ACTIVATION,
            "batch_size": cfg.SOLVER.IMS_PER_BATCH,
            "crop": list(cfg.INPUT.CROP.SIZE),
            "amp": bool(cfg.SOLVER.AMP.ENABLED),
            "teacher": self.model.teacher is not None,
        }


def run_method(args, method: str) -> dict:
    """--warmup then --iters steps of one method, with its peak memory."""
    import torch

    _setup_process(args)
    runner = MethodStep(args, method)
    for _ in range(args.warmup):
        runner.step()
    if runner.cuda:
        torch.cuda.reset_peak_memory_stats()
    steps, sections = [], []
    for _ in range(args.iters):
        elapsed, totals = runner.step()
        steps.append(elapsed)
        sections.append(totals)
    if runner.cuda:
        peak, memory_kind = torch.cuda.max_memory_allocated(), "CUDA max allocated"
    else:  # ru_maxrss is in KiB on Linux
        peak, memory_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "max RSS"
    return {
        **runner.info(),
        "device": args.device,
        "step_seconds": steps,
        "sections": sections,
        "peak_memory_bytes": int(peak),
        "memory_kind": memory_kind,
        "torch_threads": torch.get_num_threads(),
    }


def run_paired(args, methods) -> dict:
    """
    The methods' steps alternated in one process (A B A B ...): a load change on a shared machine
    then hits both sides of each pair, and the per-pair step ratios are a steadier comparison than
    separate runs. (Data-loader waits are not representative here: each loader's worker gets the
    other method's step to prefetch in.)
    """
    _setup_process(args)
    runners = [MethodStep(args, m) for m in methods]
    for _ in range(args.warmup):
        for r in runners:
            r.step()
    steps = {m: [] for m in methods}
    for _ in range(args.iters):
        for m, r in zip(methods, runners):
            steps[m].append(r.step()[0])
    base = methods[0]
    ratios = {m: [b / a for a, b in zip(steps[base], steps[m])] for m in methods[1:]}
    return {
        "methods": list(methods),
        "step_seconds": steps,
        "ratio_to_first": ratios,
        "median_ratio_to_first": {m: statistics.median(r) for m, r in ratios.items()},
    }


# ----------------------------------------------------------------------------- orchestration
def _summary(run: dict) -> dict:
    steps = run["step_seconds"]
    mean_step = statistics.mean(steps)
    means = {s: statistics.mean(it.get(s, 0.0) for it in run["sections"]) for s in SECTIONS}
    return {
        "median_step": statistics.median(steps),
        "mean_step": mean_step,
        "section_seconds": means,
        "section_share": {s: v / mean_step for s, v in means.items()},
    }


def _run_worker(args, worker: list) -> dict:
    """Run ``--worker METHOD`` (or ``--worker paired M1 M2``) in a new process; its JSON result."""
    cmd = [sys.executable, __file__, "--worker", *worker, "--device", args.device]
    cmd += ["--task", args.task, "--step", str(args.step)]
    cmd += ["--iters", str(args.iters), "--warmup", str(args.warmup)]
    cmd += ["--data", args.data, "--threads", str(args.threads)]
    if args.prefetch_factor:
        cmd += ["--prefetch-factor", str(args.prefetch_factor)]
    if args.sharing_strategy:
        cmd += ["--sharing-strategy", args.sharing_strategy]
    if args.opts:
        cmd += ["--opts", *map(str, args.opts)]
    out = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, check=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _print_table(results: dict, methods) -> None:
    ft = results.get("ft")
    head = "| method | s/iter | vs ft | " + " | ".join(SECTIONS) + " | peak mem (GiB) |"
    print(head)
    print("|---" * (4 + len(SECTIONS)) + "|")
    for m in methods:
        r = results[m]
        s = r["summary"]
        vs = f"{s['median_step'] / ft['summary']['median_step']:.2f}x" if ft else "-"
        shares = " | ".join(f"{100 * s['section_share'][x]:.1f}%" for x in SECTIONS)
        mem = r["peak_memory_bytes"] / 2**30
        print(f"| {m} | {s['median_step']:.3f} | {vs} | {shares} | {mem:.2f} |")


def _targets(results: dict, paired: Optional[dict], device: str) -> dict:
    out = {}
    if paired and "comformer" in paired["median_ratio_to_first"]:
        out["comformer_vs_ft"] = {
            "value": paired["median_ratio_to_first"]["comformer"],
            "how": "median of per-pair step ratios, steps alternated in one process",
            "target": TARGETS["comformer_vs_ft"],
        }
    worst = max(results, key=lambda m: results[m]["summary"]["section_share"]["matching"])
    out["matching_share"] = {
        "value": results[worst]["summary"]["section_share"]["matching"],
        "method": worst,
        "target": TARGETS["matching_share"],
    }
    if device == "cpu":
        worst = max(results, key=lambda m: results[m]["summary"]["section_share"]["data loader"])
        out["data_share"] = {
            "value": results[worst]["summary"]["section_share"]["data loader"],
            "method": worst,
            "target": TARGETS["data_share"],
        }
    for name, t in out.items():
        t["met"] = t["value"] < t["target"] if name == "data_share" else t["value"] <= t["target"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--task", default=None, help="scenario (default 10-10 cpu, 100-10 cuda)")
    parser.add_argument("--step", type=int, default=1, help="the incremental step trained")
    parser.add_argument("--iters", type=int, default=None, help="timed steps (cpu 10, cuda 20)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--data", choices=("auto", "real", "random"), default="auto")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: 1 on cpu, torch's default on cuda; 0: torch's)",
    )
    parser.add_argument(
        "--prefetch-factor",
        type=int,
        default=0,
        help="loader trial: samples each DataLoader worker keeps ready (default: the trainer's)",
    )
    parser.add_argument(
        "--sharing-strategy",
        choices=("file_descriptor", "file_system"),
        default=None,
        help="loader trial: torch.multiprocessing tensor sharing (default: torch's)",
    )
    parser.add_argument("--output", default=None)
    parser.add_argument("--worker", nargs="+", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--opts", nargs="*", default=[], help="config overrides KEY VALUE ...")
    args = parser.parse_args()
    args.task = args.task or DEFAULT_TASK[args.device]
    args.iters = args.iters or (10 if args.device == "cpu" else 20)
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    if args.step < 1:
        parser.error("--step must be an incremental step (>= 1)")

    if args.worker:
        if args.worker[0] == "paired":
            print(json.dumps(run_paired(args, args.worker[1:])))
        else:
            print(json.dumps(run_method(args, args.worker[0])))
        return 0

    runs = {m: [] for m in args.methods}
    for r in range(args.rounds):
        order = args.methods if r % 2 == 0 else args.methods[::-1]
        for m in order:
            print(f"round {r + 1}/{args.rounds}: {m} ...", flush=True)
            run = _run_worker(args, [m])
            run["summary"] = _summary(run)
            runs[m].append(run)
    results = {m: min(rs, key=lambda x: x["summary"]["median_step"]) for m, rs in runs.items()}
    paired = None
    if "ft" in args.methods and len(args.methods) > 1:
        order = ["ft"] + [m for m in args.methods if m != "ft"]
        print(f"paired: {' '.join(order)} alternated ...", flush=True)
        paired = _run_worker(args, ["paired", *order])

    first = results[args.methods[0]]
    print(
        f"\n{args.device}: {first['config']} step {args.step}, batch {first['batch_size']}, "
        f"crop {first['crop']}, AMP {first['amp']}, data {first['data']}, "
        f"{args.iters} steps after {args.warmup} warm-up, best of {args.rounds} round(s), "
        f"{first['torch_threads']} torch thread(s); "
        f"share of the mean step per section; peak memory = {first['memory_kind']}\n"
    )
    _print_table(results, args.methods)
    if paired:
        print(
            "\nalternated in one process, median step ratio to ft: "
            + ", ".join(f"{m} {r:.2f}x" for m, r in paired["median_ratio_to_first"].items())
        )
    targets = _targets(results, paired, args.device)
    print()
    for name, t in targets.items():
        where = f" ({t['method']})" if "method" in t else ""
        print(
            f"target {name}: {t['value']:.3f}{where} vs {t['target']} -> "
            f"{'met' if t['met'] else 'MISSED'}"
        )
    out = {
        "device": args.device,
        "task": args.task,
        "step": args.step,
        "iters": args.iters,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "threads": args.threads,
        "prefetch_factor": args.prefetch_factor or None,
        "sharing_strategy": args.sharing_strategy,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "targets": targets,
        "methods": results,
        "paired": paired,
    }
    default = "train_step.json" if args.device == "cpu" else "train_step_cuda.json"
    path = Path(args.output or REPO / "bench/results" / default)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
