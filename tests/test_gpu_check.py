"""The GPU check (benchmarks/gpu/) without a GPU: its dry run end to end, the driver's time
budgets and kills, the wheel closure and size checks, and filing a run's results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
if str(BENCHMARKS) not in sys.path:  # the check's modules import each other as gpu.*
    sys.path.insert(0, str(BENCHMARKS))

from gpu import check, fetch_wheels, publish  # noqa: E402
from gpu.report import RUNS_HEADER, markdown  # noqa: E402

pytestmark = pytest.mark.slow  # the dry run runs every part in processes of its own


def environment(**extra: str) -> dict[str, str]:
    paths = [str(REPO), str(BENCHMARKS), os.environ.get("PYTHONPATH", "")]
    return os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, paths)), "OMP_NUM_THREADS": "1"} | extra


# -- the dry run ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu-check")
    completed = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu" / "check.sh"), "--dry-run"], env=environment(OUT=str(out)),
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return {"out": out, "results": json.loads((out / "results.json").read_text()), "stdout": completed.stdout}


def records(results: dict, part: str, kind: str) -> list[dict]:
    return [record for record in results["parts"][part]["records"] if record["kind"] == kind]


def test_dry_run_runs_every_part_to_its_end(dry_run):
    results = dry_run["results"]
    assert results["mode"] == "dry-run"
    assert list(results["parts"]) == list(check.PART_NAMES)
    for name, part in results["parts"].items():
        assert part["status"] == "ok" and part["finished"], name
        assert part["records"] and not part["errors"], name
        assert part["seconds"] <= part["budget_s"], name
    assert {path.name for path in dry_run["out"].iterdir()} == {"results.json", "results.md", "check.log"}
    assert results["travel"]["fits"]


def test_dry_run_measures_what_the_gpu_run_does(dry_run):
    results = dry_run["results"]
    assert {record["name"] for record in records(results, "ceilings", "ceiling")} == {"copy", "matmul float32"}
    tests = records(results, "correctness", "test")
    assert {record["outcome"] for record in tests} == {"passed"}
    assert {record["test"].split("[")[0] for record in tests} == {
        "test_cross_attention", "test_hyper_kv", "test_chunk_concat", "test_unet_training_step", "test_txt2img"
    }  # fmt: skip
    kernels = records(results, "kernels", "kernel")
    assert {(record["op"], record["passes"]) for record in kernels} == {
        (op, passes)
        for op in ("cross_attention", "hyper_kv", "chunk_concat")
        for passes in ("forward", "forward+backward")
    }
    attention = next(record for record in kernels if record["op"] == "cross_attention")
    assert {"nai_fast", "eager", "sdpa", "sdpa_math"} <= attention["providers"].keys()
    assert attention["speedup_vs_baseline"] > 0 and attention["baseline"] == "sdpa"
    assert all(provider["host_ms"] > 0 for provider in attention["providers"].values())
    generation = {record["variant"] for record in records(results, "engine", "generation")}
    assert {"diffusers", "nai_fast", "web UI hypernetwork", "nai_fast hypernetwork (auto)"} <= generation
    assert {record["variant"] for record in records(results, "engine", "training")} >= {"web UI", "nai_fast (auto)"}
    assert [record["stage"] for record in records(results, "compile", "compile")] == ["started", "compiled"]
    assert records(results, "compile", "generation")


def test_dry_run_report(dry_run):
    report = (dry_run["out"] / "results.md").read_text()
    for heading in ("## Ceilings", "## Correctness", "## Kernels", "## Engine"):
        assert heading in report
    assert report == markdown(dry_run["results"])
    assert report.strip() in dry_run["stdout"], "check.sh prints the report last"


# -- budgets and kills ----------------------------------------------------------------------


def test_a_part_killed_at_its_budget_keeps_its_records(tmp_path, monkeypatch):
    """A part that records, then hangs, is stopped at its share; the next part still runs."""
    (tmp_path / "hanging_part.py").write_text(textwrap.dedent("""
        import time
        from gpu.record import run_part

        def body(recorder, arguments):
            recorder.add(kind="measured", value=1)
            time.sleep(600)

        run_part("hanging", body)
    """))  # fmt: skip
    (tmp_path / "quick_part.py").write_text(textwrap.dedent("""
        from gpu.record import run_part
        run_part("quick", lambda recorder, arguments: recorder.add(kind="measured", value=2))
    """))  # fmt: skip
    parts = (check.Part("ceilings", "hanging_part", 1), check.Part("correctness", "quick_part", 1))
    monkeypatch.setattr(check, "PARTS", parts)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), environment()["PYTHONPATH"]]))
    out = tmp_path / "out"
    start = time.time()
    assert check.main(["--out", str(out), "--dry-run", "--time-limit", "40", "--parts", "ceilings,correctness"]) == 1
    assert time.time() - start < 45, "the whole check ends inside its limit"
    results = json.loads((out / "results.json").read_text())
    hanging, quick = results["parts"]["ceilings"], results["parts"]["correctness"]
    assert hanging["status"] == "timeout" and not hanging["finished"]
    assert hanging["records"] == [{"kind": "measured", "value": 1}]
    assert quick["status"] == "ok" and quick["records"] == [{"kind": "measured", "value": 2}]


def test_run_process_stops_the_whole_process_group(tmp_path):
    marker = tmp_path / "child.pid"
    script = (
        "import subprocess, time; p = subprocess.Popen(['sleep', '600']); "
        f"open({str(marker)!r}, 'w').write(str(p.pid)); time.sleep(600)"
    )
    returncode, timed_out = check.run_process([sys.executable, "-c", script], timeout=3)
    assert timed_out
    child = int(marker.read_text())
    time.sleep(0.2)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


def test_unknown_parts_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        check.main(["--out", str(tmp_path), "--parts", "ceilings,warp-drive"])


# -- wheels and size ------------------------------------------------------------------------


def fake_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    metadata = "\n".join([f"Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
                          *(f"Requires-Dist: {requirement}" for requirement in requires)])  # fmt: skip
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", metadata + "\n")
    return path


def test_requirements_must_be_on_the_device_or_carried(tmp_path):
    wheels = [
        fake_wheel(tmp_path, "diffusers", "0.42.1", ["importlib_metadata", "numpy", "Pillow", "ruff; extra == 'dev'"]),
        fake_wheel(tmp_path, "importlib_metadata", "10.2.0", ['zipp>=3.20', 'lazy-importer>=0.1; python_version < "3.15"',
                                                               'old-backport; python_version < "3.9"']),  # fmt: skip
        fake_wheel(tmp_path, "openai-clip", "1.0.1", ["ftfy", "regex", "tqdm"]),
    ]
    assert fetch_wheels.missing_requirements(wheels) == {"lazy-importer": ["importlib_metadata"]}
    wheels.append(fake_wheel(tmp_path, "lazy-importer", "0.1.0", []))
    assert fetch_wheels.missing_requirements(wheels) == {}
    assert fetch_wheels.missing_requirements(wheels, device_has=frozenset({"numpy"})) == {
        "pillow": ["diffusers"], "zipp": ["importlib_metadata"], "regex": ["openai-clip"], "tqdm": ["openai-clip"],
    }  # fmt: skip


def test_what_travels_must_fit(tmp_path):
    tree, wheels = tmp_path / "tree", tmp_path / "tree" / ".gpu-wheels"
    wheels.mkdir(parents=True)
    (tree / "code.py").write_bytes(b"x" * 1000)
    fake_wheel(wheels, "diffusers", "0.42.1", [])
    report = fetch_wheels.travel_report(tree, wheels, limit=10_000)
    assert report["fits"] and report["wheel_bytes"] > 0 and report["tree_bytes"] >= 1000
    assert not report["wheels_complete"]  # openai-clip and the rest are not there
    (wheels / "big.bin").write_bytes(b"x" * 10_000)
    assert not fetch_wheels.travel_report(tree, wheels, limit=10_000)["fits"]


def pypi_reachable() -> bool:
    import socket

    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
        return True
    except OSError:
        return False


def test_the_real_fetch(tmp_path):
    """The wheels as fetch_wheels.py gets them (about 8 MB, a few seconds): complete, their
    requirements met on the device, and small enough to travel."""
    if not pypi_reachable():
        pytest.skip("PyPI is not reachable from here")
    wheels = fetch_wheels.fetch(tmp_path / "wheels")
    names = {fetch_wheels.normalize(fetch_wheels.wheel_metadata(wheel)["name"]) for wheel in wheels}
    assert names == {fetch_wheels.normalize(name) for name in (*fetch_wheels.DOWNLOADED, *fetch_wheels.BUILT)}
    assert all(wheel.name.endswith("-py3-none-any.whl") for wheel in wheels), "pure Python: they install anywhere"
    report = fetch_wheels.travel_report(wheel_dir=tmp_path / "wheels")
    assert report["fits"] and report["wheels_complete"] and report["missing_requirements"] == {}


def test_the_repository_travels_within_the_limit():
    report = fetch_wheels.travel_report()
    assert report["tree_bytes"] < fetch_wheels.LIMIT_BYTES // 4, "the tree leaves most of 64 MiB to the wheels"
    if report["wheels"]:  # fetched here: they must be complete and fit
        assert report["fits"] and report["wheels_complete"] and not report["missing_requirements"]


# -- filing a run ---------------------------------------------------------------------------


def gpu_results() -> dict:
    """A GPU run's results as the parts write them, cut to what filing reads."""
    kernel = {"kind": "kernel", "dtype": "float16"}
    return {
        "format": 1, "mode": "gpu", "started": 1796000000.0, "commit": "unknown",
        "parts": {
            "ceilings": {"status": "ok", "seconds": 5, "budget_s": 20, "finished": True, "errors": [], "records": [],
                         "info": {"card": {"name": "NVIDIA H200", "arch": "sm_90"}, "bandwidth": 4.3e12,
                                  "tensor_flops": 7.9e14, "versions": {"torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0"}}},
            "kernels": {"status": "ok", "seconds": 50, "budget_s": 105, "finished": True, "errors": [], "info": {}, "records": [
                kernel | {"op": "cross_attention", "passes": "forward", "baseline": "sdpa", "speedup_vs_baseline": 0.8,
                          "shape": {"batch": 2, "heads": 8, "query_length": 4096, "key_length": 77, "head_dim": 40},
                          "providers": {"nai_fast": {"ms": 0.05}, "sdpa": {"ms": 0.04}}},
                kernel | {"op": "hyper_kv", "passes": "forward+backward", "baseline": "eager", "speedup_vs_baseline": 1.5,
                          "shape": {"tokens": 8192, "width": 320, "hidden_width": 640, "out_width": 320},
                          "providers": {"nai_fast": {"ms": 0.2}, "eager": {"ms": 0.3}}},
                kernel | {"op": "chunk_concat", "passes": "forward", "baseline": "eager", "speedup_vs_baseline": 3.0,
                          "shape": {"chunks": 6, "length": 77, "width": 768, "num_rows": 454},
                          "providers": {"nai_fast": {"ms": 0.01}, "eager": {"ms": 0.03}}},
            ]},
        },
    }  # fmt: skip


def test_publishing_files_the_json_the_row_and_the_measured_table(tmp_path):
    from nai_fast.kernels.measured import MeasuredTable
    from nai_fast.kernels.policy import cross_attention_choice, hyper_kv_choice

    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    (repo / "nai_fast" / "kernels").mkdir(parents=True)
    (repo / "docs" / "gpu.md").write_text((REPO / "docs" / "gpu.md").read_text())
    (repo / publish.MEASURED_TABLE).write_text((REPO / publish.MEASURED_TABLE).read_text())
    results_path = tmp_path / "results.json"
    results_path.write_text(json.dumps(gpu_results()))

    written = publish.publish(results_path, repo, commit="0123456789abcdef")
    assert written["results"] == repo / "docs" / "gpu" / "2026-11-30-nvidia-h200.json"
    assert json.loads(written["results"].read_text())["commit"] == "0123456789abcdef"
    doc = written["doc"].read_text()
    table = doc[doc.index(publish.RUNS_START) : doc.index(publish.RUNS_END)].strip().splitlines()[1:]
    assert table[0] == RUNS_HEADER and publish.NO_RUN_YET not in doc
    assert table[2].startswith("| 2026-11-30 | NVIDIA H200 (sm_90) | 2.11.0 / 3.6.0 / 13.0 | 0123456789ab |")
    assert "0.80x-3.00x" in table[2] and "(gpu/2026-11-30-nvidia-h200.json)" in table[2]

    measured = MeasuredTable.load(written["measured"])
    assert measured.sources["sm_90"]["source"] == "docs/gpu/2026-11-30-nvidia-h200.json"
    assert len(measured.timings["sm_90"]) == 2  # chunk_concat has no say in auto's choice
    assert not cross_attention_choice(2, 8, 4096, 77, 40, 2, False, "sm_90", measured).fused  # SDPA was faster
    assert hyper_kv_choice(8192, 320, 640, 320, 2, "relu", True, "sm_90", measured).fused

    publish.publish(results_path, repo)  # a second run the same day: a file of its own, first in the table
    assert (repo / "docs" / "gpu" / "2026-11-30-nvidia-h200-2.json").exists()
    doc = written["doc"].read_text()
    rows = doc[doc.index(publish.RUNS_START) : doc.index(publish.RUNS_END)].strip().splitlines()[3:]
    assert "nvidia-h200-2.json" in rows[0] and "nvidia-h200.json" in rows[1]


def test_a_dry_run_never_reaches_the_measured_table():
    results = gpu_results() | {"mode": "dry-run"}
    assert publish.measured_entry(results, "x.json") is None


def test_without_git_the_tree_is_walked_and_the_wheels_counted_once(tmp_path):
    tree = tmp_path / "copy"  # as on the device: no .git
    (tree / "pkg" / "__pycache__").mkdir(parents=True)
    (tree / "pkg" / "code.py").write_bytes(b"x" * 100)
    (tree / "pkg" / "__pycache__" / "code.pyc").write_bytes(b"x" * 1000)
    (tree / ".gpu-wheels").mkdir()
    wheel_bytes = fake_wheel(tree / ".gpu-wheels", "diffusers", "0.42.1", []).stat().st_size
    assert fetch_wheels.tree_bytes(tree, tree / ".gpu-wheels") == 100
    report = fetch_wheels.travel_report(tree, tree / ".gpu-wheels")
    assert (report["tree_bytes"], report["wheel_bytes"], report["total_bytes"]) == (100, wheel_bytes, 100 + wheel_bytes)
