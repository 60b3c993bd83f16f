"""Helpers for tests that need table documents and records (test inputs, not results)."""

import random

import torch

import kernels
from kernels.provenance import template_hash, threads_hash, torch_version
from kernels.table import TABLE_SCHEMA


def entry(op, dtype, m, n, k, group, winner, nearest_m_ok=False, **extra):
    data = {
        "key": {"op": op, "dtype": dtype, "m": m, "n": n, "k": k, "group_size": group},
        "winner": winner, "median_us": 10.0, "ci95_us": [9.0, 11.0], "speedup_vs_aten": 1.2,
        "speedup_ci95": [1.1, 1.3], "runner_up": "aten", "runner_up_speedup": 1.0, "runner_up_ci95": [1.0, 1.0],
        "nearest_m_ok": nearest_m_ok, "failed": [],
        "provenance": {"torch": torch_version(), "template_hash": template_hash(), "threads_hash": threads_hash(), "measured_at": "2026-11-26T00:00:00+00:00"},
    }
    data.update(extra)
    return data


def table_doc(entries, isa=None, threads=None, **header):
    doc = {"schema": TABLE_SCHEMA, "isa": isa or kernels.host_isa(), "threads": threads or torch.get_num_threads(),
           "emulated": False, "torch": torch_version(), "template_hash": template_hash(), "entries": entries}
    doc.update(header)
    return doc


def record(host, op, m, samples_by_candidate, n=4096, k=4096, group=None, band=0.02, statuses=None,
           measured_at="2026-11-26T00:00:00+00:00", weights="warm", isa="avx512", threads=2):
    """A record in the farm's format built from given per-round times (for aggregation tests)."""
    statuses = statuses or {}
    cands = []
    for cid, times in samples_by_candidate.items():
        status = statuses.get(cid, "ok")
        cands.append({"id": cid, "status": status, "samples_us": list(times) if status == "ok" else [],
                      "median_us": sorted(times)[len(times) // 2] if status == "ok" else None, "ci95_us": None,
                      "speedup_vs_aten": None, "speedup_ci95": None, "compile_s": 1.0, "error": None})
    return {"schema": 1, "host": {"isa": isa, "emulated": False, "hostname": host, "cpu": "cpu", "cores": 2},
            "problem": {"op": op, "dtype": "bf16", "m": m, "n": n, "k": k, "group_size": group, "threads": threads,
                        "weights": weights},
            "candidates": cands, "winner": None, "noise": {"band": band},
            "provenance": {"torch": torch_version(), "template_hash": template_hash(), "threads_hash": threads_hash(), "measured_at": measured_at}}


def noisy(center, n=21, spread=0.01, seed=0):
    rng = random.Random(seed)
    return [center * (1 + rng.uniform(-spread, spread)) for _ in range(n)]
