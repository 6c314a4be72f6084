"""Choosing the batch step's formulation by timing the candidates on this machine.

`jaxbp.formulations.choose_formulation` is a rule fitted to measurements on one 2-core Intel Xeon. On a
2-core AMD EPYC the same programs ranked differently: chunks of 32 examples were the fastest at
most 8- and 32-filter points of batch 256 and 1024, where the rule's chunk took 1.23-1.51x the
best time at 6 of 8 batch-1024 points (experiments/PERFORMANCE.md, "On a second CPU"). Which
formulation is fastest is a property of the machine (its caches, its SIMD, the XLA build), not
of the math, so, as cuDNN's benchmark mode and XLA's GPU autotuner do, `tune_formulation`
compiles a few candidate formulations of the same gradients, times them here, interleaved, and
returns the fastest.

Every candidate computes the same means (each form is checked against jax.grad in float64 to
1e-10 by tests/test_batched.py); the choice changes the speed and the order of float sums,
never the math. Timing runs outside any transformation and is not pure: tune once per shape,
dtype and machine, and pass ``.best`` on (`make_update_step(..., formulation=...)`), which is.
With ``cache=path`` a tuning is kept in a JSON file and read back by the next run on the same
machine, JAX and question instead of timed again.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from jaxbp import batched
from jaxbp import formulations
from jaxbp import machine
from jaxbp.compile_options import compiler_options as default_compiler_options
from jaxbp.conv_forms import contracts_channels_first
from jaxbp.formulations import Formulation
from jaxbp.params import init_params
from jaxbp.spec import ConvNetSpec

# The rule's forms are also tried at these chunks (those below the batch). At batch 1024 the
# chunks of 16 to 128 were each the fastest somewhere on one of the two CPUs
# (experiments/results/bench_formulations*.md); the whole batch is tried only up to
# WHOLE_BATCH_MAX, as at 1024 it ran 2.6x slower than chunks of 32 (165 against 422 ms,
# bench_formulations.md), and a compile and several timed calls of it cost the tuning seconds.
CANDIDATE_CHUNKS = (16, 32, 64, 128)
WHOLE_BATCH_MAX = 256
# And these pairs of forms at the rule's chunk: the fastest pair other than the rule's was most
# often the Toeplitz or patches pair, or XLA's conv (`jaxbp.formulations`' measurements); conv/conv is what
# jax.grad's step runs, and is tried for the batch-1 points where the rule was behind jax.grad.
CANDIDATE_PAIRS = (("toeplitz", "toeplitz"), ("patches", "patches"), ("conv", "conv"))
MAX_INNER = 1 << 16  # calls per timed sample at most


class Tuning(NamedTuple):
    """What `tune_formulation` measured.

    Attributes:
      best: the candidate with the smallest median time per call.
      rule: `choose_formulation`'s pick for the same shape (also a candidate).
      times_ms: candidate -> (first quartile, median, third quartile) of ms per call.
      compile_s: candidate -> seconds to compile it.
    """

    best: Formulation
    rule: Formulation
    times_ms: dict[Formulation, tuple[float, float, float]]
    compile_s: dict[Formulation, float]

    def speedup(self) -> float:
        """The rule's median time over the best's (1.0 where the rule is the best)."""
        return self.times_ms[self.rule][1] / self.times_ms[self.best][1]

    def fastest_compiling_within(self, seconds: float) -> Formulation | None:
        """The fastest candidate (smallest median) that compiled in at most `seconds`, or None if
        none did: for a run that compiles often, a compile budget traded against step time. XLA's
        CPU compile time grows with the kernels a step generates, and the fastest steps generate
        the most (experiments/PERFORMANCE.md, "Can any formulation meet the compile target and
        the run-time targets at once?"; there, among more candidates than these, a formulation
        compiling within jax.grad's step's time that also beat jax.grad's and PyTorch's steps
        existed at 28 of 48 grid points, and at none of the other 20). Each candidate is
        compiled once, so near the budget the choice follows that one compile's noise.

        Raises:
          ValueError: if `seconds` is not a non-negative number.
        """
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
            raise ValueError(f"seconds must be a non-negative number of seconds, got {seconds!r}")
        within = [form for form, s in self.compile_s.items() if s <= seconds]
        return min(within, key=lambda form: self.times_ms[form][1]) if within else None

    def report(self) -> str:
        """The candidates fastest first, a line each: median ms [quartiles], time over the
        rule's, compile seconds, and which is the rule's pick."""
        lines, rule_ms = [], self.times_ms[self.rule][1]
        for form, (q1, med, q3) in sorted(self.times_ms.items(), key=lambda kv: kv[1][1]):
            rule = "  (the rule's pick)" if form == self.rule else ""
            lines.append(
                f"{form.label():24} {med:9.4g} ms [{q1:.4g}-{q3:.4g}]  {med / rule_ms:5.2f}x the rule's"
                f"  compiled in {self.compile_s[form]:.2f} s{rule}"
            )
        return "\n".join(lines)


def candidate_formulations(
    spec: ConvNetSpec, batch: int, backend: str | None = None, itemsize: int = 4
) -> list[Formulation]:
    """The formulations `tune_formulation` times by default, the rule's pick first: its forms at
    each of `CANDIDATE_CHUNKS` below the batch (and the whole batch up to `WHOLE_BATCH_MAX`); where
    the pick is the taps and XLA's conv for a batch of 2 or more, the pick in the other layout
    (`jaxbp.batch_minor`); where the pick's forward is the taps on 2 or more input channels, the
    pick channels last with the other ``contract_channels``; where the pick's dE/df is XLA's conv
    or the Toeplitz form after a matmul forward, the pick with W delta2 the other way
    (`w_delta2_alternatives`); on the CPU, where the pick is the patches for both for a single
    example, the patches with XLA's conv for dE/df (the rule before, as fast on the Xeon); then each of
    `CANDIDATE_PAIRS` at the pick's chunk (XLA's conv for dE/df in the rule's parts for this batch
    and backend, `formulations.conv_filter_grad_parts`): 3-11 formulations, 4-10 on the
    benchmark's grid."""
    positive_int(batch, "batch")
    backend = jax.default_backend() if backend is None else backend
    rule = formulations.choose_formulation(spec, batch, backend, itemsize)
    parts = formulations.conv_filter_grad_parts(batch, backend)
    chunks = [c for c in CANDIDATE_CHUNKS if c < batch] + ([None] if batch <= WHOLE_BATCH_MAX else [])
    out = [rule] + [rule._replace(chunk=c) for c in chunks] + taps_alternatives(rule, batch, spec)
    out += w_delta2_alternatives(rule, batch, spec.n_out, backend)
    if batch == 1 and rule[:2] == ("patches", "patches") and backend == "cpu":
        out.append(Formulation("patches", "conv", None, parts))
    out += [Formulation(f, g, rule.chunk, parts) for f, g in CANDIDATE_PAIRS]
    return distinct(out, batch, spec.in_shape[2], n_out=spec.n_out, backend=backend)


def taps_alternatives(form: Formulation, batch: int, spec: ConvNetSpec) -> list[Formulation]:
    """`form` as the taps run otherwise, at its chunk: the taps and XLA's conv on 2 or more
    examples in the other layout (`jaxbp.batch_minor`); the taps on 2 or more input channels
    channels last, the channels contracted first or not as None would not. The rule's side was
    the slower by up to 1.5x on another CPU than the one it was measured on (`formulations`,
    TAPS_CONTRACT_CHANNELS_FROM). With one channel there is nothing to contract."""
    out, channels = [], spec.in_shape[2]
    if form[:2] == ("taps", "conv") and batch > 1:
        out.append(form._replace(batch_minor=not form.batch_minor))
    if form.forward == "taps" and channels >= 2:
        contract = not contracts_channels_first(channels)
        out.append(form._replace(batch_minor=False, contract_channels=contract))
    return out


def w_delta2_alternatives(
    form: Formulation, batch: int, n_out: int, backend: str | None = None
) -> list[Formulation]:
    """`form` with dE/dH1 = delta2 W^T the other way (n_out products or a matmul,
    `jaxbp.formulations.w_delta2_as_terms`) where both sides measured close or the faster side
    differed between the two CPUs measured: dE/df as XLA's conv or the Toeplitz form after the
    patches or Toeplitz forward, for 2 or more examples (a batch of one takes the matmul unless
    set)."""
    matmul_forward = form.forward in formulations.W_DELTA2_TERMS_FORWARDS
    if batch < 2 or not matmul_forward or form.filter_grad not in ("conv", "toeplitz"):
        return []
    return [form._replace(w_delta2_terms=not formulations.w_delta2_as_terms(form, batch, n_out, backend))]


def positive_int(value, name: str) -> int:
    """`value` if it is an int >= 1, else a ValueError naming the argument `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def distinct(
    forms, batch: int, channels: int | None = None, *, n_out: int | None = None, backend: str | None = None
) -> list[Formulation]:
    """`forms` without repeats, each as it runs at `batch`: a chunk of at least the batch is the
    whole batch (None), conv_parts is 1 where dE/df is not XLA's conv, contract_channels None
    where the forward is not the taps or the layout batch-minor, batch_minor False but for
    the taps and the conv on 2 or more examples (nothing else reads them). Given the input
    `channels`, a taps forward's contract_channels that None also means for them is None; given
    `n_out`, a w_delta2_terms that None also means on `backend` (None: the default one) is None
    (`jaxbp.formulations.w_delta2_as_terms`)."""

    def batch_minor(f):  # a batch of one runs channels last (`jaxbp.batched.value_and_grads`)
        return f.batch_minor and f[:2] == ("taps", "conv") and batch > 1

    def contract(f):
        if f.forward != "taps" or batch_minor(f):
            return None
        if channels is not None and f.contract_channels == contracts_channels_first(channels):
            return None
        return f.contract_channels

    def terms(f):  # f with the other fields as they run
        if n_out is None:
            return f.w_delta2_terms
        rule = formulations.w_delta2_as_terms(f._replace(w_delta2_terms=None), batch, n_out, backend)
        return None if f.w_delta2_terms in (None, rule) else f.w_delta2_terms

    runs_as = (
        f._replace(
            chunk=None if (f.chunk or batch) >= batch else f.chunk,
            conv_parts=f.conv_parts if f.filter_grad == "conv" else 1,
            contract_channels=contract(f),
            batch_minor=batch_minor(f),
        )
        for f in forms
    )
    return list(dict.fromkeys(f._replace(w_delta2_terms=terms(f)) for f in runs_as))


def calibrate(call: Callable[[int], object], min_sample_s: float) -> int:
    """How many calls make one timed sample of at least `min_sample_s`, after a warm-up call.

    `call(inner)` makes `inner` calls. The first call after compiling can be far slower than the
    rest: on the H200 every program with a conv at one filter took 20 ms or more, so that,
    estimated from it, a sample was one call, waited for alone, while others were 8-26 calls
    queued together (experiments/bench.py's first GPU runs, inner_calls, in git at 77c2a18). So
    the first call is excluded, and the count grows until a sample of that many calls, timed as
    a sample is, lasts `min_sample_s`.
    """
    call(1)  # warm-up, excluded
    inner = 1
    while True:
        start = time.perf_counter()
        call(inner)
        elapsed = time.perf_counter() - start
        if elapsed >= min_sample_s or inner >= MAX_INNER:
            return inner
        # 20% past the target at this sample's rate; at least twice, at most 100x the calls.
        wanted = int(np.ceil(1.2 * inner * min_sample_s / max(elapsed, 1e-9)))
        inner = min(MAX_INNER, max(2 * inner, min(100 * inner, wanted)))


def timed_calls(fn: Callable, args: tuple) -> Callable[[int], None]:
    """``call(inner)``: `inner` calls of ``fn(*args)``. On the CPU each call is waited for. On an
    accelerator the calls are queued and the last waited for (they run in order), as a training
    loop does; waiting for each would time the host's round trip too. Only the last output is
    kept: a per-example gradient can be a GB."""

    def each(inner):
        for _ in range(inner):
            jax.block_until_ready(fn(*args))

    def queued(inner):
        out = None
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)

    return each if jax.default_backend() == "cpu" else queued


def timed_calls_into(fn: Callable, args: tuple, out) -> Callable[[int], None]:
    """As `timed_calls`, for ``fn(*args, out)`` that writes into `out` (donates it): each call is
    given the previous call's result, as a loop that reuses its per-example gradients does
    (`jaxbp.make_per_example_grads`). `out` is the first call's, and is consumed."""
    state = {"out": out}

    def each(inner):
        for _ in range(inner):
            state["out"] = fn(*args, state["out"])
            if jax.default_backend() == "cpu":
                jax.block_until_ready(state["out"])
        jax.block_until_ready(state["out"])

    return each


WARM_CALLS = 1  # untimed calls of a method right before each of its samples (`interleaved_samples`)


def interleaved_samples(
    calls: dict, repeats: int, min_sample_s: float, warm_calls: int = WARM_CALLS
) -> dict[object, list[float]]:
    """Seconds per call, `repeats` samples of each of `calls` (name -> call(inner)), round by round.

    Each round starts one method later: in a fixed order the first method of a round, after a
    pause or another process, read up to 2.7x slower at batch 1 than the same program timed
    later in the round (experiments/bench.py). Each sample follows `warm_calls` untimed calls of
    its own method: the first call after another program that had freed hundreds of MB ran up to
    2.2x slower (the batch gradient at batch 1024, 28x28x1, 3x3, 32 filters: 79 ms right after
    the per-example gradients without dE/df, 37 alone), and a sample of one call timed that
    instead of the method.
    """
    inner = {name: calibrate(call, min_sample_s) for name, call in calls.items()}
    samples = {name: [] for name in calls}
    order = list(calls)
    for round_ in range(repeats):
        for name in order[round_ % len(order) :] + order[: round_ % len(order)]:
            if warm_calls:
                calls[name](warm_calls)
            start = time.perf_counter()
            calls[name](inner[name])
            samples[name].append((time.perf_counter() - start) / inner[name])
    return samples


def tune_formulation(
    spec: ConvNetSpec,
    batch: int,
    *,
    dtype=jnp.float32,
    candidates: list[Formulation] | None = None,
    repeats: int = 5,
    min_sample_s: float = 0.02,
    compiler_options: dict[str, object] | None = None,
    seed: int = 0,
    progress: Callable[[str], object] | None = None,
    cache: str | os.PathLike | None = None,
) -> Tuning:
    """Time each candidate formulation of `jaxbp.batched.value_and_grads` here; the fastest.

    Each candidate is jitted and compiled, warmed up, and timed on the same random batch, the
    candidates interleaved round by round; a sample is as many calls as fill `min_sample_s`
    (on the CPU each call waited for, on an accelerator queued and the last waited for), right
    after `WARM_CALLS` untimed calls of the same candidate (`interleaved_samples`). The
    gradients do not depend on which is picked, up to float rounding; only the time does.

    Args:
      spec: the network.
      batch: N, the examples per step (under a mesh, per device: what each device's step sees).
      dtype: the params' and data's dtype (float64 needs ``jax_enable_x64``).
      candidates: a list of the formulations to time (each as it runs at `batch`: a chunk of
        the whole batch or more is the whole batch); None for `candidate_formulations`.
      repeats: timed samples per candidate (their median decides).
      min_sample_s: the least seconds one sample lasts.
      compiler_options: XLA options the candidates compile with; None for
        `jaxbp.compiler_options()`, as `make_update_step` uses.
      seed: of the random params and batch.
      progress: called with a line per candidate compiled and once at the end (e.g. `print`);
        once where the tuning is read from `cache`.
      cache: None, or the path of a JSON file of earlier tunings (made, with its folder, if
        missing). A tuning of the same question (spec, batch, dtype, candidates in their order,
        XLA options) on the same kind of machine (CPU model, caches and SIMD extensions, usable
        cores, XLA_FLAGS, backend and device kind; jax, jaxlib and jaxbp versions) is read from
        it instead of timed, if it was timed with at least `repeats` samples of at least
        `min_sample_s`, each after an untimed call (entries written before jaxbp recorded that
        are timed again); else the question is timed and its entry added or replaced. The seed is
        not part of the question. A file that is not such a cache raises a ValueError and is
        left as it is; a tuning that cannot be written is returned all the same, with a
        warning. Two processes writing one file at once may lose one's entry (each rewrites
        the file whole, atomically).

    Returns:
      A `Tuning`: ``.best`` for `make_update_step(..., formulation=...)`, the rule's pick, and
      every candidate's times and compile seconds.
    """
    positive_int(batch, "batch")
    positive_int(repeats, "repeats")
    if not (isinstance(min_sample_s, (int, float)) and 0 <= min_sample_s < math.inf):
        raise ValueError(f"min_sample_s must be a finite number of seconds >= 0, got {min_sample_s!r}")
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    if jax.dtypes.canonicalize_dtype(dtype) != dtype:
        raise ValueError(f"dtype {dtype} needs jax_enable_x64 (jax.config.update('jax_enable_x64', True))")
    itemsize = dtype.itemsize
    rule = formulations.choose_formulation(spec, batch, itemsize=itemsize)
    if candidates is None:
        candidates = candidate_formulations(spec, batch, itemsize=itemsize)
    else:
        if isinstance(candidates, Formulation) or not isinstance(candidates, (list, tuple)):
            raise TypeError(f"candidates must be a list of jaxbp.Formulation, got {candidates!r}")
        if not candidates:
            raise ValueError("candidates must hold at least one Formulation, got none")
        for i, form in enumerate(candidates):
            try:
                formulations.check_formulation(form)
            except (TypeError, ValueError) as err:
                raise type(err)(f"candidates[{i}]: {err}") from None
    candidates = distinct([rule, *candidates], batch, spec.in_shape[2], n_out=spec.n_out)  # the rule first
    options = default_compiler_options() if compiler_options is None else compiler_options
    say = progress or (lambda line: None)
    if cache is not None:
        cache = check_cache_path(cache)
        key = cache_key(spec, batch, dtype, candidates, options)
        stored = read_cache(cache).get(key)
        if stored is not None:
            tuning, done = read_entry(stored, cache)
            # Timed as now: enough samples, long enough, each after an untimed call (entries
            # from before `interleaved_samples` made those have none, and are timed again).
            thorough = done["repeats"] >= repeats and done["min_sample_s"] >= min_sample_s
            if thorough and done["warm_calls"] >= WARM_CALLS:
                say(
                    f"tune: {tuning.best.label()} (from {cache}: tuned {done['date_utc']}, "
                    f"{done['repeats']} samples of at least {done['min_sample_s']} s)"
                )
                return tuning

    kx, ky, kp = jax.random.split(jax.random.key(seed), 3)
    params = init_params(kp, spec, dtype)
    x = jax.random.normal(kx, (batch, *spec.in_shape), dtype)
    y = jax.random.uniform(ky, (batch, spec.n_out), dtype)

    compiled, compile_s = {}, {}
    for i, form in enumerate(candidates, 1):

        def vg(params, x, y, form=form):
            return batched.value_and_grads(params, x, y, spec, formulation=form)

        start = time.perf_counter()
        compiled[form] = jax.jit(vg, compiler_options=options).lower(params, x, y).compile()
        compile_s[form] = time.perf_counter() - start
        say(f"tune {i}/{len(candidates)}: compiled {form.label()} in {compile_s[form]:.2f} s")

    calls = {f: timed_calls(c, (params, x, y)) for f, c in compiled.items()}
    samples = interleaved_samples(calls, repeats, min_sample_s)
    times_ms = {
        f: tuple(float(v) for v in np.percentile(np.asarray(s) * 1e3, [25, 50, 75]))
        for f, s in samples.items()
    }
    best = min(candidates, key=lambda f: times_ms[f][1])  # the first (the rule) wins a tie
    tuning = Tuning(best, rule, times_ms, compile_s)
    say(
        f"tune: {best.label()} {times_ms[best][1]:.3g} ms against the rule's {rule.label()} "
        f"{times_ms[rule][1]:.3g} ms ({tuning.speedup():.2f}x)"
    )
    if cache is not None:
        try:
            write_cache_entry(cache, key, tuning, repeats, min_sample_s)
        except (OSError, ValueError) as err:  # the timing is not lost with the file
            warnings.warn(f"cache {str(cache)!r}: the tuning was not written: {err}", stacklevel=2)
    return tuning


# ----------------------------------------------------------------------------------------------
# The cache: tunings in a JSON file, keyed by the question and the machine that answered it
# ----------------------------------------------------------------------------------------------

CACHE_FORMAT = "jaxbp tuning cache 1"
NOT_A_CACHE = "is not a jaxbp tuning cache (delete it or pass another path)"


def check_cache_path(cache) -> Path:
    """`cache` as a Path, its folder made; a clear error for anything else."""
    if isinstance(cache, bool) or not isinstance(cache, (str, os.PathLike)) or not str(cache):
        raise TypeError(f"cache must be None or a file path (str or os.PathLike), got {cache!r}")
    path = Path(cache)
    if path.is_dir():
        raise ValueError(f"cache must be a file path, got the folder {str(path)!r}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # before any timing, so that none is lost
    except OSError as err:
        raise OSError(f"cache {str(path)!r}: cannot make its folder: {err}") from None
    return path


def cache_key(spec: ConvNetSpec, batch: int, dtype, candidates, options: dict) -> str:
    """The question a tuning answers, and the kind of machine that answered it (what changes
    which candidate is fastest, not the host's name: a container's changes every run). As
    sorted JSON text."""
    from jaxbp import __version__

    cpu = machine.cpuinfo()
    return json.dumps(
        {
            "spec": repr(spec),
            "batch": batch,
            "dtype": jnp.dtype(dtype).name,
            "candidates": [list(f) for f in candidates],
            "compiler_options": options,
            "cpu": cpu.get("model name", ""),
            **machine.cpu_features(),
            "cores": machine.usable_cores(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "backend": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind,
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "jaxbp": __version__,
        },
        sort_keys=True,
        default=str,
    )


def read_cache(path: Path) -> dict:
    """key -> stored tuning; {} where the file does not exist yet."""
    if not path.exists():
        return {}
    try:
        text = path.read_text()
    except OSError as err:
        raise OSError(f"cannot read cache {str(path)!r}: {err}") from None
    try:
        payload = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cache {str(path)!r} {NOT_A_CACHE}: {err}") from None
    if not (
        isinstance(payload, dict)
        and payload.get("format") == CACHE_FORMAT
        and isinstance(payload.get("tunings"), dict)
    ):
        raise ValueError(f"cache {str(path)!r} {NOT_A_CACHE}: no format {CACHE_FORMAT!r} and tunings")
    return payload["tunings"]


def write_cache_entry(path: Path, key: str, tuning: Tuning, repeats: int, min_sample_s: float) -> None:
    """Add (or replace) `tuning` under `key`: the file rewritten whole through a temporary file
    of its own in the same folder, renamed over it, and removed if anything fails before."""
    tunings = read_cache(path)
    tunings[key] = {
        "best": list(tuning.best),
        "rule": list(tuning.rule),
        "times_ms": [[list(f), list(t)] for f, t in tuning.times_ms.items()],
        "compile_s": [[list(f), s] for f, s in tuning.compile_s.items()],
        "repeats": repeats,
        "min_sample_s": min_sample_s,
        "warm_calls": WARM_CALLS,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps({"format": CACHE_FORMAT, "tunings": tunings}, indent=1) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_entry(stored, path: Path) -> tuple[Tuning, dict]:
    """A `Tuning` from its cache entry (Formulations stored as their field lists), and how it
    was timed: {"repeats", "min_sample_s", "warm_calls", "date_utc"} (warm_calls 0 for entries
    written before it was recorded)."""

    def form(fields):
        return formulations.check_formulation(Formulation(*fields))

    try:
        best, rule = form(stored["best"]), form(stored["rule"])
        times_ms = {form(f): tuple(float(v) for v in t) for f, t in stored["times_ms"]}
        compile_s = {form(f): float(s) for f, s in stored["compile_s"]}
        done = {
            "repeats": int(stored["repeats"]),
            "min_sample_s": float(stored["min_sample_s"]),
            "warm_calls": int(stored.get("warm_calls", 0)),
            "date_utc": str(stored["date_utc"]),
        }
        if not {best, rule} <= set(times_ms) or any(len(t) != 3 for t in times_ms.values()):
            raise ValueError("best and rule must be among the timed candidates, each with 3 quartiles")
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"cache {str(path)!r} {NOT_A_CACHE}: an entry does not read back: {err!r}") from None
    return Tuning(best, rule, times_ms, compile_s), done
