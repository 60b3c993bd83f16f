"""`farm bench model`: decoder blocks of a zoo model (or a local config.json) at its real
dimensions, as Hugging Face transformers runs them: separate q/k/v/o/gate/up/down projections
(one qkv_proj and one gate_up_proj only for the model types whose modelling code fuses them,
e.g. phi3; `--fused` for the serving engines' layout), weight-only quantized to int8 or int4
with the ops Inductor lowers (aten._weight_int8pack_mm, aten._weight_int4pack_mm_for_cpu),
random weights.

`--hf` also builds a real transformers causal LM from the same dims (no download: the model
type's config class, random weights, `--hf-layers` decoder layers plus lm_head), quantized with
torchao's Int8WeightOnlyConfig. torchao 0.18 runs those linears as mm(x, w.t().to(bf16)) * scale,
which Inductor's woq pattern rewrites to aten._weight_int8pack_mm: that is where the farm's
lowering sees them (the report counts the pattern's matches next to the table's decisions).

Decode: B sequences x 1 new token (M = B; the block attends to a static KV cache, the hf model
runs without a cache: its linears see the same M); prefill: one sequence of T tokens, causal
(M = T). Compiled with Inductor's default, max-autotune and the farm's table, timed interleaved
in one process, with compile times and how many quantized matmuls the table decided.
"""

from __future__ import annotations

import os
import tempfile
import time
import types
from dataclasses import asdict

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from farm.errors import UserError
from farm.measure import stats
from farm.measure.compiled import graphs_compiled
from farm.measure.protocol import Protocol
from farm.measure.timing import run_rounds
from farm.render import emit
from farm.zoo.shapes import ModelDims, layers, resolve

# The fused blocks these names meant before the zoo; they now run the zoo model as transformers does.
ALIASES = {"llama-block": "Llama-3.2-1B", "qwen-block": "Qwen2.5-0.5B"}
KV_CACHE_LEN = 256  # decode attends to this many cached positions
VARIANTS = ("default", "max-autotune", "table")
MODELS_EXTRA = "pip install 'kernel-farm[models]'  (transformers and torchao)"
MAX_REL_ERR = 5e-2


class QuantLinear(torch.nn.Module):
    def __init__(self, n: int, k: int, quant: str, group: int, gen: torch.Generator):
        super().__init__()
        self.quant, self.group = quant, group
        if quant == "int8":
            self.register_buffer("weight", torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8))
            self.register_buffer("scales", ((torch.rand(n, generator=gen) + 0.5) / (127 * k**0.5)).to(torch.bfloat16))
        else:
            w = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
            self.register_buffer("weight", torch._convert_weight_to_int4pack_for_cpu(w, 1))
            scale = (torch.rand(k // group, n, generator=gen) + 0.5) / (8 * k**0.5)
            self.register_buffer("scales", torch.stack([scale, torch.zeros_like(scale) + 8 * scale], -1).to(torch.bfloat16))

    def forward(self, x):
        if self.quant == "int8":
            return torch._weight_int8pack_mm(x, self.weight, self.scales)
        return torch._weight_int4pack_mm_for_cpu(x, self.weight, self.group, self.scales)


class DecoderBlock(torch.nn.Module):
    """Pre-norm attention + SwiGLU MLP with the zoo's projections (biases, q/k norms and
    rotary embeddings left out: they are not quantized matmuls)."""

    def __init__(self, dims: ModelDims, quant: str, group: int, batch: int, fused: bool, gen: torch.Generator):
        super().__init__()
        h, hd = dims.hidden_size, dims.head
        self.h, self.hd, self.nh, self.kvh = h, hd, dims.num_attention_heads, dims.num_key_value_heads
        found = [layer for layer in layers(dims, fused) if layer.name != "lm_head"]
        self.fused_qkv = any(layer.name == "qkv_proj" for layer in found)
        self.fused_mlp = any(layer.name == "gate_up_proj" for layer in found)
        for layer in found:
            if quant == "int4" and (layer.k % group or layer.n % 16):
                raise UserError(f"--quant int4: {layer.name} ({layer.n}x{layer.k}) needs K % {group} == 0 and N % 16 == 0")
        self.proj = torch.nn.ModuleDict({layer.name: QuantLinear(layer.n, layer.k, quant, group, gen) for layer in found})
        self.register_buffer("norm1", torch.ones(h, dtype=torch.bfloat16))
        self.register_buffer("norm2", torch.ones(h, dtype=torch.bfloat16))
        self.register_buffer("k_cache", torch.randn(batch, self.kvh, KV_CACHE_LEN, hd, generator=gen).to(torch.bfloat16))
        self.register_buffer("v_cache", torch.randn(batch, self.kvh, KV_CACHE_LEN, hd, generator=gen).to(torch.bfloat16))

    def forward(self, x):  # x: [B, S, hidden]
        b, s, _ = x.shape
        y = F.rms_norm(x, (self.h,), self.norm1).reshape(b * s, self.h)
        if self.fused_qkv:
            q, k, v = self.proj["qkv_proj"](y).split([self.nh * self.hd, self.kvh * self.hd, self.kvh * self.hd], -1)
        else:
            q, k, v = self.proj["q_proj"](y), self.proj["k_proj"](y), self.proj["v_proj"](y)
        q = q.view(b, s, self.nh, self.hd).transpose(1, 2)
        k = k.view(b, s, self.kvh, self.hd).transpose(1, 2)
        v = v.view(b, s, self.kvh, self.hd).transpose(1, 2)
        if s == 1:  # decode: the new token attends to the cache and itself
            k, v = torch.cat([self.k_cache, k], 2), torch.cat([self.v_cache, v], 2)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=s > 1, enable_gqa=True)
        x = x + self.proj["o_proj"](attn.transpose(1, 2).reshape(b * s, self.nh * self.hd)).view(b, s, self.h)
        y = F.rms_norm(x, (self.h,), self.norm2).reshape(b * s, self.h)
        if self.fused_mlp:
            gate, up = self.proj["gate_up_proj"](y).chunk(2, -1)
        else:
            gate, up = self.proj["gate_proj"](y), self.proj["up_proj"](y)
        return x + self.proj["down_proj"](F.silu(gate) * up).view(b, s, self.h)


class Blocks(torch.nn.Module):
    def __init__(self, dims: ModelDims, quant: str, count: int, batch: int, fused: bool = False,
                 group: int = 128, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.blocks = torch.nn.ModuleList(DecoderBlock(dims, quant, group, batch, fused, gen) for _ in range(count))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


# --- the real transformers model (--hf) ------------------------------------------------------

def hf_available() -> bool:
    try:
        import torchao.quantization  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def hf_model(dims: ModelDims, count: int, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """A transformers causal LM of `dims`' model type with `count` decoder layers, random bf16
    weights, every Linear (lm_head included) quantized with torchao's Int8WeightOnlyConfig."""
    if not hf_available():
        raise UserError(f"--hf needs transformers and torchao, the 'models' extra: {MODELS_EXTRA}")
    import torchao
    import transformers
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {"hidden_size": dims.hidden_size, "intermediate_size": dims.intermediate_size,
              "num_attention_heads": dims.num_attention_heads, "num_key_value_heads": dims.num_key_value_heads,
              "vocab_size": dims.vocab_size, "tie_word_embeddings": dims.tie_word_embeddings,
              "num_hidden_layers": count, "head_dim": dims.head}
    try:
        config = AutoConfig.for_model(dims.model_type, **fields)
    except (ValueError, KeyError) as exc:
        raise UserError(f"--hf: model_type {dims.model_type!r} is not one transformers "
                        f"{transformers.__version__} knows ({exc})") from None
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    # set_inductor_config=False: torchao's recommended settings are GPU (Triton) knobs, and they
    # would stay set for the rest of the process.
    quantize_(model, Int8WeightOnlyConfig(set_inductor_config=False))
    return model, {"transformers": transformers.__version__, "torchao": torchao.__version__,
                   "config_class": type(config).__name__, "linears_quantized": linears}


# --- compile and time ------------------------------------------------------------------------

def _block_call(model, x):
    return model(x)


def _hf_call(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def _variant(fn, variant: str):
    """`fn` as its own code object: Dynamo caches compiled graphs per code object (its guards
    ignore Inductor's config), so variants must not share one."""
    code = fn.__code__.replace(co_filename=f"<kernel-farm bench model {variant}>")
    return types.FunctionType(code, fn.__globals__, f"{fn.__name__}_{variant.replace('-', '_')}")


def _woq_matches() -> int:
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["woq_matcher_count"])


def _compile(call, model, x, variant: str, table: str | None, cache_dir: str):
    import kernels
    from torch._inductor import config

    # A fresh Inductor cache dir per variant, caches off: every variant compiles (and decides) here.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    kernels.uninstall()
    # A table install() refuses (stale, foreign) leaves Inductor's lowering: reported, not fatal.
    installed = None
    if variant.startswith("table"):
        installed = kernels.install(table).reason or "active"
    fn = torch.compile(_variant(call, variant), fullgraph=True, dynamic=False)
    start = time.perf_counter()
    try:
        with torch.no_grad(), config.patch(freezing=True, force_disable_caches=True, max_autotune=variant.startswith("max-autotune")):
            out = fn(model, x)
    finally:
        kernels.uninstall()
    return fn, out, time.perf_counter() - start, installed


def bench_variants(call, model: torch.nn.Module, x: torch.Tensor, table: str | None, protocol: Protocol,
                   label: str) -> dict:
    """One input shape: compile the three variants, check them against eager, time interleaved."""
    from kernels import lowering

    with torch.no_grad():
        reference = call(model, x).float()
    fns, compile_s, woq, decisions, installed = {}, {}, {}, [], None
    saved_cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="farm-bench-model-") as workdir:
        try:
            for variant in VARIANTS:
                lowering.clear_decisions()
                before = _woq_matches()
                fn, out, compile_s[variant], status = _compile(call, model, x, f"{variant}-{label}", table,
                                                               os.path.join(workdir, variant))
                woq[variant] = _woq_matches() - before
                if variant == "table":
                    decisions, installed = lowering.decisions(), status
                err = float((out.float() - reference).abs().max() / reference.abs().max())
                if not err <= MAX_REL_ERR:
                    raise RuntimeError(f"{variant}: output differs from eager (relative error {err:.3g})")
                fns[variant] = (lambda c: lambda inp: c(model, inp))(fn)
        finally:
            if saved_cache is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved_cache
        before = graphs_compiled()
        with torch.no_grad():
            samples, _, _ = run_rounds(fns, x, protocol, lambda **_: None)
        if graphs_compiled() != before:
            raise RuntimeError("a variant recompiled while timing: it would not be the kernel it claims")
    base = samples["default"]
    variants = {}
    for variant, times in samples.items():
        sp = stats.paired_speedups(base, times)
        variants[variant] = {"median_ms": stats.median(times) * 1e3, "ci95_ms": [v * 1e3 for v in stats.bootstrap_ci(times)],
                             "speedup_vs_default": stats.median(sp), "speedup_ci95": list(stats.bootstrap_ci(sp)),
                             "compile_s": compile_s[variant], "woq_pattern_matches": woq[variant]}
    return {"table_install": installed, "quantized_matmuls": len(decisions), "table_decided": sum(d.candidate is not None for d in decisions),
            "table_decisions": [(d.key.n, d.key.k, d.candidate, d.source) for d in decisions], "variants": variants}


def _shape_row(batch: int, seq: int) -> dict:
    return {"batch": batch, "seq": seq, "m": batch * seq, "phase": "decode" if seq == 1 else "prefill"}


def bench_model(model: str | ModelDims, quant: str, shapes: list[tuple[int, int]], table: str | None,
                protocol: Protocol, threads: int, count: int = 1, fused: bool = False,
                hf: bool = False, hf_layers: int = 2) -> dict:
    """shapes: (batch, seq) pairs; decode has seq 1. count: decoder blocks."""
    if count < 1 or hf_layers < 1:
        raise UserError("--layers and --hf-layers must be at least 1")
    if hf and quant != "int8":
        raise UserError("--hf quantizes with torchao's Int8WeightOnlyConfig: use --quant int8")
    if hf and not hf_available():
        raise UserError(f"--hf needs transformers and torchao, the 'models' extra: {MODELS_EXTRA}")
    dims = resolve(ALIASES.get(model, model) if isinstance(model, str) else model)
    torch.set_num_threads(threads)
    rows = []
    for batch, seq in shapes:
        block = Blocks(dims, quant, count, batch, fused).eval()  # the KV cache is per batch size
        x = torch.randn(batch, seq, dims.hidden_size, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
        rows.append({**_shape_row(batch, seq), **bench_variants(_block_call, block, x, table, protocol, f"block-{batch}x{seq}")})
        del block
    report = {"model": dims.id, "source": dims.source, "dims": asdict(dims), "quant": quant, "threads": threads,
              "table": table, "layers": count, "fused": fused, "rows": rows, "hf": None}
    if hf:
        lm, info = hf_model(dims, hf_layers)
        hf_rows = []
        for batch, seq in shapes:
            ids = torch.randint(0, dims.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
            hf_rows.append({**_shape_row(batch, seq), **bench_variants(_hf_call, lm, ids, table, protocol, f"hf-{batch}x{seq}")})
        report["hf"] = {"layers": hf_layers, **info, "rows": hf_rows}
    return report


# --- output ----------------------------------------------------------------------------------

def _render_rows(title: str, rows: list[dict], console: Console, woq: bool = False) -> None:
    table = Table(title=title, title_justify="left")
    cols = ["phase", "M", "default ms", "max-autotune", "table", "table decided", "compile s def|MA|table"]
    for col in cols + (["woq matches"] if woq else []):
        table.add_column(col)
    for r in rows:
        v = r["variants"]
        fmt = lambda d: f"{d['speedup_vs_default']:.3f} [{d['speedup_ci95'][0]:.2f},{d['speedup_ci95'][1]:.2f}]"  # noqa: E731
        cells = [r["phase"], str(r["m"]), f"{v['default']['median_ms']:.2f}", fmt(v["max-autotune"]), fmt(v["table"]),
                 f"{r['table_decided']}/{r['quantized_matmuls']}" if r["table_install"] == "active" else "not installed",
                 f"{v['default']['compile_s']:.1f}|{v['max-autotune']['compile_s']:.1f}|{v['table']['compile_s']:.1f}"]
        if woq:
            cells.append("|".join(str(v[name]["woq_pattern_matches"]) for name in VARIANTS))
        table.add_row(*cells)
    console.print(table)
    for reason in sorted({r["table_install"] for r in rows} - {"active"}):
        console.print(f"the table was not installed (its variant ran Inductor's own lowering): {reason}", markup=False)


def render(report: dict, console: Console) -> None:
    layout = "fused qkv|gate_up" if report["fused"] else "projections as transformers has them"
    head = f"{report['quant']} weight-only, {report['threads']} threads, table {report['table']}"
    _render_rows(f"farm bench model: {report['model']}, {report['layers']} decoder block(s), {layout}, {head} "
                 "(speedup over default, paired 95% CI)", report["rows"], console)
    hf = report["hf"]
    if hf:
        _render_rows(f"transformers {hf['transformers']} {hf['config_class']}, {hf['layers']} layers + lm_head, "
                     f"torchao {hf['torchao']} Int8WeightOnlyConfig ({hf['linears_quantized']} linears); woq matches: "
                     "linears Inductor rewrote to aten._weight_int8pack_mm, per variant", hf["rows"], console, woq=True)


def cmd_model(args) -> int:
    import kernels

    shapes = [(b, 1) for b in args.decode] + [(1, t) for t in args.prefill]
    if args.threads:
        torch.set_num_threads(args.threads)  # before shipped_table(): it answers for this thread count
    report = bench_model(args.model, args.quant, shapes, args.table or kernels.shipped_table(),
                         Protocol(min_rounds=args.rounds, max_rounds=max(args.rounds, 21)),
                         torch.get_num_threads(), args.layers, args.fused, args.hf, args.hf_layers)
    emit(report, args.json, render)
    return 0


def register(sub) -> None:
    p = sub.add_parser("model", help="a zoo model's decoder blocks (and with --hf a transformers model): latency, compile time")
    p.add_argument("--model", default="Llama-3.2-1B", help="a zoo id (farm shapes --list) or a config.json path")
    p.add_argument("--quant", default="int8", choices=["int8", "int4"])
    p.add_argument("--layers", type=int, default=1, help="decoder blocks")
    p.add_argument("--fused", action="store_true", help="qkv and gate_up fused, as serving engines run them")
    p.add_argument("--hf", action="store_true", help=f"also a transformers model quantized by torchao ({MODELS_EXTRA})")
    p.add_argument("--hf-layers", type=int, default=2, help="decoder layers of the --hf model")
    p.add_argument("--decode", type=int, nargs="*", default=[1, 8], help="decode batch sizes (M = batch)")
    p.add_argument("--prefill", type=int, nargs="*", default=[128], help="prefill lengths (M = tokens)")
    p.add_argument("--table", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_model)
