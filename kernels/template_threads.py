"""The nt knob: one C++ GEMM template kernel on fewer threads than the process has.

Inductor's add_choices takes the template's num_threads from parallel_num_threads()
(config.cpp.threads, else torch's thread count), and so does its choice of micro-kernel (an
occupancy score), so config.cpp.threads is set to nt around this template's add_choices and
render only. The template then renders `#pragma omp parallel num_threads(nt)` (at nt=1 no
parallel region, Inductor's own branch), blocks for nt threads and checks thread factors
against nt; every other kernel of the graph is generated outside these patches, with the
process's count. The small-M int8 template has no num_threads at all (a bare `#pragma omp
parallel`): its render gets a copy of that template text that names nt.

ATen's extern kernel gets no nt: its at::parallel_for runs on ATen's process-global thread
count (at::set_num_threads sets a global and the caller's OpenMP ICV), and the only per-call
route is to set and restore it around the call in generated wrapper code, which races with any
other thread running ops at the time, needs exception-safe restoring in both the Python and
the C++ wrapper, and costs a call through Python per token on exactly the small problems nt is
for. The lowering therefore offers nt on the template only.

A module of its own, wrapped around kernels.template.bind's class: the binding of the older
knobs (tf, cb, ks) keeps its source, and with it the template hash that tables and records of
those knobs were measured under; this module's source is hashed separately
(kernels.provenance.threads_hash) into the provenance of what measured nt.
"""

from __future__ import annotations

import contextlib
import functools

from .template import KnobsIgnored

# Inductor 2.13's SMALL_M_GEMM_TEMPLATE opens its parallel region with this line and no
# num_threads clause; nt rewrites exactly this line (and refuses if Inductor's text changed).
_SMALL_M_PARALLEL = "\n    # pragma omp parallel\n"


def _threads_patch(nt: int) -> dict:
    """config.cpp.threads = nt makes parallel_num_threads() answer nt, and (being >= 1) makes
    the template write num_threads(nt) instead of a bare pragma when nt happens to equal
    os.cpu_count(); dynamic_threads would also drop the clause, so it is off for this kernel."""
    return {"cpp.threads": nt, "cpp.dynamic_threads": False}


def _small_m_source(nt: int) -> str:
    """SMALL_M_GEMM_TEMPLATE with its parallel region on nt threads. At nt=1 too (a team of one
    costs a function call, not a wake-up): dropping the region would leave its `omp for`
    orphaned, bound to whatever team the caller runs in."""
    from torch._inductor.codegen import cpp_gemm_template

    source = cpp_gemm_template.SMALL_M_GEMM_TEMPLATE
    if source.count(_SMALL_M_PARALLEL) != 1:
        raise KnobsIgnored(
            f"nt={nt} cannot be applied: this Inductor's SMALL_M_GEMM_TEMPLATE does not open its "
            "parallel region the way kernels.template_threads expects (Inductor 2.13's text)"
        )
    return source.replace(_SMALL_M_PARALLEL, "\n    #pragma omp parallel num_threads({{num_threads}})\n")


@contextlib.contextmanager
def _small_m_threads(nt: int):
    """Inductor's render picks SMALL_M_GEMM_TEMPLATE from its module by name: with nt, that name
    holds the nt variant for the duration of this one render (rendering is single-threaded)."""
    from unittest import mock

    from torch._inductor.codegen import cpp_gemm_template

    with mock.patch.object(cpp_gemm_template, "SMALL_M_GEMM_TEMPLATE", _small_m_source(nt)):
        yield


@functools.cache
def bind_threads(base: type, nt: int | None) -> type:
    """A subclass of the template class `base` (possibly already knob-bound) on nt threads."""
    from torch._inductor import config

    if nt is None:
        return base
    patch = _threads_patch(nt)

    class ThreadedTemplate(base):  # type: ignore[misc, valid-type]
        farm_threads = nt

        @classmethod
        def add_choices(cls, *args, **kwargs):
            with config.patch(patch):
                return super().add_choices(*args, **kwargs)

        def render(self, kernel, *args, **kwargs):
            if self.num_threads != nt:
                raise RuntimeError(f"template built for {self.num_threads} threads, not nt={nt}")
            with config.patch(patch), _small_m_threads(nt):
                return super().render(kernel, *args, **kwargs)

    ThreadedTemplate.__name__ = ThreadedTemplate.__qualname__ = f"{base.__name__}_nt{nt}"
    return ThreadedTemplate
