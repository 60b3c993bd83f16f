"""Sweep specs (YAML under jobs/sweeps/): parsed and validated in full before anything runs.

    name: llm
    isa: [avx512, avx2]          # target ISA classes (avx2 may be emulated on AVX512 nodes),
                                 # or `host`: the classes this machine serves (its own, and
                                 # AVX2 emulated when it is AVX512 or AMX)
    threads: [2]                 # thread counts (default: [2])
    space: pruned                # or minimal, exhaustive
    candidates: [cpp]            # optional, instead of the space: ATen, its A/A control and these
    weights: [cold]              # warm and/or cold
    timeout_s: 300               # per candidate, without progress
    worker_memory_gb: 8          # what one measurement may use on a worker
    protocol: {min_rounds: 11}   # farm.measure.protocol.Protocol fields
    problems:
      - model: Llama-3.2-1B      # a name for the report
        layers: {q_proj: [2048, 2048], down_proj: [2048, 8192]}   # name: [N, K]
        ops: [int8, int4]
        dtypes: [bf16]
        m: [1, 32, 128]
        group_size: 128          # int4 only
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kernels.candidates import ATEN, AA_CONTROL, DTYPES, GRIDS, OPS, CandidateError, check_bounds, parse as parse_candidate
from kernels.candidates import space as candidate_space

from farm.errors import UserError
from farm.measure.host import ISA_CLASSES
from farm.measure.problem import WEIGHT_MODES, Problem, stack_size, validate
from farm.measure.protocol import Protocol

HOST = "host"  # stands for the classes the machine parsing the spec can serve
TOP_LEVEL = {"name", "isa", "threads", "space", "candidates", "weights", "timeout_s", "worker_memory_gb", "protocol", "problems", "description"}
PROBLEM_FIELDS = {"model", "layers", "fused", "ops", "dtypes", "m", "group_size", "weights", "isa"}


@dataclass(frozen=True)
class Task:
    """One unit of work: all candidates of one problem on one node of one ISA class."""

    problem: Problem
    isa: str
    label: str  # model.layer, for people
    extra: tuple[str, ...] = ()  # candidates measured besides the grid (e.g. a shipped winner)
    reason: str = ""  # why it is measured (nightly selection)

    @property
    def key(self) -> str:
        from farm.measure.store import problem_key

        return problem_key(self.problem.as_dict())


@dataclass
class Spec:
    name: str
    isa: list[str]
    space: str
    protocol: Protocol
    tasks: list[Task]
    worker_memory_gb: float
    raw: dict = field(default_factory=dict)
    candidates: tuple[str, ...] = ()  # measured with ATen and its control instead of the space's grid


def _list(value, where: str, kind=None) -> list:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise UserError(f"{where}: must not be empty")
    if kind is not None:
        for item in items:
            if not isinstance(item, kind) or isinstance(item, bool):
                raise UserError(f"{where}: {item!r} is not a {kind.__name__}")
    return items


def _choice(items: list, allowed, where: str) -> list:
    for item in items:
        if item not in allowed:
            raise UserError(f"{where}: unknown value {item!r} (expected one of {', '.join(map(str, allowed))})")
    return items


def _memory_bytes(p: Problem, candidates: int) -> int:
    """What one measurement holds: eager and per-candidate packed weights, activations, outputs,
    the cold-weight flush buffer (at most 1 GiB, see farm.measure.timing.make_flush), and in the
    model state each candidate's stack of weight copies."""
    copies = candidates * stack_size(p) + 1
    weights = p.weight_bytes * copies
    act = p.m * p.k * 4 + p.m * p.n * 4 * copies
    return weights + act + ((1 << 30) if p.flushed else 0)


def _candidates(doc: dict, threads: list[int], where: str) -> tuple[str, ...]:
    """The spec's `candidates` (empty: the space's grid), each a valid id at every thread count."""
    if "candidates" not in doc:
        return ()
    ids = _list(doc["candidates"], where, str)
    for cid in ids:
        try:
            for t in threads:
                check_bounds(parse_candidate(cid), t)
        except CandidateError as exc:
            raise UserError(f"{where}: {exc}") from None
    return tuple(dict.fromkeys(c for c in ids if c not in (ATEN, AA_CONTROL)))


def _layers(entry: dict, where: str) -> list[tuple[str, int, int]]:
    if "layers" not in entry and "model" in entry:  # a zoo model (or config.json) brings its own layers
        from farm.zoo.shapes import spec_layers

        return spec_layers(entry["model"], entry.get("fused", False), where)
    layers = entry.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise UserError(f"{where}.layers: must map layer names to [N, K]")
    out = []
    for name, nk in layers.items():
        if not (isinstance(nk, list) and len(nk) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in nk)):
            raise UserError(f"{where}.layers.{name}: must be [N, K] integers, got {nk!r}")
        out.append((str(name), nk[0], nk[1]))
    return out


def _resolve_host(isas: list[str]) -> list[str]:
    """`host` -> this machine's own class and the classes it can emulate (nothing else)."""
    if HOST not in isas:
        return isas
    from farm.measure.host import native_isa, runnable

    return list(dict.fromkeys(i for item in isas for i in (runnable(native_isa()) if item == HOST else [item])))


def parse_spec(doc, source: str = "spec") -> Spec:
    if not isinstance(doc, dict):
        raise UserError(f"{source}: expected a mapping at the top level")
    unknown = set(doc) - TOP_LEVEL
    if unknown:
        raise UserError(f"{source}: unknown field(s) {', '.join(sorted(unknown))}")
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise UserError(f"{source}.name: must be a non-empty string")
    isas = _resolve_host(_list(doc.get("isa", ["avx512"]), f"{source}.isa", str))
    _choice(isas, (*ISA_CLASSES, HOST), f"{source}.isa")
    threads = _list(doc.get("threads", [2]), f"{source}.threads", int)
    for t in threads:
        if not 1 <= t <= 1024:
            raise UserError(f"{source}.threads: {t} is outside 1..1024")
    grid = doc.get("space", "pruned")
    _choice([grid], GRIDS, f"{source}.space")
    only = _candidates(doc, threads, f"{source}.candidates")
    weights = _choice(_list(doc.get("weights", ["warm"]), f"{source}.weights", str), WEIGHT_MODES, f"{source}.weights")
    proto_raw = dict(doc.get("protocol") or {})
    if "timeout_s" in doc:
        if proto_raw.get("timeout_s", doc["timeout_s"]) != doc["timeout_s"]:  # two values, neither silently
            raise UserError(f"{source}.timeout_s: {doc['timeout_s']!r} conflicts with "
                            f"{source}.protocol.timeout_s: {proto_raw['timeout_s']!r} (give one)")
        proto_raw["timeout_s"] = doc["timeout_s"]
    protocol = Protocol.from_dict(proto_raw, f"{source}.protocol")
    memory_gb = doc.get("worker_memory_gb", 8)
    if not isinstance(memory_gb, (int, float)) or isinstance(memory_gb, bool) or memory_gb <= 0:
        raise UserError(f"{source}.worker_memory_gb: must be a positive number, got {memory_gb!r}")
    problems = doc.get("problems")
    if not isinstance(problems, list) or not problems:
        raise UserError(f"{source}.problems: must be a non-empty list")
    tasks: list[Task] = []
    for index, entry in enumerate(problems):
        where = f"{source}.problems[{index}]"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected a mapping")
        unknown = set(entry) - PROBLEM_FIELDS
        if unknown:
            raise UserError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        model = str(entry.get("model", f"problem{index}"))
        ops = _choice(_list(entry.get("ops", ["int8"]), f"{where}.ops", str), OPS, f"{where}.ops")
        dtypes = _choice(_list(entry.get("dtypes", ["bf16"]), f"{where}.dtypes", str), DTYPES, f"{where}.dtypes")
        ms = _list(entry.get("m"), f"{where}.m", int) if "m" in entry else None
        if ms is None:
            raise UserError(f"{where}.m: missing (the M buckets to measure)")
        group = entry.get("group_size")
        entry_weights = _choice(_list(entry.get("weights", weights), f"{where}.weights", str), WEIGHT_MODES, f"{where}.weights")
        entry_isas = _resolve_host(_list(entry.get("isa", isas), f"{where}.isa", str))
        _choice(entry_isas, isas, f"{where}.isa (must be among the spec's isa)")
        if "int4" in ops and group is None:
            raise UserError(f"{where}.group_size: int4 needs a group size")
        for layer, n, k in _layers(entry, where):
            for op in ops:
                for dtype in dtypes:
                    for m in ms:
                        for t in threads:
                            for w in entry_weights:
                                problem = Problem(op, dtype, m, n, k, group if op == "int4" else None, t, w)
                                validate(problem, f"{where} ({layer}, {op}, m={m})")
                                count = len(only) + 2 if only else len(candidate_space(t, grid, op))
                                need = _memory_bytes(problem, count)
                                if need > memory_gb * (1 << 30):
                                    raise UserError(f"{where} ({layer}, {op}, m={m}): needs about {need / (1 << 30):.1f} GiB, "
                                                    f"more than worker_memory_gb={memory_gb}")
                                for isa in entry_isas:
                                    tasks.append(Task(problem, isa, f"{model}.{layer}"))
    seen: dict[tuple, str] = {}
    unique = []
    for task in tasks:  # the same shape from two models is measured once
        if (task.key, task.isa) not in seen:
            seen[(task.key, task.isa)] = task.label
            unique.append(task)
    return Spec(name, isas, grid, protocol, unique, float(memory_gb), doc, only)


def _unique_key_loader():
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, (str, int, float, bool, type(None))):
                    continue  # unhashable keys: SafeLoader's own error below
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} at line {key_node.start_mark.line + 1}", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def load_spec(path: str) -> Spec:
    import yaml

    try:
        with open(path) as f:
            doc = yaml.load(f, Loader=_unique_key_loader())  # noqa: S506 - a SafeLoader subclass
    except OSError as exc:
        raise UserError(f"{path}: cannot read sweep spec ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse_spec(doc, path)
