#!/usr/bin/env bash
# Measure on a lent machine's host CPU (another real ISA, e.g. AMX) with the project's own code
# and the python3 found there (no venv, nothing fetched). Gives data within minutes even on a
# host that is slow to start, and says where the time went when it does not:
#   $OUT/phases.log          timestamped phases of this script (imports, host profile, problems)
#   $OUT/worker-phases.jsonl every event of every measurement worker, timestamped (imported,
#                            host, each compile, each compiled, each timing round, timed)
#   $OUT/records.jsonl       one record per finished problem, appended as each finishes
#   $OUT/tables/, host.json, machine.txt, err.log
# Starts with one small problem on the minimal grid, then the real ones; never starts a problem
# it cannot finish inside BUDGET_S (each gets at most the time left).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" RAY_AUTH_MODE=disabled
OUT=${OUT:-/tmp/farm-device}; mkdir -p "$OUT"
export FARM_PHASE_LOG="$OUT/worker-phases.jsonl"
BUDGET_S=${BUDGET_S:-420}
MIN_PROBLEM_S=${MIN_PROBLEM_S:-45}   # below this, a problem cannot compile and time its candidates
start=$(date +%s)
phase() { echo "$(date -u +%FT%T.%3NZ) +$(( $(date +%s) - start ))s $*" | tee -a "$OUT/phases.log"; }

phase "start: budget ${BUDGET_S}s"
python3 -c "import time; t=time.time(); import torch; print('torch', torch.__version__, torch.backends.cpu.get_cpu_capability(), f'import {time.time()-t:.1f}s')" > "$OUT/machine.txt" 2>&1
lscpu >> "$OUT/machine.txt" 2>&1
phase "torch imported: $(head -1 "$OUT/machine.txt")"
python3 -m farm.cli host --json > "$OUT/host.json" 2>> "$OUT/err.log"
phase "host profile: $(grep -o '"isa": "[^"]*"' "$OUT/host.json") $(grep -o '"cores": [0-9]*' "$OUT/host.json")"
# First a small problem on the minimal grid (proves the whole path works on this host), then
# Llama-3.2-1B layers (qkv, gate_up, down) at decode and prefill sizes; int8 and int4.
# "op m n k grid"
DEFAULT_PROBLEMS="int8 32 1024 1024 minimal;int8 1 3072 2048 pruned;int4 1 3072 2048 pruned;int8 128 3072 2048 pruned;int4 128 3072 2048 pruned;int8 16 16384 2048 pruned;int4 16 16384 2048 pruned;int8 512 2048 8192 pruned;int8 1 2048 8192 pruned;int4 1 2048 8192 pruned"
IFS=';' read -ra PROBLEM_LIST <<< "${PROBLEMS:-$DEFAULT_PROBLEMS}"
for p in "${PROBLEM_LIST[@]}"; do
  set -- $p
  left=$(( BUDGET_S - ($(date +%s) - start) ))
  if [ "$left" -lt "$MIN_PROBLEM_S" ]; then phase "budget: ${left}s left, not starting $p"; continue; fi
  limit=$(( left < ${MEASURE_TIMEOUT_S:-240} ? left : ${MEASURE_TIMEOUT_S:-240} ))
  weights=warm; [ "$2" -le 16 ] && weights=cold
  group=""; [ "$1" = int4 ] && group="--group-size 128"
  phase "problem $p ($weights weights, at most ${limit}s)"
  echo "{\"utc\": \"$(date -u +%FT%T)\", \"ev\": \"problem\", \"problem\": \"$p\"}" >> "$FARM_PHASE_LOG"
  if timeout "$limit" python3 -m farm.cli measure --op "$1" -m "$2" -n "$3" -k "$4" $group --grid "${5:-pruned}" \
      --weights "$weights" --rounds 11 --json ${CANDIDATES:+--candidates "$CANDIDATES"} > "$OUT/record.tmp" 2>> "$OUT/err.log"; then
    cat "$OUT/record.tmp" >> "$OUT/records.jsonl"; echo >> "$OUT/records.jsonl"
    phase "done $p: winner $(grep -o '"winner": "[^"]*"' "$OUT/record.tmp" | tail -1 | cut -d'"' -f4)"
  else
    phase "measure failed or timed out: $p (last worker event: $(tail -1 "$FARM_PHASE_LOG" | cut -c1-200))"
  fi
done
if [ -s "$OUT/records.jsonl" ]; then
  python3 -m farm.cli aggregate "$OUT/records.jsonl" --out "$OUT/tables" 2>> "$OUT/err.log"
  python3 -m farm.cli table show "$OUT"/tables/*.yaml 2>> "$OUT/err.log"
fi
phase "end"
tail -5 "$OUT/err.log"
