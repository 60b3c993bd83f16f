"""`farm bench compile` on a tiny config.json: real compiles in fresh processes, cold then warm
on the same Inductor cache dir. What must hold whatever the timings: the warm process of each
variant is served by the FX graph cache (a table must not make the graph uncacheable), and the
cold table process ran the lowering and decided the matmul its table names. No speed is asserted."""

import json
import subprocess
import sys

import pytest
import yaml

from tablekit import entry, table_doc

# Qwen2-shaped, tiny; the table decides q_proj and o_proj (int8 256x256) at M=2.
TINY = {"model_type": "qwen2", "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1024, "tie_word_embeddings": True}


@pytest.mark.slow
def test_warm_process_hits_the_fx_cache_with_and_without_table(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    table = tmp_path / "t.yaml"
    table.write_text(yaml.safe_dump(table_doc([entry("int8", "bf16", 2, 256, 256, None, "cpp")], threads=2)))
    out = subprocess.run([sys.executable, "-m", "farm.cli", "bench", "compile", "--model", str(config), "--m", "2",
                          "--threads", "2", "--table", str(table), "--warm-runs", "1", "--variants", "default", "table",
                          "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    (row,) = report["rows"]
    assert set(row["variants"]) == {"default", "table"}
    for name, v in row["variants"].items():
        assert v["cold"]["fx_cache"]["miss"] >= 1 and v["cold"]["fx_cache"]["hit"] == 0, (name, v["cold"])
        assert v["warm_fx_hits"] == 1, (name, v["warm"])
        assert v["cold_s"] > 0 and v["warm_s"] > 0
    table_row = row["variants"]["table"]
    assert table_row["cold"]["table_install"] == "active" and table_row["cold"]["install_s"] > 0
    assert table_row["cold"]["decided"] == 2  # q_proj and o_proj; a cache hit runs no lowering:
    assert table_row["warm"][0]["decided"] == 0
    assert row["variants"]["default"]["cold"]["decided"] == 0
    s = report["summary"]
    assert len(s["warm_table_over_default"]) == 1 and s["cold_table_over_max_autotune"] == []


def test_bad_variant_list_is_refused_before_any_process(tmp_path):
    out = subprocess.run([sys.executable, "-m", "farm.cli", "bench", "compile", "--model", "no-such-model",
                          "--variants", "table"], capture_output=True, text=True)
    assert out.returncode == 2 and "no-such-model" in out.stderr
