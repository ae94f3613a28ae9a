"""
Fault injection: a tiny synthetic dataset corrupted in every way the loaders and mappers must catch,
bad configs rejected before any training, and a NaN loss stopping training at once.

Each bad-data case ends in an error naming the file and the fault, or, with INPUT.SKIP_BAD_SAMPLES,
in a counted skip; none may become a silently wrong target.
"""

import argparse
import itertools
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.data.build import build_batch_data_loader
from detectron2.projects.deeplab import add_deeplab_config

from comformer import add_comformer_config
from comformer.data.datasets.common import panoptic_metadata, register_panoptic
from comformer.data.datasets.synthetic import SyntheticSpec, generate, synthetic_categories
from comformer.data.mappers import BadSampleError, PanopticDatasetMapper, SemanticDatasetMapper
from comformer.engine import run_scenario
from comformer.data.stream import TrainingStream
from comformer.engine.trainer import NonFiniteLossError, Trainer, setup_cfg
from comformer.utils.io import AtomicDetectionCheckpointer

REPO = Path(__file__).resolve().parents[1]
SPEC = SyntheticSpec(num_train=6, num_val=3, image_size=64)
META = panoptic_metadata(synthetic_categories(SPEC))
CONTINUAL_CFG = REPO / "configs/synthetic/panoptic-segmentation/continual/10-10.yaml"
JOINT_CFG = REPO / "configs/synthetic/panoptic-segmentation/maskformer2_R18_cpu.yaml"
# A model small enough for a few CPU iterations in a test.
TINY_OPTS = [
    "SOLVER.IMS_PER_BATCH", 2,
    "DATALOADER.NUM_WORKERS", 0,
    "INPUT.MIN_SIZE_TRAIN", (64,),
    "INPUT.MIN_SIZE_TEST", 64,
    "INPUT.CROP.SIZE", (64, 64),
    "INPUT.SIZE_DIVISIBILITY", 64,
    "MODEL.BACKBONE.FREEZE_AT", 5,
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", 256,
    "MODEL.MASK_FORMER.DEC_LAYERS", 2,
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", 10,
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", 1,
    "CONT.VIS_IMAGES", 0,
]  # fmt: skip
_names = itertools.count()


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A generated tiny dataset, never modified: each test corrupts its own copy."""
    return Path(generate(str(tmp_path_factory.mktemp("clean") / "synthetic"), SPEC))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Several torch threads on 2 shared cores are far slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _copy(clean: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(clean, tmp_path / "synthetic"))


def _register(root: Path, split: str = "train") -> str:
    name = f"faults_{split}_{os.getpid()}_{next(_names)}"
    register_panoptic(
        name,
        metadata=META,
        image_root=str(root / "images" / split),
        panoptic_root=str(root / f"panoptic_{split}"),
        panoptic_json=str(root / f"panoptic_{split}.json"),
        sem_seg_root=str(root / f"semantic_{split}"),
        prepare_hint="(test data)",
    )
    return name


def _edit_json(root: Path, edit, split: str = "train") -> None:
    path = root / f"panoptic_{split}.json"
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))


def _mapper(**kwargs):
    args = dict(
        augmentations=[],
        image_format="RGB",
        ignore_label=255,
        size_divisibility=-1,
        num_classes=len(META["stuff_classes"]),
    )
    return PanopticDatasetMapper(is_train=True, **{**args, **kwargs})


def _records(root: Path):
    return DatasetCatalog.get(_register(root))


def _id2rgb(ids):
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


# ----------------------------------------------------------------------------- load time
@pytest.mark.parametrize(
    "fault, error, message",
    [
        ("missing image", FileNotFoundError, r"image file\(s\) do not exist: .*images/train/000002\.png"),
        ("missing png", FileNotFoundError, r"panoptic PNG file\(s\) do not exist: .*panoptic_train/000002\.png"),
        ("annotation png nowhere", FileNotFoundError, r"do not exist: .*panoptic_train/nowhere\.png"),
        ("image entry nowhere", FileNotFoundError, r"do not exist: .*images/train/nowhere\.jpg"),
        ("image_id nowhere", ValueError, r"annotation #1 .* image_id 'ghost', which no 'images' entry has"),
        ("unknown category", ValueError, r"annotation #0 .*segment id 1 has category_id 99, which is not a category"),
        ("repeated segment id", ValueError, r"annotation #0 .*segment ids that are repeated \[1\]"),
        ("void segment id", ValueError, r"annotation #0 .*not positive integers \[0\]"),
        ("no annotations", ValueError, r"panoptic_train\.json has no annotations"),
    ],
)  # fmt: skip
def test_dataset_faults_found_at_load_time(clean, tmp_path, fault, error, message):
    root = _copy(clean, tmp_path)

    def edit(content):
        anns = content["annotations"]
        if fault == "annotation png nowhere":
            anns[1]["file_name"] = "nowhere.png"
        elif fault == "image entry nowhere":
            content["images"][1]["file_name"] = "nowhere.jpg"
        elif fault == "image_id nowhere":
            anns[1]["image_id"] = "ghost"
        elif fault == "unknown category":
            anns[0]["segments_info"][0]["category_id"] = 99
        elif fault == "repeated segment id":
            anns[0]["segments_info"][1]["id"] = anns[0]["segments_info"][0]["id"]
        elif fault == "void segment id":
            anns[0]["segments_info"][0]["id"] = 0
        elif fault == "no annotations":
            content["annotations"] = []

    if fault == "missing image":
        (root / "images/train/000002.png").unlink()
    elif fault == "missing png":
        (root / "panoptic_train/000002.png").unlink()
    else:
        _edit_json(root, edit)
    with pytest.raises(error, match=message):
        _records(root)


def test_clean_dataset_maps_and_empty_annotation_is_a_valid_sample(clean, tmp_path):
    root = _copy(clean, tmp_path)
    # Image 3 with nothing annotated: an all-void PNG and an empty segments_info.
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "panoptic_train/000003.png")
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(root / "semantic_train/000003.png")
    _edit_json(root, lambda c: c["annotations"][3].update(segments_info=[]))
    mapper = _mapper()
    records = _records(root)
    outs = [mapper(r) for r in records]
    assert all(o is not None for o in outs)
    assert len(outs[3]["instances"]) == 0 and outs[3]["instances"].gt_masks.tensor.shape == (
        0,
        64,
        64,
    )
    # no augmentation: every non-crowd segment of the JSON becomes one target mask
    segments = [s for s in records[0]["segments_info"] if not s["iscrowd"]]
    assert len(segments) >= 3
    assert len(outs[0]["instances"]) == len(segments)
    assert outs[0]["instances"].gt_classes.tolist() == [s["category_id"] for s in segments]


# ----------------------------------------------------------------------------- read time
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not an image" * 10)


def _unlist_first_segment(root: Path) -> None:
    _edit_json(root, lambda c: c["annotations"][0]["segments_info"].pop(0))


def _list_ghost_segment(root: Path) -> None:
    ghost = {"id": 4242, "category_id": 1, "iscrowd": 0}
    _edit_json(root, lambda c: c["annotations"][0]["segments_info"].append(ghost))


def _shrink(path: Path) -> None:
    with Image.open(path) as im:
        im.resize((32, 32), Image.NEAREST).save(path)


def _paint_label(path: Path, value: int) -> None:
    label = np.array(Image.open(path))
    label[0, 0] = value
    Image.fromarray(label).save(path)


def _wrong_recorded_size(root: Path) -> None:
    _edit_json(root, lambda c: c["images"][0].update(height=50))


@pytest.mark.parametrize(
    "fault, corrupt, message",
    [
        ("truncated image", lambda r: _truncate(r / "images/train/000000.png"),
         r"cannot decode image .*images/train/000000\.png \(corrupt or truncated"),
        ("corrupt image", lambda r: _garbage(r / "images/train/000000.png"),
         r"cannot decode image .*images/train/000000\.png"),
        ("truncated png", lambda r: _truncate(r / "panoptic_train/000000.png"),
         r"cannot decode panoptic PNG .*panoptic_train/000000\.png"),
        ("corrupt semantic map", lambda r: _garbage(r / "semantic_train/000000.png"),
         r"cannot decode semantic label map .*semantic_train/000000\.png"),
        ("png id not in json", _unlist_first_segment,
         r"panoptic PNG .*000000\.png disagrees with its segments_info: ids \[1\] are painted but not"),
        ("json id not in png", _list_ghost_segment,
         r"panoptic PNG .*000000\.png disagrees .*ids \[4242\] of segments_info have no pixel"),
        ("png of another size", lambda r: _shrink(r / "panoptic_train/000000.png"),
         r"annotation .*panoptic_train/000000\.png is 32x32 but image .*000000\.png is 64x64"),
        ("semantic map of another size", lambda r: _shrink(r / "semantic_train/000000.png"),
         r"annotation .*semantic_train/000000\.png is 32x32 but image"),
        ("size in json wrong", _wrong_recorded_size,
         r"Mismatched image shape for image .*000000\.png.*annotation json"),
        ("semantic value not a class", lambda r: _paint_label(r / "semantic_train/000000.png", 77),
         r"semantic label map .*000000\.png holds values \[77\] that are neither class ids 0\.\.19"),
        ("image deleted after loading", None, r"image .*images/train/000000\.png does not exist"),
    ],
)  # fmt: skip
def test_sample_faults_found_at_read_time_or_skipped_and_counted(
    clean, tmp_path, fault, corrupt, message
):
    root = _copy(clean, tmp_path)
    if corrupt is not None:
        corrupt(root)
    records = _records(root)
    if corrupt is None:
        (root / "images/train/000000.png").unlink()
    with pytest.raises(BadSampleError, match=message):
        _mapper()(records[0])

    mapper = _mapper(skip_bad_samples=True)
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log = logging.getLogger("comformer.data.mappers.build")
    log.addHandler(handler)
    try:
        outs = [mapper(r) for r in records]
    finally:
        log.removeHandler(handler)
    assert outs[0] is None and all(o is not None for o in outs[1:])
    assert mapper.num_skipped == 1
    assert len(seen) == 1 and "Skipped bad training sample (#1" in seen[0] and "000000" in seen[0]


def test_class_ids_are_checked_in_both_mappers(tmp_path):
    ids = np.zeros((8, 8), np.int64)
    ids[:4] = 1
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(tmp_path / "im.png")
    Image.fromarray(_id2rgb(ids)).save(tmp_path / "pan.png")
    record = {
        "file_name": str(tmp_path / "im.png"),
        "pan_seg_file_name": str(tmp_path / "pan.png"),
        "segments_info": [{"id": 1, "category_id": 25, "iscrowd": 0}],  # 20 classes
    }
    with pytest.raises(BadSampleError, match="class id 25 is outside the dataset's classes 0..19"):
        _mapper()(record)
    # An RGB image given as a semantic label map would be read as three channels of labels.
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "rgb.png")
    semantic = SemanticDatasetMapper(
        is_train=True, augmentations=[], image_format="RGB", ignore_label=255,
        size_divisibility=-1, num_classes=20,
    )  # fmt: skip
    bad = {"file_name": str(tmp_path / "im.png"), "sem_seg_file_name": str(tmp_path / "rgb.png")}
    with pytest.raises(
        BadSampleError, match=r"rgb\.png has shape \(8, 8, 3\); it must be a single"
    ):
        semantic(bad)


def test_skips_in_loader_workers_are_counted_in_the_main_process(clean, tmp_path):
    root = _copy(clean, tmp_path)
    _garbage(root / "images/train/000004.png")
    records = _records(root)
    mapper = _mapper(skip_bad_samples=True)
    stream = TrainingStream(records, mapper, batch_size=2, seed=3, shuffle=False)
    loader = build_batch_data_loader(stream, None, 2, num_workers=1, seed=3)
    batches = list(itertools.islice(iter(loader), 3))  # records 0..5 in order, record 4 skipped
    names = [Path(d["file_name"]).name for b in batches for d in b]
    assert names == [
        "000000.png",
        "000001.png",
        "000002.png",
        "000003.png",
        "000005.png",
        "000000.png",
    ]
    # Only the worker process mapped; the worker may have read ahead into the next epoch.
    assert mapper.num_skipped >= 1


def test_a_stream_of_only_bad_samples_stops_instead_of_spinning():
    stream = TrainingStream([{"i": 0}, {"i": 1}], lambda record: None, batch_size=2, seed=0)
    with pytest.raises(RuntimeError, match="2 training samples in a row were skipped as bad"):
        next(iter(stream))


# ----------------------------------------------------------------------------- bad configs
def _cfg(*opts, path=CONTINUAL_CFG):
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_comformer_config(cfg)
    cfg.merge_from_file(str(path))
    cfg.merge_from_list(list(opts))
    return cfg


@pytest.mark.parametrize(
    "opts, error, message",
    [
        (["CONT.METHOD", "nope"], KeyError, r"CONT.METHOD='nope' is not a registered method; valid: .*ft"),
        (["CONT.TASK", "ten-two"], ValueError, r"CONT.TASK='ten-two' is not of the form"),
        (["CONT.TASK", "10-3"], ValueError, r"CONT.TASK='10-3' does not split 20 classes"),
        (["CONT.TASK", "", "CONT.STEP_CLASSES", [[0, 1], [1, 2]]], ValueError, r"appear in more than one step"),
        (["CONT.TASK", "", "CONT.STEP_CLASSES", [list(range(10)), list(range(10, 19))]], ValueError,
         r"must cover all 20 classes .* missing: \[19\]"),
        (["CONT.STEP", 2], ValueError, r"CONT.STEP=2 is out of range for '10-10': it has 2 steps"),
        (["CONT.MODE", "sideways"], ValueError, r"CONT.MODE='sideways' is not a mode"),
        (["MODEL.SEM_SEG_HEAD.NUM_CLASSES", 21], ValueError, r"NUM_CLASSES=21 but .* has 20 classes"),
        (["CONT.STEP", 1], FileNotFoundError, r"step 1 of '10-10' starts from .*step0/model_final\.pth.* run step 0 first"),
    ],
)  # fmt: skip
def test_bad_scenario_configs_are_rejected_before_training(tmp_path, opts, error, message):
    cfg = _cfg("OUTPUT_DIR", str(tmp_path), *opts)
    with pytest.raises(error, match=message):
        run_scenario(cfg)
    assert not list(tmp_path.glob("step*/model_*.pth")) and not list(
        tmp_path.glob("step*/metrics.json")
    )


def test_teacher_of_another_scenario_and_folder_of_another_run_are_rejected(tmp_path):
    # A "step 0" checkpoint predicting 20 classes where this scenario's step 0 has 10.
    (tmp_path / "step0").mkdir()
    state = {"sem_seg_head.predictor.class_embed.weight": torch.zeros(21, 4)}
    torch.save({"model": state}, tmp_path / "step0/model_final.pth")
    with pytest.raises(ValueError, match=r"model_final\.pth predicts 20 classes but .* has 10"):
        run_scenario(_cfg("OUTPUT_DIR", str(tmp_path), "CONT.STEP", 1))
    with pytest.raises(
        ValueError, match=r"holds the steps of another run \('10-10'.*this run is '10-2'"
    ):
        run_scenario(_cfg("OUTPUT_DIR", str(tmp_path), "CONT.TASK", "10-2", "CONT.STEP", 1))


def test_yaml_with_unknown_key_or_python_tag_is_refused(tmp_path):
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(f"_BASE_: {CONTINUAL_CFG}\nCONT:\n  MEHTOD: mib\n")
    args = argparse.Namespace(config_file=str(unknown), opts=[], eval_only=False, resume=False)
    with pytest.raises(KeyError, match="Non-existent config key: CONT.MEHTOD"):
        setup_cfg(args)
    # detectron2's merge_from_file would run this (unsafe_load); setup_cfg must not.
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.yaml"
    evil.write_text(
        f"_BASE_: {CONTINUAL_CFG}\nOUTPUT_DIR: !!python/object/apply:os.system ['touch {marker}']\n"
    )
    args.config_file = str(evil)
    with pytest.raises(yaml.YAMLError, match="python/object/apply"):
        setup_cfg(args)
    assert not marker.exists()
    # No shipped config needs a Python tag.
    tagged = [p for p in (REPO / "configs").rglob("*.yaml") if "!!python" in p.read_text()]
    assert tagged == []


# ----------------------------------------------------------------------------- safe loading
def test_checkpoints_load_weights_only(tmp_path):
    model = torch.nn.Linear(2, 2)
    ckpt = AtomicDetectionCheckpointer(model, save_dir=str(tmp_path))
    ckpt.save("good")
    assert ckpt.load(str(tmp_path / "good.pth")) == {}
    # A pickle that would run code when loaded without weights_only.
    marker = tmp_path / "ran"
    torch.save({"model": model.state_dict(), "x": _Exploit(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"evil\.pth holds Python objects other than tensors"):
        ckpt.load(str(tmp_path / "evil.pth"))
    assert not marker.exists()
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*cut\.pth \(truncated"):
        ckpt.load(str(tmp_path / "cut.pth"))


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


# ----------------------------------------------------------------------------- NaN loss
def _tiny_cfg(tmp_path, clean, *opts, path=JOINT_CFG):
    train, val = _register(clean, "train"), _register(clean, "val")
    return _cfg(
        *TINY_OPTS,
        "DATASETS.TRAIN", (train,),
        "DATASETS.TEST", (val,),
        "OUTPUT_DIR", str(tmp_path),
        *opts,
        path=path,
    )  # fmt: skip


def test_nan_loss_stops_training_naming_iteration_and_term_and_keeps_last_checkpoint(
    clean, tmp_path
):
    cfg = _tiny_cfg(tmp_path, clean, "SOLVER.MAX_ITER", 5, "SOLVER.CHECKPOINT_PERIOD", 1)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)

    def inject(module, inputs, output):
        if module.training and trainer.iter == 2:
            output["loss_dice"] = output["loss_dice"] * float("nan")
        return output

    trainer.model.register_forward_hook(inject, prepend=True)  # before the check
    with pytest.raises(NonFiniteLossError) as info:
        trainer.train()
    message = str(info.value)
    assert "non-finite loss at iteration 2: loss term(s) loss_dice=nan." in message
    assert "the last good checkpoint is" in message and "model_0000001.pth" in message
    assert info.value.iteration == 2 and list(info.value.terms) == ["loss_dice"]
    assert trainer.checkpointer.get_checkpoint_file().endswith("model_0000001.pth")
    assert not (tmp_path / "model_final.pth").exists()
    # Nothing was updated at iteration 2: memory still holds the checkpoint's weights.
    saved = torch.load(tmp_path / "model_0000001.pth", weights_only=True)["model"]
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(saved[name], value), name
    assert all(torch.isfinite(v).all() for v in saved.values() if v.is_floating_point())


def test_skipped_samples_are_counted_in_metrics_and_results(clean, tmp_path):
    root = _copy(clean, tmp_path)
    _garbage(root / "images/train/000001.png")
    cfg = _tiny_cfg(
        tmp_path / "run", root, "SOLVER.MAX_ITER", 3, "INPUT.SKIP_BAD_SAMPLES", True,
        "CONT.STEP", 0, path=CONTINUAL_CFG,
    )  # fmt: skip
    rows = run_scenario(cfg)
    assert rows[0]["bad_samples_skipped"] >= 1
    metrics = [
        json.loads(x) for x in (tmp_path / "run/step0/metrics.json").read_text().splitlines()
    ]
    assert metrics[-1]["data/bad_samples_skipped"] == rows[0]["bad_samples_skipped"]
    assert 0.0 <= rows[0]["PQ_all"] <= 100.0
