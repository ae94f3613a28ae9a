#!/usr/bin/env python
"""Train or evaluate a comformer model from a yaml config (detectron2's command line).

A config without a continual scenario trains one model:

    python tools/train_net.py --config-file configs/synthetic/panoptic-segmentation/maskformer2_R18_cpu.yaml
    python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS model_final.pth
    python tools/train_net.py --config-file CFG --num-gpus 8

A config with CONT.TASK (or CONT.STEP_CLASSES) runs the whole scenario, each step in
OUTPUT_DIR/step<t> (finished steps are skipped; --resume continues a half-finished one), or one
step with CONT.STEP t:

    python tools/train_net.py --quiet --config-file configs/synthetic/panoptic-segmentation/continual/10-2-comformer.yaml
"""

import sys
import warnings

# fvcore's import-time deprecation notice about torch.jit.script: nothing a user can act on
warnings.filterwarnings(
    "ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning
)

from detectron2.engine import default_argument_parser, launch  # noqa: E402
from torch.multiprocessing import ProcessExitedException  # noqa: E402

import comformer  # noqa: E402,F401  (registers datasets, model parts and methods)
from comformer.continual import METHOD_REGISTRY  # noqa: E402
from comformer.data.scenario import build_scenario  # noqa: E402
from comformer.engine import Trainer, run_scenario, setup_cfg  # noqa: E402
from comformer.engine.console import PROGRESS, run_with_readable_errors  # noqa: E402
from comformer.engine.results import eval_summary  # noqa: E402
from comformer.utils.io import AtomicDetectionCheckpointer  # noqa: E402

EPILOG = """
Continual scenarios (config keys; in the yaml, or as KEY VALUE pairs after the options):
  CONT.TASK <base>-<inc>         e.g. 100-10: <base> classes first, then <inc> per step
  CONT.STEP_CLASSES [[...], ...] or the class ids of each step (CONT.TASK "")
  CONT.METHOD NAME               {methods}
  CONT.STEP t                    run step t only (-1: every step; finished steps are skipped)
  CONT.MODE overlap|disjoint     may a step's images show future classes (unlabelled)
  CONT.ORDER, ORDER_FILE, ORDER_SEED       class order (default: the dataset's)
  CONT.INC_ITERS_PER_CLASS, INC_MAX_ITER, INC_BASE_LR   schedule of the incremental steps
  CONT.BASE_WEIGHTS FILE         start from a finished base step (step0/model_final.pth)
  DATASETS.CUSTOM.NAME, ROOT, KIND, ...    register your own dataset (README: "Your own data")
Each step writes OUTPUT_DIR/step<t>/ (checkpoints, log, vis/ pictures); OUTPUT_DIR/results.json,
.csv, .md, .png hold old / new / all PQ and mIoU per step. Look at a step's predictions with
tools/predict.py. README.md, sections "Continual scenarios", "Methods", "Your own data", explains
every key; comformer/config.py has one comment per key.

Examples:
  {prog} --quiet --config-file configs/synthetic/panoptic-segmentation/continual/10-10.yaml CONT.METHOD mib
  {prog} --config-file CFG --resume            continue a killed run where it stopped
  {prog} --config-file CFG --num-gpus 8        8 GPUs (--num-machines, --machine-rank, --dist-url)
"""


def build_parser():
    methods = ", ".join(sorted(name.lower() for name, _ in METHOD_REGISTRY))
    parser = default_argument_parser(
        epilog=EPILOG.format(methods=methods, prog="tools/train_net.py")
    )
    parser.description = (
        "Train or evaluate a Mask2Former model; with a continual config (CONT.TASK or\n"
        "CONT.STEP_CLASSES), run the whole scenario: the base step, then every increment."
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="console: progress, results and warnings only (everything stays in OUTPUT_DIR/log.txt)",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of a config or data error (default: one line, traceback in the log)",
    )
    return parser


def main(args):
    # getattr: scripts may call main() with the args of detectron2's own parser
    return run_with_readable_errors(lambda: _main(args), debug=getattr(args, "debug", False))


def _main(args):
    cfg = setup_cfg(args)
    if build_scenario(cfg) is not None:
        return run_scenario(cfg, resume=args.resume, eval_only=args.eval_only)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        # weights_only loading: a checkpoint cannot run code
        AtomicDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        trainer.train()
        results = getattr(trainer, "_last_eval_results", None)
    if results:
        PROGRESS.info("results:\n" + eval_summary(results))
    return results


if __name__ == "__main__":
    args = build_parser().parse_args()
    try:
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except ProcessExitedException as e:  # a worker process ended on an error it reported
        sys.exit(e.exit_code)
