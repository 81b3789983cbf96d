"""File a GPU check's results in the repository: the JSON under ``docs/gpu/``, a row in
docs/gpu.md's table of runs (newest first), and the card's class in the measured kernel
table ``auto`` follows (``nai_fast/kernels/measured.json``).

    python3 benchmarks/gpu/publish.py PATH/results.json [--commit SHA]

``--commit`` names the commit the run measured where the results say "unknown" (the GPU
machine's copy of the tree has no git; check.sh records ``$NAI_FAST_COMMIT``). Then
commit what it wrote.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``gpu`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu.record import write_json  # noqa: E402
from gpu.report import RUNS_HEADER, card, date, load, runs_row  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RUNS_START, RUNS_END = "<!-- runs: newest first -->", "<!-- end of runs -->"
NO_RUN_YET = "no run yet"
MEASURED_TABLE = Path("nai_fast/kernels/measured.json")
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def run_name(results: dict) -> str:
    """``2026-12-01-nvidia-h200``."""
    slug = re.sub(r"[^a-z0-9]+", "-", card(results).get("name", "unknown").lower()).strip("-")
    return f"{date(results)}-{slug}"


def measured_entry(results: dict, source: str) -> tuple[str, dict[str, Any]] | None:
    """The run's class (``"sm_90"``) and its entry for the measured table: every timing of
    ``hyper_kv`` and ``cross_attention`` where both nai_fast and the replaced path ran.
    None for a dry run or a run that timed no kernel."""
    gpu = card(results)
    arch = gpu.get("arch", "")
    if results.get("mode") != "gpu" or not arch.startswith("sm_"):
        return None
    timings = []
    for record in results.get("parts", {}).get("kernels", {}).get("records", []):
        if record.get("kind") != "kernel" or record["op"] not in ("hyper_kv", "cross_attention"):
            continue
        providers = record["providers"]
        fused, baseline = providers.get("nai_fast", {}).get("ms"), providers.get(record["baseline"], {}).get("ms")
        if fused is None or baseline is None:
            continue
        shape = dict(record["shape"], dtype_bytes=DTYPE_BYTES[record["dtype"]])
        if record["op"] == "cross_attention":
            shape["queries"] = shape.pop("batch") * shape.pop("query_length")
        timings.append({"op": record["op"], "backward": record["passes"] != "forward", "shape": shape,
                        "fused_ms": fused, "baseline_ms": baseline, "baseline": record["baseline"]})  # fmt: skip
    if not timings:
        return None
    entry = {"card": gpu.get("name"), "date": date(results), "commit": results.get("commit"), "source": source,
             "timings": timings}  # fmt: skip
    return arch, entry


def add_run_row(doc: str, row: str) -> str:
    """docs/gpu.md with ``row`` first in its table of runs (the placeholder row dropped)."""
    start, end = doc.index(RUNS_START), doc.index(RUNS_END)
    lines = [line for line in doc[start + len(RUNS_START) : end].strip().splitlines() if NO_RUN_YET not in line]
    if len(lines) < 2:  # no table yet
        lines = [RUNS_HEADER, "|" + " --- |" * (RUNS_HEADER.count("|") - 1)]
    header, rule, runs = lines[0], lines[1], lines[2:]
    table = "\n".join([header, rule, row, *runs])
    return f"{doc[:start]}{RUNS_START}\n{table}\n{doc[end:]}"


def publish(results_path: Path, repo: Path = REPO, commit: str | None = None) -> dict[str, Path]:
    """Write the run into ``repo``; returns what was written."""
    results = load(results_path)
    if commit and str(results.get("commit", "unknown")).startswith("unknown"):
        results["commit"] = commit
    name = run_name(results)
    destination = repo / "docs" / "gpu" / f"{name}.json"
    suffix = 2
    while destination.exists():
        destination = repo / "docs" / "gpu" / f"{name}-{suffix}.json"
        suffix += 1
    write_json(destination, results)
    written = {"results": destination}
    doc_path = repo / "docs" / "gpu.md"
    doc_path.write_text(add_run_row(doc_path.read_text(), runs_row(results, destination.name)))
    written["doc"] = doc_path
    entry = measured_entry(results, f"docs/gpu/{destination.name}")
    if entry is not None:
        table_path = repo / MEASURED_TABLE
        table = json.loads(table_path.read_text())
        table["classes"][entry[0]] = entry[1]
        write_json(table_path, table)
        written["measured"] = table_path
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a run's results.json")
    parser.add_argument("--commit", help="the commit the run measured, where its results say unknown")
    arguments = parser.parse_args(argv)
    for what, path in publish(arguments.results, commit=arguments.commit).items():
        print(f"{what}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
