"""The packages the GPU machine lacks, fetched once as wheels into ``.gpu-wheels/`` (ignored by
git, carried with the working tree), and the size of what travels.

The device image (KINDS.md, nvidia-h200) has Python 3.12, torch, triton, transformers and
most of their needs, but no diffusers and no openai-clip, and cannot reach the network. So:

- ``diffusers==0.42.1`` (pure Python) and what it needs that the image lacks:
  ``importlib_metadata`` and its ``lazy-importer``;
- ``openai-clip==1.0.1``: an sdist only, built into a wheel here (nai_fast reads its CLIP
  vocabulary file and never imports it, so its ``ftfy`` is not needed).

``check.sh`` installs them with ``pip install --no-index --no-deps --target`` into a temporary
folder. Run from the repository root:

    python3 benchmarks/gpu/fetch_wheels.py            # fetch (network), then check
    python3 benchmarks/gpu/fetch_wheels.py --check    # check only: closure and size

The check: every requirement of the wheels (for Python 3.12 on Linux) is either in the
device image or among the wheels, and the working tree plus the wheels stays under the
64 MiB the device tool carries.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WHEEL_DIR = REPO / ".gpu-wheels"
LIMIT_BYTES = 64 << 20  # what the device tool carries: the working tree plus carried folders
PYTHON_VERSION = "3.12"
DOWNLOADED = {"diffusers": "0.42.1", "importlib_metadata": "10.2.0", "lazy-importer": "0.1.0"}
BUILT = {"openai-clip": "1.0.1"}  # sdist only
# Requirements of the wheels that need not be installed, and why.
NOT_NEEDED = {"ftfy": "openai-clip is never imported: nai_fast reads only its vocabulary file"}
# Distributions the device image holds (KINDS.md, "Python packages already there", read
# 2026-11-17), those any wheel here or nai_fast itself may ask for.
DEVICE_HAS = frozenset({
    "certifi", "charset-normalizer", "filelock", "fsspec", "hf-xet", "huggingface-hub", "idna", "jinja2", "numpy",
    "packaging", "pillow", "pytest", "pytest-benchmark", "pytest-xdist", "pyyaml", "regex", "requests",
    "safetensors", "tokenizers", "torch", "tqdm", "transformers", "triton", "typing-extensions", "urllib3", "zipp",
})  # fmt: skip


def normalize(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def fetch(destination: Path = WHEEL_DIR, python: str = sys.executable) -> list[Path]:
    """Download and build the wheels into ``destination`` (emptied first)."""
    with tempfile.TemporaryDirectory() as scratch:
        download = [python, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", PYTHON_VERSION, "--implementation", "cp", "--platform", "manylinux2014_x86_64",
                    "--platform", "any", "-d", scratch, *(f"{name}=={version}" for name, version in DOWNLOADED.items())]  # fmt: skip
        subprocess.run(download, check=True)
        build = [python, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", scratch,
                 *(f"{name}=={version}" for name, version in BUILT.items())]  # fmt: skip
        subprocess.run(build, check=True)
        if destination.exists():
            shutil.rmtree(destination)
        destination.mkdir(parents=True)
        for wheel in Path(scratch).glob("*.whl"):
            shutil.copy2(wheel, destination / wheel.name)
    return sorted(destination.glob("*.whl"))


def wheel_metadata(wheel: Path) -> dict[str, object]:
    """Name, version and requirements from a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(item for item in archive.namelist() if item.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(name).decode())
    return {
        "name": metadata["Name"],
        "version": metadata["Version"],
        "requires": metadata.get_all("Requires-Dist") or [],
    }


def missing_requirements(wheels: list[Path], device_has: frozenset[str] = DEVICE_HAS) -> dict[str, list[str]]:
    """Requirements (for Python 3.12 on Linux, no extras) that neither the device image nor the
    wheels provide: requirement name -> the wheels that need it."""
    from packaging.requirements import Requirement

    environment = {"python_version": PYTHON_VERSION, "python_full_version": f"{PYTHON_VERSION}.3", "sys_platform": "linux",
                   "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}  # fmt: skip
    metadata = [wheel_metadata(wheel) for wheel in wheels]
    provided = {normalize(item["name"]) for item in metadata} | set(device_has) | set(NOT_NEEDED)
    missing: dict[str, list[str]] = {}
    for item in metadata:
        for text in item["requires"]:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate(environment):
                continue
            if normalize(requirement.name) not in provided:
                missing.setdefault(normalize(requirement.name), []).append(item["name"])
    return missing


def tree_bytes(repo: Path = REPO, carried: Path = WHEEL_DIR) -> int:
    """Bytes of the working tree that travels: tracked files and untracked files git does not
    ignore (``git ls-files``); where there is no git (the device's copy), every file but
    caches and the ``carried`` folder (counted apart)."""
    try:
        listing = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "-co", "--exclude-standard"],
                                 check=True, capture_output=True).stdout  # fmt: skip
        paths = [repo / name for name in listing.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        skipped = {"__pycache__", ".git", ".pytest_cache", ".benchmarks", ".hypothesis"}
        paths = [path for path in repo.rglob("*") if not skipped & set(path.parts) and carried not in path.parents]
    return sum(path.stat().st_size for path in paths if path.is_file() and not path.is_symlink())


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) if folder.exists() else 0


def travel_report(repo: Path = REPO, wheel_dir: Path = WHEEL_DIR, limit: int = LIMIT_BYTES) -> dict[str, object]:
    """What must travel to the GPU machine, and whether it fits."""
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.exists() else []
    tree, carried = tree_bytes(repo, wheel_dir), folder_bytes(wheel_dir)
    return {
        "tree_bytes": tree, "wheel_bytes": carried, "total_bytes": tree + carried, "limit_bytes": limit,
        "fits": tree + carried < limit, "wheels": [wheel.name for wheel in wheels],
        "missing_requirements": missing_requirements(wheels) if wheels else None,
        "wheels_complete": bool(wheels) and _complete(wheels),
    }  # fmt: skip


def _complete(wheels: list[Path]) -> bool:
    names = {normalize(wheel_metadata(wheel)["name"]) for wheel in wheels}
    return {normalize(name) for name in (*DOWNLOADED, *BUILT)} <= names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check the wheels already fetched and the size")
    parser.add_argument("--dest", type=Path, default=WHEEL_DIR)
    parser.add_argument("--json", type=Path, help="also write the report here")
    arguments = parser.parse_args(argv)
    if not arguments.check:
        for wheel in fetch(arguments.dest):
            print(f"{wheel.stat().st_size / 2**20:8.2f} MiB  {wheel.name}")
    report = travel_report(wheel_dir=arguments.dest)
    print(
        f"travels: tree {report['tree_bytes'] / 2**20:.2f} MiB + wheels {report['wheel_bytes'] / 2**20:.2f} MiB "
        f"= {report['total_bytes'] / 2**20:.2f} MiB of {LIMIT_BYTES / 2**20:.0f} MiB"
    )
    if arguments.json:
        arguments.json.write_text(json.dumps(report, indent=1) + "\n")
    problems = []
    if not report["fits"]:
        problems.append("the tree and the wheels exceed what the device tool carries")
    if not report["wheels_complete"]:
        problems.append(f"{arguments.dest} lacks some of {sorted({*DOWNLOADED, *BUILT})}: run without --check")
    if report["missing_requirements"]:
        problems.append(f"requirements neither on the device nor fetched: {report['missing_requirements']}")
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
