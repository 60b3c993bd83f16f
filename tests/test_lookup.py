"""Tables at compile time: real torch.compile of real quantized layers with a table installed."""

import math
import warnings

import pytest
import torch
import yaml
from torch._dynamo.utils import counters
from torch._inductor import config

import kernels
from farm.measure.compiled import _run_and_get_code, kernel_summary
from farm.measure.problem import Problem, make_operands
from kernels import lowering
from tablekit import entry, table_doc

pytestmark = pytest.mark.slow
THREADS = 2
# Inductor's int4 template needs AVX512 or AMX micro-kernels: on an AVX2 host a table's int4
# template winner is declined to Inductor's own lowering (with a decision saying why).
INT4_TEMPLATE = kernels.host_isa() in ("avx512", "amx")


class QuantModel(torch.nn.Module):
    """Three weight-only-quantized linears in one graph: int8 256x256, int4 256x256, int8 128x256."""

    def __init__(self):
        super().__init__()
        self.p1 = Problem("int8", "bf16", 64, 256, 256, threads=THREADS)
        self.p2 = Problem("int4", "bf16", 64, 256, 256, 64, threads=THREADS)
        self.p3 = Problem("int8", "bf16", 64, 128, 256, threads=THREADS)
        for name, p, seed in (("l1", self.p1, 1), ("l2", self.p2, 2), ("l3", self.p3, 3)):
            ops = make_operands(p, seed)
            self.register_buffer(f"{name}_w", ops.weight)
            self.register_buffer(f"{name}_s", ops.scales)

    def forward(self, x):
        h = torch._weight_int8pack_mm(x, self.l1_w, self.l1_s)
        h = torch._weight_int4pack_mm_for_cpu(h, self.l2_w, 64, self.l2_s)
        return torch._weight_int8pack_mm(h, self.l3_w, self.l3_s)


@pytest.fixture(autouse=True)
def clean_state():
    torch.set_num_threads(THREADS)
    torch._dynamo.reset()
    counters.clear()
    yield
    kernels.uninstall()
    torch._dynamo.reset()


def _write(tmp_path, doc, name="table.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc) if isinstance(doc, dict) else doc)
    return str(path)


def _compile(model, x, **cfg):
    lowering.clear_decisions()
    with torch.no_grad(), config.patch(freezing=True, force_disable_caches=True, **cfg):
        out, sources = _run_and_get_code(torch.compile(model), x)
    return out, "\n".join(sources), lowering.decisions()


def _kernel_blocks(code):
    """Blocking constants of each template kernel in generated order."""
    return [kernel_summary([part])["blocking"] for part in code.split("cpp_fused")[1:] if "Mt_blocks = " in part]


def test_table_winners_are_compiled_with_their_knobs_and_nothing_is_autotuned(tmp_path):
    model = QuantModel().eval()
    x = torch.randn(64, 256).to(torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
    doc = table_doc([entry("int8", "bf16", 64, 256, 256, None, "cpp[tf=1,2,1;cb=1,4,16]"),
                     entry("int4", "bf16", 64, 256, 256, 64, "cpp")])
    with kernels.installed(_write(tmp_path, doc), strict=True) as result:
        assert result.active and result.entries == 2
        out, code, decisions = _compile(model, x, max_autotune=False)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    assert counters["inductor"]["select_algorithm_autotune"] == 0
    got = {(d.key.op, d.key.n): (d.candidate, d.source) for d in decisions}  # the last decision per layer
    assert got[("int8", 256)] == ("cpp[tf=1,2,1;cb=1,4,16]", "table")
    if INT4_TEMPLATE:
        assert got[("int4", 256)] == ("cpp", "table")
    else:
        assert got[("int4", 256)] == (None, "inductor")
        assert "cpp unsupported here" in [d.note for d in decisions if d.key.op == "int4"][-1]
    assert got[("int8", 128)] == (None, "inductor")  # absent key: Inductor's own (ATen without max-autotune)
    blocks = _kernel_blocks(code)
    # one template kernel per template winner; the other layers are extern ATen calls
    assert len(blocks) == (2 if INT4_TEMPLATE else 1)
    knobbed = [b for b in blocks if b["Kc_blocks"] == min(16, b["Kt_blocks"])]
    assert knobbed and knobbed[0]["Mt_blocks"] == math.ceil(64 / knobbed[0]["Mr"])  # tf m-factor 1
    assert config.cpp.gemm_thread_factors is None  # nothing leaked into global config


def test_max_autotune_benchmarks_only_the_keys_missing_from_the_table(tmp_path):
    model = QuantModel().eval()
    x = torch.randn(64, 256).to(torch.bfloat16)
    doc = table_doc([entry("int8", "bf16", 64, 256, 256, None, "aten"), entry("int4", "bf16", 64, 256, 256, 64, "aten")])
    with kernels.installed(_write(tmp_path, doc), strict=True):
        _, _, decisions = _compile(model, x, max_autotune=True)
    assert counters["inductor"]["select_algorithm_autotune"] == 1  # only the int8 128x256 layer
    assert [d.source for d in decisions].count("table") == 2


def test_knobs_stay_with_their_kernel_not_the_rest_of_the_graph(tmp_path):
    """Layer 3 (template with Inductor's heuristic) gets the same blocking whether or not
    layer 1 in the same graph carries explicit knobs (int8 both: a template on every host class)."""
    model = QuantModel().eval()
    x = torch.randn(64, 256).to(torch.bfloat16)
    plain = table_doc([entry("int8", "bf16", 64, 256, 256, None, "cpp"), entry("int8", "bf16", 64, 128, 256, None, "cpp")])
    knobbed = table_doc([entry("int8", "bf16", 64, 256, 256, None, "cpp[tf=2,1,1;cb=1,1,8]"),
                         entry("int8", "bf16", 64, 128, 256, None, "cpp")])
    blocks = []
    for doc in (plain, knobbed):
        torch._dynamo.reset()
        with kernels.installed(_write(tmp_path, doc), strict=True):
            _, code, _ = _compile(model, x)
        blocks.append(_kernel_blocks(code))
    assert len(blocks[0]) == len(blocks[1]) == 2  # layers 1 and 3; layer 2 (int4, no entry) is ATen
    assert blocks[0][1] == blocks[1][1]  # layer 3: identical heuristic blocking
    assert blocks[0][0] != blocks[1][0]  # layer 1: its own knobs
    assert blocks[1][0]["Kc_blocks"] == 8 and blocks[1][0]["Nc_blocks"] == 1


class OneInt8(torch.nn.Module):
    def __init__(self, n=256, k=256):
        super().__init__()
        ops = make_operands(Problem("int8", "bf16", 1, n, k, threads=THREADS))
        self.register_buffer("w", ops.weight)
        self.register_buffer("s", ops.scales)

    def forward(self, x):
        return torch._weight_int8pack_mm(x, self.w, self.s)


def test_nearest_m_bucket_is_used_only_where_the_table_says_it_is_safe(tmp_path):
    doc = table_doc([entry("int8", "bf16", 16, 256, 256, None, "cpp", nearest_m_ok=True),
                     entry("int8", "bf16", 256, 256, 256, None, "cpp[tf=2,1,1]", nearest_m_ok=False)])
    with kernels.installed(_write(tmp_path, doc), strict=True):
        _, code, decisions = _compile(OneInt8().eval(), torch.randn(24, 256).to(torch.bfloat16))
        assert [(d.candidate, d.source) for d in decisions] == [("cpp", "table:nearest-m")]
        assert "M=16" in decisions[0].note and _kernel_blocks(code)
        torch._dynamo.reset()
        _, code, decisions = _compile(OneInt8().eval(), torch.randn(200, 256).to(torch.bfloat16))
        assert [(d.candidate, d.source) for d in decisions] == [(None, "inductor")]
        assert not _kernel_blocks(code)


def test_dynamic_m_follows_the_documented_policy(tmp_path):
    agree = table_doc([entry("int8", "bf16", m, 256, 256, None, "cpp") for m in (16, 64)])
    disagree = table_doc([entry("int8", "bf16", 16, 256, 256, None, "cpp"), entry("int8", "bf16", 64, 256, 256, None, "aten")])
    results = []
    for doc in (agree, disagree):
        torch._dynamo.reset()
        x = torch.randn(32, 256).to(torch.bfloat16)
        torch._dynamo.mark_dynamic(x, 0)
        model = OneInt8().eval()
        with kernels.installed(_write(tmp_path, doc), strict=True):
            out, _, decisions = _compile(model, x)
        with torch.no_grad():
            torch.testing.assert_close(out.float(), model(x).float(), rtol=2e-2, atol=0.05)
        results.append([(d.key.m, d.candidate, d.source) for d in decisions])
    assert results[0] == [(None, "cpp", "table:dynamic-m")]
    assert results[1] == [(None, None, "inductor")]


def _bad_tables(tmp_path):
    good = table_doc([entry("int8", "bf16", 1, 256, 256, None, "cpp")])

    def variant(**changes):
        doc = yaml.safe_load(yaml.safe_dump(good))
        for path, value in changes.items():
            target = doc
            *parents, last = path.split(".")
            for part in parents:
                target = target[int(part)] if part.isdigit() else target[part]
            target[last] = value
        return doc

    return {
        "malformed": ("not valid YAML", "schema: [unclosed\n  - x: {"),
        "schema": ("not a supported table schema", variant(schema="kernel-farm/table/99")),
        "foreign isa": ("it is for ISA class", variant(isa="avx2" if kernels.host_isa() != "avx2" else "avx512")),
        "foreign vendor": ("hosts of one class and another vendor",
                           variant(vendor="intel" if kernels.host_vendor() != "intel" else "amd")),
        "unknown vendor": ("unknown CPU vendor 'via'", variant(vendor="via")),
        "threads": ("threads", variant(threads=THREADS * 8)),
        "torch": ("measured with torch 2.9.0", variant(torch="2.9.0")),
        "template hash": ("template source hash", variant(template_hash="0000deadbeef0000")),
        "bounds": ("cache blocking must be in", variant(**{"entries.0.winner": "cpp[cb=0,99999,1]"})),
        "product": ("multiply to 6, not to the thread count 2", variant(**{"entries.0.winner": "cpp[tf=3,2,1]"})),
        "string number": ("expected int", variant(**{"entries.0.key.m": "sixteen"})),
        "empty": ("empty", ""),
        "huge": ("byte limit", "# padding\n" * 900_000),
        "not a mapping": ("expected a mapping", "- just\n- a list\n"),
        "missing": ("cannot read table", None),
    }


def test_every_bad_table_compiles_with_inductor_and_exactly_one_warning(tmp_path):
    model = OneInt8().eval()
    x = torch.randn(1, 256).to(torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
    for name, (needle, doc) in _bad_tables(tmp_path).items():
        torch._dynamo.reset()
        path = str(tmp_path / "missing.yaml") if doc is None else _write(tmp_path, doc, f"{name.replace(' ', '_')}.yaml")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = kernels.install(path)
            out, _, decisions = _compile(model, x)
        farm_warnings = [w for w in caught if issubclass(w.category, kernels.KernelFarmWarning)]
        assert len(farm_warnings) == 1, (name, [str(w.message) for w in farm_warnings])
        assert needle in str(farm_warnings[0].message), (name, str(farm_warnings[0].message))
        assert not result.active and decisions == [], name
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        kernels.uninstall()


def test_environment_variable_selects_or_disables_the_table(tmp_path, monkeypatch):
    doc = table_doc([entry("int8", "bf16", 1, 256, 256, None, "cpp")])
    monkeypatch.setenv(kernels.ENV_VAR, _write(tmp_path, doc))
    assert kernels.install().active
    monkeypatch.setenv(kernels.ENV_VAR, "off")
    assert not kernels.install().active and lowering.active_policy() is None
