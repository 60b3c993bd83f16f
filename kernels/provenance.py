"""What a measurement depends on besides the problem: torch version and template sources."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os

# The sources whose change can change a candidate's generated kernel: Inductor's template,
# micro-kernels and WOQ lowering, and this package's own lowering and knob binding.
_INDUCTOR_SOURCES = (
    "torch._inductor.codegen.cpp_gemm_template",
    "torch._inductor.codegen.cpp_micro_gemm",
    "torch._inductor.codegen.cpp_template",
    "torch._inductor.quantized_lowerings",
)
_OWN_SOURCES = ("template.py",)  # how knobs reach the template; the rest only routes choices


@functools.cache
def template_hash() -> str:
    """sha256 (16 hex) over the template sources, read from disk without importing them."""
    digest = hashlib.sha256()
    for name in _INDUCTOR_SOURCES:
        spec = importlib.util.find_spec(name)
        with open(spec.origin, "rb") as f:
            digest.update(f.read())
    here = os.path.dirname(__file__)
    for name in _OWN_SOURCES:
        with open(os.path.join(here, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


@functools.cache
def threads_hash() -> str:
    """sha256 (16 hex) of how the nt knob reaches the template (template_threads.py). Kept apart
    from template_hash so that adding nt left the tables and records of the other knobs fresh;
    only what measured an nt candidate carries and checks it."""
    with open(os.path.join(os.path.dirname(__file__), "template_threads.py"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def torch_version() -> str:
    from importlib.metadata import version

    return version("torch")


def torch_release(version: str) -> str:
    """The release without the local build tag: 2.13.0+cpu and 2.13.0+cu130 are one release,
    with the same Inductor sources (the template hash says whether those changed)."""
    return version.split("+", 1)[0]


def same_release(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and torch_release(a) == torch_release(b)
