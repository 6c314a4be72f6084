r"""The slides' gradients for a whole batch at once: the mean written as one contraction over N.

The batch gradient is the mean of the per-example gradients (`jaxbp.backward`). Every per-example
gradient is a sum over positions of a product of a forward value and a delta, so the mean over
the batch is one more index of the same sum. With the 1/N of the mean folded into delta2 (the
derivatives are linear in delta2, so every gradient below is then already a mean):

.. math::
   \delta_2 &= (O - Y) \odot O (1 - O) / N  &&\in (N, n_{out}) \\
   \frac{dE}{dW} &= H_1^T \delta_2          &&\text{one (D x N) @ (N x n_out) matmul} \\
   \frac{dE}{db} &= \textstyle\sum_n \delta_2[n] \\
   \delta_1 &= (\delta_2 W^T) \odot H_1 (1 - H_1)  &&\in (N, H_o, W_o, K) \\
   \frac{dE}{df}[a, b, c, k] &= \sum_{n, i, j} X_{pad}[n,\, a d_h + i s_h,\, b d_w + j s_w,\, c]\,
                                 \delta_1[n, i, j, k]

Same math as `jax.vmap` of the per-example backward followed by a mean; what changes is the
shape of the work XLA sees, and on a CPU that is where the time goes (measured by
``python experiments/bench.py --formulations``, results in experiments/results/):

* **Chunks of the batch.** Examples are independent until the gradient sums, so the batch is cut
  into chunks of ``chunk`` examples, run one after another in a loop (`lax.fori_loop`), each
  adding its partial sums. A chunk's temporaries (patches, Z1, H1, delta1) stay a few MB and are
  reused from chunk to chunk; one pass over the whole batch writes hundreds of MB of fresh
  buffers per step at batch 1024, and on this CPU writing and page-faulting those cost more than
  the arithmetic (at the largest grid point the patches of the whole batch are 240 MB; the step
  took 165 ms in chunks of 32 against 422 ms unchunked,
  experiments/results/bench_formulations.md, and jax.grad's step 290-321 ms in the bench.md
  runs).
* **Patches (im2col), built once, used twice.** ``P`` (M x kh kw C, M = N Ho Wo) holds every
  receptive field; then Z1 = P @ f and dE/df = P^T @ delta1 are two plain matmuls, the only form
  in which XLA's CPU reaches matmul speed for more than a few filters.
* **Toeplitz row slabs: the patches' matmul with a smaller write.** Neighbouring output columns
  share most of their receptive fields, so instead of P each row of ``R`` holds the kh input
  rows under an output row across the columns that a block of jb = 4 output columns reads, and
  f becomes a banded (doubly blocked) Toeplitz matrix T with the same zeros in every block:
  Z1 = R @ T and dE/df = the band of delta1^T R, two plain matmuls. For 5x5 filters R holds 10
  numbers per output position and input channel against the patches' 25, for span / kw = 1.6x
  the multiplies.
* **Taps (shift-and-add), for one filter on few channels.** ``Z1 = sum_ab tap_ab(X) f[a, b]``
  with tap_ab a strided slice of the padded input: XLA fuses the slices, multiply-adds and the
  sigmoid into one loop, so neither P nor Z1 is written. dE/df is then XLA's conv with the
  batch as its contracted axis (Eigen's, with `jaxbp.compiler_options()`; in parts, below),
  except for a single example on 2 or more channels, where it is the Toeplitz form's.
  With one filter P @ f is a matrix-vector product that only pays for writing P. From 3 input
  channels on the channels are contracted first, U = X_pad f (kh kw K numbers per pixel, one
  small matmul), and the fused loop adds kh*kw shifted slices of U instead of kh*kw*C products.
* **Weight-gradient sums written small axis first.** dE/dW = H1^T delta2 and dE/df = P^T delta1
  contract over the examples; written as (n_out, D) and (K, kh kw C) they ran 1.2-3x faster
  than in the params' (D, n_out) and (kh kw C, K), so the chunks' sums stay transposed and are
  transposed back once per step (the whole step 1.1-1.5x faster with 8 and 32 filters).
* **Not vmap, and XLA's conv only where it measured faster.** Under vmap the per-example dE/df
  (a conv whose batch axis is C) becomes a grouped conv per example, which XLA's CPU runs
  slowly. The ``conv`` forms (XLA's convolution, with the batch as the contracted axis of
  dE/df) serve dE/df after the taps (but a single example on 2 or more channels), from 32
  filters on and for a batch of one past the taps, and both
  convolutions on accelerators other than a GPU (not measured there; on a GPU the patches for
  both measured fastest, below). On the CPU dE/df's conv is split over the examples into a few
  convs that run at once (``conv_parts``): with 32 filters Eigen ran one such conv on one core.
  The measurements assume the steps' `jaxbp.compiler_options()`: with jaxlib 0.10's default
  YNNPACK convolutions the same convs ran up to 10x slower (`jaxbp.compile_options`).

Which formulation and chunk are fastest depends on the shape; `choose_formulation` encodes the
measurement. Nothing here calls an autodiff transform.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from fractions import Fraction
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxbp import ops
from jaxbp.model import check_inputs
from jaxbp.params import Params
from jaxbp.spec import DIMENSION_NUMBERS
from jaxbp.spec import ConvNetSpec

ConvForm = Literal["taps", "patches", "toeplitz", "conv"]
FORMS = ("taps", "patches", "toeplitz", "conv")


class Formulation(NamedTuple):
    """How the batch step computes the two convolutions, and how much of the batch at a time.

    Attributes:
      forward: Z1 = conv(X, f) as "taps" (shift-and-add over the kh*kw taps, fused with the
        sigmoid), "patches" (the im2col matrix P times f), "toeplitz" (row slabs R times the
        banded Toeplitz matrix of f) or "conv" (one XLA convolution).
      filter_grad: dE/df as "taps" (each tap contracted with delta1), "patches" (P^T delta1, with
        the P of the forward when both use it), "toeplitz" (delta1^T R folded along the band,
        with the R of the forward when both use it) or "conv" (one XLA convolution with the
        batch as the contracted axis).
      chunk: examples per step of the chunks' loop; None runs the whole batch at once.
      conv_parts: with dE/df as XLA's conv, that conv is split into this many convs over
        consecutive slices of a chunk's examples and summed (at most one part per example):
        Eigen runs the conv on one core, and XLA's CPU runtime runs independent convs at once.
    """

    forward: ConvForm
    filter_grad: ConvForm
    chunk: int | None = None
    conv_parts: int = 1

    def label(self) -> str:
        """``forward/filter_grad/chunk`` (``all`` for the whole batch), the filter_grad ``conv*P``
        where XLA's conv is split in P parts: how the benchmark's tables name it."""
        parts = f"*{self.conv_parts}" if self.filter_grad == "conv" and self.conv_parts > 1 else ""
        return f"{self.forward}/{self.filter_grad}{parts}/{self.chunk or 'all'}"


# Measured on the 2-core CPU in float32, 3x3 and 5x5 kernels, batch 32/256/1024, 1/8/32
# filters, 28x28x1 and 32x32x3 inputs, compiled with `jaxbp.compiler_options()` (Eigen's
# convolutions, not YNNPACK's), 3 repeats on a noisy machine (experiments/results/
# bench_formulations.md; the run before it, with the taps up to C K = 8, in parentheses):
# * One filter: the taps forward with dE/df as XLA's conv (the batch as its contracted axis)
#   was the fastest pair at all 12 points, 1.8-4.5x faster than the taps' kh*kw dots
#   (batch 256, 28x28x1, 5x5: 1.9 against 6.8 ms; 1024: 6.1 against 23.7), and than the
#   patches (5.1 and 18.8 ms). The taps' fused loop does kh kw C K multiply-adds per output
#   position at elementwise speed, where the patches write kh kw C numbers and then run at
#   matmul speed: the taps win while C K is small.
# * C K = 8 (28x28x1, 8 filters) is mixed: with 5x5 the taps won at batch 1024 (21.9 against
#   27.4 ms) and lost at 256 (5.7 against 5.5); with 3x3 they lost by 1.18x and 1.83x (256:
#   4.7 against 4.0; 1024: 37.2 against 20.3; in the run before 1.35x and 2.15x). So the taps
#   only below C K = 8; 32x32x3 with 8 filters (C K = 24) had the patches ahead at batch 256
#   and 1024 with 5x5 (14.1 against 19.9, 67.5 against 68.3) and the taps ahead at batch 32.
# * (Below 8 filters superseded by the bullet on 2 to 7 filters further down.)
#   From C K = 8 on, for 5x5 filters the Toeplitz row slabs for both convolutions, for 3x3 the
#   patches. Two runs of the patches against the Toeplitz form at the same chunk, 12 points each
#   with 5x5 and 3x3, 8 and 32 filters (experiments/results/bench_formulations_toeplitz.md, and
#   bench_formulations_toeplitz_5x5.md with 5 repeats; both run before the form was committed):
#   with 5x5 the Toeplitz form was ahead at 8 and 7 of 12 points and behind by more than 1.1x at 3
#   in each run, the same point often moving from one side to the other (the headline, batch 256,
#   28x28x1, 8 filters: 12.2 against 7.19 ms in the first run, 6.36 against 7.51 in the second;
#   batch 256, 32x32x3, 8 filters: 41.4 against 23.8, then 14.5 against 45.6); with 3x3 the
#   patches were ahead by more than 1.1x at 7 of 12 (batch 1024, 32x32x3, 8 filters: 43.7 against
#   103 ms). (Counted by comparing the two forms' medians at the rule's chunk.) A 3x3 band does 2x
#   the patches' multiplies (span / kw = 6 / 3; 2.13-2.15x with the padded last block at Wo = 26
#   and 30) to save 4.5 of 9 numbers written per position and input channel; a 5x5 one 1.6x to
#   save 15 of 25. The rule takes the Toeplitz form up to 1.6x the multiplies, blocks padded to jb
#   included (a standalone sweep of jb at the headline chunk, forward and dE/df only, not
#   committed: jb = 2-12 all 2.4-3.0 ms against the patches' 4.05; jb = 24, the whole row, 3.5).
#   Wider filters (7x7: 1.43x, about 1.55x with the padded block on 28x28 and 32x32 inputs) get
#   the Toeplitz form by that rule without having been measured. The first of the two runs had the
#   Toeplitz form picked for 3x3 too (its "chosen" column); there it was ahead at 5 of 12 3x3
#   points, by up to 1.45x (batch 32, 32x32x3, 32 filters). The chunk is still sized by the
#   patches' kh kw C numbers per position (R holds 0.4x that); other chunks were ahead at some
#   points, by margins that moved between the runs. Both runs built R by stacking row slabs and
#   then blocks; a rerun after R was copied in two steps (`toeplitz_rows`; the same command, renamed,
#   bench_formulations_toeplitz_two_step_r.md) had the Toeplitz form ahead at 7 of 12 5x5 points
#   and behind by more than 1.1x at 1 (the headline: 5.35 against 7.28 ms; batch 256, 32x32x3,
#   8 filters: 11.3 against 19.5), and with 3x3 ahead at 2 of 12 and behind by more than 1.1x
#   at 6 (batch 1024, 32x32x3, 8 filters: 33.4 against 31.0): the rule stands.
# * After the Toeplitz forward, dE/df as XLA's conv (the batch as its contracted axis) from 32
#   filters on: at the 6 points with 5x5 and 32 filters it was faster than the Toeplitz dE/df at
#   all 6 in the first run and at 5 in a third (bench_formulations_toeplitz_conv.md: 0.84-0.87x
#   the time, 1.04x at batch 32, 32x32x3; batch 256, 32x32x3: 40.8 against 47.8 ms), and slower at
#   4 of the 6 points with 8 filters in the first run (batch 1024, 28x28x1: 31.5 against 27.1).
#   With 32 filters the band's extra multiplies cost more in dE/df than Eigen's conv takes.
#   After the two-step R, the conv dE/df was faster at all 6 points with 32 filters in two runs
#   (0.82-0.96x and 0.83-0.94x the time, bench_formulations_toeplitz_two_step_r.md and
#   bench_formulations_toeplitz_conv_two_step_r.md) and slower at all 6 with 8 filters
#   (1.07-1.54x).
#   Between 8 and 32 filters it is not measured. With the patches forward and 32 filters the conv
#   dE/df, as one conv, was slower at 4 of 6 3x3 points (bench_formulations_toeplitz.md).
# * dE/df as XLA's conv ran on one core with 32 filters: with the batch as its contracted axis
#   the output is only kh kw C K numbers, and Eigen did not share the conv between the 2 cores
#   (at a chunk of 32 examples of 32x32x3, 5x5, 32 filters: 1.39-1.40 ms on two cores against
#   1.41-1.49 pinned to one, while the forward's matmul took 1.4-2.0x as long on one; at 28x28x1
#   with 8 filters the conv did use both, 1.29 against 1.98 ms; experiments/results/
#   bench_filter_grad.md and bench_filter_grad_one_core.md). The same sum as conv_parts convs over
#   slices of the chunk's examples lets XLA's CPU runtime, which runs independent operations of a
#   program at once, put them on both cores. A standalone timing of the batch gradient over the
#   18 grid points with batch >= 32 whose dE/df is the conv (one filter, or 5x5 with 32 filters;
#   not committed) had 4 parts 1.01-1.21x faster than one conv (batch 256, 32x32x3, 5x5, 32
#   filters: 27.5 against 29.6 ms), 2 parts 0.91-1.26x and 8 parts 0.96-1.28x; the matmuls of
#   the other dE/df forms, which use both cores already, ran 1.04-2x slower split the same way.
# * Since dE/df's conv is split in CONV_FILTER_GRAD_PARTS (the bullet before), one formulation
#   run, 3 repeats (experiments/results/bench_formulations_conv_parts.md, the command of the
#   two-step R run renamed): with 3x3 and 32 filters, patches/conv was faster than the patches for
#   both at 5 of 6 points, by 1-15% (batch 1024, 32x32x3: 78.1 against 92.1 ms), and 1% slower at
#   one, so XLA's conv takes dE/df from 32 filters on after the patches too; with 8 filters it was
#   faster at 2 and slower at 4 (up to 1.22x), and after the Toeplitz forward with 8 filters slower
#   at all 6 (1.14-1.26x): the Toeplitz and patches dE/df stay below 32 filters. At the 6 points
#   whose pick has the conv in parts (5x5, 32 filters), one conv took 0.96-1.30x the time of 4
#   parts (faster at 1 point, within 4% at 2), 2 parts 0.86-1.07x and 8 parts 0.93-1.13x; with one
#   filter (bench_formulations_conv_parts_one_filter.md, 12 points) one conv took 0.86-1.48x
#   the time of 4 parts, less at 6 of them: the parts pay with 32 filters, and with one filter
#   they are kept for the earlier standalone timing's gain, in this run within the noise.
# * Before the Toeplitz form, patches/patches from C K = 8 on (bench_formulations.md). The pick
#   was within 1.10x of the fastest formulation at 21 of 36 points and within 1.2x at 26; the
#   fastest pair was most often another chunk of the same forms, or XLA's conv for one of the two
#   convolutions, each by a margin that moved between runs (batch 256, 32x32x3, 5x5, 32 filters:
#   conv/conv 34.3 against 47.4 ms here, 44.3 against 39.9 in the run before).
# * Chunks help every form from batch 256 on: 1024, 32x32x3, 5x5, 32 filters 165 ms in chunks
#   of 32 against 422 whole; 1024, 28x28x1, 5x5, 8 filters 27.4 in 128 against 86. The patches
#   write about kh kw C numbers per output position besides Z1, H1 and delta1, and a chunk
#   whose working set is about 16 MB of those was within 1.1x of the best chunk of the same
#   forms at 29 of 36 points and within 1.2x at 33. With one filter the chunk moved between
#   runs (batch 1024, 32x32x3, 3x3: 30.1 ms in chunks of 128 against 19.0 in 32 here, 19.8
#   against 18.4 in the run before; 28x28x1, 5x5: 6.1 in 128 and 9.0 whole, 3x3: 7.2 and 4.8),
#   so the rule stays one working set, and a chunk is never more than 128 examples.
#   All of this is the Intel Xeon's. On a 2-core AMD EPYC (L2 512K) chunks of 32 were the
#   fastest at most 8- and 32-filter points of batch 256 and 1024, where this rule took 1.23-1.51x
#   the best chunk's time at 6 of 8 batch-1024 points (experiments/results/
#   bench_formulations_amd_chunks*.md); on the Xeon, chunks of 32 took a median 1.07x the pick's
#   time. The rule stays until the same sweep has run on both with their caches recorded;
#   meanwhile `jaxbp.tune_formulation` times the rule's pick against its forms at other chunks
#   (and other pairs) on the machine at hand, for `make_update_step(..., formulation=...)`.
# * (After the taps on 2 or more channels superseded by the single-example bullet further down,
#   measured on the AMD EPYC only; the Xeon's bench_formulations_b1.md had no Toeplitz dE/df.)
#   A single example (bench_formulations_b1.md, sub-millisecond and noisy): dE/df as XLA's conv,
#   one op where the taps are kh*kw dots and the conv has no batch to group. The pick was within
#   1.2x of the fastest formulation at 9 of 12 points, and 1.26-1.40x at three: with one filter
#   and 3x3 the patches for dE/df won by 0.02-0.05 ms (32x32x3: 0.115 against 0.161 ms), and
#   at 32x32x3, 5x5, 8 filters conv/patches by 0.10 ms.
# * The taps with 9 terms or fewer (kh kw C <= 9: a 3x3 filter on one channel) run the whole batch
#   while x, Z1, H1 and delta1 stay under TAPS_UNCHUNKED_WORKING_SET_BYTES. Under the chunks' loop
#   (then a lax.scan over x in chunks) XLA fused the loop's dynamic slice of x into the 9-term
#   taps loop, which then ran about 4x slower than over the whole batch (a standalone timing of
#   the taps forward at batch 1024 of 28x28x1, not committed: 4.3-5.1 ms in chunks of 128 against
#   1.1-1.5 whole); with 25 terms (5x5) it copied the slice out first, and the chunked forward
#   took about 1.6x the whole one. The step at 28x28x1, 3x3, one filter, whole against chunks of
#   128, in four runs: batch 1024 4.8 against 7.2 ms (bench_formulations.md), 4.24 against 8.69
#   (bench_formulations_one_filter_toeplitz.md), 4.01 against 8.01 (the batch gradient alone,
#   standalone, not committed) and 4.58 against 8.55 (bench_taps_unchunked.md); batch 256
#   0.91-1.44 against 1.23-1.69. At the other one-filter points of the grid (5x5, or 32x32x3) the
#   chunks were as fast or faster in the two latest runs (batch 1024, 32x32x3, 3x3: 10.1 ms in 128
#   against 14.6 whole, standalone); at 28x28x1, 5x5, batch 256 the margin moved between runs
#   (bench_formulations.md: 1.51 ms whole against 1.91 in chunks).
#   How large a batch: a standalone timing of the batch gradient at 28x28x1, 3x3 (not
#   committed; x, Z1, H1 and delta1 in MiB in brackets) had the whole batch ahead with one
#   filter at batch 2048 [22] (7.6 ms against 12.6 in 128 and 10.3 in 1024) and 4096 [44] (22.1
#   against 27.2, 25.6 in 1024), with 2 and 4 filters at 1024 [19, 35] (9.4 against 14.0; 17.6
#   against 20.1), and behind with 7 filters at 1024 [59] (47.3 against 38.1). The limit, 48
#   MiB, lies between the largest win and the loss; strides, dilations, and kernels of at most
#   9 terms other than 3x3 (1x1, 2x2) follow by extrapolation.
# * 2 to 7 filters (C K from 2 to 21), measured after the rules above were set from 1, 8 and 32
#   filters, in two runs of 3 repeats (experiments/results/bench_formulations_filters_2_4.md:
#   batch 256, 2 and 4 filters; bench_formulations_filters_2_6.md: batch 256 and 1024, 2 and 6
#   filters; 28x28x1 and 32x32x3, 3x3 and 5x5): the Toeplitz form for both, at its fastest chunk,
#   was faster than the pick of the rules before (both timed as formulations in the same run) at
#   every point where that pick was another form, 21 of 21 point-runs: than the taps (C K < 8)
#   by 1.01-4.7x (batch 256, 32x32x3, 5x5, 2 filters: 6.70 against 31.6 ms in one run, 7.40
#   against 32.8 in the other; 28x28x1, 3x3, 2 filters: 2.40 against 3.17 and 2.54 against
#   2.57), and than the patches (3x3 with C K >= 8) by 1.09-1.17x. At 2 of the 21 the taps
#   forward with the Toeplitz dE/df was faster still (the second run, batch 256, 28x28x1, 2
#   filters: 2.43 against 2.54 ms with 3x3, 1.79 against 2.16 with 5x5), and slower than the
#   Toeplitz pair at the other 19 (including the first run's same two points: 2.78 against 2.40,
#   2.56 against 2.27). With one filter the taps stay ahead: toeplitz/toeplitz took 1.09-1.82x
#   the time of the fastest taps pair at all 8 one-filter points of
#   bench_formulations_one_filter_toeplitz.md. Where the taps' time
#   goes from 2 filters on is not traced; the band's matmul is jb K columns wide, and it won even
#   where it does twice the patches' multiplies (3x3). So the taps for one filter only, and the
#   Toeplitz form for both below 8 filters whatever its multiply ratio. A run with that rule at
#   3, 5 and 7 filters (bench_formulations_filters_3_5_7.md, batch 256, 3 repeats; each form at
#   its fastest chunk) had the Toeplitz pair the fastest formulation at 10 of 12 points, and 3%
#   and 5.2% behind at the other 2 (28x28x1, 5x5, 3 filters: taps/toeplitz 2.55 against 2.62 ms;
#   32x32x3, 3x3, 5 filters: taps/conv and the patches 7.11 and 7.12 against 7.49); the fastest
#   taps pair took 0.95-1.85x and the patches 0.95-3.11x the Toeplitz pair's time.
# * The taps' channels contracted first (`conv_forward_tap_products`), measured after the rules
#   above (experiments/results/bench_tap_products.md: the update step, one filter, 32x32xC
#   inputs, C = 2, 3, 5, 7, batch 32, 256, 1024, 3x3 and 5x5, 5 interleaved repeats): from 3
#   channels on it was faster than the per-channel loop at all 18 points, by 1.00-1.74x (batch
#   1024, 32x32x3, 5x5: 13.1 against 17.8 ms), and compiled faster at 17 (batch 32, 32x32x3,
#   5x5: 0.28 against 0.37 s; 2% slower at the 18th); with 2 channels it was 0.78-1.08x the
#   per-channel loop's speed, slower by more than 5% at 2 of 6 points (batch 1024, 3x3: 10.0
#   against 7.8 ms) and faster by more than 5% at 1. A first run of the same command (committed
#   in c7e4372, replaced in 21af73a) had the same sides at C >= 3 (1.05-1.64x) and C = 2
#   slower at 4 of 6 points: hence TAPS_CONTRACT_CHANNELS_FROM = 3. With one channel there is
#   nothing to contract. The per-example paths keep the per-channel loop (they write U for
#   every example, `per_example_grads_taps`, `value_and_grads_example`). U holds
#   kh kw K numbers per input pixel where the loop reads C; the chunk is still sized by the
#   working set of the per-channel loop (`working_set_chunk`), not retuned. The unchunked rule
#   (TAPS_UNCHUNKED_MAX_TERMS) counts kh*kw*C terms as measured with the per-channel loop, so
#   it is unchanged: in the grid only 3x3 filters on one channel run unchunked.
# * A single example with one filter on 2 or more channels: dE/df in the Toeplitz form, the
#   forward still the taps (experiments/results/bench_formulations_one_filter_small_batch.md,
#   AMD EPYC, 32x32xC, C = 2, 3, 5, 3x3 and 5x5, batch 1 and 32, the taps and Toeplitz pairs
#   and the rule's forms at other chunks and parts, 5 interleaved repeats). At batch 1 XLA's
#   conv for dE/df, the rule before, was the slow part: taps/toeplitz took 0.44-0.93x the rule's
#   step's time at all 6 points (C = 3, 5x5: 0.066 against 0.149 ms; 0.93x at C = 2, 3x3), and
#   toeplitz/toeplitz 0.92-1.03x taps/toeplitz's (within the noise; the taps forward is the
#   one of batch 2 on and of the per-example path). The step compiled in 0.26-0.34 s against
#   the rule's 0.21-0.38 (13-17 kernels against 11-12; jax.grad 0.23-0.30): 1.1-2.3x the speed
#   for up to about a tenth of a second of compile time. In the grid after it
#   (bench_amd_epyc_b1_toeplitz.md) the step at batch 1, 32x32x3 took 0.71-0.75x its time in
#   the grid before. C = 4, 6, 7 and other image sizes follow by extrapolation, and the rule
#   was not timed on the Xeon. With one channel the conv stays (28x28x1 in an
#   uncommitted timing: toeplitz/toeplitz 0.051-0.055 ms against the rule's 0.048-0.049). At
#   batch 32 the Toeplitz pair took 0.89-1.64x the rule's time, less at 1 of the 6 points, and
#   taps/toeplitz 0.95-2.44x: the taps and the conv stay there. The vmapped per-example path
#   already takes the Toeplitz dE/df after the taps (`per_example_formulation`, unchanged).
# On a GPU (one NVIDIA H200, jax 0.11.2, full float32; experiments/results/
# bench_formulations_gpu.md, batch 256, 28x28x1, 5x5, the only shape compared there) the step
# is a few kernel launches long (the manual step 0.06-0.11 ms in the quick grid). The patches
# for both were the fastest pair at 1 and 32 filters (0.065 and 0.109 ms); at 8 taps/Toeplitz
# was 7% faster (0.060 against 0.064 ms). XLA's cuDNN conv for both took 1.43-2.04x the
# patches' time, and chunks of 8-128 examples 1.41-10.9x the whole batch's. In the quick grid
# the patches made the manual step 1.48-2.14x faster than jax.grad at all 6 points
# (bench_quick_gpu.md; the first session's runs, with the calls per sample mis-estimated, are
# in git at 77c2a18).
# So on a GPU the patches for both, the whole batch at once while its temporaries stay under
# GPU_WORKING_SET_BYTES. P holds N Ho Wo kh kw C numbers: 240 MB at batch 1024 of 32x32x3
# with 5x5 filters. A larger batch runs in chunks of about that size, so that P does not
# outgrow the device's memory. That was not timed: kernels that large are far past launch
# overhead. Other accelerators (TPU) are not measured and keep XLA's conv for both.
TAPS_BELOW_CHANNELS_X_FILTERS = 8
TAPS_MAX_FILTERS = 1
TOEPLITZ_BELOW_FILTERS = 8
TAPS_UNCHUNKED_MAX_TERMS = 9
TAPS_CONTRACT_CHANNELS_FROM = 3
TAPS_ONE_EXAMPLE_TOEPLITZ_FROM_CHANNELS = 2
TAPS_UNCHUNKED_WORKING_SET_BYTES = 48 * 2**20
CHUNK_WORKING_SET_BYTES = 16 * 2**20
MAX_CHUNK = 128
GPU_WORKING_SET_BYTES = 2**30
TOEPLITZ_BLOCK = 4
TOEPLITZ_MAX_MULTIPLY_RATIO = Fraction(8, 5)
CONV_FILTER_GRAD_FROM_FILTERS = 32
CONV_FILTER_GRAD_PARTS = 4
PER_EXAMPLE_UNROLLED_MAX_TERMS = 1024


def choose_formulation(
    spec: ConvNetSpec, batch: int, backend: str | None = None, itemsize: int = 4
) -> Formulation:
    """The measured-fastest formulation for `spec` and `batch` on this backend (see above).

    Args:
      spec: the network.
      batch: N.
      backend: "cpu", "gpu", "tpu"; None for `jax.default_backend()`.
      itemsize: bytes per number (4 for float32, 8 for float64), for the chunk's working set.
    """
    backend = jax.default_backend() if backend is None else backend
    if backend == "gpu":
        return Formulation(
            "patches", "patches", working_set_chunk(spec, batch, itemsize, GPU_WORKING_SET_BYTES, None)
        )
    if backend != "cpu":
        return Formulation("conv", "conv", None)
    chunk = working_set_chunk(spec, batch, itemsize)
    parts = conv_filter_grad_parts(batch, backend)
    c, k = spec.in_shape[2], spec.n_filters
    if k <= TAPS_MAX_FILTERS and c * k < TAPS_BELOW_CHANNELS_X_FILTERS:
        if batch == 1 and c >= TAPS_ONE_EXAMPLE_TOEPLITZ_FROM_CHANNELS:
            return Formulation("taps", "toeplitz", None)
        if taps_terms(spec) <= TAPS_UNCHUNKED_MAX_TERMS and (
            batch * taps_bytes_per_example(spec, itemsize) <= TAPS_UNCHUNKED_WORKING_SET_BYTES
        ):
            chunk = None
        return Formulation("taps", "conv", chunk, parts)
    if batch == 1:
        return Formulation("patches", "conv", None)
    wide_band = toeplitz_multiply_ratio(spec) > TOEPLITZ_MAX_MULTIPLY_RATIO
    forward: ConvForm = "patches" if wide_band and k >= TOEPLITZ_BELOW_FILTERS else "toeplitz"
    if k >= CONV_FILTER_GRAD_FROM_FILTERS:
        return Formulation(forward, "conv", chunk, parts)
    return Formulation(forward, forward, chunk)


def conv_filter_grad_parts(batch: int, backend: str | None = None) -> int:
    """How many convs XLA's conv dE/df is split into over the examples: `CONV_FILTER_GRAD_PARTS`
    (at most one per example) on the CPU, where Eigen ran one such conv on one core; one elsewhere."""
    backend = jax.default_backend() if backend is None else backend
    return min(CONV_FILTER_GRAD_PARTS, batch) if backend == "cpu" else 1


def taps_terms(spec: ConvNetSpec) -> int:
    """kh kw C: the per-channel taps loop's multiply-adds per output position and filter (what the
    unchunked rule counts; with the channels contracted first the loop has kh kw)."""
    kh, kw = spec.kernel_size
    return kh * kw * spec.in_shape[2]


def taps_bytes_per_example(spec: ConvNetSpec, itemsize: int = 4) -> int:
    """Bytes per example of the taps step's arrays: x, and Z1, H1 and delta1 (no patches)."""
    h, w, c = spec.in_shape
    ho, wo, k = spec.h1_shape
    return itemsize * (h * w * c + 3 * ho * wo * k)


def toeplitz_multiply_ratio(spec: ConvNetSpec) -> Fraction:
    """The Toeplitz form's multiplies over the patches': nb jb span / (Wo kw), the band's input
    columns per filter column, with the padded last block (8/5 for 5x5 when jb divides Wo; 2 or
    more for 3x3)."""
    jb, nb, span = toeplitz_blocks(spec)
    return Fraction(nb * jb * span, spec.h1_shape[1] * spec.kernel_size[1])


def temporaries_per_example(spec: ConvNetSpec, itemsize: int = 4) -> int:
    """Bytes of temporaries per example, estimated: Z1, H1 and delta1 (Ho Wo K numbers each), and
    the patches or taps (Ho Wo kh kw C)."""
    kh, kw = spec.kernel_size
    ho, wo, k = spec.h1_shape
    return itemsize * ho * wo * (3 * k + kh * kw * spec.in_shape[2])


def working_set_chunk(
    spec: ConvNetSpec,
    batch: int,
    itemsize: int = 4,
    working_set: int = CHUNK_WORKING_SET_BYTES,
    max_chunk: int | None = MAX_CHUNK,
) -> int | None:
    """Examples per chunk: the power of two nearest to `working_set` bytes of temporaries, at most
    `max_chunk` (None: no cap); None when that holds the whole batch."""
    per_example = temporaries_per_example(spec, itemsize)
    chunk = 1 << max(0, round(math.log2(working_set / per_example)))  # nearest power of 2
    chunk = chunk if max_chunk is None else min(chunk, max_chunk)
    return None if chunk >= batch else chunk


def pad_input(x: jax.Array, spec: ConvNetSpec) -> jax.Array:
    """X_pad: the (N, H, W, C) batch with the spec's zero padding on H and W."""
    (top, bottom), (left, right) = spec.pads
    return jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))


def conv_taps(x: jax.Array, spec: ConvNetSpec) -> list[jax.Array]:
    r"""The kh*kw strided slices of the padded input that the filter taps multiply.

    .. math:: \mathrm{tap}_{ab}(X)[n, i, j, c] = X_{pad}[n,\, a d_h + i s_h,\, b d_w + j s_w,\, c]

    so that ``conv(X, f) = sum_ab tap_ab(X) @ f[a, b]``. Each tap is a slice; under jit XLA fuses
    it into its consumer instead of copying it.

    Args:
      x: (N, H, W, C) batch.
      spec: the network (padding, stride, dilation, kernel size).

    Returns:
      kh*kw arrays of shape (N, Ho, Wo, C), in row-major (a, b) order.
    """
    x_pad = pad_input(x, spec)
    (kh, kw), (sh, sw), (dh, dw) = spec.kernel_size, spec.stride, spec.dilation
    ho, wo, _ = spec.h1_shape
    n, _, _, c = x_pad.shape
    return [
        lax.slice(
            x_pad,
            (0, a * dh, b * dw, 0),
            (n, a * dh + (ho - 1) * sh + 1, b * dw + (wo - 1) * sw + 1, c),
            (1, sh, sw, 1),
        )
        for a in range(kh)
        for b in range(kw)
    ]


def conv_patches(x: jax.Array, spec: ConvNetSpec) -> jax.Array:
    r"""The im2col matrix: row m = (n, i, j) holds the receptive field of output (i, j) of example n.

    .. math:: P[(n, i, j), (a, b, c)] = X_{pad}[n,\, a d_h + i s_h,\, b d_w + j s_w,\, c]

    The column order (a, b, c) is the row-major order of the HWIO filter's first three axes, so
    ``conv(X, f) = P @ f.reshape(kh kw C, K)``. Built in two steps, the kw column shifts and then
    the kh row shifts of those, so kh + kw slices instead of the kh*kw taps: XLA compiled that
    in 0.15 s against 0.4-0.6 s for one concatenation of the kh*kw taps, and it ran 1.5-2x faster
    (batch 32, 5x5, 28x28x1 with 8 filters and 32x32x3 with 32).

    Returns:
      (N Ho Wo, kh kw C) patches.
    """
    x_pad = pad_input(x, spec)
    (kh, kw), (sh, sw), (dh, dw) = spec.kernel_size, spec.stride, spec.dilation
    ho, wo, _ = spec.h1_shape
    c = x.shape[-1]
    # cols[n, r, j, (b, c)] = X_pad[n, r, b dw + j sw, c]
    cols = [lax.slice_in_dim(x_pad, b * dw, b * dw + (wo - 1) * sw + 1, sw, axis=2) for b in range(kw)]
    cols = jnp.concatenate(cols, axis=-1)
    # P[n, i, j, (a, b, c)] = cols[n, a dh + i sh, j, (b, c)]
    rows = [lax.slice_in_dim(cols, a * dh, a * dh + (ho - 1) * sh + 1, sh, axis=1) for a in range(kh)]
    return jnp.concatenate(rows, axis=-1).reshape(-1, kh * kw * c)


def conv_forward_taps(
    x: jax.Array, f: jax.Array, spec: ConvNetSpec, contract_channels: bool | None = None
) -> jax.Array:
    r"""Z1 = conv(X, f) as a shift-and-add over taps: with ``contract_channels`` (None: from
    `TAPS_CONTRACT_CHANNELS_FROM` input channels on) over the taps of the channels' products
    (`conv_forward_tap_products`), else over taps and input channels, here:

    .. math:: Z_1[n, i, j, k] = \sum_{a, b, c} \mathrm{tap}_{ab}(X)[n, i, j, c]\, f[a, b, c, k]

    Each term is a broadcast multiply of an (N, Ho, Wo, 1) slice by a (K,) row of f, so the whole
    sum is one elementwise loop (kh*kw*C multiply-adds per output) that XLA fuses with its consumer.

    Returns:
      (N, Ho, Wo, K) Z1.
    """
    kh, kw, c_in, _ = f.shape
    if contract_channels is None:
        contract_channels = c_in >= TAPS_CONTRACT_CHANNELS_FROM
    if contract_channels:
        return conv_forward_tap_products(x, f, spec)
    taps = conv_taps(x, spec)
    z = None
    for t, tap in enumerate(taps):
        a, b = divmod(t, kw)
        for c in range(c_in):
            term = tap[..., c : c + 1] * f[a, b, c][None, None, None, :]
            z = term if z is None else z + term
    return z


def conv_forward_tap_products(x: jax.Array, f: jax.Array, spec: ConvNetSpec) -> jax.Array:
    r"""Z1 = conv(X, f) as a shift-and-add over the taps of U, each pixel's products with every tap.

    .. math::
       U[n, h, w, (a, b, k)] &= \sum_c X_{pad}[n, h, w, c]\, f[a, b, c, k] \\
       Z_1[n, i, j, k] &= \sum_{a, b} U[n,\, a d_h + i s_h,\, b d_w + j s_w,\, (a, b, k)]

    The sum over c is taken first; otherwise as in `conv_forward_taps`. U is one
    (N H W, C) x (C, kh kw K) matmul of x (the padding's zeros give zeros in U), which writes
    kh kw K numbers per input pixel; the loop that XLA fuses with the sigmoid then adds the
    kh*kw taps of U (`conv_taps`) instead of kh*kw*C products. From 3 channels
    on that ran up to 1.7x faster than the per-channel loop and compiled faster; with 2 it ran
    at 0.78-1.08x the loop's speed (`TAPS_CONTRACT_CHANNELS_FROM`).

    Returns:
      (N, Ho, Wo, K) Z1.
    """
    kh, kw, c_in, k = f.shape
    taps_by_channel = f.transpose(2, 0, 1, 3).reshape(c_in, kh * kw * k)  # row c: f[:, :, c, :]
    # U of the unpadded x: U is linear in x, so `conv_taps` zero-padding U gives U of X_pad.
    u = jnp.dot(x, taps_by_channel, precision=spec.precision)  # (N, H, W, (a, b, k))
    # Tap t = (a, b) of U, restricted to its own K columns (a, b, :).
    terms = [tap[..., t * k : (t + 1) * k] for t, tap in enumerate(conv_taps(u, spec))]
    return functools.reduce(jnp.add, terms)


def conv_forward_patches(patches: jax.Array, f: jax.Array, spec: ConvNetSpec) -> jax.Array:
    """Z1 = conv(X, f) = P @ f as one (N Ho Wo, kh kw C) x (kh kw C, K) matmul.

    Returns:
      (N, Ho, Wo, K) Z1.
    """
    kh, kw, c, k = f.shape
    z = jnp.dot(patches, f.reshape(kh * kw * c, k), precision=spec.precision)
    return z.reshape(-1, *spec.h1_shape)


def conv_forward_conv(x: jax.Array, f: jax.Array, spec: ConvNetSpec) -> jax.Array:
    """Z1 = conv(X, f) as one XLA convolution over the batch (NHWC, HWIO)."""
    return lax.conv_general_dilated(
        x,
        f,
        window_strides=spec.stride,
        padding=spec.pads,
        rhs_dilation=spec.dilation,
        dimension_numbers=DIMENSION_NUMBERS,
        precision=spec.precision,
    )


def conv_forward(
    x: jax.Array,
    f: jax.Array,
    spec: ConvNetSpec,
    form: ConvForm,
    *,
    patches: jax.Array | None = None,
    rows: jax.Array | None = None,
    contract_channels: bool | None = None,
) -> jax.Array:
    """Z1 = conv(X, f) in the named form, with the patches or row slabs given (built from x if
    not), so that dE/df can reuse them; ``contract_channels`` is `conv_forward_taps`'.

    Returns:
      (N, Ho, Wo, K) Z1.
    """
    if form == "patches":
        return conv_forward_patches(conv_patches(x, spec) if patches is None else patches, f, spec)
    if form == "toeplitz":
        return conv_forward_toeplitz(toeplitz_rows(x, spec) if rows is None else rows, f, spec)
    if form == "taps":
        return conv_forward_taps(x, f, spec, contract_channels)
    return conv_forward_conv(x, f, spec)


def filter_grad_taps(x: jax.Array, delta1: jax.Array, spec: ConvNetSpec) -> jax.Array:
    r"""dE/df as kh*kw dots, each tap contracted with delta1 over M = N Ho Wo.

    .. math::
       \frac{dE}{df}[a, b, c, k] = \sum_{m} \mathrm{tap}_{ab}(X)[m, c]\, \delta_1[m, k]

    Args:
      x: (N, H, W, C) batch.
      delta1: (N, Ho, Wo, K) dE/dZ1 (already carrying the batch mean's 1/N).

    Returns:
      (kh, kw, C, K) dE/df.
    """
    kh, kw = spec.kernel_size
    c, k = x.shape[-1], delta1.shape[-1]
    d1 = delta1.reshape(-1, k)
    rows = [jnp.dot(tap.reshape(-1, c).T, d1, precision=spec.precision) for tap in conv_taps(x, spec)]
    return jnp.stack(rows).reshape(kh, kw, c, k)


def fewer_rows_first(a: jax.Array, b: jax.Array, precision=None) -> jax.Array:
    r"""a^T b for (M, p) a and (M, q) b, the M rows contracted, computed as (b^T a)^T where b has
    at most half as many columns (2 q <= p), the transpose behind `lax.optimization_barrier` (XLA
    otherwise folds it back into the dot, as the other product).

    Vmapped over examples this is a batched dot of many small products, and XLA's CPU ran the
    one with fewer output rows faster where the two sides differ by 2x or more
    (experiments/results/bench_dot_rows.md, ``fewer rows / more rows``, the order alone: 64-128
    examples, the per-example dE/df's shapes): 8 rows against the patches' 25-75 columns in
    0.48-0.67x the time in two runs, 9 against 32 in 0.57-0.61x. Nearer a tie it is noise or a
    loss (8 rows against 9 took 0.99-1.14x in the runs so far, 27 against 32 0.94-1.21x;
    and with 8 rows first the per-example gradients at batch 32-1024 of
    28x28x1 with 3x3 and 8 filters, whose patches have 9 columns, took 1.02-1.07x as long
    against the batch gradient as with 9, experiments/results/bench_amd_epyc_floor.md against
    bench_amd_epyc_reuse.md), so there a stays first. Differences under about 15% are within
    the noise of these runs. The transpose back is p q numbers per example, and a batch-1 step
    (not vmapped) takes the same order.
    """
    if 2 * b.shape[1] <= a.shape[1]:
        return lax.optimization_barrier(jnp.dot(b.T, a, precision=precision)).T
    return jnp.dot(a.T, b, precision=precision)


def filter_grad_patches(
    patches: jax.Array, delta1: jax.Array, spec: ConvNetSpec, transposed: bool = False
) -> jax.Array:
    """dE/df = P^T delta1, one (kh kw C, M) x (M, K) matmul, or its transpose delta1^T P.

    The transposed (K, kh kw C) product, filters first, ran 1.2-1.4x faster (chunks of 32 x 784
    positions, 75 columns, 32 filters: 0.88-0.94 ms against 1.07-1.32), so sums over chunks are
    kept that way and transposed back once per step (`chunk_sums`). Untransposed (one example:
    what vmap sees for per-example gradients) it is `fewer_rows_first`'s product.

    Returns:
      (kh, kw, C, K) dE/df, or with ``transposed`` (K, kh kw C), columns in the (a, b, c) order
      of `conv_patches`.
    """
    kh, kw = spec.kernel_size
    d1 = delta1.reshape(-1, delta1.shape[-1])
    if transposed:
        return jnp.dot(d1.T, patches, precision=spec.precision)
    return fewer_rows_first(patches, d1, spec.precision).reshape(kh, kw, -1, d1.shape[-1])


def toeplitz_blocks(spec: ConvNetSpec) -> tuple[int, int, int]:
    """(jb, nb, span): output columns per block, blocks per row (the last one padded where jb
    does not divide Wo), and the input columns one block reads, (jb - 1) s_w + (kw - 1) d_w + 1."""
    _, wo, _ = spec.h1_shape
    jb = min(TOEPLITZ_BLOCK, wo)
    (_, kw), (_, sw), (_, dw) = spec.kernel_size, spec.stride, spec.dilation
    return jb, -(-wo // jb), (jb - 1) * sw + (kw - 1) * dw + 1


def toeplitz_selection(spec: ConvNetSpec, dtype) -> jax.Array:
    """S[b, w, j] = 1 where input column w of a block meets filter column b at output column j
    (w = j s_w + b d_w), else 0: a constant that places f in, and folds dE/df out of, the band."""
    (_, kw), (_, sw), (_, dw) = spec.kernel_size, spec.stride, spec.dilation
    jb, _, span = toeplitz_blocks(spec)
    b, w, j = np.ogrid[:kw, :span, :jb]
    return jnp.asarray(w == j * sw + b * dw, dtype)


def toeplitz_column_groups(x: jax.Array, spec: ConvNetSpec) -> jax.Array:
    r"""X_pad with its columns grouped g = jb s_w at a time, the step between blocks:
    ``Xg[n, r, q, (v, c)] = X_pad[n, r, q g + v, c]``.

    Returns:
      (N, Hp, nb + nt - 1, g C), nt = ceil(span / g) the groups one block's span covers. X_pad
      is widened with zeros on the right to whole groups; only a padded last block (Wo not a
      multiple of jb) reads them.
    """
    x_pad = pad_input(x, spec)
    jb, nb, span = toeplitz_blocks(spec)
    n, hp, _, c = x_pad.shape
    g = jb * spec.stride[1]
    width = (nb + -(-span // g) - 1) * g  # every column a block reads lies below (nb - 1) g + span
    if width > x_pad.shape[2]:
        x_pad = jnp.pad(x_pad, ((0, 0), (0, 0), (0, width - x_pad.shape[2]), (0, 0)))
    return x_pad[:, :, :width].reshape(n, hp, width // g, g * c)


def toeplitz_rows(x: jax.Array, spec: ConvNetSpec) -> jax.Array:
    r"""R, the row slabs: row (n, i, s) holds the kh input rows under output row i, across the
    span of input columns that block s of jb output columns reads.

    .. math:: R[(n, i, s), (a, w, c)] = X_{pad}[n,\, a d_h + i s_h,\, s\, j_b s_w + w,\, c]

    R holds kh span C / jb numbers per output position (10 per input channel for 5x5 with
    jb = 4, stride 1) where the patches hold kh kw C (25 per channel): the receptive fields of
    neighbouring output columns overlap, and one slab serves jb of them.

    Returns:
      (N Ho nb, kh span C) slabs, nb = ceil(Wo / jb) blocks per row. X_pad is widened with
      zeros on the right to whole groups of jb s_w columns; only a padded last block (Wo not a
      multiple of jb) reads them, and its extra outputs are dropped.
    """
    (kh, _), (sh, _), (dh, _) = spec.kernel_size, spec.stride, spec.dilation
    ho, _, _ = spec.h1_shape
    _, nb, span = toeplitz_blocks(spec)
    # Built in two steps, as `conv_patches` is: block s starts at input column s g (g = jb s_w),
    # so its span columns are the column groups s .. s + nt - 1 of `toeplitz_column_groups` laid
    # side by side, cut to span: nt slices of contiguous runs of g C numbers, then kh row slices
    # of those. That copied R 2x faster than stacking the kh row slabs and then the nb blocks (a
    # standalone timing, not committed: 1.36 against 2.77 ms at 128 examples of 32x32x3, 5x5;
    # 0.39 against 0.90 for 28x28x1).
    xg = toeplitz_column_groups(x, spec)
    n, c = x.shape[0], x.shape[-1]
    nt = xg.shape[2] - nb + 1  # the groups one block's span covers
    # cols[n, r, s, (w, c)] = X_pad[n, r, s g + w, c] for w < span
    cols = jnp.concatenate([xg[:, :, t : t + nb] for t in range(nt)], axis=-1)[..., : span * c]
    # R[n, i, s, (a, w, c)] = cols[n, a dh + i sh, s, (w, c)]
    rows = [lax.slice_in_dim(cols, a * dh, a * dh + (ho - 1) * sh + 1, sh, axis=1) for a in range(kh)]
    return jnp.concatenate(rows, axis=-1).reshape(n * ho * nb, kh * span * c)


def conv_forward_toeplitz(rows: jax.Array, f: jax.Array, spec: ConvNetSpec) -> jax.Array:
    r"""Z1 = conv(X, f) = R @ T(f), T the banded (doubly blocked) Toeplitz matrix of the filters.

    .. math::
       T[(a, w, c), (j, k)] = \sum_b S[b, w, j]\, f[a, b, c, k] = f[a, (w - j s_w) / d_w, c, k]
       \text{ on the band, else } 0

    so (R T)[(n, i, s), (j, k)] = sum_{a,b,c} X_pad[n, a d_h + i s_h, (s j_b + j) s_w + b d_w, c]
    f[a, b, c, k] = Z1[n, i, s j_b + j, k]: the forward formula, plus exact zeros off the band.
    One matmul of (N Ho nb, kh span C) x (kh span C, jb K) with jb K columns; the patches' is
    (N Ho Wo, kh kw C) x (kh kw C, K). It does span / kw times the multiplies (1.6x for 5x5,
    jb = 4) and writes 10 instead of 25 numbers per output position and input channel for 5x5:
    on this CPU building P took longer than its matmul (a standalone timing at the headline's
    chunk of 128 examples, not committed: 2.7 ms to build P, 1.3 for P @ f).

    Returns:
      (N, Ho, Wo, K) Z1.
    """
    kh, kw, c, k = f.shape
    jb, nb, span = toeplitz_blocks(spec)
    S = toeplitz_selection(spec, f.dtype)
    T = jnp.einsum("bwj,abck->awcjk", S, f, precision=spec.precision).reshape(kh * span * c, jb * k)
    z = jnp.dot(rows, T, precision=spec.precision)
    ho, wo, _ = spec.h1_shape
    return z.reshape(-1, ho, nb * jb, k)[:, :, :wo]


def filter_grad_toeplitz(
    rows: jax.Array, delta1: jax.Array, spec: ConvNetSpec, transposed: bool = False
) -> jax.Array:
    r"""dE/df from R: G = delta1^T R, the gradient of the band T, folded back onto f.

    Since Z1 = R T and T is linear in f, dE/dT = R^T delta1 and dE/df[a, b, c, k] =
    sum_{w, j} S[b, w, j] dE/dT[(a, w, c), (j, k)]: the sum over a block's jb output columns of
    the slabs' column j s_w + b d_w times delta1. G is computed filters first, (jb K, kh span C),
    as `filter_grad_patches` does. Untransposed (one example: what vmap sees for per-example
    gradients), where the slabs have fewer columns than jb K, G^T = R^T delta1 is computed
    instead, the product with fewer output rows, and folded with the indices read the other way
    (XLA lays G out for the fold's dot with a copy, either way). Vmapped, that order alone ran
    in 0.25-0.93x the time of the other with 18-120 slab columns against jb K = 128 (32
    filters; two runs), 0.59-0.68x with 18 against 32 (experiments/results/bench_dot_rows.md);
    with 8 filters and 40-120 slab columns delta1 stays first (its order: 0.82-1.05x the other's).
    delta1 is padded with zeros to nb jb columns, so the output columns of a padded last block
    (s jb + j >= Wo) contribute nothing.

    Returns:
      (kh, kw, C, K) dE/df, or with ``transposed`` (K, kh kw C).
    """
    kh, kw = spec.kernel_size
    ho, wo, k = spec.h1_shape
    jb, nb, span = toeplitz_blocks(spec)
    d1 = jnp.pad(delta1, ((0, 0), (0, 0), (0, nb * jb - wo), (0, 0))).reshape(-1, jb * k)
    S = toeplitz_selection(spec, d1.dtype)
    if transposed or jb * k <= rows.shape[1]:
        G = jnp.dot(d1.T, rows, precision=spec.precision).reshape(jb, k, kh, span, -1)
        fold = "bwj,jkawc->"
    else:  # one example, fewer slab columns than jb K: G^T, fewer output rows
        G = jnp.dot(rows.T, d1, precision=spec.precision).reshape(kh, span, -1, jb, k)
        fold = "bwj,awcjk->"
    if transposed:
        return jnp.einsum(fold + "kabc", S, G, precision=spec.precision).reshape(k, -1)
    return jnp.einsum(fold + "abck", S, G, precision=spec.precision)


def filter_grad_conv(x: jax.Array, delta1: jax.Array, spec: ConvNetSpec, parts: int = 1) -> jax.Array:
    r"""dE/df as convolutions in which the batch is the contracted feature axis
    (`ops.conv2d_filter_vjp_sum`: x as (C, H, W, N), delta1 as (Ho, Wo, N, K), N contracted).

    dE/df is a sum over the examples, so it is also the sum of the same conv over ``parts``
    consecutive slices of them (as equal as the count allows, at most one part per example):
    independent convs, which XLA's CPU runtime runs at once, each on a core of its own
    (`CONV_FILTER_GRAD_PARTS`).

    Returns:
      (kh, kw, C, K) dE/df.
    """
    bounds = np.linspace(0, x.shape[0], min(parts, x.shape[0]) + 1).round().astype(int)
    sums = [
        ops.conv2d_filter_vjp_sum(x[a:b], delta1[a:b], kernel_size=spec.kernel_size, **spec.conv_kwargs)
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return functools.reduce(jnp.add, sums)


def check_formulation(formulation) -> Formulation:
    """Raise unless `formulation` is a Formulation of known forms, a positive int chunk (or None)
    and a positive int conv_parts (which only the conv dE/df uses)."""
    if not isinstance(formulation, Formulation):
        raise TypeError(f"formulation must be a jaxbp.batched.Formulation, got {formulation!r}")
    for name in ("forward", "filter_grad"):
        value = getattr(formulation, name)
        if value not in FORMS:
            raise ValueError(f"formulation.{name} must be one of {FORMS}, got {value!r}")
    chunk = formulation.chunk
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"formulation.chunk must be None or an int >= 1, got {chunk!r}")
    parts = formulation.conv_parts
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"formulation.conv_parts must be an int >= 1, got {parts!r}")
    return formulation


def slide_terms(
    params: Params,
    x: jax.Array,
    y: jax.Array,
    spec: ConvNetSpec,
    forward: ConvForm,
    n: int,
    *,
    patches: jax.Array | None = None,
    rows: jax.Array | None = None,
    contract_channels: bool | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    r"""(H1, O, delta2, delta1) of m examples: the slides' forward and their per-example deltas,
    nothing contracted over the examples yet, delta2 carrying a mean's 1/n (n = 1: none).
    ``patches``, ``rows`` and ``contract_channels`` are `conv_forward`'s.

    .. math::
       \delta_2 = (O - Y) \odot O (1 - O) / n, \qquad
       \delta_1 = (\delta_2 W^T) \odot H_1 (1 - H_1)

    Returns:
      H1 (m, D), O (m, n_out), delta2 (m, n_out) and delta1 (m, Ho, Wo, K).
    """
    m = x.shape[0]
    Z1 = conv_forward(
        x, params.f, spec, forward, patches=patches, rows=rows, contract_channels=contract_channels
    )
    # H1 and delta1 are kept as (m, D) matrices: with few filters the (m, Ho, Wo, K) layout has
    # a minor axis of 1 to 8 numbers, and XLA's CPU loops over it ran 3.5x slower (measured at
    # batch 256, 28x28x1, 5x5, one filter: 8.9 ms against 2.5 ms for the whole gradient).
    Z1 = Z1.reshape(m, -1)
    if forward != "taps" and jax.default_backend() == "cpu":
        # A matmul's or conv's Z1 is written out anyway; the barrier keeps the sigmoid on this
        # (m, D) view. Without it XLA moves the reshape past the sigmoid, onto the product's
        # (rows, jb K) or (rows, K) shape, and XLA's CPU compiler took 0.25 s for a sigmoid whose
        # minor axis is 32 numbers (16: 0.11 s, 24: 0.17 s) against 0.03-0.05 s for the other
        # widths tried, 4-256 (tanh and exp: 0.03-0.04 s at every width). With it the gradient
        # compiled in 0.24-0.40 s against 0.54-0.68 s with 8 filters in the Toeplitz form or 32
        # filters (experiments/results/bench_compile_sigmoid.md); the steps' run time stayed
        # within the noise (0.97x the run before's, median, bench_amd_epyc_sigmoid.md). The
        # taps' Z1 is never written: it stays fused. Only on the CPU: the slow compile is its
        # LLVM backend's, and an accelerator's XLA may fuse the sigmoid into the product
        # (unmeasured).
        Z1 = lax.optimization_barrier(Z1)
    H1 = ops.sigmoid(Z1)
    O = ops.sigmoid(jnp.dot(H1, params.W, precision=spec.precision) + params.b[None, :])
    delta2 = (O - y) * (O * (1 - O)) / n  # (m, n_out): dE/dZ2 (of the mean loss for n > 1)
    # W delta2 as (m, D), contracting W's minor (n_out) axis as it is stored. Written with an
    # explicit W.T, at m = 1 XLA's CPU made this dot a loop fusion over W instead of a library
    # dot, and the batch-1 step with 32 filters took 1.15-1.45x as long at 3 of the 4 points
    # (28x28x1, 5x5: 0.337 ms against 0.232) and 0.94x at the fourth; from m = 32 on XLA
    # compiles both forms to the same program.
    dE_dH1 = lax.dot_general(delta2, params.W, (((1,), (1,)), ((), ())), precision=spec.precision)
    delta1 = (dE_dH1 * (H1 * (1 - H1))).reshape(m, *spec.h1_shape)  # dE/dZ1, one fused pass
    return H1, O, delta2, delta1


def chunk_sums(
    params: Params,
    x: jax.Array,
    y: jax.Array,
    spec: ConvNetSpec,
    form: Formulation,
    n: int,
    transposed: bool = True,
    contract_channels: bool | None = None,
) -> tuple[jax.Array, Params]:
    """(sum of E, sums of dE/dparams) over the examples of one chunk, each already divided by n.

    The slides' per-example terms, with the examples of the chunk as one more contracted axis.
    With ``transposed`` the two weight gradients come small axis first, f as (K, kh kw C) and W
    as (n_out, D) (see `untranspose`): faster for sums over several examples, and slower for a
    single vmapped example, where the transpose back is one per example (per-example gradients,
    batch 256, 28x28x1, 8 filters: 52 ms transposed against 29). ``contract_channels`` is
    `conv_forward_taps`'.
    """
    forms = (form.forward, form.filter_grad)
    patches = conv_patches(x, spec) if "patches" in forms else None
    rows = toeplitz_rows(x, spec) if "toeplitz" in forms else None
    H1, O, delta2, delta1 = slide_terms(
        params, x, y, spec, form.forward, n, patches=patches, rows=rows, contract_channels=contract_channels
    )
    E = 0.5 * jnp.sum((O - y) ** 2) / n
    if transposed:
        # (dE/dW)^T = sum_n delta2[n] H1[n]^T written (n_out, D): the same contraction over the
        # m examples with a 10-wide output minor axis, H1^T delta2, ran 2.4-3x slower (chunk of
        # 32 x 25088: 0.16-0.17 ms against 0.42-0.48).
        dE_dW = jnp.dot(delta2.T, H1, precision=spec.precision)
    else:
        dE_dW = jnp.dot(H1.T, delta2, precision=spec.precision)  # sum_n H1[n] delta2[n]^T
    dE_db = jnp.sum(delta2, axis=0)
    if form.filter_grad == "patches":
        dE_df = filter_grad_patches(patches, delta1, spec, transposed)
    elif form.filter_grad == "toeplitz":
        dE_df = filter_grad_toeplitz(rows, delta1, spec, transposed)
    else:
        if form.filter_grad == "taps":
            dE_df = filter_grad_taps(x, delta1, spec)
        else:
            dE_df = filter_grad_conv(x, delta1, spec, form.conv_parts)
        dE_df = filters_first(dE_df) if transposed else dE_df
    return E, Params(f=dE_df, W=dE_dW, b=dE_db)


def filters_first(f: jax.Array) -> jax.Array:
    """(kh, kw, C, K) -> (K, kh kw C): `chunk_sums`' transposed layout of dE/df."""
    return f.reshape(-1, f.shape[-1]).T


def untranspose(sums: Params, spec: ConvNetSpec) -> Params:
    """The gradients in the params' shapes from `chunk_sums`' transposed (K, kh kw C) dE/df and
    (n_out, D) dE/dW: one transpose per step, after the last chunk, of a few thousand numbers."""
    kh, kw = spec.kernel_size
    f = sums.f.T.reshape(kh, kw, spec.in_shape[2], spec.n_filters)
    return Params(f=f, W=sums.W.T, b=sums.b)


def add_chunks(add: Callable, total, x: jax.Array, y: jax.Array, chunk: int):
    """`total` after ``total = add(total, x_chunk, y_chunk)`` for each chunk of `chunk` examples of
    x and y in turn, in a `lax.fori_loop` over the whole chunks, then the remainder (n not a
    multiple of chunk) as one more, smaller chunk.

    The whole chunks are rows of x (and of y) flattened chunk by chunk, indexed by the loop.
    Scanning over x as (whole, chunk, H, W, C) made XLA copy all of x first where C = 1 (the
    layouts it gave the unit axis differed), and slicing x at i chunk made the kernels that read
    the slice slower (the step 1.14-1.28x at batch 256 and 1024 of 32x32x3 with 3x3, one
    filter); a row of a matrix does neither. (With a remainder, x's whole chunks are still
    copied out once, as the scan did.) No negative indices: JAX's wrap of them puts a select
    into every kernel that reads the row, and the step took 1.16-1.19x as long with it at those
    two points (standalone timings, not committed).
    """
    n = x.shape[0]
    whole = n // chunk
    x_rows = x[: whole * chunk].reshape(whole, -1)
    y_rows = y[: whole * chunk].reshape(whole, -1)

    def add_whole_chunk(i, total):
        x_chunk, y_chunk = (
            lax.dynamic_index_in_dim(rows, i, keepdims=False, allow_negative_indices=False).reshape(
                chunk, *a.shape[1:]
            )
            for rows, a in ((x_rows, x), (y_rows, y))
        )
        return add(total, x_chunk, y_chunk)

    total = lax.fori_loop(0, whole, add_whole_chunk, total)
    if whole * chunk < n:
        total = add(total, x[whole * chunk :], y[whole * chunk :])
    return total


def value_and_grads(
    params: Params,
    x: jax.Array,
    y: jax.Array,
    spec: ConvNetSpec,
    *,
    formulation: Formulation | None = None,
    contract_channels: bool | None = None,
) -> tuple[jax.Array, Params]:
    r"""(E, dE/dparams) of a batch: the means over examples, computed as contractions over N.

    Args:
      params: the network's `Params`.
      x: (N, H, W, C) batch.
      y: (N, n_out) targets.
      spec: the network.
      formulation: how to compute the two convolutions and in what chunks; None picks
        `choose_formulation`.
      contract_channels: with the taps forward, whether the input channels are contracted first
        (`conv_forward_taps`); None: from `TAPS_CONTRACT_CHANNELS_FROM` channels on.

    Returns:
      (E, Params(dE/df, dE/dW, dE/db)), E the mean of the per-example losses
      :math:`\tfrac12 \sum_j (O_j - Y_j)^2` and each gradient the mean of the per-example ones.
    """
    x, y, batched = check_inputs(params, x, y, spec)
    if not batched:
        raise ValueError(f"x must be a batch (N, *{spec.in_shape}), got {x.shape}")
    n = x.shape[0]
    if n == 0:
        raise ValueError(f"x must hold at least one example, got shape {x.shape}")
    if formulation is None:
        form = choose_formulation(spec, n, itemsize=x.dtype.itemsize)
    else:
        form = check_formulation(formulation)
    chunk = n if form.chunk is None else min(form.chunk, n)
    if n == 1:  # one example (what vmap sees for per-example gradients): no sum to transpose
        return chunk_sums(params, x, y, spec, form, n, transposed=False, contract_channels=contract_channels)
    if chunk == n:
        E, sums = chunk_sums(params, x, y, spec, form, n, contract_channels=contract_channels)
        return E, untranspose(sums, spec)

    # The loop carries two arrays: (dE/dW)^T, and E, dE/df and dE/db laid end to end in one
    # vector. Each chunk adds into them with two fused kernels, started from two broadcasts of
    # zeros, where a carry of four arrays took four adds and three broadcasts; in the update step
    # reading the vector back costs one more kernel, E's slice (the others fuse into the update).
    # Each kernel XLA generates costs compile time on the CPU (experiments/PERFORMANCE.md).
    # dE/dW stays apart: in the one vector with the rest, the step ran 1.05-1.11x slower with
    # 32 filters (batch 256, 32x32x3, 5x5: XLA's fused concatenation is slower than an add
    # across the D n_out numbers); the rest is at most a few thousand numbers.
    shapes = [(), (spec.n_filters, params.f.size // spec.n_filters), params.b.shape]
    offsets = np.cumsum([0, *(math.prod(shape) for shape in shapes)])

    def add_chunk(total, x_chunk, y_chunk):
        E, part = chunk_sums(params, x_chunk, y_chunk, spec, form, n, contract_channels=contract_channels)
        E_f_b, W = total
        return E_f_b + jnp.concatenate([E[None], part.f.ravel(), part.b]), W + part.W

    # The zeros are typed like the chunks' sums: zeros_like keeps an array's varying mesh axes,
    # so under `jax.shard_map` (`jaxbp.parallel`) the zeros vary over the axes the shard of x and
    # the params vary over, as the sums do (the loop requires equal carry types). That relies on
    # JAX's automatic pcast (jax_auto_pcast, on by default in jax 0.10); tests/test_mesh.py runs
    # shards over one chunk, and fails if it stops holding.
    zero = jnp.zeros_like(x, shape=()) + jnp.zeros_like(params.f, shape=())
    zeros = (jnp.zeros(offsets[-1], x.dtype) + zero, jnp.zeros(params.W.T.shape, x.dtype) + zero)
    E_f_b, W = add_chunks(add_chunk, zeros, x, y, chunk)
    E, f, b = (E_f_b[a:z].reshape(shape) for a, z, shape in zip(offsets[:-1], offsets[1:], shapes))
    return E, untranspose(Params(f=f, W=W, b=b), spec)


def per_example_formulation(spec: ConvNetSpec, batch: int, itemsize: int = 4) -> Formulation:
    """The formulation for a vmapped batch of one, whole: `choose_formulation`'s forward form, and
    for dE/df the same form, except after the taps the Toeplitz form. `per_example_grads` vmaps
    it except after the taps, where it computes the batch's terms at once (`filter_grad_rows`);
    the history below is of the vmapped taps forward, for `value_and_grads_example`. On the CPU
    never XLA's conv for dE/df: vmapped over examples, that conv is a grouped conv with one
    group per example, which XLA's CPU runs slowly. Off the CPU the conv (cuDNN's grouped convolutions),
    unmeasured.

    Per example, dE/df after the taps forward is one (jb K, Ho nb) x (Ho nb, kh span C) matmul
    per example with the Toeplitz form, against kh*kw dots with the taps. With one filter the
    per-example gradients took 1.29-2.6x, 1.33-2.5x, 1.57-2.7x, 1.34-2.6x, 1.48-3.7x and
    (with the whole batch up to 96 MiB, git 6b78109) 1.32-2.9x the
    batch gradient in five bench grids (bench.md as committed in 8c4561e and 87b3da5, and with
    git 540461b, 7377a9d and 82cbba1 in its header, the last with the taps' whole batch at 3x3,
    which sped up the batch gradient more than the per-example one), where the grid of e199a4c,
    with the taps' dots, had 2.5-4.1x (batch 256, 28x28x1, 5x5: 4.30 ms at 8c4561e, 4.03 at
    540461b, 3.66 at 7377a9d, 3.52 at 82cbba1, against 6.07).
    A standalone interleaved timing (not committed) also had the patches at 1.9-6.5x, and
    another (not committed) dE/df per example as one contraction over the input rows with a
    row-Toeplitz matrix of delta1 (no R, 7x the multiplies) at 1.45-4.0x against this form's
    1.26-1.80x at five one-filter points. With 8 or more filters and 3x3 the Toeplitz dE/df
    measured no faster than the patches there (batch 256, 28x28x1: 37.8 against 38.3 ms), and
    the output write dominates.
    """
    chosen = choose_formulation(spec, batch, itemsize=itemsize)
    filter_grad: ConvForm = "toeplitz" if chosen.forward == "taps" else chosen.forward
    return Formulation(chosen.forward, filter_grad, None)


def value_and_grads_example(
    params: Params,
    x: jax.Array,
    y: jax.Array,
    spec: ConvNetSpec,
    *,
    formulation: Formulation | None = None,
) -> tuple[jax.Array, Params]:
    """(E, dE/dparams) for one (H, W, C) example: `value_and_grads` of a batch of one.

    Equal to `jaxbp.backward.value_and_manual_grads_example`; meant to be `jax.vmap`-ed: the taps
    and patches vmap into batched dots, where vmapping the per-example convolution of
    `jaxbp.backward` (dE/df = conv(X, delta1) with C as the conv's batch) gives a grouped
    convolution per example, which XLA's CPU backend runs slowly (experiments/bench.py,
    per_ex_manual). None takes `per_example_formulation`. The taps forward keeps its per-channel
    loop (``contract_channels=False``), as `per_example_grads_taps` does: vmapped,
    `conv_forward_tap_products` writes U for every example of the batch.
    """
    if formulation is None:
        formulation = per_example_formulation(spec, 1, itemsize=jnp.asarray(x).dtype.itemsize)
    return value_and_grads(params, x[None], y[None], spec, formulation=formulation, contract_channels=False)


def per_example_grads(params: Params, x: jax.Array, y: jax.Array, spec: ConvNetSpec) -> Params:
    """Per-example gradients of a batch, each leaf with a leading axis N, nothing summed over N.

    After the taps forward (one filter on few channels, `per_example_formulation`)
    `per_example_grads_taps`, the whole batch at once; otherwise `jax.vmap` of
    `value_and_grads_example` over the whole batch (the patches or the Toeplitz form: batched
    dots). With 8 or more filters most of the time goes into writing the output: the
    per-example dE/dW alone is N x D x n_out numbers (experiments/bench.py times that write
    alone as ``per_ex_dW_write``).
    """
    form = per_example_formulation(spec, x.shape[0], itemsize=x.dtype.itemsize)
    if form.forward == "taps":
        return per_example_grads_taps(params, x, y, spec)
    return jax.vmap(lambda x, y: value_and_grads_example(params, x, y, spec, formulation=form)[1])(x, y)


def per_example_grads_taps(
    params: Params,
    x: jax.Array,
    y: jax.Array,
    spec: ConvNetSpec,
    max_terms: int | None = None,
    contract_channels: bool = False,
) -> Params:
    """Per-example gradients after the taps forward: the slides' terms of the whole batch at once
    (`slide_terms` with n = 1), dE/dW = H1 delta2^T and dE/db = delta2 of each example, and
    dE/df by `filter_grad_rows` (``max_terms`` is its).

    The taps forward keeps the per-channel loop unless ``contract_channels``: over the whole batch
    `conv_forward_tap_products` writes U, kh kw K numbers per input pixel (K = 1 here) for all N
    examples (105 MB at batch 1024 of 32x32x3 with 5x5). There this path took 1.5-3.0x as long
    with it (3x3 and 5x5), and 0.96-1.05x in `lax.map` chunks; at batch 32 and 256 of 32x32x3
    0.92-1.25x, in chunks 0.86-1.25x (experiments/results/bench_per_example_products.md,
    ``products`` and ``products_chunks``): no rule for it.

    With one filter, vmapping `value_and_grads_example` (the Toeplitz form's dE/df, a few
    numbers per batched dot) took 0.95-2.15x the batch gradient at batch 32-1024, the better of
    the whole batch and `lax.map` chunks, where this took 0.95-1.74x, within 1.2x at 8 of the 12
    points, and was 1.02-2.99x faster than the vmapped whole batch
    (experiments/results/bench_per_example.md; rerun with an untimed call before each sample
    and the batch step's channels contracted first, bench_per_example_warm.md: 0.95-2.35x,
    within 1.2x at 6 of 12, all on 28x28x1). At batch 4096 each call writes 94-147 MB of
    fresh per-example dE/dW (N x D x n_out numbers), and this took 2.2-3.0x (2.82-3.42x in the
    rerun). The same path
    under `lax.map` in chunks of `working_set_chunk` examples (``rows_chunks`` there) took
    1.16-2.3x the whole batch's time with 28x28x1 at batch 256-4096, 0.92-1.09x with 32x32x3
    and 3x3 filters, and 0.83-0.94x with 32x32x3 and 5x5: no rule for chunks.
    """
    H1, _, delta2, delta1 = slide_terms(params, x, y, spec, "taps", 1, contract_channels=contract_channels)
    dE_dW = H1[:, :, None] * delta2[:, None, :]  # H1[n] delta2[n]^T, (N, D, n_out)
    return Params(f=filter_grad_rows(x, delta1, spec, max_terms), W=dE_dW, b=delta2)


def rows_terms(spec: ConvNetSpec) -> int:
    """kh kw Ho: the products `filter_grad_rows` writes out, Ho for each tap."""
    kh, kw = spec.kernel_size
    return kh * kw * spec.h1_shape[0]


def filter_grad_rows(
    x: jax.Array, delta1: jax.Array, spec: ConvNetSpec, max_terms: int | None = None
) -> jax.Array:
    r"""Per-example dE/df, each example its own sum: for each tap a sum over the output rows i,
    written out term by term, then a sum over the output columns j.

    .. math::
       \frac{dE}{df}[n, a, b, c, k] = \sum_j \Big( \sum_{i < H_o}
       \mathrm{tap}_{ab}(X)[n, i, j, c]\, \delta_1[n, i, j, k] \Big)

    The slides' conv(delta1, X) of one example, for every example at once. Each inner sum is Ho
    broadcast products of (N, Wo, K, C) row slices, which XLA fuses into one elementwise loop
    over the examples, as it does the taps forward's sum over taps; what is left to reduce is Wo
    numbers per output. (K, C) and not (C, K): C is the minor axis, K = 1 where this runs.
    The same contraction as one reduction over (i, j) per tap made the per-example gradients
    1.01-1.80x slower at all 16 points of experiments/results/bench_per_example.md (``reduce``;
    XLA's CPU reductions). Past ``max_terms`` written-out products (`rows_terms`, kh kw Ho: 700
    at 32x32 with 5x5; None for `PER_EXAMPLE_UNROLLED_MAX_TERMS`) it is that reduction, whose
    compile time does not grow with Ho: the written-out sums took about 2 ms of compile time a
    term (1.2 s more than the vmapped path at 600 terms, a standalone timing, not committed).

    Args:
      x: (N, H, W, C) batch.
      delta1: (N, Ho, Wo, K) dE/dZ1 of each example.
      max_terms: the most products written out.

    Returns:
      (N, kh, kw, C, K) dE/df of each example.
    """
    kh, kw = spec.kernel_size
    ho, _, k = spec.h1_shape
    n, c = x.shape[0], x.shape[-1]
    unrolled = rows_terms(spec) <= (PER_EXAMPLE_UNROLLED_MAX_TERMS if max_terms is None else max_terms)
    sums = []
    for tap in conv_taps(x, spec):  # (N, Ho, Wo, C) each
        if unrolled:
            rows = [tap[:, i, :, None, :] * delta1[:, i, :, :, None] for i in range(ho)]  # (N, Wo, K, C)
            sums.append(jnp.sum(functools.reduce(jnp.add, rows), axis=1))
        else:
            sums.append(jnp.sum(tap[:, :, :, None, :] * delta1[..., None], axis=(1, 2)))
    # sums: kh kw arrays of (N, K, C) -> (N, kh, kw, C, K)
    return jnp.stack(sums, axis=1).reshape(n, kh, kw, k, c).swapaxes(-1, -2)
