"""Text conditioning: the prompt syntaxes, 75-token chunks, the CLIP tokenizer, textual-inversion
embeddings and the long-prompt encoder (penultimate layer, every chunk in one call).

Its public names are imported on first use, so ``import nai_fast.text`` stays light (no torch).
"""

import importlib

_EXPORTS = {
    "parse": "nai_fast.text.prompts",
    "load_tokenizer": "nai_fast.text.tokenizer",
    "load_embeddings": "nai_fast.text.embeddings",
    "Embeddings": "nai_fast.text.embeddings",
    "extract_network_tags": "nai_fast.text.tags",
    "NetworkTag": "nai_fast.text.tags",
    "LongPromptEncoder": "nai_fast.text.encoder",
    "encode_chunk_by_chunk": "nai_fast.text.encoder",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    """Import a public name's module on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nai_fast.text' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
