"""Where dE/df's time goes in the Toeplitz step: one chunk's copies, dots and conv, timed apart.

With the Toeplitz form (`jaxbp.formulations`: below 8 filters but the taps' one filter on few
channels, and 5x5 from 8 on) each chunk of m examples builds R, the row slabs (M' = m Ho nb
rows of kh span C numbers), and computes

    forward   Z1 = R @ T(f)                       (M', kh span C) x (kh span C, jb K)
    dE/df     G  = delta1^T @ R, folded onto f    a contraction over the M' rows of both

The forward is a plain ("NN") matmul: the contracted axis is the minor one of its left operand
and the major one of its right. dE/df contracts the major axis of both ("TN"). The same G from a
transposed copy of R, R^T @ delta1, is an NN matmul again, but R^T has to be written too; and
dE/df can also be XLA's conv with the batch as its contracted axis (what the step uses from 32
filters on). This script times, at the chunk the step uses for each point:

  build_R      toeplitz_rows(x): the copy the step makes
  build_RT     the same numbers written transposed, (kh span C, M'), straight from x
  forward      Z1 = R @ T, the step's forward matmul
  df_TN        G = delta1^T R and the fold: the step's Toeplitz dE/df
  df_NN        G^T = R^T delta1 and the fold, from the R^T copy
  df_conv      XLA's conv with the batch contracted (the step's dE/df from 32 filters on)
  matmul       a 1024^3 float32 matmul, the machine's ceiling
  matmul_st    the same compiled with xla_cpu_multi_thread_eigen=False, the option meant to make
               Eigen's dots single-threaded (bench.py's st_eigen variant)

interleaved round by round (medians over --repeats). With --cores 1 the process is pinned to one
core first, to see which of them use the second one. Before timing, df_NN and df_conv are checked
against df_TN in float64 (relative error < 1e-10). Writes experiments/results/<name>.json and .md.

    python experiments/bench_filter_grad.py          # the headline and three points PyTorch wins
    python experiments/bench_filter_grad.py --cores 1 --name bench_filter_grad_one_core
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import cores_text  # noqa: E402
from bench import script_record  # noqa: E402
from bench import summarize  # noqa: E402
from bench import write_results  # noqa: E402

# (input, filters, batch): the headline and the grid's 5x5 Toeplitz points where PyTorch's step
# was faster (experiments/results/bench.md).
POINTS = (((28, 28, 1), 8, 256), ((32, 32, 3), 8, 256), ((32, 32, 3), 32, 256), ((32, 32, 3), 32, 32))
METHODS = ("build_R", "build_RT", "forward", "df_TN", "df_NN", "df_conv", "matmul", "matmul_st")


def toeplitz_rows_transposed(x, spec):
    r"""R^T: ``RT[(a, w, c), (n, i, s)] = X_pad[n, a d_h + i s_h, s j_b s_w + w, c]``, written in
    that layout from x (transposed first, a few numbers per output position), in the same two
    steps as `jaxbp.conv_forms.toeplitz_rows`: the input columns grouped g = jb s_w at a time and
    laid side by side, then the kh row slices."""
    import jax.numpy as jnp
    from jax import lax

    from jaxbp import conv_forms

    (kh, _), (sh, sw), (dh, _) = spec.kernel_size, spec.stride, spec.dilation
    ho = spec.h1_shape[0]
    jb, nb, span = conv_forms.toeplitz_blocks(spec)
    groups = conv_forms.toeplitz_column_groups(x, spec)  # (n, hp, nb + nt - 1, g c)
    n, hp, q, _ = groups.shape
    g, c, nt = jb * sw, x.shape[-1], q - nb + 1
    # xg[v, c, n, r, q] = X_pad[n, r, q g + v, c]
    xg = jnp.transpose(groups.reshape(n, hp, q, g, c), (3, 4, 0, 1, 2))
    # cols[(t, v), c, n, r, s] = X_pad[n, r, (s + t) g + v, c], cut to w = t g + v < span
    cols = jnp.concatenate([xg[None, ..., t : t + nb] for t in range(nt)]).reshape(nt * g, c, n, hp, nb)
    cols = cols[:span]
    rows = [lax.slice_in_dim(cols, a * dh, a * dh + (ho - 1) * sh + 1, sh, axis=3) for a in range(kh)]
    return jnp.stack(rows).reshape(kh * span * c, n * ho * nb)


def filter_grad_from_transposed(rows_t, delta1, spec):
    """dE/df (K, kh kw C) as `jaxbp.conv_forms.filter_grad_toeplitz` folds it, from G^T = R^T delta1."""
    import jax.numpy as jnp

    from jaxbp import conv_forms

    kh, _ = spec.kernel_size
    ho, wo, k = spec.h1_shape
    jb, nb, span = conv_forms.toeplitz_blocks(spec)
    d1 = jnp.pad(delta1, ((0, 0), (0, 0), (0, nb * jb - wo), (0, 0))).reshape(-1, jb * k)
    Gt = jnp.dot(rows_t, d1, precision=spec.precision).reshape(kh, span, -1, jb, k)
    df = conv_forms.fold_band(Gt, spec, j_axis=3, w_axis=1)  # (kh, kw, C, K)
    return jnp.transpose(df, (3, 0, 1, 2)).reshape(k, -1)


def methods(jax, jaxbp, spec):
    """The timed functions of one chunk of m examples, each jitted with jaxbp's options, and
    their arguments' builder."""
    from jaxbp import batched
    from jaxbp import conv_forms

    jit = lambda fn: jax.jit(fn, compiler_options=jaxbp.compiler_options())  # noqa: E731
    transposed = lambda f: batched.filters_first(f)  # noqa: E731
    return {
        "build_R": jit(lambda x, R, RT, d1, f: conv_forms.toeplitz_rows(x, spec)),
        "build_RT": jit(lambda x, R, RT, d1, f: toeplitz_rows_transposed(x, spec)),
        "forward": jit(lambda x, R, RT, d1, f: conv_forms.conv_forward_toeplitz(R, f, spec)),
        "df_TN": jit(lambda x, R, RT, d1, f: conv_forms.filter_grad_toeplitz(R, d1, spec, True)),
        "df_NN": jit(lambda x, R, RT, d1, f: filter_grad_from_transposed(RT, d1, spec)),
        "df_conv": jit(lambda x, R, RT, d1, f: transposed(conv_forms.filter_grad_conv(x, d1, spec))),
    }


def arguments(jax, spec, m, dtype):
    """(x, R, R^T, delta1, f) of one chunk, random."""
    from jaxbp import conv_forms

    kx, kd, kf = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (m, *spec.in_shape), dtype)
    delta1 = jax.random.normal(kd, (m, *spec.h1_shape), dtype)
    f = jax.random.normal(kf, (*spec.kernel_size, spec.in_shape[2], spec.n_filters), dtype)
    return x, conv_forms.toeplitz_rows(x, spec), toeplitz_rows_transposed(x, spec), delta1, f


def check(jax, jaxbp, spec) -> dict:
    """Relative errors of build_RT against R^T, and of df_NN and df_conv against df_TN, in float64
    on a chunk of 3 examples."""
    with jax.enable_x64(True):
        import jax.numpy as jnp

        args = arguments(jax, spec, 3, jnp.float64)
        fns = methods(jax, jaxbp, spec)
        ref = np.asarray(fns["df_TN"](*args))
        errors = {"build_RT": float(np.abs(np.asarray(fns["build_RT"](*args)) - np.asarray(args[1]).T).max())}
        for name in ("df_NN", "df_conv"):
            errors[name] = float(np.abs(np.asarray(fns[name](*args)) - ref).max() / np.abs(ref).max())
    return errors


def run_point(jax, jaxbp, in_shape, filters, batch, args) -> dict:
    import jax.numpy as jnp

    spec = jaxbp.ConvNetSpec(in_shape=in_shape, n_filters=filters, kernel_size=5, n_out=10)
    form = jaxbp.formulations.choose_formulation(spec, batch)
    if form.forward != "toeplitz":
        raise SystemExit(f"{in_shape}, {filters} filters, batch {batch}: the step uses {form}, not Toeplitz")
    errors = check(jax, jaxbp, spec)
    if max(errors.values()) > 1e-10:
        raise SystemExit(f"{in_shape}, {filters} filters: a method disagrees with the step's dE/df: {errors}")
    m = form.chunk or batch
    chunk_args = arguments(jax, spec, m, jnp.float32)
    fns = methods(jax, jaxbp, spec)
    a = jax.random.normal(jax.random.key(1), (1024, 1024), jnp.float32)
    options = jaxbp.compiler_options()
    matmul = jax.jit(lambda a: a @ a, compiler_options=options)
    matmul_st = jax.jit(lambda a: a @ a, compiler_options={**options, "xla_cpu_multi_thread_eigen": False})
    calls = {name: (lambda fn=fn: fn(*chunk_args)) for name, fn in fns.items()}
    calls["matmul"] = lambda: matmul(a)
    calls["matmul_st"] = lambda: matmul_st(a)
    for call in calls.values():
        jax.block_until_ready(call())
    samples = {name: [] for name in calls}
    for _ in range(args.repeats):  # one sample of each method in turn, round by round
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(args.calls):
                out = call()
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - start) / args.calls)
    times = {name: summarize(s) for name, s in samples.items()}
    jb, nb, span = jaxbp.conv_forms.toeplitz_blocks(spec)
    rows = m * spec.h1_shape[0] * nb
    dot_flop = 2 * rows * spec.kernel_size[0] * span * spec.in_shape[2] * jb * filters
    return {
        "point": {"input": in_shape, "filters": filters, "batch": batch, "chunk": m},
        "formulation": form._asdict(),
        "R_shape": [rows, spec.kernel_size[0] * span * spec.in_shape[2]],
        "dot_gflop": dot_flop / 1e9,
        "check_rel_errors": errors,
        "times": times,
    }


def markdown(results, info, command) -> str:
    ms = lambda r, k: r["times"][k]["median_ms"]  # noqa: E731
    lines = [
        "# dE/df in the Toeplitz step: one chunk, timed apart",
        "",
        f"Command: `{command}`  ",
        f"Machine: {info['cpu']}, {cores_text(info)}; load average "
        f"{info['load_average']} at the end. jax {info['jax']}, jaxlib {info['jaxlib']}; git "
        f"{info['git_commit']}; {info['date_utc']}.",
        "",
        "Median ms per call over the repeats, interleaved. `TN/NN`: the step's dE/df (delta1^T R) "
        "over the same from a transposed copy (R^T delta1); `RT+NN`: that copy's cost plus df_NN, "
        "over df_TN (> 1: the second copy does not pay); GFLOP/s of the forward and of the two dE/df "
        "dots, each the same multiplies; `mm`: a 1024^3 matmul, and with "
        "xla_cpu_multi_thread_eigen=False.",
        "",
        "| input | K | batch | chunk | R | build_R | build_RT | forward | df_TN | df_NN | df_conv "
        "| TN/NN | RT+NN / TN | GFLOP/s fwd / TN / NN | mm GFLOP/s, st |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        p, g = r["point"], r["dot_gflop"]
        lines.append(
            f"| {'x'.join(map(str, p['input']))} | {p['filters']} | {p['batch']} | {p['chunk']} "
            f"| {r['R_shape'][0]}x{r['R_shape'][1]} "
            + "".join(f"| {ms(r, k):.3f} " for k in METHODS[:-2])
            + f"| {ms(r, 'df_TN') / ms(r, 'df_NN'):.2f} "
            f"| {(ms(r, 'build_RT') + ms(r, 'df_NN')) / ms(r, 'df_TN'):.2f} "
            + " / ".join(f"{g / ms(r, k) * 1e3:.0f}" for k in ("forward", "df_TN", "df_NN")).join(("| ", " "))
            + f"| {2 * 1024**3 / ms(r, 'matmul') / 1e6:.0f}, {2 * 1024**3 / ms(r, 'matmul_st') / 1e6:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--repeats", type=int, default=15, help="timed samples per method (default 15)")
    parser.add_argument("--calls", type=int, default=5, help="calls per sample (default 5)")
    parser.add_argument("--cores", type=int, help="pin the process to this many cores before JAX starts")
    parser.add_argument("--quick", action="store_true", help="the headline point only, 3 repeats")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"), help="folder")
    parser.add_argument("--name", default="bench_filter_grad", help="file stem of the outputs")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.calls < 1:
        parser.error("--repeats and --calls must be >= 1")
    if args.cores is not None:
        from jaxbp.machine import pin_cores

        try:
            pin_cores(args.cores)  # before JAX starts its threads
        except ValueError as err:
            parser.error(f"--{err}")
    if args.quick:
        args.repeats = min(args.repeats, 3)
    import jax

    import jaxbp

    points = POINTS[:1] if args.quick else POINTS
    results = []
    for point in points:
        results.append(run_point(jax, jaxbp, *point, args))
        print(f"done {point}", file=sys.stderr, flush=True)
    info, command = script_record(jax, __file__, argv)
    write_results(args.out, args.name, info, command, results, markdown(results, info, command))


if __name__ == "__main__":
    main()
