"""`farm bench model` on a tiny config.json: the zoo's layers as transformers has them, real
compiles, the table's decisions counted; `--hf` with a real transformers model quantized by
torchao (skipped without the 'models' extra). Benchmarks are not timed tests: no speed is asserted."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from farm.errors import UserError
from tablekit import entry, table_doc

# Qwen2-shaped, tiny: q/o 256x256, k/v 128x256, gate/up 512x256, down 256x512, lm_head 1024x256.
TINY = {"model_type": "qwen2", "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1024, "tie_word_embeddings": True}
SEPARATE = [(256, 256), (128, 256), (128, 256), (256, 256), (512, 256), (512, 256), (256, 512)]


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    return str(path)


@pytest.fixture
def table(tmp_path):
    """Decides int8 256x256 at M=2 only: q_proj and o_proj of each layer, nothing else."""
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(table_doc([entry("int8", "bf16", 2, 256, 256, None, "cpp")], threads=2)))
    return str(path)


def bench(config, table, *extra):
    out = subprocess.run([sys.executable, "-m", "farm.cli", "bench", "model", "--model", config, "--quant", "int8",
                          "--table", table, "--threads", "2", "--rounds", "3", "--json", *extra],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def check_variants(row):
    assert set(row["variants"]) == {"default", "max-autotune", "table"}
    for v in row["variants"].values():
        assert v["median_ms"] > 0 and v["compile_s"] > 0
        assert v["speedup_ci95"][0] <= v["speedup_vs_default"] <= v["speedup_ci95"][1]
    assert row["variants"]["default"]["speedup_vs_default"] == 1.0


@pytest.mark.slow
def test_zoo_block_separate_projections_table_decisions_counted(tiny, table):
    # decode only: prefill is the same path at another M, and each shape costs a max-autotune compile
    report = bench(tiny, table, "--decode", "2", "--prefill")
    assert report["dims"]["hidden_size"] == 256 and report["layers"] == 1 and report["hf"] is None
    (row,) = report["rows"]
    assert (row["phase"], row["m"]) == ("decode", 2)
    check_variants(row)
    assert row["table_install"] == "active"
    # seven separate projections, in the order the block runs them; the table decides the two 256x256
    assert [(n, k) for n, k, _, _ in row["table_decisions"]] == SEPARATE
    assert row["table_decided"] == 2 and row["quantized_matmuls"] == 7
    assert [(n, k, c) for n, k, c, _ in row["table_decisions"] if c] == [(256, 256, "cpp"), (256, 256, "cpp")]


def test_fused_only_where_the_model_type_fuses():
    from farm.bench.model import Blocks
    from farm.zoo.shapes import dims_from_config

    names = lambda model_type, fused=False: sorted(Blocks(dims_from_config({**TINY, "model_type": model_type}, "t", "t"),  # noqa: E731
                                                          "int8", 1, 1, fused).blocks[0].proj)
    separate = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert names("qwen2") == names("llama") == separate
    assert names("phi3") == names("llama", fused=True) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    x = torch.randn(1, 4, 256).to(torch.bfloat16)
    for fused in (False, True):  # eager runs both layouts
        block = Blocks(dims_from_config(TINY, "t", "t"), "int4", 1, 1, fused).eval()
        assert block(x).shape == (1, 4, 256)


def test_bad_requests_are_user_errors(tiny):
    from farm.bench.model import bench_model
    from farm.measure.protocol import Protocol

    with pytest.raises(UserError, match="neither a zoo model"):
        bench_model("no-such-model", "int8", [(1, 1)], None, Protocol(), 1)
    with pytest.raises(UserError, match="Int8WeightOnlyConfig"):
        bench_model(tiny, "int4", [(1, 1)], None, Protocol(), 1, hf=True)
    with pytest.raises(UserError, match="--layers"):
        bench_model(tiny, "int8", [(1, 1)], None, Protocol(), 1, count=0)


def test_hf_without_the_extra_names_it(tiny):
    # transformers and torchao made unimportable: the flag must say which extra to install
    code = ("import sys; sys.modules['transformers'] = None; sys.modules['torchao'] = None\n"
            "from farm.cli import main; sys.exit(main())")
    out = subprocess.run([sys.executable, "-c", code, "bench", "model", "--model", tiny, "--hf"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "kernel-farm[models]" in out.stderr + out.stdout


@pytest.mark.slow
def test_hf_model_quantized_by_torchao_reaches_the_table(tiny, table):
    pytest.importorskip("transformers", reason="the 'models' extra: pip install -e '.[models]'")
    pytest.importorskip("torchao", reason="the 'models' extra: pip install -e '.[models]'")
    report = bench(tiny, table, "--hf", "--hf-layers", "2", "--decode", "2", "--prefill")
    hf = report["hf"]
    assert hf["layers"] == 2 and hf["linears_quantized"] == 15  # 2 x 7 projections + lm_head
    (row,) = hf["rows"]
    check_variants(row)
    # torchao's linears reach aten._weight_int8pack_mm through Inductor's woq pattern in every variant
    assert all(v["woq_pattern_matches"] == 15 for v in row["variants"].values())
    assert row["quantized_matmuls"] == 15
    assert sorted((n, k) for n, k, _, _ in row["table_decisions"]) == sorted(2 * SEPARATE + [(1024, 256)])
    assert row["table_decided"] == 4  # q_proj and o_proj of both layers
