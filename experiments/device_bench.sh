#!/usr/bin/env bash
# The benchmark on a lent GPU machine, in one call of a few minutes. That machine has its own
# python3 with JAX (CUDA), PyTorch (CUDA), optax, chex, tqdm and pytest, and no network; jaxbp
# runs from this checkout. The stages run in order of value, each within what is left of
# DEADLINE_S; bench.py writes its results after every point, so a stage cut short keeps the
# points it finished. A failed smoke run stops the script at once (little device time lost).
#
#   OUT=<dir> DEADLINE_S=575 TREE_COMMIT=<hash> bash experiments/device_bench.sh
#
# with the hash of HEAD written into the command where it is sent from (git in the device
# tool's copy of the checkout reported an older commit). STAGES="smoke tests quick_float32", say,
# runs only the stages it names (in the script's order); PEERS (default "torch torch_compile") the
# quick float32 grid's peers.
#
# Stages: the smoke run; the float64 and float32 agreement tests of the core issue on the GPU
# (tests/test_backward.py, tests/test_train.py); every formulation's float64 agreement
# (tests/test_batched.py); the torch.compile probe (its log only); the quick grid in full
# float32 against PyTorch on CUDA, eager and under torch.compile with CUDA graphs
# (bench_quick_gpu); both steps with XLA's GPU autotuning off (bench_variants_gpu); every
# formulation of the manual step at batch 256 (bench_formulations_gpu: is the rule's pick on a
# GPU, the patches for both, still within a few percent of the fastest?); the LeNet-5 step of
# jaxbp.layers against jax.grad (bench_lenet_gpu); the quick grid at TF32 for both libraries
# (bench_quick_gpu_tf32, JAX's default on this GPU).
# The third H200 run (2026-12-04, tree f5b1ac9, results in experiments/results/) ran
# STAGES="smoke tests quick_float32 formulations" PEERS=torch with DEADLINE_S=560: 43 s for the
# smoke run, 101 s for the tests (39 passed, in 8 workers), 153 s for the quick grid, 149 s for
# the formulations; then, while the machine was warm, STAGES="lenet quick_tf32" with
# DEADLINE_S=300: 128 s for LeNet, 123 s for the TF32 grid. The probe and the compiled peer have
# not run since the probe's fix (experiments/PERFORMANCE.md, "On a GPU"), nor have tests_batched
# and the variants stage (XLA's GPU autotuning off). A next session should run
# STAGES="smoke tests_batched probe_torch_compile quick_float32" with DEADLINE_S=560, then,
# while the machine is warm, STAGES=variants with DEADLINE_S=220 (about 820 of its 900 s).
set -u
out=${OUT:-experiments/results}
deadline=${DEADLINE_S:-575}
py=${PYTHON:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1

stage() {  # stage NAME MAX_SECONDS COMMAND...: run COMMAND for at most MAX_SECONDS and what is left
    local name=$1 max=$2
    shift 2
    if [[ -n ${STAGES:-} && " $STAGES " != *" $name "* ]]; then
        echo "== $name: not in STAGES"
        return 0
    fi
    local t=$((deadline - SECONDS - 5))
    ((t > max)) && t=$max
    if ((t < 20)); then
        echo "== $name: skipped, ${t} s left"
        return 1
    fi
    echo "== $name: at most ${t} s, starting at ${SECONDS} s"
    timeout "$t" "$@"
    local rc=$?
    echo "== $name: exit $rc at ${SECONDS} s"
    return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
$py -c "import jax, jaxlib, torch, optax, chex, numpy
print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices(), 'torch', torch.__version__,
      'cuda', torch.cuda.is_available(), 'optax', optax.__version__, 'chex', chex.__version__,
      'numpy', numpy.__version__)" || exit 1
# TREE_COMMIT: the commit of this tree, recorded in the results (the device copy's .git was stale).
bench="$py experiments/bench.py --quiet --out $out ${TREE_COMMIT:+--tree-commit $TREE_COMMIT}"
stage smoke 150 $bench --batches 32 --filters 1 --inputs 28x28x1 --kernels 5 --repeats 1 --peers torch \
    --precision float32 --out /tmp/smoke || exit 1
# The tests' float32 tolerances were measured in full float32: TF32 off for them.
# In TEST_WORKERS processes (pytest-xdist, default 8 of the machine's 16 cores: the tests' time is
# mostly compiling, on the CPU; tests/conftest.py has each allocate GPU memory as it goes).
JAX_DEFAULT_MATMUL_PRECISION=float32 stage tests 240 $py -m pytest -v --tb=short -p no:cacheprovider \
    -n "${TEST_WORKERS:-8}" --durations=10 \
    tests/test_backward.py tests/test_train.py
# Every formulation of the batch gradient, and the per-example gradients, against jax.grad and
# the slides in float64 and float32 (tests/test_batched.py's agreement tests; its others check
# the CPU's programs): on a GPU the rule picks the patches for both, so the tests above check
# that one alone. Not yet run on a GPU; its longest test took 160 s on a 2-core CPU.
JAX_DEFAULT_MATMUL_PRECISION=float32 stage tests_batched 240 $py -m pytest -v --tb=short \
    -p no:cacheprovider -n "${TEST_WORKERS:-8}" --durations=10 -k "float64 or float32" \
    tests/test_batched.py
# PyTorch under torch.compile with CUDA graphs has no GPU number yet (experiments/PERFORMANCE.md, "On a GPU"): first
# the probe, which shows in the log whether its first steps survive, then the quick grid with
# it as a peer (a peer that dies is reported and the grid goes on).
stage probe_torch_compile 90 $py experiments/probe_torch_compile.py reduce-overhead float32 cuda
stage quick_float32 300 $bench --quick --precision float32 --peers ${PEERS:-torch torch_compile} --name bench_quick_gpu
# XLA's GPU autotuning off for both steps (GPU_VARIANT_OPTIONS): is it the compile time, and
# what are its kernels worth at run time? Not yet run on a GPU.
stage variants 200 $bench --quick --variants --no-peers --skip-vmap-steps --precision float32 \
    --name bench_variants_gpu
stage formulations 170 $bench --quick --batches 256 --formulations --no-peers --skip-vmap-steps \
    --precision float32 --name bench_formulations_gpu
# LeNet-5 through jaxbp.layers, in full float32 (its check of manual against jax.grad is float32's).
JAX_DEFAULT_MATMUL_PRECISION=float32 stage lenet 160 $py experiments/bench_lenet.py --sample-s 0.05 \
    --out $out --name bench_lenet_gpu ${TREE_COMMIT:+--tree-commit $TREE_COMMIT}
stage quick_tf32 150 $bench --quick --precision tf32 --peers torch --name bench_quick_gpu_tf32
echo "== done at ${SECONDS} s"
