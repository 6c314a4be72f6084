"""Checkpoints, and experiments/train.py end to end on tiny IDX data made here (a few steps)."""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from idx_files import write_mnist_like

import jaxbp
from jaxbp import checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("experiments_train", ROOT / "experiments" / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

SPEC = jaxbp.ConvNetSpec(in_shape=(8, 8, 1), n_filters=3, kernel_size=(3, 3), padding="SAME", n_out=10)
PNGS = ("curves.png", "filters.png", "predictions.png")
# few steps: 64 training images in batches of 16 -> 4 steps per epoch
TINY = ["--epochs", "2", "--batch-size", "16", "--filters", "2", "--kernel-size", "3", "--quiet"]


def adam_state(dtype, steps=2):
    """Params and adam state after a few updates with random gradients (moments not zero)."""
    params = jaxbp.init_params(jax.random.key(1), SPEC, dtype)
    opt = optax.adam(1e-2)
    state = opt.init(params)
    rng = np.random.default_rng(2)

    @jax.jit
    def update(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), dtype), params)
        params, state = update(params, state, grads)
    return {"params": params, "opt_state": state}


def assert_bitwise_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b) and len(leaves_a) == len(leaves_b)
    for u, v in zip(leaves_a, leaves_b):
        u, v = np.asarray(u), np.asarray(v)
        assert u.dtype == v.dtype and u.shape == v.shape and u.tobytes() == v.tobytes()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_checkpoint_round_trip_is_bit_for_bit(tmp_path, dtype):
    tree = adam_state(dtype)
    path = tmp_path / "ckpt.npz"
    checkpoint.save_checkpoint(path, tree, spec=SPEC, metadata={"epoch": 3})
    template = adam_state(dtype, steps=0)
    loaded, meta = checkpoint.load_checkpoint(path, template, spec=SPEC)
    assert meta == {"epoch": 3}
    assert_bitwise_equal(loaded, tree)


def test_checkpoint_of_another_spec_structure_or_dtype_is_refused(tmp_path):
    tree = adam_state(jnp.float32)
    path = tmp_path / "ckpt.npz"
    checkpoint.save_checkpoint(path, tree, spec=SPEC)
    other = jaxbp.ConvNetSpec(in_shape=(8, 8, 1), n_filters=4, kernel_size=(3, 3), padding="SAME", n_out=10)
    with pytest.raises(ValueError, match="another ConvNetSpec.*n_filters: checkpoint 3 vs now 4"):
        checkpoint.load_checkpoint(path, tree, spec=other)
    sgd = {"params": tree["params"], "opt_state": jaxbp.sgd(0.1).init(tree["params"])}
    with pytest.raises(ValueError, match="another structure"):
        checkpoint.load_checkpoint(path, sgd, spec=SPEC)
    with pytest.raises(ValueError, match="saved as float32 .* but float64"):
        checkpoint.load_checkpoint(path, adam_state(jnp.float64, steps=0), spec=SPEC)
    (tmp_path / "junk.npz").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.npz: not a jaxbp checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "junk.npz", tree, spec=SPEC)


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("idx")
    write_mnist_like(directory, gz=True)
    return directory


def run(idx_dir, out, *extra):
    return train.main(["--data", f"idx:{idx_dir}", "--out", str(out), *TINY, *extra])


def test_both_end_to_end_float64_writes_its_files(tmp_path, idx_dir):
    metrics = run(idx_dir, tmp_path, "--grads", "both", "--dtype", "float64")
    for name in (*PNGS, "grad_agreement.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["test_accuracy"] == metrics["test_accuracy"] == written["epochs"]["test_accuracy"][-1]
    assert written["config"]["grads"] == "both" and written["spec"]["n_out"] == 10
    for name in ("manual", "autodiff"):
        assert all(len(v) == 2 for v in written["trajectories"][name].values())
    agreement = written["gradient_agreement"]
    assert len(agreement["grad_rel_diff"]) == len(agreement["param_rel_diff"]) == 2 * 4  # 2 epochs x 4 steps
    # Measured on CPU (jax 0.10.2), the batched manual path against jax.grad of the batch-mean
    # loss over the 4400 steps of the default float64 run: per-step gradient difference at most
    # 9.8e-15, final params 1.4e-15 apart (summation order differs). 1e-12 leaves room for other
    # XLA versions and backends while any real error in the backward shows as >= 1e-8.
    assert max(agreement["grad_rel_diff"]) < 1e-12 and agreement["final_param_rel_diff"] < 1e-12
    assert written["wall_time_s"] > 0 and written["data"]["n_train"] == 64
    ckpt = checkpoint.read_checkpoint_header(tmp_path / "checkpoint.npz")
    assert ckpt["metadata"]["epoch"] == 2 and ckpt["spec"] == written["spec"]


def test_same_seed_same_metrics_and_resume_continues_exactly(tmp_path, idx_dir):
    whole = run(idx_dir, tmp_path / "a", "--seed", "3")
    again = run(idx_dir, tmp_path / "b", "--seed", "3")
    run(idx_dir, tmp_path / "c", "--seed", "3", "--epochs", "1")
    resumed = run(idx_dir, tmp_path / "d", "--seed", "3", "--resume", str(tmp_path / "c" / "checkpoint.npz"))
    for other in (again, resumed):
        assert other["epochs"] == whole["epochs"] and other["test_accuracy"] == whole["test_accuracy"]
    assert resumed["epochs_run"] == 1
    spec = spec_of(whole)
    params = jaxbp.init_params(jax.random.key(0), spec)
    template = {"manual": (params, optax.adam(1e-3).init(params))}
    a, _ = checkpoint.load_checkpoint(tmp_path / "a" / "checkpoint.npz", template, spec=spec)
    d, _ = checkpoint.load_checkpoint(tmp_path / "d" / "checkpoint.npz", template, spec=spec)
    assert_bitwise_equal(a, d)
    other = run(idx_dir, tmp_path / "e", "--seed", "4")
    assert other["epochs"]["train_loss"] != whole["epochs"]["train_loss"]


def spec_of(metrics):
    """The ConvNetSpec recorded in a run's metrics."""
    return jaxbp.ConvNetSpec(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in metrics["spec"].items()}
    )


def test_resume_refuses_another_spec_or_setting(tmp_path, idx_dir):
    run(idx_dir, tmp_path / "a", "--epochs", "1")
    ckpt = str(tmp_path / "a" / "checkpoint.npz")
    with pytest.raises(ValueError, match="another ConvNetSpec.*n_filters: checkpoint 2 vs now 3"):
        run(idx_dir, tmp_path / "b", "--resume", ckpt, "--filters", "3")
    with pytest.raises(ValueError, match="other settings.*'lr'"):
        run(idx_dir, tmp_path / "b", "--resume", ckpt, "--lr", "0.5")


def test_digits_binary_task_with_the_slides_sgd(tmp_path):
    metrics = train.main(
        ["--task", "binary", "--digits", "3,8", "--optimizer", "sgd", "--out", str(tmp_path), *TINY]
    )
    assert metrics["spec"]["n_out"] == 1 and metrics["config"]["lr"] == train.DEFAULT_LR["sgd"]
    # the fixed split holds out round(0.2 * 183) threes and round(0.2 * 174) eights
    assert metrics["data"]["n_test"] == 37 + 35 and 0.0 <= metrics["test_accuracy"] <= 1.0
    assert all((tmp_path / name).is_file() for name in (*PNGS, "metrics.json", "checkpoint.npz"))


def test_seeds_writes_one_folder_per_seed_and_a_summary(tmp_path, idx_dir):
    summary = run(idx_dir, tmp_path, "--seeds", "0,1", "--epochs", "1")
    written = json.loads((tmp_path / "seeds.json").read_text())
    assert written["seeds"] == [0, 1] and written["min_test_accuracy"] == min(summary["test_accuracy"])
    assert all((tmp_path / f"seed_{s}" / "metrics.json").is_file() for s in (0, 1))


def test_bad_options_are_refused(tmp_path):
    for argv in (["--digits", "3"], ["--digits", "3,3"], ["--seeds", "0,x"], ["--padding", "1,2"]):
        with pytest.raises(SystemExit):
            train.parse_args(argv)
    with pytest.raises(SystemExit):
        train.parse_args(["--lr", "-1"])
    with pytest.raises(ValueError, match="data must be 'digits' or 'idx:DIR'"):
        train.main(["--data", "mnist", "--out", str(tmp_path), *TINY])
