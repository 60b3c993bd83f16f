"""`farm bench roofline`: this host's memory bandwidth and arithmetic peak, measured, and how
far each table winner is from the bound it should hit.

Method (documented in the output):
- bandwidth: a streaming copy (torch.Tensor.copy_) between two buffers of 4x the last-level
  cache each, best of several repetitions: bytes read + bytes written per second.
- peak: a dense GEMM x @ w.T with w laid out [N, K] as the quantized weights are (torch.mm,
  oneDNN/BLAS), in bf16 and in fp32, best of several: 2*M*N*K flops per second of the faster
  dtype, the "achievable peak" for these kernels (on AVX2 hosts without bf16 instructions the
  fp32 GEMM is the faster by 5x or more, and bf16 with both operands row-major crawls at
  0.3 GFLOP/s, which is why the layout is fixed).
- bound of a winner: max(weight + activation + output bytes / bandwidth, 2*M*N*K / peak);
  decode problems hit the memory bound, prefill the compute bound. efficiency = bound / time.
"""

from __future__ import annotations

import time

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table


def measure_bandwidth(llc_bytes: int, repeats: int = 5) -> float:
    size = max(4 * llc_bytes, 256 << 20)
    size = min(size, 2 << 30)  # bounded: at most 4 GiB resident for the two buffers
    src = torch.ones(size // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * size / best


def measure_peak(dtype: torch.dtype = torch.bfloat16, n: int = 1024, repeats: int = 5) -> float:
    # 1024^3 is 2 GFLOP: compute-bound on every host here, and well under a second even where
    # the GEMM runs at 20 GFLOP/s.
    x = torch.randn(n, n).to(dtype)
    w = torch.randn(n, n).to(dtype)  # [N, K], used transposed, as the weights of these ops
    torch.mm(x, w.t())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(x, w.t())
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def bound_us(entry: dict, bandwidth: float, peak: float) -> tuple[float, str]:
    k = entry["key"]
    weight = k["n"] * k["k"] * (1 if k["op"] == "int8" else 0.5)
    moved = weight + k["m"] * k["k"] * 2 + k["m"] * k["n"] * 2
    memory_s, compute_s = moved / bandwidth, 2 * k["m"] * k["n"] * k["k"] / peak
    return max(memory_s, compute_s) * 1e6, "memory" if memory_s >= compute_s else "compute"


def roofline(table_path: str | None = None) -> dict:
    import yaml

    import kernels
    from farm.measure.host import profile

    host = profile()
    torch.set_num_threads(host.cores)
    bandwidth = measure_bandwidth(host.l3_bytes)
    peaks = {name: measure_peak(dtype) for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    peak_dtype = max(peaks, key=peaks.get)
    peak = peaks[peak_dtype]
    rows = []
    path = table_path or kernels.shipped_table(threads=host.cores)
    if not path.endswith(".yaml"):  # the shipped directory: no table of this class at host.cores threads
        from farm.errors import UserError

        raise UserError(f"roofline: no shipped table for {host.cores} threads; give --table")
    with open(path) as f:
        doc = yaml.safe_load(f)
    for entry in doc["entries"]:
        bound, kind = bound_us(entry, bandwidth, peak)
        rows.append({"key": entry["key"], "winner": entry["winner"], "weights": entry.get("weights"),
                     "median_us": entry["median_us"], "bound_us": bound, "bound": kind,
                     "efficiency": bound / entry["median_us"]})
    return {"host": {"isa": host.isa, "cpu": host.cpu, "cores": host.cores, "l3_bytes": host.l3_bytes},
            "bandwidth_gbs": bandwidth / 1e9, "peak_gflops": peak / 1e9, "peak_dtype": peak_dtype,
            "peak_bf16_gflops": peaks["bf16"] / 1e9, "peak_fp32_gflops": peaks["fp32"] / 1e9, "table": path, "rows": rows,
            "method": __doc__.split("Method (documented in the output):")[1].strip()}


def render(report: dict, console: Console) -> None:
    console.print(f"bandwidth {report['bandwidth_gbs']:.1f} GB/s (copy, 4x LLC), GEMM peak "
                  f"{report['peak_gflops']:.0f} GFLOP/s in {report['peak_dtype']} (bf16 {report['peak_bf16_gflops']:.0f}, "
                  f"fp32 {report['peak_fp32_gflops']:.0f}) on {report['host']['cores']} cores")
    table = Table(title=f"winners of {report['table']} against their bound", title_justify="left")
    for col in ("problem", "winner", "weights", "time us", "bound us", "bound", "efficiency"):
        table.add_column(col)
    for r in report["rows"]:
        k = r["key"]
        table.add_row(f"{k['op']} {k['dtype']} M={k['m']} N={k['n']} K={k['k']}", escape(r["winner"]), str(r["weights"]),
                      f"{r['median_us']:.1f}", f"{r['bound_us']:.1f}", r["bound"], f"{100 * r['efficiency']:.0f}%")
    console.print(table)


def cmd_roofline(args) -> int:
    from farm.render import emit

    emit(roofline(args.table), args.json, render)
    return 0


def register(sub) -> None:
    p = sub.add_parser("roofline", help="bandwidth and peak of this host; each table winner against its bound")
    p.add_argument("--table", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_roofline)
