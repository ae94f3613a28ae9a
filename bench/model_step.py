#!/usr/bin/env python
"""One Mask2Former training step, comformer's model against the official Mask2Former code.

The configuration is the official ADE20K panoptic R50 (``maskformer2_R50_bs16_160k.yaml``: 100
queries, 150 classes, 6 deformable encoder layers, 9 decoder layers, deep supervision, 12544
points per mask) at 128 x 128 images, batch 4, on CPU in float32 with one torch thread. Both
models get the same random weights (the first worker writes them, the others load them strictly:
the state dicts are the same), the same images and targets (12 random segments per image) and the
same seed before every step; a step is forward (losses), backward and an AdamW update.

comformer and the official code both register ``MaskFormer`` in detectron2's registries, so they
cannot share a process: each measurement is a worker process, and the two alternate (official,
comformer; comformer, official; ...) for --rounds rounds, so that a load change on a shared machine
hits both alike. Per implementation the result is the median step time over all its rounds (wall
clock, and the process's CPU time, steadier when other jobs share the cores), and
the peak memory (max RSS of its workers). The first step's losses of both are printed side by side
(same weights, inputs and random points: they agree to float32 rounding when the implementations
compute the same thing).

    .venv/bin/python bench/model_step.py                                   # comformer only
    .venv/bin/python bench/model_step.py --mask2former /path/to/Mask2Former  # side by side

The official code is an unmodified checkout of facebookresearch/Mask2Former (tested at 9b0651c):

    git clone https://github.com/facebookresearch/Mask2Former /tmp/Mask2Former
    .venv/bin/python bench/model_step.py --mask2former /tmp/Mask2Former

It runs in this project's environment (torch, detectron2, scipy) with the stubs of
tests/data/mask2former_parity/make_reference.py (its compiled deformable-attention op replaced by
its own pure-PyTorch function, which it falls back to on CPU anyway; timm's helpers; the package's
``__init__`` bypassed). Writes bench/results/model_step.json.
"""

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/ade20k/panoptic-segmentation/maskformer2_R50_bs16_160k.yaml"
IMPLS = ("official", "comformer")


def _official_config(repo: Path):
    spec = importlib.util.spec_from_file_location(
        "make_reference", REPO / "tests/data/mask2former_parity/make_reference.py"
    )
    make_reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_reference)
    sys.path.insert(0, str(repo))
    add_maskformer2_config = make_reference._import_official(repo)
    from detectron2.config import get_cfg
    from detectron2.projects.deeplab import add_deeplab_config

    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    cfg.merge_from_file(str(repo / CONFIG))
    return cfg


def _comformer_config():
    sys.path.insert(0, str(REPO))
    from comformer.config import add_comformer_config
    from detectron2.config import get_cfg
    from detectron2.projects.deeplab import add_deeplab_config

    import comformer  # noqa: F401  (registers the model)

    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_comformer_config(cfg)
    cfg.merge_from_file(str(REPO / CONFIG))
    return cfg


def _inputs(batch: int, size: int, segments: int, num_classes: int, seed: int):
    import torch
    from detectron2.structures import Instances

    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    inputs = []
    for _ in range(batch):
        image = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
        masks = []
        for _ in range(segments):  # random ellipses, some overlapping
            cy, cx = torch.randint(0, size, (2,), generator=g).tolist()
            ry, rx = torch.randint(size // 16, size // 3, (2,), generator=g).tolist()
            masks.append(((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1)
        inst = Instances((size, size))
        inst.gt_classes = torch.randint(0, num_classes, (segments,), generator=g)
        inst.gt_masks = torch.stack(masks)
        inputs.append({"image": image, "instances": inst, "height": size, "width": size})
    return inputs


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    cfg = (
        _official_config(Path(args.mask2former)) if args.impl == "official" else _comformer_config()
    )
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    from detectron2.modeling import build_model

    torch.manual_seed(args.seed)
    model = build_model(cfg)
    weights = Path(args.weights)
    if weights.is_file():
        model.load_state_dict(torch.load(weights, map_location="cpu"), strict=True)
    else:
        torch.save(model.state_dict(), weights)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    inputs = _inputs(
        args.batch, args.size, args.segments, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, args.seed
    )
    times, cpu_times, first = [], [], None
    for i in range(args.warmup + args.iters):
        torch.manual_seed(args.seed + i)
        start, cpu_start = time.perf_counter(), time.process_time()
        losses = model(inputs)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if i == 0:
            first = {k: float(v) for k, v in sorted(losses.items())}
        if i >= args.warmup:
            times.append(elapsed)
            cpu_times.append(cpu)
    return {
        "impl": args.impl,
        "times": times,
        "cpu_times": cpu_times,
        "median_s": statistics.median(times),
        "median_cpu_s": statistics.median(cpu_times),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "first_step_losses": first,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--mask2former", default=None, help="checkout of the official code")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=5, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--segments", type=int, default=12, help="segments per image")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(REPO / "bench/results/model_step.json"))
    parser.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:  # a worker: one JSON line on stdout
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    if (
        args.mask2former
        and not (Path(args.mask2former) / "mask2former/maskformer_model.py").is_file()
    ):
        parser.error(f"--mask2former {args.mask2former}: not a Mask2Former checkout "
                     "(no mask2former/maskformer_model.py)")  # fmt: skip
    impls = list(IMPLS) if args.mask2former else ["comformer"]
    results = {impl: [] for impl in impls}
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "weights.pth")
        for r in range(args.rounds):
            for impl in impls if r % 2 == 0 else impls[::-1]:
                cmd = [sys.executable, __file__, "--impl", impl, "--weights", weights]
                for key in (
                    "mask2former",
                    "iters",
                    "warmup",
                    "batch",
                    "size",
                    "segments",
                    "threads",
                    "seed",
                ):
                    value = getattr(args, key)
                    if value is not None:
                        cmd += [f"--{key}", str(value)]
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode != 0 or not line:
                    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
                    raise SystemExit(f"{impl} worker failed (exit {proc.returncode})")
                res = json.loads(line[0][len("RESULT ") :])
                results[impl].append(res)
                print(f"round {r + 1}/{args.rounds} {impl}: median {res['median_s']:.3f} s/step "
                      f"({res['median_cpu_s']:.3f} s CPU), "
                      f"peak {res['peak_rss_gib']:.2f} GiB", flush=True)  # fmt: skip
    summary = {}
    for impl in impls:
        times = [t for res in results[impl] for t in res["times"]]
        cpu = [t for res in results[impl] for t in res["cpu_times"]]
        summary[impl] = {
            "median_s": statistics.median(times),
            "median_cpu_s": statistics.median(cpu),
            "peak_rss_gib": max(res["peak_rss_gib"] for res in results[impl]),
            "first_step_losses": results[impl][0]["first_step_losses"],
        }
    title = (f"Mask2Former training step, {CONFIG} (R50, 100 queries, 150 classes), {args.size} px, "
             f"batch {args.batch}, CPU, {args.threads} thread(s), {args.rounds} rounds x {args.iters} steps")  # fmt: skip
    lines = [title, "", "| implementation | s/step (median) | peak RSS (GiB) |", "|---|---:|---:|"]
    for impl in impls:
        lines.append(
            f"| {impl} | {summary[impl]['median_s']:.3f} | {summary[impl]['peak_rss_gib']:.2f} |"
        )
    if "official" in summary:
        speedup = summary["official"]["median_s"] / summary["comformer"]["median_s"]
        memory = summary["comformer"]["peak_rss_gib"] / summary["official"]["peak_rss_gib"]
        cpu_speedup = summary["official"]["median_cpu_s"] / summary["comformer"]["median_cpu_s"]
        summary["speedup_vs_official"] = speedup
        summary["cpu_speedup_vs_official"] = cpu_speedup
        summary["memory_vs_official"] = memory
        lines += ["", f"comformer is {speedup:.2f}x faster than the official step (target >= 1.5x), "
                      f"({cpu_speedup:.2f}x in CPU time) at {memory:.2f}x its peak memory"]  # fmt: skip
        a, b = summary["official"]["first_step_losses"], summary["comformer"]["first_step_losses"]
        worst = max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-12) for k in a if k in b)
        summary["first_step_max_rel_loss_diff"] = worst
        missing = sorted(set(a) ^ set(b))
        lines.append(f"first-step losses: max relative difference {worst:.2e} over {len(a)} terms"
                     + (f"; terms in one only: {missing}" if missing else ""))  # fmt: skip
    else:
        lines += ["", "(no --mask2former checkout given: comformer alone)"]
    print("\n" + "\n".join(lines))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                               "summary": summary, "rounds": results}, indent=1))  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
