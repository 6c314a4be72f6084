r"""Layers and losses to compose into feed-forward networks, each forward beside its backward.

A layer is a frozen, hashable dataclass holding only static hyperparameters (so a stack of them
is a valid static argument of `jax.jit`), with four methods, all per example (no batch axis):

- ``init(key, in_shape, dtype) -> params``: a NamedTuple pytree (``()`` when parameter-free);
- ``out_shape(in_shape) -> shape``: shape arithmetic, a ValueError on an input it cannot take;
- ``apply(params, x) -> y``: the forward;
- ``vjp(params, x, y, dE_dy) -> (dE_dparams, dE_dx)``: the hand-written backward, given the
  forward's input x and output y and the cotangent dE/dy of the output. dE_dparams has the
  structure of params.

A loss has ``value(o, y) -> E``, ``vjp(o, y) -> dE/do``, ``check_targets(o_shape, y_shape)``,
``check_output(o_shape)`` and ``to_output(o)`` (what a prediction reads: probabilities for the
cross-entropies, which take logits).

The math lives in `jaxbp.ops`; nothing here calls an autodiff transform. Layout: images
(H, W, C), filters (kh, kw, C, K) HWIO, as everywhere in jaxbp.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple
from typing import Protocol
from typing import runtime_checkable

import jax
import jax.numpy as jnp
from jax import lax

from jaxbp import ops
from jaxbp.spec import Padding
from jaxbp.spec import _int_pair
from jaxbp.spec import conv_output_hw
from jaxbp.spec import explicit_padding
from jaxbp.spec import normalize_padding

Shape = tuple[int, ...]


@runtime_checkable
class Layer(Protocol):
    """What `jaxbp.Network` needs of a layer (see the module docstring)."""

    def init(self, key: jax.Array, in_shape: Shape, dtype) -> tuple: ...

    def out_shape(self, in_shape: Shape) -> Shape: ...

    def apply(self, params, x: jax.Array) -> jax.Array: ...

    def vjp(self, params, x: jax.Array, y: jax.Array, dE_dy: jax.Array) -> tuple: ...


@runtime_checkable
class Loss(Protocol):
    """What `jaxbp.Network` needs of a loss (see the module docstring)."""

    def value(self, o: jax.Array, y: jax.Array) -> jax.Array: ...

    def vjp(self, o: jax.Array, y: jax.Array) -> jax.Array: ...

    def check_output(self, o_shape: Shape) -> None: ...

    def check_targets(self, o_shape: Shape, y_shape: Shape) -> None: ...

    def to_output(self, o: jax.Array) -> jax.Array: ...


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_precision(layer) -> None:
    if layer.precision is not None and not isinstance(layer.precision, lax.Precision):
        object.__setattr__(layer, "precision", lax.Precision(layer.precision))


def _image_shape(layer, in_shape: Shape) -> Shape:
    in_shape = tuple(in_shape)
    if len(in_shape) != 3:
        raise ValueError(f"{type(layer).__name__} takes an (H, W, C) image, got input shape {in_shape}")
    return in_shape


def _check_shape(layer, x: jax.Array) -> None:
    """Validate the per-example input (static shapes, so this runs at trace time)."""
    layer.out_shape(x.shape)


# ---------------------------------------------------------------------------------------------
# Convolution with an optional bias.
# ---------------------------------------------------------------------------------------------


class Conv2DParams(NamedTuple):
    """f: (kh, kw, C, K) filters, HWIO; b: (K,) bias, or None when the layer has none."""

    f: jax.Array
    b: jax.Array | None


@dataclasses.dataclass(frozen=True)
class Conv2D:
    r"""Z = conv(X, f) + b: strided, padded, dilated cross-correlation, C -> K channels.

    .. math::
       Z[i, j, k] = \sum_{a, b, c} X_{pad}[i s_h + a d_h,\; j s_w + b d_w,\; c]\, f[a, b, c, k] + b_k

    (a, b run over the filter's rows and columns; b_k is the bias.)

    Attributes:
      n_filters: K, the output channels.
      kernel_size: (kh, kw) (an int means square).
      stride: (sh, sw).
      padding: "VALID", "SAME" or explicit ((top, bottom), (left, right)).
      dilation: (dh, dw), the filter dilation.
      use_bias: add a per-channel bias b (K,); the slides' convolution has none.
      precision: lax precision of the convs (None: backend default).
    """

    n_filters: int
    kernel_size: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (1, 1)
    padding: Padding = "VALID"
    dilation: tuple[int, int] = (1, 1)
    use_bias: bool = True
    precision: lax.Precision | None = None

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        _positive_int("n_filters", self.n_filters)
        set_("kernel_size", _int_pair("kernel_size", self.kernel_size, minimum=1))
        set_("stride", _int_pair("stride", self.stride, minimum=1))
        set_("dilation", _int_pair("dilation", self.dilation, minimum=1))
        set_("padding", normalize_padding(self.padding))
        if not isinstance(self.use_bias, bool):
            raise TypeError(f"use_bias must be a bool, got {self.use_bias!r}")
        _check_precision(self)

    def pads(self, in_hw: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """The padding as explicit ((top, bottom), (left, right)) for an (H, W) input."""
        return explicit_padding(self.padding, tuple(in_hw), self.kernel_size, self.stride, self.dilation)

    def _conv_kwargs(self, in_hw: tuple[int, int]) -> dict:
        return dict(
            stride=self.stride, padding=self.pads(in_hw), dilation=self.dilation, precision=self.precision
        )

    def out_shape(self, in_shape: Shape) -> Shape:
        """(H, W, C) -> (Ho, Wo, K)."""
        h, w, _ = _image_shape(self, in_shape)
        hw = conv_output_hw((h, w), self.kernel_size, self.stride, self.pads((h, w)), self.dilation)
        return (*hw, self.n_filters)

    def init(self, key: jax.Array, in_shape: Shape, dtype=jnp.float32) -> Conv2DParams:
        """LeCun normal f (variance 1 / (kh kw C)); zero bias."""
        c = _image_shape(self, in_shape)[2]
        init = jax.nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3)
        f = init(key, (*self.kernel_size, c, self.n_filters), dtype)
        return Conv2DParams(f=f, b=jnp.zeros((self.n_filters,), dtype) if self.use_bias else None)

    def apply(self, params: Conv2DParams, x: jax.Array) -> jax.Array:
        """x (H, W, C) -> (Ho, Wo, K)."""
        _check_shape(self, x)
        z = ops.conv2d(x, params.f, **self._conv_kwargs(x.shape[:2]))
        return z + params.b[None, None, :] if self.use_bias else z

    def vjp(self, params: Conv2DParams, x, y, dE_dy) -> tuple[Conv2DParams, jax.Array]:
        r"""With delta = dE/dZ (Ho, Wo, K):

        .. math::
           \frac{\partial E}{\partial f} = \operatorname{conv}(X, \delta), \quad
           \frac{\partial E}{\partial b_k} = \sum_{i,j} \delta[i, j, k], \quad
           \frac{\partial E}{\partial X} = \text{full correlation of } \delta \text{ with flipped } f
        """
        del y
        delta = dE_dy
        kwargs = self._conv_kwargs(x.shape[:2])
        dE_df = ops.conv2d_filter_vjp(x, delta, kernel_size=self.kernel_size, **kwargs)
        dE_db = ops.channel_bias_vjp(delta) if self.use_bias else None
        dE_dx = ops.conv2d_input_vjp(delta, params.f, in_hw=x.shape[:2], **kwargs)
        return Conv2DParams(f=dE_df, b=dE_db), dE_dx

    def batch_vjp(self, params: Conv2DParams, x, y, dE_dy) -> tuple[Conv2DParams, jax.Array]:
        """`vjp` over a batch (leading axis N): dE/dparams summed over examples, dE/dx per example.

        The filter gradient's sum over examples is one conv with the batch contracted
        (`ops.conv2d_filter_vjp_sum`), not N grouped convs; dE/dx vmaps the per-example form,
        which XLA turns into one batched conv (the filters are shared).
        """
        del y
        kwargs = self._conv_kwargs(x.shape[1:3])
        dE_df = ops.conv2d_filter_vjp_sum(x, dE_dy, kernel_size=self.kernel_size, **kwargs)
        dE_db = jnp.sum(dE_dy, axis=(0, 1, 2)) if self.use_bias else None
        input_vjp = lambda delta: ops.conv2d_input_vjp(delta, params.f, in_hw=x.shape[1:3], **kwargs)  # noqa: E731
        return Conv2DParams(f=dE_df, b=dE_db), jax.vmap(input_vjp)(dE_dy)


# ---------------------------------------------------------------------------------------------
# Elementwise activations: any input shape, no parameters.
# ---------------------------------------------------------------------------------------------


class _Elementwise:
    def out_shape(self, in_shape: Shape) -> Shape:
        return tuple(in_shape)

    def init(self, key: jax.Array, in_shape: Shape, dtype=jnp.float32) -> tuple:
        del key, in_shape, dtype
        return ()


@dataclasses.dataclass(frozen=True)
class Sigmoid(_Elementwise):
    r"""H = sigmoid(Z); backward dE/dZ = dE/dH H (1 - H), the slides' H1(1 - H1) and O(1 - O)."""

    def apply(self, params: tuple, x: jax.Array) -> jax.Array:
        return ops.sigmoid(x)

    def vjp(self, params: tuple, x, y, dE_dy) -> tuple[tuple, jax.Array]:
        return (), ops.sigmoid_vjp(y, dE_dy)


@dataclasses.dataclass(frozen=True)
class Tanh(_Elementwise):
    r"""H = tanh(Z); backward dE/dZ = dE/dH (1 - H^2)."""

    def apply(self, params: tuple, x: jax.Array) -> jax.Array:
        return ops.tanh(x)

    def vjp(self, params: tuple, x, y, dE_dy) -> tuple[tuple, jax.Array]:
        return (), ops.tanh_vjp(y, dE_dy)


@dataclasses.dataclass(frozen=True)
class Relu(_Elementwise):
    r"""H = max(Z, 0); backward dE/dZ = dE/dH [Z > 0] (0 at Z = 0, as `jax.nn.relu`)."""

    def apply(self, params: tuple, x: jax.Array) -> jax.Array:
        return ops.relu(x)

    def vjp(self, params: tuple, x, y, dE_dy) -> tuple[tuple, jax.Array]:
        return (), ops.relu_vjp(x, dE_dy)


# ---------------------------------------------------------------------------------------------
# Pooling, per channel.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Pool:
    """Shared hyperparameters and shape arithmetic of `AvgPool` and `MaxPool`.

    Attributes:
      window: (wh, ww) (an int means square).
      stride: (sh, sw); None (the default) means the window, non-overlapping.
      padding: "VALID", "SAME" or explicit ((top, bottom), (left, right)); explicit pads must be
        smaller than the window, so that every window reads at least one input entry.
    """

    window: tuple[int, int] = (2, 2)
    stride: tuple[int, int] | None = None
    padding: Padding = "VALID"

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("window", _int_pair("window", self.window, minimum=1))
        set_("stride", self.window if self.stride is None else _int_pair("stride", self.stride, minimum=1))
        set_("padding", normalize_padding(self.padding))
        if not isinstance(self.padding, str) and any(
            p >= w for pair, w in zip(self.padding, self.window) for p in pair
        ):
            raise ValueError(
                f"padding must be smaller than the window {self.window} on each side, got {self.padding}"
            )

    def pads(self, in_hw: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """The padding as explicit ((top, bottom), (left, right)) for an (H, W) input."""
        return explicit_padding(self.padding, tuple(in_hw), self.window, self.stride, (1, 1))

    def _pool_kwargs(self, in_hw: tuple[int, int]) -> dict:
        return dict(window=self.window, stride=self.stride, padding=self.pads(in_hw))

    def out_shape(self, in_shape: Shape) -> Shape:
        """(H, W, C) -> (Ho, Wo, C); a ValueError if the window is larger than the padded input."""
        h, w, c = _image_shape(self, in_shape)
        pads = self.pads((h, w))
        for axis, n, k, (lo, hi) in zip(("height", "width"), (h, w), self.window, pads):
            if k > n + lo + hi:
                raise ValueError(
                    f"{type(self).__name__}: the pooling window {self.window} is larger than the padded "
                    f"input {axis} ({n}+{lo}+{hi} = {n + lo + hi}) of input shape {tuple(in_shape)}"
                )
        return (*conv_output_hw((h, w), self.window, self.stride, pads, (1, 1)), c)

    def init(self, key: jax.Array, in_shape: Shape, dtype=jnp.float32) -> tuple:
        del key, in_shape, dtype
        return ()


@dataclasses.dataclass(frozen=True)
class AvgPool(_Pool):
    r"""Y = mean of each window (padding counts as zeros); dE/dX: delta / (wh ww) to each entry."""

    def apply(self, params: tuple, x: jax.Array) -> jax.Array:
        _check_shape(self, x)
        return ops.avg_pool(x, **self._pool_kwargs(x.shape[:2]))

    def vjp(self, params: tuple, x, y, dE_dy) -> tuple[tuple, jax.Array]:
        return (), ops.avg_pool_vjp(dE_dy, in_hw=x.shape[:2], **self._pool_kwargs(x.shape[:2]))


@dataclasses.dataclass(frozen=True)
class MaxPool(_Pool):
    r"""Y = max of each window; dE/dX: delta to each window's first maximum (JAX's tie rule)."""

    def apply(self, params: tuple, x: jax.Array) -> jax.Array:
        _check_shape(self, x)
        return ops.max_pool(x, **self._pool_kwargs(x.shape[:2]))

    def vjp(self, params: tuple, x, y, dE_dy) -> tuple[tuple, jax.Array]:
        return (), ops.max_pool_vjp(x, y, dE_dy, **self._pool_kwargs(x.shape[:2]))


# ---------------------------------------------------------------------------------------------
# Flatten and Dense.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Flatten:
    """Any shape -> (D,), C order; the backward reshapes back."""

    def out_shape(self, in_shape: Shape) -> Shape:
        return (math.prod(in_shape),)

    def init(self, key: jax.Array, in_shape: Shape, dtype=jnp.float32) -> tuple:
        del key, in_shape, dtype
        return ()

    def apply(self, params: tuple, x: jax.Array) -> jax.Array:
        return ops.flatten(x)

    def vjp(self, params: tuple, x, y, dE_dy) -> tuple[tuple, jax.Array]:
        return (), ops.flatten_vjp(dE_dy, x.shape)


class DenseParams(NamedTuple):
    """W: (D, n_out) weights; b: (n_out,) bias."""

    W: jax.Array
    b: jax.Array


@dataclasses.dataclass(frozen=True)
class Dense:
    r"""Z = W^T H + b, H (D,) -> Z (n_out,).

    Attributes:
      n_out: number of outputs.
      precision: lax precision of the matmuls.
    """

    n_out: int
    precision: lax.Precision | None = None

    def __post_init__(self):
        _positive_int("n_out", self.n_out)
        _check_precision(self)

    def out_shape(self, in_shape: Shape) -> Shape:
        """(D,) -> (n_out,)."""
        if len(in_shape) != 1:
            raise ValueError(
                f"Dense takes a flat (D,) input, got input shape {tuple(in_shape)}; put Flatten() before it"
            )
        return (self.n_out,)

    def init(self, key: jax.Array, in_shape: Shape, dtype=jnp.float32) -> DenseParams:
        """LeCun normal W (variance 1 / D); zero bias."""
        self.out_shape(in_shape)
        (d,) = in_shape
        W = jax.nn.initializers.lecun_normal()(key, (d, self.n_out), dtype)
        return DenseParams(W=W, b=jnp.zeros((self.n_out,), dtype))

    def apply(self, params: DenseParams, x: jax.Array) -> jax.Array:
        _check_shape(self, x)
        return ops.dense(x, params.W, params.b, precision=self.precision)

    def vjp(self, params: DenseParams, x, y, dE_dy) -> tuple[DenseParams, jax.Array]:
        r"""dE/dW = H delta^T, dE/db = delta, dE/dH = W delta, with delta = dE/dZ."""
        dE_dW, dE_db, dE_dx = ops.dense_vjp(x, params.W, dE_dy, precision=self.precision)
        return DenseParams(W=dE_dW, b=dE_db), dE_dx

    def batch_vjp(self, params: DenseParams, x, y, dE_dy) -> tuple[DenseParams, jax.Array]:
        r"""`vjp` over a batch: :math:`\sum_n H_n \delta_n^T = H^T \Delta` as one matmul,
        :math:`\sum_n \delta_n`, and dE/dx = Delta W^T per example."""
        del y
        dE_dW = jnp.dot(x.T, dE_dy, precision=self.precision)
        return DenseParams(W=dE_dW, b=jnp.sum(dE_dy, axis=0)), jnp.dot(
            dE_dy, params.W.T, precision=self.precision
        )


# ---------------------------------------------------------------------------------------------
# Losses, per example: E(o, y) for the network's last output o and the target y.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _LossBase:
    def check_output(self, o_shape: Shape) -> None:
        del o_shape

    def check_targets(self, o_shape: Shape, y_shape: Shape) -> None:
        """Targets have the output's shape; a ValueError otherwise (never a silent broadcast)."""
        if tuple(y_shape) != tuple(o_shape):
            raise ValueError(
                f"{self!r}: targets y must have the network output's shape {tuple(o_shape)}, "
                f"got {tuple(y_shape)}"
            )


@dataclasses.dataclass(frozen=True)
class HalfSquaredError(_LossBase):
    r"""The slides' loss: E = \sum_j (O_j - Y_j)^2 / 2; dE/dO = O - Y."""

    def value(self, o: jax.Array, y: jax.Array) -> jax.Array:
        self.check_targets(o.shape, y.shape)
        return ops.half_squared_error(o, y)

    def vjp(self, o: jax.Array, y: jax.Array) -> jax.Array:
        self.check_targets(o.shape, y.shape)
        return ops.half_squared_error_vjp(o, y)

    def to_output(self, o: jax.Array) -> jax.Array:
        return o


@dataclasses.dataclass(frozen=True)
class SigmoidBinaryCrossEntropy(_LossBase):
    r"""Independent binary targets Y in [0, 1] on logits Z: E = \sum_j \log(1 + e^{Z_j}) - Y_j Z_j.

    dE/dZ = sigmoid(Z) - Y. `to_output` gives the probabilities sigmoid(Z).
    """

    def value(self, o: jax.Array, y: jax.Array) -> jax.Array:
        self.check_targets(o.shape, y.shape)
        return ops.sigmoid_binary_cross_entropy(o, y)

    def vjp(self, o: jax.Array, y: jax.Array) -> jax.Array:
        self.check_targets(o.shape, y.shape)
        return ops.sigmoid_binary_cross_entropy_vjp(o, y)

    def to_output(self, o: jax.Array) -> jax.Array:
        return ops.sigmoid(o)


@dataclasses.dataclass(frozen=True)
class SoftmaxCrossEntropy(_LossBase):
    r"""Class targets Y (n,) (one-hot or probabilities) on logits Z (n,): E = -\sum_j Y_j \log softmax(Z)_j.

    dE/dZ = (sum Y) softmax(Z) - Y. `to_output` gives softmax(Z).
    """

    def check_output(self, o_shape: Shape) -> None:
        if len(o_shape) != 1:
            raise ValueError(
                f"{self!r} takes logits of shape (n_classes,), got output shape {tuple(o_shape)}"
            )

    def value(self, o: jax.Array, y: jax.Array) -> jax.Array:
        self.check_output(o.shape)
        self.check_targets(o.shape, y.shape)
        return ops.softmax_cross_entropy(o, y)

    def vjp(self, o: jax.Array, y: jax.Array) -> jax.Array:
        self.check_output(o.shape)
        self.check_targets(o.shape, y.shape)
        return ops.softmax_cross_entropy_vjp(o, y)

    def to_output(self, o: jax.Array) -> jax.Array:
        return jnp.exp(ops.log_softmax(o))
