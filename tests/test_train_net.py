"""A tiny joint training and evaluation through tools/train_net.py, with detectron2's evaluators."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CFG = REPO / "configs/synthetic/panoptic-segmentation/maskformer2_R18_cpu.yaml"


def test_tiny_train_and_eval_reports_pq_and_miou(tmp_path):
    cmd = [
        sys.executable,
        str(REPO / "tools/train_net.py"),
        "--config-file",
        str(CFG),
        "OUTPUT_DIR",
        str(tmp_path),
        "SOLVER.MAX_ITER",
        "4",
        "SOLVER.IMS_PER_BATCH",
        "2",
        "DATALOADER.NUM_WORKERS",
        "0",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    final = metrics[-1]
    # detectron2's COCOPanopticEvaluator and SemSegEvaluator ran on the validation set
    for key in ("panoptic_seg/PQ", "panoptic_seg/SQ", "panoptic_seg/RQ", "sem_seg/mIoU"):
        assert 0.0 <= final[key] <= 100.0, key
    assert any("total_loss" in m for m in metrics)  # the losses were logged
    assert (tmp_path / "model_final.pth").is_file()

    # --eval-only reloads the final weights and reports the same PQ
    evaluated = subprocess.run(
        cmd[:4] + ["--eval-only"] + cmd[4:] + ["MODEL.WEIGHTS", str(tmp_path / "model_final.pth")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    lines = (evaluated.stdout + evaluated.stderr).splitlines()
    header = next(
        i
        for i, line in enumerate(lines)
        if line.endswith("copypaste: PQ,SQ,RQ,PQ_th,SQ_th,RQ_th,PQ_st,SQ_st,RQ_st")
    )  # noqa: E501
    pq = float(lines[header + 1].split("copypaste: ")[1].split(",")[0])
    assert abs(pq - final["panoptic_seg/PQ"]) < 1e-3
