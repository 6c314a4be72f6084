"""The comparison core: named (candidate, reference) pairs -> rows -> a report.

Nothing here knows the network: `compare_arrays` compares two arrays, `compare_named` a sequence of
named pairs (chain-rule terms, in chain order), `compare_trees` two pytrees of gradients leaf by
leaf. `GradCheckReport` collects the rows in order, so that its first failing row is where a
derivation first goes wrong.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxbp.check import metrics
from jaxbp.check.tolerances import Tolerance

# A hint that a failing candidate is the reference rescaled, or with its sign flipped, needs the
# two to be parallel far beyond what an O(1) derivation error leaves by chance.
PARALLEL_COSINE = 1 - 1e-6


@dataclasses.dataclass(frozen=True)
class Row:
    """One comparison: a candidate array against a reference array.

    Attributes:
      stage: what is compared, e.g. "term" (a chain-rule factor) or "grad" (a parameter gradient).
      name: the term or leaf name (e.g. "delta1", "W").
      candidate: the side under test (e.g. "manual").
      reference: the side taken as correct (e.g. "autodiff", "finite differences").
      shape: the candidate's shape (None if it is not an array).
      dtype: the candidate's dtype name.
      max_abs, rel, cosine, norm_ratio: see `jaxbp.check.metrics`; None where not computable.
      worst_index: index of the largest |candidate - reference|.
      tol: the relative-error threshold.
      ok: rel <= tol, shapes and dtypes as expected, everything finite.
      method: how the reference was computed (finite differences: elementwise or directional, eps).
      note: why a row failed, or a hint (scaled, sign flipped).
    """

    stage: str
    name: str
    candidate: str
    reference: str
    shape: tuple[int, ...] | None
    dtype: str
    max_abs: float | None
    rel: float | None
    cosine: float | None
    norm_ratio: float | None
    worst_index: tuple[int, ...] | None
    tol: float
    ok: bool
    method: str = ""
    note: str = ""

    def to_dict(self) -> dict:
        """JSON-ready: non-finite floats become strings ("nan", "inf")."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, float) and not math.isfinite(value):
                out[key] = str(value)
            elif isinstance(value, tuple):
                out[key] = list(value)
        return out


def _problem(candidate, reference, expected_dtype, candidate_name, reference_name) -> str:
    """Why the pair cannot be compared as it stands ('' if it can)."""
    if reference is None:
        return f"no reference value for this {candidate_name} entry"
    if candidate is None:
        return f"{candidate_name} gave no value"
    if not hasattr(candidate, "shape") or not hasattr(candidate, "dtype"):
        return f"{candidate_name} gave a {type(candidate).__name__}, expected an array"
    if tuple(candidate.shape) != tuple(reference.shape):
        hint = " (the transpose?)" if tuple(candidate.shape) == tuple(reference.shape)[::-1] else ""
        return f"shape {tuple(candidate.shape)}, expected {tuple(reference.shape)}{hint}"
    for side, value in ((candidate_name, candidate), (reference_name, reference)):
        value = np.asarray(value)
        if not np.issubdtype(value.dtype, np.floating):
            return f"{side} has dtype {value.dtype}, expected floating point"
        n_nan, n_inf = int(np.isnan(value).sum()), int(np.isinf(value).sum())
        if n_nan or n_inf:
            return f"{side} has {n_nan} NaN and {n_inf} inf of {value.size} entries"
    if expected_dtype is not None and np.dtype(candidate.dtype) != np.dtype(expected_dtype):
        return f"dtype {np.dtype(candidate.dtype).name}, expected {np.dtype(expected_dtype).name}"
    return ""


def compare_arrays(
    name: str,
    candidate,
    reference,
    *,
    tol: float,
    floor: float = metrics.REL_FLOOR,
    stage: str = "grad",
    candidate_name: str = "manual",
    reference_name: str = "autodiff",
    expected_dtype=None,
    method: str = "",
    known_scales: Mapping[float, str] | None = None,
) -> Row:
    """Compare one candidate array with its reference; never raises on bad values, says so instead.

    Args:
      name: the term or leaf name.
      candidate, reference: arrays of one shape (reference None: "no reference" row).
      tol: the relative-error threshold.
      floor: the relative error's denominator floor.
      expected_dtype: the dtype the candidate must have (None: not checked).
      known_scales: {scale: explanation}: when a failing candidate is parallel to the reference
        and its norm ratio is one of these scales, the explanation goes in the note.

    Returns:
      A `Row`.
    """
    shape = tuple(candidate.shape) if hasattr(candidate, "shape") else None
    dtype = np.dtype(candidate.dtype).name if hasattr(candidate, "dtype") else type(candidate).__name__
    common = dict(stage=stage, name=name, candidate=candidate_name, reference=reference_name)
    common.update(shape=shape, dtype=dtype, tol=tol, method=method)
    problem = _problem(candidate, reference, expected_dtype, candidate_name, reference_name)
    if problem and not problem.startswith("dtype "):
        return Row(
            **common,
            max_abs=None,
            rel=None,
            cosine=None,
            norm_ratio=None,
            worst_index=None,
            ok=False,
            note=problem,
        )
    a, b = np.asarray(candidate, np.float64), np.asarray(reference, np.float64)
    max_abs = float(np.max(np.abs(a - b))) if a.size else 0.0
    rel = metrics.relative_error(a, b, floor=floor)
    cosine, ratio = metrics.cosine_similarity(a, b), metrics.norm_ratio(a, b)
    ok = not problem and rel <= tol
    note = problem
    if not ok and not problem:
        if cosine >= PARALLEL_COSINE and abs(ratio - 1) > 1e-4:
            note = f"parallel to the {reference_name}, scaled by {ratio:.6g}"
            for scale, why in (known_scales or {}).items():
                if math.isclose(ratio, scale, rel_tol=1e-6):
                    note += f" = {why}"
        elif cosine <= -PARALLEL_COSINE:
            note = f"the {reference_name} with its sign flipped"
    return Row(
        **common,
        max_abs=max_abs,
        rel=rel,
        cosine=cosine,
        norm_ratio=ratio,
        worst_index=metrics.worst_index(a, b),
        ok=ok,
        note=note,
    )


def compare_named(pairs: Iterable[tuple[str, Any, Any]], *, tol: float, **kwargs) -> list[Row]:
    """`compare_arrays` over (name, candidate, reference) triples, in the order given.

    Pass chain-rule terms in the order the backward computes them: the first failing row is then
    the first term that disagrees.
    """
    return [
        compare_arrays(name, candidate, reference, tol=tol, **kwargs) for name, candidate, reference in pairs
    ]


def leaf_names(tree) -> list[str]:
    """Readable names of a pytree's leaves: 'W' for a NamedTuple field, 'layers[0].W' deeper."""
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [jax.tree_util.keystr(path).lstrip(".") for path, _ in paths]


def compare_trees(candidate, reference, *, tol: float, candidate_name: str = "manual", **kwargs) -> list[Row]:
    """Compare two gradient pytrees leaf by leaf (rows named by tree path).

    Raises:
      TypeError: if the two trees have different structures (different leaves, or a leaf missing).
    """
    c_leaves, c_def = jax.tree.flatten(candidate)
    r_leaves, r_def = jax.tree.flatten(reference)
    if c_def != r_def:
        raise TypeError(
            f"{candidate_name} gradients must have the reference's structure {r_def}, got {c_def}"
        )
    pairs = zip(leaf_names(reference), c_leaves, r_leaves)
    return compare_named(pairs, tol=tol, candidate_name=candidate_name, **kwargs)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2e}" if value != 0 else "0"
    return str(value)


@dataclasses.dataclass(frozen=True)
class GradCheckReport:
    """The rows of a gradient check, in order, and how they were judged.

    Attributes:
      rows: every comparison; chain-rule terms in backward order, then parameter gradients.
      tolerance: the `Tolerance` profile used.
      context: what was checked (spec, batch size, precision, finite-difference settings...).
    """

    rows: tuple[Row, ...]
    tolerance: Tolerance
    context: dict = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every row passes."""
        return all(row.ok for row in self.rows)

    @property
    def failures(self) -> tuple[Row, ...]:
        """The failing rows, in order."""
        return tuple(row for row in self.rows if not row.ok)

    @property
    def first_failure(self) -> Row | None:
        """Where the derivation first goes wrong: the first failing row (None if all pass)."""
        return next(iter(self.failures), None)

    def to_dict(self) -> dict:
        """JSON-ready dict: ok, first_failure, tolerance, context, rows."""
        first = self.first_failure
        return {
            "ok": self.ok,
            "first_failure": None if first is None else f"{first.stage} {first.name}",
            "tolerance": self.tolerance._asdict(),
            "context": json.loads(json.dumps(self.context, default=str)),
            "rows": [row.to_dict() for row in self.rows],
        }

    def __str__(self) -> str:
        tol = self.tolerance
        lines = [
            f"gradient check: {'PASS' if self.ok else 'FAIL'}"
            + (
                ""
                if self.ok
                else f" -- first disagreement: {self.first_failure.stage} {self.first_failure.name}"
                f" ({self.first_failure.candidate} vs {self.first_failure.reference})"
            ),
            f"tolerance profile {tol.dtype}: rel <= {tol.autodiff:g} vs autodiff, "
            f"<= {tol.finite_differences:g} vs finite differences; rel = max|a-b| / max({tol.floor:g}, "
            "max|a|+max|b|), a = candidate, b = reference",
        ]
        lines += [f"{key}: {value}" for key, value in self.context.items()]
        header = (
            "stage",
            "name",
            "candidate",
            "reference",
            "shape",
            "max abs",
            "rel err",
            "cosine",
            "norm ratio",
            "tol",
            "ok",
            "note",
        )
        table = [header]
        for r in self.rows:
            note = "; ".join(s for s in (r.method, r.note) if s)
            if r.worst_index and not r.ok and r.max_abs is not None:
                note = "; ".join(s for s in (note, f"worst at {r.worst_index}") if s)
            table.append(
                (
                    r.stage,
                    r.name,
                    r.candidate,
                    r.reference,
                    _fmt(r.shape),
                    _fmt(r.max_abs),
                    _fmt(r.rel),
                    "-" if r.cosine is None else f"{r.cosine:.6f}",
                    "-" if r.norm_ratio is None else f"{r.norm_ratio:.6f}",
                    f"{r.tol:g}",
                    "ok" if r.ok else "FAIL",
                    note,
                )
            )
        widths = [max(len(str(line[i])) for line in table) for i in range(len(header) - 1)]
        for line in table:
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(line, widths)) + "  " + line[-1])
        return "\n".join(line.rstrip() for line in lines)
