"""Shared benchmark machinery.

Every benchmark runs a nai_fast path and its eager baseline side by side and
reports the ratio at the end of the run. With ``--benchmark-disable`` (how CI
runs them) each function runs once on small sizes, so the suites never rot.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict

import pytest

BASELINE, FAST = "baseline", "nai_fast"

_fastest: dict[str, dict[str, float]] = defaultdict(dict)  # group -> role -> best seconds
_notes: list[str] = []


def smoke_mode(config: pytest.Config) -> bool:
    return bool(config.getoption("benchmark_disable"))


@pytest.fixture
def smoke(request: pytest.FixtureRequest) -> bool:
    """True when benchmarks only run once on small sizes."""
    return smoke_mode(request.config)


@pytest.fixture
def timed(benchmark, smoke):
    """``timed(group, role, fn, rounds)`` runs ``fn`` under pytest-benchmark
    and keeps its best time (:func:`best_seconds`) for the ratio report; returns
    ``fn``'s result."""

    def run(group: str, role: str, fn, rounds: int = 3):
        benchmark.group = group
        benchmark.extra_info["role"] = role

        def measured():
            start = time.perf_counter()
            result = fn()
            seconds = time.perf_counter() - start
            _fastest[group][role] = min(_fastest[group].get(role, math.inf), seconds)
            return result

        return benchmark.pedantic(measured, rounds=1 if smoke else rounds, iterations=1)

    return run


def best_seconds(group: str, role: str) -> float | None:
    """The best time ``timed`` has seen for ``role`` in ``group`` (smoke runs included)."""
    return _fastest.get(group, {}).get(role)


@pytest.fixture
def note():
    """``note(text)`` adds a line (a memory figure, a model prediction) to the final report."""
    return _notes.append


def pytest_terminal_summary(terminalreporter, config):
    if smoke_mode(config):  # one round on small sizes: no ratio means anything
        pairs = {}
    else:
        pairs = {group: roles for group, roles in _fastest.items() if {BASELINE, FAST} <= roles.keys()}
    if not pairs and not _notes:
        return
    terminalreporter.section("nai_fast versus baseline")
    for group, roles in pairs.items():  # in run order
        ratio = roles[BASELINE] / roles[FAST]
        terminalreporter.write_line(
            f"{group:<44} baseline {roles[BASELINE] * 1e3:>10.2f} ms   nai_fast {roles[FAST] * 1e3:>9.2f} ms   "
            f"speed-up {ratio:>7.1f}x"
        )
    for line in _notes:
        terminalreporter.write_line(line)
