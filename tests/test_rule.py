"""The learned rule for unmeasured shapes (issue 9): training, validation, shipping as data, lookup."""

import copy
import math
import warnings

import pytest
import yaml

import kernels
from kernels.candidates import parse
from kernels.provenance import template_hash, torch_version
from kernels.rule import FEATURES, MAX_DEPTH, RuleError, features, parse_rule, predict
from kernels.table import TableError, load, lookup
from farm.tables.aggregate import aggregate
from farm.tables.rule import Sample, build_rule, train, validate
from tablekit import entry, noisy, record, table_doc

THREADS = 2


def _rule(nodes, domain=(("int8", "bf16"),)):
    return {"features": list(FEATURES), "nodes": nodes, "validation": {}, "domain": [list(d) for d in domain]}


# Decode (M <= 16) -> cpp; prefill -> unsure.
TREE = _rule([{"feature": "log2_m", "threshold": 4.0, "left": 1, "right": 2},
              {"leaf": "cpp", "samples": 4}, {"leaf": None, "samples": 3}])


def test_a_tree_is_evaluated_without_scikit_learn():
    rule = parse_rule(TREE, "rule", THREADS)
    assert predict(rule, features("int8", "bf16", 8, 4096, 4096, None)) == (parse("cpp"), "log2_m<=4")
    assert predict(rule, features("int8", "bf16", 128, 4096, 4096, None)) == (None, "log2_m>4")


def _deep(depth):
    nodes = []
    for i in range(depth):
        nodes.append({"feature": "log2_m", "threshold": float(i), "left": len(nodes) + 1, "right": len(nodes) + 2})
        nodes.append({"leaf": "aten"})
    nodes.append({"leaf": "aten"})
    # make every split's left child the next split (a chain), right child a leaf
    for i in range(depth):
        nodes[2 * i]["left"], nodes[2 * i]["right"] = 2 * i + 2, 2 * i + 1
    return nodes


BAD_RULES = {
    "unknown feature": (_rule([{"feature": "colour", "threshold": 1, "left": 1, "right": 2}, {"leaf": "aten"}, {"leaf": "aten"}]),
                        "unknown feature 'colour'"),
    "bad leaf": (_rule([{"leaf": "cpp[tf=9,9,9]"}]), "thread factors"),
    "leaf not a string": (_rule([{"leaf": 7}]), "expected a candidate id or null"),
    "threshold a string": (_rule([{"feature": "log2_m", "threshold": "4", "left": 1, "right": 2}, {"leaf": "aten"}, {"leaf": "aten"}]),
                           "threshold: expected a finite number"),
    "child points back": (_rule([{"feature": "log2_m", "threshold": 4, "left": 0, "right": 1}, {"leaf": "aten"}]),
                          "expected a node index"),
    "too deep": (_rule(_deep(MAX_DEPTH + 1)), f"exceeds {MAX_DEPTH}"),
    "wrong feature list": ({**TREE, "features": ["log2_m"]}, "features: expected"),
    "empty nodes": (_rule([]), "nodes: expected a list"),
    "unreachable node": (_rule([{"leaf": "aten"}, {"leaf": "aten"}]), "not reachable"),
    "no domain": ({**TREE, "domain": []}, "domain: expected a non-empty list"),
    "bad domain": (_rule([{"leaf": "aten"}], domain=(("int3", "bf16"),)), "is not an [op, dtype] pair"),
    "m range reversed": (_rule([{"leaf": "cpp", "m": [16, 1]}]), "m: expected [lo, hi]"),
    "m range not ints": (_rule([{"leaf": "cpp", "m": ["1", 16]}]), "m: expected [lo, hi]"),
    "m range one number": (_rule([{"leaf": "cpp", "m": 16}]), "m: expected [lo, hi]"),
    "leaf with a split's field": (_rule([{"leaf": "cpp", "threshold": 1}]), "a leaf has only"),
}


def test_a_leaf_answers_only_inside_the_m_range_it_was_trained_on():
    # One leaf for every M, trained on M 16..32 only: M=1 (where splitting M over threads loses)
    # and M=512 are outside what was measured, so the rule is unsure there.
    rule = parse_rule(_rule([{"leaf": "cpp[tf=2,1,1]", "samples": 4, "m": [16, 32]}]), "rule", THREADS)
    for m, expected in ((1, None), (8, None), (16, parse("cpp[tf=2,1,1]")), (24, parse("cpp[tf=2,1,1]")),
                        (32, parse("cpp[tf=2,1,1]")), (512, None)):
        choice, note = predict(rule, features("int8", "bf16", m, 1024, 1024, None))
        assert choice == expected, m
        if expected is None:
            assert "was measured at M 16..32 only" in note


def test_training_gives_non_default_leaves_their_m_range_and_validation_applies_it():
    # cpp wins 20% at M 16 and 32 in both families; M=1 is in no leaf's range, so a tree that
    # routes it to the cpp leaf still answers nothing for it, in validation as at compile time.
    samples = [_sample(f, m, n, {"cpp": 1.2}) for f in ("A", "B") for m in (16, 32) for n in (1024, 4096)]
    nodes = train(samples, depth=2, min_leaf=2)
    leaves = [n for n in nodes if "leaf" in n]
    assert leaves and all(n["m"] == [16, 32] for n in leaves if n["leaf"] == "cpp")
    rule = parse_rule(_rule(nodes), "rule", THREADS)
    assert predict(rule, features("int8", "bf16", 1, 2048, 2048, None))[0] is None
    assert predict(rule, features("int8", "bf16", 16, 2048, 2048, None))[0] == parse("cpp")
    held_out_m1 = samples + [_sample("C", 1, 2048, {"cpp": 0.6})]  # a third family measured at M=1 only
    assert validate(held_out_m1, depth=2, min_leaf=2)["losses_vs_default"] == 0


@pytest.mark.parametrize("name", sorted(BAD_RULES))
def test_malformed_rules_are_refused_naming_the_field(name):
    raw, needle = BAD_RULES[name]
    with pytest.raises(RuleError, match=needle.replace("[", "\\[")):
        parse_rule(raw, "rule", THREADS)


def test_a_table_with_a_malformed_rule_gives_one_warning_and_inductors_behaviour(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(table_doc([], threads=THREADS, rule=BAD_RULES["unknown feature"][0])))
    with pytest.raises(TableError, match="rule.nodes\\[0\\].feature"):
        load(str(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = kernels.install(str(path))
    kernels.uninstall()
    assert not result.active
    assert len([w for w in caught if issubclass(w.category, kernels.KernelFarmWarning)]) == 1


def test_lookup_order_exact_then_nearest_m_then_rule_then_inductor(tmp_path):
    path = tmp_path / "t.yaml"
    doc = table_doc([entry("int8", "bf16", 32, 4096, 4096, None, "cpp[cb=1,16,64]", nearest_m_ok=True),
                     entry("int8", "bf16", 128, 4096, 4096, None, "cpp[cb=1,16,64]", nearest_m_ok=True),
                     entry("int8", "bf16", 128, 2048, 2048, None, "dq", nearest_m_ok=False)],
                    threads=THREADS, rule=TREE)
    path.write_text(yaml.safe_dump(doc))
    table = load(str(path), torch_version(), template_hash())
    assert lookup(table, "int8", "bf16", 32, 4096, 4096, None)[:2] == (parse("cpp[cb=1,16,64]"), "table")
    assert lookup(table, "int8", "bf16", 64, 4096, 4096, None)[:2] == (parse("cpp[cb=1,16,64]"), "table:nearest-m")
    # nearest_m_ok was measured against the neighbouring M buckets: it says nothing past the
    # measured range, where the rule decides (decode -> cpp; prefill -> unsure -> Inductor).
    candidate, source, note = lookup(table, "int8", "bf16", 1, 4096, 4096, None)
    assert (candidate, source) == (parse("cpp"), "table:rule")
    candidate, source, note = lookup(table, "int8", "bf16", 512, 4096, 4096, None)
    assert (candidate, source) == (None, "inductor") and "outside its measured M range (32..128)" in note
    # The M=128 entry is not safe for M=8: the rule decides (decode -> cpp).
    assert lookup(table, "int8", "bf16", 8, 2048, 2048, None)[:2] == (parse("cpp"), "table:rule")
    # No entry, and the rule says decode -> cpp; prefill -> unsure -> Inductor, saying why.
    assert lookup(table, "int8", "bf16", 1, 1024, 3072, None)[:2] == (parse("cpp"), "table:rule")
    candidate, source, note = lookup(table, "int8", "bf16", 512, 1024, 3072, None)
    assert (candidate, source) == (None, "inductor") and "rule is unsure" in note
    assert lookup(table, "int8", "bf16", None, 1024, 3072, None)[:2] == (None, "inductor")  # dynamic M: no rule
    # Outside the rule's domain (it was trained on int8 x bf16 only): Inductor, saying why.
    candidate, source, note = lookup(table, "int4", "bf16", 1, 1024, 3072, 128)
    assert (candidate, source) == (None, "inductor") and "not trained on int4 x bf16" in note


def test_the_rule_sends_dq_no_further_than_the_largest_dense_weight_dq_won_at(tmp_path):
    # Prefill -> dq[fp32]; the table's largest int8 dq winner is 1024 x 1024 (a 4 MiB fp32 weight).
    tree = _rule([{"feature": "log2_m", "threshold": 4.0, "left": 1, "right": 2},
                  {"leaf": "cpp", "samples": 4}, {"leaf": "dq[fp32]", "samples": 3}])
    path = tmp_path / "t.yaml"
    doc = table_doc([entry("int8", "bf16", 512, 1024, 1024, None, "dq[fp32]"),
                     entry("int8", "bf16", 128, 8192, 8192, None, "cpp")], threads=THREADS, rule=tree)
    path.write_text(yaml.safe_dump(doc))
    table = load(str(path), torch_version(), template_hash())
    assert lookup(table, "int8", "bf16", 512, 1024, 1024, None)[:2] == (parse("dq[fp32]"), "table")
    assert lookup(table, "int8", "bf16", 512, 512, 2048, None)[:2] == (parse("dq[fp32]"), "table:rule")  # 4 MiB
    candidate, source, note = lookup(table, "int8", "bf16", 512, 2048, 1024, None)  # 8 MiB
    assert (candidate, source) == (None, "inductor")
    assert "8 MiB dense weight per call exceeds the largest int8 dq winner measured (4 MiB)" in note
    assert lookup(table, "int8", "bf16", 1, 2048, 1024, None)[:2] == (parse("cpp"), "table:rule")  # not dq: no bound


# --- training and validation (farm side) ---------------------------------------------------------


def _winner(speedups, band):
    """The farm's decision for these speedups, where every process agrees."""
    best = max(speedups, key=speedups.get)
    return best if speedups[best] > 1 + band else "aten"


def _sample(family, m, n, speedups, band=0.02, op="int8", group=None, winner=None):
    speedups = {"aten": 1.0, **speedups}
    return Sample((op, "bf16", m, n, 2048, group), family, features(op, "bf16", m, n, 2048, group),
                  speedups, band, winner or _winner(speedups, band))


def test_a_leaf_names_only_a_candidate_that_gained_on_every_problem_in_it():
    # cpp gains 30% on every decode problem of both families; at prefill it gains on one family
    # and loses on the other, so prefill must be unsure (or ATen), never cpp.
    samples = [_sample(f, m, n, {"cpp": 1.3}) for f in ("A", "B") for m in (1, 2) for n in (1024, 4096)]
    samples += [_sample("A", m, n, {"cpp": 1.4}) for m in (256, 512) for n in (1024, 4096)]
    samples += [_sample("B", m, n, {"cpp": 0.7}) for m in (256, 512) for n in (1024, 4096)]
    nodes = train(samples, depth=2, min_leaf=2)
    rule = parse_rule(_rule(nodes), "rule", THREADS)
    assert predict(rule, features("int8", "bf16", 1, 2048, 2048, None))[0] == parse("cpp")
    assert predict(rule, features("int8", "bf16", 512, 2048, 2048, None))[0] in (None,)


def test_leave_one_family_out_counts_losses_and_a_losing_rule_is_not_shipped():
    # Family B's prefill behaves unlike A's: a rule trained on A alone would pick cpp there.
    samples = [_sample("A", m, n, {"cpp": 1.5}) for m in (128, 256, 512) for n in (1024, 2048, 4096)]
    samples += [_sample("B", m, n, {"cpp": 0.8}) for m in (128, 256, 512) for n in (1024, 2048, 4096)]
    result = validate(samples, depth=2)
    assert result["losses_vs_default"] == 9 and result["held_out_problems"] == 18
    assert result["families"] == ["A", "B"]


def test_the_tree_splits_on_the_op_first_and_each_op_gets_its_own_subtree():
    # int8: cpp wins decode, ATen prefill. int4 (no template): ATen at decode, dq[fp32] prefill.
    def s4(f, m, n, speedups):
        return _sample(f, m, n, speedups, op="int4", group=128)

    samples = [_sample(f, m, n, {"cpp": 1.3 if m < 64 else 0.9}) for f in ("A", "B") for m in (1, 8, 128, 512)
               for n in (1024, 4096)]
    samples += [s4(f, m, n, {"dq[fp32]": 0.2 if m < 64 else 1.3}) for f in ("A", "B") for m in (1, 8, 128, 512)
                for n in (1024, 4096)]
    nodes = train(samples, depth=2)
    assert nodes[0]["feature"] == "int4" and nodes[0]["threshold"] == 0.5
    rule = parse_rule(_rule(nodes, domain=(("int8", "bf16"), ("int4", "bf16"))), "rule", THREADS)
    assert predict(rule, features("int8", "bf16", 4, 2048, 2048, None))[0] == parse("cpp")
    assert predict(rule, features("int8", "bf16", 256, 2048, 2048, None))[0] == parse("aten")
    assert predict(rule, features("int4", "bf16", 4, 2048, 2048, 128))[0] == parse("aten")
    assert predict(rule, features("int4", "bf16", 256, 2048, 2048, 128))[0] == parse("dq[fp32]")
    assert validate(samples, depth=2)["losses_vs_default"] == 0


def test_gain_captured_counts_unsure_held_out_problems_as_the_default():
    # Decode: cpp 1.44x in both families, the rule learns it. Prefill: cpp 1.44x in A, ATen best
    # in B: held-out A's prefill is unsure (default, 1.0) while its oracle is 1.44x.
    samples = [_sample(f, m, n, {"cpp": 1.44}) for f in ("A", "B") for m in (1, 2) for n in (1024, 4096)]
    samples += [_sample("A", m, n, {"cpp": 1.44}) for m in (256, 512) for n in (1024, 4096)]
    samples += [_sample("B", m, n, {"cpp": 0.9}) for m in (256, 512) for n in (1024, 4096)]
    v = validate(samples, depth=2)
    assert v["held_out_problems"] == 16
    # oracle: 12 problems at 1.44, 4 at 1.0; rule: at most the 8 decode ones at 1.44
    assert v["oracle_geomean"] == pytest.approx(1.44 ** (12 / 16), abs=1e-3)
    assert v["speedup_geomean"] <= 1.44 ** (8 / 16) + 1e-3
    assert v["gain_captured"] == pytest.approx(math.log(v["speedup_geomean"]) / math.log(v["oracle_geomean"]), abs=1e-3)
    assert v["gain_captured"] <= 8 / 12 + 1e-3


def _records(family, m, n, cpp_ms, seed=0):
    rec = record("h", "int8", m, {"aten": noisy(100, seed=seed), "aten~aa": noisy(100, seed=seed + 1),
                                  "cpp": noisy(cpp_ms, seed=seed + 2)}, n=n, k=2048, isa="avx2")
    rec["label"] = f"{family}-1B.proj"
    return rec


def test_aggregate_ships_a_validated_rule_in_the_table_and_it_loads():
    # Decode: cpp 25% faster in both families; prefill: ATen best in both. Leave-one-out holds.
    widths = {"Llama": (1024, 2048, 4096), "Qwen": (1536, 3072, 6144)}  # a key belongs to one family
    records = [_records(f, m, n, 80 if m <= 16 else 104, seed=i)
               for i, (f, m, n) in enumerate((f, m, n) for f in widths for m in (1, 16, 128, 512) for n in widths[f])]
    result = aggregate(records, torch_version(), template_hash(), resamples=200)
    doc = result.tables[("avx2", "other", 2)]
    assert doc["rule"] is not None, doc["rule_status"]
    v = doc["rule"]["validation"]
    assert v["losses_vs_default"] == 0 and v["families"] == ["Llama", "Qwen"] and v["decided"] > 0
    rule = parse_rule(doc["rule"], "rule", 2)
    assert doc["rule"]["domain"] == [["int8", "bf16"]] and rule.covers("int8", "bf16") and not rule.covers("int4", "bf16")
    assert predict(rule, features("int8", "bf16", 4, 3072, 2048, None))[0] == parse("cpp")
    assert predict(rule, features("int8", "bf16", 256, 3072, 2048, None))[0] in (parse("aten"), None)


def test_an_op_with_fewer_than_twelve_problems_gets_no_rule():
    # Two families, but 10 problems: a tree would keep one leaf per problem.
    widths = {"Llama": (1024, 4096), "Qwen": (1536, 3072, 6144)}
    records = [_records(f, m, n, 80 if m <= 16 else 104, seed=i)
               for i, (f, m, n) in enumerate((f, m, n) for f in widths for m in (1, 128) for n in widths[f])]
    doc = aggregate(records, torch_version(), template_hash(), resamples=200).tables[("avx2", "other", 2)]
    assert doc["rule"] is None and "int8: 10 problem(s), a rule needs 12" in doc["rule_status"]


def test_an_op_whose_subtree_captured_too_little_of_the_held_out_gain_gets_no_rule(monkeypatch):
    # The data of the validated rule above, with the bar set past what any subtree can capture:
    # the op leaves the rule (a weak subtree's unsure leaves would block lending at its count).
    import farm.tables.rule as rule_module

    widths = {"Llama": (1024, 2048, 4096), "Qwen": (1536, 3072, 6144)}
    records = [_records(f, m, n, 80 if m <= 16 else 104, seed=i)
               for i, (f, m, n) in enumerate((f, m, n) for f in widths for m in (1, 16, 128, 512) for n in widths[f])]
    monkeypatch.setattr(rule_module, "MIN_GAIN_CAPTURED", 1.01)
    doc = aggregate(records, torch_version(), template_hash(), resamples=200).tables[("avx2", "other", 2)]
    assert doc["rule"] is None
    assert "int8: its best subtree" in doc["rule_status"] and "a rule needs 101%" in doc["rule_status"]


def test_one_family_is_not_enough_to_ship_a_rule():
    records = [_records("Llama", m, 2048, 80, seed=m) for m in (1, 16, 128)]
    result = aggregate(records, torch_version(), template_hash(), resamples=200)
    doc = result.tables[("avx2", "other", 2)]
    assert doc["rule"] is None and "1 model family" in doc["rule_status"]


def test_an_op_measured_in_one_family_only_stays_outside_the_rules_domain():
    """int4 keys of one family cannot be validated leaving a family out: the rule must not
    answer int4 from leaves the int8 keys of two families shaped (found on real records)."""
    widths = {"Llama": (1024, 2048, 4096), "Qwen": (1536, 3072, 6144)}
    records = [_records(f, m, n, 80 if m <= 16 else 104, seed=i)
               for i, (f, m, n) in enumerate((f, m, n) for f in widths for m in (1, 16, 128, 512) for n in widths[f])]
    for i, m in enumerate((1, 128)):
        rec = record("h", "int4", m, {"aten": noisy(100, seed=90 + i), "aten~aa": noisy(100, seed=95 + i),
                                      "dq[fp32]": noisy(70, seed=99 + i)}, n=3072, k=2048, group=128, isa="avx2")
        rec["label"] = "Qwen-1B.proj"
        records.append(rec)
    doc = aggregate(records, torch_version(), template_hash(), resamples=200).tables[("avx2", "other", 2)]
    assert doc["rule"] is not None, doc["rule_status"]
    assert doc["rule"]["domain"] == [["int8", "bf16"]]
    assert not parse_rule(doc["rule"], "rule", 2).covers("int4", "bf16")


def test_an_op_that_loses_on_a_held_out_family_leaves_the_domain_and_the_other_op_still_ships():
    """The real AVX2 case: int4 prefill, dq[fp32] wins on one family's layers and loses on the
    other's; leaving a family out, every depth loses there. int8 validates: its rule ships alone."""
    widths = {"Llama": (1024, 2048, 4096), "Qwen": (1536, 3072, 6144)}
    records = [_records(f, m, n, 80 if m <= 16 else 104, seed=i)
               for i, (f, m, n) in enumerate((f, m, n) for f in widths for m in (1, 16, 128, 512) for n in widths[f])]
    for i, (f, m, n) in enumerate((f, m, n) for f in widths for m in (128, 512) for n in widths[f]):
        dq_ms = 70 if f == "Llama" else 140
        rec = record("h", "int4", m, {"aten": noisy(100, seed=200 + i), "aten~aa": noisy(100, seed=300 + i),
                                      "dq[fp32]": noisy(dq_ms, seed=400 + i)}, n=n, k=2048, group=128, isa="avx2")
        rec["label"] = f"{f}-1B.proj"
        records.append(rec)
    doc = aggregate(records, torch_version(), template_hash(), resamples=200).tables[("avx2", "other", 2)]
    assert doc["rule"] is not None, doc["rule_status"]
    assert doc["rule"]["domain"] == [["int8", "bf16"]]
    assert "int4" in doc["rule_status"] and "left out" in doc["rule_status"]
    v = doc["rule"]["validation"]
    assert v["losses_vs_default"] == 0 and set(v["depth_by_op"]) == {"int8"} and v["excluded"][0].startswith("int4:")
    rule = parse_rule(doc["rule"], "rule", 2)
    assert not rule.covers("int4", "bf16")
    assert predict(rule, features("int8", "bf16", 4, 3072, 2048, None))[0] == parse("cpp")


def test_a_median_lead_the_farm_did_not_decide_is_no_gain_for_a_leaf():
    # cpp leads 1.2x in the pooled median on every problem, but the farm's entries kept ATen
    # (the lead did not hold in enough processes): the leaf may say ATen or be unsure, never cpp.
    samples = [_sample(f, m, n, {"cpp": 1.2}, winner="aten") for f in ("A", "B") for m in (1, 8) for n in (1024, 4096)]
    nodes = train(samples, depth=2)
    assert all(n.get("leaf") != "cpp" for n in nodes)
    assert validate(samples, depth=2)["speedup_geomean"] == 1.0


def test_a_marginal_lead_is_split_off_not_left_to_make_its_neighbours_unsure():
    # Decode: cpp a clear 1.3x on every problem but one, where the farm's winner cpp leads by
    # 1.05x (beyond its band, short of the rule's 5% margin). Fitted to the farm's winners (all
    # cpp) the tree saw one class and left one leaf, unsure for every decode problem; fitted to
    # what a leaf could say per problem, it splits the marginal one off.
    samples = [_sample(f, m, n, {"cpp": 1.3}) for f in ("A", "B") for m in (1, 4, 8) for n in (1024, 2048, 4096)]
    samples.append(_sample("A", 8, 8192, {"cpp": 1.05}))
    assert samples[-1].winner == "cpp"
    nodes = train(samples, depth=2, min_leaf=1)
    rule = parse_rule(_rule(nodes), "rule", THREADS)
    assert predict(rule, features("int8", "bf16", 4, 2048, 2048, None))[0] == parse("cpp")
    assert predict(rule, features("int8", "bf16", 8, 8192, 2048, None))[0] is None
    assert validate(samples, depth=2)["losses_vs_default"] == 0



def test_each_op_ships_the_tree_shape_that_captured_most_held_out_gain_without_a_loss():
    from farm.tables.rule import DEPTHS, MIN_LEAVES, choose_shape

    # Decode: cpp gains in all three families. Prefill: cpp gains up to a size that differs
    # by family, and loses above it, so some shapes lose a held-out problem.
    samples = [_sample(f, m, n, {"cpp": 1.3}) for f in ("A", "B", "C") for m in (1, 4) for n in (1024, 2048, 4096)]
    samples += [_sample(f, m, n, {"cpp": 1.4 if n <= limit else 0.8}) for f, limit in (("A", 2048), ("B", 4096), ("C", 1024))
                for m in (128, 512) for n in (1024, 2048, 4096)]
    (depth, min_leaf), _, _ = choose_shape(samples)
    chosen = validate(samples, depth, min_leaf)
    assert chosen["losses_vs_default"] == 0
    for d in DEPTHS:
        for leaf in MIN_LEAVES:
            v = validate(samples, d, leaf)
            if v["losses_vs_default"] == 0:
                assert (v["gain_captured"] or 0) <= (chosen["gain_captured"] or 0)


def test_the_deepest_tree_the_aggregator_tries_loads_under_the_op_split():
    """A per-op subtree sits under the root's op split, one level deeper than itself; kernels/rule.py
    refuses trees deeper than MAX_DEPTH (a depth-8 subtree once made a table its own loader refused)."""
    from farm.tables.rule import DEPTHS

    # cpp wins and loses by turns along N: a tree keeps splitting to the deepest shape allowed.
    samples = [_sample("A", 128, 256 * (i + 1), {"cpp": 1.4 if i % 2 else 0.7}) for i in range(160)]
    samples += [_sample("A", 1, 1024, {"dq[fp32]": 0.5}, op="int4", group=128)]
    nodes = train(samples, depth=max(DEPTHS), min_leaf=1)

    def depth(i=0):
        node = nodes[i]
        return 0 if "leaf" in node else 1 + max(depth(node["left"]), depth(node["right"]))

    assert depth() == max(DEPTHS) + 1 == MAX_DEPTH
    parse_rule(_rule(nodes, domain=(("int8", "bf16"), ("int4", "bf16"))), "rule", THREADS)  # loads, no RuleError
