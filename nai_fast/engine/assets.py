"""Hypernetworks and LoRAs found by name in folders, for prompt tags and PNGs. No torch.

:func:`find_networks` ``(kind, folders) -> {name: path}`` lists the files of a kind under the
folders (recursively, names starting with ``.`` skipped, as the embeddings loader does), each named
by its file stem as in the web UI: hypernetworks are ``.pt``/``.safetensors``, LoRAs
``.safetensors``/``.pt``. Two files with one stem are a ValueError naming both.

:func:`resolve_tags` ``(tags, hypernetwork_dirs=..., lora_dirs=...)`` turns
:class:`~nai_fast.text.tags.NetworkTag` s into ``(path, strength)`` pairs per kind, in tag order:
a name not found is a ValueError listing the names that were (the first :data:`NAMES_SHOWN`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..text.tags import NetworkTag

__all__ = ["NAMES_SHOWN", "NETWORK_SUFFIXES", "find_networks", "resolve_tags"]

NETWORK_SUFFIXES = {"hypernet": (".pt", ".safetensors"), "lora": (".safetensors", ".pt")}
NAMES_SHOWN = 20  # names listed in an "unknown name" message
_WHAT = {"hypernet": ("hypernetwork", "--hypernetwork-dir"), "lora": ("LoRA", "--lora-dir")}


def find_networks(kind: str, folders: Iterable[str | os.PathLike[str]]) -> dict[str, Path]:
    """Name (file stem) -> file, for every ``kind`` file under ``folders`` (sorted, recursive).

    Raises:
        FileNotFoundError / NotADirectoryError: a folder is missing or is a file.
        ValueError: two files share a stem (both named).
    """
    suffixes = NETWORK_SUFFIXES[kind]
    found: dict[str, Path] = {}
    for folder in map(Path, folders):
        if not folder.exists():
            raise FileNotFoundError(f"{_WHAT[kind][1]} {folder}: no such folder")
        if not folder.is_dir():
            raise NotADirectoryError(f"{_WHAT[kind][1]} {folder}: not a folder")
        files = sorted(
            file
            for file in folder.rglob("*")
            if file.suffix.lower() in suffixes
            and file.is_file()
            and not any(part.startswith(".") for part in file.relative_to(folder).parts)
        )
        for file in files:
            if file.stem in found:
                raise ValueError(f"two {_WHAT[kind][0]} files are named {file.stem!r}: {found[file.stem]} and {file}; rename one")
            found[file.stem] = file
    return found


def resolve_tags(
    tags: Sequence[NetworkTag],
    *,
    hypernetwork_dirs: Sequence[str | os.PathLike[str]] = (),
    lora_dirs: Sequence[str | os.PathLike[str]] = (),
) -> dict[str, list[tuple[Path, float]]]:
    """``{"hypernet": [(path, strength), ...], "lora": [...]}`` for ``tags``, in their order.

    Raises:
        ValueError: a name not found (the message lists the names found), or a tag of a kind
            whose folders were not given.
    """
    folders = {"hypernet": hypernetwork_dirs, "lora": lora_dirs}
    resolved: dict[str, list[tuple[Path, float]]] = {kind: [] for kind in folders}
    found: dict[str, dict[str, Path]] = {}
    for tag in tags:
        what, option = _WHAT[tag.kind]
        if not folders[tag.kind]:
            raise ValueError(f"{tag.text} names a {what}, but no {option} was given to find {tag.name!r} in")
        if tag.kind not in found:
            found[tag.kind] = find_networks(tag.kind, folders[tag.kind])
        names = found[tag.kind]
        if tag.name not in names:
            listed = ", ".join(sorted(names)[:NAMES_SHOWN]) or "none"
            more = f" (and {len(names) - NAMES_SHOWN} more)" if len(names) > NAMES_SHOWN else ""
            where = ", ".join(map(str, folders[tag.kind]))
            raise ValueError(f"{tag.text}: no {what} named {tag.name!r} in {where}; found: {listed}{more}")
        resolved[tag.kind].append((names[tag.name], tag.strength))
    return resolved
