"""Pass/fail thresholds for gradient checks, one profile per dtype, each derived from a measurement.

A relative error (see `jaxbp.check.metrics`) passes when it is at most the profile's threshold for
the kind of reference it was compared with:

- ``autodiff``: jax.grad / jax.vjp evaluated in the candidate's own dtype, at the same point.
- ``finite_differences``: central differences of the loss evaluated in float64.

How the numbers were measured: ``python experiments/tolerance_profiles.py`` runs `compare_grads`
over 200 seeded random specs per dtype (the sweep of ``python -m jaxbp.check``: stride 1-3,
VALID/SAME/explicit padding, dilation 1-2, C 1-3, K 1-4, n_out 1-3, batch 1-5) on CPU, and records
the largest relative error of each kind of comparison (experiments/results/tolerance_profiles.json).
Each threshold is that worst case times a margin of about 10 (so a check fails for a wrong
derivation, which is off by O(1), and not for rounding); the README lists the measured values.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Tolerance(NamedTuple):
    """A tolerance profile.

    Attributes:
      dtype: the candidate gradients' dtype this profile is for.
      autodiff: max relative error against autodiff in the same dtype.
      finite_differences: max relative error against float64 central differences.
      floor: the relative error's denominator floor (see `jaxbp.check.metrics.relative_error`).
      eps: the finite-difference step (float64 central differences, for every dtype).
    """

    dtype: str
    autodiff: float
    finite_differences: float
    floor: float = 1e-3
    eps: float = 1e-5


# Measured on CPU, 200 random specs each (experiments/results/tolerance_profiles.json):
# float64: manual vs jax.grad and every chain term vs jax.vjp agree to <= 2.2e-16 relative (on CPU
#   they reduce to the same XLA ops; the design's 1e-10 leaves room for reordered sums elsewhere);
#   manual vs central differences (eps 1e-6, elementwise or 8 random directions) <= 8.9e-10,
#   threshold 1e-8; see experiments/results/fd_eps.png for the eps.
# float32: manual vs float32 jax.grad/vjp <= 2.4e-7 relative, threshold 2e-6; float32 manual vs
#   float64 central differences <= 1.2e-6, threshold 1e-5 (the float32 rounding of the gradient
#   itself, ~ u32 = 6e-8 times the condition of the sums, dominates the float64 FD error 1e-10).
TOLERANCES = {
    "float64": Tolerance(dtype="float64", autodiff=1e-10, finite_differences=1e-8, floor=1e-2),
    "float32": Tolerance(dtype="float32", autodiff=1e-5, finite_differences=1e-5, floor=3e-2),
}


def tolerance_for(dtype) -> Tolerance:
    """The profile for a dtype; ValueError for dtypes without a measured profile."""
    name = np.dtype(dtype).name
    if name not in TOLERANCES:
        raise ValueError(
            f"dtype: no measured tolerance profile for {name} (have {sorted(TOLERANCES)}); "
            "pass tolerance=jaxbp.check.Tolerance(...) with thresholds you have measured"
        )
    return TOLERANCES[name]
