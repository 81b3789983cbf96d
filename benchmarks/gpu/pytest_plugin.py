"""The correctness part's pytest plugin: records each test's outcome as it ends, and skips
the tests that would start past the part's deadline.

Loaded with ``-p gpu.pytest_plugin`` in pytest's main process and in every xdist worker: the
deadline (:data:`DEADLINE_VAR`) applies wherever a test starts; :class:`Recording`,
registered in the main process only, receives every report (xdist forwards the workers').
"""

from __future__ import annotations

import os
import time

import pytest

from gpu.record import Recorder

DEADLINE_VAR = "NAI_FAST_GPU_DEADLINE"
# A test starting later than this before the deadline is skipped: the longest test (the SD 1.x
# txt2img, three images, compiles included) fits in it.
MARGIN_S = 20.0


def pytest_runtest_setup(item: pytest.Item) -> None:
    deadline = float(os.environ.get(DEADLINE_VAR, "inf"))
    if time.time() > deadline - MARGIN_S:
        pytest.skip("out of time: the GPU check's correctness part reached its budget")


class Recording:
    """Appends one record per test to the part's recorder."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "call" and report.passed:
            return  # setup and teardown that passed: the call's report says it all
        if report.when == "teardown" and report.skipped:
            return
        record = {
            "kind": "test",
            "test": report.nodeid.split("::", 1)[-1],
            "file": report.nodeid.split("::", 1)[0],
            "when": report.when,
            "outcome": report.outcome,
            "seconds": report.duration,
            "properties": dict(report.user_properties),
        }
        if report.failed:
            record["message"] = _short(report.longreprtext)
        elif report.skipped and isinstance(report.longrepr, tuple):
            record["message"] = report.longrepr[2]
        self.recorder.add(**record)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        self.recorder.info(exitstatus=int(exitstatus), collected=session.testscollected)


def _short(text: str, lines: int = 12) -> str:
    """The end of a failure's report: the assertion and where it was raised."""
    kept = [line for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])[-2000:]
