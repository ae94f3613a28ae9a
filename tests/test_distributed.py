"""
Multi-process training on CPU: detectron2's ``launch`` with 2 processes (gloo) against 1 process
with the same global batch, and the number of target masks summed over processes.

The two runs cannot agree bit for bit: the matcher and the mask losses sample random points, from
each process's own generator. The test uses as many points as pixels and a no-object weight of 1
(the class loss is a weighted mean over each process's queries, as in Mask2Former, which equals
the batch mean only when all queries weigh the same). Tolerances (measured: 0.03% and 5%):

- loss of the first iteration: relative difference <= 1%;
- weight change of one SGD step (from the same initial weights, no clipping, no momentum):
  ``|dW_2 - dW_1| / |dW_1| <= 0.12``. With 256 points and the no-object weight 0.1 it is 0.29.
"""

import json
import subprocess
import sys
from pathlib import Path

import torch

from detectron2.modeling import build_model

from comformer.data.scenario import build_scenario
from comformer.engine.step_config import step_config
from test_faults import TINY_OPTS, _cfg
from test_resume import REPO, _tail, driver_env, tiny_command, write_driver

_NUM_MASKS = """
import sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from comformer.modeling.criterion import SetCriterion

def worker(rank, init_file, out):
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
    criterion = SetCriterion(
        3, matcher=torch.nn.Identity(), weight_dict={}, eos_coef=0.1, num_points=4,
        oversample_ratio=3.0, importance_sample_ratio=0.75,
    )
    # rank 0: 1 image with 3 masks; rank 1: 2 images with 2 and 3 masks
    sizes = [[3], [2, 3]][rank]
    targets = [{"labels": torch.zeros(n, dtype=torch.int64)} for n in sizes]
    value = criterion.get_num_masks(targets, torch.device("cpu"))
    with open(f"{out}.{rank}", "w") as f:
        f.write(repr(value))
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.start_processes(worker, args=(sys.argv[1], sys.argv[2]), nprocs=2, start_method="fork")
"""


def test_num_masks_are_summed_over_processes(tmp_path):
    script = tmp_path / "num_masks.py"
    script.write_text(_NUM_MASKS)
    out = tmp_path / "num_masks"
    cmd = [sys.executable, str(script), str(tmp_path / "init"), str(out)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env=driver_env(tmp_path)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 8 masks over 2 processes: each normalises by 8 / 2, so that the averaged gradients are
    # those of one process normalising the whole batch by 8
    assert [float((tmp_path / f"num_masks.{r}").read_text()) for r in (0, 1)] == [4.0, 4.0]


def _delta(out: Path, init: dict) -> torch.Tensor:
    final = torch.load(out / "step0/model_final.pth", weights_only=True)["model"]
    return torch.cat([(final[k] - v).flatten().double() for k, v in init.items()])


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    driver = write_driver(tmp_path)
    env = driver_env(tmp_path)
    # Both runs start from these weights (also a MODEL.WEIGHTS load, with weights_only).
    torch.manual_seed(0)
    cfg = _cfg(*TINY_OPTS)
    init = build_model(step_config(cfg, build_scenario(cfg), 0)).state_dict()
    torch.save({"model": init}, tmp_path / "init.pth")
    opts = [
        "MODEL.WEIGHTS", tmp_path / "init.pth", "SOLVER.MAX_ITER", 1, "SOLVER.IMS_PER_BATCH", 2,
        "SOLVER.OPTIMIZER", "SGD", "SOLVER.MOMENTUM", 0.0, "SOLVER.BASE_LR", 0.01,
        "SOLVER.CLIP_GRADIENTS.ENABLED", False, "SOLVER.WEIGHT_DECAY", 0.0,
        "SOLVER.WEIGHT_DECAY_NORM", 0.0,
        # The class loss is a weighted mean over the queries of a process (as in Mask2Former);
        # with the no-object weight 1 every query weighs the same, so the mean of the processes'
        # means is the mean over the batch. As many points as pixels: the per-process point
        # sampling is then the only difference left.
        "MODEL.MASK_FORMER.NO_OBJECT_WEIGHT", 1.0, "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", 64 * 64,
    ]  # fmt: skip
    runs = {}
    for n in (1, 2):  # side by side: 1 + 2 processes on 2 cores
        log = tmp_path / f"procs{n}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(
                tiny_command(driver, tmp_path / f"procs{n}", *opts, num_gpus=n),
                cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
            )  # fmt: skip
        runs[n] = (proc, log)
    for n, (proc, log) in runs.items():
        assert proc.wait(timeout=600) == 0, _tail(log)
    assert "World size: 2" in runs[2][1].read_text()

    losses = [
        json.loads((tmp_path / f"procs{n}/step0/metrics.json").read_text().splitlines()[0])
        for n in (1, 2)
    ]
    assert losses[0]["iteration"] == losses[1]["iteration"] == 0
    assert abs(losses[1]["total_loss"] / losses[0]["total_loss"] - 1) <= 0.01, losses

    init = {k: v for k, v in init.items() if v.is_floating_point()}
    d1, d2 = _delta(tmp_path / "procs1", init), _delta(tmp_path / "procs2", init)
    assert d1.norm() > 0
    assert (d2 - d1).norm() / d1.norm() <= 0.12

    # the 2 processes evaluated the validation set together
    rows = json.loads((tmp_path / "procs2/results.json").read_text())
    assert 0.0 <= rows[0]["PQ_all"] <= 100.0 and 0.0 <= rows[0]["mIoU_all"] <= 100.0
