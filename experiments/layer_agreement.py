"""Measure how closely each hand-written layer VJP, and whole stacks, agree with JAX's autodiff.

For every layer kind, random hyperparameters and inputs (NumPy, seeded) are drawn; the layer's
hand-written ``vjp`` is compared with ``jax.vjp`` of its ``apply``, in float64 and in float32
(float32 against the float64 reference). Whole stacks (the slides' network, LeNet-5 on 8x8x1 and
28x28x1, random stacks) compare ``Network.manual_grads`` with ``jax.grad``. The error is
``jaxbp.check.tree_relative_error``: max|a - b| / (max|a| + max|b|) per leaf, the largest leaf.

Writes agreement.json (max and median per case) and agreement.png to --out.

    python experiments/layer_agreement.py --trials 20
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

jax.config.update("jax_enable_x64", True)

import jaxbp  # noqa: E402
from jaxbp import layers  # noqa: E402
from jaxbp.check import tree_relative_error  # noqa: E402


def _padding(rng, window):
    kind = rng.integers(3)
    if kind < 2:
        return ("VALID", "SAME")[kind]
    return tuple(tuple(int(rng.integers(0, w)) for _ in range(2)) for w in window)


def draw_layer(kind: str, rng) -> tuple:
    """(layer, in_shape) of one kind with random hyperparameters that fit."""
    if kind == "Conv2D":
        k = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        d = (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
        layer = layers.Conv2D(
            int(rng.integers(1, 5)),
            k,
            stride=(int(rng.integers(1, 4)), int(rng.integers(1, 4))),
            padding=_padding(rng, k),
            dilation=d,
            use_bias=bool(rng.integers(2)),
        )
        hw = [int(rng.integers((kk - 1) * dd + 1, 10)) for kk, dd in zip(k, d)]
        return layer, (*hw, int(rng.integers(1, 4)))
    if kind in ("AvgPool", "MaxPool"):
        w = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        pool = getattr(layers, kind)
        layer = pool(w, stride=(int(rng.integers(1, 4)), int(rng.integers(1, 4))), padding=_padding(rng, w))
        return layer, (int(rng.integers(w[0], 9)), int(rng.integers(w[1], 9)), int(rng.integers(1, 4)))
    if kind == "Dense":
        return layers.Dense(int(rng.integers(1, 6))), (int(rng.integers(1, 30)),)
    shape = tuple(int(n) for n in rng.integers(1, 6, size=rng.integers(1, 4)))
    return getattr(layers, kind)(), shape


def _random_tree(tree, rng, dtype):
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), dtype), tree)


def _layer_vjps(layer, params, x, dE_dy):
    y, pullback = jax.vjp(layer.apply, params, x)
    return layer.vjp(params, x, y, dE_dy), pullback(dE_dy)


layer_vjps = jax.jit(_layer_vjps, static_argnums=0)


def layer_errors(kind: str, rng) -> dict:
    layer, in_shape = draw_layer(kind, rng)
    shapes = jax.eval_shape(lambda: layer.init(jax.random.key(0), in_shape, jnp.float64))
    params = _random_tree(shapes, rng, jnp.float64)
    x = jnp.asarray(rng.normal(size=in_shape))
    dE_dy = jnp.asarray(rng.normal(size=layer.out_shape(in_shape)))
    ours64, ref64 = layer_vjps(layer, params, x, dE_dy)
    ours32, _ = layer_vjps(layer, *jax.tree.map(lambda a: a.astype(jnp.float32), (params, x, dE_dy)))
    return {"float64": tree_relative_error(ours64, ref64), "float32": tree_relative_error(ours32, ref64)}


def _grads(params, x, y, network):
    return network.manual_grads(params, x, y), jaxbp.network_autodiff_grads(params, x, y, network)


grads = jax.jit(_grads, static_argnums=3)


def random_stack(rng) -> jaxbp.Network:
    in_shape = (int(rng.integers(3, 9)), int(rng.integers(3, 9)), int(rng.integers(1, 3)))
    stack, shape = [], in_shape
    for _ in range(rng.integers(1, 4)):
        layer, _ = draw_layer(
            str(rng.choice(["Conv2D", "Tanh", "Relu", "Sigmoid", "AvgPool", "MaxPool"])), rng
        )
        try:
            shape = layer.out_shape(shape)
        except ValueError:
            continue
        stack.append(layer)
    stack += [layers.Flatten(), layers.Dense(int(rng.integers(2, 6))), layers.Tanh(), layers.Dense(3)]
    return jaxbp.Network(layers=tuple(stack), loss=layers.SoftmaxCrossEntropy(), in_shape=in_shape)


def stack_errors(network: jaxbp.Network, rng, batch: int = 4) -> dict:
    shapes = jax.eval_shape(lambda: network.init(jax.random.key(0), jnp.float64))
    params = _random_tree(shapes, rng, jnp.float64)
    x = jnp.asarray(rng.normal(size=(batch, *network.in_shape)))
    (n,) = network.out_shape
    y = jax.nn.one_hot(rng.integers(n, size=batch), n, dtype=jnp.float64)
    if isinstance(network.loss, layers.HalfSquaredError):
        y = jnp.asarray(rng.uniform(size=y.shape))
    manual64, auto64 = grads(params, x, y, network)
    manual32, _ = grads(*jax.tree.map(lambda a: a.astype(jnp.float32), (params, x, y)), network)
    return {
        "float64": tree_relative_error(manual64, auto64),
        "float32": tree_relative_error(manual32, auto64),
    }


STACKS = {
    "slides": lambda rng: jaxbp.slides_network(
        jaxbp.ConvNetSpec(in_shape=(8, 8, 1), n_filters=4, kernel_size=(3, 3), n_out=int(rng.integers(1, 4)))
    ),
    "lenet5 8x8x1": lambda rng: jaxbp.lenet5((8, 8, 1), 10),
    "lenet5 28x28x1": lambda rng: jaxbp.lenet5((28, 28, 1), 10),
    "random stack": random_stack,
}
LAYERS = ["Conv2D", "AvgPool", "MaxPool", "Sigmoid", "Tanh", "Relu", "Flatten", "Dense"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=20, help="random cases per layer kind (default 20)")
    parser.add_argument("--stack-trials", type=int, default=3, help="random cases per stack (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="experiments/results/layer_agreement", help="output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    jobs = [(kind, lambda kind=kind: layer_errors(kind, rng)) for kind in LAYERS for _ in range(args.trials)]
    jobs += [
        (name, lambda make=make: stack_errors(make(rng), rng))
        for name, make in STACKS.items()
        for _ in range(args.stack_trials)
    ]
    errors: dict[str, dict[str, list]] = {}
    for name, job in tqdm(jobs, disable=args.quiet, desc="cases"):
        for dtype, error in job().items():
            errors.setdefault(name, {}).setdefault(dtype, []).append(error)
    summary = {
        name: {
            f"{dtype} {stat}": float(fn(v))
            for dtype, v in per.items()
            for stat, fn in (("max", np.max), ("median", np.median))
        }
        | {"cases": len(per["float64"])}
        for name, per in errors.items()
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "agreement.json").write_text(json.dumps({"args": vars(args), "relative_error": summary}, indent=2))
    _plot(summary, out / "agreement.png")
    for name, row in summary.items():
        f64, f32 = row["float64 max"], row["float32 max"]
        print(f"{name:16s} float64 max {f64:.1e}  float32 max {f32:.1e}  ({row['cases']} cases)")
    return summary


def _plot(summary: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, ax = plt.subplots(figsize=(9, 4))
    for offset, dtype in ((-0.2, "float64"), (0.2, "float32")):
        values = [max(summary[n][f"{dtype} max"], 1e-18) for n in names]
        ax.bar(np.arange(len(names)) + offset, values, width=0.4, label=f"{dtype} (max over cases)")
    ax.axhline(1e-10, color="k", ls="--", lw=0.8, label="float64 test bar 1e-10")
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("relative error vs jax autodiff (float64)")
    ax.set_title("hand-written VJPs vs jax.vjp / jax.grad (0 plotted as 1e-18)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
