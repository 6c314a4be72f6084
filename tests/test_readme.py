"""The README's formula table points at the lines that compute each term (kept from rotting)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_formula_table_line_numbers_point_at_their_terms():
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| [^|]+ \| `(\w+)`[^|]* \| `jaxbp/backward.py:(\d+)(?:-\d+)?` \|", readme, re.M)
    assert len(rows) >= 10, rows
    source = (ROOT / "jaxbp" / "backward.py").read_text().splitlines()
    for name, line in rows:
        assert name in source[int(line) - 1], f"README says {name} is computed at backward.py:{line}"
