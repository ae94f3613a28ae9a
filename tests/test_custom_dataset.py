"""Your own dataset from config keys (DATASETS.CUSTOM): a COCO-panoptic-format dataset written to a
temporary folder is registered when the config is loaded and a two-step scenario runs on it; its
classes come from the json; bad files are rejected with errors naming the file; a semantic
dataset (images + label PNGs + class list) registers the same way."""

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog

from comformer.data.datasets.register_custom import (
    register_custom_from_config,
    register_custom_panoptic,
)
from comformer.data.datasets.synthetic import SyntheticSpec, generate, synthetic_categories
from comformer.engine import run_scenario
from comformer.engine.trainer import load_config
from test_faults import CONTINUAL_CFG, TINY_OPTS

# 6 classes (3 things, 3 stuff), 64-px images
SPEC = SyntheticSpec(
    num_train=6, num_val=3, image_size=64, num_thing_classes=3, num_stuff_classes=3
)
_names = itertools.count()


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    # check stamps and derived label maps go to the test's own cache
    monkeypatch.setenv("COMFORMER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return Path(generate(str(tmp_path_factory.mktemp("custom") / "mydata"), SPEC))


def _copy(clean: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(clean, tmp_path / "mydata"))


def _name() -> str:
    return f"mydata{os.getpid()}x{next(_names)}"


def _config(root: Path, name: str, *opts):
    return load_config(
        str(CONTINUAL_CFG),
        ["DATASETS.CUSTOM.NAME", name, "DATASETS.CUSTOM.ROOT", str(root), *opts],
    )


def test_registered_from_config_and_a_two_step_scenario_runs_on_it(clean, tmp_path):
    name = _name()
    cfg = _config(
        clean,
        name,
        *TINY_OPTS,
        "DATASETS.TRAIN", (f"{name}_train",), "DATASETS.TEST", (f"{name}_val",),
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 6, "CONT.TASK", "4-2",
        "SOLVER.MAX_ITER", 2, "CONT.INC_ITERS_PER_CLASS", 0, "CONT.INC_MAX_ITER", 2,
        "OUTPUT_DIR", str(tmp_path / "out"),
    )  # fmt: skip
    # the classes are the json's categories, in order
    expected = [c["name"] for c in synthetic_categories(SPEC)]
    assert MetadataCatalog.get(f"{name}_train").stuff_classes == expected
    assert MetadataCatalog.get(f"{name}_val").stuff_classes == expected
    cfg.freeze()
    rows = run_scenario(cfg)
    assert [(r["step"], r["num_seen"]) for r in rows] == [(0, 4), (1, 6)]
    for key in ("PQ_all", "mIoU_old", "mIoU_new"):
        assert 0.0 <= rows[1][key] <= 100.0, key
    # no semantic maps were given: they were derived from the PNGs, equal to the generator's
    record = DatasetCatalog.get(f"{name}_val")[0]
    derived = np.asarray(Image.open(record["sem_seg_file_name"]))
    written = np.asarray(Image.open(clean / "semantic_val" / os.path.basename(record["file_name"])))
    assert np.array_equal(derived, written)
    # loading the same config again registers nothing new; other files under the name are refused
    assert register_custom_from_config(_config(clean, name)) == [f"{name}_train", f"{name}_val"]
    with pytest.raises(ValueError, match="already registered with other files"):
        _config(tmp_path, name)


def _edit_json(root: Path, edit, split="train"):
    path = root / f"panoptic_{split}.json"
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))


def test_png_segment_missing_from_the_json_is_rejected_naming_the_file(clean, tmp_path):
    root = _copy(clean, tmp_path)
    removed = {}

    def drop_a_segment(content):
        ann = content["annotations"][1]
        removed["id"] = ann["segments_info"].pop()["id"]
        removed["png"] = ann["file_name"]

    _edit_json(root, drop_a_segment)
    name = _name()
    _config(root, name)
    with pytest.raises(ValueError) as error:
        DatasetCatalog.get(f"{name}_train")
    message = str(error.value)
    assert str(root / "panoptic_train" / removed["png"]) in message
    assert f"ids [{removed['id']}] are painted but not in segments_info" in message


@pytest.mark.parametrize(
    "fault, message",
    [
        ("category without isthing", r"panoptic_train\.json: category #2 .* lacks \['isthing'\]"),
        ("no categories", r"panoptic_train\.json has no 'categories' list"),
        ("image of another size", r"panoptic PNG .*panoptic_train/000002\.png is 64x64 but its "
         r"image .*images/train/000002\.png is 32x32"),
        ("missing PNG", r"panoptic PNG file\(s\) do not exist: .*panoptic_train/000003\.png"),
    ],
)  # fmt: skip
def test_bad_custom_datasets_are_rejected_naming_the_file(clean, tmp_path, fault, message):
    root = _copy(clean, tmp_path)
    if fault == "category without isthing":
        _edit_json(root, lambda c: c["categories"][2].pop("isthing"))
    elif fault == "no categories":
        _edit_json(root, lambda c: c.pop("categories"))
    elif fault == "image of another size":
        path = root / "images/train/000002.png"
        Image.open(path).resize((32, 32)).save(path)
        _edit_json(root, lambda c: [im.pop("height") for im in c["images"]])
    elif fault == "missing PNG":
        (root / "panoptic_train/000003.png").unlink()
    name = _name()
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        _config(root, name)  # the json's categories are read at registration
        DatasetCatalog.get(f"{name}_train")  # the files at the first load


def test_check_passed_once_is_remembered_until_a_file_changes(clean, tmp_path, monkeypatch):
    from comformer.data.datasets import register_custom

    root = _copy(clean, tmp_path)
    name = _name()
    register_custom_panoptic(
        name,
        json_file=str(root / "panoptic_train.json"),
        png_root=str(root / "panoptic_train"),
        image_root=str(root / "images/train"),
        sem_seg_root=str(root / "semantic_train"),
    )
    assert len(DatasetCatalog.get(name)) == SPEC.num_train  # decoded and checked
    # a new process (here: the same one, forgetting) trusts the check's stamp: nothing decoded
    register_custom._CHECKED.discard(name)
    with monkeypatch.context() as m:
        m.setattr(register_custom, "_decode", lambda *a: pytest.fail("decoded again"))
        assert len(DatasetCatalog.get(name)) == SPEC.num_train
    # a file changed since is decoded and checked again
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 9).save(root / "panoptic_train/000001.png")
    register_custom._CHECKED.discard(name)
    with pytest.raises(ValueError, match=r"000001\.png disagrees with its segments_info"):
        DatasetCatalog.get(name)


def test_semantic_dataset_from_images_label_pngs_and_a_class_list(clean, tmp_path):
    root = _copy(clean, tmp_path)
    names = [c["name"] for c in synthetic_categories(SPEC)]
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    opts = [
        "DATASETS.CUSTOM.KIND", "semantic", "DATASETS.CUSTOM.IMAGE_EXT", ".png",
        "DATASETS.CUSTOM.CLASSES_FILE", "classes.txt",
        "DATASETS.CUSTOM.TRAIN.SEM_SEG", "semantic_train",
        "DATASETS.CUSTOM.VAL.SEM_SEG", "semantic_val",
    ]  # fmt: skip
    name = _name()
    _config(root, name, *opts)
    meta = MetadataCatalog.get(f"{name}_train")
    assert meta.stuff_classes == names and meta.evaluator_type == "sem_seg"
    assert len(DatasetCatalog.get(f"{name}_train")) == SPEC.num_train
    # a label value that is no class
    bad = root / "semantic_val/000001.png"
    labels = np.asarray(Image.open(bad)).copy()
    labels[0, 0] = 77
    Image.fromarray(labels).save(bad)
    other = _name()
    _config(root, other, *opts)
    with pytest.raises(ValueError, match=r"label map .*semantic_val/000001\.png has value\(s\) \[77\]"):
        DatasetCatalog.get(f"{other}_val")
    with pytest.raises(ValueError, match="needs its class names"):
        _config(root, _name(), *opts[:4], *opts[6:])
