"""Train the slides' network with the hand-written backward on a small built-in task.

The task (made here, no download): 12x12 noisy images of a vertical or a horizontal bar, two
sigmoid outputs with one-hot targets, the slides' loss E = sum((O - Y)^2) / 2. Prints the loss
as it trains, the held-out accuracy, and the largest manual-vs-autodiff gradient difference seen.

    python experiments/demo.py --steps 400 --optimizer adam
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxbp
from jaxbp.check import tree_relative_error


def bars(n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n images (size, size, 1) holding one vertical (class 0) or horizontal (class 1) bar."""
    label = rng.integers(0, 2, n)
    pos = rng.integers(1, size - 1, n)
    x = 0.3 * rng.normal(size=(n, size, size, 1))
    for i in range(n):
        if label[i] == 0:
            x[i, :, pos[i], 0] += 1.0
        else:
            x[i, pos[i], :, 0] += 1.0
    return x.astype(np.float32), np.eye(2, dtype=np.float32)[label]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=400, help="update steps (default 400)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--optimizer", choices=["adam", "sgd"], default="adam", help="optax adam or the slides' sgd"
    )
    parser.add_argument("--lr", type=float, default=1e-2, help="learning rate alpha (default 1e-2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be >= 1")

    rng = np.random.default_rng(args.seed)
    x_train, y_train = bars(1024, 12, rng)
    x_test, y_test = bars(256, 12, rng)
    spec = jaxbp.ConvNetSpec(in_shape=(12, 12, 1), n_filters=4, kernel_size=(3, 3), stride=(2, 2), n_out=2)
    params = jaxbp.init_params(jax.random.key(args.seed), spec)
    opt = optax.adam(args.lr) if args.optimizer == "adam" else jaxbp.sgd(args.lr)
    state = opt.init(params)
    step = jaxbp.make_update_step(spec, opt, grads="manual")
    both = jax.jit(lambda p, x, y: (jaxbp.manual_grads(p, x, y, spec), jaxbp.autodiff_grads(p, x, y, spec)))

    worst = 0.0
    for t in range(args.steps):
        idx = rng.integers(0, len(x_train), args.batch_size)
        xb, yb = jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx])
        if t % 20 == 0:
            worst = max(worst, tree_relative_error(*both(params, xb, yb)))
        params, state, E = step(params, state, xb, yb)
        if t % 50 == 0 or t == args.steps - 1:
            print(f"step {t:4d}  loss {float(E):.4f}")
    accuracy = float(jnp.mean(jnp.argmax(jaxbp.forward(params, x_test, spec), 1) == y_test.argmax(1)))
    print(f"held-out accuracy {accuracy:.3f}")
    print(f"largest manual-vs-autodiff relative gradient difference (float32): {worst:.2e}")
    return dict(loss=float(E), accuracy=accuracy, max_grad_rel_diff=worst)


if __name__ == "__main__":
    main()
