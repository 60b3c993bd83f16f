#!/usr/bin/env bash
# Measure on a lent machine's host CPU (another real ISA) with the project's own code and the
# python3 found there (no venv, nothing fetched). Writes host.json, records.jsonl, tables/ and
# logs under $OUT. Time-boxed: stops starting new problems after BUDGET_S seconds.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" RAY_AUTH_MODE=disabled
OUT=${OUT:-/tmp/farm-device}; mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-420}
start=$(date +%s)
{ python3 -c "import torch; print('torch', torch.__version__, torch.backends.cpu.get_cpu_capability())"; lscpu; } > "$OUT/machine.txt" 2>&1
python3 -m farm.cli host --json > "$OUT/host.json" 2>> "$OUT/err.log"
cat "$OUT/host.json"
# Llama-3.2-1B layers (qkv, gate_up, down) at decode and prefill sizes; int8 and int4.
DEFAULT_PROBLEMS="int8 1 3072 2048;int4 1 3072 2048;int8 16 16384 2048;int4 16 16384 2048;int8 128 3072 2048;int4 128 3072 2048;int8 512 2048 8192;int8 1 2048 8192;int4 1 2048 8192;int8 128 16384 2048;int4 128 16384 2048"
IFS=';' read -ra PROBLEM_LIST <<< "${PROBLEMS:-$DEFAULT_PROBLEMS}"
for p in "${PROBLEM_LIST[@]}"; do
  set -- $p
  if [ $(( $(date +%s) - start )) -gt "$BUDGET_S" ]; then echo "budget spent: skipping $p"; continue; fi
  weights=warm; [ "$2" -le 16 ] && weights=cold
  echo "== $p ($weights)"
  timeout "${MEASURE_TIMEOUT_S:-240}" python3 -m farm.cli measure --op "$1" -m "$2" -n "$3" -k "$4" --weights "$weights" --rounds 11 --json ${CANDIDATES:+--candidates "$CANDIDATES"} \
      >> "$OUT/records.jsonl" 2>> "$OUT/err.log" || echo "measure failed: $p (see err.log)"
  tail -c 300 "$OUT/records.jsonl" | grep -o '"winner": "[^"]*"' | tail -1
done
python3 -m farm.cli aggregate "$OUT/records.jsonl" --out "$OUT/tables" 2>> "$OUT/err.log"
python3 -m farm.cli table show "$OUT"/tables/*.yaml 2>> "$OUT/err.log"
tail -5 "$OUT/err.log"
