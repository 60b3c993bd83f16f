"""Host profile: what a worker is (ISA class, capabilities, cores, caches, torch, emulation).

Profiled inside the process that compiles and times, so emulation settings are the ones
that really apply there.
"""

from __future__ import annotations

import os
import platform
import uuid
from dataclasses import asdict, dataclass, field

from kernels import host_vendor, isa_class, vendor_of

ISA_CLASSES = ("amx", "avx512", "avx2", "default")
# How an AVX512 host pretends to be AVX2: ATen's dispatch and Inductor's vector width.
EMULATION_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2"}}
EMULATION_SIMDLEN = {"avx2": 256}
# Why an emulated class refuses library-GEMM candidates (kernels.candidates.LIBRARY_GEMM_KINDS).
EMULATION_BLIND_SPOT = ("emulation restricts ATen's kernels and Inductor's generated code, not the library GEMM "
                        "(oneDNN / BLAS) this candidate calls: that picks its ISA from CPUID, so an emulated "
                        "class would time the host's own ISA")


@dataclass
class HostProfile:
    isa: str
    emulated: bool
    vec_isa: str
    aten_capability: str
    cpu: str
    vendor: str  # intel, amd, other (kernels.host_vendor): tables are kept per vendor
    hostname: str
    host_id: str  # hostname + machine id: two machines may share a hostname ("vm")
    cores: int
    logical_cpus: int
    threads: int
    l1d_bytes: int
    l2_bytes: int
    l3_bytes: int
    memory_bytes: int
    torch: str
    capabilities: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def record_vendor(host: dict) -> str:
    """The CPU vendor of a record's host: its own field, or (records written before it) the
    vendor its CPU model name says."""
    return host.get("vendor") or vendor_of(host.get("cpu"))


def _cache_bytes(level: int) -> int:
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for index in sorted(os.listdir(base)):
            path = os.path.join(base, index)
            with open(os.path.join(path, "level")) as f:
                if int(f.read()) != level:
                    continue
            with open(os.path.join(path, "type")) as f:
                if f.read().strip() == "Instruction":
                    continue
            with open(os.path.join(path, "size")) as f:
                text = f.read().strip()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
            return int(text.rstrip("KMG")) * scale
    except OSError:
        pass
    return 0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def host_id(machine_id_path: str = "/etc/machine-id") -> str:
    """hostname-machine: VMs share hostnames, so the machine id (else the MAC) tells them apart.
    Some images ship an empty machine-id (the lent AMX host did): that is no id either."""
    try:
        with open(machine_id_path) as f:
            machine = f.read().strip()[:12]
    except OSError:
        machine = ""
    return f"{platform.node()}-{machine or f'{uuid.getnode():012x}'}"


def apply_emulation(isa: str | None) -> None:
    """In this process: make Inductor target `isa` (ATen's capability must come from the env)."""
    if isa is None:
        return
    from torch._inductor import config

    if isa in EMULATION_SIMDLEN:
        config.cpp.simdlen = EMULATION_SIMDLEN[isa]


def profile(threads: int | None = None) -> HostProfile:
    import torch
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    caps = dict(torch.cpu.get_capabilities())
    vec = pick_vec_isa()
    vec_name = str(vec) if vec else "none"
    isa = isa_class(vec_name, caps)
    native = isa_class(_native_vec_isa_name(caps), caps)
    return HostProfile(
        isa=isa,
        emulated=isa != native,
        vec_isa=vec_name,
        aten_capability=torch.backends.cpu.get_cpu_capability(),
        cpu=_cpu_model(),
        vendor=host_vendor(),
        hostname=platform.node(),
        host_id=host_id(),
        cores=int(caps.get("num_physical_cores") or os.cpu_count() or 1),
        logical_cpus=os.cpu_count() or 1,
        threads=threads or torch.get_num_threads(),
        l1d_bytes=int(caps.get("l1d_cache_size", 0)) or _cache_bytes(1),
        l2_bytes=int(caps.get("l2_cache_size", 0)) or _cache_bytes(2),
        l3_bytes=_cache_bytes(3),
        memory_bytes=_memory_bytes(),
        torch=torch.__version__,
        capabilities={k: v for k, v in caps.items() if isinstance(v, bool)},
    )


def _native_vec_isa_name(caps: dict) -> str:
    if caps.get("avx512_f") and caps.get("avx512_bw") and caps.get("avx512_vl") and caps.get("avx512_dq"):
        return "avx512"
    return "avx2" if caps.get("avx2") and caps.get("fma3") else "default"


def native_isa() -> str:
    """This host's own ISA class, whatever emulation the current process has."""
    import torch

    caps = dict(torch.cpu.get_capabilities())
    return isa_class(_native_vec_isa_name(caps), caps)


def runnable(native: str) -> list[str]:
    """The classes a host of class `native` can measure: its own, and AVX2 by emulation."""
    return [native] + [isa for isa in EMULATION_ENV if isa != native and native in ("avx512", "amx")]


def can_run(native: str, isa: str) -> bool:
    return isa in runnable(native)
