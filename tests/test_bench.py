"""experiments/bench.py's summaries, on made-up timings (the benchmark itself is not run here), and
its per-example floor against the per-example gradients in float64."""

import importlib.util
import json
import multiprocessing
import os
import pathlib
import re
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from strategies import ZEN2_SIMD

import jaxbp
from jaxbp import batched
from jaxbp import conv_forms
from jaxbp import formulations
from jaxbp import machine
from jaxbp.machine import CoreRoundTrip

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_experiment(name: str):
    """experiments/<name>.py as a module (experiments/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_experiment("bench")


def point(times_ms, compile_s, autodiff_compile_s, chosen):
    return {
        "point": {"batch": 256, "input": [28, 28, 1], "kernel": 5, "filters": 8},
        "chosen_formulation": chosen,
        "times": {f"manual[{k}]": {"median_ms": v} for k, v in times_ms.items()},
        "compile": {"autodiff": {"compile_s": autodiff_compile_s}}
        | {f"manual[{k}]": {"compile_s": v} for k, v in compile_s.items()},
    }


def compile_rows(results):
    """The rows of `formulation_compile_table` (its points), and the summary lines after them."""
    lines = bench.formulation_compile_table(results)
    return [x for x in lines if x.startswith("| 256")], [x for x in lines if x.startswith("- ")]


def test_formulation_compile_table_names_the_tradeoff():
    times = {"a/a/all": 10.0, "b/b/all": 20.0, "c/c/64": 40.0}
    compile_s = {"a/a/all": 0.6, "b/b/all": 0.3, "c/c/64": 0.2}
    # jax.grad compiles in 0.35 s: b and c compile no slower, b is the faster of the two (2x a's time).
    (row,), summary = compile_rows([point(times, compile_s, 0.35, "a/a/all")])
    assert row == "| 256 | 28x28x1 | 5 | 8 | 0.35 | 0.60 | c/c/64 0.20 (4.00) | b/b/all 0.30 (2.00) | - | - |"
    assert summary[0] == "- some formulation compiles in at most jax.grad's time: 1 of 1 points"
    assert summary[2].endswith("0 of 1 (PyTorch not timed)")
    # jax.grad compiles in 0.1 s: no formulation does.
    (row,), summary = compile_rows([point(times, compile_s, 0.1, "a/a/all")])
    assert row.endswith("| c/c/64 0.20 (4.00) | none | - | - |")
    assert summary[0].endswith(": 0 of 1 points")


def test_formulation_compile_table_weighs_the_compile_target_against_the_peers():
    times = {"a/a/all": 10.0, "b/b/all": 20.0, "c/c/64": 40.0}
    compile_s = {"a/a/all": 0.6, "b/b/all": 0.3, "c/c/64": 0.2}
    # b, the fastest compiling within jax.grad's 0.35 s, against jax.grad's step and PyTorch's:
    # ahead of jax.grad (25 ms) at both points, of PyTorch (30 ms) at the first only.
    results = [point(times, compile_s, 0.35, "a/a/all") for _ in range(2)]
    for r, torch_ms in zip(results, (30.0, 15.0)):
        r["times"] |= {"autodiff": {"median_ms": 25.0}, "torch": {"median_ms": torch_ms}}
    rows, summary = compile_rows(results)
    assert [row.rsplit("|", 3)[1:3] for row in rows] == [[" 1.25 ", " 1.50 "], [" 1.25 ", " 0.75 "]]
    assert summary == [
        "- some formulation compiles in at most jax.grad's time: 2 of 2 points",
        "- one of those at least as fast as jax.grad: 2 of 2",
        "- one of those at least as fast as jax.grad and faster than PyTorch: 1 of 2",
    ]
    # jax.grad's step faster than b: not ahead of it, so not of both either (c, slower, never is)
    for r in results:
        r["times"]["autodiff"]["median_ms"] = 19.0
    assert compile_rows(results)[1][1:] == [
        "- one of those at least as fast as jax.grad: 0 of 2",
        "- one of those at least as fast as jax.grad and faster than PyTorch: 0 of 2",
    ]


def test_formulation_compile_table_counts_ties_with_jax_grad_but_not_with_pytorch():
    times, compile_s = {"a/a/all": 10.0, "b/b/all": 20.0}, {"a/a/all": 0.6, "b/b/all": 0.3}
    # b ties jax.grad's step (at least as fast: counted) and PyTorch's (not faster: not counted).
    r = point(times, compile_s, 0.35, "a/a/all")
    r["times"] |= {"autodiff": {"median_ms": 20.0}, "torch": {"median_ms": 20.0}}
    (row,), summary = compile_rows([r])
    assert row.endswith("| b/b/all 0.30 (2.00) | 1.00 | 1.00 |")
    assert summary[1:] == [
        "- one of those at least as fast as jax.grad: 1 of 1",
        "- one of those at least as fast as jax.grad and faster than PyTorch: 0 of 1",
    ]
    # Nothing compiles within jax.grad's time: no ratios, nothing counted, peers timed or not.
    r["compile"]["autodiff"]["compile_s"] = 0.1
    (row,), summary = compile_rows([r])
    assert row.endswith("| none | - | - |")
    assert summary[0].endswith(": 0 of 1 points") and all(line.endswith(": 0 of 1") for line in summary[1:])
    # PyTorch timed, jax.grad's step not: its column empty, and nothing ahead of it.
    r["compile"]["autodiff"]["compile_s"] = 0.35
    del r["times"]["autodiff"]
    (row,), summary = compile_rows([r])
    assert row.endswith("| b/b/all 0.30 (2.00) | - | 1.00 |")
    assert summary[1].endswith("0 of 1") and summary[2].endswith("0 of 1")


def test_formulation_tables_take_the_manual_step_for_a_pick_left_out_of_the_pairs():
    # --forms taps toeplitz leaves the pick's pair (taps/conv) out of the timed formulations; the
    # `manual` step is the pick, so it stands for it (the ratios were nan before).
    r = point({"taps/toeplitz/128": 12.0}, {"taps/toeplitz/128": 0.5}, 0.35, "taps/conv*4/128")
    r["times"]["manual"] = {"median_ms": 10.0}
    r["compile"]["manual"] = {"compile_s": 0.4}
    assert bench.formulation_stats(r, "times", "median_ms") == {
        "taps/toeplitz/128": 12.0,
        "taps/conv*4/128": 10.0,
    }
    (row,), _ = compile_rows([r])
    assert row == "| 256 | 28x28x1 | 5 | 8 | 0.35 | 0.40 | taps/conv*4/128 0.40 (1.00) | none | - | - |"


def test_formulation_compile_table_skips_points_without_formulations():
    plain = point({}, {}, 0.3, None)
    assert len(bench.formulation_compile_table([plain])) == 8  # the header only, no summary


def test_variants_table_ratios_and_compile_times():
    names = ("manual", "autodiff", "manual_ynn_dots", "autodiff_ynn_dots", "manual_unrolled")
    times = dict(zip(names, (10.0, 30.0, 8.0, 12.0, 20.0)))
    result = {
        "point": {"batch": 1024, "input": [32, 32, 3], "kernel": 5, "filters": 32},
        "times": {n: {"median_ms": v} for n, v in times.items()},
        "compile": {n: {"compile_s": 0.1 * (i + 1)} for i, n in enumerate(names)},
    }
    ynn, unrolled = bench.variants_table([result])[-2:]
    point = "| 1024 | 32x32x3 | 5 | 32 "
    assert ynn == point + "| ynn_dots | 10 | 8 | 1.25 | 30 | 12 | 2.50 | 1.20 | 0.10/0.30/0.20/0.40 |"
    assert unrolled == point + "| unrolled | 10 | 20 | 0.50 | 30 | - | - | - | 0.10/0.50/0.20/- |"
    for name in ("manual_ynn_dots", "autodiff_ynn_dots", "manual_unrolled"):
        del result["times"][name]  # a run without --variants has no rows
    assert not bench.variants_table([result])[-1].startswith("| 1024")


def test_variant_options_on_a_gpu_are_xla_options_this_jaxlib_knows():
    # On a GPU --variants compiles with GPU_VARIANT_OPTIONS instead of the CPU's; XLA rejects an
    # option name it does not know (what compile_options.accepts tests), so a misspelled GPU
    # option would fail here on the CPU rather than in a GPU session's few minutes.
    from jaxbp.compile_options import accepts

    assert bench.variant_options("cpu") is bench.VARIANT_OPTIONS
    assert bench.variant_options("gpu") is bench.GPU_VARIANT_OPTIONS
    for option in bench.GPU_VARIANT_OPTIONS.values():
        assert accepts(tuple(option.items()), "cpu"), option
    assert not accepts((("xla_gpu_autotune_levl", 0),), "cpu")  # the check can fail
    names = bench.variant_names({"manual_no_autotune": 1, "autodiff_no_autotune": 1, "manual": 1})
    assert names == ["manual_no_autotune", "autodiff_no_autotune"]


class Quiet:
    def __init__(self):
        self.lines = []

    def write(self, line):
        self.lines.append(line)


def test_check_variants_drops_a_variant_whose_update_disagrees():
    params = (np.ones(3), np.zeros(2))
    new = (np.array([0.9, 0.8, 0.7]), np.array([0.1, 0.2]))
    off = (np.array([0.9, 0.8, 0.6]), np.array([0.1, 0.2]))  # one update 0.4 instead of 0.3
    compiled = {
        "manual": lambda *args: (new,),
        "manual_st_eigen": lambda *args: (new,),
        "autodiff_ynn_dots": lambda *args: (new,),
        "manual_unrolled": lambda *args: (off,),
    }
    progress = Quiet()
    errors = bench.check_variants(None, compiled, (params,), progress, {"batch": 1})
    assert errors["manual_st_eigen"] == errors["autodiff_ynn_dots"] == 0.0
    np.testing.assert_allclose(errors["manual_unrolled"], 0.1 / 0.3)
    assert "manual_unrolled" not in compiled and "manual_st_eigen" in compiled
    assert "manual_unrolled disagrees" in progress.lines[0]


def test_per_example_without_filter_grad_is_the_per_example_dW_and_db_float64():
    # The floor `per_ex_no_df` times must be the per-example gradients' own dE/dW and dE/db, in
    # each forward form the per-example path takes: the taps (the whole batch at once), the
    # patches (3x3, 8 filters) and the Toeplitz form (5x5, 8 filters).
    import jax

    import jaxbp

    for hw, filters, kernel, form in ((10, 1, 3, "taps"), (10, 8, 3, "patches"), (16, 8, 5, "toeplitz")):
        spec = jaxbp.ConvNetSpec(in_shape=(hw, hw, 1), n_filters=filters, kernel_size=kernel, n_out=3)
        assert formulations.per_example_formulation(spec, 300, itemsize=8).forward == form
        params = jaxbp.init_params(jax.random.key(0), spec, dtype=np.float64)
        x = jax.random.normal(jax.random.key(1), (300, *spec.in_shape), np.float64)
        y = jax.random.uniform(jax.random.key(2), (300, 3), np.float64)
        dW, db = jax.jit(bench.per_example_without_filter_grad, static_argnums=3)(params, x, y, spec)
        grads = jaxbp.per_example_manual_grads(params, x, y, spec)
        np.testing.assert_allclose(dW, grads.W, rtol=1e-10, atol=1e-15)
        np.testing.assert_allclose(db, grads.b, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("batch, filters, kernel", [(300, 8, 5), (7, 8, 3), (300, 1, 5), (256, 8, 3)])
def test_batch_forward_is_the_forward_and_deltas_and_contracts_nothing_float64(batch, filters, kernel):
    # The floor's first part: E, and the sums of delta1 and delta2 over the batch as the slides
    # define them, in the batch step's forms and chunks (16x16x1: the Toeplitz form, the taps and
    # the patches in chunks of 128, with a remainder at 300; 7 examples whole), and no product
    # of dE/df or dE/dW: its compiled program has no convolution, no dot with their shapes (the
    # Toeplitz fold's output among them) and fewer dots than the batch gradient's.
    spec = jaxbp.ConvNetSpec(in_shape=(16, 16, 1), n_filters=filters, kernel_size=kernel, n_out=3)
    params = jaxbp.init_params(jax.random.key(0), spec, dtype=np.float64)
    x = jax.random.normal(jax.random.key(1), (batch, *spec.in_shape), np.float64)
    y = jax.random.uniform(jax.random.key(2), (batch, 3), np.float64)
    assert (formulations.choose_formulation(spec, batch, itemsize=8).chunk is None) == (batch == 7)
    fn = jax.jit(bench.batch_forward, static_argnums=3)
    (E, sum_delta1), sum_delta2 = fn(params, x, y, spec)
    E_ref, grads = jaxbp.manual_value_and_grads(params, x, y, spec)
    _, _, _, delta1 = batched.slide_terms(params, x, y, spec, "conv", batch)
    np.testing.assert_allclose(E, E_ref, rtol=1e-12)
    np.testing.assert_allclose(sum_delta2, grads.b, rtol=1e-12, atol=1e-15)  # dE/db = sum delta2
    np.testing.assert_allclose(sum_delta1, jnp.sum(delta1), rtol=1e-10, atol=1e-15)

    k, d, kkc = filters, int(np.prod(spec.h1_shape)), kernel * kernel
    jb, _, span = conv_forms.toeplitz_blocks(spec)
    dW, df = {(3, d), (d, 3)}, {(k, kkc), (kkc, k), (jb * k, kernel * span)}  # df: or G = delta1^T R

    def gradient_products(fn):  # convolutions, and dots shaped as dE/dW or dE/df
        hlo = jax.jit(fn).lower(params, x, y).compile().as_text()
        dots = {tuple(map(int, m.split(","))) for m in re.findall(r"f64\[([\d,]+)\]\{[\d,]+\} dot\(", hlo)}
        return hlo.count("convolution("), dots & dW, dots & df

    assert gradient_products(lambda p, x, y: bench.batch_forward(p, x, y, spec)) == (0, set(), set())
    convs, dW_dots, df_dots = gradient_products(lambda p, x, y: jaxbp.manual_value_and_grads(p, x, y, spec))
    assert dW_dots and (convs or df_dots)  # what the floor must leave out is there in the gradient


def test_within_the_floor_counts_the_points_the_floor_leaves_open():
    derived = [
        {"per_ex_floor_over_batch_grad": 1.1, "per_ex_manual_reused_over_batch_grad": 1.15},  # met
        {"per_ex_floor_over_batch_grad": 1.0, "per_ex_manual_reused_over_batch_grad": 2.0},  # open, not met
        {"per_ex_floor_over_batch_grad": 1.5, "per_ex_manual_reused_over_batch_grad": 3.0},  # out of reach
        {"autodiff_over_manual": 2.0},  # batch 1: no per-example methods
    ]
    (line,) = bench.within_the_floor(derived)
    assert line.startswith(
        "- per-example within 1.2x (into the last call's memory) where the floor is: 1 of 2"
    )
    assert "the floor over 1.2x at 1;" in line
    assert "over the floor 2.00x (median; 1.05-2.00), under it (a floor that did not hold) at 0" in line
    (line,) = bench.within_the_floor([{**derived[0], "per_ex_manual_reused_over_batch_grad": 1.0}])
    assert line.endswith("under it (a floor that did not hold) at 1")
    assert bench.within_the_floor([{"autodiff_over_manual": 2.0}]) == []


probe_write_overlap = load_experiment("probe_write_overlap")


def test_write_overlap_probe_runs_end_to_end(tmp_path):
    probe_write_overlap.main(["--points", "4:8x8x1:3:2", "--rounds", "2", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "probe_write_overlap.json").read_text())
    (r,) = payload["results"]
    assert r["write_mb"] == 4 * 6 * 6 * 2 * 10 * 4 / 1e6  # N x D x n_out float32
    assert set(r["median_ms"]) == {"grad", "write", "one_after_the_other", "at_once"}
    m = r["median_ms"]
    assert r["at_once_over_one_after_the_other"] == pytest.approx(m["at_once"] / m["one_after_the_other"])
    assert payload[
        "command"
    ] == "python experiments/probe_write_overlap.py --points 4:8x8x1:3:2 --rounds 2 " + (f"--out {tmp_path}")
    assert {"cpu", "git_commit", "jax", "load_average"} <= set(payload["machine"])
    text = (tmp_path / "probe_write_overlap.md").read_text()
    assert "| 4 | 8x8x1 | 3 | 2 |" in text and bench.machine_line(payload["machine"]) in text
    with pytest.raises(SystemExit):
        probe_write_overlap.main(["--points", "4:8x8:3:2", "--out", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()


probe_filter_grad_floor = load_experiment("probe_filter_grad_floor")


def test_filter_grad_floor_probe_checks_every_form_and_adds_the_fastest(tmp_path):
    probe_filter_grad_floor.main(["--points", "4:8x8x1:3:2", "--repeats", "1", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "probe_filter_grad_floor.json").read_text())
    (r,) = payload["results"]
    # The five forms, and the program floor against the per-example gradients, agree in float64
    # before anything is timed (sums in other orders: 5e-16 here).
    assert r["check_rel_error"] < 1e-10 and r["chunk"] == 4
    m, df, programs = (
        r["median_ms"],
        probe_filter_grad_floor.DF_METHODS,
        probe_filter_grad_floor.PROGRAM_METHODS,
    )
    assert set(m) == {"batch_grad", "per_ex", "batch_forward", "dW_reused", *df, *programs}
    assert r["fastest_df"] == min(df, key=m.get)
    floor = m["batch_forward"] + m["dW_reused"]
    assert r["floor_over_batch_grad"] == pytest.approx(floor / m["batch_grad"])
    assert r["floor_df_over_batch_grad"] == pytest.approx((floor + m[r["fastest_df"]]) / m["batch_grad"])
    assert r["fastest_program"] == min(programs, key=m.get)
    assert r["program_over_batch_grad"] == pytest.approx(m[r["fastest_program"]] / m["batch_grad"])
    text = (tmp_path / "probe_filter_grad_floor.md").read_text()
    assert "| 4 | 8x8x1 | 3 | 2 | 4 |" in text and bench.machine_line(payload["machine"]) in text
    with pytest.raises(SystemExit):
        probe_filter_grad_floor.main(["--repeats", "0", "--out", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()


def test_filter_grad_floor_probe_scales_a_chunk_to_the_batch(monkeypatch):
    # Two chunks of 2 examples, every sample 1 ms: each dE/df form is timed on one chunk and
    # counts twice, the whole-batch methods once.
    monkeypatch.setattr(jaxbp.per_example, "per_example_chunk", lambda spec, batch, itemsize=4: 2)
    one_ms = lambda calls, repeats, min_sample_s: {name: [1e-3] for name in calls}  # noqa: E731
    monkeypatch.setattr(jaxbp.tune, "interleaved_samples", one_ms)
    r = probe_filter_grad_floor.run_point(4, (8, 8, 1), 3, 2, 1, 0.001)
    assert r["chunk"] == 2
    assert [r["median_ms"][k] for k in probe_filter_grad_floor.DF_METHODS] == pytest.approx([2.0] * 5)
    assert r["median_ms"]["batch_grad"] == pytest.approx(1.0)
    assert r["floor_df_over_batch_grad"] == pytest.approx(4.0)
    # The program floor runs the whole batch (in the chunks' loop), so it counts once.
    assert [r["median_ms"][k] for k in probe_filter_grad_floor.PROGRAM_METHODS] == pytest.approx([1.0] * 3)
    assert r["program_over_batch_grad"] == pytest.approx(1.0)


@pytest.mark.parametrize("filters", [1, 3])  # the taps forward, and the Toeplitz form's
def test_program_floor_writes_each_examples_dW_and_db_in_chunks_and_sums_dE_df_float64(filters):
    spec = jaxbp.ConvNetSpec(in_shape=(8, 8, 3), n_filters=filters, kernel_size=3, n_out=4)
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        params = jaxbp.init_params(jax.random.key(0), spec, dtype=jnp.float64)
        x, y = jnp.asarray(rng.normal(size=(4, 8, 8, 3))), jnp.asarray(rng.uniform(size=(4, 4)))
        want = jaxbp.per_example_manual_grads(params, x, y, spec)
        for df_form in probe_filter_grad_floor.PROGRAM_FORMS:
            for chunk in (None, 2):  # jitted with out donated, as the probe times it
                program = jax.jit(
                    lambda p, x, y, out, df_form=df_form, chunk=chunk: probe_filter_grad_floor.program_floor(
                        p, x, y, out, spec, df_form, chunk
                    ),
                    donate_argnums=3,
                    keep_unused=True,
                )
                out = probe_filter_grad_floor.program_out(jax, spec, params, x, y, df_form)
                (W, b), df = program(params, x, y, out)
                assert all(a.is_deleted() for a in jax.tree.leaves(out))  # donated, not copied
                np.testing.assert_allclose(W, want.W, rtol=1e-10, atol=1e-13)
                np.testing.assert_allclose(b, want.b, rtol=1e-10, atol=1e-13)
                df = df if df_form == "conv" else df.T.reshape(want.f.shape[1:])  # (K, kh kw C) back
                np.testing.assert_allclose(df, want.f.sum(0), rtol=1e-10, atol=1e-13)
            out = probe_filter_grad_floor.program_out(jax, spec, params, x, y, df_form)
            with pytest.raises(ValueError, match="chunk must divide the batch, got 3 and 4"):
                probe_filter_grad_floor.program_floor(params, x, y, out, spec, df_form, 3)


bench_dot_rows = load_experiment("bench_dot_rows")


def test_dot_rows_bench_runs_end_to_end_and_checks_both_orders(tmp_path):
    bench_dot_rows.main(["--shapes", "2", "--repeats", "1", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "bench_dot_rows.json").read_text())
    assert [r["shape"] for r in payload["results"]] == [list(s) for s in bench_dot_rows.SHAPES[:2]]
    # float32 sums of 144-900 products in another order: at most 8.5e-7 relative over the 14
    # shapes of results/bench_dot_rows.json, so 1e-5 leaves a 12x margin.
    for r in payload["results"]:
        assert set(r["median_ms"]) == {"a_first", "b_first", "fewer_rows_first"}
        assert max(r["rel_error"].values()) < 1e-5
    assert payload["command"].startswith("python experiments/bench_dot_rows.py --shapes 2 --repeats 1")
    text = (tmp_path / "bench_dot_rows.md").read_text()
    assert "| 128 | 900 | 27 | 8 |" in text and bench.machine_line(payload["machine"]) in text
    with pytest.raises(SystemExit):
        bench_dot_rows.main(["--repeats", "0", "--out", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()


bench_filter_grad = load_experiment("bench_filter_grad")


def test_bench_filter_grad_alternatives_compute_the_steps_filter_grad_float64():
    """bench_filter_grad.py's R^T is R transposed entry by entry, and its dE/df from R^T and from
    XLA's conv equal the step's Toeplitz dE/df: float64, relative error < 1e-10, with strides,
    dilation, padding and a padded last block as well as the benchmark's own shape."""
    import jax

    import jaxbp

    specs = [
        jaxbp.ConvNetSpec(in_shape=(12, 12, 1), n_filters=8, kernel_size=5, n_out=10),
        jaxbp.ConvNetSpec(
            in_shape=(11, 13, 2),
            n_filters=3,
            kernel_size=(3, 5),
            stride=(2, 1),
            dilation=(1, 2),
            padding="SAME",
        ),
    ]
    for spec in specs:
        errors = bench_filter_grad.check(jax, jaxbp, spec)
        assert errors["build_RT"] == 0.0, (spec, errors)
        assert errors["df_NN"] < 1e-10 and errors["df_conv"] < 1e-10, (spec, errors)


def test_device_line_only_off_the_cpu():
    info = {"backend": "cpu", "git_commit": "abc"}
    assert bench.device_lines(info) == []
    assert bench.git_text(info) == "abc"
    assert bench.torch_label({"torch_device": "cpu"}) == "CPU"
    gpu = {"backend": "gpu", "device_kind": "Some GPU", "devices": ["cuda:0"], "precision": "tf32"}
    gpu |= {"jax_default_matmul_precision": "tensorfloat32", "torch_device": "cpu", "matmul_n": 8192}
    line = bench.device_lines(gpu)[-1]
    assert line.startswith("Device: Some GPU (gpu, 1 device(s)); --precision tf32: ")
    assert "PyTorch on" not in line  # PyTorch ran on the CPU: no CUDA settings to name
    gpu |= {"torch_device": "cuda", "torch_gpu": "Some GPU", "torch_matmul_allow_tf32": True}
    gpu |= {"torch_cudnn_allow_tf32": True, "git_commit": "abc", "tree_commit": "def"}
    assert "PyTorch on Some GPU, allow_tf32 matmul True, cuDNN True" in bench.device_lines(gpu)[-1]
    assert bench.torch_label(gpu) == "CUDA"
    assert bench.git_text(gpu) == "def (the copy's git said abc)"


bench_lenet = load_experiment("bench_lenet")


def test_lenet_table_names_the_device_and_tree_only_off_the_cpu():
    timing = {"median_ms": 1.0, "q1_ms": 0.9, "q3_ms": 1.1, "compile_s": 0.5}
    row = {"in_shape": [8, 8, 1], "pooling": "avg", "batch": 32, "speedup": 1.0}
    row |= {"manual": timing, "autodiff": timing}
    info = {"cpu": "x", "cores": 2, "jax": "0", "date_utc": "d", "load_average": [0.0], "backend": "cpu"}
    table = bench_lenet.markdown([row], info, "cmd")
    assert "Device:" not in table and ", tree " not in table
    info |= {"backend": "gpu", "device_kind": "Some GPU", "jax_default_matmul_precision": "float32"}
    info |= {"tree_commit": "def"}
    table = bench_lenet.markdown([row], info, "cmd")
    assert "Device: Some GPU (gpu); jax_default_matmul_precision float32." in table
    assert ", tree def." in table
    assert "| 8x8x1 | avg | 32 | 1.00 [0.90, 1.10] | 1.00 [0.90, 1.10] | 1.00 | 0.50 / 0.50 |" in table


def test_lenet_bench_runs_end_to_end_and_records_its_command(tmp_path):
    # Two 8x8 points, one sample each: the JSON holds both points, each method's calls per
    # sample from calibrate (at least one), and the command as given (quoted for a shell).
    bench_lenet.main(["--quick", "--repeats", "1", "--sample-s", "0.001", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "bench_lenet.json").read_text())
    given = f"bench_lenet.py --quick --repeats 1 --sample-s 0.001 --out {tmp_path}"
    assert payload["command"].endswith(given)
    assert [(r["pooling"], r["batch"]) for r in payload["results"]] == [("avg", 128), ("max", 128)]
    for r in payload["results"]:
        assert set(r["calls_per_sample"]) == {"manual", "autodiff"}
        assert min(r["calls_per_sample"].values()) >= 1 and r["grad_rel_diff"] < 1e-4
    assert "| 8x8x1 | max | 128 |" in (tmp_path / "bench_lenet.md").read_text()


def test_calibrate_excludes_a_slow_first_call():
    # The first call takes 50 ms, then 1 ms a call: a sample of 20 ms needs 20 calls or more
    # (estimated from the first call alone, as before, it was one).
    calls = []

    def call(inner):
        calls.append(inner)
        time.sleep(0.05 if len(calls) == 1 else 0.001 * inner)

    inner = bench.calibrate(call, 0.02)
    # At 1 ms a call a 20 ms sample is about 20 calls; sleeps that overrun on a busy machine can
    # make it fewer, never as few as the 1 call the first call's 50 ms would give.
    assert calls[0] == 1 and calls[-1] == inner and 8 <= inner <= 2 * 24, calls


def test_numpy_peer_on_a_gpu_run_times_on_the_cpu():
    # A GPU run hands the numpy peer the CPU (it has no torch to wait for); asked for "cuda"
    # anyway, it still times without touching torch.
    parent, child = multiprocessing.Pipe()
    worker = threading.Thread(target=bench.peer_worker, args=(child, "numpy"), daemon=True)
    worker.start()
    rng = np.random.default_rng(0)
    f, W, b = rng.normal(size=(3, 3, 1, 2)), rng.normal(size=(18, 10)), rng.normal(size=10)
    x, y = rng.normal(size=(2, 5, 5, 1)), rng.uniform(size=(2, 10))
    for msg in (("versions", ("cuda", "float32")), ("setup", (f, W, b, x, y)), ("time", 2), ("stop", None)):
        parent.send(msg)
        assert parent.poll(10), f"no reply to {msg[0]}: the worker died"
        reply = parent.recv()
    worker.join(timeout=10)
    assert not worker.is_alive() and reply > 0  # the last reply: the worker's max RSS


def dies_at_its_first_message(conn, peer):
    conn.recv()
    os._exit(139)  # as the H200 run's torch.compile peer did: a segfault, no Python traceback


def numpy_peer_that_dies_when_timed(conn, peer):
    """The numpy peer (served by bench.peer_worker in a thread) until the first "time" message,
    at which the process dies."""
    mine, theirs = multiprocessing.Pipe()
    threading.Thread(target=bench.peer_worker, args=(theirs, "numpy"), daemon=True).start()
    while True:
        msg = conn.recv()
        if msg[0] == "time":
            os._exit(139)
        mine.send(msg)
        conn.send(mine.recv())


def test_a_peer_whose_process_dies_is_reported_not_waited_for():
    # start_peer closes our copy of the worker's end of the pipe, so a worker that dies closes
    # the pipe and peer_ask returns a str (the peer is not timed) instead of waiting forever, at
    # the message it died on and at every later one. Without the close, peer_ask would wait.
    conn, worker = bench.start_peer("numpy", target=dies_at_its_first_message)
    replies = []
    asking = threading.Thread(
        target=lambda: replies.extend(bench.peer_ask(conn, m, None) for m in ("check", "setup")), daemon=True
    )
    asking.start()
    asking.join(timeout=120)
    worker.join(timeout=10)
    assert not asking.is_alive(), "peer_ask waited on a dead peer"
    assert worker.exitcode == 139
    assert replies[0] == "the peer's process died (EOFError on its pipe)"
    assert replies[1].startswith("the peer's process died (")


def test_a_peer_that_dies_while_timed_is_dropped_and_the_run_goes_on(tmp_path, monkeypatch):
    # The compiled peer is most likely to die in its first timed calls (CUDA graphs record on a
    # later call than the first): the point is still timed for the JAX methods, the peer's error
    # is recorded, and the next point does not ask the dead peer again.
    start = bench.start_peer
    monkeypatch.setattr(bench, "start_peer", lambda peer: start(peer, target=numpy_peer_that_dies_when_timed))
    args = ["--batches", "2", "3", "--filters", "1", "--inputs", "8x8x1", "--kernels", "3", "--repeats", "2"]
    args += [
        "--min-sample-s",
        "0.001",
        "--peers",
        "numpy",
        "--skip-vmap-steps",
        "--quiet",
        "--out",
        str(tmp_path),
    ]
    bench.main(args)
    payload = json.loads((tmp_path / "bench.json").read_text())
    first, second = payload["results"]
    assert first["peer_errors"]["numpy"].startswith("the peer's process died (")
    assert first["peer_check_rel_error"]["numpy"] < bench.PEER_RTOL  # checked and set up; died timed
    assert "numpy" not in first["times"] and first["times"]["manual"]["n"] == 2
    assert "peer_check_rel_error" not in second and "numpy" not in second["times"]
    assert "numpy_process_max_rss_kb" not in payload["machine"]  # a dropped peer is not asked to stop


def test_an_empty_grid_writes_its_table(tmp_path):
    # A 7x7 kernel on a 5x5 input leaves no grid point.
    bench.main(["--no-peers", "--inputs", "5x5x1", "--kernels", "7", "--out", str(tmp_path), "--quiet"])
    assert "No grid points ran." in (tmp_path / "bench.md").read_text()
    assert json.loads((tmp_path / "bench.json").read_text())["results"] == []


def test_each_sample_follows_untimed_calls_of_its_own_method(tmp_path, monkeypatch):
    # Every JAX method's call(inner) is recorded with the method it calls: after calibration (a
    # warm-up call and one sample of one call, as min_sample_s is 0), each timed sample of one
    # call follows --warm-calls calls of the same method. The warm calls are made slow here, and
    # no sample includes them.
    record = []

    def recording(made):  # timed_calls, or timed_calls_into for the methods that reuse their output
        def recorded(fn, *args):
            call = made(fn, *args)

            def each(inner):
                record.append((fn, inner))
                if inner == 3:
                    time.sleep(0.05)
                return call(inner)

            return each

        return recorded

    monkeypatch.setattr(jaxbp.tune, "timed_calls", recording(jaxbp.tune.timed_calls))
    monkeypatch.setattr(jaxbp.tune, "timed_calls_into", recording(jaxbp.tune.timed_calls_into))
    args = ["--no-peers", "--batches", "2", "--filters", "1", "--inputs", "8x8x1", "--kernels", "3"]
    args += ["--repeats", "2", "--min-sample-s", "0", "--warm-calls", "3", "--quiet", "--out", str(tmp_path)]
    bench.main(args)
    payload = json.loads((tmp_path / "bench.json").read_text())
    assert payload["machine"]["warm_calls"] == 3
    times = payload["results"][0]["times"]
    methods = len(times) - 1  # all but the matmul
    assert [inner for _, inner in record[: 2 * methods]] == [1] * (2 * methods)  # calibration
    rounds = record[2 * methods :]
    assert len(rounds) == 2 * 2 * methods  # 2 rounds: a warm call and a sample per method
    for (warm_fn, warm), (fn, inner) in zip(rounds[::2], rounds[1::2]):
        assert (warm, inner) == (3, 1) and warm_fn is fn
    assert len({id(fn) for fn, _ in rounds}) == methods  # every method sampled
    assert all(t["median_ms"] < 25 for name, t in times.items() if name != "matmul")  # 50 ms warm calls
    assert "Each sample followed 3 untimed call(s) of its own method" in (tmp_path / "bench.md").read_text()
    # The per-example methods into the last call's memory: timed, checked against the fresh
    # ones, their ratios derived and counted as targets. The check is float32 (test_per_example
    # checks float64): at most 4.3e-7 relative over the 36 points of bench_amd_epyc_reuse.json,
    # so 1e-5 leaves a 23x margin.
    derived = payload["results"][0]["derived"]
    for key in ("per_ex_manual_reused_over_batch_grad", "per_ex_dW_write_reused_over_batch_grad"):
        assert derived[key] > 0
    assert derived["per_ex_autodiff_reused_over_manual_reused"] > 0
    assert set(payload["results"][0]["reused_rel_error"]) == set(bench.REUSED_METHODS)
    assert all(err < 1e-5 for err in payload["results"][0]["reused_rel_error"].values())
    # The floor: the batch gradient without dE/dW plus the reused write, over the batch gradient.
    t = {name: v["median_ms"] for name, v in times.items()}
    floor = (t["batch_forward"] + t["per_ex_dW_write_reused"]) / t["batch_grad"]
    assert derived["per_ex_floor_over_batch_grad"] == pytest.approx(floor, rel=1e-12)
    text = (tmp_path / "bench.md").read_text()
    assert "| reused pe/b | reused dW/b | reused ad/m | floor/b |" in text
    assert "- per-example within 1.2x of the batch gradient, into the last call's memory: " in text
    assert "- per-example within 1.2x (into the last call's memory) where the floor is: " in text
    with pytest.raises(SystemExit, match="--warm-calls must be 0 or more"):
        bench.main(["--no-peers", "--warm-calls", "-1", "--out", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()  # refused before anything was timed or written


bench_per_example = load_experiment("bench_per_example")


def test_per_example_bench_runs_end_to_end_and_checks_every_method(tmp_path):
    # Two small taps points, one sample each. The script checks every method against the shipped
    # per-example gradients before timing; 8x8 with 3x3 writes out 3 * 3 * 6 = 54 terms.
    args = ["--batches", "150", "250", "--inputs", "8x8x1", "--kernels", "3", "--filters", "1"]
    args += ["--repeats", "1", "--min-sample-s", "0.001", "--out", str(tmp_path)]
    bench_per_example.main(args)
    payload = json.loads((tmp_path / "bench_per_example.json").read_text())
    assert payload["command"].endswith("--min-sample-s 0.001 --out " + str(tmp_path))
    results = payload["results"]
    assert [(r["point"]["batch"], r["chunk"], r["unrolled_terms"], r["unrolled"]) for r in results] == [
        (150, 128, 54, True),
        (250, 128, 54, True),
    ]
    for r in results:
        assert set(r["times"]) == set(bench_per_example.METHODS) and r["check_rel_error"] < 1e-10
    text = (tmp_path / "bench_per_example.md").read_text()
    assert "| 8x8x1 | 3 | 1 | 250 | 128 | 54 |" in text
    assert payload["machine"]["warm_calls"] == 1 and "Each sample followed 1 untimed call(s)" in text


bench_per_example_reuse = load_experiment("bench_per_example_reuse")


def test_per_example_reuse_bench_runs_end_to_end_and_counts_faults(tmp_path):
    # Batch 150 of 10x10x1 with 8 filters: the working set's chunk (128) is timed beside the whole
    # batch, which the rule keeps (well under 32 MiB); one sample each.
    args = ["--batches", "150", "--inputs", "10x10x1", "--kernels", "3", "--filters", "8"]
    args += ["--repeats", "1", "--min-sample-s", "0.001", "--out", str(tmp_path)]
    bench_per_example_reuse.main(args)
    payload = json.loads((tmp_path / "bench_per_example_reuse.json").read_text())
    [r] = payload["results"]
    assert (r["chunk"], r["rule_chunk"], r["dW_bytes"]) == (128, None, 4 * 150 * 8 * 8 * 8 * 10)
    assert set(r["times"]) == set(bench_per_example_reuse.METHODS) and r["check_rel_error"] < 1e-10
    assert set(r["faults_per_call"]) == set(r["times"]) and all(v >= 0 for v in r["faults_per_call"].values())
    text = (tmp_path / "bench_per_example_reuse.md").read_text()
    assert "| 10x10x1 | 3 | 8 | 150 | 128 | whole | 3 |" in text  # 3 MB of dE/dW
    assert "the rule's pick at" in text


def test_generated_kernels_count_the_fusions_not_library_calls_or_copies():
    text = "\n".join(
        [
            "  %dot.1 = f32[2,2]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}",
            "  %add_fusion = f32[2,2]{1,0} fusion(%dot.1), kind=kLoop, calls=%fused_computation",
            "  %wrapped_broadcast = f32[10]{0} fusion(), kind=kLoop, calls=%wrapped_broadcast_computation",
            "  %conv = f32[1,2,2,1]{3,2,1,0} convolution(%x, %f), dim_labels=b01f_01io->b01f",
            "  %copy.1 = f32[] copy(%p)",
            "  %multi = (f32[3]{0}, f32[4,3]{1,0}) fusion(%a), kind=kLoop, calls=%fused_multi",
            "  %ynn_fusion = f32[2,2]{1,0} fusion(%a, %b), kind=kCustom, calls=%ynn_computation",
            "  ROOT %tuple = (f32[2,2]{1,0}) tuple(%add_fusion)",
        ]
    )
    assert bench.generated_kernels(text) == 3  # the two kLoop fusions and the multi-output one
    # A compiled step: the count is what XLA's optimized module holds, at least one kernel.
    spec = jaxbp.ConvNetSpec(in_shape=(6, 6, 1), n_filters=2, kernel_size=3, n_out=3)
    params = jaxbp.init_params(jax.random.key(0), spec)
    x, y = jnp.zeros((4, 6, 6, 1), jnp.float32), jnp.zeros((4, 3), jnp.float32)
    fn = jax.jit(lambda p, x, y: jaxbp.manual_value_and_grads(p, x, y, spec))
    stats, compiled = bench.compile_stats(fn, (params, x, y))
    assert stats["kernels"] == bench.generated_kernels(compiled.as_text()) >= 1
    # The compile time is its three parts: JAX's trace, JAX's lowering, XLA's compile.
    parts = [stats[k] for k in ("trace_s", "lower_s", "xla_s")]
    assert min(parts) > 0 and abs(sum(parts) - stats["compile_s"]) < 1e-6


def test_compile_target_is_split_by_the_kernels_each_step_generates():
    def result(manual_kernels, autodiff_kernels, ratio):
        compile_ = {"manual": {"compile_s": ratio, "kernels": manual_kernels}}
        compile_["autodiff"] = {"compile_s": 1.0, "kernels": autodiff_kernels}
        return {"compile": compile_, "derived": {"compile_manual_over_autodiff": ratio}}

    results = [result(10, 13, 0.9), result(12, 13, 1.1), result(26, 13, 2.0), result(20, 10, 1.5)]
    lines = bench.compile_by_kernels(results)
    assert lines[0].endswith("at most as many kernels as jax.grad's: 1 of 2 (median 1.00, range 0.90-1.10)")
    assert lines[1].endswith("more kernels than jax.grad's: 0 of 2 (median 1.75, range 1.50-2.00)")
    assert lines[2].endswith("median 1.46, range 0.77-2.00")
    # Results from before the kernels were counted (--render of an old JSON) give no lines.
    assert bench.compile_by_kernels([{"compile": {"manual": {"compile_s": 1.0}}}]) == []
    # With the compile time's parts recorded, their medians over the points, each step's.
    for i, r in enumerate(results):
        r["compile"]["manual"] |= {"trace_s": 0.01 * i, "lower_s": 0.02, "xla_s": 0.3 + 0.1 * i}
        r["compile"]["autodiff"] |= {"trace_s": 0.04, "lower_s": 0.05, "xla_s": 0.2}
    split = [line for line in bench.compile_by_kernels(results) if "where the compile time goes" in line]
    assert split == [
        "- where the compile time goes, medians over the points (JAX's trace + JAX's lowering + XLA's "
        "compile): manual 0.015 + 0.020 + 0.450 s, jax.grad 0.040 + 0.050 + 0.200 s"
    ]
    assert not any("where the compile time goes" in line for line in lines)  # without the parts


def test_compile_fit_is_the_least_squares_line_over_both_steps_and_is_plotted(tmp_path):
    # Compile times exactly 0.1 s + 20 ms per kernel: the fit recovers the line, r = 1.
    def result(manual_kernels, autodiff_kernels):
        compile_ = {
            name: {"kernels": k, "compile_s": 0.1 + 0.02 * k}
            for name, k in (("manual", manual_kernels), ("autodiff", autodiff_kernels))
        }
        return {"compile": compile_, "derived": {"compile_manual_over_autodiff": 1.0}}

    results = [result(26, 13), result(10, 10), result(18, 13)]
    fit = bench.compile_fit(results)
    assert fit["n"] == 6 and abs(fit["slope_s"] - 0.02) < 1e-12 and abs(fit["intercept_s"] - 0.1) < 1e-12
    assert abs(fit["r"] - 1) < 1e-12
    assert bench.compile_by_kernels(results)[-1].endswith("0.100 s + 20.0 ms per kernel (correlation 1.00)")
    bench.plot_compile(tmp_path / "grid", results)
    assert (tmp_path / "grid_compile.png").read_bytes()[:4] == b"\x89PNG"
    # One kernel count only: no line to fit, and no plot.
    assert bench.compile_fit([result(10, 10)]) is None
    bench.plot_compile(tmp_path / "flat", [result(10, 10)])
    assert not (tmp_path / "flat_compile.png").exists()


def test_torch_peers_compute_the_manual_gradients_eager_and_compiled_float64():
    # The eager and the torch.compile'd PyTorch step (TorchInductor on the CPU) give jaxbp's
    # manual gradients in float64 (the check bench.py runs before timing a peer), and the
    # compiled step times. Skipped without PyTorch (the bench extra).
    pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    spec = jaxbp.ConvNetSpec(in_shape=(5, 5, 1), n_filters=2, kernel_size=3, n_out=10)
    f, W, b = rng.normal(size=(3, 3, 1, 2)), rng.normal(size=(18, 10)), rng.normal(size=10)
    x, y = rng.normal(size=(2, 5, 5, 1)), rng.uniform(size=(2, 10))
    params = jaxbp.Params(*(jnp.asarray(a) for a in (f, W, b)))
    ref = jaxbp.manual_grads(params, jnp.asarray(x), jnp.asarray(y), spec)
    for peer in ("torch", "torch_compile"):
        parent, child = multiprocessing.Pipe()
        worker = threading.Thread(target=bench.peer_worker, args=(child, peer), daemon=True)
        worker.start()
        replies = []
        for msg in (("versions", ("cpu", None)), ("check", (f, W, b, x, y)), ("setup", (f, W, b, x, y))):
            parent.send(msg)
            assert parent.poll(300), f"{peer}: no reply to {msg[0]}"
            replies.append(parent.recv())
        parent.send(("time", 2))
        assert parent.poll(300) and parent.recv() > 0
        parent.send(("stop", None))
        parent.recv()
        worker.join(timeout=10)
        (available, info), grads, ready = replies
        assert available and "torch" in info and info.get("torch_threads", 0) >= 1
        assert info.get("torch_compile_mode") == ("default" if peer == "torch_compile" else None)
        assert max(bench.rel_error(g, r) for g, r in zip(grads, ref)) < bench.PEER_RTOL, peer
        assert ready is True


def test_torch_under_cuda_graphs_marks_each_step_and_keeps_the_update_eager(monkeypatch):
    # "reduce-overhead" (the GPU's mode): the compiled update mutated its inputs, and the H200 run
    # died at the first step, so the update stays eager there and each step starts a new
    # CUDA-graph step. On the CPU the same mode compiles without graphs: the bookkeeping is
    # checked here, the GPU behaviour only on a GPU.
    torch = pytest.importorskip("torch")
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    rng = np.random.default_rng(0)
    f, W, b = rng.normal(size=(3, 3, 1, 2)), rng.normal(size=(18, 10)), rng.normal(size=10)
    x, y = rng.normal(size=(2, 5, 5, 1)), rng.uniform(size=(2, 10))
    # Copies for each: a contiguous array reaches torch without a copy, and the steps update it.
    net = bench.TorchNet(torch, *(a.copy() for a in (f, W, b, x, y)), "cpu", "reduce-overhead")
    eager = bench.TorchNet(torch, *(a.copy() for a in (f, W, b, x, y)), "cpu")
    assert net.update == net.eager_update
    for _ in range(2):
        net.step()
        eager.step()
    assert len(marks) == 2
    # The update itself: one step moves each param by -LEARNING_RATE times its gradient (float64;
    # measured within 2.8e-17).
    fresh = bench.TorchNet(torch, *(a.copy() for a in (f, W, b, x, y)), "cpu")
    fresh.value_and_grads()
    before = [p.detach().clone() for p in (fresh.f, fresh.W, fresh.b)]
    grads = [p.grad.clone() for p in (fresh.f, fresh.W, fresh.b)]
    fresh.update((fresh.f, fresh.W, fresh.b), grads)
    for p, p0, g in zip((fresh.f, fresh.W, fresh.b), before, grads):
        assert torch.allclose(p, p0 - bench.LEARNING_RATE * g, rtol=1e-15, atol=1e-15)
    # The same float64 params as eager PyTorch's after two steps (measured 2.4e-17 relative; the
    # compiled kernels may sum in another order).
    for p, q in zip((net.f, net.W, net.b), (eager.f, eager.W, eager.b)):
        assert torch.allclose(p, q, rtol=1e-12, atol=0)


def test_probe_torch_compile_times_each_phase():
    pytest.importorskip("torch")
    import subprocess
    import sys

    script = ROOT / "experiments" / "probe_torch_compile.py"
    args = ["eager", "float64", "cpu", "--batch", "2", "--filters", "1", "--calls", "3", "5"]
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "building eager float64 cpu" in lines[1] and "call 3:" in lines[5]
    assert "3 calls:" in lines[-2] and "5 calls:" in lines[-1] and float(lines[-1].split()[-4]) > 0


def test_slower_points_are_split_by_whether_their_quartiles_are_apart():
    def t(median, q1, q3):
        return {"median_ms": median, "q1_ms": q1, "q3_ms": q3}

    def point(batch, manual, torch=None):
        times = {"manual": manual, **({"torch": torch} if torch else {})}
        return {"point": {"batch": batch, "input": [28, 28, 1], "kernel": 5, "filters": 8}, "times": times}

    results = [
        point(1, t(1.0, 0.9, 1.1), t(2.0, 1.9, 2.1)),  # manual faster
        point(2, t(2.0, 1.8, 2.2), t(1.9, 1.7, 2.1)),  # slower, the quartiles overlap
        point(3, t(3.0, 2.9, 3.1), t(2.0, 1.9, 2.1)),  # slower, apart
        point(4, t(1.0, 0.9, 1.1)),  # PyTorch not timed
    ]
    line = bench.slower_apart(results, "torch")
    assert line.startswith("- manual slower than PyTorch (medians): 2 of 3 points;")
    assert line.endswith("at 1 (3, 28x28x1, k 5, K 8: 3 [2.9-3.1] against 2 [1.9-2.1] ms)")
    assert bench.slower_apart(results, "autodiff") is None
    assert bench.slower_apart(results[:1], "torch").endswith("at 0")


def test_torch_compile_table_only_where_that_peer_ran():
    timing = {"median_ms": 2.0, "q1_ms": 1.9, "q3_ms": 2.1}
    point = {"batch": 32, "input": [28, 28, 1], "kernel": 5, "filters": 8}
    plain = {"point": point, "times": {"manual": timing}, "derived": {}}
    assert bench.torch_compile_table([plain], {}) == []
    times = {
        "manual": timing,
        "torch": {**timing, "median_ms": 3.0},
        "torch_compile": {**timing, "median_ms": 1.0},
    }
    ran = {
        "point": point,
        "times": times,
        "derived": {"torch_over_manual": 1.5, "torch_compile_over_manual": 0.5},
    }
    lines = bench.torch_compile_table([ran], {"torch_compile_mode": "reduce-overhead"})
    assert "mode 'reduce-overhead'" in lines[1] and "Manual faster at 0 of 1 points" in lines[1]
    assert lines[-1] == "| 32 | 28x28x1 | 5 | 8 | 2 | 3 | 1 | 1.50 | 0.50 |"


def test_a_compiled_peer_that_fails_replies_its_error(monkeypatch):
    # torch.compile failing (e.g. no C compiler on the machine) must not take the benchmark down:
    # the worker prints the traceback and replies the error's repr, at the check and at the
    # setup's first step, and bench.py does not time that peer.
    torch = pytest.importorskip("torch")

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(torch, "compile", broken)
    rng = np.random.default_rng(0)
    f, W, b = rng.normal(size=(3, 3, 1, 2)), rng.normal(size=(18, 10)), rng.normal(size=10)
    x, y = rng.normal(size=(2, 5, 5, 1)), rng.uniform(size=(2, 10))
    parent, child = multiprocessing.Pipe()
    worker = threading.Thread(target=bench.peer_worker, args=(child, "torch_compile"), daemon=True)
    worker.start()
    replies = []
    for msg in (("versions", ("cpu", None)), ("check", (f, W, b, x, y)), ("setup", (f, W, b, x, y))):
        parent.send(msg)
        assert parent.poll(60)
        replies.append(parent.recv())
    assert replies[1] == replies[2] == "RuntimeError('no compiler')"
    parent.send(("stop", None))
    parent.recv()
    worker.join(timeout=10)


def test_per_example_bench_refuses_a_point_without_the_taps_before_timing_any(tmp_path):
    # 2 filters take the Toeplitz forward: the script stops before the one-filter point is timed.
    args = ["--batches", "4", "--inputs", "8x8x1", "--kernels", "3", "--filters", "1", "2"]
    with pytest.raises(SystemExit, match="2 filters: the per-example forward on cpu is toeplitz"):
        bench_per_example.main(args + ["--repeats", "1", "--out", str(tmp_path)])
    assert not (tmp_path / "bench_per_example.json").exists()


def test_chunks_set_the_chunks_the_pick_is_also_timed_at(tmp_path):
    spec = jaxbp.ConvNetSpec(in_shape=(8, 8, 1), kernel_size=(3, 3), n_filters=8, n_out=10)
    chosen = formulations.Formulation("patches", "patches", 32)
    names = bench.jax_methods(jax, jaxbp, spec, chosen, 256, forms=("patches",), chunks=(16, 64))
    timed = sorted(n for n in names if n.startswith("manual["))
    assert timed == [f"manual[patches/patches/{c}]" for c in ("16", "32", "64", "all")]
    # with XLA's conv among the forms, also jax.grad's own program: both convs XLA's, whole, one part
    names = bench.jax_methods(jax, jaxbp, spec, chosen, 256, forms=("patches", "conv"), chunks=())
    assert "manual[conv/conv/all]" in names and "manual[conv/conv*4/32]" in names
    for args, message in (
        (["--chunks", "16"], "--chunks only applies with --formulations"),
        (["--chunks", "8", "32", "128"], "--chunks only applies with --formulations"),  # the default
        (["--formulations", "--chunks", "16", "0"], "--chunks must be positive"),
    ):
        with pytest.raises(SystemExit, match=message):
            bench.main(args + ["--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # refused before anything was timed or written


def test_numpy_peer_saturates_without_an_overflow_warning():
    # z = -3600 at the output: exp(-z) overflows to inf and the sigmoid is exactly its limit, 0.
    f = np.full((3, 3, 1, 2), 50.0, np.float32)
    W = np.full((2 * 6 * 6, 10), -50.0, np.float32)
    x, y = np.ones((2, 8, 8, 1), np.float32), np.zeros((2, 10), np.float32)
    with np.errstate(over="raise"):  # what the peer does not silence would raise here
        E, grads = bench.numpy_value_and_grads(f, W, np.zeros(10, np.float32), x, y)
    assert E == 0.0
    assert all(np.all(g == 0) for g in grads)


def test_machine_line_names_the_caches_and_simd_where_recorded():
    info = {"cpu_caches": "L1d 32K, L2 512K", "cpu_simd": "avx2 fma"}
    assert bench.cpu_text(info) == " (L1d 32K, L2 512K; avx2 fma)"
    assert bench.cpu_text({"cpu_caches": "", "cpu_simd": "avx2"}) == " (avx2)"
    info["cpu_model"] = "AuthenticAMD family 23 model 49"
    assert bench.cpu_text(info) == " (L1d 32K, L2 512K; avx2 fma; AuthenticAMD family 23 model 49)"
    assert bench.cpu_text({}) == ""  # a run recorded before them renders as it did
    # The small scripts' Machine line names them too: four CPUs here have been "AMD EPYC".
    line = bench.machine_line(
        {**info, "cpu": "AMD EPYC", "load_average": [0.5], "jax": "0", "jaxlib": "0"}
        | {"git_commit": "abc", "date_utc": "today", "cores": 2}
    )
    assert line.startswith(
        "Machine: AMD EPYC (L1d 32K, L2 512K; avx2 fma; AuthenticAMD family 23 model 49), "
    )


def test_tune_times_the_tuned_pick_beside_the_rules_step(tmp_path):
    args = ["--batches", "2", "4", "--filters", "8", "--inputs", "8x8x1", "--kernels", "3", "--repeats", "2"]
    args += ["--min-sample-s", "0.001", "--no-peers", "--skip-vmap-steps", "--quiet", "--tune"]
    bench.main(args + ["--out", str(tmp_path)])
    payload = json.loads((tmp_path / "bench.json").read_text())
    text = (tmp_path / "bench.md").read_text()
    for r in payload["results"]:
        tune, t, d = r["tuning"], r["times"], r["derived"]
        assert tune["rule"] == r["chosen_formulation"] and tune["best"] in tune["times_ms"]
        assert tune["seconds"] >= sum(tune["compile_s"].values())
        # The pick is timed again in the grid's rounds unless it is the rule's (the manual step).
        tuned = t["manual_tuned"] if tune["best"] != tune["rule"] else t["manual"]
        assert ("manual_tuned" in t) == (tune["best"] != tune["rule"]) and tuned["n"] == 2
        assert d["autodiff_over_tuned"] == pytest.approx(t["autodiff"]["median_ms"] / tuned["median_ms"])
        if "manual_tuned" in t:
            assert d["manual_over_tuned"] == pytest.approx(t["manual"]["median_ms"] / tuned["median_ms"])
        else:
            assert "manual_over_tuned" not in d
        p = r["point"]
        assert f"| {p['batch']} | 8x8x1 | 3 | 8 | {tune['rule']} | {tune['best']} |" in text
    assert "- the tuned manual step (--tune) at least as fast as jax.grad: " in text
    assert "picked another formulation than the rule at " in text


bench_compile_sigmoid = load_experiment("bench_compile_sigmoid")


def test_compile_sigmoid_bench_runs_end_to_end_and_times_with_and_without_the_barrier(tmp_path):
    # One compile each, small arrays: every width and op timed, every point's batch gradient
    # compiled with and without the barrier, and the taps point (no barrier there) named as such.
    args = ["--numbers", "1024", "--repeats", "1", "--out", str(tmp_path)]
    bench_compile_sigmoid.main(args)
    payload = json.loads((tmp_path / "bench_compile_sigmoid.json").read_text())
    widths = payload["results"]["widths"]
    assert [w["width"] for w in widths] == list(bench_compile_sigmoid.WIDTHS)
    assert all(w[k] > 0 for w in widths for k in ("sigmoid", "tanh", "exp"))
    steps = payload["results"]["steps"]
    assert [s["formulation"].split("/")[0] for s in steps] == ["toeplitz", "toeplitz", "patches", "taps"]
    # The barrier is in the shipped step where the forward is a product, and gone when patched out.
    assert [(s["shipped_barriers"] > 0, s["no_barrier_barriers"]) for s in steps] == [
        (True, 0),
        (True, 0),
        (True, 0),
        (False, 0),
    ]
    assert "| 256 | 28x28x1 | 3 | 1 | taps/" in (tmp_path / "bench_compile_sigmoid.md").read_text()


bench_tap_products = load_experiment("bench_tap_products")


def test_tap_products_bench_runs_end_to_end_and_times_both_forms(tmp_path):
    # Small inputs, one sample and one compile each: both forms at a channel count below the
    # threshold and one above it, each step timed as labelled (the products' one more matmul,
    # U), and the forms' updates (the batch-minor layout's too) within float32 rounding of each
    # other.
    # Batch 130 runs in chunks of 128 and a remainder: the rule's batch-minor layout, against
    # which the channels-last forms are set explicitly.
    args = ["--channels", "2", "3", "--batches", "4", "130", "--kernels", "3", "--size", "8"]
    args += ["--repeats", "1", "--compile-repeats", "1", "--min-sample-s", "0.001", "--out", str(tmp_path)]
    bench_tap_products.main(args)
    payload = json.loads((tmp_path / "bench_tap_products.json").read_text())
    results = payload["results"]
    assert [(r["point"]["input"][2], r["point"]["batch"]) for r in results] == [
        (2, 4),
        (2, 130),
        (3, 4),
        (3, 130),
    ]
    assert [r["formulation"] for r in results][:2] == ["taps/conv*4/all", "taps(batch_minor)/conv*4/128"]
    for r in results:
        assert r["formulation"].startswith("taps")
        bodies = 2 if r["point"]["batch"] == 130 else 1  # chunks of 128 and a remainder of 2
        assert r["matmuls"]["products"] == r["matmuls"]["per_channel"] + bodies
        assert set(r["times"]) == {"products", "per_channel", "batch_minor", "autodiff"}
        assert all(t["median_ms"] > 0 for t in r["times"].values())
        assert all(s > 0 for s in r["compile_s"].values())
        assert r["params_rel_diff"] < 1e-5  # float32: measured 9.0e-8 to 2.1e-7 in the committed run
    text = (tmp_path / "bench_tap_products.md").read_text()
    assert "| 4 | 8x8x3 | 3 | taps/" in text and "Products faster than per_channel at " in text
    assert "| 130 | 8x8x3 | 3 | taps(batch_minor)/" in text
    assert payload["machine"]["warm_calls"] == 1 and "Each sample followed 1 untimed call(s)" in text


bench_w_delta2 = load_experiment("bench_w_delta2")


def test_w_delta2_bench_runs_end_to_end_and_times_both_sides(tmp_path, monkeypatch):
    # Small inputs, one sample and one compile each: the matmul and the products at a point whose
    # dE/df is XLA's conv (32 filters; the rule's products on a CPU without AVX-512, the Zen 2's
    # SIMD pinned here so that the rule column has both sides) and one whose is not (8 filters), in
    # chunks with a remainder (batch 130) and whole; each program as labelled (one W delta2
    # matmul less per chunk body with the products) and the two gradients within float32 rounding.
    # One filter on 3 channels in chunks is the batch-minor layout, skipped.
    monkeypatch.setattr(machine, "simd_flags", lambda root="/": ZEN2_SIMD)
    args = ["--inputs", "8x8x3", "--filters", "1", "8", "32", "--batches", "4", "130", "--kernels", "3"]
    args += ["--repeats", "1", "--compile-repeats", "1", "--min-sample-s", "0.001", "--out", str(tmp_path)]
    bench_w_delta2.main(args)
    payload = json.loads((tmp_path / "bench_w_delta2.json").read_text())
    timed = [r for r in payload["results"] if "skipped" not in r]
    skipped = [r for r in payload["results"] if "skipped" in r]
    assert [(r["point"]["batch"], r["point"]["filters"]) for r in skipped] == [(130, 1)]
    assert [(r["point"]["batch"], r["point"]["filters"]) for r in timed] == [
        (4, 1),
        (4, 8),
        (4, 32),
        (130, 8),
        (130, 32),
    ]
    for r in timed:
        forward, filter_grad = r["formulation"].split("/")[:2]
        assert r["rule_terms"] == (filter_grad.startswith("conv") and forward in ("patches", "toeplitz"))
        bodies = 2 if r["point"]["batch"] == 130 else 1
        assert r["matmuls"]["terms"] == r["matmuls"]["dot"] - bodies
        assert set(r["times"]) == {"terms", "dot"} and all(t["median_ms"] > 0 for t in r["times"].values())
        assert all(s > 0 for s in r["compile_s"].values())
        assert 0 <= r["grads_rel_diff"] <= bench_w_delta2.GRAD_RTOL  # else the run would have stopped
    assert any(r["rule_terms"] for r in timed) and not all(r["rule_terms"] for r in timed)
    text = (tmp_path / "bench_w_delta2.md").read_text()
    assert "| 130 | 8x8x3 | 3 | 32 |" in text and "Skipped (the batch-minor layout" in text
    # The gradients' check stops a run: with no difference allowed, float32's reordered sums fail it.
    monkeypatch.setattr(bench_w_delta2, "GRAD_RTOL", -1.0)
    with pytest.raises(AssertionError, match="gradients differ"):
        bench_w_delta2.main([*args[:2], "--filters", "32", "--batches", "4", *args[9:]])
    with pytest.raises(SystemExit):
        bench_w_delta2.main(["--batches", "1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        bench_w_delta2.main(["--inputs", "8x8", "--out", str(tmp_path)])


def test_cores_with_render_is_refused_before_anything_is_pinned(tmp_path):
    before = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    with pytest.raises(SystemExit, match="--cores has no effect with --render"):
        bench.main(["--cores", "1", "--render", str(tmp_path / "bench.json")])
    if before is not None:
        assert os.sched_getaffinity(0) == before


@pytest.mark.skipif(
    not CoreRoundTrip.available(), reason="a round trip between cores needs Linux and 2 usable cores"
)
def test_each_point_records_the_cores_round_trip_before_and_after_it(tmp_path):
    args = ["--batches", "2", "3", "--filters", "1", "--inputs", "8x8x1", "--kernels", "3", "--repeats", "1"]
    bench.main(
        args
        + ["--min-sample-s", "0.001", "--no-peers", "--skip-vmap-steps", "--quiet", "--out", str(tmp_path)]
    )
    payload = json.loads((tmp_path / "bench.json").read_text())
    assert payload["machine"]["core_round_trip_cores"] == sorted(os.sched_getaffinity(0))[:2]
    table = (tmp_path / "bench.md").read_text()
    for result in payload["results"]:
        before, after = result["core_round_trip_ns"]
        assert 10 < before < 1e6 and 10 < after < 1e6
        assert table.count(f"| {before:.0f}/{after:.0f} |") >= 1
    assert bench.round_trip_text({}) == "-"  # a run recorded before, or on one core


def test_cores_text_says_when_the_run_was_pinned_to_fewer_cores_than_the_machine_has():
    assert bench.cores_text({"cores": 2, "machine_cores": 2}) == "2 cores"
    assert bench.cores_text({"cores": 1, "machine_cores": 2}) == "1 of 2 cores (pinned)"
    assert bench.cores_text({"cores": 2}) == "2 cores"  # a run recorded before --cores
    assert bench.cores_text({"cores": 1, "machine_cores": 1}) == "1 core"
    # bench_filter_grad.py's results before: the machine's count as "cores", the pinned as "cores_used"
    assert bench.cores_text({"cores": 2, "cores_used": 1}) == "1 of 2 cores (pinned)"


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="pinning needs Linux, and 2 usable cores to show",
)
def test_cores_pins_the_benchmark_and_its_record_says_so(tmp_path):
    # In a subprocess: pinning this test process would pin the rest of the run.
    script = str(pathlib.Path(bench.__file__))
    args = ["--batches", "2", "--filters", "1", "--inputs", "8x8x1", "--kernels", "3", "--repeats", "1"]
    args += ["--min-sample-s", "0.001", "--no-peers", "--skip-vmap-steps", "--quiet", "--out", str(tmp_path)]
    run = subprocess.run([sys.executable, script, *args, "--cores", "1"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    machine = json.loads((tmp_path / "bench.json").read_text())["machine"]
    assert machine["cores"] == 1 and machine["machine_cores"] == os.cpu_count()
    assert bench.cores_text(machine) in (tmp_path / "bench.md").read_text()
    # One core: no round trip between cores to time, and the table says so.
    (result,) = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert "core_round_trip_ns" not in result and "core_round_trip_cores" not in machine
    (row,) = [
        line for line in (tmp_path / "bench.md").read_text().splitlines() if line.startswith("| 2 | 8x8x1")
    ]
    assert row.endswith("| - |")
    usable = len(os.sched_getaffinity(0))
    too_many = [sys.executable, script, *args, "--cores", str(usable + 1)]
    bad = subprocess.run(too_many, capture_output=True, text=True)
    assert bad.returncode != 0
    assert f"--cores must be an int between 1 and {usable} (the usable cores), got {usable + 1}" in bad.stderr


probe_core_phases = load_experiment("probe_core_phases")


def test_core_phases_summary_splits_rounds_at_the_round_trips_midpoint():
    # Two levels of round trip; the step twice as slow at the higher one, PyTorch not at all.
    rounds = [
        {"round_trip_ns": ns, "manual_ms": 2.0 if ns < 700 else 4.0, "torch_ms": 3.0 + 0.01 * (i % 2)}
        for i, ns in enumerate([550, 560, 570, 540, 1000, 1010, 990, 1020, 555, 1005])
    ]
    s = probe_core_phases.summarize(rounds, ["manual", "torch"])
    assert s["rounds"] == 10 and s["far_rounds"] == 5
    assert 560 < s["cut_ns"] < 1000
    assert s["near_round_trip_ns"] == 555 and s["far_round_trip_ns"] == 1005
    assert s["manual"]["near_ms"] == 2.0 and s["manual"]["far_ms"] == 4.0
    assert s["manual"]["far_over_near"] == 2.0
    assert s["manual"]["corr_with_round_trip"] > 0.99
    assert s["torch"]["far_over_near"] == pytest.approx(1.0, abs=0.01)
    # A cut given: the same for every run, so that runs compare (here 3 rounds above 1000 ns).
    given = probe_core_phases.summarize(rounds, ["manual"], cut_ns=1000)
    assert given["cut_ns"] == 1000 and given["cut_given"] and given["far_rounds"] == 3
    assert not s["cut_given"]


@pytest.mark.skipif(
    not CoreRoundTrip.available(), reason="a round trip between cores needs Linux and 2 usable cores"
)
def test_core_phases_probe_runs_end_to_end(tmp_path):
    probe_core_phases.main(["--point", "4:8x8x1:3:2", "--seconds", "1", "--no-torch", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "probe_core_phases.json").read_text())
    (r,) = payload["results"]
    assert r["summary"]["rounds"] == len(r["rounds"]) >= 2
    assert all(10 < row["round_trip_ns"] < 1e6 and row["manual_ms"] > 0 for row in r["rounds"])
    assert "torch_ms" not in r["rounds"][0]
    text = (tmp_path / "probe_core_phases.md").read_text()
    assert "| manual (jaxbp) |" in text and "| jax.grad |" in text and "| PyTorch" not in text
    assert (tmp_path / "probe_core_phases.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        probe_core_phases.main(["--seconds", "0", "--out", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()


probe_kernel_compile = load_experiment("probe_kernel_compile")

# Lines of XLA's CPU compile log in its format (jaxlib 0.10.2; the timers' cumulative tails cut), two
# kernels on two threads.
KERNEL_LOG = """\
I1204 16:36:48.313989 53 cpu_compiler.cc:1269] Running HLO passes on [jit_step] for CPU time: 1.09 ms (1087 us)
I1204 16:36:48.314053 53 cpu_compiler.cc:2091] Compiling: jit_step
I1204 16:36:48.344678 58 fusion_compiler.cc:491] Compiling MLIR module: copy_fusion.1_kernel_module, with 28 ops
I1204 16:36:48.345000 59 fusion_compiler.cc:491] Compiling MLIR module: __compute_module_wrapped_add, with 4 ops
I1204 16:36:48.350176 58 fusion_compiler.cc:494] Compiled MLIR module: copy_fusion.1_kernel_module time: 5.46 ms (5462 us)
I1204 16:36:48.354678 59 fusion_compiler.cc:494] Compiled MLIR module: __compute_module_wrapped_add time: 9.68 ms (9678 us)
I1204 16:36:48.361097 53 cpu_compiler.cc:2154] Compilation finished
I1204 16:36:48.361196 53 cpu_compiler.cc:2094] Compiling [jit_step] for CPU using JIT time: 47.2 ms (47207 us)
"""  # noqa: E501


def test_kernel_compile_log_is_read_kernel_by_kernel():
    c = probe_kernel_compile.parse_compile(["some other line", *KERNEL_LOG.splitlines()])
    assert c["kernels"] == {"copy_fusion.1": 5.462, "wrapped_add": 9.678}
    assert c["hlo_passes_ms"] == 1.087 and c["xla_ms"] == 47.207
    assert c["emit_span_ms"] == pytest.approx(354.678 - 344.678)  # first start to last end
    assert c["after_emit_ms"] == pytest.approx(361.097 - 354.678)
    with pytest.raises(RuntimeError, match="was the log on"):
        probe_kernel_compile.parse_compile(KERNEL_LOG.splitlines()[:-1])
    with pytest.raises(RuntimeError, match="another program compiled there"):
        probe_kernel_compile.parse_compile(KERNEL_LOG.splitlines() * 2)
    # A line as XLA writes it, with the timer's cumulative tail.
    whole = (
        "I1204 16:36:48.361196    5853 cpu_compiler.cc:2094] Compiling [jit_step] for CPU using JIT time: "
        "47.2 ms (47207 us) (cumulative: 30.6 ms, max: 24.2 ms, #called: 2)"
    )
    assert probe_kernel_compile.parse_compile([*KERNEL_LOG.splitlines()[:-1], whole])["xla_ms"] == 47.207
    # A compile across midnight: times after it count from the day before.
    late = [line.replace("I1204 16:36:48", "I1204 23:59:59") for line in KERNEL_LOG.splitlines()]
    late[5] = late[5].replace("23:59:59.354678", "00:00:00.004678")
    assert probe_kernel_compile.parse_compile(late)["emit_span_ms"] == pytest.approx(1004.678 - 344.678)
    mark = probe_kernel_compile.MARK
    log = f"noise\n{mark} begin manual 0\n{KERNEL_LOG}{mark} end manual 0\nI1204 unrelated\n"
    compiles = probe_kernel_compile.parse_log(log)
    assert len(compiles["manual"]) == 1 and compiles["autodiff"] == []
    second = {**compiles["manual"][0], "kernels": {"copy_fusion.1": 5.0}}  # a repeat without wrapped_add
    s = probe_kernel_compile.summarize(
        {"manual": [compiles["manual"][0], second]}, {"manual": {"copy_fusion.1": "f32[4]", "other": "f32[]"}}
    )["manual"]
    assert [k["name"] for k in s["kernels"]] == ["wrapped_add", "copy_fusion.1"]  # by median ms
    assert s["kernels"][1]["ms"] == pytest.approx((5.462 + 5.0) / 2)
    assert s["kernel_sum_ms"] == pytest.approx((15.14 + 5.0) / 2) and s["compiles"] == 2
    assert s["in_log_not_hlo"] == ["wrapped_add"] and s["in_hlo_not_log"] == ["other"]


def test_kernel_compile_probe_finds_every_generated_kernel_in_xlas_log(tmp_path):
    probe_kernel_compile.main(["--point", "4:8x8x1:3:2", "--repeats", "1", "--out", str(tmp_path)])
    (r,) = json.loads((tmp_path / "probe_kernel_compile.json").read_text())["results"]
    for grads in ("manual", "autodiff"):
        s = r["steps"][grads]
        # The log names each fusion of the optimized HLO, and nothing else.
        assert s["in_log_not_hlo"] == [] and s["in_hlo_not_log"] == []
        assert s["kernels"] and all(k["ms"] > 0 and k["shape"] for k in s["kernels"])
        assert 0 < s["emit_span_ms"] < s["xla_ms"] and 0 < s["hlo_passes_ms"] < s["xla_ms"]
    text = (tmp_path / "probe_kernel_compile.md").read_text()
    assert "| manual |" in text and "| jax.grad |" in text
    assert (tmp_path / "probe_kernel_compile.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        probe_kernel_compile.main(["--repeats", "0", "--out", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()


bench_toeplitz_band = load_experiment("bench_toeplitz_band")


def test_toeplitz_band_bench_times_the_band_against_the_selection_it_replaced(tmp_path):
    spec = jaxbp.ConvNetSpec(
        in_shape=(6, 9, 2), n_filters=3, kernel_size=(2, 3), stride=(1, 2), dilation=(1, 2)
    )
    f = jax.random.normal(jax.random.key(0), spec.filter_shape)
    # The baseline is the band it replaced: the same T, and the same fold of either layout of dE/dT.
    np.testing.assert_array_equal(
        bench_toeplitz_band.band_by_selection(f, spec), conv_forms.toeplitz_band(f, spec)
    )
    jb, _, span = conv_forms.toeplitz_blocks(spec)
    for shape, axes in (((jb, 3, 2, span, 2), (0, 3)), ((2, span, 2, jb, 3), (3, 1))):
        G = jax.random.normal(jax.random.key(1), shape)
        np.testing.assert_allclose(
            bench_toeplitz_band.fold_by_selection(G, spec, *axes),
            conv_forms.fold_band(G, spec, *axes),
            rtol=1e-6,
            atol=1e-6,  # float32 sums of jb = 3 numbers of about 1, in another order
        )
    bench_toeplitz_band.main(
        ["--batches", "1", "16", "--filters", "1", "8", "--kernels", "5", "--repeats", "2", "--compiles", "1"]
        + ["--per-example", "--out", str(tmp_path)]
    )
    results = json.loads((tmp_path / "bench_toeplitz_band.json").read_text())["results"]
    # The Toeplitz form at batch 1 for one filter on 3 channels (dE/df after the taps) and from
    # batch 16 on for 8 filters with 5x5 (both convolutions); the per-example gradients only there.
    labels = {
        (r["point"]["batch"], tuple(r["point"]["input"]), r["point"]["filters"]): r["rule"] for r in results
    }
    assert labels == {
        (1, (32, 32, 3), 1): "taps/toeplitz/all",
        (16, (28, 28, 1), 8): "toeplitz/toeplitz/all",
        (16, (32, 32, 3), 8): "toeplitz/toeplitz/all",
    }
    for r in results:
        timed = {"selection", "band"} | (
            {"per_ex_selection", "per_ex_band"} if r["point"]["batch"] > 1 else set()
        )
        assert set(r["median_ms"]) == timed and all(v > 0 for v in r["median_ms"].values())
        assert (r["per_example_form"] is None) == (r["point"]["batch"] == 1)
        # T and the fold as pads and slices: fewer kernels than the selection's dots and copies.
        assert r["kernels"]["band"] < r["kernels"]["selection"]
        # The same multiplies and adds: 0 apart (the same to the bit) at every point of
        # experiments/results/bench_toeplitz_band.md with jaxlib 0.10.2. Another XLA may add a
        # filter entry's jb = 4 band terms in another order: float32 rounding, at most 3 eps =
        # 3.6e-7 of the gradient's terms, less in the new params.
        assert r["update_rel_diff"] <= 1e-6
        assert r["per_example_rel_diff"] is None or r["per_example_rel_diff"] <= 1e-6
    assert (
        "| 16 | 32x32x3 | 5 | 8 | toeplitz/toeplitz/all |"
        in (tmp_path / "bench_toeplitz_band.md").read_text()
    )
    with pytest.raises(SystemExit):
        bench_toeplitz_band.main(["--repeats", "1", "--out", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()


bench_conv_parts = load_experiment("bench_conv_parts")


def test_conv_parts_bench_times_both_splits_of_the_rules_conv(tmp_path):
    bench_conv_parts.main(
        ["--batches", "8", "--filters", "1", "--repeats", "2", "--compiles", "1", "--out", str(tmp_path)]
    )
    results = json.loads((tmp_path / "bench_conv_parts.json").read_text())["results"]
    # One filter from batch 2 on: the taps with dE/df as XLA's conv in parts (4 from batch 4 on).
    assert len(results) == 4 and all(r["rule"].startswith("taps/conv*4") for r in results)
    for r in results:
        assert set(r["median_ms"]) == set(r["compile_s"]) == {"4", "2"}
        # Two programs: dE/df's conv in 4 and in 2 convolutions (the taps forward has none).
        assert r["convolutions"] == {"4": 4, "2": 2}
        assert all(v > 0 for v in (*r["median_ms"].values(), *r["compile_s"].values()))
        # The same sums in another order, in float32: at most 3.2e-6 with one
        # filter at batch 256 and 1024 in experiments/results/bench_conv_parts.md.
        assert r["update_rel_diff"] < 1e-5
    assert "| 8 | 32x32x3 | 5 | 1 | taps/conv*4/all |" in (tmp_path / "bench_conv_parts.md").read_text()
    with pytest.raises(SystemExit):
        bench_conv_parts.main(["--repeats", "1", "--out", str(tmp_path / "refused")])
    with pytest.raises(SystemExit):  # 4 parts of 2 examples would be 2
        bench_conv_parts.main(["--batches", "2", "--out", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()
