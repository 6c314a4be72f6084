"""jaxbp.tune: the candidates, the choice by measured medians, and that the pick is a valid step.

Which candidate is fastest is a timing and is not asserted here (speed is measured in
experiments/bench.py --tune); what is tested is what the tuner times, that it picks the smallest
median it measured, and that its pick computes the same update as the rule's.
"""

import itertools
import json
import time

import chex
import jax
import numpy as np
import pytest
from strategies import ZEN2_SIMD
from strategies import ZEN4_SIMD
from strategies import problem

import jaxbp
from jaxbp import batched
from jaxbp import formulations
from jaxbp import machine
from jaxbp import tune

SPEC = jaxbp.ConvNetSpec(in_shape=(8, 8, 3), n_filters=8, kernel_size=(3, 3), n_out=4)
SPEC_FORM = formulations.Formulation("patches", "patches")


# The rule at 8x8x3, 3x3: one filter the taps (dE/df the Toeplitz form at batch 1, else the
# conv), 8 filters the patches, 32 the patches and the conv (at batch 1 the patches for both).
@pytest.mark.parametrize("simd", [ZEN2_SIMD, ZEN4_SIMD], ids=["zen2", "zen4"])
@pytest.mark.parametrize("filters", [1, 8, 32])
@pytest.mark.parametrize("batch", [1, 32, 256, 1024])
def test_candidates_are_the_rules_forms_at_other_chunks_and_other_pairs(batch, filters, simd, monkeypatch):
    monkeypatch.setattr(machine, "simd_flags", lambda root="/": simd)  # the CPU the rule reads
    spec = jaxbp.ConvNetSpec(in_shape=(8, 8, 3), n_filters=filters, kernel_size=(3, 3), n_out=4)
    rule = formulations.choose_formulation(spec, batch, "cpu")
    candidates = tune.candidate_formulations(spec, batch, "cpu")
    assert candidates[0] == rule and len(set(candidates)) == len(candidates)
    for form in candidates:
        formulations.check_formulation(form)
        assert form.chunk is None or form.chunk < batch  # a chunk of the whole batch is None
    same_forms = {f.chunk for f in candidates if f[:2] == rule[:2]}
    expected = {c for c in tune.CANDIDATE_CHUNKS if c < batch} | {rule.chunk}
    assert same_forms == expected | ({None} if batch <= tune.WHOLE_BATCH_MAX else set())
    for pair in tune.CANDIDATE_PAIRS:
        assert any(f[:2] == pair and f.chunk == rule.chunk for f in candidates), pair
    # A single example past the taps: the patches for both, and the conv's side too (the rule
    # before, one part); after the taps (one filter) no patches forward with the conv.
    by_conv = [f for f in candidates if f[:2] == ("patches", "conv")]
    if batch == 1:
        past_taps = filters > 1
        assert (rule[:2] == ("patches", "patches")) == past_taps
        assert by_conv == ([formulations.Formulation("patches", "conv", None, 1)] if past_taps else [])
    elif rule[:2] != ("patches", "conv"):
        assert by_conv == []  # at a batch only the rule's own patches/conv, at its chunks
    if jax.default_backend() == "cpu":  # backend None is this machine's
        assert tune.candidate_formulations(spec, batch) == candidates
    # XLA's conv dE/df in the rule's parts for this batch (4 on the CPU, one per example at most).
    parts = formulations.conv_filter_grad_parts(batch, "cpu")
    assert {f.conv_parts for f in candidates if f.filter_grad == "conv"} == {parts}
    assert {f.conv_parts for f in candidates if f.filter_grad != "conv"} == {1}
    # The taps on 3 channels contract them first by default (TAPS_CONTRACT_CHANNELS_FROM): the
    # pick is also timed channels last with the per-channel loop; nothing else sets
    # contract_channels.
    flipped = [f for f in candidates if f.contract_channels is not None]
    per_channel = rule._replace(batch_minor=False, contract_channels=False)
    assert flipped == ([per_channel] if rule.forward == "taps" else [])
    # The taps and conv pair in both layouts (the rule's in chunks from 2 channels on,
    # BATCH_MINOR_FROM_CHANNELS), where there is a batch.
    taps_conv = rule[:2] == ("taps", "conv") and batch > 1
    assert rule.batch_minor == (taps_conv and rule.chunk is not None)
    at_the_rules = [f for f in candidates if f[:3] == rule[:3] and f.contract_channels is None]
    assert {f.batch_minor for f in at_the_rules} == ({False, True} if taps_conv else {False})
    # W delta2 the other way where dE/df is the conv or the Toeplitz form after a matmul forward
    # (here the patches and the conv with 32 filters), at a batch; nothing else sets it. The rule
    # takes the products without AVX-512 (the Zen 2) and the matmul with it (the Zen 4), so the
    # other way is the matmul on the one and the products on the other.
    other = [f for f in candidates if f.w_delta2_terms is not None]
    close = rule.forward == "patches" and rule.filter_grad == "conv" and batch > 1
    assert other == ([rule._replace(w_delta2_terms=simd == ZEN4_SIMD)] if close else [])
    # On a GPU the rule takes the patches for both: nothing to set (the products' rule is the
    # CPU's, and after the patches dE/df they were slower there).
    on_gpu_other = [
        f for f in tune.candidate_formulations(spec, batch, "gpu") if f.w_delta2_terms is not None
    ]
    assert formulations.choose_formulation(spec, batch, "gpu")[:2] == ("patches", "patches")
    assert on_gpu_other == []
    on_gpu = tune.candidate_formulations(spec, batch, "gpu")
    assert on_gpu[0] == formulations.choose_formulation(spec, batch, "gpu")
    assert not any(f[:2] == ("patches", "conv") for f in on_gpu)  # the batch-1 extra is the CPU's
    assert {f.conv_parts for f in on_gpu} == {1}


def test_candidates_given_are_taken_as_they_run_at_the_batch(monkeypatch):
    whole, chunked = SPEC_FORM, SPEC_FORM._replace(chunk=8)
    given = [whole._replace(chunk=20), whole._replace(chunk=64), chunked, chunked._replace(conv_parts=3)]
    assert tune.distinct(given, 20) == [whole, chunked]  # conv_parts only matters for a conv dE/df
    conv = formulations.Formulation("patches", "conv", 8, 3)
    assert tune.distinct([conv, conv._replace(conv_parts=1)], 20) == [conv, conv._replace(conv_parts=1)]
    # contract_channels only matters for the taps forward; given the channels, set to what None
    # means for them it is None.
    assert tune.distinct([whole._replace(contract_channels=True)], 20, 3) == [whole]
    taps = formulations.Formulation("taps", "conv", 8, 3)
    products, per_channel = (taps._replace(contract_channels=c) for c in (True, False))
    assert tune.distinct([taps, products, per_channel], 20, 3) == [taps, per_channel]
    assert tune.distinct([taps, products, per_channel], 20, 1) == [taps, products]
    assert tune.distinct([taps, products, per_channel], 20) == [taps, products, per_channel]
    # The batch-minor layout runs the per-channel loop whatever contract_channels says, and
    # only the taps and conv pair reads it.
    minor = taps._replace(batch_minor=True)
    assert tune.distinct([minor, minor._replace(contract_channels=False)], 20, 3) == [minor]
    assert tune.distinct([whole._replace(batch_minor=True)], 20) == [whole]
    assert minor.label() == "taps(batch_minor)/conv*3/8"
    # A batch of one runs channels last, as asked: the layout dropped, the channels' side kept.
    per_channel_one = taps._replace(chunk=None, contract_channels=False)
    assert tune.distinct([minor._replace(contract_channels=False)], 1, 3) == [per_channel_one]
    assert [f.label() for f in (taps, products, per_channel)] == [
        "taps/conv*3/8",
        "taps(products)/conv*3/8",
        "taps(per_channel)/conv*3/8",
    ]
    # w_delta2_terms set to what None means at the batch is None (the products for the conv
    # dE/df after a matmul forward from 2 examples on, on the CPU): so a batch of one keeps True.
    terms, dot = (conv._replace(w_delta2_terms=t) for t in (True, False))
    for backend, simd in itertools.product(("cpu", "gpu"), (ZEN2_SIMD, ZEN4_SIMD)):
        monkeypatch.setattr(machine, "simd_flags", lambda root="/", simd=simd: simd)  # what the rule reads
        products = backend == "cpu" and simd == ZEN2_SIMD  # the rule's side: the products
        assert tune.distinct([conv, terms, dot], 20, n_out=10, backend=backend) == [
            conv,
            dot if products else terms,
        ]
        one = conv._replace(chunk=None)
        assert tune.distinct([conv, terms, dot], 1, n_out=10, backend=backend) == [
            one,
            terms._replace(chunk=None),
        ]
        # Past W_DELTA2_TERMS_MAX_OUT outputs None is the matmul; without n_out nothing is resolved.
        assert tune.distinct([conv, terms, dot], 20, n_out=11, backend=backend) == [conv, terms]
    assert tune.distinct([conv, terms, dot], 20) == [conv, terms, dot]
    assert tune.distinct([minor._replace(w_delta2_terms=False)], 20, 3, n_out=10) == [minor]
    assert [f.label() for f in (conv, terms, dot)] == [
        "patches/conv*3/8",
        "patches/conv*3/8+terms",
        "patches/conv*3/8+dot",
    ]


def test_tuning_times_every_candidate_and_each_computes_the_rules_means():
    lines = []
    # A batch of 20: chunks of 16 leave a remainder of 4, run as one more chunk.
    tuning = jaxbp.tune_formulation(
        SPEC, 20, dtype="float64", repeats=2, min_sample_s=0.0, progress=lines.append
    )
    candidates = tune.candidate_formulations(SPEC, 20, itemsize=8)
    assert tuning.rule == formulations.choose_formulation(SPEC, 20, itemsize=8)
    assert set(tuning.times_ms) == set(tuning.compile_s) == set(candidates)
    labels = ["patches/patches/all", "patches/patches/16", "toeplitz/toeplitz/all", "conv/conv*4/all"]
    assert [f.label() for f in candidates] == labels
    assert tuning.best == min(candidates, key=lambda f: tuning.times_ms[f][1])
    # A budget every candidate compiled within leaves the fastest; the quickest compile's own
    # time leaves only candidates at most that slow to compile.
    assert tuning.fastest_compiling_within(max(tuning.compile_s.values())) == tuning.best
    quickest = min(tuning.compile_s.values())
    assert tuning.compile_s[tuning.fastest_compiling_within(quickest)] == quickest
    assert all(q1 <= med <= q3 for q1, med, q3 in tuning.times_ms.values())
    assert tuning.speedup() >= 1 and len(lines) == len(candidates) + 1
    # Whichever is picked computes the same means: every candidate against the rule's (float64,
    # rtol 1e-10 and atol 1e-13 as for every formulation in tests/test_batched.py).
    params, x, y = problem(SPEC, 0, 20)
    expected = batched.value_and_grads(params, x, y, SPEC, formulation=tuning.rule)
    for form in tuning.times_ms:
        actual = batched.value_and_grads(params, x, y, SPEC, formulation=form)
        chex.assert_trees_all_close(actual, expected, rtol=1e-10, atol=1e-13, custom_message=form.label())
    # And the pick reaches the step.
    opt = jaxbp.sgd(0.3)
    state = opt.init(params)
    tuned = jaxbp.make_update_step(SPEC, opt, formulation=tuning.best)(params, state, x, y)
    chex.assert_trees_all_close(tuned, jaxbp.make_update_step(SPEC, opt)(params, state, x, y), rtol=1e-10)


def fake_samples(medians_ms):
    """An interleaved_samples stand-in: each call's samples spread around the given median."""

    def samples(calls, repeats, min_sample_s):
        return {form: [1e-3 * medians_ms(form) * s for s in (0.9, 1.0, 1.1)] for form in calls}

    return samples


def test_the_pick_is_the_smallest_median_and_the_rule_wins_a_tie(monkeypatch):
    rule = formulations.choose_formulation(SPEC, 64)
    other = rule._replace(chunk=16)
    slower = formulations.Formulation("conv", "conv", 16)
    medians = {rule: 2.0, other: 1.5, slower: 3.0}
    monkeypatch.setattr(tune, "interleaved_samples", fake_samples(medians.get))
    tuning = jaxbp.tune_formulation(SPEC, 64, candidates=[slower, other], repeats=1)
    assert list(tuning.times_ms) == [rule, slower, other]  # the rule is always timed, first
    assert tuning.best == other and tuning.speedup() == pytest.approx(2.0 / 1.5)
    assert tuning.times_ms[other] == pytest.approx((1.425, 1.5, 1.575))  # quartiles of 3 samples
    report = tuning.report().splitlines()  # fastest first, each against the rule's time
    assert [line.split()[0] for line in report] == [other.label(), rule.label(), slower.label()]
    assert "0.75x the rule's" in report[0] and report[1].endswith("(the rule's pick)")
    medians[other] = 2.0
    assert jaxbp.tune_formulation(SPEC, 64, candidates=[other], repeats=1).best == rule


def test_the_fastest_within_a_compile_budget():
    rule, other, slower = (formulations.Formulation("patches", "patches", c) for c in (None, 16, 8))
    times = {rule: (0.9, 1.0, 1.1), other: (1.8, 2.0, 2.2), slower: (2.7, 3.0, 3.3)}
    tuning = tune.Tuning(rule, rule, times, {rule: 0.5, other: 0.3, slower: 0.2})
    assert tuning.fastest_compiling_within(0.5) == rule  # the budget includes its end
    assert tuning.fastest_compiling_within(0.4) == other  # the faster of the two within it
    assert tuning.fastest_compiling_within(0.2) == slower
    assert tuning.fastest_compiling_within(0.1) is None
    for bad in (-0.1, float("nan"), "0.3", True):
        with pytest.raises(ValueError, match="seconds must be a non-negative number"):
            tuning.fastest_compiling_within(bad)


@pytest.mark.parametrize("warm_calls", [0, 1, 2])
def test_interleaved_rounds_start_one_method_later_each_round(warm_calls):
    order = []
    calls = {name: (lambda inner, name=name: order.append((name, inner))) for name in "abc"}
    samples = tune.interleaved_samples(calls, repeats=3, min_sample_s=0.0, warm_calls=warm_calls)
    # calibrate: a warm-up call and one sample of one call per method; then the rounds.
    assert order[:6] == [("a", 1), ("a", 1), ("b", 1), ("b", 1), ("c", 1), ("c", 1)]

    # Each sample (1 call here) right after `warm_calls` untimed calls of the same method.
    def sample(name):
        return [(name, warm_calls), (name, 1)] if warm_calls else [(name, 1)]

    expected = [call for name in "abc" + "bca" + "cab" for call in sample(name)]
    assert order[6:] == expected
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(s >= 0 for v in samples.values() for s in v)


def test_a_sample_times_only_its_own_calls_not_the_warm_ones():
    # The warm call is slow and the timed ones fast: the samples are the fast ones.
    def call(inner):
        time.sleep(0.05 if inner == 3 else 0.0)

    samples = tune.interleaved_samples({"a": call}, repeats=2, min_sample_s=0.0, warm_calls=3)
    assert max(samples["a"]) < 0.025


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"batch": 0}, ValueError, "batch must be an int >= 1, got 0"),
        ({"batch": 2.0}, ValueError, "batch must be an int >= 1, got 2.0"),
        ({"repeats": 0}, ValueError, "repeats must be an int >= 1, got 0"),
        ({"min_sample_s": -1.0}, ValueError, "min_sample_s must be a finite number of seconds >= 0"),
        ({"min_sample_s": float("inf")}, ValueError, "min_sample_s must be a finite number of seconds"),
        ({"dtype": "int32"}, ValueError, "dtype must be a floating dtype, got int32"),
        ({"candidates": []}, ValueError, "candidates must hold at least one Formulation"),
        ({"candidates": SPEC_FORM}, TypeError, "candidates must be a list of jaxbp.Formulation"),
        ({"candidates": [("patches", "patches")]}, TypeError, r"candidates\[0\]: formulation must be a"),
        (
            {"candidates": [SPEC_FORM, formulations.Formulation("im2col", "patches")]},
            ValueError,
            r"candidates\[1\]: formulation.forward must be",
        ),
    ],
)
def test_bad_arguments_are_refused_before_anything_compiles(kwargs, error, message, monkeypatch):
    monkeypatch.setattr(jax, "jit", None)  # nothing may be compiled before the error
    kwargs = {"batch": 4, **kwargs}
    with pytest.raises(error, match=message):
        jaxbp.tune_formulation(SPEC, **kwargs)


def test_float64_without_x64_is_refused_with_the_fix():
    with jax.enable_x64(False):
        with pytest.raises(ValueError, match=r"float64 needs jax_enable_x64"):
            jaxbp.tune_formulation(SPEC, 4, dtype=np.float64)


def test_a_cached_tuning_is_read_back_instead_of_timed_and_a_new_question_is_added(tmp_path, monkeypatch):
    path = tmp_path / "tunings" / "cpu.json"  # its folder is made too
    rule = formulations.choose_formulation(SPEC, 64)
    other = rule._replace(chunk=16)
    medians = {rule: 2.0, other: 1.5}
    monkeypatch.setattr(tune, "interleaved_samples", fake_samples(lambda form: medians.get(form, 4.0)))
    first = jaxbp.tune_formulation(SPEC, 64, candidates=[other], repeats=2, cache=path)
    assert first.best == other and path.exists()
    # The same question again, as or less thorough: read back, nothing compiled or timed (jit
    # would fail), equal.
    with monkeypatch.context() as m:
        m.setattr(jax, "jit", None)
        lines = []
        again = jaxbp.tune_formulation(
            SPEC, 64, candidates=[other], repeats=1, seed=1, cache=path, progress=lines.append
        )
    assert again == first and len(lines) == 1
    assert lines[0].startswith(f"tune: {other.label()} (from {path}: tuned 20")
    assert lines[0].endswith("2 samples of at least 0.02 s)")
    # Another batch, dtype or set of candidates is another question, and so is the same one
    # under other XLA_FLAGS (they can split the cores into devices): timed, and added beside it.
    medians[other] = 3.0
    jaxbp.tune_formulation(SPEC, 64, candidates=[other, rule._replace(chunk=32)], repeats=1, cache=path)
    jaxbp.tune_formulation(SPEC, 64, dtype="float64", candidates=[other], repeats=1, cache=path)
    with monkeypatch.context() as m:
        m.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
        jaxbp.tune_formulation(SPEC, 64, candidates=[other], repeats=1, cache=path)
    stored = json.loads(path.read_text())
    assert stored["format"] == tune.CACHE_FORMAT and len(stored["tunings"]) == 4
    # A more thorough request than the stored one is timed again and replaces it.
    assert jaxbp.tune_formulation(SPEC, 64, candidates=[other], repeats=3, cache=path).best == rule
    assert len(json.loads(path.read_text())["tunings"]) == 4
    assert jaxbp.tune_formulation(SPEC, 64, candidates=[other], repeats=3, cache=path).best == rule
    assert not list(path.parent.glob(".*.tmp"))  # written through temporary files, renamed


def test_a_cached_tuning_timed_without_untimed_calls_is_timed_again(tmp_path, monkeypatch):
    # An entry written before the cache recorded warm_calls (its samples had no untimed call
    # before them) does not answer the question: timed again, and replaced with warm_calls.
    path = tmp_path / "cpu.json"
    rule = formulations.choose_formulation(SPEC, 64)
    other = rule._replace(chunk=16)
    medians = {rule: 2.0, other: 1.5}
    monkeypatch.setattr(tune, "interleaved_samples", fake_samples(medians.get))
    assert jaxbp.tune_formulation(SPEC, 64, candidates=[other], repeats=2, cache=path).best == other
    stored = json.loads(path.read_text())
    (entry,) = stored["tunings"].values()
    assert entry["warm_calls"] == tune.WARM_CALLS
    del entry["warm_calls"]
    path.write_text(json.dumps(stored))
    medians[other] = 3.0  # what a timing now finds
    assert jaxbp.tune_formulation(SPEC, 64, candidates=[other], repeats=1, cache=path).best == rule
    (entry,) = json.loads(path.read_text())["tunings"].values()
    assert entry["warm_calls"] == tune.WARM_CALLS and entry["repeats"] == 1


def test_a_tuning_that_cannot_be_written_is_returned_with_a_warning(tmp_path, monkeypatch):
    path = tmp_path / "cpu.json"
    rule = formulations.choose_formulation(SPEC, 4)
    monkeypatch.setattr(tune, "interleaved_samples", fake_samples(lambda form: 1.0))
    jaxbp.tune_formulation(SPEC, 4, candidates=[rule], repeats=1, cache=path)
    before = path.read_text()

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tune.os, "replace", full_disk)
    with pytest.warns(UserWarning, match="the tuning was not written: .*No space left"):
        tuning = jaxbp.tune_formulation(SPEC, 4, dtype="float64", candidates=[rule], repeats=1, cache=path)
    assert tuning.best == rule and path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu.json"]  # the temporary file removed


ENTRY = {"best": ["patches", "patches", None, 1], "rule": ["patches", "patches", None, 1]}


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        '{"tunings": {}}',
        "[1, 2]",
        json.dumps({"format": tune.CACHE_FORMAT}),
        json.dumps({"format": tune.CACHE_FORMAT, "tunings": []}),
        "KEYED",  # an entry under the question's own key that does not read back
    ],
)
def test_a_file_that_is_not_a_tuning_cache_is_refused_and_kept(tmp_path, text, monkeypatch):
    path, keyed = tmp_path / "notes.json", text == "KEYED"
    if keyed:
        rule = formulations.choose_formulation(SPEC, 4)
        candidates = tune.candidate_formulations(SPEC, 4)
        key = tune.cache_key(SPEC, 4, "float32", candidates, jaxbp.compiler_options())
        text = json.dumps(
            {"format": tune.CACHE_FORMAT, "tunings": {key: {**ENTRY, "times_ms": [[list(rule), [1]]]}}}
        )
    path.write_text(text)
    jaxbp.compiler_options()  # its one-off probe of the options compiles; then nothing may
    monkeypatch.setattr(jax, "jit", None)  # refused before anything compiles
    with pytest.raises(
        ValueError, match="is not a jaxbp tuning cache \\(delete it or pass another path\\)"
    ) as refused:
        jaxbp.tune_formulation(SPEC, 4, repeats=1, min_sample_s=0.0, cache=path)
    assert ("an entry does not read back" in str(refused.value)) == keyed
    assert path.read_text() == text


@pytest.mark.parametrize(
    "cache, error, message",
    [
        (True, TypeError, "cache must be None or a file path"),
        ("", TypeError, "cache must be None or a file path"),
        ("FOLDER", ValueError, "cache must be a file path, got the folder"),
    ],
)
def test_a_cache_that_is_not_a_file_path_is_refused(tmp_path, cache, error, message):
    with pytest.raises(error, match=message):
        jaxbp.tune_formulation(SPEC, 4, cache=tmp_path if cache == "FOLDER" else cache)


def test_timed_calls_into_gives_each_call_the_last_result():
    seen = []

    def fn(a, out):
        seen.append(int(out))
        return out + a

    call = tune.timed_calls_into(fn, (jax.numpy.asarray(1),), jax.numpy.asarray(10))
    call(3)
    call(2)
    assert seen == [10, 11, 12, 13, 14]
