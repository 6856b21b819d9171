"""Promotion gates: absolute minimums and no regression beyond a tolerance (plain functions)."""

from __future__ import annotations

import math

from medray.registry.gates import (
    all_passed,
    check_minimums,
    check_regressions,
    evaluate_gates,
    failing,
    flatten_metrics,
)


def test_flatten_keeps_numbers_drops_the_rest():
    flat = flatten_metrics(
        {"retrieval": {"p@5": 0.7, "map@10": 1}, "pair": {"accuracy": 0.8, "ok": True},
         "backbone_id": "x", "nan": math.nan}
    )  # fmt: skip
    assert flat == {"retrieval.p@5": 0.7, "retrieval.map@10": 1.0, "pair.accuracy": 0.8}


def test_minimum_passes_at_the_limit_and_fails_below():
    res = check_minimums({"a": 0.5, "b": 0.49}, {"a": 0.5, "b": 0.5})
    assert [r.passed for r in res] == [True, False]
    assert res[1].limit == 0.5 and "< minimum" in res[1].reason


def test_missing_candidate_metric_fails_every_gate():
    res = evaluate_gates({}, {"a": 1.0}, {"a": 0.1}, {"a": 0.1})
    assert not any(r.passed for r in res)
    assert all("no such metric" in r.reason for r in res)


def test_regression_within_tolerance_passes_beyond_fails():
    base = {"m": 0.80}
    assert check_regressions({"m": 0.79}, base, {"m": 0.02})[0].passed
    bad = check_regressions({"m": 0.77}, base, {"m": 0.02})[0]
    assert not bad.passed and bad.baseline == 0.80 and abs(bad.limit - 0.78) < 1e-12
    assert "regressed by 0.0300" in bad.reason


def test_no_production_means_regression_gates_pass():
    res = check_regressions({"m": 0.1}, None, {"m": 0.0})
    assert res[0].passed and res[0].reason == "no production version"
    res = check_regressions({"m": 0.1}, {"other": 1.0}, {"m": 0.0})
    assert res[0].passed and "production has no such metric" in res[0].reason


def test_improvement_passes_and_all_passed_combines():
    res = evaluate_gates({"m": 0.9, "n": 0.5}, {"m": 0.8}, {"n": 0.4}, {"m": 0.0})
    assert all_passed(res) and not failing(res)
    res = evaluate_gates({"m": 0.9, "n": 0.3}, {"m": 0.8}, {"n": 0.4}, {"m": 0.0})
    assert not all_passed(res) and [r.metric for r in failing(res)] == ["n"]
