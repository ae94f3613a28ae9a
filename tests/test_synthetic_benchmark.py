"""The benchmark synthetic set (synthetic_shapes) and the one with a background class (synthetic_voc):
classes, determinism, difficulty features, files, registration, and continual splits on both."""

import filecmp
import os
from pathlib import Path

import numpy as np
import pytest

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.projects.deeplab import add_deeplab_config

import comformer  # noqa: F401  (registers the datasets)
from comformer import add_comformer_config
from comformer.data.datasets import synthetic
from comformer.data.datasets.common import panoptic_metadata, register_panoptic, register_sem_seg
from comformer.data.datasets.synthetic_shapes import (
    THING_CLASSES,
    ShapesSpec,
    VocSpec,
    shapes_categories,
    voc_categories,
)
from comformer.data.scenario import REMOVED, build_scenario, record_classes, register_step_dataset

REPO = Path(__file__).resolve().parents[1]
TINY_SHAPES = ShapesSpec(num_train=24, num_val=4, image_size=64)
TINY_VOC = VocSpec(num_train=24, num_val=4, image_size=48)


# ------------------------------------------------------------------------------------ classes
def test_shapes_classes_are_new_kinds_interleaved_things_and_stuff():
    cats = shapes_categories()
    assert len(cats) == 20 and [c["id"] for c in cats] == list(range(1, 21))
    things = [c for c in cats if c["isthing"]]
    assert len(things) == 14 and len({c["name"] for c in cats}) == 20
    # every thing has a shape and a colour of its own: no later class re-combines earlier cues
    assert len({tuple(c["color"]) for c in things}) == 14
    assert len({shape for shape, _, _ in THING_CLASSES}) == len(THING_CLASSES)
    # a 10-10 split brings 7 new things and 3 new stuff classes
    assert sum(c["isthing"] for c in cats[:10]) == 7 and sum(c["isthing"] for c in cats[10:]) == 7
    # every 2-class step of 10-2 holds a thing
    assert all(cats[i]["isthing"] or cats[i + 1]["isthing"] for i in range(10, 20, 2))


def test_voc_classes_have_background_first():
    cats = voc_categories()
    assert [c["name"] for c in cats[:2]] == ["background", "circle"] and len(cats) == 13
    assert cats[0]["isthing"] == 0 and all(c["isthing"] for c in cats[1:])


def test_invalid_specs_name_the_rule():
    with pytest.raises(ValueError, match="num_thing_classes"):
        ShapesSpec(num_thing_classes=15)
    with pytest.raises(ValueError, match="min_objects"):
        VocSpec(min_objects=0)


# ------------------------------------------------------------------------------------ drawing
@pytest.mark.parametrize("spec", [TINY_SHAPES, TINY_VOC], ids=["shapes", "voc"])
def test_render_is_deterministic_split_dependent_and_consistent(spec):
    a, b, c = spec.render(3, "train"), spec.render(3, "train"), spec.render(3, "val")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2] and not np.array_equal(a[0], c[0])
    for index in range(8):
        image, seg, segments = spec.render(index, "train")
        assert image.shape == (spec.image_size, spec.image_size, 3) and image.dtype == np.uint8
        assert set(np.unique(seg)) - {0} == {s["id"] for s in segments}
        for s in segments:
            assert s["area"] == int((seg == s["id"]).sum())


def test_shapes_images_have_instances_occlusion_and_future_classes():
    spec = ShapesSpec(image_size=96)
    cats = spec.categories()
    thing_ids = {c["id"] for c in cats if c["isthing"]}
    later = {c["id"] for c in cats[10:]}
    repeated = occluded = with_later = with_both = 0
    for index in range(20):
        _, seg, segments = spec.render(index, "train")
        things = [s["category_id"] for s in segments if s["category_id"] in thing_ids]
        stuff = [s for s in segments if s["category_id"] not in thing_ids]
        assert len(things) >= 2 and stuff
        repeated += len(things) > len(set(things))
        # a thing whose box holds pixels of another thing: touching or occluded instances
        for s in segments:
            if s["category_id"] in thing_ids:
                x, y, w, h = s["bbox"]
                box = seg[y : y + h, x : x + w]
                others = {i for i in np.unique(box) if i not in (0, s["id"])}
                occluded += any(
                    o["id"] in others and o["category_id"] in thing_ids for o in segments
                )
        present = {s["category_id"] for s in segments}
        with_later += bool(present & later)
        with_both += bool(present & later) and bool(present - later)
    assert repeated >= 3 and occluded >= 10
    # images of the base classes also show later ones (unlabelled there in overlap mode)
    assert with_both >= 10


def test_voc_background_is_a_class_and_void_only_on_object_borders():
    _, seg_plain, segs_plain = VocSpec(image_size=48, border_void=0).render(5, "train")
    image, seg, segments = TINY_VOC.render(5, "train")
    background = {s["id"] for s in segments if s["category_id"] == 1}
    assert background == {1}
    # without the border band nothing is void; with it, void pixels are object pixels only
    assert (seg_plain > 0).all()
    objects = ~np.isin(seg_plain, [1])
    assert ((seg == 0) <= objects).all() and (seg == 0).any()
    assert (seg == 1).mean() > 0.4


# ------------------------------------------------------------------------------------- files
@pytest.fixture(scope="module")
def tiny_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic_sets")
    return {
        "shapes": synthetic.generate(str(root / "shapes"), TINY_SHAPES),
        "voc": synthetic.generate(str(root / "voc"), TINY_VOC),
    }


def test_generation_is_deterministic_and_recorded(tiny_sets, tmp_path):
    again = synthetic.generate(str(tmp_path / "again"), TINY_SHAPES)
    for sub in ("images/train", "panoptic_train", "semantic_train"):
        names = sorted(os.listdir(os.path.join(again, sub)))
        assert len(names) == 24
        match, mismatch, errors = filecmp.cmpfiles(
            os.path.join(tiny_sets["shapes"], sub), os.path.join(again, sub), names, shallow=False
        )
        assert not mismatch and not errors
    assert synthetic.is_generated(tiny_sets["shapes"], TINY_SHAPES)
    # a spec of another kind, or other numbers, is not the cached copy
    assert not synthetic.is_generated(tiny_sets["shapes"], TINY_VOC)
    assert not synthetic.is_generated(tiny_sets["voc"], VocSpec(num_train=24, num_val=4))


def test_voc_label_maps_mark_background_zero(tiny_sets):
    from PIL import Image

    sem = np.asarray(Image.open(os.path.join(tiny_sets["voc"], "semantic_train", "000005.png")))
    _, seg, segments = TINY_VOC.render(5, "train")
    np.testing.assert_array_equal(sem == 0, seg == 1)
    np.testing.assert_array_equal(sem == 255, seg == 0)
    assert set(np.unique(sem)) <= set(range(13)) | {255}


def test_script_generates_each_kind(tmp_path):
    out = tmp_path / "voc"
    args = ["--kind", "voc", "--output", str(out), "--num-train", "2", "--num-val", "1"]
    assert synthetic.main(args) == 0
    assert len(os.listdir(out / "semantic_train")) == 2
    assert synthetic.is_generated(str(out), VocSpec(num_train=2, num_val=1))


# ------------------------------------------------------------------------------- registration
def test_registered_names_and_metadata():
    names = set(DatasetCatalog.list())
    for split in ("train", "val"):
        assert {
            f"synthetic_shapes_panoptic_{split}",
            f"synthetic_shapes_sem_seg_{split}",
            f"synthetic_voc_sem_seg_{split}",
            f"synthetic_panoptic_{split}",  # the first set keeps its names
            f"synthetic_sem_seg_{split}",
        } <= names
    pan = MetadataCatalog.get("synthetic_shapes_panoptic_train")
    assert pan.evaluator_type == "coco_panoptic_seg" and pan.ignore_label == 255
    assert len(pan.stuff_classes) == 20 and len(pan.thing_classes) == 14
    assert pan.panoptic_json.endswith(os.path.join("synthetic_shapes", "panoptic_train.json"))
    assert not pan.get("background_class", None)
    sem = MetadataCatalog.get("synthetic_shapes_sem_seg_val")
    assert sem.evaluator_type == "sem_seg" and sem.stuff_classes == pan.stuff_classes
    voc = MetadataCatalog.get("synthetic_voc_sem_seg_train")
    assert voc.background_class == 0 and voc.stuff_classes[0] == "background"
    assert voc.evaluator_type == "sem_seg" and voc.ignore_label == 255
    assert len(voc.stuff_classes) == len(voc.stuff_colors) == 13


# ------------------------------------------------------------------------------------ scenarios
def _cfg(dataset, num_classes, task, mode="overlap"):
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_comformer_config(cfg)
    cfg.DATASETS.TRAIN = (dataset,)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = num_classes
    cfg.CONT.TASK, cfg.CONT.MODE = task, mode
    return cfg


def test_builtin_splits_build_on_the_registered_sets():
    thing = MetadataCatalog.get("synthetic_shapes_panoptic_train").thing_dataset_id_to_contiguous_id
    things = set(thing.values())
    for task, sizes in (("10-10", [10, 10]), ("10-2", [10, 2, 2, 2, 2, 2])):
        s = build_scenario(_cfg("synthetic_shapes_panoptic_train", 20, task))
        assert [len(x) for x in s.steps] == sizes and s.background == -1
        assert 0 < len(set(s.steps[0]) & things) < 10  # things and stuff in the base step
    for task, sizes in (("9-3", [9, 3]), ("9-1", [9, 1, 1, 1])):
        for mode in ("overlap", "disjoint"):
            # mask classification: the background is no-object, evaluated but in no step
            s = build_scenario(_cfg("synthetic_voc_sem_seg_train", 13, task, mode))
            assert [len(x) for x in s.steps] == sizes and s.background == 0
            assert 0 not in s.steps[0] and s.evaluated_classes(0)[0] == 0
            # classes a step does not learn, and the background, have no target
            label_map = s.label_map(1)
            assert label_map[0] == label_map[1] == REMOVED
            assert label_map[s.steps[1][0]] == s.order.index(s.steps[1][0])
            # the per-pixel convention (MiB's): background a class, other classes background
            c = _cfg("synthetic_voc_sem_seg_train", 13, task, mode)
            c.CONT.BACKGROUND = "class"
            s = build_scenario(c)
            assert [len(x) for x in s.steps] == [sizes[0] + 1] + sizes[1:] and 0 in s.steps[0]
            assert s.label_map(1)[1] == 0


def _register_tiny(tiny_sets):
    """The tiny copies under their own names (the registered sets are generated in full)."""
    pan_name, voc_name = "tiny_shapes_panoptic_train", "tiny_voc_sem_seg_train"
    if pan_name not in DatasetCatalog.list():
        folder = tiny_sets["shapes"]
        register_panoptic(
            pan_name,
            metadata=panoptic_metadata(TINY_SHAPES.categories()),
            image_root=os.path.join(folder, "images/train"),
            panoptic_root=os.path.join(folder, "panoptic_train"),
            panoptic_json=os.path.join(folder, "panoptic_train.json"),
            sem_seg_root=os.path.join(folder, "semantic_train"),
            prepare_hint="",
        )
        voc_meta = MetadataCatalog.get("synthetic_voc_sem_seg_train")
        register_sem_seg(
            voc_name,
            metadata={
                "stuff_classes": voc_meta.stuff_classes,
                "stuff_colors": voc_meta.stuff_colors,
                "background_class": 0,
            },
            image_root=os.path.join(tiny_sets["voc"], "images/train"),
            sem_seg_root=os.path.join(tiny_sets["voc"], "semantic_train"),
            image_ext=".png",
            prepare_hint="",
        )
    return pan_name, voc_name


def test_step_datasets_filter_the_tiny_sets(tiny_sets, tmp_path, monkeypatch):
    monkeypatch.setenv("COMFORMER_CACHE", str(tmp_path / "cache"))
    pan_name, voc_name = _register_tiny(tiny_sets)
    # the benchmark is for overlap mode: nearly every image shows a later class (as on ADE20K)
    s = build_scenario(_cfg(pan_name, 20, "10-2"))
    records = DatasetCatalog.get(pan_name)
    assert len(DatasetCatalog.get(register_step_dataset(s, 0))) >= 0.9 * len(records)
    step1 = DatasetCatalog.get(register_step_dataset(s, 1))  # images showing its 2 classes
    assert 0 < len(step1) < len(records)

    records = DatasetCatalog.get(voc_name)
    classes = record_classes(records, voc_name)  # read from the label maps
    assert all(c <= set(range(13)) for c in classes) and all(0 in c for c in classes)
    sizes = {}
    for mode in ("overlap", "disjoint"):
        s = build_scenario(_cfg(voc_name, 13, "9-3", mode))
        step0 = DatasetCatalog.get(register_step_dataset(s, 0))
        sizes[mode] = len(step0)
        kept = {r["file_name"] for r in step0}
        shown = [c for r, c in zip(records, classes) if r["file_name"] in kept]
        assert all(c & (set(s.steps[0]) - {0}) for c in shown)  # background alone does not count
        if mode == "disjoint":
            assert not any(c & set(s.steps[1]) for c in shown)
    # overlap keeps base images that show later classes; disjoint drops them
    assert 0 < sizes["disjoint"] < sizes["overlap"] <= len(records)


CONFIGS = sorted(
    str(p.relative_to(REPO))
    for folder in ("configs/synthetic_shapes", "configs/synthetic_voc")
    for p in (REPO / folder).rglob("*.yaml")
    if not p.name.startswith("Base-")
)


@pytest.mark.parametrize("config", CONFIGS)
def test_configs_load_and_build_their_scenario(config):
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_comformer_config(cfg)
    cfg.merge_from_file(str(REPO / config), allow_unsafe=False)
    dataset = cfg.DATASETS.TRAIN[0]
    assert dataset in DatasetCatalog.list() and cfg.DATASETS.TEST[0] in DatasetCatalog.list()
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == len(MetadataCatalog.get(dataset).stuff_classes)
    panoptic = MetadataCatalog.get(dataset).evaluator_type == "coco_panoptic_seg"
    assert cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON == panoptic
    scenario = build_scenario(cfg)  # None for the joint configs
    if "continual" in config:
        assert scenario is not None and scenario.task in config
        assert ("disjoint" in config) == (scenario.mode == "disjoint")
        assert ("comformer" in config) == (cfg.CONT.METHOD == "comformer")
        assert (cfg.MODEL.MASK_FORMER.MASK_ACTIVATION == "softmax") == ("comformer" in config)
        assert ("eclipse" in config) == (cfg.CONT.METHOD == "eclipse")
        decoder = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
        assert (decoder == "EclipseTransformerDecoder") == ("eclipse" in config)
