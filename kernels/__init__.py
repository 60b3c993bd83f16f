"""kernel-farm's compile-time side: tuned lowerings for Inductor's weight-only-quantized matmuls.

    import kernels
    kernels.install()                 # the shipped tables of this host's ISA class and CPU vendor, one per thread count
    model = torch.compile(model)      # table winners, no benchmarking at compile time

Environment: KERNEL_FARM_TABLE=/path/to/table.yaml uses that one table (at its own thread
count only), KERNEL_FARM_TABLE=/path/to/dir the tables of this host's class in it;
KERNEL_FARM_TABLE=off disables the farm (Inductor's own lowerings). A missing, malformed,
foreign or stale table never breaks torch.compile: one warning, then Inductor's own behaviour.

Imports nothing heavy (no Ray; torch only when installing).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import warnings
from dataclasses import dataclass, field

ENV_VAR = "KERNEL_FARM_TABLE"
TABLES_DIR = os.path.join(os.path.dirname(__file__), "tables")

__all__ = ["install", "uninstall", "installed", "isa_class", "host_isa", "vendor_of", "host_vendor", "InstallResult",
           "KernelFarmWarning", "ENV_VAR", "shipped_table"]


class KernelFarmWarning(UserWarning):
    """The farm could not use a table and left the quantized matmuls to Inductor."""


@dataclass
class InstallResult:
    active: bool
    path: str | None  # the file or directory asked for
    reason: str = ""
    entries: int = 0
    stale_entries: int = 0
    problems: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)  # the table files loaded (this host's class)
    threads: int | None = None  # this process's thread count at install time
    vendor: str | None = None  # this host's CPU vendor (kernels.host_vendor), whose tables it may use
    transfer: bool = False  # no table for `threads`: choices transfer from the measured counts


class TablePolicy:
    """Lowering policy of an installed table set (see kernels.table.lookup_set). The thread
    count is the lowering's own (Inductor's parallel_num_threads), which also keys its cache."""

    def __init__(self, tables):
        self.tables = tables

    def choose(self, key):
        from .table import lookup_set

        return lookup_set(self.tables, key.threads, key.op, key.dtype, key.m, key.n, key.k, key.group_size)


_lock = threading.Lock()
_saved_pre_pass: list = []


def isa_class(vec_isa_name: str, capabilities: dict) -> str:
    """Map the vec ISA Inductor picks to the farm's class (AMX is AVX512 plus tiles)."""
    name = vec_isa_name.lower()
    if name.startswith("avx512"):
        return "amx" if capabilities.get("amx_tile") and capabilities.get("amx_bf16") else "avx512"
    return "avx2" if name.startswith("avx2") else "default"


def host_isa() -> str:
    """The ISA class Inductor picks in this process (amx, avx512, avx2, default)."""
    import torch
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return isa_class(str(pick_vec_isa() or ""), torch.cpu.get_capabilities())


def vendor_of(text: str | None) -> str:
    """The vendor (kernels.table.VENDORS) named by a CPUID vendor string (GenuineIntel,
    AuthenticAMD) or a CPU model name ("Intel(R) Xeon(R) ...", "AMD EPYC ...")."""
    name = (text or "").lower()
    if "intel" in name:
        return "intel"
    if "authenticamd" in name or "amd" in name.replace("(", " ").split():
        return "amd"
    return "other"


def host_vendor() -> str:
    """This host's CPU vendor (intel, amd, other): /proc/cpuinfo's vendor_id, else the platform's name."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return vendor_of(line.split(":", 1)[1])
    except OSError:
        pass
    return vendor_of(platform.processor())


def shipped_table(isa: str | None = None, threads: int | None = None, vendor: str | None = None) -> str:
    """The shipped table file of this ISA class, vendor and thread count (default: this host's and
    process's) if there is one, else the shipped tables' directory (install() then transfers
    between counts, or refuses with the reason)."""
    import torch

    name = f"{isa or host_isa()}-{vendor or host_vendor()}-t{threads or torch.get_num_threads()}.yaml"
    path = os.path.join(TABLES_DIR, name)
    return path if os.path.exists(path) else TABLES_DIR


def _warn(message: str) -> None:
    warnings.warn(f"kernel-farm: {message}; using Inductor's own lowering", KernelFarmWarning, stacklevel=3)


def _cache_key_pass(digest: str):
    """A no-op post-grad pass whose uuid puts the table into Inductor's FX graph cache key,
    so a graph compiled under one table is never served from the cache under another."""
    from torch._inductor import config
    from torch._inductor.custom_graph_pass import CustomGraphPass

    user_pass = _saved_pre_pass[0] if _saved_pre_pass else config.post_grad_custom_pre_pass

    class TableKey(CustomGraphPass):
        def __call__(self, graph):
            if user_pass is not None:
                user_pass(graph)

        def uuid(self):
            from torch._inductor.utils import parallel_num_threads

            inner = user_pass.uuid() if user_pass is not None and hasattr(user_pass, "uuid") else None
            # The thread count picks the table (or thread transfer): keyed here too, as Inductor
            # keys it only when cpp.threads is unset and dynamic threads are off.
            return f"kernel-farm:{digest}:t{parallel_num_threads()}:{inner}"

    return TableKey()


def install(path: str | None = None, *, strict: bool = False) -> InstallResult:
    """Use a table for the quantized matmuls of every later torch.compile in this process.

    path None: $KERNEL_FARM_TABLE, else the shipped tables' directory. A directory loads every
    table of this host's ISA class and CPU vendor in it (one per thread count; a count without a table borrows
    thread-independent choices where the measured counts agree); a file is one table, used at
    its own thread count only.
    Never raises for a bad table unless strict=True: it warns once and leaves Inductor alone.
    """
    import torch

    from . import lowering
    from .provenance import template_hash, torch_version
    from .table import TableError, load_set, set_problems

    env = os.environ.get(ENV_VAR, "").strip()
    if path is None and env.lower() == "off":
        uninstall()
        return InstallResult(False, None, f"{ENV_VAR}=off")
    path = path or env or TABLES_DIR
    current_torch, current_hash, threads, isa = torch_version(), template_hash(), torch.get_num_threads(), host_isa()
    vendor = host_vendor()
    try:
        tables = load_set(path, isa, current_torch, current_hash, vendor)
        problems = set_problems(tables, isa, threads, current_torch, current_hash, vendor)
        if problems:
            raise TableError("; ".join(problems))
    except TableError as exc:
        uninstall()
        if strict:
            raise
        _warn(str(exc))
        return InstallResult(False, path, str(exc), problems=[str(exc)], threads=threads, vendor=vendor)
    entries = [e for t in tables.tables.values() for e in t.entries.values()]
    stale = sum(e.stale for e in entries)
    if stale:
        _warn(f"{path}: {stale} of {len(entries)} entries are stale (other torch or template source)")
    files = [t.path for t in tables.tables.values()]
    digest = hashlib.sha256()
    for name in files:
        with open(name, "rb") as f:
            digest.update(f.read())
    _set_cache_key(digest.hexdigest()[:16])
    lowering.register(TablePolicy(tables))
    return InstallResult(True, path, "", len(entries), stale, tables=files, threads=threads,
                         transfer=threads not in tables.tables, vendor=vendor)


def _set_cache_key(digest: str | None) -> None:
    from torch._inductor import config

    with _lock:
        if digest is None:
            if _saved_pre_pass:
                config.post_grad_custom_pre_pass = _saved_pre_pass.pop()
            return
        if not _saved_pre_pass:
            _saved_pre_pass.append(config.post_grad_custom_pre_pass)
        config.post_grad_custom_pre_pass = _cache_key_pass(digest)


def uninstall() -> None:
    """Give both ops back to Inductor's own lowerings."""
    import sys

    if "kernels.lowering" not in sys.modules:
        return
    from . import lowering

    lowering.unregister()
    _set_cache_key(None)


@contextlib.contextmanager
def installed(path: str | None = None, *, strict: bool = False):
    """install() for the duration of a block (tests, benchmarks)."""
    result = install(path, strict=strict)
    try:
        yield result
    finally:
        uninstall()
