"""The model zoo, `farm shapes` and `farm coverage` (fast tier: no compiles)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from farm.cli import main
from farm.errors import UserError
from farm.sweep.spec import parse_spec
from farm.zoo.coverage import model_coverage, open_table
from farm.zoo.shapes import FUSED_MODEL_TYPES, layers, load_zoo, plan, problems, read_config
from tablekit import entry, table_doc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 640, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": False}


def _config(tmp_path, **changes) -> str:
    doc = {**TINY, **changes}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({k: v for k, v in doc.items() if v is not None}))
    return str(path)


def test_the_zoo_loads_with_at_least_15_models_of_many_families():
    zoo = load_zoo()
    assert len(zoo) >= 15
    assert len({d.family for d in zoo.values()}) >= 10
    assert all("/" in d.source for d in zoo.values())  # each entry names its Hugging Face model id


@pytest.mark.parametrize("model", sorted(load_zoo()))
def test_every_models_layers_are_positive_and_consistent(model):
    d = load_zoo()[model]
    q, kv = d.num_attention_heads * d.head, d.num_key_value_heads * d.head
    assert d.num_attention_heads % d.num_key_value_heads == 0
    for fused in (False, True):
        found = {layer.name: (layer.n, layer.k) for layer in layers(model, fused)}
        assert all(n > 0 and k > 0 for n, k in found.values())
        assert found["o_proj"] == (d.hidden_size, q)
        assert found["down_proj"] == (d.hidden_size, d.intermediate_size)
        assert found["lm_head"] == (d.vocab_size, d.hidden_size)
        if fused or d.model_type in FUSED_MODEL_TYPES:
            assert found["qkv_proj"] == (q + 2 * kv, d.hidden_size)
            assert found["gate_up_proj"] == (2 * d.intermediate_size, d.hidden_size)
            assert len(found) == 5
        else:
            assert found["q_proj"] == (q, d.hidden_size)
            assert found["k_proj"] == found["v_proj"] == (kv, d.hidden_size)
            assert found["gate_proj"] == found["up_proj"] == (d.intermediate_size, d.hidden_size)
            assert len(found) == 8


def test_head_dim_that_differs_from_hidden_over_heads_shapes_q_and_o():
    found = {layer.name: (layer.n, layer.k) for layer in layers("Qwen3-0.6B")}
    assert found["q_proj"] == (16 * 128, 1024) and found["o_proj"] == (1024, 16 * 128)
    assert layers("qwen/qwen3-0.6b") == layers("Qwen3-0.6B")  # the Hugging Face id works too


def test_int4_skips_layers_whose_k_is_not_a_multiple_of_the_group():
    p = plan("SmolLM2-135M", ms=[1, 8], ops=["int8", "int4"], group_size=128)
    assert any("int4 q_proj" in line and "576" in line for line in p.skipped)
    int4 = {(x.layer.name, x.problem.m) for x in p.planned if x.problem.op == "int4"}
    assert int4 == {("down_proj", 1), ("down_proj", 8)}  # K=1536 is the only multiple of 128
    assert len([x for x in p.planned if x.problem.op == "int8"]) == 8 * 2
    assert all(pr.threads == 2 and pr.dtype == "bf16" for pr in problems("SmolLM2-135M", [1], ["int8"]))


def test_farm_shapes_reads_a_local_config_json(tmp_path, capsys):
    path = _config(tmp_path)
    assert main(["shapes", path, "--m", "1", "8", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {x["name"]: (x["n"], x["k"]) for x in doc["layers"]} == {
        "q_proj": (256, 256), "k_proj": (128, 256), "v_proj": (128, 256), "o_proj": (256, 256),
        "gate_proj": (640, 256), "up_proj": (640, 256), "down_proj": (256, 640), "lm_head": (1000, 256)}
    # int4 g128: down_proj (K=640) fits the group, every layer with K=256 too; lm_head's N=1000 is
    # not a multiple of 16, which int4 packing needs: 8 int8 layers + 7 int4 layers, x 2 M
    assert len(doc["problems"]) == 30
    assert len(doc["skipped"]) == 1 and "lm_head" in doc["skipped"][0] and "divisible by 16" in doc["skipped"][0]
    assert main(["shapes", path, "--fused"]) == 0
    assert "qkv_proj" in capsys.readouterr().out


def test_farm_shapes_as_a_module_command(tmp_path):
    path = _config(tmp_path, model_type="phi3")
    out = subprocess.run([sys.executable, "-m", "farm.cli", "shapes", path, "--m", "1", "--ops", "int8", "--json"],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert [x["name"] for x in json.loads(out)["layers"]] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"]


def test_a_missing_config_field_is_a_user_error_naming_it(tmp_path, capsys):
    path = _config(tmp_path, intermediate_size=None)
    with pytest.raises(UserError, match="intermediate_size"):
        read_config(path)
    assert main(["shapes", path]) == 2
    assert "intermediate_size" in capsys.readouterr().err
    with pytest.raises(UserError, match="neither a zoo model"):
        layers("No-Such-Model-7B")


def test_a_spec_naming_a_zoo_model_expands_to_its_layers():
    spec = parse_spec({"name": "zoo", "problems": [{"model": "Qwen2.5-0.5B", "ops": ["int8"], "m": [1]}]})
    expected = {(layer.n, layer.k) for layer in layers("Qwen2.5-0.5B")}
    assert {(t.problem.n, t.problem.k) for t in spec.tasks} == expected
    assert all(t.label.startswith("Qwen2.5-0.5B.") for t in spec.tasks)
    fused = parse_spec({"name": "zoo", "problems": [{"model": "Qwen2.5-0.5B", "fused": True, "ops": ["int8"], "m": [1]}]})
    assert any(t.label.endswith(".qkv_proj") for t in fused.tasks)
    given = parse_spec({"name": "x", "problems": [{"model": "Qwen2.5-0.5B", "layers": {"a": [64, 64]}, "m": [1]}]})
    assert [(t.problem.n, t.problem.k) for t in given.tasks] == [(64, 64)]  # explicit layers win
    with pytest.raises(UserError, match=r"problems\[0\]\.model"):
        parse_spec({"name": "x", "problems": [{"model": "Nope-1B", "m": [1]}]})


def _table(tmp_path, threads=2) -> str:
    entries = [entry("int8", "bf16", 1, 256, 256, None, "cpp"),                       # q_proj, o_proj exact at M=1
               entry("int8", "bf16", 2, 640, 256, None, "aten", nearest_m_ok=True),   # gate/up: safe for other M
               entry("int8", "bf16", 8, 640, 256, None, "aten", nearest_m_ok=True),   # (between M=2 and M=8)
               entry("int8", "bf16", 8, 256, 640, None, "cpp", nearest_m_ok=False)]   # down: M=8 only
    path = tmp_path / "table.yaml"
    path.write_text(yaml.safe_dump(table_doc(entries, isa="avx512", threads=threads)))
    return str(path)


def test_coverage_reports_exact_nearest_m_and_inductor_decisions(tmp_path, capsys):
    config, table = _config(tmp_path), _table(tmp_path)
    result = model_coverage(open_table(table, threads=2), config, ms=[1, 4], ops=["int8"])
    by = {(d.layer, d.m): d for d in result.decisions}
    assert (by["q_proj", 1].source, by["q_proj", 1].choice) == ("table", "cpp")
    assert by["q_proj", 4].source == "inductor" and "not safe for other M" in by["q_proj", 4].note
    assert (by["up_proj", 4].source, by["up_proj", 4].choice) == ("table:nearest-m", "aten")
    assert "M=4 uses the M=2 entry" in by["up_proj", 4].note
    assert by["gate_proj", 1].source == "inductor" and "outside its measured M range (2..8)" in by["gate_proj", 1].note
    assert by["down_proj", 1].source == "inductor"
    assert (by["k_proj", 1].source, by["k_proj", 1].note) == ("inductor", "no table entry")
    assert result.decided == 2 + 2 and len(result.decisions) == 16
    assert result.by_source() == {"inductor": 12, "table:nearest-m": 2, "table": 2}

    assert main(["coverage", config, "--table", table, "--threads", "2", "--m", "1", "4", "--ops", "int8", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["models"][0]["decided"] == 4 and doc["overall"]["share"] == round(4 / 16, 4)
    assert len(doc["decisions"]) == 16
    assert main(["coverage", config, "--table", table, "--threads", "2", "--m", "1", "--ops", "int8"]) == 0
    assert "decided by the table (25.0%)" in capsys.readouterr().out  # q_proj and o_proj


def test_coverage_at_another_thread_count_is_all_inductor_with_the_reason(tmp_path, capsys):
    config, table = _config(tmp_path), _table(tmp_path)
    result = model_coverage(open_table(table, threads=4), config, ms=[1], ops=["int8"])
    assert result.decided == 0
    assert all("it is for 2 threads, this process runs 4" in d.note for d in result.decisions)


def test_coverage_of_the_whole_zoo(tmp_path, capsys):
    assert main(["coverage", "--all", "--table", _table(tmp_path), "--threads", "2", "--m", "1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["overall"]["models"] == len(load_zoo()) and doc["overall"]["decided"] == 0
    assert main(["coverage", "--table", _table(tmp_path)]) == 2  # neither a model nor --all


def test_coverage_against_an_old_table_lists_each_change_and_writes_a_check_spec(tmp_path, capsys):
    config, old = _config(tmp_path), _table(tmp_path)
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    entries = [entry("int8", "bf16", 1, 256, 256, None, "cpp", weights="model"),                   # unchanged
               entry("int8", "bf16", 2, 640, 256, None, "dq[fp32]", nearest_m_ok=True, weights="model"),  # aten -> dq
               entry("int8", "bf16", 8, 640, 256, None, "dq[fp32]", nearest_m_ok=True, weights="warm"),
               entry("int8", "bf16", 2, 256, 640, None, "aten", nearest_m_ok=True, weights="model"),  # cpp -> aten
               entry("int8", "bf16", 8, 256, 640, None, "aten", nearest_m_ok=True, weights="warm")]
    (new_dir / "table.yaml").write_text(yaml.safe_dump(table_doc(entries, isa="avx512", threads=2)))
    spec = tmp_path / "check.yaml"
    assert main(["coverage", config, "--table", str(new_dir / "table.yaml"), "--against", old, "--threads", "2",
                 "--m", "4", "8", "--ops", "int8", "--json", "--check-spec", str(spec), "--per-change", "1"]) == 0
    doc = json.loads(capsys.readouterr().out)["changes"]
    kinds = doc["by_kind"]
    # gate and up at M 4 and 8: ATen (nearest-M at 4) -> dq[fp32]; down at M=8: cpp -> ATen, at M=4: Inductor -> ATen
    assert kinds["aten (table) -> dq[fp32] (table)"] == {"matmuls": 2, "problems": 1}
    assert kinds["aten (table:nearest-m) -> dq[fp32] (table:nearest-m)"] == {"matmuls": 2, "problems": 1}
    assert kinds["cpp (table) -> aten (table)"]["matmuls"] == 1
    assert kinds["inductor -> aten (table:nearest-m)"]["matmuls"] == 1
    assert sum(k["matmuls"] for k in kinds.values()) == 6 and len(doc["problems"]) == 4
    # The check spec: only changes to a candidate (to ATen or Inductor cannot be slower than the
    # default), one problem per kind, each in the state its nearest-M entries were decided in.
    checked = parse_spec(yaml.safe_load(spec.read_text()))
    got = sorted((t.problem.m, t.problem.n, t.problem.k, t.problem.weights) for t in checked.tasks)
    assert got == [(4, 640, 256, "model"), (8, 640, 256, "warm")]
    assert {t.problem.threads for t in checked.tasks} == {2} and checked.isa == ["avx512"]
    assert main(["coverage", config, "--table", old, "--check-spec", str(spec)]) == 2
    assert "--check-spec needs --against" in capsys.readouterr().err


def test_sample_spec_draws_distinct_zoo_problems_per_op_and_m_weighted_by_use(tmp_path, capsys):
    from farm.zoo.sample import draw

    view = open_table(_table(tmp_path), threads=2)
    results = [model_coverage(view, m, [1, 128], ["int8"]) for m in load_zoo().values()]
    uses = {}
    for r in results:
        for d in r.decisions:
            uses.setdefault((d.m, d.n, d.k), []).append(r.model)
    strata = draw(results, 3, seed=1, max_weights=20_000_000)
    assert [(s.op, s.m) for s in strata] == [("int8", 1), ("int8", 128)]
    for s in strata:
        keys = [(d.key.m, d.key.n, d.key.k) for d in s.drawn]
        assert len(keys) == 3 and len(set(keys)) == 3 and all(d.key.m == s.m for d in s.drawn)
        assert all(d.key.n * d.key.k <= 20_000_000 and d.matmuls == len(uses[k]) for d, k in zip(s.drawn, keys))
        assert s.matmuls == sum(len(v) for k, v in uses.items() if k[0] == s.m)
        assert s.left_out == sum(len(v) for k, v in uses.items() if k[0] == s.m and k[1] * k[2] > 20_000_000) > 0
    assert draw(results, 3, seed=1, max_weights=20_000_000) == strata  # a seed gives the same draw
    # Weighted by use: over many seeds, the most-used problem is drawn first more often than one used once.
    firsts = [draw(results, 1, seed=s)[0].drawn[0] for s in range(200)]
    most_used = max((k for k in uses if k[0] == 1), key=lambda k: len(uses[k]))
    once = [k for k in uses if k[0] == 1 and len(uses[k]) == 1]
    hits = lambda k: sum((d.key.m, d.key.n, d.key.k) == k for d in firsts)  # noqa: E731
    assert hits(most_used) > max(hits(k) for k in once)
    spec = tmp_path / "sample.yaml"
    assert main(["coverage", "--all", "--table", _table(tmp_path), "--threads", "2", "--m", "1", "128", "--ops", "int8",
                 "--sample-spec", str(spec), "--sample", "2", "--sample-max-weights", "20"]) == 0
    text = spec.read_text()
    assert "int8 M=1: 2 drawn of" in text and "above the weight cap, left out" in text
    checked = parse_spec(yaml.safe_load(text))
    assert sorted(t.problem.m for t in checked.tasks) == [1, 1, 128, 128]
    assert {t.problem.threads for t in checked.tasks} == {2}
    assert main(["coverage", "--all", "--table", _table(tmp_path), "--sample-spec", str(spec), "--sample", "0"]) == 2
    assert main(["coverage", "--all", "--table", _table(tmp_path), "--sample-spec", str(spec),
                 "--sample-max-weights", "0"]) == 2
    assert "--sample-max-weights 0: a number of million weights above 0" in capsys.readouterr().err
