"""Time PyTorch's step at the headline point call by call, eager or under a torch.compile mode:
where a compiled peer spends its first calls, and whether it survives them.

bench.py's torch_compile peer runs in a process of its own and reports only a finished number;
this runs the same `TorchNet` in the foreground, printing a timestamp after each phase, so that a
compile that stalls or a process that dies (a segfault in a compiled library leaves no Python
traceback; faulthandler prints the stacks it can) shows where.

    python experiments/probe_torch_compile.py reduce-overhead float32 cuda
    python experiments/probe_torch_compile.py eager float64 cpu

On the H200 (PyTorch 2.11, triton 3.6; experiments/results/probe_torch_compile_gpu.log) eager
and "default" ran; "reduce-overhead" died with exit 139 (SIGSEGV) in its first step, right after
Inductor skipped CUDA graphs for the update, which mutated its inputs, in float32 and float64.
"""

import argparse
import faulthandler
import sys
import time
from pathlib import Path

import numpy as np

faulthandler.enable()
sys.path.insert(0, str(Path(__file__).parent))
START = time.perf_counter()


def say(*words):
    print(f"[{time.perf_counter() - START:7.1f} s]", *words, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", help='"eager" or a torch.compile mode ("default", "reduce-overhead", ...)')
    parser.add_argument("dtype", choices=("float32", "float64"))
    parser.add_argument("device", choices=("cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--filters", type=int, default=8)
    parser.add_argument(
        "--calls", type=int, nargs="+", default=[10, 100, 1000], help="steps per timed run, after the first 4"
    )
    args = parser.parse_args()

    import torch
    from bench import TorchNet

    say("torch", torch.__version__, "cuda available:", torch.cuda.is_available())
    rng = np.random.default_rng(0)
    k, n = args.filters, args.batch  # the headline point: 28x28x1, 5x5 filters, 10 outputs
    f = rng.normal(size=(5, 5, 1, k)).astype(args.dtype) * 0.1
    W = rng.normal(size=(24 * 24 * k, 10)).astype(args.dtype) * 0.01
    b = np.zeros(10, args.dtype)
    x = rng.normal(size=(n, 28, 28, 1)).astype(args.dtype)
    y = rng.uniform(size=(n, 10)).astype(args.dtype)

    def wait():
        if args.device == "cuda":
            torch.cuda.synchronize()

    say("building", args.mode, args.dtype, args.device)
    net = TorchNet(torch, f, W, b, x, y, args.device, None if args.mode == "eager" else args.mode)
    for i in range(4):
        start = time.perf_counter()
        net.step()
        wait()
        say(f"call {i}: {1e3 * (time.perf_counter() - start):.1f} ms")
    for calls in args.calls:
        start = time.perf_counter()
        for _ in range(calls):
            net.step()
        wait()
        say(f"{calls} calls: {1e3 * (time.perf_counter() - start) / calls:.4f} ms per call")


if __name__ == "__main__":
    main()
