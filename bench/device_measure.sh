#!/usr/bin/env bash
# Measure on a lent machine's host CPU (another real ISA, e.g. AMX) with the project's own code
# and the python3 found there (no venv, nothing fetched). Gives data within minutes even on a
# host that is slow to start, and says where the time went when it does not:
#   $OUT/phases.log          timestamped phases of this script (imports, host profile, problems)
#   $OUT/worker-phases.jsonl every event of every measurement worker, timestamped (imported,
#                            host, each compile, each compiled, each timing round, timed)
#   $OUT/records.jsonl       one record per finished problem, appended as each finishes
#   $OUT/tables/             the table aggregated from the records
#   $OUT/check.jsonl         end-to-end check of each measured key: `farm bench kernels` with that
#                            table against Inductor's default, max-autotune and the oracle, one
#                            JSON report per key, appended as each finishes
#   $OUT/machine.txt (torch, lscpu, host profile), err.log
# SEED_RECORDS: records of an earlier run on the same host, aggregated and checked after the new.
# At most 8 files come back from a lent machine: keep it at these seven.
# Starts with one problem on the minimal grid, then the real ones; never starts a problem it
# cannot finish inside MEASURE_BUDGET_S, then checks the keys measured until BUDGET_S.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" RAY_AUTH_MODE=disabled
# Inductor builds a test program per vector ISA before it trusts one; on the lent AMX host every
# process spent 48-52 s in the host profile, 31-34 s with this (docs/amx/README.md). The host's
# cpuinfo flags still decide which ISAs are listed; this only skips the build check.
export TORCHINDUCTOR_VEC_ISA_OK=${TORCHINDUCTOR_VEC_ISA_OK:-1}
OUT=${OUT:-/tmp/farm-device}; mkdir -p "$OUT"
export FARM_PHASE_LOG="$OUT/worker-phases.jsonl"
BUDGET_S=${BUDGET_S:-540}
MEASURE_BUDGET_S=${MEASURE_BUDGET_S:-330}
MIN_PROBLEM_S=${MIN_PROBLEM_S:-45}   # below this, a problem cannot compile and time its candidates
start=$(date +%s)
phase() { echo "$(date -u +%FT%T.%3NZ) +$(( $(date +%s) - start ))s $*" | tee -a "$OUT/phases.log"; }

phase "start: budget ${BUDGET_S}s"
python3 -c "import time; t=time.time(); import torch; print('torch', torch.__version__, torch.backends.cpu.get_cpu_capability(), f'import {time.time()-t:.1f}s')" > "$OUT/machine.txt" 2>&1
lscpu >> "$OUT/machine.txt" 2>&1
phase "torch imported: $(head -1 "$OUT/machine.txt")"
# Where the host profile's 31-52 s per process went on the AMX host was not found: time each of
# its steps once here (a few seconds where they are fast), so the next lease says which.
python3 - >> "$OUT/phases.log" 2>> "$OUT/err.log" <<'PY'
import time
t = time.time()
def step(name):
    global t
    now = time.time(); print(f"  host-profile step {name}: {now - t:.2f}s", flush=True); t = now
import torch; step("import torch")
import torch._inductor.config; step("import torch._inductor.config")
from torch._inductor.cpu_vec_isa import pick_vec_isa, valid_vec_isa_list; step("import cpu_vec_isa")
import os; torch.set_num_threads(os.cpu_count()); step("torch.set_num_threads()")
torch.cpu.get_capabilities(); step("torch.cpu.get_capabilities()")
valid_vec_isa_list(); step("valid_vec_isa_list()")
pick_vec_isa(); step("pick_vec_isa()")
from farm.measure import host; step("import farm.measure.host")
host.host_id(); step("host_id()")
host.profile(); step("profile() (cached parts again)")
print(f"  cuda visible: {torch.cuda.is_available()}", flush=True); step("torch.cuda.is_available()")
PY
phase "host profile steps timed (phases.log)"
HOST_JSON=/tmp/farm-host.json
python3 -m farm.cli host --json > "$HOST_JSON" 2>> "$OUT/err.log"
cat "$HOST_JSON" >> "$OUT/machine.txt"
THREADS=$(python3 -c "import json; print(json.load(open('$HOST_JSON'))['threads'])" 2>> "$OUT/err.log")
phase "host profile: $(grep -o '"isa": "[^"]*"' "$HOST_JSON") $(grep -o '"cores": [0-9]*' "$HOST_JSON") threads $THREADS"
# Llama-3.2-1B layers, the first on the minimal grid (proves the whole path works on this host),
# then qkv, gate_up and down at decode (M=1) and prefill (M=128) sizes; int8 and int4.
# "op m n k grid"
DEFAULT_PROBLEMS="int8 1 2048 2048 minimal;int8 1 3072 2048 pruned;int8 128 3072 2048 pruned;int4 1 3072 2048 pruned;int4 128 3072 2048 pruned;int8 1 16384 2048 pruned;int8 128 16384 2048 pruned;int8 1 2048 8192 pruned;int4 1 16384 2048 pruned;int8 128 2048 8192 pruned"
IFS=';' read -ra PROBLEM_LIST <<< "${PROBLEMS:-$DEFAULT_PROBLEMS}"
for p in "${PROBLEM_LIST[@]}"; do
  set -- $p
  left=$(( MEASURE_BUDGET_S - ($(date +%s) - start) ))
  if [ "$left" -lt "$MIN_PROBLEM_S" ]; then phase "budget: ${left}s left, not starting $p"; continue; fi
  limit=$(( left < ${MEASURE_TIMEOUT_S:-240} ? left : ${MEASURE_TIMEOUT_S:-240} ))
  weights=warm; [ "$2" -le 16 ] && weights=model  # decode: evicted weights, as a model's step reads them
  group=""; [ "$1" = int4 ] && group="--group-size 128"
  phase "problem $p ($weights weights, at most ${limit}s)"
  echo "{\"utc\": \"$(date -u +%FT%T)\", \"ev\": \"problem\", \"problem\": \"$p\"}" >> "$FARM_PHASE_LOG"
  if timeout "$limit" python3 -m farm.cli measure --op "$1" -m "$2" -n "$3" -k "$4" $group --grid "${5:-pruned}" \
      --weights "$weights" --rounds 11 --threads "$THREADS" --json ${CANDIDATES:+--candidates "$CANDIDATES"} > /tmp/farm-record.tmp 2>> "$OUT/err.log"; then
    cat /tmp/farm-record.tmp >> "$OUT/records.jsonl"; echo >> "$OUT/records.jsonl"
    phase "done $p: winner $(grep -o '"winner": "[^"]*"' /tmp/farm-record.tmp | tail -1 | cut -d'"' -f4)"
  else
    phase "measure failed or timed out: $p (last worker event: $(tail -1 "$FARM_PHASE_LOG" | cut -c1-200))"
  fi
done
[ -n "${SEED_RECORDS:-}" ] && grep -h . $SEED_RECORDS >> "$OUT/records.jsonl"
if [ -s "$OUT/records.jsonl" ]; then
  python3 -m farm.cli aggregate "$OUT/records.jsonl" --out "$OUT/tables" 2>> "$OUT/err.log"
  python3 -m farm.cli table show "$OUT"/tables/*.yaml 2>> "$OUT/err.log"
  table=$(ls "$OUT"/tables/*.yaml | head -1)
  # One spec per measured key, so that each check's report lands before the next begins (in a
  # fresh directory: specs left by an earlier run on this machine are not this run's keys).
  checks=$(mktemp -d /tmp/farm-checks-XXXXXX)
  python3 - "$OUT/records.jsonl" "$checks" <<'PY' 2>> "$OUT/err.log"
import json, sys, yaml
for i, line in enumerate(l for l in open(sys.argv[1]) if l.strip()):
    p = json.loads(line)["problem"]
    entry = {"model": "check", "layers": {"layer": [p["n"], p["k"]]}, "ops": [p["op"]], "dtypes": [p["dtype"]],
             "m": [p["m"]], "weights": [p["weights"]]}
    if p.get("group_size"):
        entry["group_size"] = p["group_size"]
    spec = {"name": f"device-check-{i}", "isa": ["host"], "threads": [p["threads"]], "space": "minimal", "problems": [entry]}
    yaml.safe_dump(spec, open(f"{sys.argv[2]}/{i:03d}.yaml", "w"))
PY
  for spec in "$checks"/*.yaml; do
    left=$(( BUDGET_S - ($(date +%s) - start) ))
    if [ "$left" -lt "$MIN_PROBLEM_S" ]; then phase "budget: ${left}s left, not checking $spec"; continue; fi
    phase "check $spec against $table (at most ${left}s)"
    if timeout "$left" python3 -m farm.cli bench kernels --shapes "$spec" --table "$table" --grid minimal \
        --threads "$THREADS" --json > /tmp/farm-check.tmp 2>> "$OUT/err.log"; then
      # One line per report into check.jsonl; its summary to the phase log.
      phase "checked $spec: $(python3 - "$OUT/check.jsonl" <<'PY'
import json, sys
report = json.load(open("/tmp/farm-check.tmp"))
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(report) + "\n")
r = report["rows"][0]
print("table/default", round(r["variants"]["table"]["speedup_vs_default"], 3), "table/MA", round(r["table_vs_max_autotune"], 3),
      "oracle", r["oracle"]["id"], round(r["oracle"]["speedup_vs_default"], 3))
PY
)"
    else
      phase "check failed or timed out: $spec"
    fi
  done
fi
phase "end"
tail -5 "$OUT/err.log"
