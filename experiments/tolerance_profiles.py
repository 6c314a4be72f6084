"""Measure the relative errors behind jaxbp.check's tolerance profiles (jaxbp/check/tolerances.py).

Runs `jaxbp.compare_grads` over seeded random specs (the sweep of ``python -m jaxbp.check``) in
float64 and float32 and records, for every kind of comparison (chain terms vs autodiff, gradients
vs autodiff, gradients vs float64 central finite differences), the largest and the median
relative error max|a-b| / max(floor, max|a|+max|b|). The profile thresholds are the largest
values times a margin; results go to experiments/results/tolerance_profiles.json.

    python experiments/tolerance_profiles.py --n-specs 60
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform

import jax
import numpy as np
from tqdm import tqdm

jax.config.update("jax_enable_x64", True)

import jaxbp  # noqa: E402
from jaxbp.check import TOLERANCES  # noqa: E402
from jaxbp.check.cli import random_problem  # noqa: E402
from jaxbp.check.cli import random_spec  # noqa: E402


def measure(n_specs: int, seed: int, dtype: str, quiet: bool, max_elementwise: int) -> dict:
    """{comparison: {max, median, max_abs, worst_spec_index, n}} over n_specs random specs in `dtype`."""
    rng = np.random.default_rng(seed)
    errors: dict[str, list[tuple[float, float, int]]] = {}
    for index in tqdm(range(n_specs), desc=dtype, disable=quiet):
        spec = random_spec(rng)
        batch = int(rng.integers(0, 6)) or None
        params, x, y = random_problem(rng, spec, batch, dtype)
        report = jaxbp.compare_grads(params, x, y, spec, seed=seed + index, max_elementwise=max_elementwise)
        for row in report.rows:
            method = ""
            if row.reference != "autodiff":
                method = " directional" if "direction" in row.method else " elementwise"
            key = f"{row.stage}: {row.candidate} vs {row.reference}{method}"
            errors.setdefault(key, []).append((row.rel, row.max_abs, index))
    summary = {}
    for key, values in sorted(errors.items()):
        rel, max_abs, index = zip(*values)
        worst = int(np.argmax(rel))
        summary[key] = {
            "max": float(rel[worst]),
            "median": float(np.median(rel)),
            "max_abs": float(np.max(max_abs)),
            "worst_spec_index": index[worst],
            "n": len(rel),
        }
    return summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-specs", type=int, default=60, help="random specs per dtype (default 60)")
    parser.add_argument("--seed", type=int, default=1, help="seed (default 1; the CLI's default is 0)")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"), help="output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--max-elementwise",
        type=int,
        default=256,
        help="finite differences elementwise up to this leaf size, else random directions (default 256, as "
        "compare_grads; 0: the directional test everywhere, written to tolerance_profiles_directional.json)",
    )
    args = parser.parse_args(argv)
    result = {
        "n_specs": args.n_specs,
        "seed": args.seed,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "machine": platform.machine(),
        "jax": jax.__version__,
        "max_elementwise": args.max_elementwise,
        "profiles": {dtype: tol._asdict() for dtype, tol in TOLERANCES.items()},
        "float64": measure(args.n_specs, args.seed, "float64", args.quiet, args.max_elementwise),
        "float32": measure(args.n_specs, args.seed, "float32", args.quiet, args.max_elementwise),
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "tolerance_profiles.json" if args.max_elementwise else "tolerance_profiles_directional.json"
    (out / name).write_text(json.dumps(result, indent=1) + "\n")
    for dtype in ("float64", "float32"):
        for key, v in result[dtype].items():
            print(
                f"{dtype}  {key:55s} max {v['max']:.2e}  median {v['median']:.2e}  "
                f"max abs {v['max_abs']:.2e}  "
                f"(n={v['n']}, worst: spec {v['worst_spec_index']})"
            )
    return result


if __name__ == "__main__":
    main()
