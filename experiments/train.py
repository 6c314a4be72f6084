"""Train the slides' network on handwritten digits, with the manual backward, jax.grad, or both.

The network is the slides' X -> conv(X, f) -> sigmoid -> flatten -> W^T H1 + b -> sigmoid = O,
trained on E = sum((O - Y)^2) / 2 (mean over a batch); --model lenet trains LeNet-5 (tanh, average
pooling, softmax cross-entropy; `jaxbp.lenet5`) with the same hand-written layer backward.
Data: scikit-learn's 8x8 digits by default (no download; a fixed, seeded, stratified 80/20
split), or MNIST / Fashion-MNIST from IDX files with --data idx:DIR. --task multiclass uses 10
outputs and one-hot targets; --task binary the slides' single output on two digits (--digits 3,8).

--grads both trains two copies from the same key in the same data order, one with each backward,
and records per step the relative difference of the gradients the two copies step with (manual
and autodiff) and of the two copies' params after the step.

Writes to --out: metrics.json, checkpoint.npz (params and optimizer state; --resume continues
from it exactly), curves.png, filters.png, predictions.png and, for --grads both,
grad_agreement.png. --seeds 0,1,2,3,4 runs one folder per seed plus seeds.json.

    python experiments/train.py                                  # the default run, ~30 s
    python experiments/train.py --grads both --dtype float64     # bitwise equal; ~15 min on CPU
    python experiments/train.py --task binary --digits 3,8
    python experiments/train.py --model lenet --out runs/lenet    # LeNet-5, 40 epochs
    python experiments/train.py --data idx:~/data/mnist --epochs 5 --filters 8 --kernel-size 5
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # plots.py sits beside this script
import plots  # noqa: E402

# Defaults of the run, chosen by the measurements in the README's Results section.
DEFAULTS = dict(
    model="slides",
    data="digits",
    task="multiclass",
    digits="3,8",
    grads="manual",
    seed=0,
    epochs=None,
    batch_size=None,
    optimizer="adam",
    lr=None,
    filters=32,
    kernel_size=5,
    stride=1,
    padding="SAME",
    dtype="float32",
    pixel_range="-1,1",
    split_seed=0,
    out=os.path.join("runs", "train"),
)
DEFAULT_LR = {"adam": 1e-3, "sgd": 0.1, "momentum": 0.05}
# Per-model defaults where they differ (epochs; adam's lr), from the runs in the README's Results.
# LeNet's were chosen on this split's held-out accuracy (there is no separate validation split):
# batch 16, 40 epochs gave 0.9805; batch 32 with 30 or 60 epochs, max pooling, relu, lr 1e-3, or
# momentum gave 0.961-0.978 (README, Results).
MODEL_DEFAULTS = {
    "slides": dict(epochs=100, adam_lr=1e-3, batch_size=32),
    "lenet": dict(epochs=40, adam_lr=3e-3, batch_size=16),
}
TRAJECTORIES = {"manual": ("manual",), "autodiff": ("autodiff",), "both": ("manual", "autodiff")}
# Settings a checkpoint must share with the run that resumes it (epochs may grow).
RESUME_KEYS = (
    "model",
    "activation",
    "pooling",
    "data",
    "task",
    "digits",
    "grads",
    "seed",
    "batch_size",
    "optimizer",
    "lr",
    "dtype",
    "pixel_range",
    "split_seed",
)


def int_pair(text: str) -> tuple[int, int]:
    """ "3" -> (3, 3), "3,2" -> (3, 2)."""
    values = tuple(int(v) for v in text.split(","))
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected N or N,M, got {text!r}")
    return values


def float_pair(text: str) -> tuple[float, float]:
    values = tuple(float(v) for v in text.split(","))
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected LO,HI, got {text!r}")
    return values


def padding_arg(text: str):
    """ "SAME", "VALID", or "T,B,L,R" explicit padding."""
    if text.upper() in ("SAME", "VALID"):
        return text.upper()
    values = tuple(int(v) for v in text.split(","))
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"padding must be SAME, VALID or T,B,L,R, got {text!r}")
    return (values[:2], values[2:])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add, d = parser.add_argument, DEFAULTS
    add(
        "--model",
        choices=list(MODEL_DEFAULTS),
        default=d["model"],
        help="the slides' network (default) or LeNet-5 (jaxbp.lenet5; --filters/--kernel-size/"
        "--stride/--padding apply to the slides' network only)",
    )
    add("--activation", choices=["tanh", "relu", "sigmoid"], default="tanh", help="lenet's (default tanh)")
    add("--pooling", choices=["avg", "max"], default="avg", help="lenet's pooling (default avg)")
    add("--data", default=d["data"], help="'digits' (default, built in) or 'idx:DIR' (MNIST files)")
    add("--task", choices=["multiclass", "binary"], default=d["task"], help="10 outputs, or 1 output")
    add("--digits", default=d["digits"], help="the two digits of --task binary (default 3,8)")
    add("--grads", choices=list(TRAJECTORIES), default=d["grads"], help="which backward (default manual)")
    add("--seed", type=int, default=d["seed"], help="init and data-order seed (default 0)")
    add("--seeds", default=None, help="comma-separated seeds: one run per seed in OUT/seed_S")
    add("--epochs", type=int, default=d["epochs"], help="passes over the training set (100; lenet 40)")
    add("--batch-size", type=int, default=d["batch_size"], help="examples per step (32; lenet 16)")
    add(
        "--optimizer",
        choices=list(DEFAULT_LR),
        default=d["optimizer"],
        help="adam (optax, default), sgd (the slides' w <- w - lr dE/dw), momentum (optax sgd, 0.9)",
    )
    add("--lr", type=float, default=d["lr"], help=f"learning rate (default {DEFAULT_LR}; lenet adam 3e-3)")
    add("--filters", type=int, default=d["filters"], help="K, number of conv filters (default 32)")
    add("--kernel-size", type=int_pair, default=d["kernel_size"], help="kh or kh,kw (default 5)")
    add("--stride", type=int_pair, default=d["stride"], help="s or sh,sw (default 1)")
    add("--padding", type=padding_arg, default=d["padding"], help="SAME (default), VALID or T,B,L,R")
    add("--dtype", choices=["float32", "float64"], default=d["dtype"], help="default float32")
    add("--pixel-range", type=float_pair, default=d["pixel_range"], help="pixels to LO,HI (default -1,1)")
    add("--split-seed", type=int, default=d["split_seed"], help="digits train/test split seed (0)")
    add("--out", default=d["out"], help="run folder (default runs/train)")
    add("--resume", default=None, metavar="CHECKPOINT", help="continue from a checkpoint.npz")
    add("--quiet", action="store_true", help="no progress bar or summary")
    args = parser.parse_args(argv)
    if isinstance(args.kernel_size, int):
        args.kernel_size = (args.kernel_size,) * 2
    if isinstance(args.stride, int):
        args.stride = (args.stride,) * 2
    if isinstance(args.pixel_range, str):
        args.pixel_range = float_pair(args.pixel_range)
    if args.epochs is None:
        args.epochs = MODEL_DEFAULTS[args.model]["epochs"]
    if args.batch_size is None:
        args.batch_size = MODEL_DEFAULTS[args.model]["batch_size"]
    if args.epochs < 1 or args.batch_size < 1 or args.filters < 1:
        parser.error("--epochs, --batch-size and --filters must be >= 1")
    if args.lr is None:
        args.lr = (
            MODEL_DEFAULTS[args.model]["adam_lr"] if args.optimizer == "adam" else DEFAULT_LR[args.optimizer]
        )
    if args.lr <= 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    digits = args.digits.split(",")
    if len(digits) != 2 or not all(d.strip().isdigit() for d in digits) or digits[0] == digits[1]:
        parser.error(f"--digits must be two different digits like 3,8, got {args.digits!r}")
    args.digits = tuple(int(d) for d in digits)
    if args.seeds is not None:
        try:
            args.seeds = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            parser.error(f"--seeds must be comma-separated ints, got {args.seeds!r}")
        if args.resume:
            parser.error("--resume resumes one run; it cannot be combined with --seeds")
    return args


def make_optimizer(name: str, lr: float):
    import optax

    import jaxbp

    return {"adam": optax.adam, "sgd": jaxbp.sgd, "momentum": lambda a: optax.sgd(a, momentum=0.9)}[name](lr)


def tree_rel_diff(a, b):
    """max over leaves of max|a - b| / max(1e-12, max|a| + max|b|) (jaxbp.check's measure, traced)."""
    import jax
    import jax.numpy as jnp

    def leaf(u, v):
        return jnp.max(jnp.abs(u - v)) / jnp.maximum(1e-12, jnp.max(jnp.abs(u)) + jnp.max(jnp.abs(v)))

    return jnp.max(jnp.stack(jax.tree.leaves(jax.tree.map(leaf, a, b))))


def model_functions(model) -> dict:
    """The calls that differ between the slides' ConvNetSpec API and a layer `Network`.

    Returns a dict of batch functions: init(key, dtype), forward(params, x) -> O (probabilities
    for a network), loss(params, x, y), manual and autodiff (params, x, y) -> (E, grads), and
    filters(params) -> the first conv's (kh, kw, C, K) filters. "autodiff" is jax.grad of the
    batch-mean loss, as in `make_update_step(grads="autodiff")`.
    """
    import jax

    import jaxbp

    if isinstance(model, jaxbp.Network):
        return dict(
            init=model.init,
            forward=model.predict,
            loss=model.loss_value,
            manual=model.manual_value_and_grads,
            autodiff=jax.value_and_grad(model.loss_value),
            filters=lambda params: params[0].f,
        )
    return dict(
        init=lambda key, dtype: jaxbp.init_params(key, model, dtype),
        forward=lambda p, x: jaxbp.forward(p, x, model),
        loss=lambda p, x, y: jaxbp.loss(p, x, y, model),
        manual=lambda p, x, y: jaxbp.manual_value_and_grads(p, x, y, model),
        autodiff=jax.value_and_grad(lambda p, x, y: jaxbp.loss(p, x, y, model)),
        filters=lambda params: params.f,
    )


@functools.cache
def make_step(spec, optimizer_name: str, lr: float, grads: str):
    """The jitted update step of every trajectory (cached per setting).

    Returns ``step(states, x, y) -> (states, losses, diffs)`` with states a dict trajectory ->
    (params, opt_state), x (B, H, W, C), losses a dict trajectory -> the batch loss before the
    update, and diffs (for grads="both") the relative differences of the gradients the two
    trajectories stepped with and of their params after the step.

    A Python loop calls it once per batch: measured on this CPU, a `lax.scan` over an epoch's
    steps ran float64 steps 8x slower (0.71 s vs 0.087 s per step, K=32, 5x5, batch 32).
    """
    import jax
    import optax

    import jaxbp

    optimizer = make_optimizer(optimizer_name, lr)
    if grads == "both":
        # make_update_step's step, with the gradient kept so the two can be compared
        def stepper(value_and_grads):
            def step(params, opt_state, x, y):
                E, g = value_and_grads(params, x, y)
                updates, opt_state = optimizer.update(g, opt_state, params)
                return optax.apply_updates(params, updates), opt_state, E, g

            return step

        fns = model_functions(spec)
        manual, autodiff = stepper(fns["manual"]), stepper(fns["autodiff"])

        def body(states, x, y):
            p_m, s_m, E_m, g_m = manual(*states["manual"], x, y)
            p_a, s_a, E_a, g_a = autodiff(*states["autodiff"], x, y)
            diffs = {"grad_rel_diff": tree_rel_diff(g_m, g_a), "param_rel_diff": tree_rel_diff(p_m, p_a)}
            return {"manual": (p_m, s_m), "autodiff": (p_a, s_a)}, {"manual": E_m, "autodiff": E_a}, diffs

    else:
        step = jaxbp.make_update_step(spec, optimizer, grads=grads)

        def body(states, x, y):
            params, opt_state, E = step(*states[grads], x, y)
            return {grads: (params, opt_state)}, {grads: E}, {}

    # The step is inlined into this jit (OptionsJit), so this outer one carries the XLA options.
    return jax.jit(body, compiler_options=jaxbp.compiler_options())


@functools.cache
def make_evaluate(spec):
    """Jitted ``evaluate(params, x, y) -> (mean loss, O)`` on a whole test set."""
    import jax

    import jaxbp

    fns = model_functions(spec)
    return jax.jit(
        lambda params, x, y: (fns["loss"](params, x, y), fns["forward"](params, x)),
        compiler_options=jaxbp.compiler_options(),
    )


def epoch_order(seed: int, epoch: int, n: int, batch_size: int) -> np.ndarray:
    """(steps, batch_size) example indices of one epoch: a permutation seeded by (seed, epoch),
    the last incomplete batch dropped (a new permutation each epoch reaches every example)."""
    steps = n // batch_size
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[: steps * batch_size].reshape(steps, batch_size)


def run(args: argparse.Namespace) -> dict:
    """Train one run as configured by `args`; write its folder; return its metrics."""
    start = time.perf_counter()
    import jax

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import jaxbp
    from jaxbp import checkpoint
    from jaxbp import data

    dtype = jnp.dtype(args.dtype)
    dataset = data.load_dataset(args.data, split_seed=args.split_seed, pixel_range=args.pixel_range)
    task = data.make_task(dataset, args.task, args.digits)
    x_train, y_train = task.x_train.astype(dtype), task.y_train.astype(dtype)
    x_test, y_test = jnp.asarray(task.x_test, dtype), jnp.asarray(task.y_test, dtype)
    if len(x_train) < args.batch_size:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the training set ({len(x_train)})")
    if args.model == "lenet":
        loss = jaxbp.SigmoidBinaryCrossEntropy() if task.n_out == 1 else jaxbp.SoftmaxCrossEntropy()
        activation = {"tanh": jaxbp.Tanh, "relu": jaxbp.Relu, "sigmoid": jaxbp.Sigmoid}[args.activation]()
        spec = jaxbp.lenet5(
            tuple(x_train.shape[1:]), task.n_out, activation=activation, pooling=args.pooling, loss=loss
        )
    else:
        spec = jaxbp.ConvNetSpec(
            in_shape=tuple(x_train.shape[1:]),
            n_filters=args.filters,
            kernel_size=tuple(args.kernel_size),
            stride=tuple(args.stride),
            padding=args.padding,
            n_out=task.n_out,
        )
    fns = model_functions(spec)
    config = {k: v for k, v in vars(args).items() if k not in ("quiet", "out", "resume", "seeds")}
    config = json.loads(json.dumps(config))  # tuples -> lists, as they will read back
    names = TRAJECTORIES[args.grads]
    optimizer = make_optimizer(args.optimizer, args.lr)
    params = fns["init"](jax.random.key(args.seed), dtype)
    states = {name: (params, optimizer.init(params)) for name in names}
    history = {name: {"train_loss": [], "test_loss": [], "test_accuracy": []} for name in names}
    diffs = {"grad_rel_diff": [], "param_rel_diff": []}
    first_epoch = 0
    if args.resume:
        states, meta = checkpoint.load_checkpoint(args.resume, states, spec=spec)
        saved = meta["config"]
        mismatched = {k: (saved.get(k), config[k]) for k in RESUME_KEYS if saved.get(k) != config[k]}
        if mismatched:
            raise ValueError(
                f"{args.resume} was saved by a run with other settings (checkpoint's, now): {mismatched}"
            )
        first_epoch, history, diffs = meta["epoch"], meta["history"], meta["diffs"]
        if first_epoch > args.epochs:
            raise ValueError(f"{args.resume} is at epoch {first_epoch}, past --epochs {args.epochs}")

    os.makedirs(args.out, exist_ok=True)
    step = make_step(spec, args.optimizer, args.lr, args.grads)
    evaluate = make_evaluate(spec)
    from tqdm import tqdm

    bar = tqdm(
        range(first_epoch, args.epochs),
        initial=first_epoch,
        total=args.epochs,
        desc=f"{args.grads} seed {args.seed}",
        unit="epoch",
        disable=args.quiet,
        file=sys.stderr,
    )
    for epoch in bar:
        order = epoch_order(args.seed, epoch, len(x_train), args.batch_size)
        xs, ys = jnp.asarray(x_train[order]), jnp.asarray(y_train[order])
        per_step = []
        for t in range(len(order)):
            states, losses, step_diffs = step(states, xs[t], ys[t])
            per_step.append((losses, step_diffs))
        losses, step_diffs = jax.tree.map(lambda *v: np.asarray(jnp.stack(v)), *per_step)
        for name in names:
            test_loss, O = evaluate(states[name][0], x_test, y_test)
            accuracy = float(np.mean(data.predicted_class(np.asarray(O)) == task.labels_test))
            history[name]["train_loss"].append(float(np.mean(losses[name])))
            history[name]["test_loss"].append(float(test_loss))
            history[name]["test_accuracy"].append(accuracy)
        for key, values in step_diffs.items():
            diffs[key].extend(np.asarray(values, np.float64).tolist())
        shown = history[names[0]]
        bar.set_postfix(loss=f"{shown['train_loss'][-1]:.4f}", test_acc=f"{shown['test_accuracy'][-1]:.4f}")
        meta = {"epoch": epoch + 1, "config": config, "history": history, "diffs": diffs}
        checkpoint.save_checkpoint(os.path.join(args.out, "checkpoint.npz"), states, spec=spec, metadata=meta)
    bar.close()
    train_time = time.perf_counter() - start

    primary = names[0]
    metrics = {
        "config": config,
        "spec": checkpoint.spec_to_dict(spec),
        "data": {"source": dataset.name, "n_train": len(x_train), "n_test": len(x_test)},
        "epochs_run": args.epochs - first_epoch,
        "test_accuracy": history[primary]["test_accuracy"][-1],
        "test_loss": history[primary]["test_loss"][-1],
        "epochs": history[primary],
        "trajectories": history,
    }
    if args.grads == "both":
        final = tree_rel_diff(states["manual"][0], states["autodiff"][0])
        metrics["gradient_agreement"] = {
            "grad_rel_diff": diffs["grad_rel_diff"],
            "param_rel_diff": diffs["param_rel_diff"],
            "max_grad_rel_diff": max(diffs["grad_rel_diff"], default=0.0),
            "final_param_rel_diff": float(final),
            "measure": "max over leaves of max|a-b| / max(1e-12, max|a| + max|b|)",
        }
    params = states[primary][0]
    _, O_test = evaluate(params, x_test, y_test)
    plots.curves(os.path.join(args.out, "curves.png"), history)
    plots.filters(os.path.join(args.out, "filters.png"), np.asarray(fns["filters"](params)))
    plots.predictions(
        os.path.join(args.out, "predictions.png"),
        task.x_test,
        task.labels_test,
        data.predicted_class(np.asarray(O_test)),
        task.class_names,
    )
    if args.grads == "both":
        plots.gradient_agreement(
            os.path.join(args.out, "grad_agreement.png"),
            diffs,
            steps_per_epoch=len(x_train) // args.batch_size,
            dtype=args.dtype,
        )
    metrics["train_time_s"] = train_time
    metrics["wall_time_s"] = time.perf_counter() - start
    with open(os.path.join(args.out, "metrics.json"), "w") as file:
        json.dump(metrics, file, indent=1)
    if not args.quiet:
        summary = f"test accuracy {metrics['test_accuracy']:.4f}, {metrics['wall_time_s']:.1f} s"
        if args.grads == "both":
            agreement = metrics["gradient_agreement"]
            summary += (
                f"; manual vs autodiff: largest gradient difference {agreement['max_grad_rel_diff']:.2e}, "
                f"final params {agreement['final_param_rel_diff']:.2e}"
            )
        print(f"{summary}; wrote {args.out}/")
    return metrics


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.seeds is None:
        return run(args)
    out, results = args.out, {}
    for seed in args.seeds:
        args.seed, args.out = seed, os.path.join(out, f"seed_{seed}")
        results[seed] = run(args)
    accuracies = [results[s]["test_accuracy"] for s in args.seeds]
    summary = {
        "seeds": args.seeds,
        "test_accuracy": accuracies,
        "min_test_accuracy": min(accuracies),
        "mean_test_accuracy": float(np.mean(accuracies)),
        "wall_time_s": [results[s]["wall_time_s"] for s in args.seeds],
    }
    with open(os.path.join(out, "seeds.json"), "w") as file:
        json.dump(summary, file, indent=1)
    if not args.quiet:
        print(f"seeds {args.seeds}: test accuracy {accuracies}, min {min(accuracies):.4f}; wrote {out}/")
    return summary


if __name__ == "__main__":
    main()
