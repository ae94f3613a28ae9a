#!/usr/bin/env python
"""The main job run by `make demo`: train and evaluate on the built-in synthetic dataset.

Generates the synthetic dataset on first use (under $DETECTRON2_DATASETS, default ./datasets), trains
the small CPU Mask2Former jointly on all classes and prints PQ / mIoU from detectron2's evaluators.
"""
import argparse
import sys
import time

from detectron2.engine import default_argument_parser

import comformer  # noqa: F401  (registers datasets and model parts)
from comformer.engine import Trainer, setup_cfg

CONFIG = "configs/synthetic/panoptic-segmentation/maskformer2_R18_cpu.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--iters", type=int, default=600, help="training iterations")
    parser.add_argument("--output-dir", default="./output/demo")
    args = parser.parse_args()

    d2_args = default_argument_parser().parse_args(
        [
            "--config-file",
            CONFIG,
            "MODEL.DEVICE",
            args.device,
            "SOLVER.MAX_ITER",
            str(args.iters),
            "OUTPUT_DIR",
            args.output_dir,
        ]
    )
    cfg = setup_cfg(d2_args)
    start = time.perf_counter()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    results = Trainer.test(cfg, trainer.model)
    elapsed = time.perf_counter() - start
    for dataset, metrics in results.items():
        pq = metrics.get("panoptic_seg", {})
        sem = metrics.get("sem_seg", {})
        print(
            f"{dataset}: PQ {pq.get('PQ', float('nan')):.1f}  SQ {pq.get('SQ', float('nan')):.1f}  "
            f"RQ {pq.get('RQ', float('nan')):.1f}  mIoU {sem.get('mIoU', float('nan')):.1f}  "
            f"({args.iters} iterations, {elapsed:.0f} s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
