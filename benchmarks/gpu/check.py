"""The GPU check's driver: runs the parts in order, each in its own process under its own time
budget, and writes ``results.json`` and ``results.md`` into the output folder after every part.

    python -m gpu.check --out DIR [--dry-run] [--time-limit SECONDS] [--parts a,b]

(``bash benchmarks/gpu/check.sh`` sets up the path and the carried wheels, then runs this.)
Budgets are shares of the time limit; a part that ends early leaves its time to the later
ones, and each part is killed when its share runs out, so the whole check ends inside the
limit. A part's records survive its failure or its kill (:mod:`gpu.record`).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from gpu.record import read_part
from gpu.report import write_results

# The check must end inside 8 minutes; check.sh spends some seconds installing the wheels and
# importing everything once before the parts start.
GPU_TIME_LIMIT_S = 450
DRY_RUN_TIME_LIMIT_S = 900  # generous: a loaded 2-core CI machine
KILL_GRACE_S = 5  # between asking a part to stop (SIGTERM) and killing it
PART_MARGIN_S = 8  # a part is told its deadline this much before it is killed


@dataclass(frozen=True)
class Part:
    name: str
    module: str
    share: float  # of the time limit, in seconds of GPU_TIME_LIMIT_S
    options: tuple[str, ...] = ()


# In order; each part's share of the time limit, in seconds of GPU_TIME_LIMIT_S.
PARTS = (
    Part("ceilings", "gpu.ceilings", 20),
    Part("correctness", "gpu.correctness", 135),
    Part("kernels", "gpu.kernel_speed", 100),
    Part("engine", "gpu.engine", 145),
    Part("compile", "gpu.engine", 50, ("--compile",)),
)
PART_NAMES = tuple(part.name for part in PARTS)


@dataclass
class Outcome:
    """How a part's process ended."""

    status: str  # "ok", "failed", "timeout", "not run"
    seconds: float = 0.0
    budget_s: float = 0.0
    returncode: int | None = None
    data: dict | None = field(default=None, repr=False)


def run_process(command: list[str], timeout: float) -> tuple[int | None, bool]:
    """Run ``command`` in a session of its own; on timeout stop its whole process group.
    Returns (return code, timed out)."""
    process = subprocess.Popen(command, start_new_session=True)
    try:
        return process.wait(timeout=max(timeout, 1)), False
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 30)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        return process.returncode, True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where results.json and results.md go")
    parser.add_argument("--dry-run", action="store_true", help="every part on the CPU, tiny shapes, the reference path")
    parser.add_argument(
        "--time-limit",
        type=float,
        help=f"seconds for all parts (default {GPU_TIME_LIMIT_S}; dry run {DRY_RUN_TIME_LIMIT_S})",
    )
    parser.add_argument("--parts", default=",".join(PART_NAMES), help=f"comma-separated, of {', '.join(PART_NAMES)}")
    parser.add_argument("--work", type=Path, help="where the parts' own files go (default: a temporary folder)")
    arguments = parser.parse_args(argv)

    chosen = [name.strip() for name in arguments.parts.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(PART_NAMES))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {', '.join(PART_NAMES)}")
    parts = [part for part in PARTS if part.name in chosen]
    limit = arguments.time_limit or (DRY_RUN_TIME_LIMIT_S if arguments.dry_run else GPU_TIME_LIMIT_S)
    total_share = sum(part.share for part in parts)
    budgets = {part.name: limit * part.share / total_share for part in parts}

    started = time.time()
    end = started + limit
    work = arguments.work or Path(tempfile.mkdtemp(prefix="nai-fast-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    arguments.out.mkdir(parents=True, exist_ok=True)
    outcomes = {part.name: Outcome("not run", budget_s=budgets[part.name]) for part in parts}
    meta = {"mode": "dry-run" if arguments.dry_run else "gpu", "started": started, "time_limit_s": limit,
            "commit": os.environ.get("NAI_FAST_COMMIT") or "unknown", "parts_run": chosen}  # fmt: skip
    meta["travel"] = _travel()
    write_results(arguments.out, meta, outcomes)

    ceilings_file = work / "ceilings.json"
    for index, part in enumerate(parts):
        later = sum(budgets[other.name] for other in parts[index + 1 :])
        timeout = end - time.time() - later  # its share plus what earlier parts left
        record = work / f"{part.name}.json"
        command = [sys.executable, "-m", part.module, "--record", str(record), "--deadline",
                   str(time.time() + timeout - PART_MARGIN_S), *part.options]  # fmt: skip
        if ceilings_file.exists() or part.name != "ceilings":
            command += ["--ceilings", str(ceilings_file)]
        if arguments.dry_run:
            command.append("--dry-run")
        print(f"\n=== part {index + 1}/{len(parts)}: {part.name} ({timeout:.0f} s) ===", flush=True)
        part_start = time.time()
        returncode, timed_out = run_process(command, timeout)
        status = "timeout" if timed_out else ("ok" if returncode == 0 else "failed")
        outcomes[part.name] = Outcome(status, time.time() - part_start, timeout, returncode, read_part(record))
        meta["seconds"] = time.time() - started
        write_results(arguments.out, meta, outcomes)
        print(f"=== {part.name}: {status} in {outcomes[part.name].seconds:.0f} s ===", flush=True)
    print(f"\nresults: {arguments.out / 'results.json'} and results.md ({time.time() - started:.0f} s)")
    return 0 if all(outcome.status == "ok" for outcome in outcomes.values()) else 1


def _travel() -> dict:
    """What traveled (or would): the tree, the carried wheels, the 64 MiB limit."""
    from gpu.fetch_wheels import travel_report

    try:
        return travel_report()
    except Exception as error:  # noqa: BLE001 - a report, never a reason to stop
        return {"error": f"{type(error).__name__}: {error}"}


if __name__ == "__main__":
    sys.exit(main())
