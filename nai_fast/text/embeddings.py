"""Textual-inversion embeddings: the web UI's and diffusers' files, read without running code.

:func:`load_embeddings` ``(paths_or_folder) -> Embeddings`` reads embedding files into a mapping
from name to vectors (``float32`` tensors ``[n, width]`` on the CPU) that
:class:`~nai_fast.text.encoder.LongPromptEncoder` takes as ``embeddings=``. A name is its file's
stem (``EasyNegative.safetensors`` -> ``EasyNegative``), as in the web UI.

Formats understood (the content decides, not the suffix, among ``.pt``, ``.bin`` and
``.safetensors``):

- the web UI's ``.pt`` (``torch.save``): ``{'string_to_param': {'*': tensor[n, width]},
  'name': ..., 'step': ..., ...}``; exactly one entry under ``string_to_param``;
- the web UI's ``.safetensors``: ``{'emb_params': tensor[n, width]}``;
- diffusers' textual-inversion files (``learned_embeds.safetensors`` / ``.bin``):
  ``{'<token>': tensor[width] or tensor[n, width]}``, one entry.

Pickled files (``.pt``, ``.bin``) go through :func:`nai_fast.safe_load.load_weights_only`
(torch's weights-only unpickler): a file that needs code to load is refused, never run.
SDXL embeddings (``clip_l`` and ``clip_g``) are refused: they are for another text encoder.
Every refusal is a ``ValueError`` naming the file and saying why.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final

import torch

from ..safe_load import error_reason, load_weights_only

__all__ = ["EMBEDDING_SUFFIXES", "Embeddings", "embedding_files", "load_embedding_file", "load_embeddings"]

# What a folder is searched for (case-insensitive). The web UI also reads embeddings hidden in
# PNG and WebP images; those are not supported.
EMBEDDING_SUFFIXES: Final = (".pt", ".bin", ".safetensors")
_WEBUI_PT_KEY = "string_to_param"
_WEBUI_SAFETENSORS_KEY = "emb_params"
_SDXL_KEYS = frozenset({"clip_l", "clip_g"})


class Embeddings(dict[str, torch.Tensor]):
    """Name -> vectors ``[n, width]`` (float32, CPU), as :func:`load_embeddings` read them;
    ``files`` maps each name to the file it came from (for messages)."""

    def __init__(self, vectors: Mapping[str, torch.Tensor] = (), files: Mapping[str, Path] | None = None):
        super().__init__(vectors)
        self.files: dict[str, Path] = dict(files or {})

    def source(self, name: str) -> str:
        """``"'name'"``, with its file when known: how messages name an embedding."""
        return f"{name!r} ({self.files[name]})" if name in self.files else repr(name)


def load_embeddings(
    paths_or_folder: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *, width: int | None = None
) -> Embeddings:
    """Read embedding files: one path or several, each a file or a folder.

    A folder is searched recursively for files ending in :data:`EMBEDDING_SUFFIXES`
    (names starting with ``.`` skipped); a file named directly is read whatever its suffix.
    ``width``: when given, a file whose vectors are not that wide is refused (the text
    encoder's width: 768 for SD 1.x). Two files with one name (one stem) are refused.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: a file is not an embedding, needs code to load, has the wrong width,
            or shares its name with another; the message names the file.
    """
    if isinstance(paths_or_folder, (str, os.PathLike)):
        paths_or_folder = [paths_or_folder]
    loaded = Embeddings()
    for file in (file for path in paths_or_folder for file in embedding_files(path)):
        name = file.stem
        if name in loaded:
            raise ValueError(f"two embeddings are named {name!r}: {loaded.files[name]} and {file}; rename one")
        vectors = load_embedding_file(file)
        if width is not None and vectors.shape[1] != width:
            raise ValueError(
                f"embedding {name!r} ({file}) has vectors of width {vectors.shape[1]}, but the text encoder's "
                f"are {width} wide: it was made for another model"
            )
        loaded[name] = vectors
        loaded.files[name] = file
    return loaded


def embedding_files(path: str | os.PathLike[str]) -> list[Path]:
    """``path`` itself if it is a file; else the embedding files under the folder, sorted."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"embeddings path {path}: no such file or folder")
    return sorted(
        file
        for file in path.rglob("*")
        if file.suffix.lower() in EMBEDDING_SUFFIXES
        and file.is_file()
        and not any(part.startswith(".") for part in file.relative_to(path).parts)
    )


def load_embedding_file(path: str | os.PathLike[str]) -> torch.Tensor:
    """One file's vectors: float32 ``[n, width]`` on the CPU (see the module doc for formats)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            data: object = load_file(path, device="cpu")
        else:
            data = load_weights_only(path)
    except Exception as error:
        raise ValueError(f"embedding file {path}: {error_reason(error)}") from error
    try:
        return _vectors(data)
    except ValueError as error:
        raise ValueError(f"embedding file {path}: {error}") from None


def _vectors(data: object) -> torch.Tensor:
    """The vectors in a loaded file's content, checked."""
    if not isinstance(data, Mapping) or not data:
        held = "nothing" if isinstance(data, Mapping) else type(data).__name__
        raise ValueError(f"not an embedding: holds {held}")
    if _WEBUI_PT_KEY in data:  # the web UI's .pt
        params = data[_WEBUI_PT_KEY]
        if not isinstance(params, Mapping) or len(params) != 1:
            count = len(params) if isinstance(params, Mapping) else type(params).__name__
            raise ValueError(f"'{_WEBUI_PT_KEY}' must hold exactly one tensor, found {count}")
        (vectors,) = params.values()
    elif _WEBUI_SAFETENSORS_KEY in data:  # the web UI's .safetensors
        vectors = data[_WEBUI_SAFETENSORS_KEY]
    elif _SDXL_KEYS & set(data):
        raise ValueError("an SDXL embedding (clip_l/clip_g vectors); this text encoder is SD 1.x's")
    elif len(data) == 1:  # diffusers: {'<token>': vectors}
        (vectors,) = data.values()
    else:
        keys = ", ".join(sorted(map(str, data))[:5])
        raise ValueError(
            f"not an embedding: expected '{_WEBUI_PT_KEY}', '{_WEBUI_SAFETENSORS_KEY}' or one token's vectors, "
            f"found the keys {keys}"
        )
    if not isinstance(vectors, torch.Tensor) or not vectors.is_floating_point():
        raise ValueError(f"the vectors must be a floating-point tensor, found {_describe(vectors)}")
    if vectors.dim() == 1:  # diffusers saves one vector as [width]
        vectors = vectors[None]
    if vectors.dim() != 2 or 0 in vectors.shape:
        raise ValueError(f"the vectors must be a tensor [n, width], found shape {list(vectors.shape)}")
    vectors = vectors.detach().to(torch.float32).contiguous()
    if not torch.isfinite(vectors).all():
        raise ValueError("the vectors hold NaN or infinite values")
    return vectors


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor"
    return type(value).__name__
