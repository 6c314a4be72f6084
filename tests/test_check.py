"""jaxbp.check: planted wrong derivations are caught and located; the report, the CLI, bad input."""

import json
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from strategies import problem
from strategies import specs

import jaxbp
from jaxbp import ops
from jaxbp.backward import ChainTerms
from jaxbp.check import cli
from jaxbp.check import compare_named
from jaxbp.check import compare_trees
from jaxbp.check import float64_differences
from jaxbp.check import relative_error

# D = Ho * Wo * K = 2 * 3 * 2 = 12 = n_out, so W is square and "W instead of W^T" is a bug of
# the right shape; stride 2 in height, so ignoring it in dE/df changes the values, not the shape
# ((5 - 2) + 1 = 4 >= kh = 3 rows are cut to 3); a non-square kernel, so a flip is visible.
SPEC = jaxbp.ConvNetSpec(in_shape=(5, 4, 2), n_filters=2, kernel_size=(3, 2), stride=(2, 1), n_out=12)
N = 3
TERMS = ChainTerms._fields


def terms_example(params, x, y, spec, bug=None):
    """The slides' chain rule for one example, written out again, with one optional planted bug."""
    Z1 = ops.conv2d(x, params.f, **spec.conv_kwargs)
    H1 = ops.sigmoid(Z1)
    O = ops.sigmoid(ops.dense(ops.flatten(H1), params.W, params.b))
    dE_dO = O - y
    dO_dZ2 = O * (1 - O)
    delta2 = dE_dO * dO_dZ2
    W = params.W.T if bug == "W instead of W^T" else params.W
    dE_dH1 = (W @ delta2).reshape(H1.shape)
    dH1_dZ1 = H1 * (1 - H1)
    delta1 = dE_dH1 if bug == "missing H1(1-H1)" else dE_dH1 * dH1_dZ1
    kwargs = dict(spec.conv_kwargs, kernel_size=spec.kernel_size)
    if bug == "stride ignored in dE/df":
        kwargs["stride"] = (1, 1)
    dE_df = ops.conv2d_filter_vjp(x, delta1, **kwargs)
    if bug == "flipped filter":
        dE_df = dE_df[::-1, ::-1]
    dE_dW = jnp.outer(ops.flatten(H1), delta2)
    return ChainTerms(dE_dO, dO_dZ2, delta2, dE_dH1, dH1_dZ1, delta1, dE_dW, delta2, dE_df)


def derivation(bug=None):
    """(term_fn, grad_fn) of a user derivation with `bug`: terms per example, grads their mean."""

    def term_fn(params, x, y, spec):
        return jax.vmap(lambda xi, yi: terms_example(params, xi, yi, spec, bug))(x, y)

    def grad_fn(params, x, y, spec):
        t = term_fn(params, x, y, spec)
        reduce = jnp.sum if bug == "missing 1/N" else jnp.mean
        return jaxbp.Params(*(reduce(g, axis=0) for g in (t.dE_df, t.dE_dW, t.dE_db)))

    return term_fn, grad_fn


def check(bug, **kwargs):
    params, x, y = problem(SPEC, 0, N)
    term_fn, grad_fn = derivation(bug)
    return jaxbp.compare_grads(params, x, y, SPEC, grad_fn=grad_fn, term_fn=term_fn, **kwargs)


def test_correct_derivation_passes():
    report = check(None)
    assert report.ok, str(report)
    assert report.first_failure is None
    assert [r.name for r in report.rows if r.stage == "term"] == list(TERMS)


@pytest.mark.parametrize(
    "bug, located_at, unaffected",
    [
        ("missing H1(1-H1)", "delta1", ("dE_dH1", "dH1_dZ1", "dE_dW", "dE_db")),
        ("W instead of W^T", "dE_dH1", ("delta2", "dH1_dZ1", "dE_dW", "dE_db")),
        ("flipped filter", "dE_df", ("delta1", "dE_dW", "dE_db")),
        ("stride ignored in dE/df", "dE_df", ("delta1", "dE_dW", "dE_db")),
    ],
)
def test_wrong_term_is_caught_and_located(bug, located_at, unaffected):
    report = check(bug, finite_differences=False)
    assert not report.ok
    first = report.first_failure
    assert (first.stage, first.name) == ("term", located_at), str(report)
    # every term computed before it passes; so do the later terms that do not depend on it
    terms = {r.name: r for r in report.rows if r.stage == "term"}
    assert all(terms[name].ok for name in TERMS[: TERMS.index(located_at)])
    assert all(terms[name].ok for name in unaffected)
    # and the derivation's parameter gradients are wrong too (a wrong term is no rounding error)
    assert not all(r.ok for r in report.rows if r.stage == "grad")
    assert first.rel > 1e3 * report.tolerance.autodiff


def test_missing_batch_mean_is_located_at_the_gradients_and_explained():
    report = check("missing 1/N")
    assert not report.ok
    assert all(r.ok for r in report.rows if r.stage == "term")  # per-example terms are right
    first = report.first_failure
    assert (first.stage, first.name) == ("grad", "f")
    grads = [r for r in report.rows if r.stage == "grad" and r.candidate == "grad_fn"]
    assert len(grads) == 6 and not any(r.ok for r in grads)  # vs autodiff and vs FD, f W b
    for row in grads:
        np.testing.assert_allclose(row.norm_ratio, N, rtol=1e-6)
        assert "missing 1/N" in row.note
    # the reference itself agrees with finite differences
    assert all(r.ok for r in report.rows if r.candidate == "autodiff")


# --- the report --------------------------------------------------------------------------------


def test_report_table_dict_and_reference_sides():
    params, x, y = problem(SPEC, 1, N)
    report = jaxbp.compare_grads(params, x, y, SPEC, max_elementwise=20, n_directions=5, eps=1e-5)
    assert report.ok, str(report)
    text = str(report)
    assert text.startswith("gradient check: PASS")
    for word in (*TERMS, "finite differences", "eps=1e-05", "rel err", "cosine", "norm ratio"):
        assert word in text
    # 9 terms, then f W b vs autodiff, then (manual, autodiff) x (f W b) vs finite differences
    assert [(r.stage, r.candidate, r.reference) for r in report.rows] == (
        [("term", "manual", "autodiff")] * 9
        + [("grad", "manual", "autodiff")] * 3
        + [("grad", "manual", "finite differences")] * 3
        + [("grad", "autodiff", "finite differences")] * 3
    )
    fd = {r.name: r.method for r in report.rows if r.reference == "finite differences"}
    assert fd == {  # f has 3*2*2*2 = 24 > 20 entries, b 12, W 144
        "f": "FD 5 random directions (seed 0), eps=1e-05",
        "W": "FD 5 random directions (seed 0), eps=1e-05",
        "b": "FD elementwise, eps=1e-05",
    }
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["ok"] is True and as_dict["first_failure"] is None
    assert len(as_dict["rows"]) == 18 and as_dict["tolerance"]["dtype"] == "float64"
    assert "float64" in as_dict["context"]["finite differences"]
    for row in report.rows:
        assert row.rel <= row.tol and -1 <= row.cosine <= 1 and row.max_abs >= 0


def test_failing_report_says_where_and_is_json_ready():
    term_fn, grad_fn = derivation("missing H1(1-H1)")
    params, x, y = problem(SPEC, 2, N)
    report = jaxbp.compare_grads(
        params, x, y, SPEC, grad_fn=grad_fn, term_fn=term_fn, finite_differences=False
    )
    assert str(report).startswith(
        "gradient check: FAIL -- first disagreement: term delta1 (term_fn vs autodiff)"
    )
    assert report.to_dict()["first_failure"] == "term delta1"
    worst = report.first_failure.worst_index
    assert len(worst) == 4 and 0 <= worst[0] < N  # (example, i, j, k)


# float32: the profile is chosen from the params' dtype; FD stays in float64.
def test_float32_uses_its_profile_and_float64_differences():
    params, x, y = jax.tree.map(lambda a: a.astype(jnp.float32), problem(SPEC, 3, N))
    report = jaxbp.compare_grads(params, x, y, SPEC, precision="highest")
    assert report.ok, str(report)
    assert report.tolerance == jaxbp.check.TOLERANCES["float32"]
    assert report.context["precision"] == str(jax.lax.Precision.HIGHEST)
    assert {r.dtype for r in report.rows} == {"float32"}


# Two cases the relative error's floor exists for (jaxbp/check/tolerances.py): a filter gradient
# that is exactly zero (every tap of the 1-pixel-high input reads padding), where float64 finite
# differences return round-off ~1e-14; and a hypothesis example from test_backward's float32 sweep
# whose bias gradient (4.5e-5, a mean of per-example terms that cancel) carries the float32
# forward's absolute rounding, 1.4e-8 -- 3e-4 of itself, 4.6e-7 of the float32 floor 3e-2.
ZERO_GRADIENT_SPEC = jaxbp.ConvNetSpec(
    in_shape=(1, 3, 2),
    n_filters=2,
    kernel_size=(2, 4),
    stride=(2, 1),
    padding="SAME",
    dilation=(2, 1),
    n_out=2,
)
CANCELLING_SPEC = jaxbp.ConvNetSpec(
    in_shape=(7, 7, 1), n_filters=2, kernel_size=(4, 4), padding=((2, 2), (2, 2)), dilation=(1, 2), n_out=1
)


@pytest.mark.parametrize(
    "spec, seed, batch, dtype",
    [
        (ZERO_GRADIENT_SPEC, 0, 3, jnp.float64),
        (ZERO_GRADIENT_SPEC, 0, 3, jnp.float32),
        (CANCELLING_SPEC, 1445, 2, jnp.float32),
    ],
    ids=["zero-float64", "zero-float32", "cancelling-float32"],
)
def test_zero_and_tiny_gradients_pass(spec, seed, batch, dtype):
    params, x, y = jax.tree.map(lambda a: a.astype(dtype), problem(spec, seed, batch))
    report = jaxbp.compare_grads(params, x, y, spec)
    assert report.ok, str(report)


@settings(max_examples=8)
@given(spec=specs(max_hw=7), batch=st.one_of(st.none(), st.integers(1, 4)), seed=st.integers(0, 2**16))
def test_manual_terms_match_autodiff_terms_across_specs(spec, batch, seed):
    params, x, y = problem(spec, seed, batch)
    report = jaxbp.compare_grads(params, x, y, spec, finite_differences=False)
    assert report.ok, str(report)


def test_directional_differences_are_dot_products_with_the_gradient():
    params, x, y = problem(SPEC, 4, N)
    exact = jaxbp.autodiff_grads(params, x, y, SPEC)
    diffs = float64_differences(
        lambda p: jaxbp.loss(p, x, y, SPEC), params, max_elementwise=0, n_directions=4
    )
    for d, g in zip(diffs, exact):
        assert d.directions.shape == (4, g.size)
        np.testing.assert_allclose(np.linalg.norm(d.directions, axis=1), 1, rtol=1e-12)
        # float64 central differences at eps 1e-5: ~3e-10 relative (experiments/results/fd_eps.json)
        assert (
            relative_error(d.values, d.directions @ np.ravel(g))
            < jaxbp.check.TOLERANCES["float64"].finite_differences
        )


def test_generic_core_compares_named_pairs_and_pytrees():
    a = np.arange(1.0, 5.0)
    rows = compare_named([("first", a, a), ("second", 2 * a, a), ("third", -a, a)], tol=1e-12)
    assert [r.ok for r in rows] == [True, False, False]
    assert "scaled by 2" in rows[1].note and "sign flipped" in rows[2].note
    (transposed,) = compare_named([("W", np.ones((2, 3)), np.ones((3, 2)))], tol=1.0)
    assert not transposed.ok and transposed.note == "shape (2, 3), expected (3, 2) (the transpose?)"
    tree = {"layer": [a, a[:2]]}
    assert [r.name for r in compare_trees(tree, tree, tol=0.0)] == ["['layer'][0]", "['layer'][1]"]
    with pytest.raises(TypeError, match="must have the reference's structure"):
        compare_trees({"layer": [a]}, tree, tol=0.0)


# --- bad input: a clear error, or a row that says what is wrong ---------------------------------


def _grads_then(change):
    def grad_fn(params, x, y, spec):
        return change(jaxbp.manual_grads(params, x, y, spec))

    return grad_fn


@pytest.mark.parametrize(
    "change, name, note",
    [
        (lambda g: g._replace(W=g.W[:-1]), "W", r"shape \(11, 12\), expected \(12, 12\)$"),
        (lambda g: g._replace(b=g.b.astype(jnp.float32)), "b", "dtype float32, expected float64"),
        (lambda g: g._replace(f=g.f.at[0, 0, 0, 0].set(jnp.nan)), "f", "grad_fn has 1 NaN and 0 inf of 24"),
        (lambda g: g._replace(b=g.b.at[1].set(jnp.inf)), "b", "grad_fn has 0 NaN and 1 inf of 12"),
    ],
    ids=["shape", "dtype", "nan", "inf"],
)
def test_bad_gradients_give_failing_rows_that_say_why(change, name, note):
    params, x, y = problem(SPEC, 5, N)
    report = jaxbp.compare_grads(params, x, y, SPEC, grad_fn=_grads_then(change))
    bad = [r for r in report.rows if r.candidate == "grad_fn" and not r.ok]
    assert {r.name for r in bad} == {name}
    assert len(bad) == 2  # against autodiff and against finite differences
    for row in bad:
        assert re.search(note, row.note), row.note
    assert report.first_failure.name == name
    json.dumps(report.to_dict(), allow_nan=False)  # still JSON-ready


def test_bad_structures_raise_clear_errors():
    params, x, y = problem(SPEC, 6, N)
    with pytest.raises(TypeError, match=r"grad_fn must return gradients with the structure of params"):
        jaxbp.compare_grads(params, x, y, SPEC, grad_fn=lambda p, x, y, s: (p.f, p.W))
    with pytest.raises(
        TypeError, match=r"term_fn must return a NamedTuple or a dict of named arrays, got list"
    ):
        jaxbp.compare_grads(params, x, y, SPEC, term_fn=lambda p, x, y, s: [p.f])
    with pytest.raises(ValueError, match=r"x must have shape \(5, 4, 2\)"):
        jaxbp.compare_grads(params, x[:, :3], y, SPEC)
    half = jax.tree.map(lambda a: a.astype(jnp.float16), (params, x, y))
    with pytest.raises(ValueError, match=r"dtype: no measured tolerance profile for float16"):
        jaxbp.compare_grads(*half, SPEC)


def test_user_terms_are_matched_by_name():
    params, x, y = problem(SPEC, 7, N)

    def term_fn(p, x, y, s):
        t = jaxbp.chain_terms(p, x, y, s)
        return {"delta2": t.delta2, "my_extra_term": t.delta2}

    report = jaxbp.compare_grads(params, x, y, SPEC, term_fn=term_fn, finite_differences=False)
    terms = [r for r in report.rows if r.stage == "term"]
    assert [(r.name, r.ok) for r in terms] == [("delta2", True), ("my_extra_term", False)]
    assert terms[1].note == "no reference value for this term_fn entry"


# --- the command line ----------------------------------------------------------------------------


def test_cli_runs_specs_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert cli.main(["-n", "2", "--seed", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2/2 passed" in printed and "vs FD" in printed
    result = json.loads(out.read_text())
    assert result["ok"] is True and result["n_failed"] == 0 and len(result["results"]) == 2
    for entry in result["results"]:
        assert entry["report"]["ok"] is True and len(entry["report"]["rows"]) == 18
        jaxbp.ConvNetSpec(**{k: v for k, v in entry["spec"].items() if k != "precision"})  # a valid spec


def test_cli_exits_non_zero_on_a_failure(tmp_path, capsys, monkeypatch):
    doubled = _grads_then(lambda g: jax.tree.map(lambda leaf: 2 * leaf, g))
    real = cli.compare_grads
    monkeypatch.setattr(cli, "compare_grads", lambda *a, **k: real(*a, grad_fn=doubled, **k))
    out = tmp_path / "check.json"
    assert cli.main(["-n", "1", "--no-fd", "--json", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "0/1 passed" in printed and "FAIL" in printed and "scaled by 2" in printed
    assert json.loads(out.read_text())["n_failed"] == 1


def test_cli_help_and_bad_arguments():
    done = subprocess.run([sys.executable, "-m", "jaxbp.check", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--json FILE" in done.stdout and "RuntimeWarning" not in done.stderr
    with pytest.raises(SystemExit) as error:
        cli.main(["-n", "0"])
    assert error.value.code == 2


def test_random_specs_are_seeded_and_cover_the_sweep():
    rng = np.random.default_rng(0)
    drawn = [cli.random_spec(rng) for _ in range(200)]
    assert drawn[:5] == [cli.random_spec(r) for r in [np.random.default_rng(0)] for _ in range(5)]
    assert {s.stride for s in drawn} >= {(1, 1), (3, 3), (2, 1)}
    assert {s.dilation for s in drawn} == {(1, 1), (1, 2), (2, 1), (2, 2)}
    assert {"VALID", "SAME"} <= {s.padding for s in drawn if isinstance(s.padding, str)}
    assert any(not isinstance(s.padding, str) for s in drawn)
    assert {s.in_shape[2] for s in drawn} == {1, 2, 3} and {s.n_filters for s in drawn} == {1, 2, 3, 4}
    assert {s.n_out for s in drawn} == {1, 2, 3}


# --- loss_with_manual_vjp ------------------------------------------------------------------------

VJP_SPEC = jaxbp.ConvNetSpec(
    in_shape=(7, 6, 2),
    n_filters=3,
    kernel_size=(3, 2),
    stride=(2, 1),
    dilation=(1, 2),
    padding=((1, 0), (2, 1)),
    n_out=3,
)


@pytest.mark.parametrize("batch", [None, 4])
def test_manual_vjp_loss_gradients_equal_manual_grads(batch):
    params, x, y = problem(VJP_SPEC, 8, batch)
    E = jaxbp.loss_with_manual_vjp(params, x, y, VJP_SPEC)
    np.testing.assert_allclose(E, jaxbp.loss(params, x, y, VJP_SPEC), rtol=1e-14)
    grads = jax.jit(jax.grad(jaxbp.loss_with_manual_vjp), static_argnums=3)(params, x, y, VJP_SPEC)
    # Measured: equal to manual_grads up to 3.5e-15 relative (jit fuses the batch mean differently).
    chex.assert_trees_all_close(grads, jaxbp.manual_grads(params, x, y, VJP_SPEC), rtol=1e-12)
    # x and y cotangents are hand-written too (conv transpose of delta1; -(O - Y)), 1/N per example
    manual_xy = jax.grad(jaxbp.loss_with_manual_vjp, argnums=(1, 2))(params, x, y, VJP_SPEC)
    chex.assert_trees_all_close(
        manual_xy, jax.grad(jaxbp.loss, argnums=(1, 2))(params, x, y, VJP_SPEC), rtol=1e-10
    )


def test_manual_vjp_passes_jax_check_grads():
    params, x, y = problem(VJP_SPEC, 9, 3)
    jax.test_util.check_grads(
        lambda p, x, y: jaxbp.loss_with_manual_vjp(p, x, y, VJP_SPEC), (params, x, y), order=1, modes=("rev",)
    )


def test_grad_of_manual_vjp_loss_runs_the_hand_written_backward(monkeypatch):
    """Plant a wrong sigmoid derivative in ops: autodiff of the forward never reads it, the manual
    backward does -- so only the manual-VJP loss's gradient moves."""
    spec = jaxbp.ConvNetSpec(
        in_shape=(6, 5, 1), n_filters=2, kernel_size=2, n_out=2
    )  # fresh: no cached trace
    params, x, y = problem(spec, 10, 2)
    before = jax.grad(jaxbp.loss_with_manual_vjp)(params, x, y, spec)
    monkeypatch.setattr(ops, "sigmoid_derivative", lambda h: 2 * h * (1 - h))
    wrong = jax.grad(jaxbp.loss_with_manual_vjp)(params, x[:1], y[:1], spec)
    autodiff = jax.grad(jaxbp.loss)(params, x[:1], y[:1], spec)
    assert not np.allclose(wrong.W, autodiff.W, rtol=1e-3)
    np.testing.assert_allclose(wrong.b, 2 * autodiff.b, rtol=1e-12)  # delta2 doubled
    monkeypatch.undo()
    chex.assert_trees_all_close(before, jaxbp.manual_grads(params, x, y, spec), rtol=1e-12)


def test_manual_vjp_loss_under_vmap_and_optax():
    params, x, y = problem(VJP_SPEC, 11, 4)
    per_example = jax.vmap(jax.grad(lambda p, xi, yi: jaxbp.loss_with_manual_vjp(p, xi, yi, VJP_SPEC)),
                           in_axes=(None, 0, 0))(params, x, y)  # fmt: skip
    chex.assert_trees_all_close(
        per_example, jaxbp.per_example_manual_grads(params, x, y, VJP_SPEC), rtol=1e-12
    )

    opt = optax.adam(1e-2)

    def train(grads_fn):
        p, state = params, opt.init(params)
        for _ in range(3):
            updates, state = opt.update(grads_fn(p), state, p)
            p = optax.apply_updates(p, updates)
        return p

    with_vjp = train(jax.jit(lambda p: jax.grad(jaxbp.loss_with_manual_vjp)(p, x, y, VJP_SPEC)))
    with_manual = train(jax.jit(lambda p: jaxbp.manual_grads(p, x, y, VJP_SPEC)))
    chex.assert_trees_all_close(with_vjp, with_manual, rtol=1e-10)
    assert not np.allclose(with_vjp.W, params.W)


def test_manual_vjp_loss_accepts_integer_targets():
    params, x, y = problem(VJP_SPEC, 12, 2)
    y_int = (y > 0.5).astype(jnp.int32)
    grads = jax.grad(jaxbp.loss_with_manual_vjp)(params, x, y_int, VJP_SPEC)
    chex.assert_trees_all_close(
        grads, jaxbp.manual_grads(params, x, y_int.astype(x.dtype), VJP_SPEC), rtol=1e-12
    )


def test_user_reference_terms_are_used():
    params, x, y = problem(SPEC, 13, N)

    def reference_term_fn(p, x, y, s):  # a reference that disagrees on delta1 only
        t = jaxbp.check.autodiff_chain_terms(p, x, y, s)
        return t._replace(delta1=-t.delta1)

    report = jaxbp.compare_grads(
        params, x, y, SPEC, reference_term_fn=reference_term_fn, finite_differences=False
    )
    assert [r.name for r in report.failures] == ["delta1"]
    assert "sign flipped" in report.first_failure.note
