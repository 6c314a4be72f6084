"""Finite-difference error against the step eps, in float32 and float64: the V-shaped curve.

Central differences (E(p + eps e_i) - E(p - eps e_i)) / (2 eps), computed in float32 or float64
for every parameter entry of the slides' network, are compared with the exact gradient
(jax.grad in float64) by the relative error max|a-b| / max(1e-12, max|a|+max|b|) over each leaf,
taking the worst leaf. Two errors compete: truncation, ~ eps^2 E''' / 6, falls with eps, and
round-off, ~ u |E| / eps (u the unit round-off, 1.1e-16 in float64, 6.0e-8 in float32), rises as
eps shrinks. Their sum is V-shaped in log-log axes with its bottom near eps ~ u^(1/3): about 5e-6 in
float64, 4e-3 in float32. Writes fd_eps.png and fd_eps.json to the output folder.

    python experiments/fd_eps.py
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jaxbp  # noqa: E402
from jaxbp.check import TOLERANCES  # noqa: E402
from jaxbp.check import relative_error  # noqa: E402
from jaxbp.check.cli import random_problem  # noqa: E402
from jaxbp.check.finite_differences import central_differences  # noqa: E402

SPEC = jaxbp.ConvNetSpec(
    in_shape=(9, 8, 2), n_filters=3, kernel_size=(3, 2), stride=(2, 1), padding="SAME", n_out=4
)
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24}


def make_fd_grads(x, y, spec):
    """A jitted (params, eps) -> elementwise central-difference gradient, in params' dtype."""

    @jax.jit
    def fd_grads(params, eps):
        leaves, treedef = jax.tree.flatten(params)
        out = []
        for index, leaf in enumerate(leaves):

            def leaf_fn(value, index=index):
                return jaxbp.loss(
                    jax.tree.unflatten(treedef, [*leaves[:index], value, *leaves[index + 1 :]]), x, y, spec
                )

            basis = jnp.eye(leaf.size, dtype=leaf.dtype).reshape(leaf.size, *leaf.shape)
            out.append(central_differences(leaf_fn, leaf, eps.astype(leaf.dtype) * basis).reshape(leaf.shape))
        return jax.tree.unflatten(treedef, out)

    return fd_grads


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4, help="examples in the batch (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of params and data (default 0)")
    parser.add_argument(
        "--n-eps", type=int, default=49, help="eps values, log-spaced in [1e-13, 1e-1] (default 49)"
    )
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"), help="output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    params64, x64, y64 = random_problem(np.random.default_rng(args.seed), SPEC, args.batch, jnp.float64)
    exact = jaxbp.autodiff_grads(params64, x64, y64, SPEC)
    eps_values = np.logspace(-13, -1, args.n_eps)
    errors = {}
    for dtype in ("float64", "float32"):
        params, x, y = jax.tree.map(lambda a, dtype=dtype: a.astype(dtype), (params64, x64, y64))
        fd_grads = make_fd_grads(x, y, SPEC)
        errors[dtype] = []
        for eps in tqdm(eps_values, desc=dtype, disable=args.quiet):
            numeric = fd_grads(params, jnp.asarray(eps, dtype))
            errors[dtype].append(max(relative_error(a, b) for a, b in zip(numeric, exact)))
    best = {dtype: float(eps_values[int(np.argmin(errors[dtype]))]) for dtype in errors}

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for dtype, color in (("float64", "C0"), ("float32", "C1")):
        ax.loglog(
            eps_values, errors[dtype], "o-", ms=3, color=color, label=f"{dtype} (best eps {best[dtype]:.1e})"
        )
        ax.axvline(UNIT_ROUNDOFF[dtype] ** (1 / 3), color=color, ls=":", lw=1)
    eps = TOLERANCES["float64"].eps
    ax.axvline(eps, color="k", ls="--", lw=1, label=f"jaxbp.check eps = {eps:g} (float64 FD)")
    ax.set_xlabel("eps")
    ax.set_ylabel("relative error vs exact gradient (worst leaf)")
    ax.set_title(
        "Central finite differences: truncation ~ eps$^2$, round-off ~ u/eps\n"
        f"{SPEC.in_shape} input, batch {args.batch}; dotted: u$^{{1/3}}$"
    )
    ax.legend()
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "fd_eps.png", dpi=120)
    result = {
        "spec": str(SPEC),
        "batch": args.batch,
        "seed": args.seed,
        "eps": eps_values.tolist(),
        "relative_error": errors,
        "best_eps": best,
        "best_relative_error": {dtype: float(min(errors[dtype])) for dtype in errors},
    }
    (out / "fd_eps.json").write_text(json.dumps(result, indent=1) + "\n")
    for dtype in errors:
        i = int(np.argmin(errors[dtype]))
        at = {e: f"{np.interp(np.log10(e), np.log10(eps_values), errors[dtype]):.2e}" for e in (1e-6, 1e-5)}
        print(f"{dtype}: best eps {best[dtype]:.2e}, relative error {errors[dtype][i]:.2e}; at eps {at}")
    return result


if __name__ == "__main__":
    main()
