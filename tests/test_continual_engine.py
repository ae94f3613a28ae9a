"""The continual engine: label remapping in the mapper, classifier growth, teacher checks, the runner."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.projects.deeplab import add_deeplab_config

from comformer import add_comformer_config
from comformer.continual import (
    ContinualModel,
    Teacher,
    build_continual_model,
    grow_classifier_state_dict,
    to_dataset_classes,
)
from comformer.data.mappers import PanopticDatasetMapper
from comformer.data.scenario import build_scenario
from comformer.engine import (
    StepTrainer,
    results_table,
    step_config,
    step_iterations,
    step_splits,
)

REPO = Path(__file__).resolve().parents[1]
CFG_10_10 = REPO / "configs/synthetic/panoptic-segmentation/continual/10-10.yaml"


def _cfg(*opts):
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_comformer_config(cfg)
    cfg.merge_from_file(str(CFG_10_10))
    cfg.merge_from_list(list(opts))
    return cfg


def _step_model(step, *opts):
    """The plain Mask2Former of a step (the step config sizes its classifier)."""
    cfg = _cfg(*opts)
    return build_model(step_config(cfg, build_scenario(cfg), step))


def _id2rgb(ids):
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def test_increment_lr_milestones_follow_the_increment():
    """SOLVER.STEPS counts base iterations (here 300, one milestone at 250 = 5/6): an increment
    of 500 iterations puts it at 5/6 of its own length, or where CONT.INC_LR_STEPS says."""
    base = ("SOLVER.MAX_ITER", "300", "SOLVER.STEPS", "(250, 400)")  # 400: never reached
    cfg = _cfg(*base)
    scenario = build_scenario(cfg)
    assert step_config(cfg, scenario, 0).SOLVER.STEPS == (250, 400)
    assert step_config(cfg, scenario, 1).SOLVER.STEPS == (417,)  # 250/300 * 500 = 416.7
    cfg = _cfg(*base, "CONT.INC_LR_STEPS", "[0.5, 0.9]")
    assert step_config(cfg, scenario, 1).SOLVER.STEPS == (250, 450)
    cfg = _cfg(*base, "CONT.INC_LR_STEPS", "[]")
    assert step_config(cfg, scenario, 1).SOLVER.STEPS == ()
    cfg = _cfg(*base, "CONT.INC_LR_STEPS", "[0.5, 1.5]")
    with pytest.raises(ValueError, match=r"CONT.INC_LR_STEPS=\[0.5, 1.5\].*\(0, 1\).*1.5"):
        step_config(cfg, scenario, 1)


def test_panoptic_mapper_remaps_and_removes_classes(tmp_path):
    ids = np.zeros((8, 8), dtype=np.int64)
    ids[:4] = 1  # class 3 (kept, model index 1 after the order below)
    ids[4:, :4] = 2  # class 0 (another step: removed)
    ids[4:, 4:] = 3  # class 3, crowd (never a target)
    Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(tmp_path / "im.png")
    Image.fromarray(_id2rgb(ids)).save(tmp_path / "pan.png")
    record = {
        "file_name": str(tmp_path / "im.png"),
        "pan_seg_file_name": str(tmp_path / "pan.png"),
        "height": 8,
        "width": 8,
        "segments_info": [
            {"id": 1, "category_id": 3, "iscrowd": 0},
            {"id": 2, "category_id": 0, "iscrowd": 0},
            {"id": 3, "category_id": 3, "iscrowd": 1},
        ],
    }
    cfg = _cfg(
        "INPUT.CROP.ENABLED", False, "INPUT.MIN_SIZE_TRAIN", (8,), "INPUT.SIZE_DIVISIBILITY", -1
    )
    label_map = np.array([-1, -1, -1, 1, -1] + [-1] * 15)
    mapper = PanopticDatasetMapper(cfg, is_train=True, label_map=label_map)
    out = mapper(record)
    inst = out["instances"]
    assert inst.gt_classes.tolist() == [1]
    assert int(inst.gt_masks.tensor.sum()) == 32  # the top half, flipped or not
    with pytest.raises(ValueError, match="class id 25"):
        mapper.map_class(25)


def test_classifier_growth_keeps_old_weights_bit_for_bit():
    torch.manual_seed(0)
    old = _step_model(0)
    new = _step_model(1)
    assert old.num_classes == 10 and new.num_classes == 20
    grown = grow_classifier_state_dict(old.state_dict(), new.state_dict(), num_old=10)
    new.load_state_dict(grown)
    w_old = old.sem_seg_head.predictor.class_embed.weight
    w_new = new.sem_seg_head.predictor.class_embed.weight
    assert w_new.shape == (21, w_old.shape[1])
    assert torch.equal(w_new[:10], w_old[:10]) and torch.equal(w_new[20], w_old[10])
    b_old, b_new = (m.sem_seg_head.predictor.class_embed.bias for m in (old, new))
    assert torch.equal(b_new[:10], b_old[:10]) and torch.equal(b_new[-1], b_old[-1])
    for name, p in old.state_dict().items():
        if "class_embed" not in name and name != "criterion.empty_weight":
            assert torch.equal(p, new.state_dict()[name]), name
    with pytest.raises(ValueError, match="another scenario or step"):
        grow_classifier_state_dict(old.state_dict(), new.state_dict(), num_old=12)


def test_inference_outputs_dataset_class_ids_in_any_order():
    cfg = _cfg("CONT.ORDER", list(range(19, -1, -1)))
    scenario = build_scenario(cfg)
    model = build_continual_model(step_config(cfg, scenario, 0), scenario, 0)
    assert model.class_ids == list(range(19, 10 - 1, -1)) and model.num_dataset_classes == 20
    logits = torch.arange(11.0).view(1, 1, 11)  # model indices 0..9, then no-object
    out = to_dataset_classes(logits, model.class_ids, model.num_dataset_classes)[0, 0]
    assert out.shape == (21,)
    assert torch.isinf(out[:10]).all()  # classes 0..9 are not known at step 0
    assert out[19] == 0 and out[10] == 9 and out[20] == 10


def test_missing_or_mismatched_teacher_is_an_error_before_training(tmp_path):
    cfg = _cfg("OUTPUT_DIR", str(tmp_path))
    scenario = build_scenario(cfg)
    cfg1 = step_config(cfg, scenario, 1)
    with pytest.raises(FileNotFoundError, match="run step 0 first"):
        StepTrainer(cfg1, scenario, 1, previous_weights=str(tmp_path / "none.pth"))
    wrong = build_model(cfg1)  # 20 classes where step 0 has 10
    path = tmp_path / "wrong.pth"
    torch.save({"model": wrong.state_dict()}, path)
    with pytest.raises(ValueError, match="predicts 20 classes.*has 10"):
        StepTrainer(cfg1, scenario, 1, previous_weights=str(path))


def test_step_settings_and_splits():
    cfg = _cfg()
    scenario = build_scenario(cfg)
    assert step_iterations(cfg, scenario, 0) == cfg.SOLVER.MAX_ITER
    assert step_iterations(cfg, scenario, 1) == 50 * 10
    c1 = step_config(cfg, scenario, 1)
    assert c1.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 20
    assert step_config(cfg, scenario, 0).MODEL.SEM_SEG_HEAD.NUM_CLASSES == 10
    assert c1.SOLVER.BASE_LR == pytest.approx(1.5e-4) and c1.OUTPUT_DIR.endswith("step1")
    splits = step_splits(scenario, 1)
    assert splits["old"] == list(range(10)) and splits["new"] == list(range(10, 20))
    assert "new" not in step_splits(scenario, 0)
    table = results_table(
        [{"method": "ft", "step": 1, "num_seen": 20, "PQ_old": 1.25, "PQ_new": float("nan")}]
    )
    assert "| ft | 1 | 20 | 1.2 | - |" in table


def _run(out, *opts):
    cmd = [
        sys.executable,
        str(REPO / "tools/train_net.py"),
        "--config-file",
        str(CFG_10_10),
        "OUTPUT_DIR",
        str(out),
        "SOLVER.MAX_ITER",
        "3",
        "CONT.INC_ITERS_PER_CLASS",
        "0",
        "CONT.INC_MAX_ITER",
        "2",
        "SOLVER.IMS_PER_BATCH",
        "2",
        "DATALOADER.NUM_WORKERS",
        "0",
        "CONT.VIS_IMAGES",
        "1",
        *opts,
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_runner_trains_a_scenario_skips_finished_steps_and_guards_its_folder(tmp_path):
    out = tmp_path / "run"
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[1]["num_seen"] == 20 and rows[1]["iterations"] == 2
    for key in ("PQ_all", "PQ_old", "PQ_new", "mIoU_all", "mIoU_old", "mIoU_new"):
        assert 0.0 <= rows[1][key] <= 100.0, key
    for name in ("results.csv", "results.md", "results.png", "scenario.json"):
        assert (out / name).is_file(), name
    for step in (0, 1):
        assert (out / f"step{step}" / "done.json").is_file()
        assert (out / f"step{step}" / "model_final.pth").is_file()
        assert len(os.listdir(out / f"step{step}" / "vis")) == 1
    assert "| ft | 1 | 20 |" in proc.stdout

    again = _run(out)
    assert again.returncode == 0
    assert (again.stdout + again.stderr).count(
        "is finished"
    ) == 2  # both steps skipped, nothing retrained
    assert json.loads((out / "results.json").read_text()) == rows

    other = _run(out, "CONT.TASK", "10-2")
    assert other.returncode != 0 and "holds the steps of another run" in other.stderr


def test_teacher_stays_out_of_the_students_state_and_parameters():
    cfg = _cfg("CONT.METHOD", "mib")
    scenario = build_scenario(cfg)
    previous = _step_model(0).state_dict()
    from comformer.continual import build_method

    cfg1 = step_config(cfg, scenario, 1)
    model = build_continual_model(
        cfg1, scenario, 1, build_method(cfg1, scenario, 1), previous_state=previous
    )
    assert isinstance(model, ContinualModel) and isinstance(model.teacher, Teacher)
    teacher = model.teacher.model
    # the state dict and parameters are the student's alone, named as Mask2Former's
    assert set(model.student.state_dict()) == set(previous)
    assert {f"student.{k}" for k in previous} == set(model.state_dict())
    assert not any(p is q for p in model.parameters() for q in teacher.parameters())
    model.train()
    assert model.student.training and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    for name, p in teacher.state_dict().items():
        assert torch.equal(p, previous[name]), name


def test_continual_model_needs_the_step_config():
    cfg = _cfg()
    scenario = build_scenario(cfg)
    with pytest.raises(ValueError, match="NUM_CLASSES=20"):
        build_continual_model(cfg, scenario, 0)  # the scenario's config, not step 0's
