"""Continual scenarios: task parsing, orders, validation, image filtering, label maps, step datasets."""

import numpy as np
import pytest

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.projects.deeplab import add_deeplab_config

from comformer import add_comformer_config
from comformer.data.scenario import (
    REMOVED,
    Scenario,
    build_scenario,
    parse_task,
    register_step_dataset,
    scenario_summary,
    step_dataset_name,
)

NAMES = [f"c{i}" for i in range(6)]


def _register(name, records, background=-1):
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: records)
        meta = {"stuff_classes": NAMES, "ignore_label": 255}
        if background >= 0:
            meta["background_class"] = background
        MetadataCatalog.get(name).set(**meta)
    return name


def _cfg(dataset, **cont):
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_comformer_config(cfg)
    cfg.DATASETS.TRAIN = (dataset,)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 6
    for k, v in cont.items():
        setattr(cfg.CONT, k, v)
    return cfg


def _rec(i, classes, crowd=()):
    segs = [{"id": j + 1, "category_id": c, "iscrowd": 0} for j, c in enumerate(classes)]
    segs += [{"id": 100 + j, "category_id": c, "iscrowd": 1} for j, c in enumerate(crowd)]
    return {"file_name": f"img{i}.png", "image_id": i, "segments_info": segs}


RECORDS = [
    _rec(0, [0, 1]),  # base only
    _rec(1, [2]),  # step 1 only
    _rec(2, [0, 2, 4]),  # step 1 with a future class (step 2)
    _rec(3, [4, 5]),  # step 2 only
    _rec(4, [1], crowd=[3]),  # base; step-1 class only as crowd
]


def test_parse_task_matches_the_papers_step_sizes():
    assert parse_task("100-10", 150) == [100] + [10] * 5
    assert parse_task("100-50", 150) == [100, 50]
    assert parse_task("83-5", 133) == [83] + [5] * 10
    assert parse_task("15-1", 20) == [15, 1, 1, 1, 1, 1]
    for bad in ("100-7", "150-10", "0-10", "100_10", "abc"):
        with pytest.raises(ValueError, match="CONT.TASK"):
            parse_task(bad, 150)


def test_build_scenario_default_order_and_steps():
    ds = _register("scen_toy", RECORDS)
    s = build_scenario(_cfg(ds, TASK="2-2"))
    assert s.steps == ((0, 1), (2, 3), (4, 5))
    assert s.order == (0, 1, 2, 3, 4, 5)
    assert s.seen_classes(1) == (0, 1, 2, 3) and s.old_classes(1) == (0, 1)
    assert s.future_classes(1) == (4, 5) and s.num_seen(2) == 6
    assert build_scenario(_cfg(ds)) is None  # not continual


def test_orders_list_file_and_seed(tmp_path):
    ds = _register("scen_toy", RECORDS)
    s = build_scenario(_cfg(ds, TASK="2-2", ORDER=[5, 4, 3, 2, 1, 0]))
    assert s.steps == ((5, 4), (3, 2), (1, 0))
    f = tmp_path / "order.txt"
    f.write_text("3 1\n0 2\n5\n4\n")
    assert build_scenario(_cfg(ds, TASK="4-2", ORDER_FILE=str(f))).steps == ((3, 1, 0, 2), (5, 4))
    a = build_scenario(_cfg(ds, TASK="2-2", ORDER_SEED=7))
    b = build_scenario(_cfg(ds, TASK="2-2", ORDER_SEED=7))
    assert a == b and sorted(a.order) == list(range(6))
    assert a.tag != build_scenario(_cfg(ds, TASK="2-2")).tag  # order is part of the name


def test_validation_errors_list_what_is_valid():
    ds = _register("scen_toy", RECORDS)
    with pytest.raises(ValueError, match="does not split 6 classes"):
        build_scenario(_cfg(ds, TASK="4-4"))
    with pytest.raises(ValueError, match="valid: overlap, disjoint"):
        build_scenario(_cfg(ds, TASK="2-2", MODE="sideways"))
    with pytest.raises(ValueError, match=r"CONT.STEP=3 is out of range.*0..2"):
        build_scenario(_cfg(ds, TASK="2-2", STEP=3))
    with pytest.raises(ValueError, match=r"class ids \[9\] do not exist.*0..5"):
        build_scenario(_cfg(ds, STEP_CLASSES=[[0, 1, 2], [3, 4, 9]]))
    with pytest.raises(ValueError, match="missing: \\[5\\]"):
        build_scenario(_cfg(ds, STEP_CLASSES=[[0, 1, 2], [3, 4]]))
    with pytest.raises(ValueError, match="exactly once"):
        build_scenario(_cfg(ds, TASK="2-2", ORDER=[0, 1, 2, 3, 4, 4]))
    with pytest.raises(ValueError, match="not both"):
        build_scenario(_cfg(ds, TASK="2-2", STEP_CLASSES=[[0], [1, 2, 3, 4, 5]]))
    cfg = _cfg(ds, TASK="2-2")
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 5
    with pytest.raises(ValueError, match="NUM_CLASSES=5"):
        build_scenario(cfg)


def test_filter_overlap_and_disjoint():
    ds = _register("scen_toy", RECORDS)
    over = build_scenario(_cfg(ds, TASK="2-2"))
    disj = build_scenario(_cfg(ds, TASK="2-2", MODE="disjoint"))
    classes = [{s["category_id"] for s in r["segments_info"] if not s["iscrowd"]} for r in RECORDS]
    ids = lambda recs: [r["image_id"] for r in recs]  # noqa: E731
    assert ids(over.filter_records(RECORDS, 0, classes)) == [0, 2, 4]
    assert ids(disj.filter_records(RECORDS, 0, classes)) == [0, 4]  # 2 shows future classes
    assert ids(over.filter_records(RECORDS, 1, classes)) == [1, 2]  # crowd-only 3 does not count
    assert ids(disj.filter_records(RECORDS, 1, classes)) == [1]
    assert ids(over.filter_records(RECORDS, 2, classes)) == [2, 3]
    assert ids(disj.filter_records(RECORDS, 2, classes)) == [2, 3]  # no future at the last step


def test_label_maps_remove_other_steps_and_follow_the_order():
    ds = _register("scen_toy", RECORDS)
    s = build_scenario(_cfg(ds, TASK="2-2", ORDER=[5, 4, 3, 2, 1, 0]))
    r = REMOVED
    # class id -> model index (position in the order); only step 1's classes 3 and 2 are kept
    np.testing.assert_array_equal(s.label_map(1), [r, r, 3, 2, r, r])
    np.testing.assert_array_equal(s.label_map(1, s.seen_classes(1)), [r, r, 3, 2, 1, 0])


def test_background_class_stays_in_every_step_when_it_is_a_class():
    ds = _register("scen_bg", RECORDS, background=0)
    s = build_scenario(_cfg(ds, TASK="3-1", BACKGROUND="class"))  # 5 fg classes: 3, then 1 + 1
    assert s.steps == ((0, 1, 2, 3), (4,), (5,)) and s.has_bg_class
    # old and future classes look like background (MiB), the background keeps its label
    np.testing.assert_array_equal(s.label_map(1), [0, 0, 0, 0, 4, 0])
    assert s.evaluated_classes(1) == s.seen_classes(1)


def test_background_is_no_object_for_mask_classification_by_default():
    ds = _register("scen_bg", RECORDS, background=0)
    s = build_scenario(_cfg(ds, TASK="3-1"))
    assert s.steps == ((1, 2, 3), (4,), (5,)) and not s.has_bg_class
    r = REMOVED
    # the background and the other steps' classes have no target
    np.testing.assert_array_equal(s.label_map(1), [r, r, r, r, 3, r])
    assert s.evaluated_classes(1) == (0, 1, 2, 3, 4)
    assert s.signature()["background"] == "no-object"


def test_step_dataset_registered_with_full_label_space_metadata():
    ds = _register("scen_toy", RECORDS)
    s = build_scenario(_cfg(ds, TASK="2-2"))
    name = register_step_dataset(s, 1)
    assert name == step_dataset_name(s, 1) == "scen_toy_2-2_step1"
    assert [r["image_id"] for r in DatasetCatalog.get(name)] == [1, 2]
    meta = MetadataCatalog.get(name)
    assert meta.stuff_classes == NAMES and meta.step == 1
    assert register_step_dataset(s, 1) == name  # idempotent
    joint = register_step_dataset(s, 1, joint=True)
    assert [r["image_id"] for r in DatasetCatalog.get(joint)] == [0, 1, 2, 4]
    assert "| 1 | 2 | 4 |" in scenario_summary(s, [3, 2, 2])


def test_scenario_rejects_uncovered_or_duplicate_classes():
    with pytest.raises(ValueError, match="more than one step"):
        Scenario(dataset="x", task="t", steps=((0, 1), (1, 2)), num_classes=3)
