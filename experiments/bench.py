"""Benchmark the jitted update step: hand-written gradients vs jax.grad vs PyTorch vs NumPy.

For each point of a grid (batch, filters, input shape, kernel; float32 unless --dtype float64),
with the slides' network (VALID conv, sigmoid, dense to 10 outputs, sigmoid, half squared error)
it times, interleaved round by round with warm-up excluded:

  manual           make_update_step(grads="manual"): jaxbp.batched, the mean as a contraction over N in chunks
  autodiff         make_update_step(grads="autodiff"): jax.grad of the batch-mean loss (the best
                   jax.grad baseline found: XLA differentiates the batched conv directly)
  manual_vmap      the step with vmap of the per-example manual backward, then a mean (the core's
                   original path)
  autodiff_vmap    the step with vmap of per-example jax.grad, then a mean
  per_ex_manual    per-example gradients, jaxbp.per_example_manual_grads (with one filter the whole
                   batch's terms at once, else vmap of the manual backward of one example)
  per_ex_autodiff  per-example gradients, vmap of jax.grad of the per-example loss
  per_ex_dW_write  writing an array the size of the per-example dE/dW (N x D x n_out) and nothing
                   else: a floor under any per-example gradient
  per_ex_no_df     the per-example gradients without dE/df: the forward (in the per-example
                   path's forward form) and the per-example dE/dW and dE/db, a tighter floor
  per_ex_manual_reused, per_ex_autodiff_reused, per_ex_dW_write_reused
                   the same three written into the memory of the call before (each call given
                   the last one's result, donated): jaxbp.make_per_example_grads, manual and
                   jax.grad (both in its chunks past a working set), and the dE/dW write
  batch_forward    the forward and the deltas of the batch, in the batch step's forward form
                   and chunks, and nothing contracted: with per_ex_dW_write_reused, the floor
                   `floor/b` under per-example gradients
  batch_grad       the batch gradient alone (jaxbp.manual_value_and_grads), the reference for
                   per_ex_manual
  torch            PyTorch autograd of the same network (NCHW) plus the SGD update, in a process
                   of its own, on the CPU (on CUDA where JAX runs on a GPU: --torch-device)
  numpy            NumPy im2col implementation of the same formulas plus the update, in a process
                   of its own
  matmul           a float32 matmul (1024^3 on the CPU, 8192^3 on an accelerator: --matmul-n),
                   the machine's ceiling for GFLOP/s

With --variants, also steps that were measured and not adopted:

  manual_<option>    the manual step compiled with other XLA CPU options (VARIANT_OPTIONS):
  autodiff_<option>  the jax.grad step compiled the same way, a baseline that gets them too
                     xla_defaults  XLA's own defaults instead of jaxbp.compiler_options() (in
                                   jaxlib 0.10, YNNPACK's convolutions)
                     st_eigen      xla_cpu_multi_thread_eigen=False, meant to make Eigen's dots
                                   and convs single-threaded (jaxlib 0.10.2 does not act on it:
                                   bench_filter_grad.py's matmul_st)
                     ynn_dots      the dots (not the convs) in XLA's YNNPACK library
                     no_emitters   XLA's older loop emitters instead of its fusion emitters
                     llvm_o1       LLVM's optimization level 1 instead of 2 for XLA's own kernels
                                   (the dots and convs are Eigen's either way): compiles faster
                     (experimental options; one that this jaxlib does not know is reported and
                     skipped)
                   on a GPU instead (GPU_VARIANT_OPTIONS):
                     no_autotune   xla_gpu_autotune_level=0: XLA's GPU compiler takes its
                                   default kernels for matmuls and convs instead of timing
                                   candidates on the device (is that the compile time?)
  manual_unrolled    the manual step with its chunks as a Python loop instead of lax.fori_loop: no
                     loop, one copy of the chunk's program per chunk

With --tune, also the step a user gets from timing the formulations on this machine:

  manual_tuned       make_update_step(formulation=jaxbp.tune_formulation(spec, batch).best),
                     where the tuning picked another formulation than choose_formulation's rule
                     (where it picked the rule's, the manual step is that step); the tuning's
                     own times and seconds are recorded, and its pick is timed again here,
                     interleaved with the rest, so that its time is not the tuning's best sample

On an accelerator, each sample dispatches its calls and waits for the last (JAX and PyTorch
alike: they run in order on the device), and float32 convs and matmuls run at each library's
default precision unless --precision names one for both (JAX's default on a recent NVIDIA GPU
is TF32; PyTorch's is full float32 for matmuls and TF32 for cuDNN's convs). On the CPU both are
exact float32, and each call is waited for.

Each peer is first checked to compute the same gradients as jaxbp's manual ones in float64
(relative error < 1e-10 per leaf, on the point's shapes with a batch of 4) and is not timed if not.
Reports medians and the interquartile spread, compile time and XLA's memory estimate per JAX
method, achieved GFLOP/s (model FLOPs: the two convs and three dense products) and its ratio to
the matmul, the machine and library versions. Writes experiments/results/<name>.json and .md.

    python experiments/bench.py --quick       # headline points, a couple of minutes
    python experiments/bench.py               # the whole grid (11-17 minutes on 2 cores)
    python experiments/bench.py --quick --precision float32 --name bench_quick_gpu   # on a GPU
    python experiments/bench.py --cores 1 --name bench_one_core   # JAX and the peers on one core
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import multiprocessing as mp
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

PEERS = ("torch", "numpy", "torch_compile")
DEFAULT_PEERS = ("torch", "numpy")  # torch_compile compiles for tens of seconds a point: on request
JAX_PRECISION = {"float32": "float32", "tf32": "tensorfloat32"}  # --precision: jax_default_matmul_precision
HEADLINE = dict(batch=256, filters=8, input=(28, 28, 1), kernel=5)
GRID = dict(batch=(1, 32, 256, 1024), filters=(1, 8, 32), input=((28, 28, 1), (32, 32, 3)), kernel=(3, 5))
QUICK = dict(batch=(32, 256), filters=(1, 8, 32), input=((28, 28, 1),), kernel=(5,))
N_OUT = 10
# The per-example methods and the floor's forward (none at batch 1), and those that write into
# the last call's memory with the fresh method each is compared with.
PER_EXAMPLE_METHODS = ("per_ex_manual", "per_ex_autodiff", "per_ex_dW_write", "per_ex_no_df", "batch_forward")
REUSED_METHODS = {
    "per_ex_manual_reused": "per_ex_manual",
    "per_ex_autodiff_reused": "per_ex_autodiff",
    "per_ex_dW_write_reused": "per_ex_dW_write",
}
LEARNING_RATE = 0.1
FORMULATION_CHUNKS = (8, 32, 128)  # chunks timed beside the chosen one with --formulations
FORMULATION_CONV_PARTS = (1, 2, 8)  # and, where the pick's dE/df is XLA's conv, its conv_parts


SETTLE_S = 0.25  # pause when the timed process changes (see run_point)
PEER_RTOL = 1e-10  # float64 check of each peer against jaxbp (the design's float64 tolerance)
# float32 check of each --variants step's update (new params - params) against the manual step's:
# sums in another order, and the update read back through float32 params; measured at most
# 2.1e-5 (batch 256 and 1024, 32x32x3, 5x5, one and 32 filters), so 50x that.
VARIANT_RTOL = 1e-3
# --variants: XLA CPU options each step is also compiled with, added to jaxbp.compiler_options()
# (jax.jit's compiler_options); an empty dict compiles with XLA's own defaults instead.
VARIANT_OPTIONS = {
    "xla_defaults": {},
    "st_eigen": {"xla_cpu_multi_thread_eigen": False},
    "ynn_dots": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
    "no_emitters": {"xla_cpu_use_fusion_emitters": False},
    "llvm_o1": {"xla_backend_optimization_level": 1},
}
# --variants where JAX runs on a GPU: the XLA CPU options above do not apply there. On the H200
# the manual step compiled in 1.09-2.53x jax.grad's time with about as many kernels, growing
# with the batch (experiments/PERFORMANCE.md, "On a GPU"); this asks whether the autotuning
# does that, and what its kernels are worth at run time.
GPU_VARIANT_OPTIONS = {"no_autotune": {"xla_gpu_autotune_level": 0}}


def variant_options(backend: str) -> dict:
    """The --variants' XLA options on `backend`: GPU_VARIANT_OPTIONS on a GPU, else VARIANT_OPTIONS."""
    return GPU_VARIANT_OPTIONS if backend == "gpu" else VARIANT_OPTIONS


# ----------------------------------------------------------------------------------------------
# The network's FLOPs
# ----------------------------------------------------------------------------------------------


def step_inputs(spec, batch: int):
    """A point's update-step inputs as the small scripts make them: params from key 0, SGD at
    `LEARNING_RATE`, x ~ N(0, 1) and y ~ U(0, 1) from NumPy's seed 0, float32. Returns (the
    optimizer, (params, its state, x, y))."""
    import jax

    import jaxbp

    rng = np.random.default_rng(0)
    params = jaxbp.init_params(jax.random.key(0), spec)
    opt = jaxbp.sgd(LEARNING_RATE)
    x = jax.numpy.asarray(rng.normal(size=(batch, *spec.in_shape)).astype(np.float32))
    y = jax.numpy.asarray(rng.uniform(size=(batch, spec.n_out)).astype(np.float32))
    return opt, (params, opt.init(params), x, y)


def step_flops(batch: int, in_shape, filters: int, kernel: int) -> int:
    """Multiply-adds x 2 of one step: forward conv and dE/df, dense forward, dE/dW and dE/dH1."""
    h, w, c = in_shape
    ho, wo = h - kernel + 1, w - kernel + 1
    conv = 2 * batch * ho * wo * kernel * kernel * c * filters
    dense = 2 * batch * ho * wo * filters * N_OUT
    return 2 * conv + 3 * dense


# ----------------------------------------------------------------------------------------------
# Peers: NumPy im2col and PyTorch, same formulas, run in a separate process
# ----------------------------------------------------------------------------------------------


def numpy_im2col(x: np.ndarray, kernel: int) -> np.ndarray:
    """(N, H, W, C) -> (N * Ho * Wo, kernel^2 * C) patches, VALID, stride 1, (a, b, c) order."""
    n, h, w, c = x.shape
    ho, wo = h - kernel + 1, w - kernel + 1
    taps = [x[:, a : a + ho, b : b + wo, :] for a in range(kernel) for b in range(kernel)]
    return np.stack(taps, axis=3).reshape(n * ho * wo, kernel * kernel * c)


def numpy_value_and_grads(f, W, b, x, y):
    """The slides' formulas on im2col patches: (E, (dE/df, dE/dW, dE/db)), batch means."""
    kernel, _, c, k = f.shape
    n = x.shape[0]
    P = numpy_im2col(x, kernel)
    # exp(-z) overflows to inf for very negative z (below about -88 in float32), and 1 / (1 + inf)
    # is 0, the sigmoid's limit there: the overflow is exact, so its warning is silenced.
    with np.errstate(over="ignore"):
        H1 = 1 / (1 + np.exp(-(P @ f.reshape(-1, k))))  # (N Ho Wo, K)
        H1_flat = H1.reshape(n, -1)
        O = 1 / (1 + np.exp(-(H1_flat @ W + b)))
    E = 0.5 * np.sum((O - y) ** 2) / n
    delta2 = (O - y) * O * (1 - O) / n
    delta1 = (delta2 @ W.T).reshape(H1.shape) * H1 * (1 - H1)
    return E, ((P.T @ delta1).reshape(f.shape), H1_flat.T @ delta2, delta2.sum(0))


class TorchNet:
    """The network in PyTorch (NCHW); W's rows permuted once so H1 flattens in (K, Ho, Wo) order.

    With `compile_mode` (a `torch.compile` mode) the loss is compiled, the forward and its
    backward by TorchInductor (AOTAutograd), and with "reduce-overhead" replayed as CUDA graphs
    on a GPU, meant to remove the launch overhead that bounds the eager step there (not yet run
    on one); in other modes the SGD update is compiled too. The update is one `_foreach_add_`
    over the three params (torch.optim.SGD's default path on CUDA; before, a multiply and a
    `sub_` per param).
    """

    def __init__(self, torch, f, W, b, x, y, device="cpu", compile_mode=None):
        self.torch = torch
        compiled = lambda fn: torch.compile(fn, mode=compile_mode, dynamic=False)  # noqa: E731
        self.loss = self.eager_loss if compile_mode is None else compiled(self.eager_loss)
        # Under CUDA graphs ("reduce-overhead") the update stays eager, one fused foreach
        # launch: compiled, it mutates its inputs, which CUDA graphs skip, and on the H200 the
        # first step then died with a segfault (PyTorch 2.11; experiments/results/
        # probe_torch_compile_gpu.log; this fix is untried there). Each step begins a new CUDA-graph
        # step, so that the replay may overwrite the last step's outputs (the grads, consumed).
        self.cudagraphs = compile_mode == "reduce-overhead"
        eager = compile_mode is None or self.cudagraphs
        self.update = self.eager_update if eager else compiled(self.eager_update)
        kernel, _, c, k = f.shape
        n, h, w, _ = x.shape
        self.ho, self.wo, self.k = h - kernel + 1, w - kernel + 1, k
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
        self.f = t(f.transpose(3, 2, 0, 1)).requires_grad_()
        self.W = t(W.reshape(self.ho, self.wo, k, -1).transpose(2, 0, 1, 3).reshape(W.shape)).requires_grad_()
        self.b = t(b).requires_grad_()
        self.x, self.y = t(x.transpose(0, 3, 1, 2)), t(y)

    def eager_loss(self, f, W, b, x, y):
        torch = self.torch
        H1 = torch.sigmoid(torch.nn.functional.conv2d(x, f))
        O = torch.sigmoid(H1.reshape(H1.shape[0], -1) @ W + b)
        return 0.5 * ((O - y) ** 2).sum() / x.shape[0]

    def eager_update(self, params, grads):
        with self.torch.no_grad():
            self.torch._foreach_add_(list(params), list(grads), alpha=-LEARNING_RATE)

    def value_and_grads(self):
        for p in (self.f, self.W, self.b):
            p.grad = None
        E = self.loss(self.f, self.W, self.b, self.x, self.y)
        E.backward()
        return E

    def step(self):
        if self.cudagraphs:
            self.torch.compiler.cudagraph_mark_step_begin()
        E = self.value_and_grads()
        params = (self.f, self.W, self.b)
        self.update(params, tuple(p.grad for p in params))
        return E

    def grads_in_jaxbp_layout(self):
        f, W, b = (p.grad.cpu().numpy() for p in (self.f, self.W, self.b))
        W = W.reshape(self.k, self.ho, self.wo, -1).transpose(1, 2, 0, 3).reshape(-1, N_OUT)
        return f.transpose(2, 3, 1, 0), W, b


TORCH_TF32 = {"float32": False, "tf32": True}  # --precision: PyTorch's allow_tf32 for matmuls and convs


def configure_torch(torch, device: str, precision: str) -> dict:
    """Set PyTorch's float32 precision for --precision (None leaves its defaults) and say what
    it runs with: version, threads, device, and where on CUDA, its GPU and TF32 settings."""
    info = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(), "torch_device": device}
    if device == "cuda":
        if precision is not None:
            torch.backends.cuda.matmul.allow_tf32 = TORCH_TF32[precision]
            torch.backends.cudnn.allow_tf32 = TORCH_TF32[precision]
        info["torch_gpu"] = torch.cuda.get_device_name(0)
        info["torch_matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        info["torch_cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    return info


def peer_worker(conn, peer: str) -> None:
    """Serve one peer ("torch", "torch_compile" or "numpy") over a pipe: versions / check / setup /
    time / stop. torch_compile is PyTorch with the loss under `torch.compile` ("reduce-overhead",
    CUDA graphs, on a GPU, the update eager; the default mode on the CPU, the update compiled too).

    Each peer has a process of its own: PyTorch's OpenMP threads and NumPy's BLAS threads spin
    after each call, and in one process on 2 cores they slowed each other down 16x (measured:
    NumPy's 256-batch, 32-filter step took 2.7 s beside torch, 0.17 s alone).
    """
    torch = None
    if peer in ("torch", "torch_compile"):
        try:
            import torch
        except ImportError:
            pass
    state, device = None, "cpu"

    def compile_mode():  # None: eager
        if peer != "torch_compile":
            return None
        return "reduce-overhead" if device == "cuda" else "default"

    while True:
        msg, arg = conn.recv()
        if msg == "stop":
            conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            return
        if msg == "versions":  # arg: (torch's device, --precision)
            device, precision = arg
            info = {"numpy_peer_numpy": np.__version__} if peer == "numpy" else {}
            if torch is not None and device == "cuda" and not torch.cuda.is_available():
                info, torch = {"torch": torch.__version__, "torch_error": "CUDA not available"}, None
            elif torch is not None:
                info = configure_torch(torch, device, precision)
                if peer == "torch_compile":
                    info["torch_compile_mode"] = compile_mode()
                    # One compiled graph per shape and dtype (each point, and its float64 check),
                    # never a dynamic-shape one; past Dynamo's recompile limits it would run the
                    # function eagerly without a word, so the limits are raised and hitting one
                    # is an error.
                    config = torch._dynamo.config
                    for limit in ("cache_size_limit", "recompile_limit", "accumulated_recompile_limit"):
                        if hasattr(config, limit):
                            setattr(config, limit, 1 << 16)
                    if hasattr(config, "fail_on_recompile_limit_hit"):
                        config.fail_on_recompile_limit_hit = True
            conn.send((peer == "numpy" or torch is not None, info))
        elif msg == "check":  # float64 gradients, to compare with jaxbp
            f, W, b, x, y = arg
            if peer == "numpy":
                conn.send(numpy_value_and_grads(f, W, b, x, y)[1])
            elif peer == "torch":
                net = TorchNet(torch, f, W, b, x, y, device)
                net.value_and_grads()
                conn.send(net.grads_in_jaxbp_layout())
            else:
                # torch.compile can fail where eager PyTorch runs (no C compiler, a backend bug):
                # then this peer is reported and not timed. Three calls, so that the checked
                # gradients come from a replay (CUDA graphs are recorded on a later call).
                try:
                    net = TorchNet(torch, f, W, b, x, y, device, compile_mode())
                    for _ in range(3):
                        net.value_and_grads()
                    conn.send(net.grads_in_jaxbp_layout())
                except Exception as err:
                    traceback.print_exc()
                    conn.send(repr(err))
        elif msg == "setup":  # replies whether the peer can be timed
            f, W, b, x, y = arg
            if peer == "torch":
                state = TorchNet(torch, f, W, b, x, y, device).step
            elif peer == "torch_compile":  # the timed graphs compile here, not in a sample
                try:
                    state = TorchNet(torch, f, W, b, x, y, device, compile_mode()).step
                    for _ in range(3):  # CUDA graphs are recorded on a later call than the first
                        state()
                except Exception as err:
                    traceback.print_exc()
                    conn.send(repr(err))
                    continue
            else:

                def state(f=f, W=W, b=b, x=x, y=y):  # arrays from the pipe are our own
                    _, (gf, gW, gb) = numpy_value_and_grads(f, W, b, x, y)
                    f -= LEARNING_RATE * gf
                    W -= LEARNING_RATE * gW
                    b -= LEARNING_RATE * gb

            conn.send(True)
        elif msg == "time":
            start = time.perf_counter()
            for _ in range(arg):
                state()
            if torch is not None and device == "cuda":  # the steps were queued on the GPU
                torch.cuda.synchronize()
            conn.send((time.perf_counter() - start) / arg)


def start_peer(peer: str, target=None):
    """(our end of the pipe, the process) of a peer worker (`peer_worker` unless `target`), in a
    spawned process of its own. Our copy of the worker's end is closed at once, so that if the
    worker dies the pipe closes and `peer_ask` returns instead of waiting forever (as the first
    GPU run with the compiled peer did, experiments/results/probe_torch_compile_gpu.log)."""
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    worker = ctx.Process(target=target or peer_worker, args=(child, peer), daemon=True)
    worker.start()
    child.close()
    return conn, worker


PEER_DIED = "the peer's process died"


class PeerDiedError(RuntimeError):
    """A peer's process died while it was being timed (the message: `peer_ask`'s reply)."""


def peer_ask(conn, msg: str, arg):
    """Send a peer `msg` and return its reply; a str where the peer failed: its error's repr, or
    that its process died (a segfault in a compiled library leaves no Python traceback; the
    peer's stderr has what there is). A dead peer answers every later message the same way;
    `run_point` drops it at the first such answer."""
    try:
        conn.send((msg, arg))
        return conn.recv()
    except (EOFError, BrokenPipeError, ConnectionResetError) as err:
        return f"{PEER_DIED} ({type(err).__name__} on its pipe)"


# ----------------------------------------------------------------------------------------------
# JAX methods
# ----------------------------------------------------------------------------------------------


def jax_methods(
    jax, jaxbp, spec, chosen=None, batch=None, variants=False, forms=None, chunks=FORMULATION_CHUNKS
):
    """name -> jitted fn for one spec; every fn takes (params, opt_state, x, y).

    chosen: None, or the formulation `choose_formulation` picks for the point (of batch size
    `batch`); then every other formulation of the manual step is added too, a chunk of at least
    the batch counted once, as the whole batch.
    forms: the forms paired with --formulations (None: all of `jaxbp.conv_forms.FORMS`).
    chunks: the chunks the pick is also timed at with --formulations, besides the whole batch.
    variants: also the variants of the steps that were measured and not adopted (`variant_methods`).
    """
    import optax

    from jaxbp import batched
    from jaxbp import conv_forms
    from jaxbp import formulations
    from jaxbp.autodiff import value_and_autodiff_grads_example
    from jaxbp.backward import value_and_manual_grads_example

    opt = jaxbp.sgd(LEARNING_RATE)
    step = lambda grads: jaxbp.make_update_step(spec, opt, grads=grads)  # noqa: E731
    # Everything else compiles with the steps' options too (jaxbp.compiler_options()).
    jit = functools.partial(jax.jit, compiler_options=jaxbp.compiler_options())
    per_ex_autodiff = jaxbp.per_example.per_example_fn(spec, "autodiff")  # vmap of jax.grad
    methods = {
        "manual": step("manual"),
        "autodiff": step("autodiff"),
        "manual_vmap": step(value_and_manual_grads_example),
        "autodiff_vmap": step(value_and_autodiff_grads_example),
        "per_ex_manual": jit(lambda p, s, x, y: jaxbp.per_example_manual_grads(p, x, y, spec)),
        "per_ex_autodiff": jit(lambda p, s, x, y: per_ex_autodiff(p, x, y)),
        "per_ex_dW_write": jit(lambda p, s, x, y: per_example_dW_write(p, y)),
        "per_ex_no_df": jit(lambda p, s, x, y: per_example_without_filter_grad(p, x, y, spec)),
        "batch_grad": jit(lambda p, s, x, y: jaxbp.manual_value_and_grads(p, x, y, spec)),
        "batch_forward": jit(lambda p, s, x, y: batch_forward(p, x, y, spec)),
    }
    # The same three into the memory of the call before (their last argument, donated): the
    # per-example gradients as jaxbp.make_per_example_grads computes them (in chunks past a
    # working set), manual and jax.grad alike, and the dE/dW write.
    reused = lambda fn: jit(fn, donate_argnums=4, keep_unused=True)  # noqa: E731
    for grads in ("manual", "autodiff"):
        into = jaxbp.make_per_example_grads(spec, grads=grads).into
        methods[f"per_ex_{grads}_reused"] = reused(lambda p, s, x, y, out, into=into: into(p, x, y, out))
    methods["per_ex_dW_write_reused"] = reused(lambda p, s, x, y, out: per_example_dW_write(p, y))
    if chosen is not None:
        # Every pair of forms at the chunk the rule picks, and the rule's forms at other chunks.
        # XLA's conv for dE/df in the rule's parts wherever it appears (one on other backends).
        parts = formulations.conv_filter_grad_parts(batch)
        pairs = itertools.product(forms or conv_forms.FORMS, forms or conv_forms.FORMS)
        timed = [formulations.Formulation(f, g, chosen.chunk, parts) for f, g in pairs]  # parts: conv only
        timed.append(chosen)  # the pick itself, also where --forms leaves its pair out
        if forms is None or "conv" in forms:
            # XLA's conv for both, the whole batch, one part: jax.grad's own program in the
            # slides' form (the same generated kernels as jax.grad's step), so that the compile
            # table's search for a formulation within jax.grad's compile time has it.
            timed.append(formulations.Formulation("conv", "conv", None, 1))
        timed += [chosen._replace(chunk=c) for c in (None, *chunks) if c != chosen.chunk]
        if chosen.filter_grad == "conv" and batch > 1:
            timed += [chosen._replace(conv_parts=p) for p in FORMULATION_CONV_PARTS if p != chosen.conv_parts]
        timed += jaxbp.tune.taps_alternatives(chosen, batch, spec)  # the taps' layout and channels
        timed += jaxbp.tune.w_delta2_alternatives(chosen, batch, spec.n_out)  # W delta2 the other way
        # A chunk of the batch or more is the whole batch; the channels' default is None.
        for form in jaxbp.tune.distinct(timed, batch, spec.in_shape[2], n_out=spec.n_out):

            def vg(p, s, x, y, form=form):
                E, g = batched.value_and_grads(p, x, y, spec, formulation=form)
                updates, s = opt.update(g, s, p)
                return optax.apply_updates(p, updates), s, E

            methods[f"manual[{form.label()}]"] = jit(vg)
    if variants:
        methods.update(variant_methods(jax, jaxbp, spec, batch, opt))
    return methods


def per_example_dW_write(params, y):
    """An array the size of the per-example dE/dW, N x D x n_out (the product of a column of W and
    y), and nothing else: a floor under any per-example gradient, whatever its formulation."""
    return params.W[None, :, :1] * y[:, None, :]


def batch_forward(params, x, y, spec):
    """The forward and the deltas of every example, as the batch step computes them (its forward
    form, in its chunks), and nothing contracted over the examples: E, sum(delta1) and
    sum(delta2), the sums only so that nothing is dropped.

    Per-example gradients compute at least this (H1, O, delta2 = dE/dZ2 and delta1 = dE/dZ1 of
    every example; their dE/df is a contraction of delta1 with the input) and write N x D x n_out
    numbers of dE/dW. So this, then that write into the last call's memory
    (``per_ex_dW_write_reused``), estimates the least time they can take with jaxbp's forward
    forms (a floor for a path whose forward is no faster than the batch step's; it leaves out
    dE/df's arithmetic and the writes of dE/df and dE/db). Run at once rather than one after the
    other, the batch gradient and that write took 0.88-1.02x the time on the 2-core CPU jaxbp was
    measured on (experiments/results/probe_write_overlap.md), so the sum may be a few percent
    high where they could overlap.
    """
    import jax
    import jax.numpy as jnp

    from jaxbp import batched
    from jaxbp import formulations

    n = x.shape[0]
    form = formulations.choose_formulation(spec, n, itemsize=x.dtype.itemsize)
    chunk = n if form.chunk is None else min(form.chunk, n)

    def add(total, x, y):  # the chunks read as `jaxbp.batched.value_and_grads` reads them
        terms = formulations.w_delta2_as_terms(form, n, spec.n_out)
        _, O, delta2, delta1 = batched.slide_terms(params, x, y, spec, form.forward, n, w_delta2_terms=terms)
        part = jnp.stack([0.5 * jnp.sum((O - y) ** 2) / n, jnp.sum(delta1)]), jnp.sum(delta2, axis=0)
        return jax.tree.map(jnp.add, total, part)

    return batched.add_chunks(add, (jnp.zeros(2, x.dtype), jnp.zeros(y.shape[1], x.dtype)), x, y, chunk)


def per_example_without_filter_grad(params, x, y, spec):
    """Per-example (dE/dW, dE/db) of a batch, with the forward they need, and no dE/df: the part
    of `jaxbp.per_example_manual_grads` that is the same work as in the batch gradient (the
    forward, in the per-example path's forward form and batching) plus the per-example dE/dW
    write, N x D x n_out numbers. Per-example gradients cost at least this, so where it alone
    takes over 1.2x the batch gradient, that target is out of reach with this forward."""
    import jax
    import jax.numpy as jnp

    from jaxbp import batched
    from jaxbp import conv_forms
    from jaxbp import formulations

    form = formulations.per_example_formulation(spec, x.shape[0], itemsize=x.dtype.itemsize)
    if form.forward == "taps":  # the whole batch's terms at once; jit drops the unused dE/df
        grads = batched.per_example_grads_taps(params, x, y, spec)
        return grads.W, grads.b

    def example(xy):  # one example, as `jaxbp.batched.value_and_grads_example` runs it
        x, y = xy
        h1 = jax.nn.sigmoid(conv_forms.conv_forward(x[None], params.f, spec, form.forward).reshape(-1))
        o = jax.nn.sigmoid(jnp.dot(h1, params.W, precision=spec.precision) + params.b)
        delta2 = (o - y) * o * (1 - o)  # dE/dZ2; dE/db is delta2 itself
        return jnp.outer(h1, delta2), delta2  # dE/dW = H1 delta2^T

    return jax.vmap(example)((x, y))  # vmapped as per_example_grads vmaps other forwards


def variant_methods(jax, jaxbp, spec, batch, opt):
    """--variants: steps measured against the chosen ones and not adopted (the module doc)."""
    import optax

    from jaxbp import batched

    methods = {}
    for option, added in variant_options(jax.default_backend()).items():
        # Each option is added to the steps' own (jaxbp.compiler_options()); {} means XLA's defaults.
        options = {**jaxbp.compiler_options(), **added} if added else {}
        for grads in ("manual", "autodiff"):
            step = jaxbp.make_update_step(spec, opt, grads=grads, compiler_options=options)
            methods[f"{grads}_{option}"] = step

    def unrolled(p, s, x, y):
        form = jaxbp.choose_formulation(spec, batch, itemsize=x.dtype.itemsize)
        chunk = form.chunk or batch
        parts = [
            batched.chunk_sums(p, x[i : i + chunk], y[i : i + chunk], spec, form, batch)
            for i in range(0, batch, chunk)
        ]
        E, sums = jax.tree.map(lambda *a: sum(a), *parts)
        g = batched.untranspose(sums, spec) if batch > 1 else sums
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, E

    methods["manual_unrolled"] = jax.jit(unrolled, compiler_options=jaxbp.compiler_options())
    return methods


def variant_names(compiled) -> list[str]:
    """The --variants among `compiled`'s names, in VARIANT_OPTIONS' (then GPU_VARIANT_OPTIONS')
    order."""
    options = [*VARIANT_OPTIONS, *GPU_VARIANT_OPTIONS]
    names = [f"{g}_{o}" for o in options for g in ("manual", "autodiff")] + ["manual_unrolled"]
    return [n for n in names if n in compiled]


def check_variants(jax, compiled, jargs, progress, point) -> dict:
    """Each variant's update (manual or jax.grad) against the manual step's, relative error per
    leaf (the largest); a variant that disagrees is dropped from `compiled` and not timed."""
    params = jargs[0]

    def update(name):
        return [np.asarray(new) - np.asarray(old) for new, old in zip(compiled[name](*jargs)[0], params)]

    reference = update("manual")
    errors = {}
    for name in variant_names(compiled):
        errors[name] = max(rel_error(a, b) for a, b in zip(update(name), reference))
        if errors[name] > VARIANT_RTOL:
            progress.write(f"{name} disagrees with the manual step at {point}: {errors[name]:.2e}; not timed")
            del compiled[name]
    return errors


FUSION = re.compile(r"=\s+(\([^)]*\)|\S+)\s+fusion\(")  # `%name = <shape or (tuple of shapes)> fusion(`


def generated_kernels(hlo_text: str) -> int:
    """The fusions in an optimized HLO module's text, but for library calls wrapped as fusions
    (kind=kCustom, e.g. YNNPACK's): the kernels XLA generates code for. On the CPU, LLVM compiles
    each (copies and broadcasts among them, as wrapped_* fusions); dots and convolutions outside
    fusions are Eigen library calls, and loops run in the runtime, so they generate none."""
    return sum(1 for line in hlo_text.splitlines() if FUSION.search(line) and "kind=kCustom" not in line)


def compile_stats(fn, args) -> dict:
    """Compile time (s) of trace + lower + compile, and its three parts: JAX's tracing to a jaxpr
    (``trace_s``), JAX's lowering to StableHLO (``lower_s``) and XLA's compile (``xla_s``); the
    generated kernels, and XLA's memory analysis (bytes) of the executable."""
    start = time.perf_counter()
    traced = fn.trace(*args)
    traced_at = time.perf_counter()
    lowered = traced.lower()
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    end = time.perf_counter()
    out = {
        "compile_s": end - start,
        "trace_s": traced_at - start,
        "lower_s": lowered_at - traced_at,
        "xla_s": end - lowered_at,
    }
    try:
        out["kernels"] = generated_kernels(compiled.as_text())
    except Exception as err:  # not every backend gives the optimized module's text
        out["kernels_error"] = repr(err)
    try:
        mem = compiled.memory_analysis()
        out["temp_bytes"] = int(mem.temp_size_in_bytes)
        out["peak_bytes"] = int(
            mem.temp_size_in_bytes
            + mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            - mem.alias_size_in_bytes
        )
    except Exception as err:  # not every backend reports it
        out["memory_error"] = repr(err)
    return out, compiled


def rel_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1e-300, np.max(np.abs(b))))


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def machine_info(jax, peer_versions) -> dict:
    from jaxbp.machine import cpu_features
    from jaxbp.machine import cpuinfo
    from jaxbp.machine import usable_cores

    cpu = cpuinfo().get("model name", "unknown")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = None
    import jaxlib

    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        **cpu_features(),
        "cores": usable_cores(),  # the process's affinity mask (taskset, --cores)
        "machine_cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "git_commit": commit,
        **peer_versions,
    }


def cores_text(info: dict) -> str:
    """The cores a run used: "2 cores", or "1 of 2 cores (pinned)" where the process could run
    on fewer than the machine has. Results written before git cf604df recorded the machine's
    count as "cores" (and bench_filter_grad.py's the cores it used as "cores_used")."""
    machine = info.get("machine_cores")
    if machine is None and "cores_used" in info:  # bench_filter_grad.py before git cf604df
        machine, cores = info["cores"], info["cores_used"]
    else:
        cores = info["cores"]
    if machine is not None and machine != cores:
        return f"{cores} of {machine} cores (pinned)"
    return f"{cores} core" + ("s" if cores != 1 else "")


def machine_line(info: dict) -> str:
    """The results' machine line: CPU (with its caches, SIMD extensions and model where recorded:
    several CPUs share a name), cores, the load average at the end (``info["load_average"]``, set
    by the script when it is done), versions, commit and date."""
    return (
        f"Machine: {info['cpu']}{cpu_text(info)}, {cores_text(info)}; load average "
        f"{info['load_average']} at the end. jax {info['jax']}, jaxlib {info['jaxlib']}; "
        f"git {info['git_commit']}; {info['date_utc']}."
    )


def script_command(file: str, argv=None) -> str:
    """How an experiment script ran, as its results record it: ``python experiments/<name>.py``
    and `argv` (None: this process's arguments). `file` is the script's ``__file__``."""
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", f"experiments/{os.path.basename(file)}", *args])


def script_record(jax, file: str, argv=None) -> tuple[dict, str]:
    """What a small script's results record beside its numbers: `machine_info` with the load
    average at the end of the run, and `script_command`. `file` is the script's ``__file__``."""
    info = machine_info(jax, {})
    info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    return info, script_command(file, argv)


def write_results(
    out, name: str, info: dict, command: str, results: list, table: str, echo: bool = True
) -> None:
    """Write <out>/<name>.json (command, machine, results) and <out>/<name>.md (`table`), and print
    the table (unless not `echo`): the outputs of every benchmark script here."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "machine": info, "results": results}
    # Each file whole or not at all: a run cut short mid-write leaves the previous one.
    for path, text in (
        (out / f"{name}.json", json.dumps(payload, indent=1, default=str)),
        (out / f"{name}.md", table),
    ):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    if echo:
        print(table)


def calibrate(call, min_sample_s: float) -> int:
    """`jaxbp.tune.calibrate`: how many calls make one timed sample of at least `min_sample_s`,
    after a warm-up call (imported when called: the peers' processes import this module and
    not JAX)."""
    from jaxbp.tune import calibrate as calibrate_calls

    return calibrate_calls(call, min_sample_s)


def summarize(samples) -> dict:
    s = np.asarray(samples) * 1e3
    q1, med, q3 = np.percentile(s, [25, 50, 75])
    return {
        "median_ms": float(med),
        "q1_ms": float(q1),
        "q3_ms": float(q3),
        "min_ms": float(s.min()),
        "n": len(s),
    }


def run_point(point, args, jax, jaxbp, conns, matmul, progress) -> dict:
    batch, filters, in_shape, kernel = point["batch"], point["filters"], point["input"], point["kernel"]
    spec = jaxbp.ConvNetSpec(in_shape=in_shape, n_filters=filters, kernel_size=kernel, n_out=N_OUT)
    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(0)
    params = jaxbp.init_params(jax.random.key(0), spec, dtype)
    x = rng.normal(size=(batch, *in_shape)).astype(dtype)
    y = rng.uniform(size=(batch, N_OUT)).astype(dtype)
    opt_state = jaxbp.sgd(LEARNING_RATE).init(params)
    jargs = (params, opt_state, jax.numpy.asarray(x), jax.numpy.asarray(y))
    result = {
        "point": {**point, "input": list(in_shape)},
        "flops": step_flops(batch, in_shape, filters, kernel),
    }

    def peer_failed(name, reply, what):  # reported; a dead process is not asked again
        result.setdefault("peer_errors", {})[name] = reply
        progress.write(f"{name} {what} at {point}: {reply}; not timed")
        if reply.startswith(PEER_DIED):
            conns.pop(name, None)

    # Peers: check in float64 against jaxbp, then set up the timed problem.
    peers = []
    if conns:
        p64 = [np.asarray(a, np.float64) for a in params]
        x64, y64 = x[:4].astype(np.float64), y[:4].astype(np.float64)
        p64_jax = jaxbp.Params(*(jax.numpy.asarray(a) for a in p64))
        ref = jaxbp.manual_grads(p64_jax, jax.numpy.asarray(x64), jax.numpy.asarray(y64), spec)
        result["peer_check_rel_error"] = {}
        for name, conn in list(conns.items()):
            grads = peer_ask(conn, "check", (*p64, x64, y64))  # a str: the peer failed
            if isinstance(grads, str):
                result["peer_check_rel_error"][name] = None
                peer_failed(name, grads, "failed")
                continue
            err = max(rel_error(g, r) for g, r in zip(grads, ref))
            result["peer_check_rel_error"][name] = err
            if err < PEER_RTOL:
                ready = peer_ask(conn, "setup", (*(np.asarray(a) for a in params), x, y))
                if ready is True:
                    peers.append(name)
                else:
                    peer_failed(name, ready, "failed its first timed step")
            else:
                progress.write(f"{name} disagrees with jaxbp at {point} (rel error {err:.2e}); not timed")

    chosen = jaxbp.choose_formulation(spec, batch, itemsize=dtype.itemsize)
    methods = jax_methods(
        jax,
        jaxbp,
        spec,
        chosen if args.formulations else None,
        batch,
        args.variants,
        args.forms,
        tuple(args.chunks or FORMULATION_CHUNKS),
    )
    result["chosen_formulation"] = chosen.label()
    if args.tune:
        start = time.perf_counter()
        tuning = jaxbp.tune_formulation(
            spec, batch, dtype=dtype, repeats=args.repeats, min_sample_s=args.min_sample_s
        )
        result["tuning"] = {
            "best": tuning.best.label(),
            "rule": tuning.rule.label(),
            "seconds": time.perf_counter() - start,
            "times_ms": {f.label(): list(v) for f, v in tuning.times_ms.items()},
            "compile_s": {f.label(): v for f, v in tuning.compile_s.items()},
        }
        if tuning.best != chosen:
            opt = jaxbp.sgd(LEARNING_RATE)
            methods["manual_tuned"] = jaxbp.make_update_step(spec, opt, formulation=tuning.best)
    if batch == 1:
        for name in (*PER_EXAMPLE_METHODS, *REUSED_METHODS):
            methods.pop(name)  # per-example gradients of one example are the batch gradient
    if args.skip_vmap_steps:
        for name in ("manual_vmap", "autodiff_vmap"):
            methods.pop(name)
    compiled = {}
    result["compile"] = {}
    outs = {}  # the reused methods' first `out`: the fresh method's result, the same shapes
    for name, fn in methods.items():
        try:
            if name in REUSED_METHODS:
                outs[name] = compiled[REUSED_METHODS[name]](*jargs)
                result["compile"][name], compiled[name] = compile_stats(fn, (*jargs, outs[name]))
                continue
            result["compile"][name], compiled[name] = compile_stats(fn, jargs)
        except Exception as err:  # an XLA option this jaxlib does not know (experimental ones come and go)
            if not (args.variants and name in variant_names(methods) and name != "manual_unrolled"):
                raise
            result.setdefault("variant_errors", {})[name] = str(err).splitlines()[0]
            progress.write(f"{name} does not compile at {point}: {result['variant_errors'][name]}; not timed")
    if args.variants:
        result["variant_check_rel_error"] = check_variants(jax, compiled, jargs, progress, point)

    def peer_call(name):
        def call(inner):
            reply = peer_ask(conns[name], "time", inner)
            if isinstance(reply, str):
                raise PeerDiedError(reply)
            return reply

        return call

    def drop_peer(name, err):  # a peer that died while timed: reported, and timed no more
        peer_failed(name, str(err), "died while timed")
        for table in (calls, inner, samples):
            table.pop(name, None)

    if outs:  # how far the reused results are from the fresh ones (float32; the tests check float64)
        result["reused_rel_error"] = {}
        for name, out in outs.items():
            got = compiled[name](*jargs, out)  # consumes out: the result is the next call's
            ref = compiled[REUSED_METHODS[name]](*jargs)
            result["reused_rel_error"][name] = max(
                rel_error(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref))
            )
            outs[name] = got
    calls = {
        name: jaxbp.tune.timed_calls_into(c, jargs, outs[name])
        if name in outs
        else jaxbp.tune.timed_calls(c, jargs)
        for name, c in compiled.items()
    }
    calls.update({name: peer_call(name) for name in peers})
    calls["matmul"] = matmul
    # Warm-up (excluded), then the number of calls per sample.
    inner, samples = {}, {}
    for name, call in list(calls.items()):
        try:
            inner[name] = calibrate(call, args.min_sample_s)
            samples[name] = []
        except PeerDiedError as err:
            drop_peer(name, err)
    process = "jax"
    order = list(calls)
    for round_ in range(args.repeats):
        # Each round starts one method later: the first sample of a round followed the pause,
        # the matmul or another process, and in a fixed order the first method (always "manual")
        # read up to 2.7x slower at batch 1 than the same program timed later in the round.
        for name in order[round_ % len(order) :] + order[: round_ % len(order)]:
            if name not in calls:  # a peer dropped in an earlier round
                continue
            call = calls[name]
            # A process's worker threads may keep spinning on the cores for a while after its
            # call (OpenBLAS's default is about 2^28 cycles, 0.1 s); the pause keeps them out of
            # the next process's sample.
            if (name if name in peers else "jax") != process:
                time.sleep(SETTLE_S)
            process = name if name in peers else "jax"
            # Untimed calls of the same method first (`jaxbp.tune.interleaved_samples`): the
            # first call after a program that freed hundreds of MB (the per-example methods)
            # ran up to 2.2x slower, and at 1-2 calls a sample timed that.
            try:
                if args.warm_calls:
                    call(args.warm_calls)
                if name in peers:  # the peer times its own calls
                    samples[name].append(call(inner[name]))
                else:
                    start = time.perf_counter()
                    call(inner[name])
                    samples[name].append((time.perf_counter() - start) / inner[name])
            except PeerDiedError as err:  # only a peer's call raises it
                drop_peer(name, err)
    result["times"] = {name: summarize(s) for name, s in samples.items()}
    result["inner_calls"] = inner
    t = {name: v["median_ms"] for name, v in result["times"].items()}
    matmul_gflops = 2 * args.matmul_n**3 / (t["matmul"] * 1e-3) / 1e9
    manual_gflops = result["flops"] / (t["manual"] * 1e-3) / 1e9
    # jax.grad's step, default and (with --variants) compiled with each option: its fastest counts.
    autodiffs = [t[n] for n in ("autodiff", *variant_names(t)) if n.startswith("autodiff")]
    result["derived"] = {
        "matmul_gflops": matmul_gflops,
        "manual_gflops": manual_gflops,
        "manual_fraction_of_matmul": manual_gflops / matmul_gflops,
        "autodiff_over_manual": t["autodiff"] / t["manual"],
        **({"best_autodiff_over_manual": min(autodiffs) / t["manual"]} if len(autodiffs) > 1 else {}),
        **({"torch_over_manual": t["torch"] / t["manual"]} if "torch" in t else {}),
        **({"numpy_over_manual": t["numpy"] / t["manual"]} if "numpy" in t else {}),
        **({"torch_compile_over_manual": t["torch_compile"] / t["manual"]} if "torch_compile" in t else {}),
        **(
            {
                "per_ex_manual_over_batch_grad": t["per_ex_manual"] / t["batch_grad"],
                "per_ex_dW_write_over_batch_grad": t["per_ex_dW_write"] / t["batch_grad"],
                "per_ex_no_df_over_batch_grad": t["per_ex_no_df"] / t["batch_grad"],
                "per_ex_manual_reused_over_batch_grad": t["per_ex_manual_reused"] / t["batch_grad"],
                "per_ex_dW_write_reused_over_batch_grad": t["per_ex_dW_write_reused"] / t["batch_grad"],
                "per_ex_floor_over_batch_grad": (t["batch_forward"] + t["per_ex_dW_write_reused"])
                / t["batch_grad"],
                "per_ex_autodiff_reused_over_manual_reused": t["per_ex_autodiff_reused"]
                / t["per_ex_manual_reused"],
            }
            if "per_ex_manual" in t
            else {}
        ),
        "compile_manual_over_autodiff": result["compile"]["manual"]["compile_s"]
        / result["compile"]["autodiff"]["compile_s"],
    }
    if "tuning" in result:  # the tuned step is the manual step where the tuning kept the rule's pick
        tuned = t.get("manual_tuned", t["manual"])
        result["derived"].update(
            {
                **({"manual_over_tuned": t["manual"] / tuned} if "manual_tuned" in t else {}),
                "autodiff_over_tuned": t["autodiff"] / tuned,
                **({"torch_over_tuned": t["torch"] / tuned} if "torch" in t else {}),
            }
        )
    return result


def targets_summary(results) -> list[str]:
    """The issue's targets, counted over the points of this run (markdown lines)."""
    d = [r["derived"] for r in results]

    def count(key, ok):
        vals = [x[key] for x in d if key in x]
        if not vals:
            return "not measured"
        return (
            f"{sum(ok(v) for v in vals)} of {len(vals)} points (median {np.median(vals):.2f}, "
            f"range {min(vals):.2f}-{max(vals):.2f})"
        )

    if not results:
        return ["", "No grid points ran."]
    largest = max(results, key=lambda r: r["flops"])
    lp, ld = largest["point"], largest["derived"]
    headline = [r for r in results if {**r["point"], "input": tuple(r["point"]["input"])} == HEADLINE]
    lines = ["", "Against the issue's targets (counted by the script over this run's points):", ""]
    if headline:
        ratio = headline[0]["derived"]["autodiff_over_manual"]
        lines.append(f"- headline manual vs jax.grad: {ratio:.2f}x (target 1.5)")
    checks = (
        ("manual at least as fast as jax.grad", "autodiff_over_manual", lambda v: v >= 1),
        (
            "manual at least as fast as jax.grad at its fastest (default or a --variants option)",
            "best_autodiff_over_manual",
            lambda v: v >= 1,
        ),
        ("manual faster than PyTorch", "torch_over_manual", lambda v: v > 1),
        (
            "per-example within 1.2x of the batch gradient",
            "per_ex_manual_over_batch_grad",
            lambda v: v <= 1.2,
        ),
        (
            "per-example within 1.2x of the batch gradient, into the last call's memory",
            "per_ex_manual_reused_over_batch_grad",
            lambda v: v <= 1.2,
        ),
        (
            "per-example manual (into the last call's memory) at least as fast as jax.grad's",
            "per_ex_autodiff_reused_over_manual_reused",
            lambda v: v >= 1,
        ),
        (
            "writing the per-example dE/dW alone within 1.2x",
            "per_ex_dW_write_over_batch_grad",
            lambda v: v <= 1.2,
        ),
        (
            "writing the per-example dE/dW alone within 1.2x, into the last call's memory",
            "per_ex_dW_write_reused_over_batch_grad",
            lambda v: v <= 1.2,
        ),
        (
            "the per-example forward and dE/dW, dE/db alone (no dE/df) within 1.2x",
            "per_ex_no_df_over_batch_grad",
            lambda v: v <= 1.2,
        ),
        (
            "the floor (the batch's forward and deltas, plus the dE/dW write into the last call's "
            "memory) within 1.2x",
            "per_ex_floor_over_batch_grad",
            lambda v: v <= 1.2,
        ),
        ("manual compile time at most jax.grad's", "compile_manual_over_autodiff", lambda v: v <= 1),
    )
    tuned = any("tuning" in r for r in results)
    if tuned:  # --tune
        checks += (
            (
                "the tuned manual step (--tune) at least as fast as jax.grad",
                "autodiff_over_tuned",
                lambda v: v >= 1,
            ),
            ("the tuned manual step faster than PyTorch", "torch_over_tuned", lambda v: v > 1),
            (
                "the tuned step faster than the rule's (manual), where the tuning picked another",
                "manual_over_tuned",
                lambda v: v > 1,
            ),
        )
    lines += [f"- {text}: {count(key, ok)}" for text, key, ok in checks]
    lines += within_the_floor(d)
    if tuned:
        seconds = [r["tuning"]["seconds"] for r in results if "tuning" in r]
        lines.append(
            f"- tuning (jaxbp.tune_formulation) took {np.median(seconds):.1f} s a point (median; "
            f"{min(seconds):.1f}-{max(seconds):.1f}), and picked another formulation than the rule "
            f"at {sum(r['tuning']['best'] != r['tuning']['rule'] for r in results if 'tuning' in r)} "
            f"of {len(seconds)} points"
        )
    lines += [line for other in ("autodiff", "torch") if (line := slower_apart(results, other))]
    lines += compile_by_kernels(results)
    lines.append(
        f"- largest point ({lp['batch']}, {'x'.join(map(str, lp['input']))}, k {lp['kernel']}, "
        f"K {lp['filters']}): {ld['manual_gflops']:.1f} GFLOP/s, "
        f"{100 * ld['manual_fraction_of_matmul']:.0f}% of the matmul (target 25%)"
    )
    return lines


def within_the_floor(derived) -> list[str]:
    """A markdown line: the per-example gradients (into the last call's memory) within 1.2x of the
    batch gradient where the floor under them is, and how far over it they are there and
    elsewhere; none where the floor was not measured."""
    both = [d for d in derived if "per_ex_floor_over_batch_grad" in d]
    if not both:
        return []
    open_ = [d for d in both if d["per_ex_floor_over_batch_grad"] <= 1.2]
    met = sum(d["per_ex_manual_reused_over_batch_grad"] <= 1.2 for d in open_)
    over = [d["per_ex_manual_reused_over_batch_grad"] / d["per_ex_floor_over_batch_grad"] for d in both]
    return [
        f"- per-example within 1.2x (into the last call's memory) where the floor is: {met} of "
        f"{len(open_)} points; the floor over 1.2x at {len(both) - len(open_)}; the per-example "
        f"gradients over the floor {np.median(over):.2f}x (median; {min(over):.2f}-{max(over):.2f}), "
        f"under it (a floor that did not hold) at {sum(v < 1 for v in over)}"
    ]


def slower_apart(results, other: str) -> str | None:
    """A markdown line: at how many points the manual step's median is slower than `other`'s
    ("autodiff" or "torch"), and at which of them the quartiles are apart (`other`'s third
    quartile below the manual step's first): a loss the spread of the samples does not cover.
    None where `other` was not timed."""
    both = [r for r in results if other in r["times"] and "manual" in r["times"]]
    if not both:
        return None
    slower = [r for r in both if r["times"][other]["median_ms"] < r["times"]["manual"]["median_ms"]]
    apart = [r for r in slower if r["times"][other]["q3_ms"] < r["times"]["manual"]["q1_ms"]]
    name = {"autodiff": "jax.grad", "torch": "PyTorch"}.get(other, other)

    def spread(t):
        return f"{t['median_ms']:.3g} [{t['q1_ms']:.3g}-{t['q3_ms']:.3g}]"

    where = "; ".join(
        f"{r['point']['batch']}, {'x'.join(map(str, r['point']['input']))}, k {r['point']['kernel']}, "
        f"K {r['point']['filters']}: {spread(r['times']['manual'])} against {spread(r['times'][other])} ms"
        for r in apart
    )
    return (
        f"- manual slower than {name} (medians): {len(slower)} of {len(both)} points; with the "
        f"quartiles apart ({name}'s third below the manual step's first) at {len(apart)}"
        + (f" ({where})" if apart else "")
    )


def torch_compile_table(results, info) -> list[str]:
    """Markdown lines for the torch_compile peer (--peers ... torch_compile), where it ran."""
    timed = [r for r in results if "torch_compile" in r["times"]]
    if not timed:
        return []
    ms = lambda r, name: f"{r['times'][name]['median_ms']:.3g}" if name in r["times"] else "-"  # noqa: E731
    ratios = [r["derived"]["torch_compile_over_manual"] for r in timed]
    mode = info.get("torch_compile_mode")
    lines = [
        "",
        f"PyTorch with `torch.compile` (mode {mode!r}: the loss, its backward "
        + (
            "compiled by TorchInductor and replayed as CUDA graphs, the SGD update eager"
            if mode == "reduce-overhead"
            else "and the SGD update compiled by TorchInductor"
        )
        + "; the same check against jaxbp in float64 first), median ms; `ptc/m` its time over the "
        "manual step's (>1: manual faster). "
        f"Manual faster at {sum(v > 1 for v in ratios)} of {len(ratios)} points "
        f"(median {np.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f}).",
        "",
        "| batch | input | k | K | manual | torch | torch.compile | pt/m | ptc/m |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in timed:
        p, d = r["point"], r["derived"]
        pt = f"{d['torch_over_manual']:.2f}" if "torch_over_manual" in d else "-"
        lines.append(
            f"| {p['batch']} | {'x'.join(map(str, p['input']))} | {p['kernel']} | {p['filters']} "
            f"| {ms(r, 'manual')} | {ms(r, 'torch')} | {ms(r, 'torch_compile')} | {pt} "
            f"| {d['torch_compile_over_manual']:.2f} |"
        )
    return lines


def compile_points(results) -> dict:
    """ "manual" and "autodiff" -> (generated kernels, compile s) of every point that counted them."""
    return {
        name: [
            (r["compile"][name]["kernels"], r["compile"][name]["compile_s"])
            for r in results
            if "kernels" in r["compile"].get(name, {})
        ]
        for name in ("manual", "autodiff")
    }


def compile_fit(results) -> dict | None:
    """Least squares of compile time on generated kernels over the manual and jax.grad steps of
    every point that counted them (None with fewer than 3 such compiles, or one kernel count)."""
    points = [p for pairs in compile_points(results).values() for p in pairs]
    if len(points) < 3 or len({k for k, _ in points}) < 2:
        return None
    kernels, seconds = np.array(points, dtype=float).T
    slope, intercept = np.polyfit(kernels, seconds, 1)
    r = float(np.corrcoef(kernels, seconds)[0, 1])
    return {"n": len(points), "slope_s": float(slope), "intercept_s": float(intercept), "r": r}


def plot_compile(stem: Path, results) -> None:
    """<stem>_compile.png: compile time against generated kernels (experiments/plots.py), where
    matplotlib is installed (the experiments extra) and the results counted kernels."""
    fit = compile_fit(results)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    if fit is not None:
        here = str(Path(__file__).resolve().parent)
        if here not in sys.path:
            sys.path.insert(0, here)
        import plots

        plots.compile_kernels(f"{stem}_compile.png", compile_points(results), fit)


def compile_by_kernels(results) -> list[str]:
    """The compile-time target split by whether the manual step generates more kernels than
    jax.grad's (markdown lines; none for results without kernel counts)."""
    pairs = [
        (
            r["compile"]["manual"]["kernels"],
            r["compile"]["autodiff"]["kernels"],
            r["derived"]["compile_manual_over_autodiff"],
        )
        for r in results
        if "kernels" in r["compile"]["manual"] and "kernels" in r["compile"].get("autodiff", {})
    ]
    if not pairs:
        return []
    lines = []
    for label, keep in (
        ("at most as many kernels as", lambda m, a: m <= a),
        ("more kernels than", lambda m, a: m > a),
    ):
        ratios = [c for m, a, c in pairs if keep(m, a)]
        met = f"{sum(c <= 1 for c in ratios)} of {len(ratios)}"
        spread = (
            f" (median {np.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f})" if ratios else ""
        )
        lines.append(
            f"- manual compile time at most jax.grad's where the manual step generates {label} "
            f"jax.grad's: {met}{spread}"
        )
    kernel_ratio = [m / a for m, a, _ in pairs]
    lines.append(
        f"- generated kernels, manual over jax.grad: median {np.median(kernel_ratio):.2f}, "
        f"range {min(kernel_ratio):.2f}-{max(kernel_ratio):.2f}"
    )
    steps = ("manual", "autodiff")
    split = [r["compile"] for r in results if all("xla_s" in r["compile"].get(g, {}) for g in steps)]
    if split:  # runs before the split was recorded have compile_s alone
        med = {
            g: [np.median([c[g][k] for c in split]) for k in ("trace_s", "lower_s", "xla_s")] for g in steps
        }
        lines.append(
            "- where the compile time goes, medians over the points (JAX's trace + JAX's lowering + XLA's "
            "compile): manual {:.3f} + {:.3f} + {:.3f} s, jax.grad {:.3f} + {:.3f} + {:.3f} s".format(
                *med["manual"], *med["autodiff"]
            )
        )
    fit = compile_fit(results)
    if fit is not None:
        lines.append(
            f"- compile time against generated kernels, least squares over both steps' {fit['n']} "
            f"compiles: {fit['intercept_s']:.3f} s + {1e3 * fit['slope_s']:.1f} ms per kernel "
            f"(correlation {fit['r']:.2f})"
        )
    return lines


def git_text(info: dict) -> str:
    """The commit a run reported, and its tree's where that was recorded apart (--tree-commit; the
    first GPU runs' JSON, in git at 77c2a18, had it added by hand: the device tool's copy carried a
    stale .git)."""
    tree = info.get("tree_commit")
    return info["git_commit"] if tree is None else f"{tree} (the copy's git said {info['git_commit']})"


def ratio_text(derived: dict, key: str) -> str:
    """A derived ratio for a table cell, "-" where this point has none."""
    return f"{derived[key]:.2f}" if key in derived else "-"


def cpu_text(info: dict) -> str:
    """The "(caches; SIMD; vendor, family and model)" of `cpu_features` for the Machine line;
    what older runs did not record left out."""
    parts = [info[k] for k in ("cpu_caches", "cpu_simd", "cpu_model") if info.get(k)]
    return f" ({'; '.join(parts)})" if parts else ""


def torch_label(info: dict) -> str:
    return "CUDA" if info.get("torch_device") == "cuda" else "CPU"


def device_lines(info: dict) -> list[str]:
    """The accelerator and the float32 precision of a run off the CPU (none for a CPU run)."""
    if info.get("backend", "cpu") == "cpu":
        return []
    torch = (
        f"; PyTorch on {info.get('torch_gpu', info.get('torch_device'))}, allow_tf32 matmul "
        f"{info.get('torch_matmul_allow_tf32')}, cuDNN {info.get('torch_cudnn_allow_tf32')}"
        if info.get("torch_device") == "cuda"
        else ""
    )
    return [
        "",
        f"Device: {info['device_kind']} ({info['backend']}, {len(info['devices'])} device(s)); "
        f"--precision {info.get('precision')}: jax_default_matmul_precision "
        f"{info.get('jax_default_matmul_precision')}{torch}; matmul {info.get('matmul_n')}^3; each sample "
        "queues its calls and waits for the last.",
    ]


def warm_text(info) -> str:
    """How each sample was started: results before --warm-calls have no such key (none were made)."""
    warm = info.get("warm_calls", 0)
    if not warm:
        return "Each sample was timed without untimed calls before it (the protocol before --warm-calls)."
    return f"Each sample followed {warm} untimed call(s) of its own method (--warm-calls)."


def round_trip_text(result: dict) -> str:
    """The point's cores' round trips before/after it, in ns; "-" where none was timed."""
    trips = result.get("core_round_trip_ns")
    return "/".join(f"{t:.0f}" for t in trips) if trips else "-"


def markdown(results, info, command) -> str:
    def ms(r, name):
        v = r["times"].get(name)
        return "-" if v is None else f"{v['median_ms']:.3g}"

    lines = [
        f"# jaxbp benchmark ({info['dtype']})",
        "",
        f"Command: `{command}`  ",
        f"Machine: {info['cpu']}{cpu_text(info)}, {cores_text(info)}, {info['platform']}; load average "
        f"{info['load_start']} at start, {info['load_end']} at end (other jobs shared the cores).  ",
        f"Versions: Python {info['python']}, jax {info['jax']}, jaxlib {info['jaxlib']}, numpy "
        f"{info['numpy']}, torch {info.get('torch')}; git {git_text(info)}; {info['date_utc']}.  ",
        f"XLA options of every JAX method (jaxbp.compiler_options()): {info.get('compiler_options')}.",
        *device_lines(info),
        "",
        "Median ms per call (IQR in the JSON); VALID conv, stride 1, 10 outputs. `manual` and `autodiff` "
        "are whole jitted SGD steps (autodiff = jax.grad of the batch-mean loss); `*_vmap` the same step "
        "with vmap of per-example gradients; `per-ex` per-example gradients; `batch` the manual batch "
        f"gradient alone; `torch` PyTorch {torch_label(info)} autograd + SGD; `numpy` NumPy im2col + SGD. "
        "`ad/m`, `pt/m`: autodiff and torch time over manual (>1: manual faster); `pe/b`: per-example "
        "manual over batch gradient; `dW/b`: writing an array the size of the per-example dE/dW "
        "(and nothing else) over the batch gradient, a floor under `pe/b`; `nodf/b`: the per-example "
        "forward, dE/dW and dE/db without dE/df over the batch gradient, a tighter floor; "
        "`reused`: the same written into the last call's memory (`jaxbp.make_per_example_grads`, "
        "donated), `pe/b` and `dW/b`, and `ad/m` per-example autodiff over manual; `floor/b`: the "
        "batch's forward and deltas plus `reused dW/b`'s write, a floor under `reused pe/b`; "
        "`%mm`: manual GFLOP/s over the matmul's in the same run; "
        "compile in seconds; kernels: the fusions XLA generates code for in each step; "
        "mem: XLA's peak estimate for the manual step; `rt ns`: the round trip of a value between two "
        "cores before and after the point (`jaxbp.machine.CoreRoundTrip`: on the AMD EPYC with a 16 MB L3 "
        "of experiments/PERFORMANCE.md it had two levels, most likely the host running the two vCPUs on "
        "cores that share a cache or not, 1.3-1.6x apart, and the multithreaded steps slowed at the "
        "higher one). " + warm_text(info),
        "",
        "| batch | input | k | K | manual | autodiff | manual_vmap | autodiff_vmap | torch | numpy "
        "| per-ex manual | per-ex autodiff | batch | ad/m | pt/m | pe/b | dW/b | nodf/b "
        "| reused pe/b | reused dW/b | reused ad/m | floor/b | GFLOP/s | %mm | compile m/ad | kernels m/ad "
        "| mem MB | rt ns |",
        "|" + "---|" * 28,
    ]
    for r in results:
        p, d, c = r["point"], r["derived"], r["compile"]
        ratio = functools.partial(ratio_text, d)
        mem = c["manual"].get("peak_bytes")
        lines.append(
            f"| {p['batch']} | {'x'.join(map(str, p['input']))} | {p['kernel']} | {p['filters']} "
            f"| {ms(r, 'manual')} | {ms(r, 'autodiff')} | {ms(r, 'manual_vmap')} | {ms(r, 'autodiff_vmap')} "
            f"| {ms(r, 'torch')} | {ms(r, 'numpy')} | {ms(r, 'per_ex_manual')} | {ms(r, 'per_ex_autodiff')} "
            f"| {ms(r, 'batch_grad')} | {ratio('autodiff_over_manual')} | {ratio('torch_over_manual')} "
            f"| {ratio('per_ex_manual_over_batch_grad')} | {ratio('per_ex_dW_write_over_batch_grad')} "
            f"| {ratio('per_ex_no_df_over_batch_grad')} | {ratio('per_ex_manual_reused_over_batch_grad')} "
            f"| {ratio('per_ex_dW_write_reused_over_batch_grad')} "
            f"| {ratio('per_ex_autodiff_reused_over_manual_reused')} "
            f"| {ratio('per_ex_floor_over_batch_grad')} | {d['manual_gflops']:.1f} "
            f"| {100 * d['manual_fraction_of_matmul']:.0f}% "
            f"| {c['manual']['compile_s']:.2f}/{c['autodiff']['compile_s']:.2f} "
            f"| {c['manual'].get('kernels', '-')}/{c['autodiff'].get('kernels', '-')} "
            f"| {'-' if mem is None else f'{mem / 2**20:.0f}'} | {round_trip_text(r)} |"
        )
    lines += targets_summary(results)
    lines += torch_compile_table(results, info)
    if any(k.startswith("manual[") for r in results for k in r["times"]):
        lines += [
            "",
            "Formulations of the manual step (forward/filter-gradient/chunk, `+terms` or `+dot` where W",
            "delta2's side is set), median ms; `/chosen`: time over the time of the formulation",
            "`choose_formulation` picks (>1: the pick is faster).",
            "",
            "| batch | input | k | K | chosen | fastest | formulations (median ms, /chosen) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in results:
            p = r["point"]
            forms = formulation_stats(r, "times", "median_ms")
            base = forms.get(r.get("chosen_formulation"), float("nan"))
            by_time = sorted(forms.items(), key=lambda kv: kv[1])
            cells = ", ".join(f"{k} {v:.3g} ({v / base:.2f})" for k, v in by_time)
            lines.append(
                f"| {p['batch']} | {'x'.join(map(str, p['input']))} | {p['kernel']} | {p['filters']} "
                f"| {r.get('chosen_formulation', '-')} | {min(forms, key=forms.get)} | {cells} |"
            )
        lines += formulation_compile_table(results)
    if any(variant_names(r["times"]) for r in results):
        lines += variants_table(results)
    if any("tuning" in r for r in results):
        lines += tuned_table(results)
    return "\n".join(lines) + "\n"


def tuned_table(results: list) -> list[str]:
    """Markdown lines: each point's --tune pick against the rule's, as timed in the grid's rounds
    (`manual_tuned`, or `manual` where the tuning kept the rule's pick), and the tuning itself."""
    lines = [
        "",
        "Tuned formulations (--tune: jaxbp.tune_formulation, then its pick timed again with the rest),",
        "median ms; `m/tuned`, `ad/tuned`, `pt/tuned`: the rule's manual step, jax.grad's and PyTorch's",
        "time over the tuned step's (>1: the tuned step is faster); `tune s`: the tuning's wall time;",
        "`in tuning`: the pick's and the rule's medians within the tuning (value_and_grads alone).",
        "",
        "| batch | input | k | K | rule | tuned | manual | tuned ms | m/tuned | ad/tuned | pt/tuned "
        "| tune s | in tuning (tuned/rule ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "tuning" not in r:
            continue
        p, d, tune = r["point"], r["derived"], r["tuning"]
        t = {n: v["median_ms"] for n, v in r["times"].items()}
        ratio = functools.partial(ratio_text, d)
        inside, tuned = tune["times_ms"], t.get("manual_tuned", t["manual"])
        lines.append(
            f"| {p['batch']} | {'x'.join(map(str, p['input']))} | {p['kernel']} | {p['filters']} "
            f"| {tune['rule']} | {tune['best']} | {t['manual']:.3g} | {tuned:.3g} "
            f"| {ratio('manual_over_tuned')} | {ratio('autodiff_over_tuned')} | {ratio('torch_over_tuned')} "
            f"| {tune['seconds']:.1f} | {inside[tune['best']][1]:.3g}/{inside[tune['rule']][1]:.3g} |"
        )
    return lines


def formulation_stats(result: dict, table: str, field: str) -> dict:
    """formulation name -> `field` of its `manual[...]` method in result[table] ("times" or
    "compile"). `jax_methods` now always times the pick; in results written before that, where
    --forms left the pick's pair out (bench_formulations_one_filter_toeplitz.json), the `manual`
    method, which is the pick's step, stands for it."""
    stats = {k[7:-1]: v[field] for k, v in result.get(table, {}).items() if k.startswith("manual[")}
    chosen = result.get("chosen_formulation")
    if stats and chosen is not None and chosen not in stats and "manual" in result.get(table, {}):
        stats[chosen] = result[table]["manual"][field]
    return stats


def variants_table(results: list) -> list[str]:
    """Markdown lines: each --variants step against the default step it varies, median ms and
    compile s, a row per point and variant (`manual_unrolled` has no jax.grad counterpart)."""
    lines = [
        "",
        "Variants (--variants, measured and not adopted), median ms and compile s. Each variant",
        "compiles the manual step, and jax.grad's, with XLA options (`VARIANT_OPTIONS`; on a GPU",
        "`GPU_VARIANT_OPTIONS`) or unrolls the chunks; `m/var`, `ad/var`: the default step's time",
        "over the variant's (>1: the variant is faster); `ad var/m`: jax.grad's step with the option",
        "over the manual step without it (>1: the manual step as shipped is faster than that",
        "jax.grad step).",
        "",
        "| batch | input | k | K | variant | manual | manual var | m/var | autodiff | autodiff var "
        "| ad/var | ad var/m | compile m/var/ad/ad var |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t, c, p = r["times"], r["compile"], r["point"]
        if "manual" not in t or "autodiff" not in t:
            continue
        ms = {n: v["median_ms"] for n, v in t.items()}
        cs = {n: f"{v['compile_s']:.2f}" for n, v in c.items()}
        for name in variant_names(t):
            if not name.startswith("manual_"):
                continue
            option = name[len("manual_") :]
            av = f"autodiff_{option}"
            ad_cells = (
                f"{ms[av]:.3g} | {ms['autodiff'] / ms[av]:.2f} | {ms[av] / ms['manual']:.2f}"
                if av in ms
                else "- | - | -"
            )
            lines.append(
                f"| {p['batch']} | {'x'.join(map(str, p['input']))} | {p['kernel']} | {p['filters']} "
                f"| {option} | {ms['manual']:.3g} | {ms[name]:.3g} | {ms['manual'] / ms[name]:.2f} "
                f"| {ms['autodiff']:.3g} | {ad_cells} "
                f"| {cs['manual']}/{cs[name]}/{cs['autodiff']}/{cs.get(av, '-')} |"
            )
    failed = [(r["point"], name, err) for r in results for name, err in r.get("variant_errors", {}).items()]
    if failed:
        lines += ["", "Variants that did not compile (not timed):", ""]
        lines += [f"- {name} at {point}: {err}" for point, name, err in failed]
    return lines


STEPS_TO_BEAT = ("autodiff", "torch")  # the steps the run-time targets compare the manual one with


def formulation_compile_table(results: list) -> list[str]:
    """Markdown lines: each point's compile times (s) of the whole step per formulation against
    jax.grad's, what the quickest-compiling formulations cost in run time, and whether any
    formulation meets the compile target (at most jax.grad's compile time) and the run-time
    targets (at least as fast as jax.grad, faster than PyTorch; medians) at once."""
    lines = [
        "",
        "Compile time (s, lower + compile of the whole step) of the formulations against jax.grad's",
        "step: the pick's; the quickest-compiling formulation's, with its run time over the pick's;",
        "the fastest formulation that compiles no slower than jax.grad, with its run time over the",
        "pick's, and jax.grad's and PyTorch's step times over its (`ad/it`, `pt/it`: >1, it is faster).",
        "",
        "| batch | input | k | K | jax.grad | chosen | quickest to compile (run /chosen) "
        "| fastest compiling <= jax.grad (run /chosen) | ad/it | pt/it |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    counts = {"points": 0, "within": 0, "ahead_of_autodiff": 0, "ahead_of_both": 0}
    for r in results:
        p, compile_s = r["point"], r.get("compile", {})
        times = formulation_stats(r, "times", "median_ms")
        comp = {k: v for k, v in formulation_stats(r, "compile", "compile_s").items() if k in times}
        if not comp or "autodiff" not in compile_s:
            continue
        autodiff = compile_s["autodiff"]["compile_s"]
        chosen = r.get("chosen_formulation")
        base = times.get(chosen, float("nan"))
        quick = min(comp, key=comp.get)
        within = [k for k in comp if comp[k] <= autodiff]
        best = min(within, key=times.get) if within else None
        best_cell = f"{best} {comp[best]:.2f} ({times[best] / base:.2f})" if best else "none"
        peers = {n: r["times"][n]["median_ms"] for n in STEPS_TO_BEAT if n in r["times"]}
        ratios = [f"{peers[n] / times[best]:.2f}" if best and n in peers else "-" for n in STEPS_TO_BEAT]
        lines.append(
            f"| {p['batch']} | {'x'.join(map(str, p['input']))} | {p['kernel']} | {p['filters']} "
            f"| {autodiff:.2f} | {comp.get(chosen, float('nan')):.2f} "
            f"| {quick} {comp[quick]:.2f} ({times[quick] / base:.2f}) | {best_cell} | {' | '.join(ratios)} |"
        )
        counts["points"] += 1
        # the fastest formulation compiling within jax.grad's time: if it is not ahead, none is
        ahead_ad = best is not None and "autodiff" in peers and times[best] <= peers["autodiff"]
        counts["within"] += best is not None
        counts["ahead_of_autodiff"] += ahead_ad
        counts["ahead_of_both"] += ahead_ad and "torch" in peers and times[best] < peers["torch"]
    if counts["points"]:
        n = counts["points"]
        lines += [
            "",
            f"- some formulation compiles in at most jax.grad's time: {counts['within']} of {n} points",
            f"- one of those at least as fast as jax.grad: {counts['ahead_of_autodiff']} of {n}",
            f"- one of those at least as fast as jax.grad and faster than PyTorch: "
            f"{counts['ahead_of_both']} of {n}"
            + ("" if any("torch" in r["times"] for r in results) else " (PyTorch not timed)"),
        ]
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a short grid around the headline point")
    parser.add_argument("--batches", type=int, nargs="+", help="override the grid's batch sizes")
    parser.add_argument("--filters", type=int, nargs="+", help="override the grid's filter counts")
    parser.add_argument("--inputs", nargs="+", help="override the input shapes, e.g. 28x28x1 32x32x3")
    parser.add_argument("--kernels", type=int, nargs="+", help="override the kernel sizes")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--repeats", type=int, default=7, help="timed samples per method (interleaved)")
    parser.add_argument(
        "--min-sample-s", type=float, default=0.02, help="each sample runs at least this long"
    )
    parser.add_argument(
        "--warm-calls",
        type=int,
        default=1,
        help="untimed calls of a method right before each of its samples (0: none, as before git 98889c7)",
    )
    parser.add_argument(
        "--matmul-n", type=int, help="size of the reference matmul (default 1024 on the CPU, else 8192)"
    )
    parser.add_argument("--formulations", action="store_true", help="also time each manual formulation")
    parser.add_argument(
        "--forms", nargs="+", help="with --formulations, pair only these forms (default: all)"
    )
    parser.add_argument(
        "--chunks",
        nargs="+",
        type=int,
        help="with --formulations, the chunks (examples per step of the chunks' loop) the pick is also "
        f"timed at, besides the whole batch (default: {' '.join(map(str, FORMULATION_CHUNKS))})",
    )
    parser.add_argument("--variants", action="store_true", help="also time the variants (above)")
    parser.add_argument(
        "--tune", action="store_true", help="also tune the formulation per point and time its pick (above)"
    )
    parser.add_argument("--skip-vmap-steps", action="store_true", help="do not time the two *_vmap steps")
    peers = parser.add_mutually_exclusive_group()
    peers.add_argument("--no-peers", action="store_true", help="skip PyTorch and NumPy")
    peers.add_argument(
        "--peers",
        nargs="+",
        choices=PEERS,
        default=list(DEFAULT_PEERS),
        help="the peers to time (default: torch and numpy; torch_compile on request)",
    )
    parser.add_argument(
        "--torch-device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="PyTorch's device (auto: cuda where JAX's default backend is a GPU, else cpu)",
    )
    parser.add_argument(
        "--precision",
        choices=list(JAX_PRECISION),
        help="float32 convs and matmuls of JAX and PyTorch alike: float32 (full) or tf32 "
        "(TensorFloat-32 on NVIDIA GPUs); default: each library's own",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", help="output file stem (default bench, bench_quick, ...)")
    parser.add_argument(
        "--tree-commit",
        help="the commit of the checked-out tree, recorded beside git's (for a copy whose .git is "
        "stale, as the device tool's was)",
    )
    parser.add_argument(
        "--cores",
        type=int,
        help="pin the benchmark (JAX and the peers alike) to this many of the usable cores "
        "(default: all of them)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="only rewrite the .md beside a results JSON from its data"
    )
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.cores is not None and args.render:
        raise SystemExit("--cores has no effect with --render (it only rewrites a table)")
    if args.cores is not None:
        from jaxbp.machine import pin_cores

        try:
            pin_cores(args.cores)  # before JAX's CPU client sizes its thread pool; peers inherit it
        except ValueError as err:
            raise SystemExit(f"--{err}") from None
    import jax

    if args.render:
        payload = json.loads(args.render.read_text())
        text = markdown(payload["results"], payload["machine"], payload["command"])
        args.render.with_suffix(".md").write_text(text)
        plot_compile(args.render.with_suffix(""), payload["results"])
        print(text)
        return
    jax.config.update("jax_enable_x64", True)  # float64 peer checks; timed arrays carry their dtype
    if args.precision is not None:
        jax.config.update("jax_default_matmul_precision", JAX_PRECISION[args.precision])
    backend = jax.default_backend()
    if args.matmul_n is None:
        args.matmul_n = 1024 if backend == "cpu" else 8192
    torch_device = args.torch_device
    if torch_device == "auto":
        torch_device = "cuda" if backend == "gpu" else "cpu"
    from tqdm import tqdm

    import jaxbp
    from jaxbp.conv_forms import FORMS

    if args.forms and not set(args.forms) <= set(FORMS):
        raise SystemExit(f"--forms must be among {FORMS}, got {args.forms}")
    if args.forms and not args.formulations:
        raise SystemExit("--forms only applies with --formulations")
    if args.chunks is not None and not args.formulations:
        raise SystemExit("--chunks only applies with --formulations")
    if args.chunks is not None and min(args.chunks) < 1:
        raise SystemExit(f"--chunks must be positive numbers of examples, got {args.chunks}")
    if args.warm_calls < 0:
        raise SystemExit(f"--warm-calls must be 0 or more, got {args.warm_calls}")
    grid = dict(QUICK if args.quick else GRID)
    for key, value in (("batch", args.batches), ("filters", args.filters), ("kernel", args.kernels)):
        if value:
            grid[key] = tuple(value)
    if args.inputs:
        grid["input"] = tuple(tuple(int(v) for v in s.split("x")) for s in args.inputs)
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    points = [p for p in points if p["kernel"] <= min(p["input"][:2])]

    conns, workers = {}, []
    peer_versions = {}
    for peer in () if args.no_peers else dict.fromkeys(args.peers):
        conn, worker = start_peer(peer)
        workers.append(worker)
        reply = peer_ask(conn, "versions", (torch_device if peer != "numpy" else "cpu", args.precision))
        if isinstance(reply, str):  # died on import or device setup
            print(f"{peer} is not timed: {reply}", file=sys.stderr)
            peer_versions[f"{peer}_error"] = reply
            continue
        available, versions = reply
        peer_versions.update(versions)
        if "torch_error" in versions:
            print(f"torch is not timed: {versions['torch_error']}", file=sys.stderr)
        if available:
            conns[peer] = conn

    a = jax.numpy.asarray(np.random.default_rng(1).normal(size=(args.matmul_n, args.matmul_n)), np.float32)
    mm = jax.jit(lambda a: a @ a, compiler_options=jaxbp.compiler_options())
    mm(a).block_until_ready()

    def matmul(inner):
        for _ in range(inner):
            mm(a).block_until_ready()

    info = {
        **machine_info(jax, peer_versions),
        "compiler_options": jaxbp.compiler_options(),
        "dtype": args.dtype,
        "precision": args.precision,
        "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
        "matmul_n": args.matmul_n,
        "warm_calls": args.warm_calls,
        **({"tree_commit": args.tree_commit} if args.tree_commit else {}),
        "load_start": os.getloadavg(),
    }
    command = (
        "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]) if argv is None else str(argv)
    )
    name = args.name or ("bench_quick" if args.quick else "bench") + (
        "_float64" if args.dtype == "float64" else ""
    )
    from jaxbp.machine import CoreRoundTrip

    # Around each point, where the steps run on the CPU's cores: on a GPU they do not, and the
    # device machine's sandbox may not honour a pinned core.
    trip = CoreRoundTrip() if backend == "cpu" and CoreRoundTrip.available() else None
    if trip:
        info["core_round_trip_cores"] = list(trip.cores)
    results = []
    progress = tqdm(points, disable=args.quiet, desc="grid")
    try:
        for point in progress:
            progress.set_postfix_str(str(point))
            before = trip.measure() if trip else None
            results.append(run_point(point, args, jax, jaxbp, conns, matmul, progress))
            if trip:
                if conns:  # a peer's threads may still spin after its last sample (run_point's pause)
                    time.sleep(SETTLE_S)
                results[-1]["core_round_trip_ns"] = [before, trip.measure()]
            info["load_end"] = os.getloadavg()
            # The points so far, so that a run cut short (a time limit, a crash) keeps them.
            write_results(
                args.out, name, info, command, results, markdown(results, info, command), echo=False
            )
    finally:
        if trip:
            trip.close()
    info["load_end"] = os.getloadavg()
    for peer, conn in conns.items():
        reply = peer_ask(conn, "stop", None)  # its max RSS, or a str: the peer died
        info[f"{peer}_process_max_rss_kb"] = reply if isinstance(reply, int) else None
    for worker in workers:
        worker.join(timeout=10)
    info["max_rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    write_results(args.out, name, info, command, results, markdown(results, info, command))
    plot_compile(Path(args.out) / name, results)


if __name__ == "__main__":
    main()
