"""PNG plots of the experiments (matplotlib, Agg backend): a training run's curves, filters,
agreement and predictions; the benchmark's compile time against the kernels XLA generates."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

STYLES = {"manual": dict(color="C0", linestyle="-"), "autodiff": dict(color="C1", linestyle="--")}


def curves(path: str, history: dict) -> None:
    """Train loss, test loss and test accuracy per epoch; one line per trajectory, overlaid."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, h in history.items():
        epochs = np.arange(1, len(h["train_loss"]) + 1)
        style = STYLES.get(name, {})
        axes[0].plot(epochs, h["train_loss"], label=name, **style)
        axes[1].plot(epochs, h["test_loss"], label=name, **style)
        axes[2].plot(epochs, h["test_accuracy"], label=name, **style)
    titles = ["train loss (mean over the epoch's batches)", "test loss", "test accuracy"]
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    final = {name: h["test_accuracy"][-1] for name, h in history.items()}
    accuracies = ", ".join(f"{k} {v:.4f}" for k, v in final.items())
    fig.suptitle(f"E = sum((O - Y)^2) / 2; final test accuracy {accuracies}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def filters(path: str, f: np.ndarray) -> None:
    """The learned filters f (kh, kw, C, K) as K images (channel 0), tiled into one mosaic on one
    symmetric colour scale (a single image: fast to draw)."""
    kh, kw, _, k = f.shape
    cols = min(k, 8)
    rows = -(-k // cols)
    mosaic = np.full((rows * (kh + 1) - 1, cols * (kw + 1) - 1), np.nan)
    for i in range(k):
        r, c = divmod(i, cols)
        mosaic[r * (kh + 1) : r * (kh + 1) + kh, c * (kw + 1) : c * (kw + 1) + kw] = f[:, :, 0, i]
    scale = float(np.max(np.abs(f[:, :, 0, :]))) or 1.0
    fig, ax = plt.subplots(figsize=(0.9 * cols + 1.5, 0.9 * rows + 0.8))
    image = ax.imshow(mosaic, cmap="RdBu_r", vmin=-scale, vmax=scale)
    ax.set_axis_off()
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_title(f"{k} learned filters, {kh}x{kw} (channel 0), row by row", fontsize=10)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def gradient_agreement(path: str, diffs: dict, *, steps_per_epoch: int, dtype: str) -> None:
    """Per-step relative differences manual vs autodiff: gradients, and the two params trajectories."""
    eps = float(np.finfo(dtype).eps)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    epochs = (np.arange(len(diffs["grad_rel_diff"])) + 1) / steps_per_epoch
    floor = eps * 1e-3  # exact zeros shown on the log axis just under the machine epsilon
    ax.plot(
        epochs, np.maximum(diffs["grad_rel_diff"], floor), ".", ms=2, label="gradients the runs step with"
    )
    ax.plot(epochs, np.maximum(diffs["param_rel_diff"], floor), "-", lw=1, label="params of the two runs")
    ax.axhline(eps, color="gray", lw=0.8, linestyle=":", label=f"{dtype} machine epsilon")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("max|a-b| / (max|a| + max|b|)")
    title = f"manual backward vs jax.grad over training ({dtype}); exact zeros drawn at {floor:.0e}"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def predictions(
    path: str, x: np.ndarray, labels: np.ndarray, predicted: np.ndarray, class_names, n=24
) -> None:
    """The first `n` test images with predicted and true class; mistakes in red. Then the first
    mistakes, so a few of them are shown whenever there are any."""
    wrong = np.flatnonzero(predicted != labels)
    shown = list(range(min(n - min(len(wrong), n // 3), len(x))))
    shown += [i for i in wrong if i not in shown][: n - len(shown)]
    cols = 8
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.6 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, i in zip(axes.flat, shown):
        ax.imshow(x[i, :, :, 0], cmap="gray_r")
        ok = predicted[i] == labels[i]
        title = f"{class_names[predicted[i]]} (true {class_names[labels[i]]})"
        ax.set_title(title, fontsize=8, color="black" if ok else "red")
    fig.suptitle(f"test digits: prediction (true); {len(wrong)} of {len(x)} wrong, in red", fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.88, hspace=0.5)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compile_kernels(path: str, points: dict, fit: dict) -> None:
    """experiments/bench.py's compile times against the kernels XLA generated: `points` maps
    "manual" and "autodiff" to (kernels, seconds) pairs, `fit` is bench.compile_fit's line."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, marker in (("manual", "o"), ("autodiff", "s")):
        k, s = np.array(points[name], dtype=float).reshape(-1, 2).T
        label = "manual step" if name == "manual" else "jax.grad step"
        ax.scatter(k, s, marker=marker, s=22, alpha=0.7, color=STYLES[name]["color"], label=label)
    k = np.linspace(*ax.get_xlim(), 2)
    fitted = fit["intercept_s"] + fit["slope_s"] * k
    text = f"{fit['intercept_s']:.2f} s + {1e3 * fit['slope_s']:.0f} ms per kernel (r = {fit['r']:.2f})"
    ax.plot(k, fitted, color="gray", lw=1, linestyle=":", label=text)
    ax.set_xlabel("kernels XLA generates code for (fusions in the optimized program)")
    ax.set_ylabel("compile time, s (lower + compile)")
    ax.set_title(f"compile time against generated kernels, {fit['n']} compiles", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
