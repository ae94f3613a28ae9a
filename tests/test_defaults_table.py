"""The README's per-setting defaults table says what the code does."""
import re
from pathlib import Path

from comformer.continual.defaults import FALLBACKS, SETTING_DEFAULTS

README = Path(__file__).resolve().parents[1] / "README.md"


def _table_rows():
    text = README.read_text()
    section = text[text.index("### Per-setting defaults") :]
    section = section[: section.index("\n\n", section.index("| key |"))]
    rows = []
    for line in section.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.append(cells)
    return rows


def test_readme_table_equals_the_code():
    rows = _table_rows()
    specific = [r for r in rows if r[1] != "any other"]
    fallback = [r for r in rows if r[1] == "any other"]
    expected = [
        [f"`{d.key}`", d.dataset, d.kind, d.task, f"{d.value}", d.source] for d in SETTING_DEFAULTS
    ]
    assert specific == expected
    assert {re.sub("`", "", r[0]): (float(r[4]), r[5]) for r in fallback} == FALLBACKS
