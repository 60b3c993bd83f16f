"""Inductor's C++ GEMM templates bound to one candidate's knobs.

Inductor reads config.cpp.gemm_thread_factors / gemm_cache_blocking / gemm_max_k_slices while
a template is rendered, so patching the global config would leak into every template kernel
of the graph. Instead each knob set gets its own template subclass that patches the config
only inside its own blocking computations and its own render: the knobs reach that one
kernel and no other.
"""

from __future__ import annotations

import functools

from .candidates import Knobs


class KnobsIgnored(RuntimeError):
    """The template took a code path that has no blocking (knobs would be silently ignored)."""


def _config_patch(knobs: Knobs) -> dict:
    patch = {}
    if knobs.thread_factors is not None:
        patch["cpp.gemm_thread_factors"] = ",".join(map(str, knobs.thread_factors))
    if knobs.cache_blocking is not None:
        patch["cpp.gemm_cache_blocking"] = ",".join(map(str, knobs.cache_blocking))
    if knobs.k_slices is not None:
        patch["cpp.gemm_max_k_slices"] = knobs.k_slices
    return patch


@functools.cache
def bind(base: type, knobs: Knobs) -> type:
    """A subclass of the template class `base` whose blocking uses `knobs`."""
    from torch._inductor import config

    if knobs.is_default():
        return base
    patch = _config_patch(knobs)

    class KnobbedTemplate(base):  # type: ignore[misc, valid-type]
        farm_knobs = knobs

        def _thread_blocking(self, num_threads):
            with config.patch(patch):
                return super()._thread_blocking(num_threads)

        def _cache_blocking(self, num_threads):
            with config.patch(patch):
                return super()._cache_blocking(num_threads)

        def render(self, kernel, *args, **kwargs):
            if _takes_small_m_path(self):
                raise KnobsIgnored(
                    f"knobs {knobs.as_dict()} have no effect: Inductor renders this int8 "
                    "problem with SMALL_M_GEMM_TEMPLATE, which has no thread or cache blocking"
                )
            with config.patch(patch):
                return super().render(kernel, *args, **kwargs)

    KnobbedTemplate.__name__ = KnobbedTemplate.__qualname__ = f"{base.__name__}_farm"
    return KnobbedTemplate


def _takes_small_m_path(template) -> bool:
    """Mirror of CppGemmTemplate.is_int8_woq_gemm_small_m_dim from the template's own state."""
    import torch

    if template.is_dynamic_M or template.name != "CppMicroGemmFP32Vec":
        return False
    x_dtype = template.input_nodes[0].get_dtype()
    w_dtype = template.input_nodes[1].get_dtype()
    rb = template.register_blocking
    return (
        x_dtype is torch.bfloat16
        and w_dtype is torch.int8
        and template.m < 16
        and template.n % rb.block_n == 0
        and template.k % rb.block_k == 0
    )
