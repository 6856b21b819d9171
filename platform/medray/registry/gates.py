"""Promotion gates as plain functions: absolute minimums and no regression beyond a tolerance.

Metrics are flat `{dotted.name: float}` dicts (`flatten_metrics`), e.g. `retrieval.p@5`,
`pair.accuracy`, `heads.tissue.macro_f1`. Every gated metric is "higher is better".
A gated metric the candidate lacks fails its gate: a version cannot pass by omission.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel


class GateResult(BaseModel):
    """One gate's verdict, recorded with the promotion decision."""

    metric: str
    kind: Literal["min", "max_regression"]
    value: float | None
    """The candidate's value (None: the candidate has no such metric)."""
    limit: float | None
    """The value the candidate must reach (minimum, or baseline minus tolerance)."""
    baseline: float | None = None
    """Production's value (regression gates only)."""
    passed: bool
    reason: str


def flatten_metrics(obj: Any, prefix: str = "") -> dict[str, float]:
    """Nested dict of numbers -> {"a.b": float}; non-numeric leaves (and bools) are dropped."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flatten_metrics(value, f"{prefix}{key}."))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and math.isfinite(obj):
        out[prefix.rstrip(".")] = float(obj)
    return out


def check_minimums(metrics: dict[str, float], minimums: dict[str, float]) -> list[GateResult]:
    """`metric >= minimum` for each gated metric."""
    results = []
    for name, minimum in minimums.items():
        value = metrics.get(name)
        if value is None:
            results.append(GateResult(metric=name, kind="min", value=None, limit=minimum,
                                      passed=False, reason="candidate has no such metric"))  # fmt: skip
            continue
        ok = value >= minimum
        reason = f"{value:.4f} {'>=' if ok else '<'} minimum {minimum:.4f}"
        results.append(GateResult(metric=name, kind="min", value=value, limit=minimum,
                                  passed=ok, reason=reason))  # fmt: skip
    return results


def check_regressions(
    metrics: dict[str, float], baseline: dict[str, float] | None, tolerances: dict[str, float]
) -> list[GateResult]:
    """`metric >= production's - tolerance` for each gated metric; with no production
    version (or production lacking the metric) the gate passes and says why."""
    results = []
    for name, tol in tolerances.items():
        value = metrics.get(name)
        base = None if baseline is None else baseline.get(name)
        if value is None:
            ok, limit, reason = False, None, "candidate has no such metric"
        elif base is None:
            ok, limit = True, None
            reason = (
                "no production version" if baseline is None else "production has no such metric"
            )
        else:
            limit = base - tol
            ok = value >= limit
            reason = f"{value:.4f} vs production {base:.4f} (tolerance {tol:.4f}): " + (
                "no regression" if ok else f"regressed by {base - value:.4f}"
            )
        results.append(GateResult(metric=name, kind="max_regression", value=value, limit=limit,
                                  baseline=base, passed=ok, reason=reason))  # fmt: skip
    return results


def evaluate_gates(
    candidate: dict[str, float],
    production: dict[str, float] | None,
    minimums: dict[str, float],
    tolerances: dict[str, float],
) -> list[GateResult]:
    """Every gate, minimums first; promotion needs all of them to pass."""
    return check_minimums(candidate, minimums) + check_regressions(
        candidate, production, tolerances
    )


def all_passed(results: list[GateResult]) -> bool:
    return all(r.passed for r in results)


def failing(results: list[GateResult]) -> list[GateResult]:
    return [r for r in results if not r.passed]
