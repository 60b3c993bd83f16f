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


def test_the_nt_binding_has_its_own_hash_and_stales_only_rows_that_use_nt(tmp_path):
    """Adding nt (kernels/template_threads.py) left the template hash of tf/cb/ks as it was, so
    the shipped tables stayed fresh; a change to the nt binding stales only nt rows."""
    rows = [entry("int8", "bf16", 1, 256, 256, None, "cpp[nt=1]"), entry("int8", "bf16", 2, 256, 256, None, "cpp[nt=1]"),
            entry("int8", "bf16", 4, 256, 256, None, "cpp[cb=1,16,64]")]
    rows[1]["provenance"]["threads_hash"] = "0" * 16  # measured under another nt binding
    del rows[2]["provenance"]["threads_hash"]  # a row from before nt existed
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(table_doc(rows, isa="avx2", threads=2)))
    table = load(str(path), "2.13.0+cpu", template_hash())
    assert [e.stale for e in sorted(table.entries.values(), key=lambda e: e.key.m)] == [False, True, False]


def test_the_shipped_tables_are_fresh_under_this_source():
    import glob
    import os

    import kernels
    from kernels.provenance import torch_version

    for path in glob.glob(os.path.join(kernels.TABLES_DIR, "*.yaml")):
        table = load(path, torch_version(), template_hash())
        assert table.header["template_hash"] == template_hash(), f"{path}: measured under another template source"
        assert not any(e.stale for e in table.entries.values()), path
