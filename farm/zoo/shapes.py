"""A model's quantized linear layers, from the zoo (models.yaml) or a local Hugging Face
config.json, and the matmul problems they make (`farm shapes`)."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass

from farm.errors import UserError
from farm.measure.problem import Problem, validate

ZOO_PATH = os.path.join(os.path.dirname(__file__), "models.yaml")
ZOO_SCHEMA = "kernel-farm/zoo/1"
REQUIRED = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
# transformers' modelling code for these model types has qkv_proj and gate_up_proj as one Linear each.
FUSED_MODEL_TYPES = frozenset({"phi3"})
DEFAULT_MS = (1, 4, 8, 32, 128, 512)


@dataclass(frozen=True)
class ModelDims:
    id: str
    family: str
    source: str  # the Hugging Face model id or the config.json path the dims come from
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: int | None = None  # only where it differs from hidden_size / num_attention_heads

    @property
    def head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class Layer:
    name: str
    n: int
    k: int


@dataclass(frozen=True)
class Planned:
    """One quantized matmul of a model at one M: the layer it comes from and its problem."""

    layer: Layer
    problem: Problem


@dataclass
class Plan:
    model: ModelDims
    fused: bool
    layers: list[Layer]
    planned: list[Planned]
    skipped: list[str]  # layers that cannot be quantized with an op (e.g. int4: K % group != 0)

    @property
    def problems(self) -> list[Problem]:
        return [p.problem for p in self.planned]


def _int(doc: dict, name: str, where: str) -> int:
    value = doc.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{where}: {name} must be a positive integer, got {value!r}")
    return value


def dims_from_config(doc: dict, where: str, model_id: str, family: str | None = None, source: str | None = None) -> ModelDims:
    """ModelDims from config.json fields (the zoo uses the same names)."""
    if not isinstance(doc, dict):
        raise UserError(f"{where}: expected a mapping of config fields")
    if isinstance(doc.get("text_config"), dict):  # multimodal configs keep the LM's dims apart
        doc = {"model_type": doc.get("model_type"), **doc["text_config"]}
        where = f"{where}: text_config"
    for name in REQUIRED:
        if doc.get(name) is None:
            raise UserError(f"{where}: missing field {name!r} (needed for the layer shapes)")
    if not isinstance(doc["model_type"], str):
        raise UserError(f"{where}: model_type must be a string, got {doc['model_type']!r}")
    heads = _int(doc, "num_attention_heads", where)
    hidden = _int(doc, "hidden_size", where)
    # transformers' default when a config leaves it out: one KV head per attention head
    kv_heads = _int(doc, "num_key_value_heads", where) if doc.get("num_key_value_heads") is not None else heads
    head_dim = _int(doc, "head_dim", where) if doc.get("head_dim") is not None else None
    if head_dim == hidden // heads and hidden % heads == 0:
        head_dim = None
    if head_dim is None and hidden % heads:
        raise UserError(f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads} and head_dim is missing")
    return ModelDims(model_id, family or doc["model_type"], source or model_id, doc["model_type"], hidden,
                     _int(doc, "intermediate_size", where), heads, kv_heads, _int(doc, "vocab_size", where),
                     bool(doc.get("tie_word_embeddings", False)), head_dim)


def load_zoo(path: str = ZOO_PATH) -> dict[str, ModelDims]:
    import yaml

    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    if not isinstance(doc, dict) or doc.get("schema") != ZOO_SCHEMA or not isinstance(doc.get("models"), list):
        raise UserError(f"{path}: not a model zoo ({ZOO_SCHEMA})")
    zoo: dict[str, ModelDims] = {}
    for index, entry in enumerate(doc["models"]):
        where = f"{path}: models[{index}]"
        if not isinstance(entry, dict) or not all(isinstance(entry.get(f), str) for f in ("id", "family", "source")):
            raise UserError(f"{where}: needs id, family and source strings")
        if entry["id"] in zoo:
            raise UserError(f"{where}: duplicate id {entry['id']!r}")
        zoo[entry["id"]] = dims_from_config(entry.get("dims"), f"{where}.dims", entry["id"], entry["family"], entry["source"])
    return zoo


def read_config(path: str) -> ModelDims:
    """A Hugging Face config.json on disk (a file, or a folder holding one); nothing is downloaded."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as exc:
        raise UserError(f"{path}: cannot read config ({exc.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a JSON config ({exc})") from None
    name = doc.get("_name_or_path") if isinstance(doc, dict) else None
    return dims_from_config(doc, path, path, source=name or path)


def resolve(model: str | ModelDims) -> ModelDims:
    """A zoo id (or its Hugging Face model id, any case) or a path to a config.json."""
    if isinstance(model, ModelDims):
        return model
    zoo = load_zoo()
    wanted = model.lower()
    for dims in zoo.values():
        if wanted in (dims.id.lower(), dims.source.lower()):
            return dims
    if os.path.exists(model) or model.endswith(".json"):
        return read_config(model)
    raise UserError(f"{model!r} is neither a zoo model nor a config.json path (zoo: {', '.join(zoo)})")


def layers(model: str | ModelDims, fused: bool = False) -> list[Layer]:
    """The Linear layers of one decoder layer, plus lm_head, as (name, N, K).

    fused=False: as transformers' modelling code has them (separate q/k/v/gate/up, except the
    model types in FUSED_MODEL_TYPES); fused=True: qkv and gate_up fused as serving engines do."""
    d = resolve(model)
    q, kv = d.num_attention_heads * d.head, d.num_key_value_heads * d.head
    h, i = d.hidden_size, d.intermediate_size
    if fused or d.model_type in FUSED_MODEL_TYPES:
        attn = [Layer("qkv_proj", q + 2 * kv, h)]
        mlp = [Layer("gate_up_proj", 2 * i, h)]
    else:
        attn = [Layer("q_proj", q, h), Layer("k_proj", kv, h), Layer("v_proj", kv, h)]
        mlp = [Layer("gate_proj", i, h), Layer("up_proj", i, h)]
    return [*attn, Layer("o_proj", h, q), *mlp, Layer("down_proj", h, i), Layer("lm_head", d.vocab_size, h)]


def plan(model: str | ModelDims, ms=DEFAULT_MS, ops=("int8", "int4"), dtype: str = "bf16",
         group_size: int | None = 128, threads: int = 2, fused: bool = False) -> Plan:
    """Every (layer, op, M) problem; layers an op cannot quantize (int4: K % group, N % 16) are skipped."""
    dims = resolve(model)
    found = layers(dims, fused)
    planned, skipped = [], []
    for op in ops:
        for layer in found:
            group = group_size if op == "int4" else None
            try:
                validate(Problem(op, dtype, 1, layer.n, layer.k, group, threads), f"{op} {layer.name}")
            except UserError as exc:
                skipped.append(str(exc))
                continue
            for m in ms:
                planned.append(Planned(layer, validate(Problem(op, dtype, m, layer.n, layer.k, group, threads), layer.name)))
    return Plan(dims, fused, found, planned, skipped)


def problems(model: str | ModelDims, ms=DEFAULT_MS, ops=("int8", "int4"), dtype: str = "bf16",
             group_size: int | None = 128, threads: int = 2, fused: bool = False) -> list[Problem]:
    return plan(model, ms, ops, dtype, group_size, threads, fused).problems


def spec_layers(model, fused, where: str) -> list[tuple[str, int, int]]:
    """A sweep spec entry's `model:` without `layers:` -> the zoo's layers as (name, N, K)."""
    if not isinstance(model, str):
        raise UserError(f"{where}.model: a problem without layers needs a zoo model id, got {model!r}")
    if not isinstance(fused, bool):
        raise UserError(f"{where}.fused: must be true or false, got {fused!r}")
    try:
        return [(layer.name, layer.n, layer.k) for layer in layers(model, fused)]
    except UserError as exc:
        raise UserError(f"{where}.model: {exc}") from None


# --- `farm shapes` -------------------------------------------------------------------------

def plan_json(p: Plan) -> dict:
    return {"model": p.model.id, "source": p.model.source, "model_type": p.model.model_type, "fused": p.fused,
            "layers": [asdict(layer) for layer in p.layers], "skipped": p.skipped,
            "problems": [{"layer": x.layer.name, **x.problem.as_dict()} for x in p.planned]}


def print_plan(p: Plan, ms) -> None:
    from rich.console import Console
    from rich.table import Table

    layout = "fused (serving engines)" if p.fused else "as transformers runs it"
    console = Console(width=160)
    console.print(f"{p.model.id} ({p.model.source}, {p.model.model_type}): {len(p.layers)} linear layers {layout}, "
                  f"{len(p.planned)} quantized matmul problems at M in {' '.join(map(str, ms))}", markup=False)
    table = Table()
    for col in ("layer", "N", "K", "ops"):
        table.add_column(col, justify="right" if col in ("N", "K") else "left")
    for layer in p.layers:
        ops = sorted({x.problem.op for x in p.planned if x.layer == layer})
        table.add_row(layer.name, str(layer.n), str(layer.k), " ".join(ops) or "-")
    console.print(table)
    for line in p.skipped:
        console.print(f"skipped {line}", markup=False)


def cmd_shapes(args: argparse.Namespace) -> int:
    if args.list:
        for dims in load_zoo().values():
            print(f"{dims.id:18} {dims.family:10} {dims.source}")
        return 0
    if not args.model:
        raise UserError("shapes: name a zoo model or a config.json path (or --list)")
    p = plan(args.model, args.m, args.ops, args.dtype, args.group_size, args.threads, args.fused)
    if args.json:
        print(json.dumps(plan_json(p)))
    else:
        print_plan(p, args.m)
    return 0


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--m", type=int, nargs="+", default=list(DEFAULT_MS), help="M buckets (tokens per call)")
    p.add_argument("--ops", nargs="+", default=["int8", "int4"], choices=["int8", "int4"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--group-size", type=int, default=128, help="int4 quantization group")
    p.add_argument("--fused", action="store_true", help="qkv and gate_up fused, as serving engines run them")
    p.add_argument("--json", action="store_true")
