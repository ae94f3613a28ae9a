#!/usr/bin/env python
"""Train or evaluate a comformer model from a yaml config (detectron2's command line).

A config without a continual scenario trains one model:

    python tools/train_net.py --config-file configs/synthetic/panoptic-segmentation/maskformer2_R18_cpu.yaml
    python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS model_final.pth
    python tools/train_net.py --config-file CFG --num-gpus 8

A config with CONT.TASK (or CONT.STEP_CLASSES) runs the whole scenario, each step in
OUTPUT_DIR/step<t> (finished steps are skipped; --resume continues a half-finished one), or one
step with CONT.STEP t:

    python tools/train_net.py --config-file configs/synthetic/panoptic-segmentation/continual/10-2-comformer.yaml
"""
from detectron2.engine import default_argument_parser, launch

import comformer  # noqa: F401  (registers datasets, model parts and methods)
from comformer.data.scenario import build_scenario
from comformer.engine import Trainer, run_scenario, setup_cfg
from comformer.utils.io import AtomicDetectionCheckpointer


def main(args):
    cfg = setup_cfg(args)
    if build_scenario(cfg) is not None:
        return run_scenario(cfg, resume=args.resume, eval_only=args.eval_only)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        # weights_only loading: a checkpoint cannot run code
        AtomicDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
