"""Thread counts: table sets (one table per thread count), thread transfer and its measured regret.

Fast tier: lookup and validation over hand-built tables (pure functions, no compile). Slow tier:
the regret aggregated from real measurements at threads 1 and 2, and a real torch.compile at a
thread count no table measured.
"""

import io
import math
import os
import warnings

import pytest
import torch
import yaml
from rich.console import Console
from torch._inductor import config

import kernels
from farm.cli import main
from farm.measure.compiled import _run_and_get_code, kernel_summary
from farm.measure.manager import measure
from farm.measure.problem import Problem, make_operands
from farm.tables.aggregate import aggregate, combine
from farm.tables.commands import show
from kernels import lowering
from kernels.candidates import parse, transfers_across_threads
from kernels.provenance import template_hash, torch_version
from kernels.table import VENDORS, TableError, dump, load, load_set, lookup_set
from tablekit import entry, table_doc

ISA = kernels.host_isa()


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    kernels.uninstall()
    torch.set_num_threads(before)


def _transfer(from_threads, regret_worst=0.01, keys=4, transferable=3, agree=3, regret_geomean=0.0):
    return {"from_threads": from_threads, "keys": keys, "transferable": transferable, "agree": agree,
            "regret_geomean": regret_geomean, "regret_worst": regret_worst}


def _e(m, n, k, winner, nearest_m_ok=False):
    return entry("int8", "bf16", m, n, k, None, winner, nearest_m_ok=nearest_m_ok)


T1 = [_e(32, 256, 256, "cpp[cb=1,4,16]"),         # agreed, thread-independent: transfers
      _e(32, 512, 256, "cpp"),                    # the counts disagree
      _e(32, 256, 512, "cpp[tf=1,1,1]"),          # thread factors, measured at 1 thread only
      _e(32, 128, 256, "aten"),                   # measured at 1 thread only: transfers
      _e(16, 1024, 256, "dq", nearest_m_ok=True),  # nearest-M, agreed (nearest-M answers between
      _e(256, 1024, 256, "dq", nearest_m_ok=True),  # measured M buckets only)
      _e(16, 2048, 256, "cpp", nearest_m_ok=True),  # nearest-M, not safe at 2 threads
      _e(64, 2048, 256, "cpp", nearest_m_ok=True)]
T2 = [_e(32, 256, 256, "cpp[cb=1,4,16]"),
      _e(32, 512, 256, "aten"),
      _e(16, 1024, 256, "dq", nearest_m_ok=True),
      _e(64, 1024, 256, "dq", nearest_m_ok=True),
      _e(16, 2048, 256, "cpp", nearest_m_ok=False),
      _e(64, 256, 512, "cpp[tf=2,1,1]")]


def _dir(tmp_path, docs, name="tables"):
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    for i, doc in enumerate(docs):
        (folder / f"{doc['isa']}-t{doc['threads']}-{i}.yaml").write_text(yaml.safe_dump(doc))
    return str(folder)


def _pair(t1=None, t2=None, **t2_header):
    return [table_doc(T1, isa=ISA, threads=1, transfer=[_transfer(2)]) if t1 is None else t1,
            table_doc(T2, isa=ISA, threads=2, **{"transfer": [_transfer(1)], **t2_header}) if t2 is None else t2]


def _ask(tables, threads, m, n, k):
    candidate, source, note = lookup_set(tables, threads, "int8", "bf16", m, n, k, None)
    return (candidate.id if candidate else None), source, note


def test_transfer_answers_only_with_agreed_thread_independent_choices(tmp_path):
    tables = load_set(_dir(tmp_path, _pair()), ISA)
    assert _ask(tables, 3, 32, 256, 256)[:2] == ("cpp[cb=1,4,16]", "table:transfer")
    assert "1, 2 threads agree" in _ask(tables, 3, 32, 256, 256)[2]
    assert _ask(tables, 3, 32, 128, 256)[:2] == ("aten", "table:transfer")  # only 1 thread measured it
    choice, source, note = _ask(tables, 3, 32, 512, 256)
    assert (choice, source) == (None, "inductor") and "disagree (1: cpp, 2: aten)" in note
    choice, source, note = _ask(tables, 3, 32, 256, 512)
    assert (choice, source) == (None, "inductor") and "depends on the thread count" in note
    choice, source, note = _ask(tables, 4, 48, 1024, 256)  # nearest M=16 at 1 thread, M=64 at 2
    assert (choice, source) == ("dq", "table:transfer") and "1: M=16, 2: M=64" in note
    choice, source, note = _ask(tables, 4, 32, 2048, 256)  # the 2-thread entry is not safe for other M
    assert (choice, source) == (None, "inductor") and "decide nothing" in note
    assert _ask(tables, 3, 32, 4096, 4096)[:2] == (None, "inductor")  # no entry, no rule
    # dynamic M: every count with the shape must have a dynamic-M answer, and they must agree
    candidate, source, _ = lookup_set(tables, 3, "int8", "bf16", None, 1024, 256, None)
    assert (candidate.id, source) == ("dq", "table:transfer")
    assert lookup_set(tables, 3, "int8", "bf16", None, 256, 256, None)[:2] == (None, "inductor")  # static blocking


def test_a_measured_thread_count_uses_its_own_table_and_borrows_only_where_it_has_nothing_to_say(tmp_path):
    tables = load_set(_dir(tmp_path, _pair()), ISA)
    assert _ask(tables, 2, 64, 256, 512)[:2] == ("cpp[tf=2,1,1]", "table")
    assert _ask(tables, 1, 32, 512, 256)[:2] == ("cpp", "table")
    # No 2-thread entry of 128x256 at any M and no rule: the 1-thread entry is lent, gate open.
    choice, source, note = _ask(tables, 2, 32, 128, 256)
    assert (choice, source) == ("aten", "table:transfer") and "the 2-thread table decides nothing here" in note
    # The 2-thread M=16 entry of 2048x256 may not serve M=32, so it says nothing about M=32: the
    # 1-thread nearest-M entry (safe between its M 16 and 64) is lent.
    choice, source, note = _ask(tables, 2, 32, 2048, 256)
    assert (choice, source) == ("cpp", "table:transfer") and "M=16 entry is not safe for other M" in note
    # Lending stays on the transfer's terms: the 1-thread M=32 entry of 256x512 has thread factors.
    choice, source, note = _ask(tables, 2, 32, 256, 512)
    assert (choice, source) == (None, "inductor") and "nothing lent" in note and "depends on the thread count" in note
    # A rule at 2 threads covering the op is evidence: unsure there means Inductor, nothing lent.
    unsure = _pair(t2=table_doc(T2, isa=ISA, threads=2, transfer=[_transfer(1)], rule=_rule(None)))
    assert _ask(load_set(_dir(tmp_path, unsure, "unsure"), ISA), 2, 32, 128, 256)[:2] == (None, "inductor")
    # The measured regret between the counts beyond noise closes lending as it closes transfer.
    closed = _pair(transfer=[_transfer(1, regret_worst=0.08)])
    assert _ask(load_set(_dir(tmp_path, closed, "closed"), ISA), 2, 32, 128, 256)[:2] == (None, "inductor")


def test_a_lent_dq_needs_a_dq_win_of_that_dense_size_at_no_larger_m_at_the_borrowing_count(tmp_path):
    # Measured on the AMD EPYC: int8 M=32 4096x4096 dq 1.51x at 2 threads, 0.59x at 1 thread.
    # The 1-thread table saw dq win at M=128 on 4096x4096-sized weights, at M=32 only on small ones.
    t1 = table_doc([_e(32, 256, 256, "dq"), _e(128, 2048, 8192, "dq")], isa=ISA, threads=1, transfer=[_transfer(2)])
    t2 = table_doc([_e(32, 4096, 4096, "dq"), _e(128, 4096, 4096, "dq")], isa=ISA, threads=2, transfer=[_transfer(1)])
    tables = load_set(_dir(tmp_path, [t1, t2]), ISA)
    choice, source, note = _ask(tables, 1, 32, 4096, 4096)
    assert (choice, source) == (None, "inductor") and "no int8 dq winner at M<=32 was measured" in note
    assert _ask(tables, 1, 128, 4096, 4096)[:2] == ("dq", "table:transfer")


def _rule(leaf):
    return {"features": ["log2_m", "log2_n", "log2_k", "int4", "act_bytes", "log2_group", "weight_mib", "intensity"],
            "nodes": [{"leaf": leaf, "samples": 3}], "domain": [["int8", "bf16"]], "validation": {}}


def test_transfer_by_the_rules_needs_every_counts_rule_to_agree(tmp_path):
    agree = _pair(table_doc(T1, isa=ISA, threads=1, transfer=[_transfer(2)], rule=_rule("cpp")),
                  table_doc(T2, isa=ISA, threads=2, transfer=[_transfer(1)], rule=_rule("cpp")))
    choice, source, note = _ask(load_set(_dir(tmp_path, agree, "agree"), ISA), 3, 8, 4096, 4096)
    assert (choice, source) == ("cpp", "table:transfer") and "rules of 1, 2 threads agree" in note
    disagree = _pair(agree[0], table_doc(T2, isa=ISA, threads=2, transfer=[_transfer(1)], rule=_rule("aten")))
    choice, source, note = _ask(load_set(_dir(tmp_path, disagree, "disagree"), ISA), 3, 8, 4096, 4096)
    assert (choice, source) == (None, "inductor") and "the rules disagree" in note
    one_rule = _pair(agree[0])  # the 2-thread table has no rule: unsure
    assert _ask(load_set(_dir(tmp_path, one_rule, "one"), ISA), 3, 8, 4096, 4096)[:2] == (None, "inductor")


@pytest.mark.parametrize("docs, needle", [
    (lambda: _pair()[1:], "only 2 threads measured"),
    (lambda: _pair(t1=table_doc(T1, isa=ISA, threads=1)), "no measured transfer regret from 2 to 1 threads"),
    (lambda: _pair(transfer=[_transfer(1, regret_worst=0.08)]), "lost up to 8.0% at 2 threads"),
    (lambda: _pair(transfer=[_transfer(1, transferable=0, regret_worst=None, regret_geomean=None)]), "no measured transfer"),
], ids=["one count", "no regret", "regret beyond noise", "nothing transferred"])
def test_transfer_is_off_without_measured_regret_within_noise(tmp_path, docs, needle):
    tables = load_set(_dir(tmp_path, docs()), ISA)
    choice, source, note = _ask(tables, 3, 32, 256, 256)
    assert (choice, source) == (None, "inductor") and needle in note
    torch.set_num_threads(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = kernels.install(tables.path)
    assert not result.active and not result.transfer
    assert [needle in str(w.message) for w in caught if issubclass(w.category, kernels.KernelFarmWarning)] == [True]


def test_install_reports_the_tables_and_transfer_and_one_file_never_transfers(tmp_path):
    folder = _dir(tmp_path, _pair())
    torch.set_num_threads(3)
    result = kernels.install(folder, strict=True)
    assert result.active and result.transfer and result.threads == 3
    assert sorted(os.path.basename(p) for p in result.tables) == [f"{ISA}-t1-0.yaml", f"{ISA}-t2-1.yaml"]
    assert result.entries == len(T1) + len(T2)
    torch.set_num_threads(2)
    result = kernels.install(folder, strict=True)
    assert result.active and not result.transfer
    torch.set_num_threads(3)
    with pytest.raises(TableError, match="it is for 2 threads, this process runs 3"):
        kernels.install(os.path.join(folder, f"{ISA}-t2-1.yaml"), strict=True)
    one = load_set(os.path.join(folder, f"{ISA}-t2-1.yaml"), ISA)
    assert "one table file" in _ask(one, 3, 32, 256, 256)[2]


def test_a_directory_with_two_tables_of_one_thread_count_is_an_error_naming_both(tmp_path):
    folder = _dir(tmp_path, [*_pair(), table_doc(T2, isa=ISA, threads=2)])
    with pytest.raises(TableError, match=r"two tables for .* at 2 threads: .*-t2-1\.yaml and .*-t2-2\.yaml"):
        load_set(folder, ISA)
    torch.set_num_threads(2)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert not kernels.install(folder).active
    with pytest.raises(TableError, match="no table for ISA class"):
        load_set(_dir(tmp_path, [table_doc(T2, isa="default" if ISA != "default" else "avx2", threads=2)], "foreign"), ISA)


@pytest.mark.parametrize("transfer, needle", [
    ({"from_threads": 1}, "transfer: expected a list"),
    ([_transfer(2)], "transfer[0].from_threads: 2 is this table's own"),
    ([_transfer(1), _transfer(1)], "transfer[1].from_threads"),
    ([_transfer(1, agree=9)], "transfer[0].agree: 9 is outside 0..4"),
    ([_transfer(1, transferable=-1)], "transfer[0].transferable"),
    ([{**_transfer(1), "keys": "4"}], "transfer[0].keys: expected int"),
    ([_transfer(1, regret_worst=None)], "transfer[0].regret_worst"),
    ([_transfer(1, regret_worst=math.inf)], "transfer[0].regret_worst"),
    ([_transfer(1, regret_worst=0.01, regret_geomean=0.05)], "transfer[0].regret_worst: 0.01 is below the geomean"),
    ([{**_transfer(1), "note": "x"}], "transfer[0]: expected the fields"),
    (["x"], "transfer[0]: expected a mapping"),
])
def test_the_transfer_field_is_validated_naming_the_field(tmp_path, transfer, needle):
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(table_doc(T2, isa=ISA, threads=2, transfer=transfer)))
    with pytest.raises(TableError) as info:
        load(str(path))
    assert needle in str(info.value)


def test_the_shipped_tables_are_named_by_class_vendor_and_thread_count_and_load_as_a_set():
    names = sorted(os.listdir(kernels.TABLES_DIR))
    assert names and all(n.endswith(".yaml") for n in names)
    for name in names:
        table = load(os.path.join(kernels.TABLES_DIR, name))
        assert table.vendor in VENDORS  # every shipped table names the vendor whose hosts it measured
        assert name == f"{table.isa}-{table.vendor}-t{table.threads}.yaml"
    for isa, vendor in {tuple(n.split("-")[:2]) for n in names}:
        assert load_set(kernels.TABLES_DIR, isa, vendor=vendor).directory
    path = kernels.shipped_table("avx2", threads=2, vendor="amd")
    assert path.endswith("avx2-amd-t2.yaml")
    assert kernels.shipped_table("avx2", threads=64, vendor="amd") == kernels.TABLES_DIR  # no such file: the directory


@pytest.mark.parametrize("text, vendor", [("GenuineIntel", "intel"), ("AuthenticAMD", "amd"), ("AMD EPYC 9R14", "amd"),
                                          ("Intel(R) Xeon(R) Processor", "intel"), ("HygonGenuine", "other"),
                                          ("Lambda Processor", "other"), ("", "other"), (None, "other")])
def test_vendor_of_reads_cpuid_vendor_strings_and_model_names(text, vendor):
    assert kernels.vendor_of(text) == vendor


def test_a_directory_serves_only_its_own_vendors_tables_and_names_what_it_found(tmp_path):
    here = kernels.host_vendor()
    other = "intel" if here != "intel" else "amd"
    folder = _dir(tmp_path, [table_doc(T2, isa=ISA, threads=2, vendor=other)])
    with pytest.raises(TableError, match=f"no table for ISA class {ISA} on {here} hosts \\(found: {ISA}/{other} 2t\\)"):
        load_set(folder, ISA, vendor=here)
    torch.set_num_threads(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not kernels.install(folder).active  # never another vendor's answers
    assert any(f"on {here} hosts" in str(w.message) for w in caught)
    both = _dir(tmp_path, [table_doc(T2, isa=ISA, threads=2, vendor=other), table_doc(T2, isa=ISA, threads=2, vendor=here)],
                name="both")
    assert load_set(both, ISA, vendor=here).tables[2].vendor == here  # two vendors at one count: each its own
    legacy = _dir(tmp_path, [table_doc(T2, isa=ISA, threads=2)], name="legacy")  # no vendor: written before them
    assert load_set(legacy, ISA, vendor=here).tables[2].vendor is None
    result = kernels.install(legacy, strict=True)
    assert result.active and result.vendor == here
    kernels.uninstall()


def test_the_choices_that_transfer_across_thread_counts():
    assert all(transfers_across_threads(parse(c)) for c in ("aten", "dq", "dq[fp32]", "cpp", "cpp[cb=1,16,64;ks=1]"))
    assert not any(transfers_across_threads(parse(c)) for c in ("cpp[tf=2,1,1]", "cpp[tf=1,1,1;cb=1,16,64]"))


TINY = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 640, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": False}


def test_coverage_reports_transfer_decisions_at_an_unmeasured_thread_count(tmp_path, capsys):
    import json

    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(TINY))
    docs = [table_doc([_e(1, 256, 256, "cpp")], isa=ISA, threads=1, transfer=[_transfer(2)]),
            table_doc([_e(1, 256, 256, "cpp"), _e(1, 640, 256, "cpp[tf=1,2,1]")], isa=ISA, threads=2,
                      transfer=[_transfer(1)])]
    folder = _dir(tmp_path, docs)
    argv = ["coverage", str(config_path), "--table", folder, "--isa", ISA, "--m", "1", "--ops", "int8"]
    assert main([*argv, "--threads", "3", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["transfer"] and doc["refused"] == []
    by = {d["layer"]: d for d in doc["decisions"]}
    assert (by["q_proj"]["source"], by["q_proj"]["choice"]) == ("table:transfer", "cpp")  # q/o: 256x256
    assert by["up_proj"]["source"] == "inductor" and "depends on the thread count" in by["up_proj"]["note"]
    assert doc["models"][0]["by_source"]["table:transfer"] == 2
    assert main([*argv, "--threads", "3"]) == 0
    out = capsys.readouterr().out
    assert "thread transfer: no table for 3 threads" in out and "table:transfer" in out
    assert main([*argv, "--threads", "2", "--json"]) == 0
    by = {d["layer"]: d for d in json.loads(capsys.readouterr().out)["decisions"]}
    assert (by["up_proj"]["source"], by["up_proj"]["choice"]) == ("table", "cpp[tf=1,2,1]")


# --- slow tier: real measurements, real compiles ---------------------------------------------------

@pytest.mark.slow
def test_aggregation_measures_the_transfer_regret_from_real_records_at_two_thread_counts(quick_protocol, tmp_path):
    # One tiny key at threads 1 and 2: ATen, its control and one cache blocking (each transfers),
    # so whichever wins at each count, the other count's winner was measured here too.
    records = [measure(Problem("int8", "bf16", 32, 256, 256, threads=t), protocol=quick_protocol, only=["cpp[cb=1,4,16]"])
               for t in (1, 2)]
    result = aggregate(records, torch_version(), template_hash(), resamples=200)
    isa = records[0]["host"]["isa"]
    docs = {t: result.tables[(isa, kernels.host_vendor(), t)] for t in (1, 2)}
    for here, there in ((2, 1), (1, 2)):
        [rec] = docs[here]["transfer"]
        mine, theirs = (docs[t]["entries"][0]["winner"] for t in (here, there))
        stats = combine([records[here - 1]])  # this count's own records
        ratio = stats[mine].speedup / stats[theirs].speedup  # this count's winner over the other count's, here
        assert rec == {"from_threads": there, "keys": 1, "transferable": 1, "agree": int(mine == theirs),
                       "regret_geomean": round(ratio - 1, 4), "regret_worst": round(ratio - 1, 4)}
        assert mine != theirs or rec["regret_worst"] == 0
        path = str(tmp_path / f"{isa}-t{here}.yaml")
        dump(docs[here], path)
        assert load(path).transfer[there].transferable == 1
        out = io.StringIO()
        show(path, Console(file=out, width=250))
        assert f"thread transfer from {there} threads: 1 keys measured at both" in out.getvalue()


class TwoInt8(torch.nn.Module):
    """Two int8 linears: 256x256 (agreed at 1 and 2 threads) and 512x256 (the counts disagree)."""

    def __init__(self):
        super().__init__()
        for name, n in (("a", 256), ("b", 512)):
            ops = make_operands(Problem("int8", "bf16", 32, n, 256, threads=2))
            self.register_buffer(f"{name}_w", ops.weight)
            self.register_buffer(f"{name}_s", ops.scales)

    def forward(self, x):
        return torch._weight_int8pack_mm(x, self.a_w, self.a_s), torch._weight_int8pack_mm(x, self.b_w, self.b_s)


@pytest.mark.slow
def test_a_real_compile_at_an_unmeasured_thread_count_takes_the_transfer_decision(tmp_path):
    model = TwoInt8().eval()
    x = torch.randn(32, 256).to(torch.bfloat16)
    torch.set_num_threads(3)  # the tables measured 1 and 2 threads
    with torch.no_grad():
        ref = model(x)
    torch._dynamo.reset()
    lowering.clear_decisions()
    with kernels.installed(_dir(tmp_path, _pair()), strict=True) as result:
        assert result.transfer
        with torch.no_grad(), config.patch(freezing=True, force_disable_caches=True):
            out, code = _run_and_get_code(torch.compile(model), x)
        decisions = lowering.decisions()
    torch._dynamo.reset()
    for got, want in zip(out, ref):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item())
    got = {d.key.n: (d.candidate, d.source, d.key.threads) for d in decisions}
    assert got[256] == ("cpp[cb=1,4,16]", "table:transfer", 3)
    assert got[512] == (None, "inductor", 3)
    assert "disagree" in [d.note for d in decisions if d.key.n == 512][-1]
    blocks = [kernel_summary([part])["blocking"] for part in "\n".join(code).split("cpp_fused")[1:] if "Mt_blocks = " in part]
    assert len(blocks) == 1 and blocks[0]["Kc_blocks"] == min(16, blocks[0]["Kt_blocks"])  # its cb, at 3 threads
