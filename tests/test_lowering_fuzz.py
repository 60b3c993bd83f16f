"""A table never breaks a compile: the lowering's declines, its boundary, and a property-based fuzz.

The fuzz (hypothesis, fixed seed) compiles random int8/int4 layers under random configs with a
table that hits the exact key, a nearby M or nothing; KERNEL_FARM_FUZZ_EXAMPLES sets how many
(CI: 20, about 3 minutes on 2 cores). `farm bench fuzz --examples N` is the longer run.
"""

import os
import warnings
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from torch._inductor import config

import kernels
from farm.bench import fuzz
from farm.measure.compiled import TOLERANCE, relative_error
from farm.measure.problem import Problem, make_operands
from kernels import lowering
from kernels.candidates import parse

THREADS = 2
FUZZ_EXAMPLES = int(os.environ.get("KERNEL_FARM_FUZZ_EXAMPLES", "20"))


# --- declines without compiling (fast) ---------------------------------------------------------


def _node(size, dtype, stride=None, contiguous=True):
    """The few IR-node methods _key reads."""
    stride = stride or [size[-1], 1][-len(size):]
    return SimpleNamespace(get_size=lambda: size, get_dtype=lambda: dtype, get_stride=lambda: stride,
                           get_layout=lambda: SimpleNamespace(is_contiguous=lambda: contiguous))


def test_problems_the_farm_cannot_key_are_declined_with_the_reason():
    import sympy

    s0 = sympy.Symbol("s0", positive=True, integer=True)
    x, w8, w4 = _node([4, 64], torch.bfloat16), _node([32, 64], torch.int8), _node([32, 32], torch.uint8)
    cases = {
        "symbolic": (("int8", _node([s0, s0], torch.bfloat16), w8, 32, s0, None), "symbolic N or K"),
        "rank": (("int8", _node([2, 4, 64], torch.bfloat16), w8, 32, 64, None), "rank 3"),
        "dtype": (("int8", _node([4, 64], torch.float64), w8, 32, 64, None), "float64"),
        "weight dtype": (("int8", x, _node([32, 64], torch.int32), 32, 64, None), "weight dtype"),
        "group": (("int4", x, w4, 32, 64, 16), "group size 16"),
        "strided": (("int8", _node([4, 64], torch.bfloat16, stride=[1, 4]), w8, 32, 64, None), "strided"),
        "weight layout": (("int8", x, _node([32, 64], torch.int8, contiguous=False), 32, 64, None), "non-contiguous"),
    }
    for name, (args, needle) in cases.items():
        key, why = lowering._key(*args)
        assert why and needle in why, (name, why)
    key, why = lowering._key("int8", _node([s0, 64], torch.bfloat16), w8, 32, 64, None)
    assert why is None and key.m is None and (key.n, key.k) == (32, 64)  # symbolic M alone is keyed


# --- real compiles (slow) ----------------------------------------------------------------------


class Int4Linear(torch.nn.Module):
    def __init__(self, n: int, k: int, group: int = 64):
        super().__init__()
        ops = make_operands(Problem("int4", "bf16", 1, n, k, group))
        self.group = group
        self.register_buffer("w", ops.weight)
        self.register_buffer("s", ops.scales)

    def forward(self, x):
        return torch._weight_int4pack_mm_for_cpu(x, self.w, self.group, self.s)


@pytest.fixture
def clean():
    torch.set_num_threads(THREADS)
    lowering._warned.clear()
    yield
    kernels.uninstall()


def _compile(model, x, **cfg):
    lowering.clear_decisions()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad(), \
            config.patch(freezing=True, force_disable_caches=True):
        warnings.simplefilter("always")
        out = torch.compile(model, **cfg)(x)
    farm = [str(w.message) for w in caught if issubclass(w.category, kernels.KernelFarmWarning)]
    return out, lowering.decisions(), farm


@pytest.mark.slow
def test_int4_with_dynamic_shapes_compiles_with_the_shipped_table(clean):
    """Issue 14: symbolic K reached int() in _key and broke the compile."""
    model = Int4Linear(2048, 2048).eval()
    x = torch.randn(4, 2048).to(torch.bfloat16)
    assert kernels.install().active
    out, decisions, farm = _compile(model, x, dynamic=True)
    with torch.no_grad():
        assert relative_error(out, model(x)) <= TOLERANCE["bf16"]
    assert farm == []
    assert [(d.key.op, d.candidate, d.source) for d in decisions] == [("int4", None, "inductor")]
    assert "symbolic N or K" in decisions[0].note


@pytest.mark.slow
def test_a_failing_farm_lowering_warns_once_and_leaves_the_op_to_inductor(clean, monkeypatch, tmp_path):
    def broken(*_args):
        raise RuntimeError("boom from a future torch")

    monkeypatch.setattr(lowering, "_unkeyable", broken)
    assert kernels.install().active
    x = torch.randn(4, 256).to(torch.bfloat16)
    warned = []
    for _ in range(2):  # two compiles (own modules), one warning
        model = Int4Linear(256, 256).eval()
        torch._dynamo.reset()
        out, decisions, farm = _compile(model, x, dynamic=False)
        with torch.no_grad():
            assert relative_error(out, model(x)) <= TOLERANCE["bf16"]
        assert [(d.candidate, d.source) for d in decisions] == [(None, "inductor")]
        assert "boom from a future torch" in decisions[0].note
        warned += farm
    assert len(warned) == 1 and "boom from a future torch" in warned[0]

    # Under the farm's measurement policy the error is the measurement's result: it propagates.
    lowering.register(lowering.Forced(parse("aten")))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="boom from a future torch"):
        _compile(Int4Linear(256, 256).eval(), x, dynamic=False)


@pytest.mark.slow
@settings(max_examples=FUZZ_EXAMPLES, derandomize=True, deadline=None, database=None,
          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
@given(fuzz.cases(THREADS))
def test_fuzz_every_case_compiles_matches_eager_and_follows_the_policy(case):
    """Each case in a forked child (a segfault is a failed case, not a dead test run)."""
    torch.set_num_threads(THREADS)
    outcome = fuzz.isolated(case)
    assert not outcome.problems, (case, outcome.problems, outcome.decisions)
