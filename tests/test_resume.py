"""
Kill and resume: a training step SIGKILLed after a checkpoint and resumed with --resume ends with
the same weights and metrics as an uninterrupted run (deterministic mode, tolerance 0: bit for bit,
on CPU); the training stream a resumed run reads; files written atomically survive a SIGKILL.

The runs go through tools/train_net.py's ``main`` and detectron2's ``launch``, in a subprocess,
via a small driver that registers a tiny synthetic dataset first (``write_driver``).
"""

import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from detectron2.data.build import build_batch_data_loader

from comformer.data.datasets.synthetic import generate
from comformer.data.stream import TrainingStream
from test_faults import CONTINUAL_CFG, SPEC, TINY_OPTS

REPO = Path(__file__).resolve().parents[1]

_DRIVER = """
# Runs tools/train_net.py's main through detectron2's launch, in each process after registering
# the tiny synthetic dataset of $COMFORMER_TEST_DATA as tiny_train / tiny_val (the processes that
# launch spawns import this file and call main).
import os
import sys

sys.path.insert(0, {tools!r})


def main(args):
    from comformer.data.datasets.common import panoptic_metadata, register_panoptic
    from comformer.data.datasets.synthetic import SyntheticSpec, synthetic_categories
    from train_net import main as train_net_main

    root = os.environ["COMFORMER_TEST_DATA"]
    for split in ("train", "val"):
        register_panoptic(
            "tiny_" + split,
            metadata=panoptic_metadata(synthetic_categories(SyntheticSpec())),
            image_root=f"{{root}}/images/{{split}}",
            panoptic_root=f"{{root}}/panoptic_{{split}}",
            panoptic_json=f"{{root}}/panoptic_{{split}}.json",
            sem_seg_root=f"{{root}}/semantic_{{split}}",
            prepare_hint="",
        )
    return train_net_main(args)


if __name__ == "__main__":
    from detectron2.engine import default_argument_parser, launch

    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, dist_url=args.dist_url, args=(args,))
"""


def write_driver(folder: Path) -> Path:
    """The driver script and a tiny dataset, in ``folder``."""
    generate(str(folder / "data"), SPEC)
    path = folder / "driver.py"
    path.write_text(_DRIVER.format(tools=str(REPO / "tools")))
    return path


def driver_env(folder: Path) -> dict:
    # One torch thread per process: faster on shared cores, and the same float reduction order in
    # every run.
    return {**os.environ, "COMFORMER_TEST_DATA": str(folder / "data"), "OMP_NUM_THREADS": "1"}


def tiny_command(driver: Path, out: Path, *opts, num_gpus: int = 1, resume: bool = False):
    """tools/train_net.py arguments: step 0 of the synthetic 10-10 scenario, tiny model, SEED 7,
    deterministic mode."""
    return [
        sys.executable, str(driver), "--config-file", str(CONTINUAL_CFG),
        "--num-gpus", str(num_gpus), *(["--resume"] if resume else []),
        "OUTPUT_DIR", str(out), "CONT.STEP", "0",
        "DATASETS.TRAIN", "('tiny_train',)", "DATASETS.TEST", "('tiny_val',)",
        *[str(x) for x in TINY_OPTS], "DETERMINISTIC", "True", "SEED", "7",
        *[str(x) for x in opts],
    ]  # fmt: skip


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text()[-n:] if path.exists() else ""


# ------------------------------------------------------------------------- training stream
def _draws(record):
    # what an augmentation would draw, from each global generator
    return record["i"], float(np.random.rand()), int(torch.randint(1000, ())), random.random()


def _take(stream, n):
    return list(itertools.islice(iter(stream), n))


def test_training_stream_is_a_function_of_the_iteration():
    records = [{"i": i} for i in range(5)]
    full = _take(TrainingStream(records, _draws, batch_size=2, seed=5), 16)
    epochs = [sorted(x[0] for x in full[e * 5 : e * 5 + 5]) for e in range(3)]
    assert epochs == [list(range(5))] * 3  # each epoch visits every record once
    assert [x[0] for x in full[:5]] != [x[0] for x in full[5:10]]  # reshuffled per epoch
    assert len({x[1] for x in full}) == 16  # one augmentation draw per position, not per record

    resumed = TrainingStream(records, _draws, batch_size=2, seed=5)
    resumed.set_start_iter(3)
    assert _take(resumed, 10) == full[6:]  # iteration 3 starts at position 6, same draws

    # Two processes with batch 1 read the positions one process with batch 2 reads.
    ranks = [
        _take(TrainingStream(records, _draws, batch_size=1, seed=5, rank=r, world_size=2), 8)
        for r in (0, 1)
    ]
    assert [x for pair in zip(*ranks) for x in pair] == full

    # Mapping leaves the caller's generators alone.
    before = np.random.get_state()[1].copy(), torch.get_rng_state()
    _take(TrainingStream(records, _draws, batch_size=2, seed=6), 4)
    assert (np.random.get_state()[1] == before[0]).all()
    assert torch.equal(torch.get_rng_state(), before[1])
    assert _take(TrainingStream(records, _draws, batch_size=2, seed=6), 16) != full

    # DataLoader workers split the stream in batches and return them in stream order.
    stream = TrainingStream(records, _draws, batch_size=2, seed=5)
    loader = build_batch_data_loader(stream, None, 2, num_workers=2, seed=5)
    assert [x for batch in itertools.islice(iter(loader), 8) for x in batch] == full


def test_train_loader_prefetches_whole_batches_per_worker():
    from detectron2.config import get_cfg

    from comformer.config import add_comformer_config
    from comformer.data.stream import build_train_loader

    cfg = get_cfg()
    add_comformer_config(cfg)
    cfg.SOLVER.IMS_PER_BATCH, cfg.DATALOADER.NUM_WORKERS, cfg.SEED = 4, 1, 0
    records = [{"i": i, "width": 8, "height": 8} for i in range(5)]

    def prefetch(**changes):
        c = cfg.clone()
        c.merge_from_list([x for kv in changes.items() for x in kv])
        loader = build_train_loader(c, records, _draws)
        while not isinstance(loader, torch.utils.data.DataLoader):
            loader = loader.dataset  # under detectron2's aspect-ratio grouping wrapper
        return loader.prefetch_factor

    # grouping: the loader yields samples, so 2 batches of 4 are 8 samples
    assert prefetch(**{"DATALOADER.ASPECT_RATIO_GROUPING": True}) == 8
    assert prefetch(**{"DATALOADER.ASPECT_RATIO_GROUPING": False}) == 2  # yields batches
    assert prefetch(**{"DATALOADER.PREFETCH_BATCHES": 3, "DETERMINISTIC": True}) == 3
    assert prefetch(**{"DATALOADER.NUM_WORKERS": 0}) is None  # no workers, nothing prefetched
    with pytest.raises(ValueError, match="PREFETCH_BATCHES=0"):
        prefetch(**{"DATALOADER.PREFETCH_BATCHES": 0})


def test_train_loader_sets_the_sharing_strategy_and_rejects_unknown_ones():
    from detectron2.config import get_cfg

    from comformer.config import add_comformer_config
    from comformer.data.stream import build_train_loader

    cfg = get_cfg()
    add_comformer_config(cfg)
    cfg.SOLVER.IMS_PER_BATCH, cfg.DATALOADER.NUM_WORKERS, cfg.SEED = 2, 1, 0
    records = [{"i": i, "width": 8, "height": 8} for i in range(3)]
    before = torch.multiprocessing.get_sharing_strategy()
    try:
        cfg.DATALOADER.SHARING_STRATEGY = "file_system"
        build_train_loader(cfg, records, _draws)
        assert torch.multiprocessing.get_sharing_strategy() == "file_system"
        cfg.DATALOADER.SHARING_STRATEGY = "carrier_pigeon"
        with pytest.raises(ValueError, match="carrier_pigeon.*valid"):
            build_train_loader(cfg, records, _draws)
    finally:
        torch.multiprocessing.set_sharing_strategy(before)


# ------------------------------------------------------------------------- atomic files
def test_atomic_write_leaves_the_old_file_when_killed_mid_write(tmp_path):
    target, started = tmp_path / "results.json", tmp_path / "started"
    target.write_text('{"old": 1}\n')
    script = (
        "import time\n"
        "from comformer.utils.io import atomic_write\n"
        "def slow(f):\n"
        "    f.write(b'{\"new\": ')\n"
        "    f.flush()\n"
        f"    open({str(started)!r}, 'w').close()\n"
        "    time.sleep(120)\n"
        f"atomic_write({str(target)!r}, slow)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env=driver_env(tmp_path))
    try:
        deadline = time.time() + 120
        while not started.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert started.exists(), "the writer never started"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert json.loads(target.read_text()) == {"old": 1}
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".results.json.")]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")  # the partial copy, not the file


# ------------------------------------------------------------------------- kill and resume
def _state(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_sigkilled_step_resumes_to_the_uninterrupted_result(tmp_path):
    driver = write_driver(tmp_path)
    env = driver_env(tmp_path)
    opts = ["SOLVER.MAX_ITER", 16, "SOLVER.CHECKPOINT_PERIOD", 4]
    full_out, killed_out = tmp_path / "full", tmp_path / "killed"
    logs = {name: tmp_path / f"{name}.log" for name in ("full", "killed", "resumed")}

    def start(out, log, resume=False):
        with open(log, "w") as f:
            return subprocess.Popen(
                tiny_command(driver, out, *opts, resume=resume),
                cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
            )  # fmt: skip

    full = start(full_out, logs["full"])  # runs alongside, on the other core
    killed = start(killed_out, logs["killed"])
    try:
        # SIGKILL as soon as the checkpoint after iteration 8 of 16 is written and tagged.
        tag = killed_out / "step0/last_checkpoint"
        deadline = time.time() + 300
        while killed.poll() is None and time.time() < deadline:
            if tag.exists() and tag.read_text() != "model_0000003.pth":
                killed.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        killed.wait(timeout=60)
    finally:
        if killed.poll() is None:
            killed.kill()
    assert killed.returncode == -signal.SIGKILL, _tail(logs["killed"])
    assert not (killed_out / "step0/model_final.pth").exists()
    for checkpoint in killed_out.glob("step0/model_*.pth"):  # complete, whenever the kill came
        assert _state(checkpoint)

    resumed = start(killed_out, logs["resumed"], resume=True)
    assert resumed.wait(timeout=600) == 0, _tail(logs["resumed"])
    assert full.wait(timeout=600) == 0, _tail(logs["full"])
    log = logs["resumed"].read_text()
    start_iter = int(re.search(r"Starting training from iteration (\d+)", log).group(1))
    assert start_iter in (8, 12), start_iter  # resumed after a checkpoint, half-way or later

    final_full = _state(full_out / "step0/model_final.pth")
    final_resumed = _state(killed_out / "step0/model_final.pth")
    assert final_full.keys() == final_resumed.keys()
    first = _state(full_out / "step0/model_0000003.pth")
    trained = [k for k in final_full if not torch.equal(final_full[k], first[k])]
    assert len(trained) > 50  # the comparison is about weights that the last iterations changed
    different = [k for k in final_full if not torch.equal(final_full[k], final_resumed[k])]
    assert different == []  # tolerance 0: bit for bit
    rows_full = json.loads((full_out / "results.json").read_text())
    rows_resumed = json.loads((killed_out / "results.json").read_text())
    assert rows_full == rows_resumed and 0.0 <= rows_full[0]["PQ_all"] <= 100.0


def test_a_step_starts_from_the_same_model_in_a_new_process(tmp_path):
    """Step 1 run right after step 0 in one process, and in a new process that finds step 0
    finished (a resumed scenario), starts from the same fresh weights and ends bit for bit equal:
    its new class rows are drawn from (SEED, step), not from what the process drew before."""
    driver = write_driver(tmp_path)
    env = driver_env(tmp_path)
    opts = ["SOLVER.MAX_ITER", 3, "CONT.INC_ITERS_PER_CLASS", 0, "CONT.INC_MAX_ITER", 2,
            "CONT.METHOD", "ft", "CONT.TASK", "10-10"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    runs = [
        (one, ["CONT.STEP", -1], False),  # both steps in one process
        (two, ["CONT.STEP", 0], False),  # step 0, then step 1 in another process
        (two, ["CONT.STEP", -1], True),
    ]
    for i, (out, step_opts, resume) in enumerate(runs):
        log = tmp_path / f"run{i}.log"
        with open(log, "w") as f:
            rc = subprocess.run(
                tiny_command(driver, out, *opts, *step_opts, resume=resume),
                cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=600,
            ).returncode  # fmt: skip
        assert rc == 0, _tail(log)
    a, b = _state(one / "step1/model_final.pth"), _state(two / "step1/model_final.pth")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
