#!/usr/bin/env bash
# The GPU checks of the speed issue in one device call (see docs/benchmarks.md):
#
#   here:   bash scripts/device_wheels.sh            # once: wheels the GPU machine lacks, into .whl/
#   device: run(command="bash bench/device.sh", carry=[".whl"], timeout_s=590)
#
# 1. installs the carried wheels (the machine has torch, not diffusers);
# 2. a few bf16 LoRA steps of the tiny Flux pipeline through `python -m train` (the trainer's own
#    GPU path: precision auto, caching, validation render, export);
# 3. `python -m bench` on the full-size cases against stock diffusers + peft, in priority order,
#    inside BUDGET seconds (runs left over are listed as skipped, never silently dropped);
# 4. optionally (E2E_STEPS > 0) the end-to-end job, timed by phase.
# Between 2 and 3: LoKr / LoHa layer timings (bench/adapters.py) and a tiny LoKr training.
# Everything lands in $OUT: gpu.txt, train-tiny.log, adapters.log, train-lokr.log, bench.json,
# bench.log, e2e.json, e2e.log.
#
# Knobs (environment): CASES, IMPLS, SPEEDS (';'-separated NAME=JSON), STEPS, BUDGET, E2E_STEPS,
# TINY=1 (tiny configs: a dry run of this script on a CPU).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
start=$(date +%s)
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, diffusers, peft, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_capability())" >> "$OUT/gpu.txt" || exit 1
cat "$OUT/gpu.txt"

# 2. the trainer on the GPU, tiny pipeline: bf16 steps, render, export
python3 -m train.tiny --out weights >/dev/null && \
python3 -m train --spec examples/demo-spec.json --data examples/sample-dataset --out /tmp/train-tiny \
  --set steps=20 --set speed.compile=blocks --set speed.fuse_qkv=on --set speed.fuse_lora=on --set speed.fp8_base=on > "$OUT/train-tiny.log" 2>&1
echo "tiny GPU training: exit $? ($(grep -c '"phase": "train"' "$OUT/train-tiny.log") progress lines)" | tee -a "$OUT/gpu.txt"
tail -n 3 "$OUT/train-tiny.log"

# 2b. LoKr / LoHa: the factored layers against peft's own and a LoRA's at full-size Flux shapes
#     (bf16 autocast), and a tiny LoKr training under compile (factor 4: the tiny layers are 32 wide)
python3 -m bench.adapters --repeat 10 2>&1 | tee "$OUT/adapters.log"
python3 -m train --spec examples/demo-spec.json --data examples/sample-dataset --out /tmp/train-lokr \
  --set steps=20 --set speed.compile=blocks --set lora.type=lokr --set lora.factor=4 > "$OUT/train-lokr.log" 2>&1
echo "tiny GPU LoKr training: exit $?" | tee -a "$OUT/gpu.txt"

# 3. the benchmark
CASES=${CASES:-flux1024,flux512,sdxl1024,flux1024-44g}
IMPLS=${IMPLS:-stock,project}
[ -n "${SPEEDS:-}" ] || SPEEDS='exact={"compile": "blocks", "fuse_qkv": "on", "fuse_lora": "on"};fp8={"compile": "blocks", "fuse_qkv": "on", "fuse_lora": "on", "fp8_base": "on"}'
[ -n "${E2E_SPEED:-}" ] || E2E_SPEED='{"compile": "blocks", "fuse_qkv": "on", "fuse_lora": "on"}'
used=$(( $(date +%s) - start ))
e2e_reserve=0
[ "${E2E_STEPS:-0}" -gt 0 ] && e2e_reserve=${E2E_BUDGET:-300}
BUDGET=${BUDGET:-$(( 560 - used - e2e_reserve ))}
speed_args=()
tiny=()
[ "${TINY:-0}" = 1 ] && tiny=(--tiny)
IFS=';' read -ra variants <<< "$SPEEDS"
for v in "${variants[@]}"; do speed_args+=(--speed "$v"); done
python3 -m bench "${tiny[@]}" --cases "$CASES" --impls "$IMPLS" "${speed_args[@]}" --steps "${STEPS:-10}" --budget "$BUDGET" \
  --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"

# 4. the end-to-end job: 1000 steps need about 7 minutes, a call of their own; E2E_STEPS=300 fits
#    beside the benchmark (E2E_BUDGET seconds are kept for it) and prints the 1000-step extrapolation
if [ "${E2E_STEPS:-0}" -gt 0 ]; then
  python3 -m bench.e2e "${tiny[@]}" --steps "$E2E_STEPS" --speed "$E2E_SPEED" \
    --json "$OUT/e2e.json" 2>&1 | grep -v '^PROGRESS' | tee "$OUT/e2e.log"
fi
echo "device.sh: $(( $(date +%s) - start )) s"
