"""SplitEvaluator on a tiny registered dataset: hand-made predictions, hand-computed PQ and mIoU.

Classes: 0 cat (thing), 1 dog (thing), 2 sky (stuff), 3 grass (stuff). Step 0 learned cat and sky,
step 1 dog; grass comes later, so it is unseen (void) unless said otherwise.

Image A (4x4)                                   Image B (4x4)
  gt:   sky  sky  sky  sky                        gt:   dog dog sky  sky
        sky  sky  sky  sky                              dog dog sky  sky
        cat  cat  grs  grs                              dog dog void void
        cat  cat  grs  grs                              dog dog void void
  pan:  S    S    S    S      S = sky (class 2)   pan:  D   D   X    X     D = dog (1)
        S    S    S    S                                D   D   X    X     X = class 0 (wrong)
        C    C    S    S      C = cat (0)               D   D   S    S     S = sky, all on void
        C    0    S    S      0 = void                  D   D   S    S
  sem:  2 2 2 2                                   sem:  1 1 0 0
        2 2 2 2                                         1 1 0 0
        0 0 3 3                                         1 1 2 2
        0 1 3 3                                         1 1 2 2
"""

import json
import math
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog

from comformer.evaluation.split_evaluator import SplitEvaluator

CLASSES = ["cat", "dog", "sky", "grass"]
K = len(CLASSES)
SKY, CAT, GRASS, DOG = 1, 2, 3, 5  # gt segment ids


def _id2rgb(ids):
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def _ground_truth():
    pan_a = np.array([[SKY] * 4, [SKY] * 4, [CAT, CAT, GRASS, GRASS], [CAT, CAT, GRASS, GRASS]])
    seg_a = [
        {"id": SKY, "category_id": 2, "iscrowd": 0, "isthing": False},
        {"id": CAT, "category_id": 0, "iscrowd": 0, "isthing": True},
        {"id": GRASS, "category_id": 3, "iscrowd": 0, "isthing": False},
    ]
    sem_a = np.array([[2] * 4, [2] * 4, [0, 0, 3, 3], [0, 0, 3, 3]])
    pan_b = np.array([[DOG, DOG, SKY, SKY]] * 2 + [[DOG, DOG, 0, 0]] * 2)
    seg_b = [
        {"id": DOG, "category_id": 1, "iscrowd": 0, "isthing": True},
        {"id": SKY, "category_id": 2, "iscrowd": 0, "isthing": False},
    ]
    sem_b = np.array([[1, 1, 2, 2]] * 2 + [[1, 1, 255, 255]] * 2)
    return [("a", pan_a, seg_a, sem_a), ("b", pan_b, seg_b, sem_b)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Registers the two images; returns (dataset name, {image name: file_name})."""
    root = tmp_path_factory.mktemp("tiny_continual")
    records = []
    for name, pan, segments, sem in _ground_truth():
        image = root / f"{name}.jpg"
        Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(image)
        Image.fromarray(_id2rgb(pan)).save(root / f"{name}_pan.png")
        Image.fromarray(sem.astype(np.uint8)).save(root / f"{name}_sem.png")
        records.append(
            {
                "file_name": str(image),
                "image_id": name,
                "height": 4,
                "width": 4,
                "pan_seg_file_name": str(root / f"{name}_pan.png"),
                "sem_seg_file_name": str(root / f"{name}_sem.png"),
                "segments_info": segments,
            }
        )
    dataset_name = f"tiny_continual_{uuid.uuid4().hex[:8]}"
    DatasetCatalog.register(dataset_name, lambda: records)
    MetadataCatalog.get(dataset_name).set(
        stuff_classes=CLASSES,
        thing_classes=CLASSES[:2],
        thing_dataset_id_to_contiguous_id={10: 0, 11: 1},
        stuff_dataset_id_to_contiguous_id={10: 0, 11: 1, 12: 2, 13: 3},
        ignore_label=255,
    )
    yield dataset_name, {r["image_id"]: r["file_name"] for r in records}
    DatasetCatalog.remove(dataset_name)
    MetadataCatalog.remove(dataset_name)


def _scores(label_map):
    """(K, H, W) one-hot scores whose argmax is ``label_map``."""
    return torch.nn.functional.one_hot(torch.as_tensor(label_map), K).permute(2, 0, 1).float()


def _predictions(files):
    pan_a = torch.tensor([[1] * 4, [1] * 4, [2, 2, 1, 1], [2, 0, 1, 1]], dtype=torch.int32)
    seg_a = [
        {"id": 1, "category_id": 2, "isthing": False},
        {"id": 2, "category_id": 0, "isthing": True},
    ]
    sem_a = [[2] * 4, [2] * 4, [0, 0, 3, 3], [0, 1, 3, 3]]
    pan_b = torch.tensor([[1, 1, 2, 2]] * 2 + [[1, 1, 3, 3]] * 2, dtype=torch.int32)
    seg_b = [
        {"id": 1, "category_id": 1, "isthing": True},
        {"id": 2, "category_id": 0, "isthing": True},
        {"id": 3, "category_id": 2, "isthing": False},
    ]
    sem_b = [[1, 1, 0, 0]] * 2 + [[1, 1, 2, 2]] * 2
    inputs = [{"file_name": files[n], "image_id": n} for n in ("a", "b")]
    outputs = [
        {"panoptic_seg": (pan_a, seg_a), "sem_seg": _scores(sem_a)},
        {"panoptic_seg": (pan_b, seg_b), "sem_seg": _scores(sem_b)},
    ]
    return inputs, outputs


def _evaluate(dataset_name, files, seen, splits, **kwargs):
    evaluator = SplitEvaluator(
        dataset_name, seen_classes=seen, splits=splits, panoptic=True, semantic=True, **kwargs
    )
    evaluator.reset()
    inputs, outputs = _predictions(files)
    # one image per call, as a batch of 1 from the test loader
    for inp, out in zip(inputs, outputs):
        evaluator.process([inp], [out])
    return evaluator.evaluate()


def test_old_new_all_with_an_unseen_class(dataset, tmp_path):
    name, files = dataset
    res = _evaluate(
        name,
        files,
        seen=[0, 1, 2],
        splits={"old": [0, 2], "new": [1, 3], "step1": [1]},
        output_dir=str(tmp_path),
    )
    pan, sem = res["panoptic_seg"], res["sem_seg"]
    # PQ counts:
    #  cat: A tp (IoU 3/(3+4-3) = .75), B the sky predicted as class 0 is a fp (no void under it)
    #       -> PQ .75/1.5 = .5, SQ .75, RQ 1/1.5
    #  dog: B tp, IoU 1 -> 1, 1, 1
    #  sky: A tp with IoU 8/(12+8-8-4) = 1 (the 4 grass pixels under S are void), B fn
    #       -> PQ 1/1.5, SQ 1, RQ 1/1.5; B's S lies on void only: no fp
    #  grass: unseen -> no counts, not averaged
    pq = {"cat": 0.5, "dog": 1.0, "sky": 2 / 3}
    sq = {"cat": 0.75, "dog": 1.0, "sky": 1.0}
    rq = {"cat": 2 / 3, "dog": 1.0, "sky": 2 / 3}

    def mean(d, names):
        return 100 * np.mean([d[n] for n in names])

    for key, d in (("PQ", pq), ("SQ", sq), ("RQ", rq)):
        assert pan[key] == pytest.approx(mean(d, ["cat", "dog", "sky"]))
        assert pan[f"{key}_th"] == pytest.approx(mean(d, ["cat", "dog"]))
        assert pan[f"{key}_st"] == pytest.approx(mean(d, ["sky"]))
        assert pan[f"{key}_old"] == pytest.approx(mean(d, ["cat", "sky"]))
        # grass, in "new", is unseen: left out
        assert pan[f"{key}_new"] == pytest.approx(mean(d, ["dog"]))
        assert pan[f"{key}_step1"] == pytest.approx(mean(d, ["dog"]))
    assert pan["PQ"] == pytest.approx(100 * 13 / 18)
    for n in pq:
        assert pan[f"PQ-{n}"] == pytest.approx(100 * pq[n])
    assert "PQ-grass" not in pan

    # mIoU: conf over pixels with seen gt (grass pixels and 255 ignored)
    #  cat: tp 3 (A), gt 4, predicted 3 (A) + 4 (B's sky) -> IoU 3/8, acc 3/4
    #  dog: tp 8, gt 8, predicted 8 + 1 (A) -> IoU 8/9, acc 1
    #  sky: tp 8, gt 12, predicted 8 -> IoU 8/12, acc 8/12
    iou = {"cat": 3 / 8, "dog": 8 / 9, "sky": 2 / 3}
    assert sem["mIoU"] == pytest.approx(100 * np.mean(list(iou.values())))
    assert sem["mIoU_old"] == pytest.approx(100 * (3 / 8 + 2 / 3) / 2)
    assert sem["mIoU_new"] == pytest.approx(100 * 8 / 9)
    assert sem["fwIoU"] == pytest.approx(100 * (4 * 3 / 8 + 8 * 8 / 9 + 12 * 2 / 3) / 24)
    assert sem["pACC"] == pytest.approx(100 * 19 / 24)
    assert sem["mACC"] == pytest.approx(100 * (3 / 4 + 1 + 8 / 12) / 3)
    for n in iou:
        assert sem[f"IoU-{n}"] == pytest.approx(100 * iou[n])
    assert "IoU-grass" not in sem

    saved = json.loads((tmp_path / "continual_evaluation.json").read_text())
    assert saved["num_images"] == 2 and saved["seen_classes"] == [0, 1, 2]
    assert saved["pq_counts"]["tp"] == [1, 1, 1, 0] and saved["pq_counts"]["fp"] == [1, 0, 0, 0]
    assert saved["metrics"]["panoptic_seg"]["PQ"] == pytest.approx(pan["PQ"])


def test_seeing_every_class_makes_grass_count(dataset):
    name, files = dataset
    res = _evaluate(name, files, seen=range(K), splits={"old": [0, 2], "new": [1, 3]})
    pan, sem = res["panoptic_seg"], res["sem_seg"]
    # grass is no longer void: A's S now has IoU 8/12 (still a match) and grass is a fn.
    #  sky: PQ (2/3)/1.5 = 4/9; grass: PQ 0; cat .5, dog 1 as before
    assert pan["PQ-sky"] == pytest.approx(100 * 4 / 9)
    assert pan["PQ-grass"] == 0.0
    assert pan["PQ"] == pytest.approx(100 * (0.5 + 1 + 4 / 9 + 0) / 4)
    assert pan["PQ_new"] == pytest.approx(100 * (1 + 0) / 2)
    # semantic: A's grass pixels, predicted grass, now count: IoU 1
    assert sem["IoU-grass"] == pytest.approx(100.0)
    assert sem["mIoU"] == pytest.approx(100 * (3 / 8 + 8 / 9 + 2 / 3 + 1) / 4)


def test_a_split_without_seen_classes_is_nan(dataset):
    name, files = dataset
    res = _evaluate(name, files, seen=[0, 2], splits={"old": [0, 2], "new": [1, 3]})
    assert math.isnan(res["panoptic_seg"]["PQ_new"]) and math.isnan(res["sem_seg"]["mIoU_new"])
    # dog unseen: B's dog is void, its prediction D lies on void only -> no fp of dog
    # cat: A tp .75, B fp -> .5; sky: A tp 1, B fn -> 2/3
    assert res["panoptic_seg"]["PQ"] == pytest.approx(100 * (0.5 + 2 / 3) / 2)


def test_predicting_an_unseen_class_and_a_class_without_ground_truth(dataset):
    name, files = dataset
    evaluator = SplitEvaluator(
        name, seen_classes=[0, 1, 2], splits={"new": [1, 3]}, panoptic=True, semantic=True
    )
    evaluator.reset()
    inputs, outputs = _predictions(files)
    # image A only; its void pixel (3, 1), on the cat, is now a segment of grass (unseen)
    pan, segments = outputs[0]["panoptic_seg"]
    pan = pan.clone()
    pan[3, 1] = 3
    segments = segments + [{"id": 3, "category_id": 3, "isthing": False}]
    evaluator.process(inputs[:1], [dict(outputs[0], panoptic_seg=(pan, segments))])
    res = evaluator.evaluate()
    # cat .75 (tp, IoU 3/4), sky 1 (tp), dog nothing; the grass fp is a count of an unseen class,
    # in no average: "new" has no seen class with counts -> NaN
    assert res["panoptic_seg"]["PQ"] == pytest.approx(100 * (0.75 + 1) / 2)
    assert math.isnan(res["panoptic_seg"]["PQ_new"]) and math.isnan(res["panoptic_seg"]["PQ-dog"])
    # semantic: the pixel predicted dog has no dog ground truth under it; dog has no gt pixel, so
    # no IoU (as in SemSegEvaluator), cat 3/4, sky 1
    sem = res["sem_seg"]
    assert sem["mIoU"] == pytest.approx(100 * (0.75 + 1) / 2)
    assert math.isnan(sem["IoU-dog"]) and math.isnan(sem["mIoU_new"])


def test_no_image_processed_gives_empty_results(dataset):
    name, _ = dataset
    evaluator = SplitEvaluator(
        name, seen_classes=[0], splits={}, panoptic=True, semantic=False, distributed=False
    )
    evaluator.reset()
    assert evaluator.evaluate() == {}


def test_bad_predictions_raise_naming_the_file(dataset):
    name, files = dataset
    evaluator = SplitEvaluator(
        name, seen_classes=[0, 1], splits={}, panoptic=True, semantic=True
    )
    evaluator.reset()
    inputs, outputs = _predictions(files)
    small = dict(outputs[0], sem_seg=outputs[0]["sem_seg"][:, :3])
    with pytest.raises(ValueError, match=r"a\.jpg.* 3x4 .*a_sem\.png.* 4x4"):
        evaluator.process(inputs[:1], [small])
    small = dict(outputs[0], panoptic_seg=(outputs[0]["panoptic_seg"][0][:3], []))
    with pytest.raises(ValueError, match=r"a\.jpg.* 3x4 .*a_pan\.png.* 4x4"):
        evaluator.process(inputs[:1], [small])
    extra_channel = dict(outputs[0], sem_seg=torch.zeros(K + 1, 4, 4))
    with pytest.raises(ValueError, match=r"a\.jpg.*\(4, H, W\)"):
        evaluator.process(inputs[:1], [extra_channel])
    bad_class = dict(
        outputs[0],
        panoptic_seg=(
            outputs[0]["panoptic_seg"][0],
            [{"id": 1, "category_id": 7}, {"id": 2, "category_id": 0}],
        ),
    )
    with pytest.raises(ValueError, match=r"a\.jpg.*category_id 7.*\[0, 4\)"):
        evaluator.process(inputs[:1], [bad_class])
    with pytest.raises(KeyError, match="nowhere.jpg"):
        evaluator.process([{"file_name": "nowhere.jpg", "image_id": 0}], outputs[:1])


def test_bad_arguments(dataset):
    name, _ = dataset
    kwargs = dict(panoptic=True, semantic=True)
    with pytest.raises(ValueError, match=r"seen_classes .*\[4\]"):
        SplitEvaluator(name, seen_classes=[0, 4], splits={}, **kwargs)
    with pytest.raises(ValueError, match=r"splits\['new'\] .*\[9\]"):
        SplitEvaluator(name, seen_classes=[0], splits={"new": [9]}, **kwargs)
    with pytest.raises(ValueError, match="'th'"):
        SplitEvaluator(name, seen_classes=[0], splits={"th": [0]}, **kwargs)
    with pytest.raises(ValueError, match="compute nothing"):
        SplitEvaluator(name, seen_classes=[0], splits={}, panoptic=False, semantic=False)
