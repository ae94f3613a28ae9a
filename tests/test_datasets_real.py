"""
Real-dataset plumbing on hand-made fixtures: the ADE20K preparation scripts (raw release layout ->
detectron2 semantic maps and COCO panoptic json/PNGs), the shared loaders and their errors, the
metadata convention, and the VOC list loader.
"""

import importlib.util
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog

from comformer.data.datasets.common import (
    data_root,
    load_panoptic_json,
    load_sem_seg_folders,
    panoptic_metadata,
    register_panoptic,
    register_sem_seg,
)
from comformer.data.datasets.register_ade20k_panoptic import ade20k_150_categories
from comformer.data.datasets.register_voc import VOC_CLASSES, load_voc_list, voc_colormap

REPO = Path(__file__).resolve().parents[1]
ADE = "ADEChallengeData2016"


def _import_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "datasets" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prep_sem = _import_script("prepare_ade20k_sem_seg")
prep_pan = _import_script("prepare_ade20k_pan_seg")


def _unique(prefix):
    # detectron2's catalogs accept a name once per process
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def _rgb2id(rgb):
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


# Raw ADE20K labels used below (SceneParse150 id -> contiguous id = id - 1):
#   1 wall (stuff, 0), 3 sky (stuff, 2), 4 floor (stuff, 3), 6 ceiling (stuff, 5),
#   8 bed (thing, 7; Instance100 1), 9 window (thing, 8; Instance100 2),
#   10 grass (stuff, 9), 13 person (thing, 12; Instance100 4); 0 = other.
TRAIN1_SEM = [
    [1, 1, 1, 1, 1, 1],
    [1, 1, 8, 8, 0, 0],
    [4, 4, 8, 8, 13, 13],
    [4, 4, 4, 4, 13, 13],
]
# bed (Instance100 1) instance 1; person (Instance100 4) instance 2, which also covers the wall
# pixel (0, 5): instance annotations win over stuff.
TRAIN1_INST_R = [
    [0, 0, 0, 0, 0, 4],
    [0, 0, 1, 1, 0, 0],
    [0, 0, 1, 1, 4, 4],
    [0, 0, 0, 0, 4, 4],
]
TRAIN1_INST_G = [
    [0, 0, 0, 0, 0, 2],
    [0, 0, 1, 1, 0, 0],
    [0, 0, 1, 1, 2, 2],
    [0, 0, 0, 0, 2, 2],
]
# two windows (Instance100 2, instances 1 and 3); the second covers the only ceiling pixel (1, 5),
# so ceiling disappears; the window pixel (3, 5) has no instance, so it is void.
TRAIN2_SEM = [
    [3, 3, 3, 3, 3, 3],
    [9, 9, 3, 9, 9, 6],
    [9, 9, 3, 9, 9, 3],
    [3, 3, 3, 3, 3, 9],
]
TRAIN2_INST_R = [
    [0, 0, 0, 0, 0, 0],
    [2, 2, 0, 2, 2, 2],
    [2, 2, 0, 2, 2, 0],
    [0, 0, 0, 0, 0, 0],
]
TRAIN2_INST_G = [
    [0, 0, 0, 0, 0, 0],
    [1, 1, 0, 3, 3, 3],
    [1, 1, 0, 3, 3, 0],
    [0, 0, 0, 0, 0, 0],
]
VAL1_SEM = [
    [10, 10, 10, 10, 10, 10],
    [10, 10, 10, 10, 10, 10],
    [13, 0, 0, 0, 0, 0],
    [13, 0, 0, 0, 0, 0],
]
VAL1_INST_R = [[0] * 6, [0] * 6, [4, 0, 0, 0, 0, 0], [4, 0, 0, 0, 0, 0]]
VAL1_INST_G = [[0] * 6, [0] * 6, [1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]]

RAW = {
    ("training", "ADE_train_00000001"): (TRAIN1_SEM, TRAIN1_INST_R, TRAIN1_INST_G),
    ("training", "ADE_train_00000002"): (TRAIN2_SEM, TRAIN2_INST_R, TRAIN2_INST_G),
    ("validation", "ADE_val_00000001"): (VAL1_SEM, VAL1_INST_R, VAL1_INST_G),
}


def write_raw_ade(root: Path):
    rng = np.random.default_rng(0)
    for (folder, stem), (sem, red, green) in RAW.items():
        for sub in ("images", "annotations", "annotations_instance"):
            (root / ADE / sub / folder).mkdir(parents=True, exist_ok=True)
        sem = np.array(sem, dtype=np.uint8)
        Image.fromarray(rng.integers(0, 255, (*sem.shape, 3), dtype=np.uint8)).save(
            root / ADE / "images" / folder / f"{stem}.jpg"
        )
        Image.fromarray(sem).save(root / ADE / "annotations" / folder / f"{stem}.png")
        inst = np.stack([np.array(red), np.array(green), np.zeros_like(sem)], -1).astype(np.uint8)
        Image.fromarray(inst).save(root / ADE / "annotations_instance" / folder / f"{stem}.png")


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    """Raw fixture, converted once by both scripts (run as their command lines would)."""
    root = tmp_path_factory.mktemp("ade")
    write_raw_ade(root)
    assert prep_sem.main([str(root)]) == 0
    assert prep_pan.main([str(root)]) == 0
    return root


def _png(path):
    return np.array(Image.open(path))


# ---------------------------------------------------------------- preparation scripts


def test_sem_seg_script_shifts_labels_and_makes_other_void(ade_root):
    out = _png(ade_root / ADE / "annotations_detectron2" / "training" / "ADE_train_00000001.png")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(
        out,
        [
            [0, 0, 0, 0, 0, 0],
            [0, 0, 7, 7, 255, 255],
            [3, 3, 7, 7, 12, 12],
            [3, 3, 3, 3, 12, 12],
        ],
    )
    val = _png(ade_root / ADE / "annotations_detectron2" / "validation" / "ADE_val_00000001.png")
    np.testing.assert_array_equal(val[2], [12, 255, 255, 255, 255, 255])


def test_sem_seg_script_rejects_labels_above_150():
    with pytest.raises(ValueError, match=r"x\.png: label value 151 .*1\.\.150"):
        prep_sem.convert_label(np.array([[0, 151]], dtype=np.uint8), "x.png")


def test_pan_seg_script_json_images_categories(ade_root):
    content = json.loads((ade_root / ADE / "ade20k_panoptic_train.json").read_text())
    assert [i["id"] for i in content["images"]] == ["ADE_train_00000001", "ADE_train_00000002"]
    assert content["images"][0] == {
        "id": "ADE_train_00000001",
        "file_name": "ADE_train_00000001.jpg",
        "width": 6,
        "height": 4,
    }
    cats = content["categories"]
    assert [c["id"] for c in cats] == list(range(150))
    assert sum(c["isthing"] for c in cats) == 100
    assert (cats[7]["name"], cats[7]["isthing"]) == ("bed", 1)
    assert (cats[0]["name"], cats[0]["isthing"]) == ("wall", 0)


def test_pan_seg_script_segments_of_first_image(ade_root):
    content = json.loads((ade_root / ADE / "ade20k_panoptic_train.json").read_text())
    ann = content["annotations"][0]
    assert ann["image_id"] == "ADE_train_00000001" and ann["file_name"] == "ADE_train_00000001.png"
    # stuff by class (wall 0, floor 3), then things by (Instance100 class, instance id)
    assert ann["segments_info"] == [
        # wall (8 pixels) lost its pixel (0, 5) to the person
        {"id": 1, "category_id": 0, "iscrowd": 0, "area": 7, "bbox": [0, 0, 5, 2]},
        {"id": 2, "category_id": 3, "iscrowd": 0, "area": 6, "bbox": [0, 2, 4, 2]},
        {"id": 3, "category_id": 7, "iscrowd": 0, "area": 4, "bbox": [2, 1, 2, 2]},
        {"id": 4, "category_id": 12, "iscrowd": 0, "area": 5, "bbox": [4, 0, 2, 4]},
    ]
    ids = _rgb2id(_png(ade_root / ADE / "ade20k_panoptic_train" / "ADE_train_00000001.png"))
    np.testing.assert_array_equal(
        ids,
        [
            [1, 1, 1, 1, 1, 4],
            [1, 1, 3, 3, 0, 0],
            [2, 2, 3, 3, 4, 4],
            [2, 2, 2, 2, 4, 4],
        ],
    )


def test_pan_seg_script_two_instances_covered_stuff_and_uncovered_thing(ade_root):
    content = json.loads((ade_root / ADE / "ade20k_panoptic_train.json").read_text())
    segments = content["annotations"][1]["segments_info"]
    # ceiling (5) is fully covered by window instance 3: no segment; ids stay 1..N
    assert [(s["id"], s["category_id"], s["area"]) for s in segments] == [
        (1, 2, 14),
        (2, 8, 4),
        (3, 8, 5),
    ]
    ids = _rgb2id(_png(ade_root / ADE / "ade20k_panoptic_train" / "ADE_train_00000002.png"))
    assert ids[3, 5] == 0  # window pixel without an instance: void
    assert ids[1, 5] == 3
    # every id of the PNG is in the json and the other way round (panopticapi checks this)
    assert set(np.unique(ids)) - {0} == {s["id"] for s in segments}


def test_pan_seg_script_val_split(ade_root):
    content = json.loads((ade_root / ADE / "ade20k_panoptic_val.json").read_text())
    assert [a["image_id"] for a in content["annotations"]] == ["ADE_val_00000001"]
    segments = content["annotations"][0]["segments_info"]
    assert [(s["category_id"], s["area"], s["bbox"]) for s in segments] == [
        (9, 12, [0, 0, 6, 2]),
        (12, 2, [0, 2, 1, 2]),
    ]


def test_pan_seg_script_rejects_unknown_instance_class(tmp_path):
    categories = prep_pan.load_categories(prep_pan.DEFAULT_CATEGORIES)
    mapping = prep_pan.load_instance_mapping(prep_pan.DEFAULT_MAPPING, categories)
    assert mapping[1] == 7 and mapping[4] == 12 and mapping[100] == 149 and len(mapping) == 100
    sem = np.zeros((2, 2), np.uint8)
    inst = np.zeros((2, 2, 3), np.uint8)
    inst[0, 0] = (101, 1, 0)
    with pytest.raises(ValueError, match=r"inst\.png: instance 1 has class 101 .*1\.\.100"):
        prep_pan.make_panoptic(sem, inst, [c["isthing"] for c in categories], mapping, "inst.png")


def test_scripts_report_missing_raw_data(tmp_path):
    missing = tmp_path / "nowhere"
    for script in ("prepare_ade20k_sem_seg.py", "prepare_ade20k_pan_seg.py"):
        result = subprocess.run(
            [sys.executable, str(REPO / "datasets" / script), str(missing)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1
        assert str(missing / ADE) in result.stderr and "extract" in result.stderr


# ---------------------------------------------------------------- loading the prepared data


def test_load_panoptic_json_on_prepared_fixture(ade_root):
    meta = panoptic_metadata(ade20k_150_categories())
    ade = ade_root / ADE
    records = load_panoptic_json(
        str(ade / "ade20k_panoptic_train.json"),
        str(ade / "images" / "training"),
        str(ade / "ade20k_panoptic_train"),
        str(ade / "annotations_detectron2" / "training"),
        meta,
    )
    assert len(records) == 2
    r = records[0]
    assert r["file_name"] == str(ade / "images" / "training" / "ADE_train_00000001.jpg")
    assert r["pan_seg_file_name"] == str(ade / "ade20k_panoptic_train" / "ADE_train_00000001.png")
    assert r["sem_seg_file_name"] == str(
        ade / "annotations_detectron2" / "training" / "ADE_train_00000001.png"
    )
    assert (r["image_id"], r["height"], r["width"]) == ("ADE_train_00000001", 4, 6)
    assert [(s["category_id"], s["isthing"]) for s in r["segments_info"]] == [
        (0, False),
        (3, False),
        (7, True),
        (12, True),
    ]


def test_registered_names_resolve_data_root_at_load_time(ade_root, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(ade_root))
    assert data_root() == str(ade_root)
    name = _unique("test_ade_pan")
    register_panoptic(
        name,
        metadata=panoptic_metadata(ade20k_150_categories()),
        image_root=f"{ADE}/images/validation",
        panoptic_root=f"{ADE}/ade20k_panoptic_val",
        panoptic_json=f"{ADE}/ade20k_panoptic_val.json",
        sem_seg_root=f"{ADE}/annotations_detectron2/validation",
        prepare_hint="prepare it",
    )
    meta = MetadataCatalog.get(name)
    assert meta.panoptic_json == str(ade_root / ADE / "ade20k_panoptic_val.json")
    assert (meta.ignore_label, meta.label_divisor, meta.evaluator_type) == (
        255,
        1000,
        "coco_panoptic_seg",
    )
    assert len(meta.stuff_classes) == 150 and len(meta.thing_classes) == 100
    (record,) = DatasetCatalog.get(name)
    assert [s["category_id"] for s in record["segments_info"]] == [9, 12]

    # the built-in names were registered at import with another root; their loaders still read
    # the folder DETECTRON2_DATASETS names now
    assert [r["image_id"] for r in DatasetCatalog.get("ade20k_panoptic_val")] == [
        "ADE_val_00000001"
    ]
    semantic = DatasetCatalog.get("ade20k_semantic_train")
    assert [r["image_id"] for r in semantic] == ["ADE_train_00000001", "ADE_train_00000002"]
    assert semantic[0]["sem_seg_file_name"].endswith(
        os.path.join("annotations_detectron2", "training", "ADE_train_00000001.png")
    )
    assert MetadataCatalog.get("ade20k_semantic_val").stuff_classes[7] == "bed"


def test_missing_data_root_names_path_and_prepare_command(tmp_path, monkeypatch):
    missing = tmp_path / "no_data_here"
    monkeypatch.setenv("DETECTRON2_DATASETS", str(missing))
    name = _unique("test_missing_root")
    register_sem_seg(
        name,
        metadata={"stuff_classes": ["a"]},
        image_root="x/images",
        sem_seg_root="x/labels",
        prepare_hint="python datasets/prepare_x.py",
    )
    with pytest.raises(FileNotFoundError) as e:
        DatasetCatalog.get(name)
    assert str(missing) in str(e.value) and "python datasets/prepare_x.py" in str(e.value)

    # root present, dataset absent: the missing file is named
    missing.mkdir()
    name = _unique("test_missing_json")
    register_panoptic(
        name,
        metadata=panoptic_metadata([{"id": 1, "name": "a", "isthing": 1, "color": [0, 0, 0]}]),
        image_root="ds/images",
        panoptic_root="ds/pan",
        panoptic_json="ds/pan.json",
        sem_seg_root=None,
        prepare_hint="python datasets/prepare_ds.py",
    )
    with pytest.raises(FileNotFoundError) as e:
        DatasetCatalog.get(name)
    assert str(missing / "ds" / "pan.json") in str(e.value)
    assert "python datasets/prepare_ds.py" in str(e.value)


# ---------------------------------------------------------------- malformed json

CATS3 = [
    {"id": 7, "name": "road", "isthing": 0, "color": [1, 1, 1]},
    {"id": 3, "name": "car", "isthing": 1, "color": [2, 2, 2]},
    {"id": 11, "name": "sky", "isthing": 0, "color": [3, 3, 3]},
]


def test_panoptic_metadata_on_three_categories():
    meta = panoptic_metadata(CATS3)
    assert meta["thing_classes"] == ["car"] and meta["thing_colors"] == [[2, 2, 2]]
    assert meta["stuff_classes"] == ["road", "car", "sky"]
    assert meta["stuff_colors"] == [[1, 1, 1], [2, 2, 2], [3, 3, 3]]
    assert meta["thing_dataset_id_to_contiguous_id"] == {3: 1}
    assert meta["stuff_dataset_id_to_contiguous_id"] == {7: 0, 3: 1, 11: 2}


def test_panoptic_metadata_rejects_duplicates_and_missing_fields():
    with pytest.raises(ValueError, match=r"category id 7 appears twice"):
        panoptic_metadata(CATS3 + [{"id": 7, "name": "x", "isthing": 0, "color": [0, 0, 0]}])
    with pytest.raises(ValueError, match=r"category #1 .*lacks field\(s\) \['isthing'\]"):
        panoptic_metadata([CATS3[0], {"id": 2, "name": "x", "color": [0, 0, 0]}])


@pytest.fixture
def tiny_panoptic(tmp_path):
    """A one-image COCO panoptic dataset using CATS3; returns (paths, json content)."""
    for sub in ("images", "pan"):
        (tmp_path / sub).mkdir()
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "pan" / "a_pan.png")
    content = {
        "images": [{"id": 5, "file_name": "a.png", "height": 2, "width": 2}],
        "annotations": [
            {
                "image_id": 5,
                "file_name": "a_pan.png",
                "segments_info": [
                    {"id": 1, "category_id": 11, "area": 3, "bbox": [0, 0, 2, 2]},
                    {"id": 2, "category_id": 3, "iscrowd": 1, "area": 1, "bbox": [1, 1, 1, 1]},
                ],
            }
        ],
    }
    return tmp_path, content


def _load(root, content=None, text=None):
    json_file = root / "pan.json"
    json_file.write_text(text if text is not None else json.dumps(content))
    return load_panoptic_json(
        str(json_file), str(root / "images"), str(root / "pan"), None, panoptic_metadata(CATS3)
    ), str(json_file)


def test_load_panoptic_json_png_images_and_contiguous_ids(tiny_panoptic):
    root, content = tiny_panoptic
    (record,), _ = _load(root, content)
    # the image is found by the images entry (a .png here), the label by the annotation
    assert record["file_name"] == str(root / "images" / "a.png")
    assert record["pan_seg_file_name"] == str(root / "pan" / "a_pan.png")
    assert "sem_seg_file_name" not in record
    assert record["segments_info"] == [
        {
            "id": 1,
            "category_id": 2,
            "area": 3,
            "bbox": [0, 0, 2, 2],
            "isthing": False,
            "iscrowd": 0,
        },
        {"id": 2, "category_id": 1, "iscrowd": 1, "area": 1, "bbox": [1, 1, 1, 1], "isthing": True},
    ]


def test_load_panoptic_json_bad_json_text(tiny_panoptic):
    root, _ = tiny_panoptic
    with pytest.raises(ValueError, match=r"pan\.json is not valid JSON"):
        _load(root, text='{"images": [')


def test_load_panoptic_json_annotation_without_image(tiny_panoptic):
    root, content = tiny_panoptic
    content["annotations"][0]["image_id"] = 6
    with pytest.raises(ValueError) as e:
        _load(root, content)
    assert str(root / "pan.json") in str(e.value)
    assert "annotation #0" in str(e.value) and "image_id 6" in str(e.value)


def test_load_panoptic_json_unknown_category(tiny_panoptic):
    root, content = tiny_panoptic
    content["annotations"][0]["segments_info"][1]["category_id"] = 4
    with pytest.raises(ValueError) as e:
        _load(root, content)
    message = str(e.value)
    assert str(root / "pan.json") in message and "annotation #0" in message
    assert "segment id 2" in message and "category_id 4" in message and "[3, 7, 11]" in message


def test_load_panoptic_json_missing_keys_and_files(tiny_panoptic):
    root, content = tiny_panoptic
    del content["annotations"][0]["segments_info"]
    with pytest.raises(ValueError, match=r"annotation #0 lacks key\(s\) \['segments_info'\]"):
        _load(root, content)
    content = {
        "images": [{"id": 5, "file_name": "b.png"}],
        "annotations": [{"image_id": 5, "file_name": "a_pan.png", "segments_info": []}],
    }
    with pytest.raises(FileNotFoundError, match=r"1 of 1 image file\(s\) do not exist: .*b\.png"):
        _load(root, content)


# ---------------------------------------------------------------- semantic loaders


def test_sem_seg_folders_pairs_by_stem_and_names_unpaired_files(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "gt").mkdir()
    for stem in ("b", "a"):
        (tmp_path / "img" / f"{stem}.jpg").write_bytes(b"")
        (tmp_path / "gt" / f"{stem}.png").write_bytes(b"")
    records = load_sem_seg_folders(str(tmp_path / "img"), str(tmp_path / "gt"))
    assert [r["image_id"] for r in records] == ["a", "b"]
    assert records[0]["sem_seg_file_name"] == str(tmp_path / "gt" / "a.png")

    (tmp_path / "img" / "c.jpg").write_bytes(b"")
    with pytest.raises(ValueError) as e:
        load_sem_seg_folders(str(tmp_path / "img"), str(tmp_path / "gt"))
    assert str(tmp_path / "img" / "c.jpg") in str(e.value)
    assert str(tmp_path / "gt" / "c.png") in str(e.value)


def test_voc_list_loader_both_line_formats_and_errors(tmp_path):
    voc = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClassAug", "SegmentationClass"):
        (voc / sub).mkdir(parents=True)
    for stem in ("2007_000032", "2007_000033"):
        (voc / "JPEGImages" / f"{stem}.jpg").write_bytes(b"")
        (voc / "SegmentationClassAug" / f"{stem}.png").write_bytes(b"")
    (voc / "SegmentationClass" / "2007_000033.png").write_bytes(b"")
    lst = tmp_path / "list.txt"
    lst.write_text(
        "2007_000033\n\n/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n"
        "JPEGImages/2007_000033.jpg SegmentationClass/2007_000033.png\n"
    )
    records = load_voc_list(str(lst), str(voc))
    # list order is kept: continual splits index images by position
    assert [r["image_id"] for r in records] == ["2007_000033", "2007_000032", "2007_000033"]
    assert records[0]["sem_seg_file_name"] == str(voc / "SegmentationClassAug" / "2007_000033.png")
    assert records[2]["sem_seg_file_name"] == str(voc / "SegmentationClass" / "2007_000033.png")

    lst.write_text("a b c\n")
    with pytest.raises(ValueError, match=r"list\.txt:1: expected an image id"):
        load_voc_list(str(lst), str(voc))
    lst.write_text("2007_000099\n")
    with pytest.raises(FileNotFoundError, match=r"2007_000099\.jpg"):
        load_voc_list(str(lst), str(voc))
    with pytest.raises(FileNotFoundError, match=r"nolist\.txt does not exist"):
        load_voc_list(str(tmp_path / "nolist.txt"), str(voc))


def test_builtin_metadata_without_data():
    voc = MetadataCatalog.get("voc_sem_seg_train")
    assert voc.stuff_classes == VOC_CLASSES and len(VOC_CLASSES) == 21
    assert voc.stuff_colors[15] == [192, 128, 128] == voc_colormap()[15]  # person
    assert (voc.ignore_label, voc.evaluator_type) == (255, "sem_seg")
    coco = MetadataCatalog.get("comformer_coco_panoptic_val")
    assert len(coco.stuff_classes) == 133 and len(coco.thing_classes) == 80
    assert coco.thing_dataset_id_to_contiguous_id[1] == 0  # person
    assert coco.stuff_dataset_id_to_contiguous_id[200] == 132  # last stuff class
    ade = MetadataCatalog.get("ade20k_panoptic_train")
    assert ade.stuff_dataset_id_to_contiguous_id == {i: i for i in range(150)}
    assert ade.sem_seg_root.endswith(os.path.join(ADE, "annotations_detectron2", "training"))
