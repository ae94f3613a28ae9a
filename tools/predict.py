#!/usr/bin/env python
"""Predict on your own images with a trained model, in detectron2's demo/demo.py manner.

A step of a scenario (its output folder, the step; the step's model predicts the classes seen up
to that step, in the dataset's class ids):

    python tools/predict.py --scenario output/demo/comformer --step 1 --input photos/ --output preds/

A config and a checkpoint (a model trained without a scenario):

    python tools/predict.py --config-file CONFIG --weights model_final.pth --input "imgs/*.jpg" --output preds/

For each image, ``--output`` gets ``<name>.png``: the image and the prediction side by side (and
the ground truth with ``--gt`` when the image belongs to the config's datasets), drawn with
detectron2's Visualizer and the class names; and the raw prediction: ``<name>_panoptic.png``
(segment id = R + 256 G + 256^2 B) with ``<name>_segments.json``, or ``<name>_label.png`` (class
index per pixel) for a semantic model.
"""

import argparse
import glob
import json
import logging
import os
import sys
import warnings

# fvcore's import-time deprecation notice about torch.jit.script: nothing a user can act on
warnings.filterwarnings(
    "ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning
)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import comformer  # noqa: E402,F401  (registers datasets, model parts and methods)
from comformer.engine.console import run_with_readable_errors  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    model = parser.add_argument_group("model (a scenario step, or a config and a checkpoint)")
    model.add_argument(
        "--scenario", metavar="DIR", help="a scenario's OUTPUT_DIR (has config.yaml, step<t>/)"
    )
    model.add_argument(
        "--step", type=int, help="the step whose model predicts (default: the last finished)"
    )
    model.add_argument("--config-file", metavar="FILE", help="a config (instead of --scenario)")
    model.add_argument(
        "--weights",
        metavar="FILE",
        help="checkpoint (default: the step's model_final.pth, or MODEL.WEIGHTS)",
    )
    parser.add_argument(
        "--input", nargs="+", required=True, help="images, folders of images, or globs (quote them)"
    )
    parser.add_argument(
        "--output", required=True, metavar="DIR", help="folder for the pictures and raw predictions"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument(
        "--gt",
        action="store_true",
        help="draw the ground truth too, for images of the config's datasets",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument(
        "--opts",
        default=[],
        nargs=argparse.REMAINDER,
        help="config KEY VALUE pairs (last on the command line), as detectron2's demo takes them",
    )
    return parser  # fmt: skip


def list_images(inputs):
    """Files of ``inputs`` (files, folders, globs), in order, each once."""
    found = []
    for item in inputs:
        path = os.path.expanduser(item)
        if os.path.isdir(path):
            names = sorted(os.listdir(path))
            matched = [os.path.join(path, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
            if not matched:
                raise FileNotFoundError(
                    f"folder {path} holds no image ({', '.join(IMAGE_EXTENSIONS)})"
                )
        elif os.path.isfile(path):
            matched = [path]
        else:
            matched = sorted(p for p in glob.glob(path) if os.path.isfile(p))
            if not matched:
                raise FileNotFoundError(
                    f"--input {item!r}: no such file or folder, and no file matches it"
                )
        found += [p for p in matched if p not in found]
    stems = {}
    for p in found:
        stem = os.path.splitext(os.path.basename(p))[0]
        if stem in stems:
            raise ValueError(
                f"{stems[stem]} and {p} would write the same output files ({stem}.png): "
                "predict them into different --output folders"
            )
        stems[stem] = p
    return found


def _last_finished_step(folder: str) -> int:
    steps = [
        int(name[4:])
        for name in os.listdir(folder)
        if name.startswith("step") and name[4:].isdigit()
        and os.path.isfile(os.path.join(folder, name, "done.json"))
    ]  # fmt: skip
    if not steps:
        raise FileNotFoundError(f"{folder} holds no finished step (step<t>/done.json)")
    return max(steps)


def build_predictor(args):
    """(cfg, model in eval mode, dataset name for class names, scenario or None, step)."""
    from comformer.continual import build_continual_model
    from comformer.data.scenario import build_scenario
    from comformer.engine import Trainer, step_config, step_dir
    from comformer.engine.step_trainer import check_checkpoint_classes
    from comformer.engine.trainer import load_config
    from comformer.utils.io import AtomicDetectionCheckpointer, load_checkpoint_state

    if bool(args.scenario) == bool(args.config_file):
        raise ValueError("give either --scenario DIR or --config-file FILE")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available here (use --device cpu)")
    config_file = args.config_file or os.path.join(args.scenario, "config.yaml")
    if args.scenario and not os.path.isfile(config_file):
        raise FileNotFoundError(
            f"{config_file} does not exist: --scenario takes the OUTPUT_DIR of a scenario run"
        )
    cfg = load_config(config_file, list(args.opts) + ["MODEL.DEVICE", args.device])
    scenario = build_scenario(cfg)
    dataset = (cfg.DATASETS.TEST or cfg.DATASETS.TRAIN)[0]
    if scenario is None:
        if args.scenario or args.step is not None:
            raise ValueError(f"{config_file} is not a continual config: --step needs a scenario")
        cfg.freeze()
        model = Trainer.build_model(cfg)
        weights = args.weights or cfg.MODEL.WEIGHTS
        if not weights:
            raise ValueError("no checkpoint: give --weights FILE (or MODEL.WEIGHTS in the config)")
        AtomicDetectionCheckpointer(model).load(weights)
        return cfg, model.eval(), dataset, None, None
    folder = args.scenario or cfg.OUTPUT_DIR
    step = args.step if args.step is not None else _last_finished_step(folder)
    cfg_t = step_config(cfg, scenario, step)
    weights = args.weights or os.path.join(step_dir(folder, step), "model_final.pth")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"checkpoint {weights} does not exist: has step {step} finished?")
    state = load_checkpoint_state(weights)
    check_checkpoint_classes(state, scenario.num_seen(step), weights)
    model = build_continual_model(cfg_t, scenario, step)
    model.student.load_state_dict(state)
    return cfg_t, model.eval(), dataset, scenario, step


def ground_truth_index(cfg):
    """Records of the config's test and training datasets by real path of their image."""
    from detectron2.data import DatasetCatalog

    index = {}
    for name in list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN):
        for record in DatasetCatalog.get(name):
            index.setdefault(os.path.realpath(record["file_name"]), record)
    return index


def write_raw(prediction, stem: str, out_dir: str, meta, image_file: str):
    """The raw prediction: panoptic PNG + segments json, or a label PNG. Returns the paths."""
    from panopticapi.utils import id2rgb

    if "panoptic_seg" in prediction:
        ids, segments = prediction["panoptic_seg"]
        ids = ids.cpu().numpy().astype(np.int64)
        png = os.path.join(out_dir, f"{stem}_panoptic.png")
        Image.fromarray(id2rgb(ids)).save(png)
        to_dataset_id = {v: k for k, v in meta.get("stuff_dataset_id_to_contiguous_id", {}).items()}
        info = []
        for s in segments:
            c = int(s["category_id"])
            info.append({
                "id": int(s["id"]),
                "category_id": int(to_dataset_id.get(c, c)),  # the dataset's (json) category id
                "class_index": c,  # index into the class list
                "name": meta.stuff_classes[c],
                "isthing": bool(s["isthing"]),
                "area": int((ids == s["id"]).sum()),
            })  # fmt: skip
        segments_json = os.path.join(out_dir, f"{stem}_segments.json")
        with open(segments_json, "w") as f:
            json.dump({"file_name": image_file, "panoptic_png": os.path.basename(png),
                       "segments_info": info}, f, indent=1)  # fmt: skip
        return [png, segments_json]
    labels = prediction["sem_seg"].argmax(0).cpu().numpy()
    path = os.path.join(out_dir, f"{stem}_label.png")
    Image.fromarray(labels.astype(np.uint8 if labels.max() < 256 else np.uint16)).save(path)
    return [path]


def run(args) -> int:
    from detectron2.data import MetadataCatalog
    from detectron2.data import detection_utils as utils
    from tqdm import tqdm

    from comformer.engine.visualize import (
        draw_example,
        predict_image,
        read_ground_truth,
        vis_metadata,
    )

    images = list_images(args.input)
    cfg, model, dataset, scenario, step = build_predictor(args)
    meta = MetadataCatalog.get(dataset)
    metadata = vis_metadata(dataset)
    gt_index = ground_truth_index(cfg) if args.gt else {}
    os.makedirs(args.output, exist_ok=True)
    outlines = {}
    title = "prediction"
    if scenario is not None:
        outlines = dict(
            old_classes=scenario.evaluated_classes(step - 1) if step > 0 else (),
            new_classes=scenario.steps[step],
            shown_classes=scenario.evaluated_classes(step),
        )
        title = f"prediction, step {step}"
    with_gt = 0
    for path in tqdm(images, desc="predicting", unit="image"):
        try:
            image = utils.read_image(path, format=cfg.INPUT.FORMAT)
        except OSError as e:
            raise OSError(f"cannot read image {path} ({e})") from None
        prediction = predict_image(cfg, model, image)
        stem = os.path.splitext(os.path.basename(path))[0]
        record = gt_index.get(os.path.realpath(path))
        with_gt += record is not None
        picture = draw_example(
            utils.convert_image_to_rgb(image, cfg.INPUT.FORMAT),
            prediction,
            metadata,
            ground_truth=read_ground_truth(record) if record else ("none", None),
            prediction_title=title,
            **outlines,
        )
        Image.fromarray(picture).save(os.path.join(args.output, f"{stem}.png"))
        write_raw(prediction, stem, args.output, meta, path)
    model_name = f"step {step} of {args.scenario or cfg.OUTPUT_DIR}" if scenario else "the model"
    gt_note = f", {with_gt} with ground truth" if args.gt else ""
    print(
        f"{len(images)} image(s) predicted by {model_name}{gt_note}: pictures and raw predictions in {args.output}"
    )
    return 0


def main() -> int:
    args = build_parser().parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_with_readable_errors(lambda: run(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
