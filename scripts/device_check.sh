#!/usr/bin/env bash
# The GPU check, prepared to run in at most 8 minutes on one H100-class GPU:
#   1. the CUDA-marked tests (pytest -m cuda);
#   2. a single run's training tokens/s and MFU (against the GPU's bf16 matmul peak measured in the
#      same process) vs the seed recipe, and generation/evaluation vs plain generate/forward
#      (scripts/bench.py), and the same step with training.torch_compile=true and with eager attention
#      (training.attention=eager: the CPUs' default; auto keeps the model's own SDPA on a GPU);
#   3. sweeps/pack_small.yaml alone vs shared, with training.pack_forward=turns and =concat
#      (scripts/bench.py --sweep);
#   4. a padding-free (packed) step against the padded one (scripts/bench.py --packing): on a GPU
#      flex_attention has a backward and SDPA's kernels take the per-row mask, unlike on CPUs
#      (not in a --quick dry run).
# Everything lands in one JSON (default device-check.json; the parts in device-check/).
#
#   bash scripts/device_check.sh                         # on the GPU machine: SmolLM2, the bundled sample
#   bash scripts/device_check.sh --device cpu --model tiny-llama --quick   # a dry run anywhere (the suite runs it)
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
MODEL=smollm2-135m
OUT=device-check.json
QUICK=0
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --model) MODEL="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --quick) QUICK=1; shift ;;
        *) echo "error: unknown argument $1 (use --device, --model, --out, --quick)" >&2; exit 2 ;;
    esac
done
PY="${PYTHON:-python}"
PARTS="${OUT%.json}"
mkdir -p "$PARTS"
rm -f "$PARTS"/*.status.json  # an earlier check's parts: the summary reads the parts of this one
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline SOFTPROMPT_QUIET=1
STARTED=$(date +%s)

# each part has a time limit, so the whole check ends in time even when one part hangs
part() {  # part NAME SECONDS COMMAND...
    local name="$1" limit="$2"; shift 2
    local t0=$(date +%s)
    timeout "$limit" "$@" > "$PARTS/$name.log" 2>&1
    local rc=$?
    echo "{\"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}" > "$PARTS/$name.status.json"
    echo "[device_check] $name: rc $rc in $(( $(date +%s) - t0 )) s" >&2
}

if [ "$QUICK" = 1 ]; then
    STEPS=(--steps 2 --gen-tokens 4 --max-samples 20)
    SWEEP_SET=(model="$MODEL" dataset=prompts_sample dataset.max_samples=20 training.max_length=24
               eval.max_new_tokens=4 eval.num_heldout_generations=0 eval.train_perplexity_rows=4 wandb.mode=disabled)
    TESTS=(tests/test_device.py)
    VARIANTS=()
    PACK_LIMIT=300  # the four parts share the CPU side by side: slow under load, and nothing is timed
else
    STEPS=()
    SWEEP_SET=(model="$MODEL" dataset=prompts_sample wandb.mode=disabled)
    TESTS=(tests)
    # training.torch_compile's step (compile time in its warmup_step_s) against the eager default,
    # and eager attention in the step (auto's choice on CPUs) against SDPA's (auto's choice here)
    VARIANTS=(--variant compiled:training.torch_compile=true --variant eager_attention:training.attention=eager)
    PACK_LIMIT=120
fi

tests() {
    if [ "$DEVICE" = cuda ]; then
        part tests 150 "$PY" -m pytest -q -p no:cacheprovider -m cuda "${TESTS[@]}"
    else  # no CUDA here: the CUDA tests only collect (they skip without a GPU)
        part tests 150 "$PY" -m pytest -q -p no:cacheprovider -m cuda --collect-only "${TESTS[@]}"
    fi
}
single() {
    part single 300 "$PY" scripts/bench.py --model "$MODEL" --device "$DEVICE" "${STEPS[@]}" "${VARIANTS[@]}" \
        --out "$PARTS/single.json"
}
packing() {
    part packing 120 "$PY" scripts/bench.py --packing --model "$MODEL" --device "$DEVICE" "${STEPS[@]}" \
        --out "$PARTS/packing.json"
}
pack() {  # pack FORWARD: sweeps/pack_small.yaml alone vs shared with that pack forward
    part "pack-$1" "$PACK_LIMIT" "$PY" scripts/bench.py --sweep sweeps/pack_small.yaml --root "$PARTS/pack-$1-runs" \
        --out "$PARTS/pack-$1.json" "${SWEEP_SET[@]}" training.device="$DEVICE" training.pack_forward="$1"
}
if [ "$QUICK" = 1 ]; then  # a dry run: every part side by side (process start-up is most of a tiny bench)
    # (the packing bench is left out: tests/test_packing.py runs it, and a fifth process side by side
    # slows the suite's dry run by a minute)
    tests & single & pack turns & pack concat & wait
else  # timed: one after the other
    tests
    single
    pack turns
    pack concat
    packing
fi

"$PY" - "$PARTS" "$OUT" "$DEVICE" "$STARTED" <<'EOF'
import json, sys, time
from pathlib import Path

parts, out, device, started = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
result = {"device": device, "wall_s": round(time.time() - started, 1)}
names = [n for n in ("tests", "single", "pack-turns", "pack-concat", "packing") if (parts / f"{n}.status.json").is_file()]
for name in names:
    status = json.loads((parts / f"{name}.status.json").read_text())
    log = (parts / f"{name}.log").read_text(errors="replace").strip().splitlines()
    data = parts / f"{name}.json"
    result[name] = status | ({"result": json.loads(data.read_text())} if data.is_file() else {"log_tail": log[-15:]})
    if name == "tests":
        result[name]["summary"] = log[-1] if log else ""
single = result["single"].get("result", {})
compiled = single.get("variants", {}).get("compiled", {})  # absent in a --quick dry run
eager = single.get("variants", {}).get("eager_attention", {})
result["summary"] = {
    "device_name": single.get("device_name"), "ratio_vs_seed_recipe": single.get("ratio"), "mfu": single.get("mfu"),
    "generation_ratio_to_plain": single.get("generation_ratio_to_plain"),
    "eval_ratio_to_plain": single.get("eval_ratio_to_plain"),
    "torch_compile_speedup": 1 / compiled["speedup_of_default"] if compiled else None,
    "torch_compile_warmup_step_s": compiled.get("warmup_step_s"),
    "eager_attention_speedup": 1 / eager["speedup_of_default"] if eager else None,
    **{f"pack_{f}_ratio": result[f"pack-{f}"].get("result", {}).get("ratio") for f in ("turns", "concat")},
    **{f"pack_{f}_max_rel_diff": result[f"pack-{f}"].get("result", {}).get("max_rel_diff_eval_perplexity")
       for f in ("turns", "concat")},
    "packed_step_against_padded": result.get("packing", {}).get("result", {}).get("against_padded"),
    "packed_step_unavailable": result.get("packing", {}).get("result", {}).get("unavailable"),
}
out.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps(result["summary"], indent=2))
failed = [name for name in names if result[name]["rc"] != 0]
sys.exit(1 if failed else 0)
EOF
