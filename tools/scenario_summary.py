#!/usr/bin/env python
"""Print a continual scenario's steps: classes and training images per step.

    python tools/scenario_summary.py --config-file configs/ade20k/panoptic-segmentation/continual/100-10.yaml
    python tools/scenario_summary.py --config-file CFG CONT.TASK 50-50 CONT.MODE disjoint

Image counts need the dataset on disk; without it the class split is printed and the counts are left
blank with the reason.
"""
import argparse
import sys

from detectron2.data import DatasetCatalog

import comformer  # noqa: F401  (registers datasets)
from comformer.data.scenario import build_scenario, register_step_dataset, scenario_summary
from comformer.engine.trainer import load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--no-images", action="store_true", help="do not load the data to count images")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (KEY VALUE ...)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config_file, args.opts)  # registers DATASETS.CUSTOM too
    scenario = build_scenario(cfg)
    if scenario is None:
        print(f"{args.config_file} describes no continual scenario (set CONT.TASK)", file=sys.stderr)
        return 2
    counts = None
    if not args.no_images:
        try:
            counts = [
                len(DatasetCatalog.get(register_step_dataset(scenario, t)))
                for t in range(scenario.num_steps)
            ]
        except (FileNotFoundError, ValueError) as e:
            print(f"(image counts unavailable: {e})\n")
    print(scenario_summary(scenario, counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
