"""The check's results: ``results.json`` (everything the parts recorded) and ``results.md`` (a
short report: the card, the ceilings, test outcomes, kernel and engine tables), rewritten
after every part; and the one-line summary docs/gpu.md's table of runs takes."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from gpu.record import write_json

FORMAT = 1
ANCHOR_NOTE = "A100 80GB, SD 1.5 512x512, batch 1 (published)"


def results_data(meta: dict, outcomes: dict) -> dict[str, Any]:
    parts = {}
    for name, outcome in outcomes.items():
        data = outcome.data or {}
        parts[name] = {
            "status": outcome.status, "seconds": outcome.seconds, "budget_s": outcome.budget_s,
            "returncode": outcome.returncode, "finished": data.get("finished", False),
            "info": data.get("info", {}), "records": data.get("records", []), "errors": data.get("errors", []),
        }  # fmt: skip
    return {"format": FORMAT, **meta, "parts": parts}


def write_results(out: Path, meta: dict, outcomes: dict) -> dict[str, Any]:
    results = results_data(meta, outcomes)
    write_json(out / "results.json", results)
    (out / "results.md").write_text(markdown(results))
    return results


def load(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


# -- facts read from the results ------------------------------------------------------------


def _part(results: dict, name: str) -> dict:
    return results.get("parts", {}).get(name, {})


def _records(results: dict, part: str, kind: str) -> list[dict]:
    return [record for record in _part(results, part).get("records", []) if record.get("kind") == kind]


def card(results: dict) -> dict:
    return _part(results, "ceilings").get("info", {}).get("card", {})


def versions(results: dict) -> dict:
    return _part(results, "ceilings").get("info", {}).get("versions", {})


def date(results: dict) -> str:
    return datetime.datetime.fromtimestamp(results.get("started", 0), datetime.UTC).strftime("%Y-%m-%d")


def ceilings(results: dict) -> dict[str, float | None]:
    info = _part(results, "ceilings").get("info", {})
    return {"bandwidth": info.get("bandwidth"), "tensor_flops": info.get("tensor_flops")}


def test_counts(results: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in _records(results, "correctness", "test"):
        counts[record["outcome"]] = counts.get(record["outcome"], 0) + 1
    return counts


def _short_commit(commit: str) -> str:
    """The first 12 hex digits, and "+dirty" where the tree had uncommitted changes."""
    sha, _, state = commit.partition("+")
    return sha[:12] + (f"+{state}" if state else "")


def _fmt(value: float | None, spec: str = ".2f", scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def _short_shape(shape: dict) -> str:
    keys = {"batch": "B", "heads": "H", "query_length": "Lq", "key_length": "Lk", "head_dim": "d", "tokens": "M",
            "width": "C", "chunks": "chunks ", "length": "L", "num_rows": "rows "}  # fmt: skip
    return " ".join(f"{keys[key]}{value}" for key, value in shape.items() if key in keys)


# -- markdown -------------------------------------------------------------------------------


def markdown(results: dict) -> str:
    gpu = card(results)
    lines = [
        f"# GPU check ({results.get('mode')}): {gpu.get('name', '?')} ({gpu.get('arch', '?')}), {date(results)}, "
        f"commit {_short_commit(results.get('commit', 'unknown'))}",
        "",
        "versions: " + ", ".join(f"{name} {version}" for name, version in versions(results).items() if version),
        "",
        *_travel_md(results.get("travel") or {}),
        "| part | status | seconds | budget s |",
        "| --- | --- | ---: | ---: |",
    ]
    for name, part in results.get("parts", {}).items():
        status = part["status"] + ("" if part["finished"] or part["status"] == "not run" else " (unfinished)")
        lines.append(f"| {name} | {status} | {part['seconds']:.0f} | {part['budget_s']:.0f} |")
    for render in (_ceilings_md, _correctness_md, _kernels_md, _engine_md, _errors_md):
        lines += ["", *render(results)]
    return "\n".join(lines).rstrip() + "\n"


def _travel_md(travel: dict) -> list[str]:
    if "total_bytes" not in travel:
        return [f"travel: {travel.get('error', 'not measured')}", ""]
    missing = travel.get("missing_requirements")
    return [
        f"travel: tree {travel['tree_bytes'] / 2**20:.2f} MiB + wheels {travel['wheel_bytes'] / 2**20:.2f} MiB = "
        f"{travel['total_bytes'] / 2**20:.2f} MiB of {travel['limit_bytes'] / 2**20:.0f} MiB"
        f"{'' if travel['fits'] else ' (TOO LARGE)'}; wheels: {', '.join(travel['wheels']) or 'none'}"
        f"{'; requirements missing: ' + str(missing) if missing else ''}",
        "",
    ]


def _ceilings_md(results: dict) -> list[str]:
    rows = _records(results, "ceilings", "ceiling")
    if not rows:
        return ["## Ceilings: none measured"]
    lines = ["## Ceilings", ""]
    for row in rows:
        if row["name"] == "copy":
            lines.append(
                f"- device-to-device copy: {row['bytes_per_s'] / 1e12:.2f} TB/s "
                f"({row['bytes'] / 1e9:.1f} GB read + written in {row['ms']:.2f} ms)"
            )
        else:
            lines.append(f"- {row['name']} {row['n']}^3: {row['flop_per_s'] / 1e12:.0f} TFLOP/s ({row['ms']:.2f} ms)")
    return lines


def _correctness_md(results: dict) -> list[str]:
    tests = _records(results, "correctness", "test")
    if not tests:
        return ["## Correctness: no test ran"]
    counts = test_counts(results)
    lines = ["## Correctness", "", ", ".join(f"{count} {outcome}" for outcome, count in sorted(counts.items())) + "."]
    shares = [
        (record["properties"]["accuracy"].get("share_of_bound"), record["test"])
        for record in tests
        if record["outcome"] == "passed" and isinstance(record.get("properties", {}).get("accuracy"), dict)
    ]
    shares = [(share, test) for share, test in shares if share is not None]
    if shares:
        share, test = max(shares)
        lines.append(f"Closest to the bound (kernel error over 2x eager + floor): {share:.2f}, {test}.")
    failed = [record for record in tests if record["outcome"] == "failed"]
    for record in failed[:20]:
        message = (record.get("message") or "").splitlines()
        lines.append(f"- FAILED {record['test']} ({record['when']}): {message[-1] if message else ''}"[:400])
    if len(failed) > 20:
        lines.append(f"- ... and {len(failed) - 20} more failures (results.json)")
    return lines


def _kernels_md(results: dict) -> list[str]:
    rows = _records(results, "kernels", "kernel")
    if not rows:
        return ["## Kernels: none timed"]
    lines = [
        f"## Kernels (float16, median of {'wall-clock (dry run)' if results.get('mode') == 'dry-run' else 'CUDA-event'} "
        "timings; TFLOP/s, GB/s and floor of the minimal work)",
        "",
        "eager: a call as eager PyTorch makes it (what the policy weighs); device: the calls replayed in a CUDA "
        "graph, the device's time alone; host: the host's time to issue a call. TFLOP/s, GB/s and the floor "
        "on the device time where measured.",
        "",
        "| op | shape | pass | eager us: nai_fast | baseline | vs baseline | device us: nai_fast | baseline | vs | "
        "host us: nai_fast | baseline | best other (eager) | vs best | TFLOP/s | GB/s | of floor |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        providers = row["providers"]
        fused = providers.get("nai_fast", {})
        baseline = providers.get(row["baseline"], {})
        best = row.get("best_other")
        best_ms = providers.get(best, {}).get("ms") if best else None
        lines.append(
            f"| {row['op']} | {_short_shape(row['shape'])} | {row['passes']} | {_fmt(fused.get('ms'), '.1f', 1e3)} | "
            f"{_fmt(baseline.get('ms'), '.1f', 1e3)} ({row['baseline']}) | {_fmt(row.get('speedup_vs_baseline'))}x | "
            f"{_fmt(fused.get('device_ms'), '.1f', 1e3)} | {_fmt(baseline.get('device_ms'), '.1f', 1e3)} | "
            f"{_fmt(row.get('device_speedup_vs_baseline'))}x | {_fmt(fused.get('host_ms'), '.1f', 1e3)} | "
            f"{_fmt(baseline.get('host_ms'), '.1f', 1e3)} | "
            f"{best or '-'} {_fmt(best_ms, '.1f', 1e3)} | {_fmt(row.get('speedup_vs_best'))}x | "
            f"{_fmt(fused.get('tflops'), '.1f')} | {_fmt(fused.get('gbps'), '.0f')} | {_fmt(fused.get('floor_fraction'), '.0%')} |"
        )
    launches = _records(results, "kernels", "launch")
    if launches:
        lines += ["", "Host time of one launch: " + ", ".join(
            f"{row['launched']} {row['host_us']:.1f} us" for row in launches
        ) + "."]  # fmt: skip
    return lines


def _engine_md(results: dict) -> list[str]:
    generation = _records(results, "engine", "generation") + _records(results, "compile", "generation")
    training = _records(results, "engine", "training")
    compiled = _records(results, "compile", "compile")
    lines = ["## Engine"]
    if generation:
        first = generation[0]
        lines += [
            "",
            f"Generation {first['size']}, {first['steps']} steps, batch 1 with guidance "
            "(U-Net step: the guidance batch of 2; txt2img: encoding and decoding included):",
            "",
            "| variant | U-Net step it/s | txt2img it/s | of matmul ceiling | peak GiB |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for row in generation:
            lines.append(
                f"| {row['variant']} | {row['step_its']:.2f} | {row['txt2img_its']:.2f} | "
                f"{_fmt(row.get('tensor_fraction'), '.0%')} | {_fmt(row.get('peak_gib'), '.2f')} |"
            )
        anchors = _part(results, "engine").get("info", {}).get("anchors_its", {})
        if anchors:
            lines += [
                "",
                f"Anchors, {ANCHOR_NOTE}: " + ", ".join(f"{name} {its:g} it/s" for name, its in anchors.items()),
            ]
    if training:
        first = training[0]
        lines += [
            "",
            f"Hypernetwork training {first['size']}, batch {first['batch']}, {first['dtype']}:",
            "",
            "| variant | images/s | step ms | peak GiB |",
            "| --- | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {row['variant']} | {row['images_per_s']:.2f} | {row['step_ms']:.1f} | {_fmt(row.get('peak_gib'), '.2f')} |"
            for row in training
        ]
    for row in compiled:
        if row["stage"] == "compiled":
            lines.append(f"\ntorch.compile of the U-Net: {row['seconds']:.0f} s to compile.")
    if not (generation or training):
        lines.append("\nnothing measured")
    return lines


def _errors_md(results: dict) -> list[str]:
    lines = []
    for name, part in results.get("parts", {}).items():
        for error in part.get("errors", []):
            lines.append(f"- {name}: {error['what']}: {error['error']}"[:500])
        for record in part.get("records", []):
            if record.get("kind") == "skipped":
                lines.append(f"- {name}: skipped {record['what']}: {record['reason']}"[:500])
    return ["## Errors and skips", "", *lines] if lines else []


# -- docs/gpu.md's table of runs ----------------------------------------------------------------

RUNS_HEADER = (
    "| date | card | torch / triton / CUDA | commit | copy TB/s | bf16 TFLOP/s | tests passed/failed | "
    "kernels vs baseline (min-max) | txt2img it/s: diffusers / nai_fast / hypernetwork web UI / nai_fast | "
    "training images/s: web UI / nai_fast | JSON |"
)


def runs_row(results: dict, json_name: str) -> str:
    """One row of docs/gpu.md's table of runs."""
    gpu, found = card(results), versions(results)
    rates, counts = ceilings(results), test_counts(results)
    speedups = [
        row["speedup_vs_baseline"] for row in _records(results, "kernels", "kernel") if row.get("speedup_vs_baseline")
    ]
    generation = {row["variant"]: row["txt2img_its"] for row in _records(results, "engine", "generation")}
    training = {row["variant"]: row["images_per_s"] for row in _records(results, "engine", "training")}

    def pick(table: dict, *names: str) -> str:
        return " / ".join(
            _fmt(next((table[name] for name in table if name.startswith(prefix)), None), ".1f") for prefix in names
        )

    cells = [
        date(results), f"{gpu['name']} ({gpu.get('arch', '?')})" if gpu else "not recorded (no ceilings part)",
        f"{found.get('torch')} / {found.get('triton')} / {found.get('cuda')}" if found else "-",
        _short_commit(str(results.get("commit", "unknown"))),
        _fmt(rates["bandwidth"], ".2f", 1e-12), _fmt(rates["tensor_flops"], ".0f", 1e-12),
        f"{counts.get('passed', 0)}/{counts.get('failed', 0)}" if "correctness" in results.get("parts", {}) else "-",
        f"{min(speedups):.2f}x-{max(speedups):.2f}x" if speedups else "-",
        pick(generation, "diffusers", "nai_fast", "web UI hypernetwork", "nai_fast hypernetwork (auto)"),
        pick(training, "web UI", "nai_fast (auto)"), f"[{json_name}](gpu/{json_name})",
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"
