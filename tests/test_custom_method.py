"""A new continual method is one class and a config value: the README's example (plain
distillation with a fixed weight) registered from this file, run through a tiny two-step scenario
without touching ``comformer.modeling``."""

from pathlib import Path

from torch import nn

from comformer.continual import METHOD_REGISTRY, ContinualMethod, StepBatch
from comformer.continual.losses import distillation_loss
from comformer.data.datasets.synthetic import generate
from comformer.engine import run_scenario
from test_faults import CONTINUAL_CFG, SPEC, TINY_OPTS, _cfg, _register

SEEN = {}


# --- the README's example, as written there -----------------------------------------------------
@METHOD_REGISTRY.register()
class PlainKD(ContinualMethod):
    """Fine-tuning plus a KL between the teacher's and the student's old-class distributions."""

    needs_teacher = True

    def losses(self, batch: StepBatch):
        losses = batch.set_losses(batch.student.outputs, batch.targets)
        if batch.teacher is not None:  # step > 0
            losses["loss_kd"] = 2.0 * distillation_loss(
                batch.student.outputs["pred_logits"],
                batch.teacher.outputs["pred_logits"],
                unbiased=False,
            )
            SEEN.setdefault("kd", []).append(float(losses["loss_kd"].detach()))
        return losses

    def init_new_classes(self, class_embed: nn.Linear) -> None:
        SEEN["rows"] = class_embed.weight.shape[0]


# ------------------------------------------------------------------------------------------------


def test_a_method_registered_here_runs_a_two_step_scenario(tmp_path: Path):
    root = Path(generate(str(tmp_path / "data"), SPEC))
    train, val = _register(root, "train"), _register(root, "val")
    cfg = _cfg(
        *TINY_OPTS,
        "DATASETS.TRAIN", (train,), "DATASETS.TEST", (val,),
        "OUTPUT_DIR", str(tmp_path / "out"), "CONT.METHOD", "plainkd",
        "SOLVER.MAX_ITER", 2, "CONT.INC_ITERS_PER_CLASS", 0, "CONT.INC_MAX_ITER", 2,
        path=CONTINUAL_CFG,
    )  # fmt: skip
    cfg.freeze()
    rows = run_scenario(cfg)
    assert [r["step"] for r in rows] == [0, 1] and rows[1]["method"] == "plainkd"
    assert SEEN["rows"] == 21  # 10 old + 10 new + no-object, handed to the method at step 1
    # two iterations of step 1; the first starts from the teacher's own weights (KL 0 up to
    # rounding), the second has moved away from them
    assert len(SEEN["kd"]) == 2 and abs(SEEN["kd"][0]) < 1e-6 and SEEN["kd"][1] > 0
    metrics = (tmp_path / "out/step1/metrics.json").read_text()
    assert "loss_kd" in metrics  # the trainer logged the method's loss


def test_frozen_old_classifier_rows_stay_the_previous_steps(tmp_path: Path):
    import torch

    root = Path(generate(str(tmp_path / "data"), SPEC))
    train, val = _register(root, "train"), _register(root, "val")
    cfg = _cfg(
        *TINY_OPTS,
        "DATASETS.TRAIN", (train,), "DATASETS.TEST", (val,),
        "OUTPUT_DIR", str(tmp_path / "out"), "CONT.METHOD", "ft",
        "SOLVER.MAX_ITER", 2, "CONT.INC_ITERS_PER_CLASS", 0, "CONT.INC_MAX_ITER", 3,
        "CONT.FREEZE_OLD_CLASSIFIER", True,
        path=CONTINUAL_CFG,
    )  # fmt: skip
    cfg.freeze()
    run_scenario(cfg)

    def rows(step):
        state = torch.load(tmp_path / f"out/step{step}/model_final.pth", weights_only=True)["model"]
        return state["sem_seg_head.predictor.class_embed.weight"]

    before, after = rows(0), rows(1)
    assert torch.equal(after[:10], before[:10])  # old classes exactly as trained at step 0
    assert not torch.equal(after[10:20], torch.zeros_like(after[10:20]))
