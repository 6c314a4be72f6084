"""jaxbp.per_example: per-example gradients written into the previous call's arrays, in chunks."""

import chex
import jax
import numpy as np
import pytest
from strategies import problem

import jaxbp
from jaxbp import per_example

SPEC = jaxbp.ConvNetSpec(in_shape=(9, 9, 2), n_filters=3, kernel_size=3, n_out=4)
ONE_FILTER = jaxbp.ConvNetSpec(in_shape=(8, 8, 1), n_filters=1, kernel_size=3, n_out=2)


@pytest.mark.parametrize("spec", [SPEC, ONE_FILTER], ids=["3 filters", "one filter"])
@pytest.mark.parametrize("chunk", ["auto", None, 1, 2, 3, 7, 9])
def test_equal_to_per_example_manual_grads_float64_fresh_and_reused(spec, chunk):
    # 7 examples: chunks of 2 and 3 leave a remainder, 7 and 9 are the whole batch.
    params, x, y = problem(spec, 0, 7)
    reference = jaxbp.per_example_manual_grads(params, x, y, spec)
    fn = jaxbp.make_per_example_grads(spec, chunk=chunk)
    first = fn(params, x, y)
    chex.assert_trees_all_close(first, reference, rtol=1e-12, atol=1e-15)
    _, x2, y2 = problem(spec, 1, 7)  # another batch, into the first one's arrays
    again = jaxbp.per_example_manual_grads(params, x2, y2, spec)
    chex.assert_trees_all_close(fn(params, x2, y2, out=first), again, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("chunk, batch", [(None, 6), (2, 6), (2, 7), (3, 7)])
def test_out_is_donated_and_its_memory_holds_the_result(chunk, batch):
    # The point of the module: the call writes where `out` was (no fresh pages), whole or in
    # chunks, with a remainder chunk (7 examples) too.
    params, x, y = problem(SPEC, 0, batch)
    fn = jaxbp.make_per_example_grads(SPEC, chunk=chunk)
    out = fn(params, x, y)
    pointers = [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(out)]
    new = fn(params, x, y, out=out)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(out))
    assert [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(new)] == pointers
    with pytest.raises(ValueError, match="out was consumed by an earlier call"):
        fn(params, x, y, out=out)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the rule chunks on the CPU only")
def test_auto_chunks_past_the_threshold(monkeypatch):
    # "auto" past FRESH_PAGES_FROM (lowered to 0 here): chunks of MAX_CHUNK = 128 examples (this
    # spec's working set holds more), so 130 examples are a chunk and a remainder of 2.
    monkeypatch.setattr(per_example, "FRESH_PAGES_FROM", 0)
    params, x, y = problem(SPEC, 3, 130)
    fn = jaxbp.make_per_example_grads(SPEC)
    assert fn.chunk_for(x) == 128
    reference = jaxbp.per_example_manual_grads(params, x, y, SPEC)
    chex.assert_trees_all_close(fn(params, x, y, out=fn(params, x, y)), reference, rtol=1e-12, atol=1e-15)


def test_autodiff_equals_manual_and_a_network_works():
    params, x, y = problem(SPEC, 2, 5)
    manual = jaxbp.make_per_example_grads(SPEC, chunk=2)(params, x, y)
    autodiff = jaxbp.make_per_example_grads(SPEC, grads="autodiff", chunk=2)(params, x, y)
    chex.assert_trees_all_close(autodiff, manual, rtol=1e-10, atol=1e-13)
    net = jaxbp.slides_network(SPEC)
    net_params = jaxbp.params_to_network(params)
    got = jaxbp.make_per_example_grads(net)(net_params, x, y)
    chex.assert_trees_all_close(jaxbp.params_from_network(got), manual, rtol=1e-10, atol=1e-13)
    assert per_example.per_example_chunk(net, 4096) is None


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the rule chunks on the CPU only")
def test_chunk_rule_chunks_only_past_fresh_pages_and_never_after_the_taps():
    # 28x28x1, 3x3, 32 filters at batch 256: 69 MiB of temporaries estimated, past 32 MiB.
    big = jaxbp.ConvNetSpec(in_shape=(28, 28, 1), n_filters=32, kernel_size=3, n_out=10)
    assert 256 * jaxbp.formulations.temporaries_per_example(big) > per_example.FRESH_PAGES_FROM
    assert per_example.per_example_chunk(big, 256) == jaxbp.formulations.working_set_chunk(big, 256) == 64
    # 8 filters at batch 256: 22 MiB, whole (the chunks took 1.18x its time).
    eight = jaxbp.ConvNetSpec(in_shape=(28, 28, 1), n_filters=8, kernel_size=3, n_out=10)
    assert jaxbp.formulations.working_set_chunk(eight, 256) is not None
    assert per_example.per_example_chunk(eight, 256) is None
    # One filter: the taps forward, whole at any batch.
    one = jaxbp.ConvNetSpec(in_shape=(32, 32, 3), n_filters=1, kernel_size=5, n_out=10)
    assert 4096 * jaxbp.formulations.temporaries_per_example(one) > per_example.FRESH_PAGES_FROM
    assert per_example.per_example_chunk(one, 4096) is None
    assert per_example.per_example_chunk(SPEC, 4) is None


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"grads": "numeric"}, ValueError, "grads must be one of"),
        ({"chunk": 0}, ValueError, "chunk must be"),
        ({"chunk": -2}, ValueError, "chunk must be"),
        ({"chunk": True}, ValueError, "chunk must be"),
        ({"chunk": 2.0}, ValueError, "chunk must be"),
        ({"chunk": np.int64(0)}, ValueError, "chunk must be"),
        ({"chunk": "whole"}, ValueError, "chunk must be"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        jaxbp.make_per_example_grads(SPEC, **kwargs)


def test_bad_spec_and_out_are_named():
    with pytest.raises(TypeError, match="spec must be"):
        jaxbp.make_per_example_grads((9, 9, 2))
    params, x, y = problem(SPEC, 0, 4)
    fn = jaxbp.make_per_example_grads(SPEC)
    other_batch = fn(params, x[:3], y[:3])
    with pytest.raises(ValueError, match=r"out must hold this batch's .* shape \(4, 3, 3, 2, 3\)"):
        fn(params, x, y, out=other_batch)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(other_batch))  # nothing lost
    with pytest.raises(ValueError, match="out must be the per-example gradients"):
        fn(params, x, y, out=(np.zeros((4, 3)),))
    with pytest.raises(ValueError, match="dtype float64"):
        fn(params, x, y, out=jax.tree.map(lambda a: a.astype(np.float32), fn(params, x, y)))
