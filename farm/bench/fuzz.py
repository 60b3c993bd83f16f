"""farm bench fuzz: property-based compiles of the quantized lowerings with a table installed.

    farm bench fuzz --examples 100        random layers, configs and tables; every case must compile,
                                          match eager, and follow the lookup policy

A case is one weight-only-quantized layer (int8 or int4; random M, N, K within what eager
accepts; group size; activation dtype; 2-D, 3-D or row-sliced input), compiled under one
config (dynamic True/False/automatic, max-autotune, freezing) with a table whose entry hits
the exact key, a nearby M, or nothing of this layer. The properties checked per case:
  - the compile never raises and no farm lowering failed behind its boundary (no KernelFarmWarning);
  - the output matches eager within the dtype's tolerance (also on automatic dynamic's second call);
  - each decision follows the lookup policy for its key (the table's winner, or a documented
    fallback to Inductor), and where the table has nothing to say every decision is Inductor's.

hypothesis generates the cases (the test extra): a fixed seed in CI (tests/test_lowering_fuzz.py),
any number of examples here. Each case compiles its own code object under its own file name
(Dynamo's automatic-dynamic state is keyed by file name) with Inductor's caches disabled, so
every lowering runs and is counted (INDUCTOR_NOTES "Traps").
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch

from farm.errors import UserError
from farm.measure.compiled import TOLERANCE, relative_error
from farm.measure.problem import Problem, make_operands
from farm.render import emit

GROUP_SIZES = (32, 64, 128, 256)
TABLE_MODES = ("exact", "nearest", "none")
_counter = itertools.count()


@dataclass(frozen=True)
class Case:
    op: str
    dtype: str
    batch: int  # 1: a 2-D input [M, K]; more: a 3-D input [batch, seq, K] (M = batch * seq)
    seq: int
    n: int
    k: int
    group_size: int | None
    pad: int  # >0: a row-sliced activation (row stride K + pad), as eager accepts
    literal_k: bool  # reshape(-1, K) with K a literal (K static) or x.shape[-1] (K may go symbolic)
    dynamic: bool | None  # None: automatic (a second call with seq2 makes M dynamic)
    seq2: int
    max_autotune: bool
    freezing: bool
    table: str  # exact, nearest (entry at M=other_m), none (an entry of another layer only)
    winner: str
    nearest_m_ok: bool
    other_m: int

    @property
    def m(self) -> int:
        return self.batch * self.seq


@dataclass
class Outcome:
    case: Case
    problems: list[str] = field(default_factory=list)
    decisions: list[tuple] = field(default_factory=list)
    seconds: float = 0.0


def _winners(op: str, threads: int) -> list[str]:
    """Table winners a case may name (valid for this thread count)."""
    common = ["aten", "cpp", "cpp[cb=1,4,16]", f"cpp[tf=1,{threads},1]", f"cpp[tf={threads},1,1;ks=1]",
              "dq", "dq[fp32]", "dq[bf16]"]
    return common + (["cpp[nt=1]"] if threads > 1 else [])


def cases(threads: int | None = None):
    """The hypothesis strategy of cases (imported lazily: hypothesis is a test dependency)."""
    from hypothesis import strategies as st

    threads = threads or torch.get_num_threads()

    @st.composite
    def case(draw) -> Case:
        op = draw(st.sampled_from(("int8", "int4")))
        group = draw(st.sampled_from(GROUP_SIZES)) if op == "int4" else None
        # eager's constraints: int4 needs N % 16 == 0 and K % group == 0; int8 takes any N, K.
        dtype = draw(st.sampled_from(("bf16", "fp16", "fp32")))
        n = 16 * draw(st.integers(1, 24)) if op == "int4" else draw(st.integers(1, 384))
        if op == "int4":
            k = group * draw(st.integers(1, 1024 // group))
        elif dtype == "bf16":  # eager's bf16 int8 kernel segfaults on AVX2 for K % 8 != 0 (torch 2.13)
            k = 8 * draw(st.integers(1, 64))
        else:
            k = draw(st.integers(1, 512))
        batch = draw(st.sampled_from((1, 1, 2, 3)))
        seq = draw(st.integers(1, 96 // batch))
        return Case(
            op=op, dtype=dtype, batch=batch, seq=seq, n=n, k=k,
            group_size=group, pad=draw(st.sampled_from((0, 0, 0, 8))) if batch == 1 else 0, literal_k=draw(st.booleans()),
            dynamic=draw(st.sampled_from((True, False, None))),
            seq2=draw(st.integers(1, 96 // batch).filter(lambda s: s != seq)),
            max_autotune=draw(st.booleans()), freezing=draw(st.booleans()),
            table=draw(st.sampled_from(TABLE_MODES)), winner=draw(st.sampled_from(_winners(op, threads))),
            nearest_m_ok=draw(st.booleans()), other_m=draw(st.sampled_from((1, 4, 16, 64, 256)).filter(lambda m: m != batch * seq)),
        )

    return case()


def _table(case: Case, path: str) -> str:
    """A table for this host whose entry hits the case's key, a nearby M, or another layer."""
    import yaml

    import kernels
    from kernels.provenance import template_hash, threads_hash, torch_version

    m = {"exact": case.m, "nearest": case.other_m, "none": case.other_m}[case.table]
    n = case.n if case.table != "none" else case.n + 16  # another layer's N: nothing to say here
    entry = {
        "key": {"op": case.op, "dtype": case.dtype, "m": m, "n": n, "k": case.k, "group_size": case.group_size},
        "winner": case.winner, "speedup_vs_aten": 1.2, "nearest_m_ok": case.nearest_m_ok,
        "provenance": {"torch": torch_version(), "template_hash": template_hash(), "threads_hash": threads_hash()},
    }
    entries = [entry]
    # Nearest-M answers only between measured M buckets: a second bucket on the case's other side
    # (none below M=1, where the case stays outside the measured range).
    if case.table == "nearest" and (case.other_m < case.m or case.m > 1):
        other = case.m * 2 if case.other_m < case.m else case.m // 2
        entries.append({**entry, "key": {**entry["key"], "m": other}})
    doc = {"schema": "kernel-farm/table/1", "isa": kernels.host_isa(), "threads": torch.get_num_threads(),
           "emulated": False, "torch": torch_version(), "template_hash": template_hash(), "entries": entries}
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(doc, f)
    return path


def _module(case: Case, tag: int) -> torch.nn.Module:
    """The layer, its forward a new code object under a file name of its own."""
    call = ("torch._weight_int8pack_mm(h, self.w, self.s)" if case.op == "int8"
            else f"torch._weight_int4pack_mm_for_cpu(h, self.w, {case.group_size}, self.s)")
    # x.shape[-1], not a literal: dynamic shapes may then make K symbolic, as in a real model.
    rows = f"x[..., :{case.k}]" if case.pad else "x"  # a row-sliced activation: row stride K + pad
    k = case.k if case.literal_k else f"{rows}.shape[-1]"
    source = (f"def forward(self, x):\n    h = {rows}.reshape(-1, {k})\n    y = {call}\n"
              "    return y.reshape(*x.shape[:-1], y.shape[-1])\n")
    namespace: dict = {"torch": torch}
    exec(compile(source, f"<fuzz-{tag}>", "exec"), namespace)
    cls = type(f"FuzzLayer{tag}", (torch.nn.Module,), {"forward": namespace["forward"]})
    operands = make_operands(Problem(case.op, case.dtype, 1, case.n, case.k, case.group_size), seed=tag)
    module = cls()
    module.register_buffer("w", operands.weight)
    module.register_buffer("s", operands.scales)
    return module.eval()


def _input(case: Case, seq: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[case.dtype]
    shape = (seq, case.k + case.pad) if case.batch == 1 else (case.batch, seq, case.k)
    return torch.randn(*shape, generator=gen).to(dtype)


def _policy_problems(case: Case, table_path: str, decisions: list) -> list[str]:
    """Each decision against the lookup policy for its own key."""
    from kernels.table import load, lookup

    table = load(table_path)
    problems = []
    if not decisions:
        problems.append("no lowering decision recorded (was a cached graph served?)")
    for d in decisions:
        key, got = d.key, (d.candidate, d.source)
        if "lowering failed" in d.note:
            problems.append(f"the farm's lowering failed: {d.note}")
            continue
        if (key.op, key.dtype, key.group_size) != (case.op, case.dtype, case.group_size) or key.n not in (case.n, None):
            problems.append(f"decision for an unexpected key {key}")
            continue
        if key.n is None or key.k is None:
            if got != (None, "inductor") or "symbolic" not in d.note:
                problems.append(f"symbolic N/K must decline to Inductor, got {got} ({d.note})")
            continue
        want, source, _ = lookup(table, key.op, key.dtype, key.m, key.n, key.k, key.group_size)
        fallback = got == (None, "inductor") and ("unsupported here" in d.note or "rejected" in d.note)
        if want is None and got != (None, "inductor"):
            problems.append(f"table has nothing to say for {key}, but the lowering chose {got}")
        elif want is not None and got != (want.id, source) and not fallback:
            problems.append(f"{key}: policy says {(want.id, source)}, lowering did {got} ({d.note})")
    if case.table == "none" and any(d.source != "inductor" or d.candidate for d in decisions):
        problems.append("table without this layer, yet a decision is not Inductor's")
    return problems


def check_case(case: Case, tag: int | None = None) -> Outcome:
    """Compile and run one case; the outcome lists every property it broke (empty: all held)."""
    import kernels
    from kernels import lowering
    from torch._inductor import config

    outcome, start = Outcome(case), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kernel-farm-fuzz-") as tmp:
        table = _table(case, os.path.join(tmp, "table.yaml"))
        module = _module(case, next(_counter) if tag is None else tag)
        calls = [_input(case, case.seq, 1)] + ([_input(case, case.seq2, 2)] if case.dynamic is None else [])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with kernels.installed(table, strict=True), torch.no_grad(), config.patch(
                        freezing=case.freezing, max_autotune=case.max_autotune, force_disable_caches=True):
                    lowering.clear_decisions()
                    compiled = torch.compile(module, dynamic=case.dynamic)
                    for x in calls:
                        _compare(case, compiled(x), module(x), outcome)
                    decisions = lowering.decisions()
            except Exception as exc:  # a finding, not a crash of the fuzzer
                outcome.problems.append(f"compile or run raised {type(exc).__name__}: {str(exc).strip()[:400]}")
                decisions = lowering.decisions()
        outcome.problems += [f"KernelFarmWarning: {w.message}" for w in caught
                             if issubclass(w.category, kernels.KernelFarmWarning)]
        if not any(p.startswith("compile or run raised") for p in outcome.problems):
            outcome.problems += _policy_problems(case, table, decisions)
        outcome.decisions = [(d.key.m, d.key.n, d.key.k, d.candidate, d.source, d.note) for d in decisions]
    outcome.seconds = time.perf_counter() - start
    return outcome


_PRELOAD = ["torch._dynamo", "torch._inductor.compile_fx", "torch._inductor.lowering", "kernels.lowering",
            "farm.bench.fuzz"]


def _context():
    """A forkserver: one clean process (no OpenMP pool, whatever the caller ran) forks each case."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # imports once, not per case
    return ctx


def _child(case: Case, tag: int, threads: int, conn) -> None:
    torch.set_num_threads(threads)
    try:
        outcome = check_case(case, tag)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as the case's problem
        outcome = Outcome(case, [f"fuzzer error {type(exc).__name__}: {exc}"[:500]])
    conn.send(outcome)
    conn.close()


def isolated(case: Case, timeout_s: int = 600, threads: int | None = None) -> Outcome:
    """check_case in a child process: a segfault or hang in a kernel (eager's or compiled) is a
    finding of that case, not the end of the run."""
    ctx = _context()
    tag = next(_counter)  # numbered here: every child's code object gets a file name of its own
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(case, tag, threads or torch.get_num_threads(), writer), daemon=True)
    proc.start()
    writer.close()
    try:
        if reader.poll(timeout_s):
            return reader.recv()
    except EOFError:
        pass  # the child died before sending
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    cause = f"exit code {proc.exitcode}" if proc.exitcode is not None else f"no answer in {timeout_s} s"
    return Outcome(case, [f"the process died ({cause}) compiling or running this case"])


def _compare(case: Case, out: torch.Tensor, ref: torch.Tensor, outcome: Outcome) -> None:
    if out.shape != ref.shape or out.dtype != ref.dtype:
        outcome.problems.append(f"output {tuple(out.shape)} {out.dtype}, eager {tuple(ref.shape)} {ref.dtype}")
        return
    error = relative_error(out, ref)
    if not error <= TOLERANCE[case.dtype]:
        outcome.problems.append(f"relative error {error:.3g} over the {case.dtype} tolerance {TOLERANCE[case.dtype]}")


def run(examples: int, seed: int = 0, on_case=None) -> list[Outcome]:
    """`examples` generated cases, each checked; never stops at a failing one (no shrinking)."""
    try:
        from hypothesis import HealthCheck, Phase, given, settings
        from hypothesis import seed as fixed_seed
    except ImportError:
        raise UserError("farm bench fuzz needs hypothesis: pip install 'kernel-farm[test]'") from None
    outcomes: list[Outcome] = []

    @fixed_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(cases())
    def one(case: Case) -> None:
        outcomes.append(isolated(case))
        if on_case:
            on_case(outcomes[-1])

    one()
    return outcomes


def report(outcomes: list[Outcome]) -> dict:
    from collections import Counter

    failed = [o for o in outcomes if o.problems]
    # What the cases exercised: each decision's source, and why Inductor got the op.
    sources = Counter(d[4] for o in outcomes for d in o.decisions)
    reasons = Counter(d[5].split(":")[0][:60] for o in outcomes for d in o.decisions if d[3] is None)
    return {"examples": len(outcomes), "failed": len(failed), "seconds": round(sum(o.seconds for o in outcomes), 1),
            "sources": dict(sources), "inductor_because": dict(reasons),
            "failures": [{"case": asdict(o.case), "problems": o.problems, "decisions": o.decisions} for o in failed]}


def render(report: dict, console) -> None:
    for failure in report["failures"]:
        console.print(f"[red]FAIL[/red] {failure['case']}")
        for problem in failure["problems"]:
            console.print(f"    {problem}", markup=False)
    console.print(f"decision sources {report['sources']}; to Inductor because {report['inductor_because']}", markup=False)
    console.print(f"{report['examples']} cases, {report['failed']} failed, {report['seconds']} s compiling and running")


def cmd_fuzz(args) -> int:
    from rich.console import Console

    torch.set_num_threads(args.threads or torch.get_num_threads())
    progress = Console(stderr=True)
    outcomes = run(args.examples, args.seed, lambda o: progress.print(
        f"{'FAIL' if o.problems else 'ok'} {o.seconds:5.1f}s {o.case}", markup=False))
    result = report(outcomes)
    emit(result, args.json, render)
    return 1 if result["failed"] else 0


def register(sub) -> None:
    p = sub.add_parser("fuzz", help="property-based compiles of the quantized lowerings with a table installed")
    p.add_argument("--examples", type=int, default=100, help="cases to generate (CI runs 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_fuzz)
