"""The built-in synthetic dataset: formats, determinism, difficulty features, caching, registration."""

import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comformer.data.datasets import synthetic
from comformer.data.datasets.synthetic import SyntheticSpec

TINY = SyntheticSpec(num_train=6, num_val=3, image_size=64)


def _rgb2id(rgb):
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def test_categories_default_is_12_things_and_8_stuff_with_coco_fields():
    cats = synthetic.synthetic_categories()
    assert len(cats) == 20
    assert sum(c["isthing"] for c in cats) == 12
    # interleaved: the first 10 classes (a 10-10 scenario's base step) hold things and stuff
    assert 0 < sum(c["isthing"] for c in cats[:10]) < 10
    assert [c["id"] for c in cats] == list(range(1, 21))
    assert len({c["name"] for c in cats}) == 20
    for c in cats:
        assert set(c) == {"id", "name", "isthing", "color"} and len(c["color"]) == 3
    # classes differ by shape or texture, never by an owned colour: three classes per shape
    names = [c["name"] for c in cats]
    assert {"circle", "circle_stripes", "circle_dots", "hstripes", "vstripes"} <= set(names)


def test_render_is_deterministic_and_split_dependent():
    a = synthetic.render_image(TINY, 3, "train")
    b = synthetic.render_image(TINY, 3, "train")
    c = synthetic.render_image(TINY, 3, "val")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2]
    assert not np.array_equal(a[0], c[0])


def test_segments_agree_with_the_id_map():
    spec = SyntheticSpec(image_size=96)
    thing_ids = {c["id"] for c in synthetic.synthetic_categories(spec) if c["isthing"]}
    saw_multi_instance = False
    for index in range(10):
        image, seg, segments = synthetic.render_image(spec, index, "train")
        assert image.shape == (96, 96, 3) and image.dtype == np.uint8
        ids = {s["id"] for s in segments}
        assert set(np.unique(seg)) - {0} == ids
        for s in segments:
            mask = seg == s["id"]
            assert s["area"] == int(mask.sum()) > 0
            rows, cols = np.nonzero(mask)
            assert s["bbox"] == [cols.min(), rows.min(), cols.ptp() + 1, rows.ptp() + 1]
            if s["category_id"] in thing_ids:
                assert s["area"] >= spec.min_segment_area
        things = [s for s in segments if s["category_id"] in thing_ids]
        saw_multi_instance |= len(things) >= 2
    assert saw_multi_instance


def test_invalid_spec_names_the_rule():
    with pytest.raises(ValueError, match="num_stuff_classes"):
        SyntheticSpec(num_stuff_classes=99)
    with pytest.raises(ValueError, match="min_scale"):
        SyntheticSpec(min_scale=0.6, max_scale=0.7)


def test_generate_writes_ade_panoptic_layout(tmp_path):
    folder = synthetic.generate(str(tmp_path / "synthetic"), TINY)
    root = Path(folder)
    for split, n in (("train", 6), ("val", 3)):
        data = json.loads((root / f"panoptic_{split}.json").read_text())
        assert len(data["images"]) == len(data["annotations"]) == n
        assert data["categories"] == synthetic.synthetic_categories(TINY)
        contiguous = {c["id"]: i for i, c in enumerate(data["categories"])}
        ann = data["annotations"][0]
        pan = _rgb2id(np.asarray(Image.open(root / f"panoptic_{split}" / ann["file_name"])))
        sem = np.asarray(Image.open(root / f"semantic_{split}" / ann["file_name"]))
        img = np.asarray(Image.open(root / "images" / split / data["images"][0]["file_name"]))
        assert img.shape == (64, 64, 3) and pan.shape == sem.shape == (64, 64)
        # semantic = contiguous class of each pixel's segment, 255 where the panoptic map is void
        expected = np.full(pan.shape, 255)
        for s in ann["segments_info"]:
            expected[pan == s["id"]] = contiguous[s["category_id"]]
        np.testing.assert_array_equal(sem, expected)
    assert synthetic.is_generated(folder, TINY)
    assert not synthetic.is_generated(folder, SyntheticSpec(num_train=7, num_val=3, image_size=64))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".synthetic-tmp")]


def _ensure(folder):
    synthetic.ensure_generated(folder, TINY)
    return os.stat(os.path.join(folder, "generator.json")).st_ino


def test_concurrent_first_use_generates_once(tmp_path):
    folder = str(tmp_path / "synthetic")
    with mp.get_context("spawn").Pool(2) as pool:
        inodes = pool.map(_ensure, [folder, folder])
    # both callers see the same copy: the second waited on the lock and found it complete
    assert inodes[0] == inodes[1]
    mtime = os.stat(os.path.join(folder, "generator.json")).st_mtime_ns
    synthetic.ensure_generated(folder, TINY)  # cached: nothing rewritten
    assert os.stat(os.path.join(folder, "generator.json")).st_mtime_ns == mtime


def test_script_entry_point(tmp_path):
    out = tmp_path / "syn"
    assert (
        synthetic.main(
            ["--output", str(out), "--num-train", "2", "--num-val", "1", "--image-size", "48"]
        )
        == 0
    )
    assert len(os.listdir(out / "images" / "train")) == 2


def test_registered_val_records_point_at_existing_files():
    from detectron2.data import DatasetCatalog, MetadataCatalog

    import comformer  # noqa: F401

    records = DatasetCatalog.get("synthetic_panoptic_val")
    assert len(records) == SyntheticSpec().num_val
    for r in records[:5]:
        for key in ("file_name", "pan_seg_file_name", "sem_seg_file_name"):
            assert os.path.isfile(r[key]), r[key]
        assert r["segments_info"] and all(0 <= s["category_id"] < 20 for s in r["segments_info"])
    meta = MetadataCatalog.get("synthetic_panoptic_val")
    assert len(meta.stuff_classes) == 20 and len(meta.thing_classes) == 12
    assert meta.ignore_label == 255 and meta.evaluator_type == "coco_panoptic_seg"
    sem = DatasetCatalog.get("synthetic_sem_seg_val")
    assert (
        len(sem) == len(records)
        and MetadataCatalog.get("synthetic_sem_seg_val").evaluator_type == "sem_seg"
    )
