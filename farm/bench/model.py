"""`farm bench model`: a transformer decoder block at the real dimensions of a public model,
its linear layers weight-only quantized to int8 or int4 with the ops PyTorch's quantization
flows produce (torchao's int8 weight-only config lowers to aten._weight_int8pack_mm after
freezing; int4 on CPU calls aten._weight_int4pack_mm_for_cpu), random weights.

Decode: B sequences x 1 new token attending to a static KV cache (M = B); prefill: one
sequence of T tokens, causal (M = T). Compiled with Inductor's default, max-autotune and the
farm's table, timed interleaved in one process; compile times of each.
"""

from __future__ import annotations

import os
import tempfile
import time
import types

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from farm.measure import stats
from farm.measure.compiled import graphs_compiled
from farm.measure.protocol import Protocol
from farm.render import emit
from farm.measure.timing import run_rounds

MODELS = {
    "llama-block": {"name": "Llama-3.2-1B", "hidden": 2048, "heads": 32, "kv_heads": 8, "head_dim": 64, "inter": 8192},
    "qwen-block": {"name": "Qwen2.5-0.5B", "hidden": 896, "heads": 14, "kv_heads": 2, "head_dim": 64, "inter": 4864},
    "tiny-block": {"name": "tiny (tests)", "hidden": 256, "heads": 4, "kv_heads": 2, "head_dim": 64, "inter": 512},
}
KV_CACHE_LEN = 256  # decode attends to this many cached positions


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
    def __init__(self, dims: dict, quant: str, group: int = 128, batch: int = 1, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        h, hd, nh, kvh, inter = dims["hidden"], dims["head_dim"], dims["heads"], dims["kv_heads"], dims["inter"]
        self.h, self.hd, self.nh, self.kvh, self.inter = h, hd, nh, kvh, inter
        self.qkv = QuantLinear((nh + 2 * kvh) * hd, h, quant, group, gen)
        self.o = QuantLinear(h, nh * hd, quant, group, gen)
        self.gate_up = QuantLinear(2 * inter, h, quant, group, gen)
        self.down = QuantLinear(h, inter, quant, group, gen)
        self.register_buffer("norm1", torch.ones(h, dtype=torch.bfloat16))
        self.register_buffer("norm2", torch.ones(h, dtype=torch.bfloat16))
        self.register_buffer("k_cache", torch.randn(batch, kvh, KV_CACHE_LEN, hd, generator=gen).to(torch.bfloat16))
        self.register_buffer("v_cache", torch.randn(batch, kvh, KV_CACHE_LEN, hd, generator=gen).to(torch.bfloat16))

    def forward(self, x):  # x: [B, S, hidden]
        b, s, _ = x.shape
        y = F.rms_norm(x, (self.h,), self.norm1)
        q, k, v = self.qkv(y.reshape(b * s, self.h)).split([self.nh * self.hd, self.kvh * self.hd, self.kvh * self.hd], -1)
        q = q.view(b, s, self.nh, self.hd).transpose(1, 2)
        k = k.view(b, s, self.kvh, self.hd).transpose(1, 2)
        v = v.view(b, s, self.kvh, self.hd).transpose(1, 2)
        if s == 1:  # decode: the new token attends to the cache and itself
            k, v = torch.cat([self.k_cache, k], 2), torch.cat([self.v_cache, v], 2)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=s > 1, enable_gqa=True)
        x = x + self.o(attn.transpose(1, 2).reshape(b * s, self.nh * self.hd)).view(b, s, self.h)
        y = F.rms_norm(x, (self.h,), self.norm2).reshape(b * s, self.h)
        gate, up = self.gate_up(y).chunk(2, -1)
        return x + self.down(F.silu(gate) * up).view(b, s, self.h)


def _variant_block(dims: dict, quant: str, batch: int, variant: str) -> torch.nn.Module:
    """A block whose forward is its own code object: Dynamo caches compiled graphs per code
    object (guards ignore Inductor's config), so variants must not share one."""
    code = DecoderBlock.forward.__code__
    forward = types.FunctionType(code.replace(co_filename=f"<kernel-farm block {variant}>"), DecoderBlock.forward.__globals__)
    cls = type(f"DecoderBlock_{variant.replace('-', '_')}", (DecoderBlock,), {"forward": forward})
    return cls(dims, quant, batch=batch).eval()  # same seed: the same weights for every variant


def _compile(model: torch.nn.Module, x: torch.Tensor, variant: str, table: str | None, cache_dir: str):
    import kernels
    from torch._inductor import config

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    kernels.uninstall()
    if variant == "table":
        kernels.install(table)
    start = time.perf_counter()
    with torch.no_grad(), config.patch(freezing=True, force_disable_caches=True, max_autotune=variant == "max-autotune"):
        fn = torch.compile(model, fullgraph=True, dynamic=False)
        out = fn(x)
    elapsed = time.perf_counter() - start
    kernels.uninstall()
    return fn, out, elapsed


def bench_block(model_name: str, quant: str, shapes: list[tuple[int, int]], table: str | None,
                protocol: Protocol, threads: int) -> dict:
    """shapes: (batch, seq) pairs; decode has seq 1."""
    from kernels import lowering

    torch.set_num_threads(threads)
    dims = MODELS[model_name]
    rows = []
    for batch, seq in shapes:
        x = torch.randn(batch, seq, dims["hidden"]).to(torch.bfloat16)
        fns, compile_s, decisions = {}, {}, []
        workdir = tempfile.mkdtemp(prefix="farm-bench-model-")
        with torch.no_grad():
            reference = DecoderBlock(dims, quant, batch=batch).eval()(x)
        for variant in ("default", "max-autotune", "table"):
            model = _variant_block(dims, quant, batch, f"{variant}-{batch}x{seq}")
            lowering.clear_decisions()
            fn, out, compile_s[variant] = _compile(model, x, variant, table, os.path.join(workdir, variant))
            if variant == "table":
                decisions = [(d.key.n, d.key.k, d.candidate, d.source) for d in lowering.decisions()]
            err = float((out.float() - reference.float()).abs().max() / reference.float().abs().max())
            if err > 5e-2:
                raise RuntimeError(f"{variant}: block output differs from eager (relative error {err:.3g})")
            fns[variant] = fn
        before = graphs_compiled()
        with torch.no_grad():
            samples, _ = run_rounds(fns, x, protocol, lambda **_: None)
        if graphs_compiled() != before:
            raise RuntimeError("a variant recompiled while timing: it would not be the kernel it claims")
        base = samples["default"]
        result = {"batch": batch, "seq": seq, "m": batch * seq, "phase": "decode" if seq == 1 else "prefill",
                  "table_decisions": decisions, "variants": {}}
        for variant, times in samples.items():
            sp = stats.paired_speedups(base, times)
            result["variants"][variant] = {"median_ms": stats.median(times) * 1e3,
                                           "ci95_ms": [v * 1e3 for v in stats.bootstrap_ci(times)],
                                           "speedup_vs_default": stats.median(sp), "speedup_ci95": list(stats.bootstrap_ci(sp)),
                                           "compile_s": compile_s[variant]}
        rows.append(result)
    return {"model": model_name, "dims": dims, "quant": quant, "threads": threads, "table": table, "rows": rows}


def render(report: dict, console: Console) -> None:
    table = Table(title=f"farm bench model: {report['dims']['name']} decoder block, {report['quant']} weight-only, "
                        f"{report['threads']} threads (speedup over default, paired 95% CI)", title_justify="left")
    for col in ("phase", "M", "default ms", "max-autotune", "table", "compile s def|MA|table"):
        table.add_column(col)
    for r in report["rows"]:
        v = r["variants"]
        fmt = lambda d: f"{d['speedup_vs_default']:.3f} [{d['speedup_ci95'][0]:.2f},{d['speedup_ci95'][1]:.2f}]"  # noqa: E731
        table.add_row(r["phase"], str(r["m"]), f"{v['default']['median_ms']:.2f}", fmt(v["max-autotune"]), fmt(v["table"]),
                      f"{v['default']['compile_s']:.1f}|{v['max-autotune']['compile_s']:.1f}|{v['table']['compile_s']:.1f}")
    console.print(table)


def cmd_model(args) -> int:
    import kernels

    shapes = [(b, 1) for b in args.decode] + [(1, t) for t in args.prefill]
    report = bench_block(args.model, args.quant, shapes, args.table or kernels.shipped_table(),
                         Protocol(min_rounds=args.rounds, max_rounds=max(args.rounds, 21)),
                         args.threads or torch.get_num_threads())
    emit(report, args.json, render)
    return 0


def register(sub) -> None:
    p = sub.add_parser("model", help="a decoder block at real dims: token latency and compile time")
    p.add_argument("--model", default="llama-block", choices=sorted(MODELS))
    p.add_argument("--quant", default="int8", choices=["int8", "int4"])
    p.add_argument("--decode", type=int, nargs="*", default=[1, 8], help="decode batch sizes (M = batch)")
    p.add_argument("--prefill", type=int, nargs="*", default=[128], help="prefill lengths (M = tokens)")
    p.add_argument("--table", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_model)
