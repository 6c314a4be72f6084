"""`compare_grads`: manual against autodiff against finite differences, term by term.

Assembles the network-specific pieces -- `jaxbp.chain_terms`, their autodiff counterparts
(`jaxbp.check.reference_terms`), `jaxbp.manual_grads`, `jaxbp.autodiff_grads` and float64 central
differences of `jaxbp.loss` -- into rows of the generic core (`jaxbp.check.report`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxbp.autodiff import autodiff_grads
from jaxbp.autodiff import network_autodiff_grads
from jaxbp.backward import chain_terms
from jaxbp.backward import manual_grads
from jaxbp.check.finite_differences import float64_differences
from jaxbp.check.reference_terms import autodiff_chain_terms
from jaxbp.check.reference_terms import network_manual_terms
from jaxbp.check.reference_terms import network_reference_terms
from jaxbp.check.reference_terms import network_term_names
from jaxbp.check.report import GradCheckReport
from jaxbp.check.report import compare_arrays
from jaxbp.check.report import compare_named
from jaxbp.check.report import compare_trees
from jaxbp.check.tolerances import Tolerance
from jaxbp.check.tolerances import tolerance_for
from jaxbp.model import check_inputs
from jaxbp.model import loss
from jaxbp.network import Network
from jaxbp.params import Params
from jaxbp.spec import ConvNetSpec

FD = "finite differences"


@functools.partial(jax.jit, static_argnums=3)
def _autodiff_grads_and_terms(params, x, y, spec):
    return autodiff_grads(params, x, y, spec), autodiff_chain_terms(params, x, y, spec)


@functools.partial(jax.jit, static_argnums=3)
def _manual_grads_and_terms(params, x, y, spec):
    return manual_grads(params, x, y, spec), chain_terms(params, x, y, spec)


_manual_grads = jax.jit(manual_grads, static_argnums=3)
_chain_terms = jax.jit(chain_terms, static_argnums=3)


@functools.partial(jax.jit, static_argnums=3)
def _network_autodiff_grads_and_terms(params, x, y, network):
    return network_autodiff_grads(params, x, y, network), network_reference_terms(params, x, y, network)


@functools.partial(jax.jit, static_argnums=3)
def _network_manual_grads_and_terms(params, x, y, network):
    return network.manual_grads(params, x, y), network_manual_terms(params, x, y, network)


_network_manual_terms = jax.jit(network_manual_terms, static_argnums=3)


class _Model(NamedTuple):
    """What compare_grads needs of a model: the slides' ConvNetSpec API or a layer `Network`."""

    check_inputs: Callable
    loss: Callable  # (params, x, y) -> E, the batch mean
    manual_grads: Callable  # (params, x, y) -> grads
    manual_grads_and_terms: Callable  # (params, x, y) -> (grads, named terms)
    manual_terms: Callable  # (params, x, y) -> named terms
    autodiff_grads_and_terms: Callable  # (params, x, y) -> (grads, named reference terms)
    description: str
    terms_note: str


def _model(spec) -> _Model:
    if isinstance(spec, Network):

        def _named(params, grads, terms):  # a tuple of terms -> {name: term}, in backward order
            return grads, dict(zip(network_term_names(params, spec), terms))

        layers = ", ".join(type(layer).__name__ for layer in spec.layers)
        return _Model(
            check_inputs=spec.check_inputs,
            loss=spec.loss_value,
            manual_grads=jax.jit(spec.manual_grads),
            manual_grads_and_terms=lambda p, x, y: _named(p, *_network_manual_grads_and_terms(p, x, y, spec)),
            manual_terms=lambda p, x, y: _named(p, None, _network_manual_terms(p, x, y, spec))[1],
            autodiff_grads_and_terms=lambda p, x, y: _named(
                p, *_network_autodiff_grads_and_terms(p, x, y, spec)
            ),
            description=f"Network in {spec.in_shape}: {layers}; loss {type(spec.loss).__name__}",
            terms_note="per example (for a batch, term n is d E_n / d ..., without 1/N), in backward "
            "order; reference: jax.vjp of each layer alone at the manual backward's input and incoming "
            "cotangent, so a wrong layer VJP fails at that layer",
        )
    if not isinstance(spec, ConvNetSpec):
        raise TypeError(f"spec must be a ConvNetSpec or a jaxbp.Network, got {type(spec).__name__}")
    return _Model(
        check_inputs=lambda p, x, y: check_inputs(p, x, y, spec),
        loss=lambda p, x, y: loss(p, x, y, spec),
        manual_grads=lambda p, x, y: _manual_grads(p, x, y, spec),
        manual_grads_and_terms=lambda p, x, y: _manual_grads_and_terms(p, x, y, spec),
        manual_terms=lambda p, x, y: _chain_terms(p, x, y, spec),
        autodiff_grads_and_terms=lambda p, x, y: _autodiff_grads_and_terms(p, x, y, spec),
        description=describe_spec(spec),
        terms_note="per example (for a batch, term n is d E_n / d ..., without 1/N), reference: autodiff "
        "(vjp of the sub-network for cotangents, jvp(sigmoid, Z, 1) for Jacobian diagonals)",
    )


def _named_terms(terms, who: str) -> dict:
    """A term function's output as {name: array}, in its order."""
    if hasattr(terms, "_asdict"):
        return dict(terms._asdict())
    if isinstance(terms, Mapping):
        return dict(terms)
    raise TypeError(f"{who} must return a NamedTuple or a dict of named arrays, got {type(terms).__name__}")


def _finite_difference_rows(grads, diffs, candidate: str, tol: Tolerance, dtype, known_scales) -> list:
    """Rows of one gradient pytree against float64 finite differences, leaf by leaf.

    A leaf is compared through `LeafDifferences.project` (itself, or its dot products with the
    random directions); a leaf of the wrong shape or dtype gets a failing row that says so.
    """
    rows = []
    for leaf, d in zip(jax.tree.leaves(grads), diffs):
        shape = getattr(leaf, "shape", None)
        ok_shape = shape is not None and tuple(shape) == tuple(d.shape)
        row = compare_arrays(
            d.name,
            d.project(leaf) if ok_shape else leaf,
            d.values if ok_shape else jnp.zeros(d.shape),
            tol=tol.finite_differences,
            floor=tol.floor,
            stage="grad",
            candidate_name=candidate,
            reference_name=FD,
            method=d.method,
            known_scales=known_scales,
        )
        leaf_dtype = jnp.dtype(leaf.dtype).name if hasattr(leaf, "dtype") else row.dtype
        row = dataclasses.replace(row, shape=shape, dtype=leaf_dtype)  # the leaf's, not the projection's
        if ok_shape and not row.note and leaf_dtype != dtype.name:
            row = dataclasses.replace(row, ok=False, note=f"dtype {leaf_dtype}, expected {dtype.name}")
        rows.append(row)
    return rows


def describe_spec(spec: ConvNetSpec) -> str:
    """A one-line summary of a spec for reports and tables."""
    padding = spec.padding if isinstance(spec.padding, str) else [list(p) for p in spec.padding]
    return (
        f"in {spec.in_shape} K={spec.n_filters} kernel {spec.kernel_size} stride {spec.stride} "
        f"padding {padding} dilation {spec.dilation} n_out {spec.n_out}"
    )


def compare_grads(
    params: Params,
    x: jax.Array,
    y: jax.Array,
    spec: ConvNetSpec | Network,
    *,
    grad_fn: Callable | None = None,
    term_fn: Callable | None = None,
    reference_term_fn: Callable | None = None,
    terms: bool | None = None,
    finite_differences: bool = True,
    eps: float | None = None,
    max_elementwise: int = 256,
    n_directions: int = 8,
    seed: int = 0,
    precision=None,
    tolerance: Tolerance | None = None,
) -> GradCheckReport:
    r"""Check gradients of `jaxbp.loss` three ways, and every chain-rule term against autodiff.

    Rows, in this order (the report's first failing row is where a derivation first goes wrong):

    1. stage "term": each term of ``term_fn`` (default `jaxbp.chain_terms`: dE/dO, dO/dZ2,
       delta2, dE/dH1, dH1/dZ1, delta1, dE/dW, dE/db, dE/df, in the order each is computed from
       the previous) against ``reference_term_fn`` (default: autodiff of the sub-network
       downstream of each intermediate, `jaxbp.check.reference_terms`). Per example: for a batch,
       term n is the derivative of example n's loss E_n, stacked on axis 0 (no 1/N).
    2. stage "grad", candidate vs autodiff: ``grad_fn`` (default `jaxbp.manual_grads`) against
       `jaxbp.autodiff_grads`, leaf by leaf; for a batch both are means over examples.
    3. stage "grad", candidate vs finite differences, and autodiff vs finite differences (which
       checks the reference itself): central differences of `jaxbp.loss` in float64 (whatever
       the params' dtype), elementwise for leaves of at most ``max_elementwise`` entries and
       along ``n_directions`` random unit directions (dot-product test) for larger ones.

    Each row has the max abs error, the relative error
    :math:`\max|a-b| / \max(\text{floor}, \max|a| + \max|b|)` (a the candidate, b the reference),
    the cosine similarity and the norm ratio |a|/|b|, and passes when the relative error is within
    the dtype's tolerance profile (`jaxbp.check.TOLERANCES`). Wrong shapes, dtypes and NaN give
    failing rows that say so.

    Args:
      params, x, y, spec: the point, as for `jaxbp.loss` (one example or a batch); spec may also
        be a `jaxbp.Network` (any stack of layers), whose terms are each layer's dE/dparams and
        dE/dx in backward order, each checked against jax.vjp of that layer alone.
      grad_fn: fn(params, x, y, spec) -> Params of gradients, the derivation under test.
      term_fn: fn(params, x, y, spec) -> NamedTuple or dict of named per-example terms.
      reference_term_fn: the same for the reference terms (names matched by name).
      terms: compare terms; default: yes unless only ``grad_fn`` is given (the default terms
        belong to jaxbp's own derivation, not to a user's grad_fn).
      finite_differences: add the finite-difference rows (2 loss evaluations per entry or
        direction; all vmapped).
      eps: the finite-difference step; default the profile's (1e-5).
      max_elementwise, n_directions, seed: finite differences, see above.
      precision: if given, replaces ``spec.precision`` (a `jax.lax.Precision` or its name, e.g.
        "highest": full float32 precision for every conv and matmul on GPU/TPU).
      tolerance: a `Tolerance` to use instead of the dtype's profile.

    Returns:
      A `GradCheckReport`: ``print(report)``, ``report.ok``, ``report.first_failure``,
      ``report.to_dict()``.

    Raises:
      TypeError, ValueError: bad params/x/y/spec (as `jaxbp.loss`), a grad_fn whose output is
        not a pytree like params, a term function returning something other than named arrays,
        or a dtype with no tolerance profile (and no ``tolerance``).
    """
    if precision is not None:
        if isinstance(spec, Network):
            raise ValueError("precision: a Network's layers carry their own precision; build them with it")
        spec = dataclasses.replace(spec, precision=precision)
    model = _model(spec)
    x, y, batched = model.check_inputs(params, x, y)
    dtype = jnp.dtype(jax.tree.leaves(params)[0].dtype)
    tol = tolerance_for(dtype) if tolerance is None else tolerance
    eps = tol.eps if eps is None else eps
    n = x.shape[0] if batched else 1
    known_scales = {n: f"N = {n}, the batch size: a missing 1/N in the batch mean?"} if n > 1 else {}
    if n > 1:
        known_scales[1 / n] = f"1/N = 1/{n}: an extra 1/N?"
    common = dict(floor=tol.floor, expected_dtype=dtype, known_scales=known_scales)

    compare_terms = terms if terms is not None else (grad_fn is None or term_fn is not None)
    # The defaults in one compiled function each (a compilation costs more than the check).
    reference, theirs = model.autodiff_grads_and_terms(params, x, y)
    if grad_fn is None and term_fn is None:
        grads, mine = model.manual_grads_and_terms(params, x, y)
    else:
        grads = model.manual_grads(params, x, y) if grad_fn is None else grad_fn(params, x, y, spec)
        mine = None if term_fn is None else term_fn(params, x, y, spec)
        if mine is None and compare_terms:
            mine = model.manual_terms(params, x, y)
    candidate = "manual" if grad_fn is None else "grad_fn"
    if jax.tree.structure(grads) != jax.tree.structure(params):
        raise TypeError(
            f"grad_fn must return gradients with the structure of params {jax.tree.structure(params)}, "
            f"got {jax.tree.structure(grads)}"
        )

    rows = []
    if compare_terms:
        if reference_term_fn is not None:
            theirs = reference_term_fn(params, x, y, spec)
        mine = _named_terms(mine, "term_fn")
        theirs = _named_terms(theirs, "reference_term_fn")
        pairs = [(name, value, theirs.get(name)) for name, value in mine.items()]
        rows += compare_named(
            pairs,
            tol=tol.autodiff,
            stage="term",
            candidate_name="manual" if term_fn is None else "term_fn",
            reference_name="autodiff",
            **common,
        )

    rows += compare_trees(
        grads,
        reference,
        tol=tol.autodiff,
        stage="grad",
        candidate_name=candidate,
        reference_name="autodiff",
        **common,
    )

    context = {
        "spec": model.description,
        "batch": f"N = {n}, gradients are means over examples" if batched else "one example",
        "dtype": dtype.name,
        "precision": str(getattr(spec, "precision", "per layer")),
        "terms": model.terms_note,
    }
    if finite_differences:
        with jax.enable_x64(True):
            x64, y64 = jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64)
            diffs = float64_differences(
                lambda p: model.loss(p, x64, y64),
                params,
                eps=eps,
                max_elementwise=max_elementwise,
                n_directions=n_directions,
                seed=seed,
            )
        for side, tree in ((candidate, grads), ("autodiff", reference)):
            rows += _finite_difference_rows(tree, diffs, side, tol, dtype, known_scales)
        context["finite differences"] = (
            f"central, float64, eps={eps:g}: elementwise for leaves of <= {max_elementwise} entries, "
            f"else {n_directions} random unit directions (seed {seed})"
        )
    return GradCheckReport(rows=tuple(rows), tolerance=tol, context=context)
