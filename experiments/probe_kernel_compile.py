"""Where XLA's CPU compile of the update step goes, kernel by kernel: manual against jax.grad.

bench.py fits compile time against the kernels XLA generates (each fusion of the optimized
program, which XLA's CPU compiler emits through MLIR to LLVM IR; dots and convs are library calls
and generate none). This reads XLA's own log of one compile instead. A child process compiles the
manual step and jax.grad's at --point, alternating, --repeats times each, with XLA's compile log
on (TF_CPP_MIN_LOG_LEVEL=0, TF_CPP_VMODULE=cpu_compiler=3,fusion_compiler=3), and marks where each
compile starts and ends. From each compile's lines it takes:

  hlo_passes_ms   XLA's HLO passes ("Running HLO passes on [...] time")
  kernel ms       each kernel's MLIR compile ("Compiled MLIR module: <name> time"); XLA runs them
                  on a pool of threads, so their sum can exceed the time they span
  emit_span_ms    from the first kernel's start to the last kernel's end
  after_emit_ms   from the last kernel's end to "Compilation finished": LLVM's code generation of
                  the split module and the JIT's linking
  xla_ms          XLA's whole compile ("Compiling [...] for CPU using JIT time")

and the kernel's shape from the optimized HLO. Medians over the repeats; a kernel that the log
names and the HLO does not (or the reverse) is reported, as the counts' check.

    python experiments/probe_kernel_compile.py [--point 256:28x28x1:5:8] [--repeats 3]

Writes experiments/results/probe_kernel_compile.{json,md,png} (--name to rename).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import machine_line  # noqa: E402
from bench import script_record  # noqa: E402
from bench import step_inputs  # noqa: E402
from bench import write_results  # noqa: E402
from probe_write_overlap import parse_point  # noqa: E402

MARK = "@@probe_kernel_compile"
STEPS = ("manual", "autodiff")
LOG_ENV = {"TF_CPP_MIN_LOG_LEVEL": "0", "TF_CPP_VMODULE": "cpu_compiler=3,fusion_compiler=3"}
# A glog line: "I1204 16:36:48.344678    5858 fusion_compiler.cc:494] <message>".
GLOG = re.compile(r"^[IWEF]\d{4} (\d\d):(\d\d):(\d\d\.\d+)\s+\d+ \S+\] (.*)$")
US = r"time: .*?\((\d+) us\)"  # XLA's timers print "time: 5.46 ms (5462 us)"
FUSION = re.compile(r"%(\S+) = (\([^)]*\)|\S+) fusion\(")


def child(point, repeats: int) -> None:
    """Compile both steps `repeats` times, alternating, each compile between two marks on
    stderr; print each step's generated kernels (HLO fusion name -> shape) as JSON on stdout."""

    import jaxbp

    batch, in_shape, kernel, filters = point
    spec = jaxbp.ConvNetSpec(in_shape=in_shape, n_filters=filters, kernel_size=kernel, n_out=10)
    opt, args = step_inputs(spec, batch)
    jaxbp.compiler_options()  # its one-time check compiles a function of its own: not inside a mark
    shapes = {}
    for rep in range(repeats):
        for grads in STEPS:
            lowered = jaxbp.make_update_step(spec, opt, grads=grads).trace(*args).lower()
            print(f"{MARK} begin {grads} {rep}", file=sys.stderr, flush=True)
            compiled = lowered.compile()
            print(f"{MARK} end {grads} {rep}", file=sys.stderr, flush=True)
            if grads not in shapes:  # the same program each repeat: its fusions read once
                shapes[grads] = {
                    m.group(1): m.group(2)
                    for line in compiled.as_text().splitlines()
                    if (m := FUSION.search(line)) and "kind=kCustom" not in line
                }
    print(json.dumps(shapes))


def kernel_name(module: str) -> str:
    """The HLO fusion an MLIR module compiles: "<fusion>_kernel_module" or "__compute_module_<fusion>"."""
    return module.removeprefix("__compute_module_").removesuffix("_kernel_module")


def parse_compile(lines: list[str]) -> dict:
    """One compile's log lines (between the marks) -> its phases (ms) and kernels (name -> ms)."""
    out = {"kernels": {}}
    starts, ends, finished, whole = [], [], None, []
    for line in lines:
        m = GLOG.match(line)
        if not m:
            continue
        t_ms = (int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))) * 1e3
        if starts and t_ms < starts[0]:  # past midnight
            t_ms += 24 * 3600e3
        msg = m.group(4)
        if k := re.match(r"Compiled MLIR module: (\S+) " + US, msg):
            out["kernels"][kernel_name(k.group(1))] = int(k.group(2)) / 1e3
            ends.append(t_ms)
        elif msg.startswith("Compiling MLIR module:"):
            starts.append(t_ms)
        elif k := re.match(r"Running HLO passes on \[.*?\] for CPU " + US, msg):
            out["hlo_passes_ms"] = int(k.group(1)) / 1e3
        elif k := re.match(r"Compiling \[.*?\] for CPU using JIT " + US, msg):
            whole.append(int(k.group(1)) / 1e3)
        elif msg.startswith("Compilation finished"):
            finished = t_ms
    if len(whole) != 1:
        raise RuntimeError(
            f"expected one 'Compiling [...] for CPU using JIT time' line between the marks, found "
            f"{len(whole)}: {'was the log on?' if not whole else 'another program compiled there'}"
        )
    out["xla_ms"] = whole[0]
    out["emit_span_ms"] = max(ends) - min(starts) if starts and ends else 0.0
    out["after_emit_ms"] = finished - max(ends) if finished is not None and ends else None
    return out


def parse_log(text: str) -> dict:
    """The child's stderr -> {grads: [one parsed compile per repeat]}."""
    compiles = {g: [] for g in STEPS}
    current = None
    for line in text.splitlines():
        if line.startswith(MARK):
            _, what, grads, _rep = line.split()
            if what == "begin":
                current = []
            else:
                compiles[grads].append(parse_compile(current))
                current = None
        elif current is not None:
            current.append(line)
    return compiles


def median_of(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(compiles: dict, shapes: dict) -> dict:
    """Each step's medians over its compiles, its kernels by median ms, and the check of the
    kernels the log names against the optimized HLO's."""
    out = {}
    for grads, runs in compiles.items():
        names = sorted({n for r in runs for n in r["kernels"]})
        kernels = {n: statistics.median(r["kernels"][n] for r in runs if n in r["kernels"]) for n in names}
        out[grads] = {
            "compiles": len(runs),
            "xla_ms": median_of(runs, "xla_ms"),
            "hlo_passes_ms": median_of(runs, "hlo_passes_ms"),
            "emit_span_ms": median_of(runs, "emit_span_ms"),
            "after_emit_ms": median_of(runs, "after_emit_ms"),
            "kernel_sum_ms": statistics.median(sum(r["kernels"].values()) for r in runs),
            "kernels": [
                {"name": n, "ms": kernels[n], "shape": shapes[grads].get(n)}
                for n in sorted(names, key=kernels.get, reverse=True)
            ],
            # Each compile's kernels against the (deterministic) optimized HLO's fusions.
            "in_log_not_hlo": sorted({n for r in runs for n in set(r["kernels"]) - set(shapes[grads])}),
            "in_hlo_not_log": sorted({n for r in runs for n in set(shapes[grads]) - set(r["kernels"])}),
        }
    return out


def run(point, repeats: int) -> dict:
    env = {**os.environ, **LOG_ENV}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--point", ":".join(point_text(point))]
    proc = subprocess.run([*cmd, "--repeats", str(repeats)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the compiling process failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    shapes = json.loads(proc.stdout.strip().splitlines()[-1])
    steps = summarize(parse_log(proc.stderr), shapes)
    for grads, s in steps.items():
        if s["in_log_not_hlo"] or s["in_hlo_not_log"]:
            print(
                f"warning: {grads}'s kernels in XLA's log and its optimized HLO differ (in the log only: "
                f"{s['in_log_not_hlo']}; in the HLO only: {s['in_hlo_not_log']})",
                file=sys.stderr,
            )
    batch, in_shape, kernel, filters = point
    return {
        "point": {"batch": batch, "input": list(in_shape), "kernel": kernel, "filters": filters},
        "repeats": repeats,
        "steps": steps,
    }


def point_text(point) -> list[str]:
    batch, in_shape, kernel, filters = point
    return [str(batch), "x".join(map(str, in_shape)), str(kernel), str(filters)]


def num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown(result: dict, info: dict, command: str) -> str:
    s, p = result["steps"], result["point"]
    names = {"manual": "manual", "autodiff": "jax.grad"}
    lines = [
        "# XLA's CPU compile of the update step, kernel by kernel",
        "",
        f"Command: `{command}`  ",
        machine_line(info),
        "",
        f"Point: batch {p['batch']}, {'x'.join(map(str, p['input']))}, {p['kernel']}x{p['kernel']}, "
        f"{p['filters']} filters, 10 outputs. From XLA's compile log, medians of {result['repeats']} "
        "compiles of each step, alternating in one process (ms). Kernels compile on a pool of threads: "
        "their sum can exceed the span they take.",
        "",
        "| step | kernels | XLA compile | HLO passes | kernels' span | kernels' sum "
        "| after the kernels (LLVM, link) |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in STEPS:
        m = s[g]
        lines.append(
            f"| {names[g]} | {len(m['kernels'])} | {m['xla_ms']:.0f} | {num(m['hlo_passes_ms'], '.1f')} "
            f"| {m['emit_span_ms']:.0f} | {m['kernel_sum_ms']:.0f} | {num(m['after_emit_ms'], '.0f')} |"
        )
    for g in STEPS:
        m = s[g]
        lines += ["", f"{names[g]}'s kernels:", "", "| kernel | shape | ms |", "|---|---|---|"]
        lines += [f"| {k['name']} | {k['shape'] or '-'} | {k['ms']:.1f} |" for k in m["kernels"]]
        for key, text in (
            ("in_log_not_hlo", "in the log, not the HLO"),
            ("in_hlo_not_log", "in the HLO, not the log"),
        ):
            if m[key]:
                lines.append(f"\nKernels {text}: {', '.join(m[key])}.")
    return "\n".join(lines) + "\n"


def plot(path: pathlib.Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["steps"]
    rows = max(len(s[g]["kernels"]) for g in STEPS)
    fig, axes = plt.subplots(1, 2, sharex=True, figsize=(11, 1.2 + 0.28 * rows))
    for ax, g, label in zip(axes, STEPS, ("manual", "jax.grad")):
        ks = s[g]["kernels"][::-1]
        ax.barh(range(len(ks)), [k["ms"] for k in ks], color="tab:blue" if g == "manual" else "tab:orange")
        ax.set_yticks(range(len(ks)), [k["name"] for k in ks], fontsize=7)
        ax.set_ylim(-0.5, rows - 0.5)
        ax.set_xlabel("MLIR compile of the kernel (ms)")
        ax.set_title(f"{label}: {len(ks)} kernels, XLA compile {s[g]['xla_ms']:.0f} ms", fontsize=9)
    p = result["point"]
    fig.suptitle(
        f"batch {p['batch']}, {'x'.join(map(str, p['input']))}, {p['kernel']}x{p['kernel']}, "
        f"{p['filters']} filters",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--point", type=parse_point, default=parse_point("256:28x28x1:5:8"))
    parser.add_argument("--repeats", type=int, default=3, help="compiles of each step (default 3)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    parser.add_argument("--name", default="probe_kernel_compile")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be a positive int, got {args.repeats}")
    if args.child:
        child(args.point, args.repeats)
        return
    import jax

    if jax.default_backend() != "cpu":
        parser.error(f"the log read here is XLA's CPU compiler's; JAX runs on {jax.default_backend()}")
    result = run(args.point, args.repeats)
    info, command = script_record(jax, __file__, argv)
    write_results(args.out, args.name, info, command, [result], markdown(result, info, command))
    plot(args.out / f"{args.name}.png", result)


if __name__ == "__main__":
    main()
