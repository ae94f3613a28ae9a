#!/usr/bin/env python
"""Speed and memory of CoMFormer's mask-based pseudo-labels: the official per-query loop, the
vectorised comformer implementation it replaced ("comformer before") and the current one.

Implementations (all return B pairs (labels (n_b,), masks (n_b, H, W) bool)):
  official loop     :func:`official_loop`, a re-implementation of ``make_pseudolabels2`` in
                    fcdl94/CoMFormer, continual/method_wrapper/maskformer.py
                    (``MaskFormerDistillation``): the batch's masks upsampled at once, then per
                    image a softmax (or sigmoid), the kept queries' argmax and a Python loop
                    over the kept queries. Its outputs were checked equal to those of the
                    official function itself (run from fcdl94/CoMFormer at commit 640496b, with
                    a stand-in ``self``) on 200 random teachers of both mask activations.
  comformer before  :func:`comformer_before`, comformer's previous ``mask_pseudo_labels``
                    (commit 476f402): every query of every image at full resolution at once,
                    then counts by bincount. It kept queries with ``score >= threshold``; the
                    official code (and comformer now) keeps ``score > threshold``. With the
                    default threshold 0 both keep the same queries (a softmax score is > 0).
  comformer         ``comformer.continual.pseudo_labels.mask_pseudo_labels``.

Teachers: B images, Q queries, K old classes + no-object, masks h x w, images H x W. A teacher
has a few object queries per image (drawn in the regime's range: their class logit wins), the
others predict no-object. Masks are smooth low-resolution logit fields as a mask head makes
them: object queries (and 30% of the others) are blobs (an ellipse, positive inside, with a
random sharpness, plus smooth noise), the remaining no-object queries smooth negative noise.
0-3 rectangles of ground truth cover part of each image. ``--teacher rough``: every mask is
independent noise at each mask pixel instead, the worst case for comformer's cell bounds (they
decide almost nothing, and every pixel is computed exactly).

Timing: the implementations run alternated (official, before, new, official, ...) ``--repeats``
times on the same inputs with one torch thread; the table shows the median ms per call and the
ratio of the medians to the official loop's.

Memory: the peak of the memory held by torch's CPU allocator during one call (its result
included), from the profiler's memory events ("Total Allocated" above its value at the call's
start): every tensor the call allocates, whatever the C library does with freed memory (a
process's peak RSS cannot be reset and keeps freed heap pages). Kernels' own scratch buffers
(a few KB) are not seen.

Outputs of the three are compared with ``torch.equal`` (labels and masks) on every case.

    .venv/bin/python bench/pseudo_labels.py                  # B=8, Q=100, 160 -> 640 px
    .venv/bin/python bench/pseudo_labels.py --sizes small    # quick: B=2, 64 -> 256 px
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from comformer.continual.pseudo_labels import mask_pseudo_labels  # noqa: E402

PseudoLabels = List[Tuple[Tensor, Tensor]]

SIZES = {
    # B, Q, K old classes, mask (h, w), image (H, W)
    "full": dict(images=8, queries=100, classes=101, mask_size=(160, 160), size=(640, 640)),
    "small": dict(images=2, queries=100, classes=101, mask_size=(64, 64), size=(256, 256)),
}
REGIMES = {"0-5": (0, 5), "10-30": (10, 30), "50-90": (50, 90)}


# ------------------------------------------------------------------------- implementations
@torch.no_grad()
def official_loop(
    pred_logits: Tensor,
    pred_masks: Tensor,
    covered: Tensor,
    *,
    mask_activation: str,
    score_threshold: float = 0.0,
    mask_threshold: float = 0.5,
) -> PseudoLabels:
    """
    The official CoMFormer pseudo-labelling, query by query (the behaviour of
    ``MaskFormerDistillation.make_pseudolabels2``, fcdl94/CoMFormer
    continual/method_wrapper/maskformer.py), written with comformer's arguments: ``covered`` is
    the union of the ground-truth masks (``tar['masks'].sum(0).bool()`` there), its size the
    size the masks are upsampled to (the first image's size there: the same in training, where
    crops share one padded size), and the pseudo segments are returned instead of appended to
    the targets. ``mask_threshold`` is its fixed 0.5.
    """
    size = tuple(covered.shape[-2:])
    no_object = pred_logits.shape[-1] - 1
    # The whole batch, every query, at full resolution (as the official code does).
    masks = F.interpolate(pred_masks.float(), size=size, mode="bilinear", align_corners=False)
    out = []
    for i in range(pred_logits.shape[0]):
        scores, labels = F.softmax(pred_logits[i].float(), dim=-1).max(-1)
        probs = masks[i].sigmoid() if mask_activation == "sigmoid" else masks[i].softmax(dim=0)
        keep = (labels != no_object) & (scores > score_threshold)
        kept_scores, kept_labels, kept_probs = scores[keep], labels[keep], probs[keep]
        segments = []
        chosen = []
        if len(kept_probs) > 0:
            winner = (kept_scores.view(-1, 1, 1) * kept_probs).argmax(0)
            winner[covered[i]] = -1
            for k in range(len(kept_labels)):
                won = winner == k
                binarised = kept_probs[k] >= mask_threshold
                won_area = won.sum().item()
                bin_area = binarised.sum().item()
                segment = won & binarised
                if won_area > 0 and bin_area > 0 and segment.sum().item() > 0:
                    if won_area / bin_area > 0.5:
                        chosen.append(k)
                        segments.append(segment)
        if chosen:
            out.append((kept_labels[chosen], torch.stack(segments)))
        else:
            out.append((labels.new_zeros(0), covered.new_zeros((0,) + size)))
    return out


@torch.no_grad()
def comformer_before(
    pred_logits: Tensor,
    pred_masks: Tensor,
    covered: Tensor,
    *,
    mask_activation: str,
    score_threshold: float = 0.0,
    mask_threshold: float = 0.5,
) -> PseudoLabels:
    """comformer's ``mask_pseudo_labels`` before this bench (commit 476f402), unchanged."""
    num_images, num_queries = pred_logits.shape[:2]
    size = covered.shape[-2:]
    masks = F.interpolate(pred_masks.float(), size=size, mode="bilinear", align_corners=False)
    if mask_activation == "sigmoid":
        probs = masks.sigmoid()
    else:
        probs = masks.softmax(dim=1)
    del masks
    scores, labels = pred_logits.float().softmax(-1).max(-1)
    no_object = pred_logits.shape[-1] - 1
    keep = (labels != no_object) & (scores >= score_threshold)

    binarised = probs >= mask_threshold
    bin_area = binarised.flatten(2).sum(-1, dtype=torch.int32)
    weighted = probs.mul_(scores[:, :, None, None])
    weighted[~keep] = -1.0
    winner = weighted.max(1).indices
    del weighted, probs
    assignable = keep.any(1)[:, None, None] & ~covered
    winner_bin = binarised.gather(1, winner[:, None])[:, 0] & assignable
    del binarised

    flat_winner = (
        winner + torch.arange(num_images, device=winner.device)[:, None, None] * num_queries
    )
    won_area = torch.bincount(flat_winner[assignable], minlength=num_images * num_queries)
    won_in_bin = torch.bincount(flat_winner[winner_bin], minlength=num_images * num_queries)
    won_area = won_area.view(num_images, num_queries)
    won_in_bin = won_in_bin.view(num_images, num_queries)
    selected = keep & (won_in_bin > 0) & (2 * won_area > bin_area)

    batch_idx, query_idx = selected.nonzero(as_tuple=True)
    taken_by = torch.where(winner_bin, winner, torch.full_like(winner, -1))
    seg_masks = taken_by[batch_idx] == query_idx[:, None, None]
    counts = torch.bincount(batch_idx, minlength=num_images).tolist()
    return list(zip(labels[batch_idx, query_idx].split(counts), seg_masks.split(counts)))


IMPLEMENTATIONS: Dict[str, Callable[..., PseudoLabels]] = {
    "official loop": official_loop,
    "comformer before": comformer_before,
    "comformer": mask_pseudo_labels,
}


# ------------------------------------------------------------------------- teachers
def make_teacher(
    images: int,
    queries: int,
    classes: int,
    mask_size: Tuple[int, int],
    size: Tuple[int, int],
    objects: Tuple[int, int],
    seed: int = 0,
    rough: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """
    A random teacher (see the module docstring) and ground-truth coverage.

    Returns:
        pred_logits (B, Q, K+1), pred_masks (B, Q, h, w), covered (B, H, W) bool.
    """
    g = torch.Generator().manual_seed(seed)
    h, w = mask_size
    H, W = size

    def rand(*shape):
        return torch.rand(shape, generator=g)

    def randint(lo, hi):
        return int(torch.randint(lo, hi, (1,), generator=g))

    logits = torch.randn(images, queries, classes + 1, generator=g)
    logits[:, :, classes] += 6.0
    noise = torch.randn(images * queries, 1, 8, 8, generator=g)
    noise = F.interpolate(noise, size=mask_size, mode="bicubic", align_corners=False)
    noise = noise.view(images, queries, h, w)
    yy = torch.arange(h, dtype=torch.float32)[:, None]
    xx = torch.arange(w, dtype=torch.float32)[None, :]
    scale = min(h, w) / 160
    masks = torch.empty(images, queries, h, w)
    covered = torch.zeros(images, H, W, dtype=torch.bool)
    for b in range(images):
        num_objects = randint(objects[0], objects[1] + 1)
        is_object = torch.zeros(queries, dtype=torch.bool)
        is_object[torch.randperm(queries, generator=g)[:num_objects]] = True
        obj = is_object.nonzero()[:, 0]
        logits[b, obj, classes] -= 6.0
        logits[b, obj, torch.randint(0, classes, (len(obj),), generator=g)] += 3 + 5 * rand(
            len(obj)
        )
        blob = is_object | (rand(queries) < 0.3)
        for q in range(queries):
            if blob[q]:
                cy, cx = float(rand(1)) * h, float(rand(1)) * w
                ry, rx = (6 + 34 * rand(2)) * scale
                dist = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2).sqrt()
                sharpness = 4 + 8 * float(rand(1))
                masks[b, q] = (sharpness * (1 - dist)).clamp(min=-15) + noise[b, q]
            else:
                masks[b, q] = -4 + 2 * noise[b, q]
        if rough:
            masks[b] = 4 * torch.randn(queries, h, w, generator=g) - 2
        for _ in range(randint(0, 4)):
            y0, x0 = randint(0, H - H // 10), randint(0, W - W // 10)
            covered[b, y0 : y0 + randint(H // 20, H // 3), x0 : x0 + randint(W // 20, W // 3)] = (
                True
            )
    return logits, masks, covered


# ------------------------------------------------------------------------- measuring
def peak_tensor_mib(fn: Callable[[], object]) -> float:
    """
    Peak memory held by torch's CPU allocator during ``fn()`` (its result included), MiB: the
    largest "Total Allocated" of the profiler's memory events, above its value when ``fn``
    starts. Scratch buffers that kernels allocate themselves (a few KB) are not seen.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e["args"] for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    if not events:
        return 0.0
    # The running total does not restart with each profiler: measured from its first value.
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return (max(e["Total Allocated"] for e in events) - start) / 2**20


def same_outputs(a: PseudoLabels, b: PseudoLabels) -> bool:
    return len(a) == len(b) and all(
        torch.equal(la, lb) and torch.equal(ma, mb) for (la, ma), (lb, mb) in zip(a, b)
    )


def run_case(args, sizes: dict, regime: str, activation: str, seed: int) -> dict:
    logits, masks, covered = make_teacher(
        **sizes, objects=REGIMES[regime], seed=seed, rough=args.teacher == "rough"
    )
    kwargs = dict(mask_activation=activation)
    names = list(IMPLEMENTATIONS)
    outputs = {name: IMPLEMENTATIONS[name](logits, masks, covered, **kwargs) for name in names}
    reference = outputs["official loop"]
    equal = {name: same_outputs(outputs[name], reference) for name in names}
    kept = int((logits.softmax(-1).argmax(-1) != logits.shape[-1] - 1).sum(1).float().mean().item())
    segments = sum(len(labels) for labels, _ in reference) / len(reference)
    del outputs, reference
    times = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            start = time.perf_counter()
            IMPLEMENTATIONS[name](logits, masks, covered, **kwargs)
            times[name].append(time.perf_counter() - start)
    memory = {
        name: peak_tensor_mib(lambda: IMPLEMENTATIONS[name](logits, masks, covered, **kwargs))
        for name in names
    }
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    return {
        "regime": regime,
        "activation": activation,
        "kept_queries_per_image": kept,
        "segments_per_image": segments,
        "ms": ms,
        "ms_all": {name: [1000 * x for x in t] for name, t in times.items()},
        "speedup_vs_official": {name: ms["official loop"] / ms[name] for name in names},
        "peak_mib": memory,
        "equal_to_official": equal,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", choices=sorted(SIZES), default="full")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=list(REGIMES))
    parser.add_argument("--activations", nargs="+", default=["softmax", "sigmoid"])
    parser.add_argument("--teacher", choices=["smooth", "rough"], default="smooth")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "pseudo_labels.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = SIZES[args.sizes]

    rows = []
    for activation in args.activations:
        for regime in args.regimes:
            row = run_case(args, sizes, regime, activation, args.seed)
            rows.append(row)
            print(
                f"{activation:8s} {regime:6s} kept/image {row['kept_queries_per_image']:3d} "
                f"segments/image {row['segments_per_image']:.1f}",
                flush=True,
            )

    names = list(IMPLEMENTATIONS)
    print()
    print(
        "| masks | objects / image | implementation | ms / call | vs official | peak MiB | equal |"
    )
    print("|---|---|---|---:|---:|---:|---|")
    for row in rows:
        for name in names:
            print(
                f"| {row['activation']} | {row['regime']} | {name} | {row['ms'][name]:.0f} | "
                f"{row['speedup_vs_official'][name]:.1f}x | {row['peak_mib'][name]:.0f} | "
                f"{'yes' if row['equal_to_official'][name] else 'NO'} |"
            )
    result = {
        "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in sizes.items()},
        "sizes_name": args.sizes,
        "teacher": args.teacher,
        "repeats": args.repeats,
        "threads": args.threads,
        "seed": args.seed,
        "memory_method": "peak of torch.profiler memory events' Total Allocated (CPU allocator) "
        "during one call, its result included",
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")
    if not all(all(row["equal_to_official"].values()) for row in rows):
        sys.exit("outputs differ from the official loop")


if __name__ == "__main__":
    main()
