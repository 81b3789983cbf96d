"""nai_fast: NovelAI Diffusion's improvements to Stable Diffusion 1.x, fast.

The package root stays light: submodules are imported where they are used
(``nai_fast.data.buckets`` needs only NumPy), and nothing here pulls in torch,
diffusers or transformers.
"""

import importlib

__version__ = "0.1.0"

# Public names importable from the package root, each from the room that owns it.
_EXPORTS = {
    "apply_hypernetworks": "nai_fast.hypernetworks.processors",
    "remove_hypernetworks": "nai_fast.hypernetworks.processors",
    "Hypernetwork": "nai_fast.hypernetworks.modules",
    "txt2img": "nai_fast.engine.generate",
    "load_model": "nai_fast.models.model",
    "patch_pipeline": "nai_fast.engine.pipeline",
    "unpatch_pipeline": "nai_fast.engine.pipeline",
    "upgrade_pipeline": "nai_fast.engine.pipeline",
    "LongPromptEncoder": "nai_fast.text.encoder",
    "load_tokenizer": "nai_fast.text.tokenizer",
    "TrainConfig": "nai_fast.engine.train",
    "train": "nai_fast.engine.train",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    """Import a public name's room on first use, so ``import nai_fast`` stays light."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nai_fast' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
