"""Each method starts from a base trained with its own step-0 losses (whatever the order in which
methods are listed), an adopted base must have been trained that way, and ``joint`` is the
offline upper bound (a new model per step with the base schedule)."""

import json
from pathlib import Path

import pytest

from comformer.data.scenario import build_scenario
from comformer.engine import run_scenario, step_config
from comformer.engine.bases import base_owners, base_signature
from comformer.engine.step_config import step_iterations
from test_faults import CONTINUAL_CFG, TINY_OPTS, _cfg

REPO = Path(__file__).resolve().parents[1]
COMFORMER_CFG = REPO / "configs/synthetic/panoptic-segmentation/continual/10-10-comformer.yaml"


def _method_cfg(method, *opts):
    path = COMFORMER_CFG if method == "comformer" else CONTINUAL_CFG
    return _cfg("CONT.METHOD", method, *opts, path=path)


@pytest.mark.parametrize(
    "order",
    [["ft", "joint", "mib", "plop", "comformer"], ["comformer", "plop", "mib", "joint", "ft"]],
)
def test_each_method_gets_a_base_trained_with_its_own_step0_losses(order):
    owners = base_owners({m: _method_cfg(m) for m in order})
    # Mask2Former's losses for ft, joint, mib, plop; softmax masks + focal loss for CoMFormer
    assert owners == {"comformer": "comformer", "ft": "ft", "joint": "ft", "mib": "ft", "plop": "ft"}


def test_base_signature_tells_the_step0_training_apart():
    ft = base_signature(_method_cfg("ft"))
    assert base_signature(_method_cfg("mib", "OUTPUT_DIR", "/elsewhere")) == ft
    assert base_signature(_method_cfg("comformer")) != ft
    # the focal loss alone (sigmoid masks, CoMFormer's ablation) is another base
    focal = _method_cfg("comformer", "MODEL.MASK_FORMER.MASK_ACTIVATION", "sigmoid")
    focal.CONT.COMFORMER.SOFTMAX_MASKS = False
    assert base_signature(focal) not in (ft, base_signature(_method_cfg("comformer")))
    assert base_signature(_method_cfg("ft", "SEED", 3)) != ft
    assert base_signature(_method_cfg("ft", "CONT.TASK", "5-5")) != ft


def test_adopting_a_base_trained_another_way_is_an_error(tmp_path):
    base = tmp_path / "ft" / "step0"
    base.mkdir(parents=True)
    (base / "model_final.pth").write_bytes(b"never read")
    (base / "done.json").write_text(json.dumps({"base_signature": base_signature(_method_cfg("ft"))}))
    cfg = _method_cfg(
        "comformer", *TINY_OPTS, "OUTPUT_DIR", str(tmp_path / "comformer"),
        "CONT.BASE_WEIGHTS", str(base / "model_final.pth"),
    )  # fmt: skip
    cfg.freeze()
    with pytest.raises(ValueError, match="base trained another way"):
        run_scenario(cfg)


def test_joint_trains_every_step_offline_with_the_base_schedule():
    cfg = _method_cfg("joint", "MODEL.WEIGHTS", "imagenet.pkl", "SOLVER.MAX_ITER", 700)
    scenario = build_scenario(cfg)
    c1 = step_config(cfg, scenario, 1)
    assert c1.SOLVER.MAX_ITER == 700 == step_iterations(cfg, scenario, 1)
    assert c1.SOLVER.BASE_LR == cfg.SOLVER.BASE_LR and c1.MODEL.WEIGHTS == "imagenet.pkl"
    assert c1.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 20
    # the fine-tune on all data keeps the incremental schedule, from the previous step
    cfg = _method_cfg("jointft", "MODEL.WEIGHTS", "imagenet.pkl", "SOLVER.MAX_ITER", 700)
    c1 = step_config(cfg, scenario, 1)
    assert c1.SOLVER.MAX_ITER == 50 * 10 and c1.SOLVER.BASE_LR == pytest.approx(1.5e-4)
    assert c1.MODEL.WEIGHTS == ""


def test_joint_scenario_runs_without_the_previous_step(tmp_path):
    from comformer.data.datasets.synthetic import generate
    from test_faults import SPEC, _register

    root = Path(generate(str(tmp_path / "data"), SPEC))
    train, val = _register(root, "train"), _register(root, "val")
    cfg = _method_cfg(
        "joint", *TINY_OPTS, "DATASETS.TRAIN", (train,), "DATASETS.TEST", (val,),
        "OUTPUT_DIR", str(tmp_path / "out"), "SOLVER.MAX_ITER", 3,
        "CONT.INC_ITERS_PER_CLASS", 0, "CONT.INC_MAX_ITER", 1,
    )  # fmt: skip
    cfg.freeze()
    # step 1 alone: a joint step needs no step 0
    rows = run_scenario(_with_step(cfg, 1))
    assert [r["step"] for r in rows] == [1] and rows[0]["iterations"] == 3
    assert not (tmp_path / "out/step0").exists()


def _with_step(cfg, step):
    out = cfg.clone()
    out.defrost()
    out.CONT.STEP = step
    out.freeze()
    return out
