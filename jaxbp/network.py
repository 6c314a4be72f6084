r"""Feed-forward networks composed of `jaxbp.layers`: the slides' chain rule, generalised.

For layers :math:`a_{l+1} = g_l(\theta_l, a_l)`, l = 0 .. L-1, with :math:`a_0 = X` and loss
:math:`E = \ell(a_L, Y)`, the backward starts from :math:`\partial E / \partial a_L = \ell'(a_L, Y)`
and runs the layers' VJPs in reverse:

.. math::
   \frac{\partial E}{\partial \theta_l} = \Big(\frac{\partial a_{l+1}}{\partial \theta_l}\Big)^T
   \frac{\partial E}{\partial a_{l+1}}, \qquad
   \frac{\partial E}{\partial a_l} = \Big(\frac{\partial a_{l+1}}{\partial a_l}\Big)^T
   \frac{\partial E}{\partial a_{l+1}}

each product computed by the layer's hand-written `vjp`, never by an autodiff transform. The
slides' network is one instance (`slides_network`): there dE/da for the dense layer's output is
the slides' delta2, and for the conv's output delta1.

Per-example methods (``*_example``) are the math; the others accept one example or a batch
(leading axis N) and batch with `jax.vmap`, a batch loss and gradient being means over examples;
the batch manual gradient instead runs each layer's `batch_vjp` once over the whole batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxbp.layers import AvgPool
from jaxbp.layers import Conv2D
from jaxbp.layers import Conv2DParams
from jaxbp.layers import Dense
from jaxbp.layers import DenseParams
from jaxbp.layers import Flatten
from jaxbp.layers import HalfSquaredError
from jaxbp.layers import Layer
from jaxbp.layers import Loss
from jaxbp.layers import MaxPool
from jaxbp.layers import Sigmoid
from jaxbp.layers import SoftmaxCrossEntropy
from jaxbp.layers import Tanh
from jaxbp.params import Params
from jaxbp.spec import ConvNetSpec

Shape = tuple[int, ...]


class LayerTerms(NamedTuple):
    """One layer's factors of the chain rule, for one example (stacked on axis 0 for a batch).

    Attributes:
      x: the layer's input a_l.
      y: its output a_{l+1}.
      dE_dy: dE/da_{l+1}, the cotangent arriving from above (from the loss for the last layer).
      dE_dx: dE/da_l, the cotangent it passes down (the dE_dy of the layer below).
      dE_dparams: dE/dtheta_l, structured like the layer's params.
    """

    x: jax.Array
    y: jax.Array
    dE_dy: jax.Array
    dE_dx: jax.Array
    dE_dparams: tuple


@dataclasses.dataclass(frozen=True)
class Network:
    """A feed-forward stack of layers and a loss, for inputs of one per-example shape.

    Frozen and hashable (a valid static argument of `jax.jit`); every layer's input shape is
    checked when the network is built.

    Attributes:
      layers: the layers, input first (see `jaxbp.layers`).
      loss: the loss on the last layer's output.
      in_shape: the per-example input shape, e.g. (H, W, C).
      shapes: (in_shape, out_shape of layer 0, ..., out_shape of the last layer); computed.
    """

    layers: tuple
    loss: Loss
    in_shape: Shape
    shapes: tuple[Shape, ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        if not isinstance(self.layers, Sequence) or isinstance(self.layers, str):
            raise TypeError(f"layers must be a sequence of layers, got {type(self.layers).__name__}")
        set_("layers", tuple(self.layers))
        for index, layer in enumerate(self.layers):
            if not isinstance(layer, Layer):
                raise TypeError(
                    f"layers[{index}] must be a layer (with init, out_shape, apply, vjp), got {layer!r}"
                )
        if not isinstance(self.loss, Loss):
            raise TypeError(
                f"loss must be a loss (with value, vjp, check_output, check_targets, to_output), "
                f"got {self.loss!r}"
            )
        in_shape = self.in_shape
        if not isinstance(in_shape, Sequence) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in in_shape
        ):
            raise ValueError(f"in_shape must be a tuple of positive ints, e.g. (H, W, C), got {in_shape!r}")
        set_("in_shape", tuple(in_shape))
        try:
            hash(self)
        except TypeError as error:
            raise TypeError(f"layers and loss must be hashable (frozen dataclasses): {error}") from None
        shapes = [self.in_shape]
        for index, layer in enumerate(self.layers):
            source = "the input" if index == 0 else f"layers[{index - 1}]"
            try:
                shapes.append(tuple(layer.out_shape(shapes[-1])))
            except ValueError as error:
                raise ValueError(
                    f"layers[{index}] {layer!r} cannot take input of shape {shapes[-1]} "
                    f"(the output of {source}): {error}"
                ) from None
        try:
            self.loss.check_output(shapes[-1])
        except ValueError as error:
            raise ValueError(
                f"loss {self.loss!r} cannot take the network's output shape {shapes[-1]}: {error}"
            ) from None
        set_("shapes", tuple(shapes))

    @property
    def out_shape(self) -> Shape:
        """The last layer's per-example output shape (the loss's input, and the targets' shape)."""
        return self.shapes[-1]

    # --- parameters ---------------------------------------------------------------------------

    def init(self, key: jax.Array, dtype=jnp.float32) -> tuple:
        """Each layer's `init` with its own key: a tuple with one params pytree per layer."""
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"dtype must be a floating dtype, got {dtype!r}")
        keys = jax.random.split(key, len(self.layers))
        return tuple(
            layer.init(k, shape, dtype) for layer, k, shape in zip(self.layers, keys, self.shapes[:-1])
        )

    def check_params(self, params, *, name: str = "params") -> None:
        """Raise TypeError/ValueError unless `params` fits the network, naming the layer at fault."""
        if not isinstance(params, (tuple, list)) or len(params) != len(self.layers):
            raise TypeError(
                f"{name} must be a tuple of {len(self.layers)} per-layer params (see Network.init), "
                f"got {type(params).__name__}"
                + (f" of length {len(params)}" if isinstance(params, (tuple, list)) else "")
            )
        expected = jax.eval_shape(lambda: self.init(jax.random.key(0), jnp.float32))
        dtypes = set()
        for index, (layer, p, e) in enumerate(zip(self.layers, params, expected)):
            if jax.tree.structure(p) != jax.tree.structure(e):
                raise TypeError(
                    f"{name}[{index}] for layers[{index}] {layer!r} must be structured like "
                    f"{jax.tree.map(lambda s: s.shape, e)}, got {jax.tree.map(lambda a: jnp.shape(a), p)}"
                )
            for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(p), jax.tree.leaves(e)):
                where = f"{name}[{index}]{jax.tree_util.keystr(path)}"
                if getattr(leaf, "shape", None) != spec.shape:
                    raise ValueError(
                        f"{where} must have shape {spec.shape} for layers[{index}] {layer!r} "
                        f"on input {self.shapes[index]}, got {getattr(leaf, 'shape', None)}"
                    )
                if not jnp.issubdtype(leaf.dtype, jnp.floating):
                    raise TypeError(f"{where} must be floating point, got dtype {leaf.dtype}")
                dtypes.add(jnp.dtype(leaf.dtype))
        if len(dtypes) > 1:
            raise TypeError(f"{name} leaves must share one dtype, got {sorted(str(d) for d in dtypes)}")

    def check_inputs(self, params, x, y=None) -> tuple[jax.Array, jax.Array | None, bool]:
        """Validate (params, x, y) at trace time; return (x, y, batched).

        x must be `in_shape` or (N, *in_shape), of the params' floating dtype; y, when given,
        `out_shape` or (N, *out_shape) to match (integer targets are cast to x's dtype).
        """
        self.check_params(params)
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(
                f"x must be a floating-point array, got dtype {x.dtype}; convert it, e.g. x / 255.0"
            )
        leaves = jax.tree.leaves(params)
        if leaves and x.dtype != leaves[0].dtype:
            raise TypeError(
                f"x has dtype {x.dtype} but params have dtype {leaves[0].dtype}; cast one to the other"
            )
        if x.shape == self.in_shape:
            batched = False
        elif x.ndim == len(self.in_shape) + 1 and x.shape[1:] == self.in_shape:
            batched = True
        else:
            raise ValueError(f"x must have shape {self.in_shape} or (N, *{self.in_shape}), got {x.shape}")
        if y is not None:
            y = jnp.asarray(y)
            expected = (x.shape[0], *self.out_shape) if batched else self.out_shape
            if y.shape != expected:
                raise ValueError(
                    f"y must have shape {expected} to match x of shape {x.shape} (the network's output "
                    f"shape is {self.out_shape}), got {y.shape}"
                )
            if not jnp.issubdtype(y.dtype, jnp.floating):
                y = y.astype(x.dtype)
            if y.dtype != x.dtype:
                raise TypeError(f"y has dtype {y.dtype} but x has dtype {x.dtype}; cast one to the other")
        return x, y, batched

    # --- per example: the math ------------------------------------------------------------------

    def forward_example(self, params: tuple, x: jax.Array) -> jax.Array:
        """a_L for one example: the layers' `apply`, input first (logits for the cross-entropies)."""
        for layer, p in zip(self.layers, params):
            x = layer.apply(p, x)
        return x

    def loss_example(self, params: tuple, x: jax.Array, y: jax.Array) -> jax.Array:
        """E = loss(a_L, y) for one example."""
        return self.loss.value(self.forward_example(params, x), y)

    def predict_example(self, params: tuple, x: jax.Array) -> jax.Array:
        """The loss's reading of a_L (`to_output`): probabilities for the cross-entropies."""
        return self.loss.to_output(self.forward_example(params, x))

    def value_and_chain_terms_example(
        self, params: tuple, x: jax.Array, y: jax.Array
    ) -> tuple[jax.Array, tuple[LayerTerms, ...]]:
        """E and every layer's `LayerTerms` for one example: forward, then the VJPs in reverse."""
        a = [x]  # a[l] is layer l's input, a[l + 1] its output
        for layer, p in zip(self.layers, params):
            a.append(layer.apply(p, a[-1]))
        E = self.loss.value(a[-1], y)

        dE_dy = self.loss.vjp(a[-1], y)  # dE/da_L
        terms = [None] * len(self.layers)
        for index in reversed(range(len(self.layers))):
            layer, x_l, y_l = self.layers[index], a[index], a[index + 1]
            dE_dparams, dE_dx = layer.vjp(params[index], x_l, y_l, dE_dy)
            terms[index] = LayerTerms(x=x_l, y=y_l, dE_dy=dE_dy, dE_dx=dE_dx, dE_dparams=dE_dparams)
            dE_dy = dE_dx
        return E, tuple(terms)

    def value_and_manual_grads_example(
        self, params: tuple, x: jax.Array, y: jax.Array
    ) -> tuple[jax.Array, tuple]:
        """(E, dE/dparams) for one example; the gradients are structured like params.

        (Under `jax.jit` the unused dE/dX of the first layer is dropped by XLA.)
        """
        E, terms = self.value_and_chain_terms_example(params, x, y)
        return E, tuple(t.dE_dparams for t in terms)

    # --- one example or a batch --------------------------------------------------------------

    def forward(self, params: tuple, x: jax.Array) -> jax.Array:
        """a_L for x of shape in_shape -> out_shape, or (N, *in_shape) -> (N, *out_shape)."""
        x, _, batched = self.check_inputs(params, x)
        if batched:
            return jax.vmap(self.forward_example, in_axes=(None, 0))(params, x)
        return self.forward_example(params, x)

    def predict(self, params: tuple, x: jax.Array) -> jax.Array:
        """`predict_example` for one example, or each example of a batch."""
        x, _, batched = self.check_inputs(params, x)
        if batched:
            return jax.vmap(self.predict_example, in_axes=(None, 0))(params, x)
        return self.predict_example(params, x)

    def loss_value(self, params: tuple, x: jax.Array, y: jax.Array) -> jax.Array:
        """E for one example, or the mean of per-example E over a batch."""
        x, y, batched = self.check_inputs(params, x, y)
        if batched:
            return jnp.mean(jax.vmap(self.loss_example, in_axes=(None, 0, 0))(params, x, y))
        return self.loss_example(params, x, y)

    def chain_terms(self, params: tuple, x: jax.Array, y: jax.Array) -> tuple[LayerTerms, ...]:
        """Every layer's `LayerTerms`; for a batch, per example along axis 0 of each leaf."""
        x, y, batched = self.check_inputs(params, x, y)
        if batched:
            return jax.vmap(_chain_terms_example, in_axes=(None, 0, 0, None))(params, x, y, self)
        return _chain_terms_example(params, x, y, self)

    def manual_value_and_grads(self, params: tuple, x: jax.Array, y: jax.Array) -> tuple[jax.Array, tuple]:
        """(E, dE/dparams) by the layers' VJPs; for a batch, both are means over examples.

        A batch runs `batch_value_and_manual_grads`: equal to the mean of the per-example
        gradients (tests/test_network.py), with the sums over examples done as contractions.
        """
        x, y, batched = self.check_inputs(params, x, y)
        if batched:
            return batch_value_and_manual_grads(params, x, y, self)
        return self.value_and_manual_grads_example(params, x, y)

    def manual_grads(self, params: tuple, x: jax.Array, y: jax.Array) -> tuple:
        """dE/dparams by the layers' VJPs; for a batch, the mean over examples."""
        return self.manual_value_and_grads(params, x, y)[1]

    def per_example_manual_grads(self, params: tuple, x: jax.Array, y: jax.Array) -> tuple:
        """Per-example manual gradients of a batch: each leaf gains a leading axis N."""
        x, y, batched = self.check_inputs(params, x, y)
        if not batched:
            raise ValueError(f"x must be a batch (N, *{self.in_shape}), got {x.shape}")
        fn = lambda p, xi, yi, net: net.value_and_manual_grads_example(p, xi, yi)[1]  # noqa: E731
        return jax.vmap(fn, in_axes=(None, 0, 0, None))(params, x, y, self)


def _batch_vjp(layer, params, x, y, dE_dy):
    """A layer's VJP over a batch: its own `batch_vjp` where it has one (a contraction over the
    batch), else `jax.vmap` of `vjp` with dE/dparams summed over examples."""
    if hasattr(layer, "batch_vjp"):
        return layer.batch_vjp(params, x, y, dE_dy)
    dE_dparams, dE_dx = jax.vmap(layer.vjp, in_axes=(None, 0, 0, 0))(params, x, y, dE_dy)
    return jax.tree.map(lambda g: jnp.sum(g, axis=0), dE_dparams), dE_dx


def batch_value_and_manual_grads(params: tuple, x: jax.Array, y: jax.Array, network: Network):
    r"""(mean E, mean dE/dparams) of a batch x (N, *in_shape), y (N, *out_shape).

    The batch mean :math:`\frac{1}{N} \sum_n E_n` enters once, as the 1/N in
    :math:`\partial E / \partial a_L = \ell'(a_L, Y) / N`; every layer then pulls the batch of
    cotangents back at once, summing its parameter gradients over examples (for Conv2D and Dense
    one conv / one matmul over the batch, faster on CPU than vmapping the per-example VJP).
    """
    n = x.shape[0]
    a = [x]
    for layer, p in zip(network.layers, params):
        a.append(jax.vmap(layer.apply, in_axes=(None, 0))(p, a[-1]))
    E = jnp.mean(jax.vmap(network.loss.value)(a[-1], y))
    dE_dy = jax.vmap(network.loss.vjp)(a[-1], y) / n
    grads = [None] * len(network.layers)
    for index in reversed(range(len(network.layers))):
        layer = network.layers[index]
        grads[index], dE_dy = _batch_vjp(layer, params[index], a[index], a[index + 1], dE_dy)
    return E, tuple(grads)


# The per-example functions with the signature of the slides' ones, fn(params, x, y, model), for
# `jaxbp.model.batch_mean` and for update steps written against that signature.


def value_and_manual_grads_example(params: tuple, x: jax.Array, y: jax.Array, network: Network):
    """`Network.value_and_manual_grads_example` as fn(params, x, y, network)."""
    return network.value_and_manual_grads_example(params, x, y)


def _chain_terms_example(params: tuple, x: jax.Array, y: jax.Array, network: Network):
    return network.value_and_chain_terms_example(params, x, y)[1]


# ---------------------------------------------------------------------------------------------
# Builders.
# ---------------------------------------------------------------------------------------------


def lenet5(
    in_shape: Shape,
    n_out: int = 10,
    *,
    activation: Layer | None = None,
    pooling: str = "avg",
    loss: Loss | None = None,
) -> Network:
    """LeNet-5 (LeCun et al. 1998), adapted to the input size.

    conv 6@5x5 SAME -> act -> pool 2x2 -> conv 16@5x5 -> act -> pool 2x2 -> flatten -> dense 120
    -> act -> dense 84 -> act -> dense n_out (logits), softmax cross-entropy.

    The first conv pads to SAME, which on 28x28 is the classic 2-pixel padding of 28x28 MNIST to
    32x32. The second conv is VALID (the classic 14 -> 10 -> 5 on 28x28) when the pooled map is
    at least 6 wide, so that its 5x5 output still pools to at least 1; on smaller maps (8x8
    digits: 8 -> 4) it pads to SAME instead (4 -> 4 -> 2). Inputs need H, W >= 4.

    Args:
      in_shape: (H, W, C).
      n_out: number of classes.
      activation: the layer after each conv and hidden dense; default `Tanh()`, the classic.
      pooling: "avg" (the classic subsampling) or "max".
      loss: the loss on the logits; default `SoftmaxCrossEntropy()`.
    """
    activation = Tanh() if activation is None else activation
    loss = SoftmaxCrossEntropy() if loss is None else loss
    if pooling not in ("avg", "max"):
        raise ValueError(f"pooling must be 'avg' or 'max', got {pooling!r}")
    pool = AvgPool if pooling == "avg" else MaxPool
    if len(in_shape) != 3:
        raise ValueError(f"in_shape must be (H, W, C), got {in_shape!r}")
    pooled_hw = (in_shape[0] // 2, in_shape[1] // 2)
    conv2_padding = "VALID" if min(pooled_hw) >= 6 else "SAME"
    layers = (
        Conv2D(6, (5, 5), padding="SAME"),
        activation,
        pool((2, 2)),
        Conv2D(16, (5, 5), padding=conv2_padding),
        activation,
        pool((2, 2)),
        Flatten(),
        Dense(120),
        activation,
        Dense(84),
        activation,
        Dense(n_out),
    )
    return Network(layers=layers, loss=loss, in_shape=tuple(in_shape))


def slides_network(spec: ConvNetSpec) -> Network:
    """The slides' network as layers: conv (no bias) -> sigmoid -> flatten -> dense -> sigmoid, E = |O-Y|^2/2.

    Its params convert to and from `jaxbp.Params` with `params_to_network` / `params_from_network`.
    """
    if not isinstance(spec, ConvNetSpec):
        raise TypeError(f"spec must be a ConvNetSpec, got {type(spec).__name__}")
    conv = Conv2D(
        spec.n_filters,
        spec.kernel_size,
        stride=spec.stride,
        padding=spec.padding,
        dilation=spec.dilation,
        use_bias=False,
        precision=spec.precision,
    )
    layers = (conv, Sigmoid(), Flatten(), Dense(spec.n_out, precision=spec.precision), Sigmoid())
    return Network(layers=layers, loss=HalfSquaredError(), in_shape=spec.in_shape)


def params_to_network(params: Params) -> tuple:
    """`jaxbp.Params(f, W, b)` -> the params of `slides_network` (the same arrays, no copy)."""
    if not isinstance(params, Params):
        raise TypeError(f"params must be a jaxbp.Params(f, W, b), got {type(params).__name__}")
    return (Conv2DParams(f=params.f, b=None), (), (), DenseParams(W=params.W, b=params.b), ())


def params_from_network(network_params: tuple) -> Params:
    """The params (or gradients) of `slides_network` -> `jaxbp.Params(f, W, b)`."""
    if not isinstance(network_params, (tuple, list)) or len(network_params) != 5:
        raise TypeError(
            "network_params must be the 5 per-layer params of slides_network (conv, sigmoid, flatten, "
            f"dense, sigmoid), got {type(network_params).__name__}"
        )
    conv, _, _, dense, _ = network_params
    return Params(f=conv.f, W=dense.W, b=dense.b)
