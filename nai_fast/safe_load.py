"""Reading untrusted ``torch.save`` files without running their code.

Checkpoints, hypernetwork and embedding ``.pt`` files come from strangers. :func:`load_weights_only`
reads them with torch's weights-only unpickler, which refuses any global it would have to
import and call, and turns every way such a file can be bad into a ``ValueError`` that
says why in one line.

A leaf module directly under ``nai_fast/`` (torch only, no nai_fast import) so every part that
reads weight files can use it: ``text/`` (embeddings) sits below ``models/`` in the layering.
"""

from __future__ import annotations

import os
import pickle
import re

import torch

__all__ = ["error_reason", "load_weights_only"]


def load_weights_only(path: str | os.PathLike[str], *, mmap: bool = False) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU; ``mmap`` for zip-format files.

    Raises:
        ValueError: the file needs code to unpickle (never run), or is truncated or corrupt.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        # The weights-only unpickler names any global it would have had to import and call.
        needed = re.search(r"GLOBAL\s+([\w.]+)", str(error))
        if needed:
            raise ValueError(
                f"refused: loading this file needs arbitrary code execution (it references {needed[1]}); "
                "it was not unpickled. Convert it from a trusted copy to .safetensors."
            ) from error
        raise ValueError(
            f"refused by the weights-only unpickler (corrupt, or pickled with objects it does not allow): "
            f"{error_reason(error)}"
        ) from error
    except Exception as error:  # torch reports other bad input with assorted exception types
        raise ValueError(f"truncated, corrupt or not a checkpoint: {error_reason(error)}") from error


def error_reason(error: BaseException) -> str:
    """The specific part of a loader's error, without torch's generic advice."""
    if type(error) is ValueError:  # already ours, or a library's plain message
        return str(error)
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and "documentation" not in line]
    return f"{type(error).__name__}: {lines[-1] if lines else 'no details'}"
