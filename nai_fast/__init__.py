"""nai_fast: NovelAI Diffusion's improvements to Stable Diffusion 1.x, fast.

The package root stays light: submodules are imported where they are used
(``nai_fast.data.buckets`` needs only NumPy), and nothing here pulls in torch,
diffusers or transformers.
"""

import importlib

__version__ = "0.1.0"

# Public names importable from the package root, each from the room that owns it.
_EXPORTS = {
    # data
    "make_buckets": "nai_fast.data.buckets",
    "assign": "nai_fast.data.buckets",
    "EpochPlan": "nai_fast.data.buckets",
    "scan": "nai_fast.data.scan",
    "BucketBatchSampler": "nai_fast.data.loading",
    "BucketDataset": "nai_fast.data.loading",
    # text
    "parse": "nai_fast.text.prompts",
    "load_tokenizer": "nai_fast.text.tokenizer",
    "LongPromptEncoder": "nai_fast.text.encoder",
    "load_embeddings": "nai_fast.text.embeddings",
    "extract_network_tags": "nai_fast.text.tags",
    # hypernetworks
    "Hypernetwork": "nai_fast.hypernetworks.modules",
    "apply_hypernetworks": "nai_fast.hypernetworks.processors",
    "remove_hypernetworks": "nai_fast.hypernetworks.processors",
    # models
    "load_model": "nai_fast.models.load",
    "save_single_file": "nai_fast.models.checkpoints",
    "Lora": "nai_fast.models.lora",
    "load_lora": "nai_fast.models.lora",
    "apply_loras": "nai_fast.models.lora",
    "remove_loras": "nai_fast.models.lora",
    "loras_applied": "nai_fast.models.lora",
    # engine
    "txt2img": "nai_fast.engine.generate",
    "GenerationParameters": "nai_fast.engine.generate",
    "TrainConfig": "nai_fast.engine.config",
    "train": "nai_fast.engine.train",
    "patch_pipeline": "nai_fast.engine.pipeline",
    "unpatch_pipeline": "nai_fast.engine.pipeline",
    "upgrade_pipeline": "nai_fast.engine.pipeline",
    "make_demo_dataset": "nai_fast.engine.demo_data",
    "COLORS": "nai_fast.engine.demo_data",
    "SHAPES": "nai_fast.engine.demo_data",
    "POSITIONS": "nai_fast.engine.demo_data",
    "Scene": "nai_fast.engine.demo_data",
    "detect": "nai_fast.demo.fidelity",
    "evaluate": "nai_fast.demo.fidelity",
    "FidelityReport": "nai_fast.demo.fidelity",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    """Import a public name's room on first use, so ``import nai_fast`` stays light."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nai_fast' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
