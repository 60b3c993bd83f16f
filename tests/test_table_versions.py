"""Which torch builds a table applies to (issue 9): the release counts, not the local build tag."""

import yaml

from kernels.provenance import same_release, template_hash, torch_release
from kernels.table import incompatibilities, load
from tablekit import entry, table_doc


def test_release_ignores_the_build_tag():
    assert torch_release("2.13.0+cpu") == torch_release("2.13.0+cu130") == torch_release("2.13.0") == "2.13.0"
    assert same_release("2.13.0+cpu", "2.13.0+cu130")
    assert not same_release("2.13.0+cpu", "2.13.1+cpu") and not same_release("2.13.0", "2.14.0")
    assert not same_release(None, "2.13.0")


def _table(tmp_path, header_torch, row_torches):
    entries = []
    for m, row_torch in enumerate(row_torches, 1):
        e = entry("int8", "bf16", m, 256, 256, None, "cpp")
        e["provenance"]["torch"] = row_torch
        entries.append(e)
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(table_doc(entries, isa="avx2", threads=2, torch=header_torch)))
    return str(path)


def test_a_table_from_another_build_of_the_same_release_applies(tmp_path):
    path = _table(tmp_path, "2.13.0+cpu", ["2.13.0+cpu", "2.13.0+cpu"])
    table = load(path, "2.13.0+cu130", template_hash())
    assert not any(e.stale for e in table.entries.values())
    assert incompatibilities(table, "avx2", 2, "2.13.0+cu130", template_hash()) == []


def test_another_release_is_stale_per_row_and_refused_as_a_whole(tmp_path):
    path = _table(tmp_path, "2.13.0+cpu", ["2.13.0+cpu", "2.12.0+cpu"])
    table = load(path, "2.13.0+cu130", template_hash())
    assert [e.stale for e in sorted(table.entries.values(), key=lambda e: e.key.m)] == [False, True]
    (problem,) = incompatibilities(table, "avx2", 2, "2.14.0+cpu", template_hash())
    assert "measured with torch 2.13.0+cpu, this is 2.14.0+cpu" in problem
