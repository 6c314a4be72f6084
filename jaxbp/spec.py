"""Hyperparameters of the slides' network and the shape arithmetic of its convolution.

Everything here is static: a `ConvNetSpec` is a frozen, hashable dataclass, so it can be closed
over or passed as a static argument to `jax.jit` without ever being traced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Union

from jax import lax

# Images are NHWC, filters HWIO (the JAX/Flax convention); one constant for every conv in jaxbp.
DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

Padding = Union[str, tuple[tuple[int, int], tuple[int, int]]]
PADDING_STRINGS = ("VALID", "SAME")


def _int_pair(name: str, value, *, minimum: int) -> tuple[int, int]:
    """Normalise an int or a pair of ints to a tuple, checking each is an int >= minimum."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, Sequence)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum} in each dimension, got {tuple(value)}")
    return tuple(value)


def normalize_padding(padding) -> Padding:
    """Check a padding argument: "VALID", "SAME" or ((top, bottom), (left, right)) of ints >= 0."""
    if isinstance(padding, str):
        if padding.upper() not in PADDING_STRINGS:
            raise ValueError(
                f"padding must be 'VALID', 'SAME' or ((top, bottom), (left, right)), got {padding!r}"
            )
        return padding.upper()
    try:
        pairs = tuple(_int_pair("padding", p, minimum=0) for p in padding)
    except TypeError:
        pairs = ()
    if len(pairs) != 2:
        raise ValueError(
            f"padding must be 'VALID', 'SAME' or ((top, bottom), (left, right)), got {padding!r}"
        )
    return pairs


def explicit_padding(
    padding: Padding,
    in_hw: tuple[int, int],
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Resolve "VALID" / "SAME" to explicit ((lo, hi), (lo, hi)) pairs, exactly as lax does."""
    if not isinstance(padding, str):
        return padding
    effective_kernel = tuple((k - 1) * d + 1 for k, d in zip(kernel_size, dilation))
    return tuple(lax.padtype_to_pads(in_hw, effective_kernel, stride, padding))


def conv_output_hw(
    in_hw: tuple[int, int],
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
    dilation: tuple[int, int],
) -> tuple[int, int]:
    r"""Spatial output size of a strided, padded, dilated convolution.

    .. math:: H_o = \lfloor (H + p_{lo} + p_{hi} - ((k - 1) d + 1)) / s \rfloor + 1

    Raises:
      ValueError: if the dilated kernel is larger than the padded input.
    """
    out = []
    for axis, n, k, s, (lo, hi), d in zip(("height", "width"), in_hw, kernel_size, stride, padding, dilation):
        effective_kernel = (k - 1) * d + 1
        padded = n + lo + hi
        if effective_kernel > padded:
            raise ValueError(
                f"kernel_size: the dilated kernel ({k - 1}*{d}+1 = {effective_kernel}) is larger than "
                f"the padded input {axis} ({n}+{lo}+{hi} = {padded})"
            )
        out.append((padded - effective_kernel) // s + 1)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class ConvNetSpec:
    """The slides' network: X -> conv(X, f) -> sigmoid -> flatten -> W^T H1 + b -> sigmoid -> O.

    Attributes:
      in_shape: (H, W, C) of one input image.
      n_filters: K, the number of filters of the convolution.
      kernel_size: (kh, kw) of each filter.
      stride: (sh, sw) of the convolution.
      padding: "VALID", "SAME" or explicit ((top, bottom), (left, right)).
      dilation: (dh, dw), the filter (rhs) dilation.
      n_out: number of outputs of the dense layer (and of O).
      precision: passed to every conv and matmul (e.g. ``lax.Precision.HIGHEST`` on GPU/TPU,
        where the default may use reduced-precision passes); None is the backend default.
    """

    in_shape: tuple[int, int, int]
    n_filters: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: Padding = "VALID"
    dilation: tuple[int, int] = (1, 1)
    n_out: int = 1
    precision: lax.Precision | None = None

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        in_shape = self.in_shape
        if (
            not isinstance(in_shape, Sequence)
            or len(in_shape) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in in_shape)
        ):
            raise ValueError(f"in_shape must be (H, W, C) of positive ints, got {in_shape!r}")
        set_("in_shape", tuple(in_shape))
        for name in ("n_filters", "n_out"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        set_("kernel_size", _int_pair("kernel_size", self.kernel_size, minimum=1))
        set_("stride", _int_pair("stride", self.stride, minimum=1))
        set_("dilation", _int_pair("dilation", self.dilation, minimum=1))
        set_("padding", normalize_padding(self.padding))
        if self.precision is not None and not isinstance(self.precision, lax.Precision):
            set_("precision", lax.Precision(self.precision))
        conv_output_hw(self.in_shape[:2], self.kernel_size, self.stride, self.pads, self.dilation)

    @property
    def pads(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """The padding as explicit ((top, bottom), (left, right)) pairs."""
        return explicit_padding(self.padding, self.in_shape[:2], self.kernel_size, self.stride, self.dilation)

    @property
    def filter_shape(self) -> tuple[int, int, int, int]:
        """f: (kh, kw, C, K), HWIO."""
        return (*self.kernel_size, self.in_shape[2], self.n_filters)

    @property
    def h1_shape(self) -> tuple[int, int, int]:
        """Z1 and H1: (Ho, Wo, K)."""
        hw = conv_output_hw(self.in_shape[:2], self.kernel_size, self.stride, self.pads, self.dilation)
        return (*hw, self.n_filters)

    @property
    def n_hidden(self) -> int:
        """D = Ho * Wo * K, the length of flattened H1 (rows of W)."""
        ho, wo, k = self.h1_shape
        return ho * wo * k

    @property
    def conv_kwargs(self) -> dict:
        """Keyword arguments shared by `ops.conv2d` and its two VJPs."""
        return dict(stride=self.stride, padding=self.pads, dilation=self.dilation, precision=self.precision)
