"""What a user sees after (and while) training, through the command-line tools:

- a scenario on a dataset of one's own, with ``--quiet``: step headers and progress lines with the
  scenario's ETA on the console, detectron2's dumps in log.txt only;
- ``tools/predict.py`` on a folder of images, with a scenario step's model and with a config and a
  checkpoint: one picture and one raw prediction per image;
- a config error: one line and exit code 2, no traceback;
- the helpers behind them (class ranges, ETA, the methods' comparison plot).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comformer.data.datasets.synthetic import SyntheticSpec, generate
from comformer.data.scenario import Scenario
from comformer.engine.progress import ScenarioProgress, describe_classes
from comformer.engine.results import plot_methods
from test_faults import CONTINUAL_CFG, TINY_OPTS

REPO = Path(__file__).resolve().parents[1]
SPEC = SyntheticSpec(num_train=6, num_val=3, image_size=64, num_thing_classes=3, num_stuff_classes=3)


def _tool(*args, env_extra=None, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, *[str(a) for a in args]]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def scenario_run(tmp_path_factory):
    """The README's "Your own data" run: a COCO-panoptic dataset in a temporary folder, the 4-2
    scenario of configs/custom/mydata-panoptic.yaml on it from the command line, quietly."""
    base = tmp_path_factory.mktemp("own")
    data = Path(generate(str(base / "mydata"), SPEC))
    out = base / "run"
    proc = _tool(
        "tools/train_net.py", "--quiet", "--config-file", REPO / "configs/custom/mydata-panoptic.yaml",
        "DATASETS.CUSTOM.ROOT", data, *TINY_OPTS, "CONT.VIS_IMAGES", 2,
        "SOLVER.MAX_ITER", 4, "CONT.INC_ITERS_PER_CLASS", 2, "OUTPUT_DIR", out,
        env_extra={"COMFORMER_CACHE": str(base / "cache")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return data, out, proc


def test_quiet_scenario_on_own_data_shows_steps_progress_and_results(scenario_run):
    data, out, proc = scenario_run
    console = proc.stdout + proc.stderr
    assert "[4-2 ft] step 0 (1/2): classes 0-3 (4 new, 4 seen), 4 iterations" in console
    assert "[4-2 ft] step 1 (2/2): classes 4 circle_dots, 5 dstripes (2 new, 6 seen)" in console
    assert "scenario ETA" in console and "step 1 done in" in console
    assert "| ft | 1 | 6 |" in console  # the results table
    # detectron2's dumps are in the log file, not on the console
    log = (out / "log.txt").read_text()
    for dump in ("Running with full config", "Environment info"):
        assert dump in log and dump not in console
    assert len(console.splitlines()) < 40, console
    # step pictures: image, ground truth, prediction side by side, upscaled (64 px -> 320 px)
    picture = Image.open(next((out / "step1/vis").iterdir()))
    assert picture.width > 3 * 320 and picture.height > 320


def test_predict_a_folder_with_a_scenario_step(scenario_run, tmp_path):
    data, out, _ = scenario_run
    images = sorted((data / "images/val").iterdir())
    proc = _tool(
        "tools/predict.py", "--scenario", out, "--step", 1, "--input", data / "images/val",
        "--output", tmp_path / "pred", "--gt",
        env_extra={"COMFORMER_CACHE": str(out.parent / "cache")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{len(images)} image(s) predicted by step 1" in proc.stdout
    assert f"{len(images)} with ground truth" in proc.stdout
    written = sorted(os.listdir(tmp_path / "pred"))
    stems = [p.stem for p in images]
    assert written == sorted(
        f"{s}{suffix}" for s in stems for suffix in (".png", "_panoptic.png", "_segments.json")
    )
    for stem in stems:
        segments = json.loads((tmp_path / "pred" / f"{stem}_segments.json").read_text())
        ids = np.asarray(Image.open(tmp_path / "pred" / f"{stem}_panoptic.png"), dtype=np.int64)
        ids = ids[..., 0] + 256 * ids[..., 1] + 65536 * ids[..., 2]
        assert ids.shape == (64, 64)
        # every listed segment has its pixels; the step's model knows the 6 classes it has seen
        for s in segments["segments_info"]:
            assert (ids == s["id"]).sum() == s["area"] > 0
            assert 0 <= s["class_index"] < 6 and s["category_id"] == s["class_index"] + 1
        picture = Image.open(tmp_path / "pred" / f"{stem}.png")
        assert picture.width > 3 * 320  # image, ground truth, prediction


def test_predict_with_a_config_and_a_checkpoint_writes_label_maps(tmp_path):
    import torch

    import comformer  # noqa: F401
    from comformer.engine import Trainer
    from comformer.engine.trainer import load_config

    config = REPO / "configs/synthetic/semantic-segmentation/maskformer2_R18_cpu.yaml"
    opts = [str(o) for o in TINY_OPTS]
    cfg = load_config(str(config), opts)
    torch.manual_seed(0)
    weights = tmp_path / "model.pth"
    torch.save({"model": Trainer.build_model(cfg).state_dict()}, weights)
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.RandomState(0)
    for i, size in enumerate([(64, 64), (48, 80)]):
        Image.fromarray(rng.randint(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"im{i}.jpg")
    proc = _tool(
        "tools/predict.py", "--config-file", config, "--weights", weights,
        "--input", f"{folder}/*.jpg", "--output", tmp_path / "pred", "--opts", *opts,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "pred")) == [
        "im0.png", "im0_label.png", "im1.png", "im1_label.png"
    ]  # fmt: skip
    labels = np.asarray(Image.open(tmp_path / "pred/im1_label.png"))
    assert labels.shape == (48, 80) and labels.max() < 20  # at the image's own size


def test_config_error_ends_with_one_line_and_exit_code_2(tmp_path):
    proc = _tool(
        "tools/train_net.py", "--quiet", "--config-file", CONTINUAL_CFG,
        "CONT.METHOD", "nope", "OUTPUT_DIR", tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, lines
    assert lines[0].startswith("error: CONT.METHOD='nope' is not a registered method; valid: ")
    assert "Traceback" in (tmp_path / "log.txt").read_text()  # the traceback is kept there
    # a predict error too
    proc = _tool("tools/predict.py", "--config-file", CONTINUAL_CFG, "--input", tmp_path / "none",
                 "--output", tmp_path / "p")  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --input")


def test_class_ranges_and_scenario_eta():
    assert describe_classes([10, 11, 12, 13]) == "10-13"
    assert describe_classes([3, 7, 8, 9, 12]) == "3, 7-9, 12"
    assert describe_classes([1, 4], ["a", "b", "c", "d", "e"]) == "1 b, 4 e"
    scenario = Scenario(dataset="d", task="2-1", steps=((0, 1), (2,), (3,)), num_classes=4)
    progress = ScenarioProgress(scenario, {0: 100, 1: 10, 2: 10}, "t")
    assert progress.eta(0, 100) is None  # no speed measured yet
    progress.sec_per_iter = 0.5
    assert progress.eta(0, 40) == (40 + 10 + 10) * 0.5
    progress.finish_step(0, train_seconds=50.0, eval_seconds=4.0, summary="")
    assert progress.eta(1, 10) == (10 + 10) * 0.5 + 2 * 4.0  # and one evaluation per step left


def test_plot_methods_draws_every_method_on_one_figure(tmp_path):
    def rows(offset):
        return [
            {"step": 0, "PQ_all": 8.0 + offset, "PQ_old": 8.0 + offset, "mIoU_all": 20.0,
             "mIoU_old": 20.0},
            {"step": 1, "PQ_all": 2.0 + offset, "PQ_old": 3.0, "PQ_new": 1.0, "mIoU_all": 7.0,
             "mIoU_old": 14.0, "mIoU_new": float("nan")},
        ]  # fmt: skip

    path = tmp_path / "methods.png"
    plot_methods(str(path), {"ft": rows(0), "joint": rows(1), "comformer": rows(2)}, "10-10")
    image = Image.open(path)
    assert image.width >= 1000 and image.height >= 600  # 2 metrics x 3 class groups
