#!/usr/bin/env bash
# One full GPU session in one call (the device time is scarce): GPU tests, the trace, the
# benchmarks. Usage: bash tools/gpu_session.sh OUTDIR [pytest args...]. Logs go under OUTDIR;
# everything bulky is packed into OUTDIR/artifacts.tar.gz (few files come back from the device).
set -uo pipefail
out="${1:?usage: tools/gpu_session.sh OUTDIR [what...]}"; shift
what="${*:-tests trace bench prefill launch loop int4}"
mkdir -p "$out/work"
export PYTHONUNBUFFERED=1
# every test skip (no GPU visible, CPU-only torch, a missing package, too little free memory) is a
# failure here: a GPU session must not pass by skipping (tests/needs.py). A module-level one (a
# missing package) is a collection error: --continue-on-collection-errors runs the other files.
export CUGRAPH_RT_REQUIRE_GPU=1
py=python3
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; $py -c "import torch, triton, transformers; from cuda import bindings; print(torch.__version__, triton.__version__, transformers.__version__, bindings.__version__)"; } > "$out/env.txt" 2>&1
for step in $what; do
  case "$step" in
    tests)  timeout 420 $py -m pytest -m "gpu and not multigpu" -q -rs --continue-on-collection-errors --durations=15 ${PYTEST_ARGS:-tests/gpu} > "$out/gpu-tests.log" 2>&1; echo "gpu tests rc=$?" ;;
    cpu)    $py -m pytest -q -rs --continue-on-collection-errors -m "not gpu" -x > "$out/cpu-tests.log" 2>&1; echo "cpu tests rc=$?" ;;
    trace)  timeout 200 $py -m tools.capture_trace --preset tiny --out "$out/work/trace-tiny" > "$out/trace-tiny.log" 2>&1; echo "trace tiny rc=$?"
            timeout 200 $py -m tools.capture_trace --preset 35b-a3b --out "$out/work/trace-35b" > "$out/trace-35b.log" 2>&1; echo "trace 35b rc=$?" ;;
    bench)  timeout 300 $py -m tools.bench_decode --preset 35b-a3b --batches 1,2,4,8 --out "$out/work/bench" > "$out/bench-decode.log" 2>&1; echo "bench decode rc=$?" ;;
    demo)   timeout 120 $py -m model.demo > "$out/demo.log" 2>&1; echo "demo rc=$?"
            timeout 120 $py -m model.generate --preset tiny --prompt-ids 1,2,3 --max-new-tokens 24 > "$out/generate.log" 2>&1; echo "generate rc=$?" ;;
    prefill) timeout 300 $py -m tools.bench_prefill --preset 35b-a3b --out "$out/work/prefill" > "$out/bench-prefill.log" 2>&1; echo "bench prefill rc=$?" ;;
    launch) $py -m tools.bench_launch --out "$out/work/launch" > "$out/bench-launch.log" 2>&1; echo "bench launch rc=$?" ;;
    loop)   timeout 300 $py -m tools.bench_loop --preset 35b-a3b --batches 1,8 --prompt 1024 --out "$out/work/loop" > "$out/bench-loop.log" 2>&1; echo "bench loop rc=$?" ;;
    int4)   timeout 300 $py -m tools.bench_decode --preset 35b-a3b --quant int4 --batches 1,8 --hf-layers 0 --out "$out/work/int4" > "$out/bench-int4.log" 2>&1; echo "bench int4 rc=$?"
            timeout 300 $py -m tools.bench_prefill --preset 35b-a3b --quant int4 --hf-layers 0 --out "$out/work/int4-prefill" > "$out/bench-int4-prefill.log" 2>&1; echo "bench int4 prefill rc=$?" ;;
  esac
done
tar -czf "$out/artifacts.tar.gz" -C "$out" work && rm -rf "$out/work"
for f in "$out"/*.log; do echo "== $f"; tail -n 25 "$f"; done
