#!/usr/bin/env bash
# Kernel tests and every benchmark on a lent GPU machine (H100/H200 through the device tool; it
# has PyTorch 2.11, CUDA 13, Triton 3.6, nvcc, no network, and no vllm, flash-attn, mamba-ssm or
# causal-conv1d: the last two only if built there from sdists, see build-baselines below).
#
# Usage, from the repository root, through the device tool (a call runs at most 10 minutes; what
# it writes to $OUT comes back, at most 8 files; every call also writes env-<device>.txt):
#
#   bash benchmarks/run_gpu.sh tests            kernel tests on CUDA (no interpreter)  -> tests-<device>.log
#   bash benchmarks/run_gpu.sh bench [OPTIONS]  python -m hybrid_lm.bench.kernels --out $OUT [OPTIONS]
#                                               (--ops, --quick, --dtype)  -> kernels-<device>.json/.jsonl/.png,
#                                               bench-<device>.log
#   bash benchmarks/run_gpu.sh models           the model benchmarks: bench train, then bench decode (phi4-mini-flash
#                                               size, prompt 2048, up to GEN_LEN=8192 generated, batch 1 and 64),
#                                               then, if vLLM is importable, decode --engine vllm and rollout
#                                               -> train-/decode-/decode-vllm-/rollout-<device>.json/.jsonl/.png
#                                               (each bounded by the call's time; rows measured before a cut stay)
#   bash benchmarks/run_gpu.sh build-baselines  builds causal-conv1d and mamba-ssm from the sdists in .whl/
#                                               (name ".whl" in the call's carry) for this GPU's architecture
#                                               only, into this machine's Python  -> build-<device>.log
#   bash benchmarks/run_gpu.sh build-baselines-bg   the same, detached: returns at once
#   Stages join with commas and share the call's time: `tests,bench [OPTIONS]` (alias `all`; `models`
#   wants a call of its own),
#   `build-baselines,bench [OPTIONS]`. Installs vanish with the machine, which goes back about 30 s
#   after a call ends, so the baselines must be built in the call that benchmarks them or in the
#   one before: `build-baselines-bg`, then `tests` while it compiles, then `bench`, which waits
#   for the build (up to BUILD_WAIT seconds) before timing.
#
# The sdists, fetched once on a machine with network (small; keep .whl/ out of git):
#   CUDA_HOME=/usr/local/cuda MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
#     pip download --no-deps --no-build-isolation --no-binary :all: -d .whl causal-conv1d==1.7.0 mamba-ssm==2.3.2.post1
#
# Then commit the returned files under benchmarks/results/<device>/. Environment knobs: PYTHON
# (default python3), BUDGET (seconds this call may use, default 570), BUILD_WAIT (default 300),
# MAX_JOBS (parallel nvcc jobs, default 16), GEN_LEN (models: tokens generated, default 8192).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/local}  # the device tool sets OUT; elsewhere results stay here
BUILD=/tmp/hybrid-lm-baselines        # sources, log, pid and exit status of the baseline build
deadline=$(( $(date +%s) + ${BUDGET:-570} ))
# the package straight from the working tree: no install step, nothing fetched, the machine's torch
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET HYBRID_LM_BACKEND  # compiled kernels, default dispatch

left() { local s=$(( deadline - $(date +%s) )); echo $(( s > 1 ? s : 1 )); }  # timeout 0 would mean none

slug=$($PY -c "from hybrid_lm.bench.common import device_slug; print(device_slug())" 2>/dev/null) ||
    slug=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 |
           tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')
slug=${slug:-unknown-device}

report_env() {
    mkdir -p "$OUT"
    {
        date -u
        nvidia-smi || echo "nvidia-smi failed"
        echo "cpus: $(nproc)"
        $PY - <<'EOF'
import importlib, importlib.metadata, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
# the kernels need torch and triton; the benchmark uses tqdm and matplotlib when present
for name in ("triton", "tqdm", "matplotlib", "pytest", "einops", "mamba_ssm", "causal_conv1d"):
    try:
        print(f"{name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
        print(f"{name} MISSING")
EOF
    } 2>&1 | tee "$OUT/env-$slug.txt"
}

run_tests() {
    echo "== kernel tests (CUDA, compiled) =="
    timeout "$(left)" $PY -m pytest -q -p no:cacheprovider --durations=15 tests/kernels 2>&1 | tee "$OUT/tests-$slug.log"
    local rc=${PIPESTATUS[0]}
    echo "kernel tests exit code: $rc" | tee -a "$OUT/tests-$slug.log"
    return "$rc"
}

wait_for_build() {
    [ -f "$BUILD/pid" ] || return 0  # no background build was started on this machine
    local waited=0
    while [ ! -f "$BUILD/status" ] && [ "$waited" -lt "${BUILD_WAIT:-300}" ] && [ "$(left)" -gt 240 ]; do
        echo "waiting for the baseline build (${waited}s so far)"
        sleep 15
        waited=$((waited + 15))
    done
    if [ ! -f "$BUILD/status" ]; then  # stop it so it doesn't compete with the timings
        # the whole session: timeout puts pip (and nvcc under it) in a process group of its own
        pkill -s "$(cat "$BUILD/pid")" 2>/dev/null || kill -- "-$(cat "$BUILD/pid")" 2>/dev/null
        echo "baseline build still running: stopped it; benchmarking without the baselines"
    else
        echo "baseline build exit code: $(cat "$BUILD/status")"
    fi
    cp "$BUILD/build.log" "$OUT/build-$slug.log" 2>/dev/null
    rm -f "$BUILD/pid"
}

run_bench() {
    wait_for_build
    echo "== kernel benchmark =="
    timeout "$(left)" $PY -m hybrid_lm.bench.kernels --out "$OUT" "$@" 2>&1 | tee "$OUT/bench-$slug.log"
    return "${PIPESTATUS[0]}"
}

run_models() {
    echo "== model benchmarks =="
    local rc=0
    timeout "$(left)" $PY -m hybrid_lm.bench.train --out "$OUT" --timeout 240 2>&1 | tee "$OUT/models-$slug.log" || rc=1
    timeout "$(left)" $PY -m hybrid_lm.bench.decode --out "$OUT" --gen-len "${GEN_LEN:-8192}" 2>&1 |
        tee -a "$OUT/models-$slug.log" || rc=1
    if $PY -c "import vllm" 2>/dev/null; then  # no vllm on the lent machines unless carried there as wheels
        timeout "$(left)" $PY -m hybrid_lm.bench.decode --engine vllm --out "$OUT" --gen-len "${GEN_LEN:-8192}" 2>&1 |
            tee -a "$OUT/models-$slug.log" || rc=1
        timeout "$(left)" $PY -m hybrid_lm.bench.rollout --out "$OUT" 2>&1 | tee -a "$OUT/models-$slug.log" || rc=1
    else
        echo "vllm is not importable here: decode --engine vllm and rollout skipped" | tee -a "$OUT/models-$slug.log"
    fi
    return "$rc"
}

# Their setup.py files compile for every architecture from sm_75 to sm_121 whatever
# TORCH_CUDA_ARCH_LIST says (9 targets, far over a 10-minute call): keep this GPU's only.
build_baselines() {
    local arch sdists
    arch=$($PY -c "import torch; print('%d%d' % torch.cuda.get_device_capability())") || return 1
    shopt -s nullglob
    sdists=(.whl/causal[-_]conv1d-*.tar.gz .whl/mamba[-_]ssm-*.tar.gz)  # causal-conv1d first: mamba-ssm imports it
    shopt -u nullglob
    if [ ${#sdists[@]} -eq 0 ]; then
        echo "no causal-conv1d / mamba-ssm sdists in .whl/: see the top of this script"
        return 1
    fi
    rm -rf "$BUILD/src" && mkdir -p "$BUILD/src"
    local sd dir rc=0
    for sd in "${sdists[@]}"; do tar -xzf "$sd" -C "$BUILD/src"; done
    $PY - "$arch" "$BUILD"/src/*/setup.py <<'EOF'
import re, sys
arch, paths = sys.argv[1], sys.argv[2:]
pair = re.compile(r'cc_flag\.append\("-gencode"\)\s*cc_flag\.append\("arch=compute_(\d+),code=sm_\1"\)')
for path in paths:
    dropped = []
    src = pair.sub(lambda m: m.group(0) if m.group(1) == arch else dropped.append(m.group(1)) or "pass",
                   open(path).read())
    open(path, "w").write(src)
    print(f"{path}: building for sm_{arch} only, dropped sm_{', sm_'.join(dropped) or '-'}")
EOF
    export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST="${arch:0:-1}.${arch: -1}"
    export MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS:-16}
    for dir in "$BUILD"/src/causal*/ "$BUILD"/src/mamba*/; do
        echo "== building $dir ($(date -u +%T)) =="
        timeout "$(left)" $PY -m pip install --no-build-isolation --no-deps --no-index --no-cache-dir "$dir" || rc=1
    done
    echo "== build done ($(date -u +%T)), exit code $rc =="
    return "$rc"
}

stages=${1:-}
shift || true
[ "$stages" = all ] && stages=tests,bench
IFS=, read -ra stages <<< "$stages"
for stage in "${stages[@]:-}"; do
    case "$stage" in
        tests | bench | models | build-baselines | build-baselines-bg) ;;
        *) sed -n '2,35p' "$0"; exit 2 ;;
    esac
done
report_env
rc=0
for stage in "${stages[@]}"; do
    case "$stage" in
        tests) run_tests || rc=1 ;;
        bench) run_bench "$@" || rc=1 ;;
        models) run_models || rc=1 ;;
        build-baselines) build_baselines 2>&1 | tee "$OUT/build-$slug.log" || rc=1 ;;
        build-baselines-bg)
            # its own session, so it outlives this call (the device tool ends the rest) and
            # wait_for_build can stop all of it; it logs to $BUILD, since $OUT is emptied, and
            # holds none of this call's output open, which the caller would wait on
            mkdir -p "$BUILD" && rm -f "$BUILD/status"
            setsid bash -c 'echo $$ > "$0/pid"; OUT="$0/out" BUDGET=1500 bash "$1" build-baselines > "$0/build.log" 2>&1 < /dev/null
                            echo $? > "$0/status"' "$BUILD" "$0" > /dev/null 2>&1 < /dev/null &
            sleep 2
            echo "baseline build started in the background (pid $(cat "$BUILD/pid")); run 'tests' next, then 'bench'" ;;
    esac
done
exit "$rc"
