"""engine/compare.py schedules runs so each adopts the base of its signature: with a stand-in for
tools/train_net.py that records its arguments, the owner trains, the others get its step-0
checkpoint, whatever the order of the runs."""

import json
import sys
from pathlib import Path

import pytest

from comformer.engine.compare import run_with_own_bases

REPO = Path(__file__).resolve().parents[1]
CFG = "configs/synthetic_shapes/panoptic-segmentation/continual/10-10{}.yaml"

FAKE_TRAIN_NET = """
import json, os, sys
args = sys.argv[1:]
out = args[args.index("OUTPUT_DIR") + 1]
os.makedirs(os.path.join(out, "step0"), exist_ok=True)
base = args[args.index("CONT.BASE_WEIGHTS") + 1] if "CONT.BASE_WEIGHTS" in args else None
if base is not None and not os.path.isfile(os.path.join(os.path.dirname(base), "done.json")):
    sys.exit(3)  # adopted a base that is not finished
json.dump({"base": base}, open(os.path.join(out, "step0", "done.json"), "w"))
json.dump([{"step": 0}], open(os.path.join(out, "results.json"), "w"))
"""


@pytest.mark.parametrize("order", [["ft", "joint", "comformer"], ["comformer", "joint", "ft"]])
def test_runs_adopt_the_base_of_their_signature(tmp_path, order):
    fake = tmp_path / "train_net.py"
    fake.write_text(FAKE_TRAIN_NET)
    runs = [
        (m, str(REPO / CFG.format("-comformer" if m == "comformer" else "")),
         ["CONT.METHOD", m, "OUTPUT_DIR", str(tmp_path / m)])
        for m in order
    ]  # fmt: skip
    finished = []
    owners = run_with_own_bases(
        runs, train_net=str(fake), jobs=3, extra_args=(), on_done=lambda k, out: finished.append(k)
    )
    assert owners == {"ft": "ft", "joint": "ft", "comformer": "comformer"}
    assert sorted(finished) == ["comformer", "ft", "joint"]
    recorded = {m: json.loads((tmp_path / m / "step0/done.json").read_text())["base"] for m in order}
    assert recorded["ft"] is None and recorded["comformer"] is None
    assert recorded["joint"] == str(tmp_path / "ft" / "step0" / "model_final.pth")


def test_a_failed_run_is_reported_with_its_log(tmp_path):
    fake = tmp_path / "train_net.py"
    fake.write_text("import sys; sys.exit(5)")
    runs = [("ft", str(REPO / CFG.format("")), ["OUTPUT_DIR", str(tmp_path / "ft")])]
    with pytest.raises(RuntimeError, match=r"ft \(exit 5; see .*ft.log\)"):
        run_with_own_bases(runs, train_net=str(fake), extra_args=())
