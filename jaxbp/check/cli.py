"""``python -m jaxbp.check``: `compare_grads` over seeded random specs, a table, and an exit code.

Each spec is drawn from the seed: kernel 1-4 x 1-4, stride 1-3, dilation 1-2, padding VALID, SAME
or explicit asymmetric (0-2 per side), input up to --max-hw per side (non-square), C 1-3 channels,
K 1-4 filters, n_out 1-3 outputs, and a batch of 1-5 examples or a single unbatched example.
Params are LeCun-scaled normal with a non-zero bias, x standard normal, y uniform in [0, 1].

Exit status: 0 when every check passes, 1 when any fails (its full report is printed), 2 for
bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxbp.check.gradcheck import compare_grads
from jaxbp.check.gradcheck import describe_spec
from jaxbp.params import Params
from jaxbp.spec import ConvNetSpec
from jaxbp.spec import explicit_padding

PRECISIONS = {"default": None, "high": jax.lax.Precision.HIGH, "highest": jax.lax.Precision.HIGHEST}


def random_spec(rng: np.random.Generator, *, max_hw: int = 10, precision=None) -> ConvNetSpec:
    """A valid random `ConvNetSpec` (see the module docstring for the ranges)."""
    kernel = tuple(int(k) for k in rng.integers(1, 5, 2))
    dilation = tuple(int(d) for d in rng.integers(1, 3, 2))
    stride = tuple(int(s) for s in rng.integers(1, 4, 2))
    choice = rng.integers(3)
    padding = (
        ("VALID", "SAME")[choice]
        if choice < 2
        else tuple(tuple(int(p) for p in rng.integers(0, 3, 2)) for _ in range(2))
    )
    effective = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
    # Draw sizes that may need padding to fit the dilated kernel; grow them where they do not.
    hw = [int(rng.integers(max(1, e - 4), max(max_hw, e) + 1)) for e in effective]
    pads = explicit_padding(padding, tuple(hw), kernel, stride, dilation)
    hw = [max(n, e - lo - hi) for n, e, (lo, hi) in zip(hw, effective, pads)]
    return ConvNetSpec(
        in_shape=(hw[0], hw[1], int(rng.integers(1, 4))),
        n_filters=int(rng.integers(1, 5)),
        kernel_size=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        n_out=int(rng.integers(1, 4)),
        precision=precision,
    )


def random_problem(rng: np.random.Generator, spec: ConvNetSpec, batch: int | None, dtype):
    """(params, x, y): LeCun-scaled normal params with a non-zero bias, x ~ N(0, 1), y ~ U[0, 1]."""
    kh, kw, c, _ = spec.filter_shape
    params = Params(
        f=rng.normal(size=spec.filter_shape) / np.sqrt(kh * kw * c),
        W=rng.normal(size=(spec.n_hidden, spec.n_out)) / np.sqrt(spec.n_hidden),
        b=rng.normal(size=(spec.n_out,)),
    )
    lead = () if batch is None else (batch,)
    x = rng.normal(size=(*lead, *spec.in_shape))
    y = rng.uniform(size=(*lead, spec.n_out))
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), (params, x, y))


def _worst(report, stage: str, reference: str) -> float | None:
    rels = [r.rel for r in report.rows if r.stage == stage and r.reference == reference]
    if any(r is None for r in rels):
        return float("nan")
    return max(rels, default=None)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jaxbp.check",
        description="Check the hand-written gradients (and every chain-rule term) against autodiff and "
        "float64 central finite differences, over seeded random specs.",
        epilog="Exit status: 0 all pass, 1 any failure, 2 bad arguments.",
    )
    parser.add_argument("-n", "--n-specs", type=int, default=10, help="number of random specs (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the specs and data (default 0)")
    parser.add_argument(
        "--dtype",
        choices=("float64", "float32"),
        default="float64",
        help="dtype of params, x, y and of the checked gradients (default float64)",
    )
    parser.add_argument(
        "--precision",
        choices=tuple(PRECISIONS),
        default="default",
        help="lax precision of every conv and matmul; 'highest' gives full float32 on GPU/TPU",
    )
    parser.add_argument("--max-hw", type=int, default=10, help="largest input height/width (default 10)")
    parser.add_argument(
        "--eps", type=float, default=None, help="finite-difference step (default: the profile's)"
    )
    parser.add_argument(
        "--max-elementwise",
        type=int,
        default=256,
        help="leaves with at most this many entries are differenced elementwise, larger ones "
        "along random directions (default 256)",
    )
    parser.add_argument("--n-directions", type=int, default=8, help="random directions per large leaf")
    parser.add_argument("--no-fd", action="store_true", help="skip finite differences")
    parser.add_argument("--json", metavar="FILE", help="write every report as JSON to FILE")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every full report")
    args = parser.parse_args(argv)
    if args.n_specs < 1:
        parser.error(f"--n-specs must be >= 1, got {args.n_specs}")
    if args.max_hw < 1:
        parser.error(f"--max-hw must be >= 1, got {args.max_hw}")
    return args


def main(argv=None) -> int:
    """Run the checker; returns the exit status (0 pass, 1 any failure)."""
    args = parse_args(argv)
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(args.seed)
    header = (
        f"{'#':>3}  {'batch':>5}  {'terms':>8}  {'grads':>8}  {'vs FD':>8}  {'ok':4}  spec / first failure"
    )
    print(
        f"jaxbp gradient check: {args.n_specs} random specs, seed {args.seed}, {args.dtype}, "
        f"precision {args.precision}; worst relative error per comparison"
    )
    print(header)
    results, n_failed = [], 0
    for index in range(args.n_specs):
        spec = random_spec(rng, max_hw=args.max_hw, precision=PRECISIONS[args.precision])
        batch = int(rng.integers(0, 6)) or None  # 0 -> one unbatched example
        params, x, y = random_problem(rng, spec, batch, args.dtype)
        report = compare_grads(
            params,
            x,
            y,
            spec,
            finite_differences=not args.no_fd,
            eps=args.eps,
            max_elementwise=args.max_elementwise,
            n_directions=args.n_directions,
            seed=args.seed + index,
        )
        n_failed += not report.ok
        worst = [
            _worst(report, *key)
            for key in (("term", "autodiff"), ("grad", "autodiff"), ("grad", "finite differences"))
        ]
        cells = ["-" if w is None else f"{w:.1e}" for w in worst]
        status = "ok" if report.ok else "FAIL"
        first = report.first_failure
        where = "" if first is None else f"  <- {first.stage} {first.name}: {first.note or 'rel above tol'}"
        print(
            f"{index:>3}  {batch or '-':>5}  {cells[0]:>8}  {cells[1]:>8}  {cells[2]:>8}  {status:4}  "
            f"{describe_spec(spec)}{where}",
            flush=True,
        )
        if args.verbose or not report.ok:
            print(report, "\n", flush=True)
        spec_dict = {k: (str(v) if k == "precision" else v) for k, v in dataclasses.asdict(spec).items()}
        results.append({"index": index, "spec": spec_dict, "batch": batch, "report": report.to_dict()})
    print(f"{args.n_specs - n_failed}/{args.n_specs} passed")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(
                {"args": vars(args), "ok": n_failed == 0, "n_failed": n_failed, "results": results},
                file,
                indent=1,
            )
    return 1 if n_failed else 0
