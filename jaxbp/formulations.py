"""Which form of the two convolutions, and what chunk of the batch, the batch gradient uses:
the fastest measured, by shape and backend (`choose_formulation`; the forms are `jaxbp.conv_forms`,
the batch gradient that runs them `jaxbp.batched`).

The batch step does not vmap, and uses XLA's conv only where it measured faster. Under vmap the
per-example dE/df (a conv whose batch axis is C) becomes a grouped conv per example, which XLA's
CPU runs slowly. The ``conv`` forms (XLA's convolution, with the batch as the contracted axis of
dE/df) serve dE/df after the taps (but a single example on 2 or more channels) and from 32 filters
on (but a single example, whose dE/df is the patches'), and both convolutions on accelerators
other than a GPU (not measured there; on a GPU the patches for both measured fastest, below). On
the CPU dE/df's conv is split over the examples into a few convs that run at once
(``conv_parts``): with 32 filters Eigen ran one such conv on one core. The measurements assume
the steps' `jaxbp.compiler_options()`: with jaxlib 0.10's default YNNPACK convolutions the same
convs ran up to 10x slower (`jaxbp.compile_options`).

Which formulation and chunk are fastest depends on the shape; `choose_formulation` encodes the
measurement, `jaxbp.tune_formulation` times the alternatives on the machine at hand.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple

import jax

from jaxbp import machine
from jaxbp.conv_forms import FORMS
from jaxbp.conv_forms import ConvForm
from jaxbp.conv_forms import toeplitz_blocks
from jaxbp.spec import ConvNetSpec


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
      contract_channels: with the taps forward, True contracts the input channels first (U =
        X_pad f, one small matmul, then kh*kw shifted slices of U:
        `jaxbp.conv_forms.conv_forward_tap_products`), False runs the loop over taps and
        channels; None, from `jaxbp.conv_forms.TAPS_CONTRACT_CHANNELS_FROM` channels on. Which
        is faster differs between CPUs (below); only the taps forward reads it.
      batch_minor: with the taps forward and XLA's conv for dE/df, every array of a chunk with
        its examples as the minor axis, x transposed once per chunk (`jaxbp.batch_minor`); the
        taps' loop then runs per channel.
      w_delta2_terms: dE/dH1 = delta2 W^T as n_out broadcast products that XLA fuses into the
        kernels reading delta1 (True) or as a matmul written out (False); None, the rule
        (`w_delta2_as_terms`): the products where dE/df is XLA's conv after the patches or
        Toeplitz forward, on a CPU without AVX-512, for 2 or more examples and at most 10
        outputs.
    """

    forward: ConvForm
    filter_grad: ConvForm
    chunk: int | None = None
    conv_parts: int = 1
    contract_channels: bool | None = None
    batch_minor: bool = False
    w_delta2_terms: bool | None = None

    def label(self) -> str:
        """``forward/filter_grad/chunk`` (``all`` for the whole batch), the filter_grad ``conv*P``
        where XLA's conv is split in P parts, the forward ``taps(products)`` or
        ``taps(per_channel)`` where the taps' channels are set and ``taps(batch_minor)`` in the
        batch-minor layout, and ``+terms`` or ``+dot`` where w_delta2_terms is set: how the
        benchmark's tables name it."""
        parts = f"*{self.conv_parts}" if self.filter_grad == "conv" and self.conv_parts > 1 else ""
        forward = self.forward
        if forward == "taps" and self.batch_minor:
            forward += "(batch_minor)"
        elif forward == "taps" and self.contract_channels is not None:
            forward += "(products)" if self.contract_channels else "(per_channel)"
        terms = {None: "", True: "+terms", False: "+dot"}[self.w_delta2_terms]
        return f"{forward}/{self.filter_grad}{parts}/{self.chunk or 'all'}{terms}"


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
# * (Below 8 filters superseded by the bullet on 2 to 7 filters further down.) From C K = 8 on,
#   for 5x5 filters the Toeplitz row slabs for both convolutions, for 3x3 the patches. Two runs of
#   the patches against the Toeplitz form at the same chunk, 12 points each with 5x5 and 3x3, 8
#   and 32 filters (experiments/results/bench_formulations_toeplitz.md, and
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
#   then blocks; a rerun after R was copied in two steps (`jaxbp.conv_forms.toeplitz_rows`; the
#   same command, renamed, bench_formulations_toeplitz_two_step_r.md) had the Toeplitz form ahead
#   at 7 of 12 5x5 points and behind by more than 1.1x at 1 (the headline: 5.35 against 7.28 ms;
#   batch 256, 32x32x3, 8 filters: 11.3 against 19.5), and with 3x3 ahead at 2 of 12 and behind by
#   more than 1.1x at 6 (batch 1024, 32x32x3, 8 filters: 33.4 against 31.0): the rule stands.
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
# * (Superseded: after the taps on 2 or more channels by the bullet "A single example with one
#   filter on 2 or more channels" further down, measured on the AMD EPYC only, the Xeon's
#   bench_formulations_b1.md having no Toeplitz dE/df; past the taps by the patches for both,
#   below. It now holds for one filter on one channel.)
#   A single example (bench_formulations_b1.md, sub-millisecond and noisy): dE/df as XLA's conv,
#   one op where the taps are kh*kw dots. The pick was within 1.2x of the fastest formulation at
#   9 of 12 points, and 1.26-1.40x at three: with one filter and 3x3 the patches for dE/df won by
#   0.02-0.05 ms (32x32x3: 0.115 against 0.161 ms), and at 32x32x3, 5x5, 8 filters conv/patches
#   by 0.10 ms.
# * A single example past the taps: the patches for both, P built once and used twice (its dE/df
#   a (kh kw C, Ho Wo) x (Ho Wo, K) matmul), not the patches forward with XLA's conv for dE/df.
#   The two side by side in the same run, at batch 1 with 8 and 32 filters (28x28x1 and
#   32x32x3, 3x3 and 5x5), the patches for both over the conv's time:
#   - the Xeon (bench_formulations_b1.md, 5 repeats): 0.88-1.13x, faster at 4 of 8 (median
#     about 1.0x): the same time;
#   - the Zen 4 AMD EPYC before the change: 0.53-0.98x, faster at all 8
#     (bench_amd_epyc_zen4_formulations.md, 3 repeats), and 0.53-1.00x, faster at 6 of 8 and
#     within 1% at the other 2 (bench_amd_epyc_zen4_formulations_small_batch.md, 7 repeats;
#     32x32x3, 5x5, 8 filters: 0.154 against 0.291 ms);
#   - the Zen 4 after it (bench_amd_epyc_zen4_b1_patches.md, 15 repeats of at least 50 ms):
#     0.55-1.02x, faster at 7 of 8 (32x32x3, 5x5, 8 filters: 0.153 against 0.277 ms).
#   So as fast on the one CPU and up to 1.9x faster on the other. The tuner's runs on the 32 MB
#   AMD EPYC picked the patches or the Toeplitz form for both at 12 of the 16 such point-runs
#   (bench_amd_epyc_tuned.md and its rerun). 2-7 filters past the taps (the Toeplitz rule's
#   range from batch 2 on) and one filter on 8 or more channels follow by extrapolation;
#   `jaxbp.tune_formulation` also times the conv's side at batch 1 on the CPU.
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
# * The taps' channels contracted first (`jaxbp.conv_forms.conv_forward_tap_products`), measured
#   after the rules above (experiments/results/bench_tap_products.md: the update step, one filter,
#   32x32xC inputs, C = 2, 3, 5, 7, batch 32, 256, 1024, 3x3 and 5x5, 5 interleaved repeats): from
#   3 channels on it was faster than the per-channel loop at all 18 points, by 1.00-1.74x (batch
#   1024, 32x32x3, 5x5: 13.1 against 17.8 ms), and compiled faster at 17 (batch 32, 32x32x3, 5x5:
#   0.28 against 0.37 s; 2% slower at the 18th); with 2 channels it was 0.78-1.08x the per-channel
#   loop's speed, slower by more than 5% at 2 of 6 points (batch 1024, 3x3: 10.0 against 7.8 ms)
#   and faster by more than 5% at 1. A first run of the same command (committed in c7e4372,
#   replaced in 21af73a) had the same sides at C >= 3 (1.05-1.64x) and C = 2 slower at 4 of 6
#   points: hence `jaxbp.conv_forms.TAPS_CONTRACT_CHANNELS_FROM` = 3. With one channel there is
#   nothing to contract. On another AMD EPYC (a 16 MB L3; the run above had 32 MB) the same
#   command (bench_tap_products_amd_epyc_16mb.md) had the products faster at 13 of 24 points
#   only: slower at all three 3x3 points on 3 channels (0.68-0.79x the per-channel loop's
#   speed), where U's (N H W, 3) x (3, 9) matmul took most of the step. The rule is left as
#   measured on its CPU; `Formulation.contract_channels` sets the side per formulation, and
#   `jaxbp.tune_formulation` times the other side too.
#   The per-example paths keep the per-channel loop (they write U for every example,
#   `jaxbp.batched.per_example_grads_taps`, `jaxbp.batched.value_and_grads_example`). U holds kh
#   kw K numbers per input pixel where the loop reads C; the chunk is still sized by the working
#   set of the per-channel loop (`working_set_chunk`), not retuned. The unchunked rule
#   (TAPS_UNCHUNKED_MAX_TERMS) counts kh*kw*C terms as measured with the per-channel loop, so it
#   is unchanged: in the grid only 3x3 filters on one channel run unchunked.
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
# * The taps and the conv in the batch-minor layout (`jaxbp.batch_minor`), measured on an AMD
#   EPYC with a 16 MB L3 only (experiments/results/bench_tap_products_batch_minor.md: the update
#   step, one filter, 32x32xC, C = 2, 3, 5, 7, batch 32, 256 and 1024, 3x3 and 5x5, the rule's
#   chunk and parts, 5 interleaved repeats, beside the channels contracted first and the
#   per-channel loop). In chunks (batch 256 and 1024) it was faster than the faster of the other
#   two at 11 of 12 points (1.00-1.22x; batch 1024, 32x32x3, 3x3: 15.1 against 18.1 and 24.4 ms)
#   and 0.96x at the twelfth (batch 256, 32x32x2, 3x3: 2.97 against 2.86), and faster than the
#   rule's side at all 12. Whole, at batch 32, it was 0.76-1.09x the faster's speed, slower at 4
#   of 8. With one channel, in chunks, the tuned grid (bench_amd_epyc_16mb_tune_one_filter.md)
#   kept the channels-last layout at all 4 chunked 28x28x1 points, and standalone timings (not
#   committed) had it at 0.95-1.02x there. Hence the batch-minor layout for the taps in chunks
#   from BATCH_MINOR_FROM_CHANNELS = 2 channels on. Not measured on the Xeon or the 32 MB AMD
#   EPYC the other rules come from; `jaxbp.tune_formulation` times both layouts.
# * dE/dH1 = delta2 W^T as n_out broadcast products instead of a matmul (`w_delta2_as_terms`,
#   `Formulation.w_delta2_terms`), measured first on the AMD EPYC with a 16 MB L3, a Zen 2 with
#   AVX2 and no AVX-512 (experiments/results/bench_w_delta2.md: the update step at the rule's
#   formulation both ways, the grid's points from batch 32 on with 1, 8 and 32 filters, 7
#   interleaved repeats; the 4 batch-minor points have their own W delta2 and were skipped; git
#   b3b4ffc). Where dE/df is XLA's conv after the patches or Toeplitz forward (32 filters) the
#   products were faster at all 12 points, 0.84-0.94x the matmul's time (batch 256, 32x32x3,
#   3x3: 27.0 against 30.3 ms; batch 32, 32x32x3, 5x5: 5.41 against 6.43), compiling in
#   0.99-1.10x its time (the same kernels). There delta1 is read by the copies that lay each
#   part out for its conv, and the sums fused into those copies replace writing the (m, D)
#   product and reading it back (a jax.profiler trace at batch 32, 32x32x3, 5x5, 32 filters, not
#   committed: the four copies 0.20 ms each against 0.31-0.36, and the matmul's 0.14 ms gone).
#   Elsewhere it is a trade or a loss: after the Toeplitz dE/df 0.92-1.01x the run time (faster
#   at 5 of 6) for 1.05-1.13x the compile time; after the patches dE/df 1.12-1.37x the run time
#   at all 6 (delta1 is then read in its (m, D) order by one kernel, which sums the products
#   without vectorizing over n_out); after the taps 1.07-1.44x at all 8. A first run of the same
#   points (git 6d928ab, replaced) had 0.87-0.93x, 0.90-0.99x, 1.10-1.37x and 1.00-1.39x. So the
#   products for the conv dE/df after a matmul forward only.
#   On the Zen 4 AMD EPYC (AVX-512, 1 MB L2, 32 MB L3) the same script found the opposite
#   (`python experiments/bench_w_delta2.py --name bench_w_delta2_zen4`, git 5afc03e, 2.5
#   minutes, bench_w_delta2_zen4.md): the products slower at all 32 points, 1.11-1.36x the
#   matmul's time at the 12 where the rule had picked them (batch 256, 32x32x3, 5x5, 32 filters:
#   24.6 against 21.6 ms; batch 256, 28x28x1, 3x3, 32 filters: 10.3 against 7.59), compiling in
#   0.97-1.13x its time; in the formulation grid before it (bench_amd_epyc_zen4_formulations.md,
#   3 repeats) the matmul was faster at 11 of those 12. Why the two CPUs differ was not traced.
#   Of what the results files record, the Zen 4 has AVX-512 (avx512f) and twice the L2 and L3;
#   the rule keys on the first, W_DELTA2_DOT_WITH_SIMD: the products on a CPU without it, the
#   matmul on one with it. That is two CPUs, one of each; on others (the Xeon and the 32 MB AMD
#   EPYC of the other rules were not measured; a CPU whose flags Linux does not list, or another
#   architecture, counts as without) `jaxbp.tune_formulation` times both sides
#   (`jaxbp.tune.w_delta2_alternatives`). Measured with 10 outputs only, where each element of
#   dE/dH1 sums 10 products: past W_DELTA2_TERMS_MAX_OUT = 10 the matmul (unmeasured either
#   way). Not used for one example (the vmapped per-example path and a batch of one, unmeasured)
#   nor off the CPU (an accelerator's matmul writes (m, D) at its own speed; unmeasured).
# On a GPU (one NVIDIA H200, jax 0.11.2, full float32; experiments/results/
# bench_formulations_gpu.md, batch 256, 28x28x1, 5x5, the only shape compared there) the step
# is a few kernel launches long (the manual step 0.07-0.12 ms in the quick grid). The patches
# for both were the fastest pair at 32 filters (0.109 ms) in both runs; at 1 and 8 filters the
# fastest pair changed between the runs: patches/Toeplitz and taps/patches (10% faster, the
# quartiles overlapping the patches') in the latest (tree f5b1ac9); the patches themselves at 1
# and taps/Toeplitz at 8 (7% faster, the quartiles apart) in the one before (tree cd706e5, in
# git at 2e2ee61). XLA's cuDNN conv for both took 1.43-2.04x the patches' time in the two runs,
# and chunks of 8-128 examples 1.39-10.9x the whole batch's. In the quick grid the patches
# made the manual step 1.63-2.51x faster than jax.grad at all 6 points (bench_quick_gpu.md;
# 1.48-2.14x in the run before).
# So on a GPU the patches for both, the whole batch at once while its temporaries stay under
# GPU_WORKING_SET_BYTES. P holds N Ho Wo kh kw C numbers: 240 MB at batch 1024 of 32x32x3
# with 5x5 filters. A larger batch runs in chunks of about that size, so that P does not
# outgrow the device's memory. That was not timed: kernels that large are far past launch
# overhead. Other accelerators (TPU) are not measured and keep XLA's conv for both.
W_DELTA2_TERMS_FORWARDS = ("patches", "toeplitz")
W_DELTA2_TERMS_FILTER_GRADS = ("conv",)
W_DELTA2_TERMS_MAX_OUT = 10
W_DELTA2_DOT_WITH_SIMD = "avx512f"
TAPS_BELOW_CHANNELS_X_FILTERS = 8
TAPS_MAX_FILTERS = 1
TOEPLITZ_BELOW_FILTERS = 8
TAPS_UNCHUNKED_MAX_TERMS = 9
TAPS_ONE_EXAMPLE_TOEPLITZ_FROM_CHANNELS = 2
TAPS_UNCHUNKED_WORKING_SET_BYTES = 48 * 2**20
CHUNK_WORKING_SET_BYTES = 16 * 2**20
MAX_CHUNK = 128
GPU_WORKING_SET_BYTES = 2**30
TOEPLITZ_MAX_MULTIPLY_RATIO = Fraction(8, 5)
CONV_FILTER_GRAD_FROM_FILTERS = 32
CONV_FILTER_GRAD_PARTS = 4
BATCH_MINOR_FROM_CHANNELS = 2


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
        batch_minor = chunk is not None and c >= BATCH_MINOR_FROM_CHANNELS
        return Formulation("taps", "conv", chunk, parts, batch_minor=batch_minor)
    if batch == 1:
        return Formulation("patches", "patches", None)
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


def check_formulation(formulation) -> Formulation:
    """Raise unless `formulation` is a Formulation of known forms, a positive int chunk (or None),
    a positive int conv_parts (which only the conv dE/df uses), contract_channels None, True
    or False (which only the taps forward uses), batch_minor a bool, True only for the taps
    forward with the conv dE/df and the per-channel loop, and w_delta2_terms None, True or
    False, not True in the batch-minor layout (whose W delta2 is its own batched matmul)."""
    if not isinstance(formulation, Formulation):
        raise TypeError(f"formulation must be a jaxbp.Formulation, got {formulation!r}")
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
    contract = formulation.contract_channels
    if not (contract is None or isinstance(contract, bool)):
        raise ValueError(f"formulation.contract_channels must be None, True or False, got {contract!r}")
    if not isinstance(formulation.batch_minor, bool):
        raise ValueError(f"formulation.batch_minor must be True or False, got {formulation.batch_minor!r}")
    if formulation.batch_minor and (formulation[:2] != ("taps", "conv") or contract):
        raise ValueError(
            "formulation.batch_minor needs forward 'taps', filter_grad 'conv' and contract_channels "
            f"None or False, got {formulation!r}"
        )
    terms = formulation.w_delta2_terms
    if not (terms is None or isinstance(terms, bool)):
        raise ValueError(f"formulation.w_delta2_terms must be None, True or False, got {terms!r}")
    if terms and formulation.batch_minor:
        raise ValueError(
            "formulation.w_delta2_terms cannot be True with batch_minor (the batch-minor layout "
            f"computes W delta2 as its own batched matmul), got {formulation!r}"
        )
    return formulation


def w_delta2_as_terms(
    formulation: Formulation,
    batch: int,
    n_out: int,
    backend: str | None = None,
    simd: frozenset[str] | None = None,
) -> bool:
    """Whether the batch gradient of `batch` examples with `n_out` outputs computes dE/dH1 =
    delta2 W^T as n_out broadcast products (`jaxbp.batched.slide_terms`):
    `formulation.w_delta2_terms` where set, else True for dE/df as XLA's conv after the patches
    or Toeplitz forward (W_DELTA2_TERMS_FORWARDS, W_DELTA2_TERMS_FILTER_GRADS) on a CPU without
    AVX-512 (W_DELTA2_DOT_WITH_SIMD not among `simd`, the CPU's SIMD extensions; None: this
    machine's, `jaxbp.machine.simd_flags`), with 2 or more examples and at most
    W_DELTA2_TERMS_MAX_OUT outputs (measured below at 10; each element of dE/dH1 sums n_out
    products), False otherwise."""
    if formulation.w_delta2_terms is not None:
        return formulation.w_delta2_terms
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return False
    simd = machine.simd_flags() if simd is None else simd
    return (
        W_DELTA2_DOT_WITH_SIMD not in simd
        and batch > 1
        and n_out <= W_DELTA2_TERMS_MAX_OUT
        and not formulation.batch_minor
        and formulation.forward in W_DELTA2_TERMS_FORWARDS
        and formulation.filter_grad in W_DELTA2_TERMS_FILTER_GRADS
    )


def per_example_formulation(spec: ConvNetSpec, batch: int, itemsize: int = 4) -> Formulation:
    """The formulation for a vmapped batch of one, whole: `choose_formulation`'s forward form, and
    for dE/df the same form, except after the taps the Toeplitz form. `jaxbp.batched.per_example_grads`
    vmaps it except after the taps, where it computes the batch's terms at once
    (`jaxbp.conv_forms.filter_grad_rows`); the history below is of the vmapped taps forward, for
    `jaxbp.batched.value_and_grads_example`. On the CPU never XLA's conv for dE/df: vmapped over
    examples, that conv is a grouped conv with one group per example, which XLA's CPU runs
    slowly. Off the CPU the conv (cuDNN's grouped convolutions), unmeasured.

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
