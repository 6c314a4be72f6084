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


def test_formula_table_op_and_update_line_numbers_point_at_their_defs():
    readme = (ROOT / "README.md").read_text()
    table = [row for row in readme.splitlines() if row.startswith("| ") and "`jaxbp/" in row]
    ops = (ROOT / "jaxbp" / "ops.py").read_text().splitlines()
    # The last column names ops of jaxbp/ops.py with their line: "`conv2d` (line 29)", "`sigmoid` (197)".
    op_refs = [m for row in table for m in re.findall(r"`(\w+)` \((?:line )?(\d+)\)", row.split(" | ")[-1])]
    assert len(op_refs) >= 8, op_refs
    for name, line in op_refs:
        assert ops[int(line) - 1].startswith(f"def {name}("), f"README says {name} is at ops.py:{line}"
    train = (ROOT / "jaxbp" / "train.py").read_text().splitlines()
    (update,) = [row for row in table if "jaxbp/train.py:" in row]
    refs = re.findall(r"`(?:jaxbp/train.py)?:(\d+)` \(`(\w+)`\)", update)
    assert len(refs) == 2, refs
    for line, name in refs:
        assert train[int(line) - 1].startswith(f"def {name}("), f"README says {name} is at train.py:{line}"
