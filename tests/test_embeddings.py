"""Textual-inversion embeddings (issue #14): the files the web UI and diffusers write, read safely
(nai_fast.text.embeddings); names in prompts, never split across 75-token chunks
(nai_fast.text.prompts); their vectors in the text encoder's input (nai_fast.text.encoder)."""

from __future__ import annotations

import logging
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from nai_fast.text.embeddings import Embeddings, load_embedding_file, load_embeddings
from nai_fast.text.prompts import (
    BOS_ID,
    COMMA_ID,
    EOS_ID,
    EmbeddingName,
    EmbeddingSpan,
    TokenizedPrompt,
    make_chunks,
    tokenize_runs,
)

WIDTH = 32  # the tiny preset's text encoder


# -- files, as the web UI and diffusers write them ---------------------------------------------------


def webui_pt(path, vectors):
    """The web UI's Embedding.save."""
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": vectors},
            "name": path.stem,
            "step": 1500,
            "sd_checkpoint": "abcd1234",
            "sd_checkpoint_name": "model",
        },
        path,
    )


def webui_safetensors(path, vectors):
    save_file({"emb_params": vectors}, path)


def diffusers_safetensors(path, vectors):
    save_file({"<my-token>": vectors}, path)


def diffusers_bin(path, vectors):
    torch.save({"<my-token>": vectors}, path)


@pytest.mark.parametrize(
    "writer, suffix, shape",
    [
        (webui_pt, ".pt", (3, WIDTH)),
        (webui_safetensors, ".safetensors", (2, WIDTH)),
        (diffusers_safetensors, ".safetensors", (WIDTH,)),
        (diffusers_safetensors, ".safetensors", (4, WIDTH)),
        (diffusers_bin, ".bin", (WIDTH,)),
        (diffusers_bin, ".bin", (2, WIDTH)),
    ],
)
def test_every_format_loads_as_float32_vectors_named_by_the_file_stem(tmp_path, writer, suffix, shape):
    vectors = torch.randn(shape, dtype=torch.float16)
    writer(tmp_path / f"My-Style{suffix}", vectors)
    loaded = load_embeddings(tmp_path)
    assert list(loaded) == ["My-Style"]
    assert loaded["My-Style"].dtype == torch.float32
    assert torch.equal(loaded["My-Style"], vectors.float().reshape(-1, WIDTH))
    assert loaded.files["My-Style"] == tmp_path / f"My-Style{suffix}"


def test_folders_are_searched_recursively_and_paths_may_be_listed(tmp_path):
    (tmp_path / "a" / "deeper").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / ".hidden").mkdir()
    webui_pt(tmp_path / "a" / "one.pt", torch.randn(1, WIDTH))
    webui_safetensors(tmp_path / "a" / "deeper" / "two.SAFETENSORS", torch.randn(2, WIDTH))
    webui_pt(tmp_path / "a" / ".hidden" / "skipped.pt", torch.randn(1, WIDTH))
    (tmp_path / "a" / "notes.txt").write_text("not an embedding")
    diffusers_bin(tmp_path / "b" / "three.bin", torch.randn(WIDTH))
    loaded = load_embeddings([tmp_path / "a", str(tmp_path / "b" / "three.bin")])
    assert {name: len(vectors) for name, vectors in loaded.items()} == {"one": 1, "two": 2, "three": 1}
    assert load_embeddings([]) == {}


def test_a_wrong_width_is_refused_by_file_name(tmp_path):
    webui_pt(tmp_path / "sd2-style.pt", torch.randn(2, 1024))
    with pytest.raises(ValueError, match=r"embedding 'sd2-style' \(.*sd2-style\.pt\) has vectors of width 1024, "
                       r"but the text encoder's are 32 wide"):  # fmt: skip
        load_embeddings(tmp_path, width=WIDTH)
    assert load_embeddings(tmp_path)["sd2-style"].shape == (2, 1024)  # no width given: not checked


def test_a_pickle_that_needs_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (exec, (f"import pathlib; pathlib.Path({str(marker)!r}).write_text('!')",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as file:
        pickle.dump({"string_to_param": {"*": Payload()}}, file, protocol=2)
    with pytest.raises(ValueError, match=r"embedding file .*evil\.pt: refused: loading this file needs arbitrary code"):
        load_embeddings(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ({"string_to_param": {"*": torch.randn(1, WIDTH), "x": torch.randn(1, WIDTH)}}, "exactly one tensor, found 2"),
        ({"a": torch.randn(1, WIDTH), "b": torch.randn(1, WIDTH)}, "not an embedding: expected"),
        ({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}, "an SDXL embedding"),
        ({"emb_params": torch.ones(2, WIDTH, dtype=torch.int64)}, "floating-point tensor"),
        ({"emb_params": torch.randn(2, 3, WIDTH)}, r"\[n, width\], found shape \[2, 3, 32\]"),
        ({"emb_params": torch.full((1, WIDTH), float("nan"))}, "NaN or infinite"),
        ({}, "not an embedding"),
    ],
)
def test_files_that_are_not_embeddings_are_refused_with_the_reason(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match=rf"embedding file .*bad\.pt: .*{message}"):
        load_embedding_file(path)


def test_truncated_files_and_missing_paths(tmp_path):
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(ValueError, match=r"embedding file .*cut\.safetensors: "):
        load_embeddings(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_embeddings(tmp_path / "nowhere")


def test_two_files_with_one_name_are_refused(tmp_path):
    (tmp_path / "x").mkdir()
    webui_pt(tmp_path / "style.pt", torch.randn(1, WIDTH))
    webui_safetensors(tmp_path / "x" / "style.safetensors", torch.randn(1, WIDTH))
    with pytest.raises(ValueError, match="two embeddings are named 'style'"):
        load_embeddings(tmp_path)


def test_public_paths():
    import nai_fast
    import nai_fast.text

    assert nai_fast.load_embeddings is nai_fast.text.load_embeddings is load_embeddings


# -- chunking, with token ids standing for words (pure Python) -------------------------------------

EMB = 900  # the one-token name of the embeddings below


def with_embedding(before: int, vectors: int, after: int = 3, comma_at: int | None = None) -> TokenizedPrompt:
    """``before`` word tokens, the embedding's name, ``after`` word tokens, tokenized."""
    tokens = list(range(1, before + 1))
    if comma_at is not None:
        tokens[comma_at] = COMMA_ID
    tokens += [EMB, *range(500, 500 + after)]
    return tokenize_runs([("text", 1.5)], lambda _: tokens, [EmbeddingName("emb", (EMB,), vectors)])


def chunk_tokens(ids):
    return [token for token in ids[1:-1] if token != EOS_ID]


def test_a_name_becomes_placeholders_carrying_the_runs_weight():
    prompt = with_embedding(2, 3, after=1)
    assert prompt.ids == [1, 2, 0, 0, 0, 500]
    assert prompt.weights == [1.5] * 6
    assert prompt.embeddings == [EmbeddingSpan(2, 3, "emb", (EMB,))]
    chunks = make_chunks(prompt)
    assert chunks.embeddings == [[(3, "emb")]]  # BOS, two words, then the vectors


@pytest.mark.parametrize(("before", "vectors"), [(70, 5), (71, 5), (74, 2), (72, 8), (0, 75), (1, 75)])
def test_an_embedding_that_does_not_fit_starts_the_next_chunk(before, vectors):
    chunks = make_chunks(with_embedding(before, vectors), max_chunks=None, comma_backtrack=0)
    fits = before + vectors <= 75
    first = chunk_tokens(chunks.ids[0])
    assert first[:before] == list(range(1, before + 1))
    if fits:
        assert chunks.embeddings[0] == [(1 + before, "emb")]
    else:
        assert first == list(range(1, before + 1)), "the chunk closes, padded, before the embedding"
        assert chunks.embeddings[0] == [] and chunks.embeddings[1] == [(1, "emb")]
        assert chunks.ids[1][1 : 1 + vectors] == [0] * vectors
        assert chunks.weights[1][1 : 1 + vectors] == [1.5] * vectors


def test_comma_backtrack_carries_an_embedding_in_the_tail_to_the_next_chunk():
    # 60 words with a comma at index 60, then the embedding (3 vectors) ends at 75; one more word
    # arrives for a full chunk: the tail after the comma, embedding included, moves on.
    tokens = [*range(1, 61), COMMA_ID, *range(100, 111), EMB, 200]
    prompt = tokenize_runs([("t", 1.0)], lambda _: tokens, [EmbeddingName("emb", (EMB,), 3)])
    assert len(prompt.ids) == 76
    chunks = make_chunks(prompt)
    assert chunk_tokens(chunks.ids[0]) == [*range(1, 61), COMMA_ID]
    assert chunks.embeddings == [[], [(12, "emb")]]  # BOS, 11 words, then the vectors
    assert chunks.ids[1][12:15] == [0, 0, 0] and chunks.ids[1][15] == 200
    assert make_chunks(prompt, comma_backtrack=0).embeddings == [[(73, "emb")], []]


def test_an_embedding_that_is_cut_off_is_reported_by_its_name():
    chunks = make_chunks(with_embedding(74, 4, after=1), max_chunks=1, comma_backtrack=0)
    assert chunks.dropped == [EMB, 500]


def test_an_embedding_longer_than_a_chunk_is_refused():
    with pytest.raises(ValueError, match="embedding 'emb' has 76 vectors; at most 75 fit"):
        make_chunks(with_embedding(0, 76))


def test_names_match_whole_words_longest_first():
    ends = {10, 11, 12, 13, 20}  # ids ending a word; 30 is a word's first part ("bob" of "bobcat")
    names = [EmbeddingName("a", (10,), 1), EmbeddingName("ab", (10, 11), 2)]
    tokenize = {"x": [10, 11, 12], "y": [30, 10, 12], "z": [13, 10]}.__getitem__
    found = tokenize_runs([("x", 1.0)], tokenize, names, word_ends=ends).embeddings
    assert found == [EmbeddingSpan(0, 2, "ab", (10, 11))]
    assert tokenize_runs([("y", 1.0)], tokenize, names, word_ends=ends).embeddings == []  # inside a word
    assert tokenize_runs([("y", 1.0)], tokenize, names).embeddings == [EmbeddingSpan(1, 1, "a", (10,))]  # web UI rule
    assert tokenize_runs([("z", 1.0)], tokenize, names, word_ends=ends).embeddings == [EmbeddingSpan(1, 1, "a", (10,))]
    # A name never spans two runs.
    assert tokenize_runs([("w", 1.0), ("v", 1.2)], {"w": [10], "v": [11]}.__getitem__, names[1:]).embeddings == []


@settings(max_examples=200, deadline=None)
@given(
    items=st.lists(st.one_of(st.sampled_from([1, 2, COMMA_ID]), st.integers(1, 6).map(lambda n: -n)), max_size=40),
    chunk_size=st.integers(6, 12),
    comma_backtrack=st.integers(0, 8),
    max_chunks=st.one_of(st.none(), st.integers(1, 4)),
)
def test_chunks_keep_tokens_and_embeddings_in_order_never_splitting_one(items, chunk_size, comma_backtrack, max_chunks):
    # A negative item -n is an embedding of n vectors, named by the token 1000 + n.
    names = [EmbeddingName(f"e{n}", (1000 + n,), n) for n in range(1, 7)]
    tokens = [1000 - item if item < 0 else item for item in items]
    prompt = tokenize_runs([("t", 1.0)], lambda _: tokens, names)
    chunks = make_chunks(prompt, chunk_size=chunk_size, comma_backtrack=comma_backtrack, max_chunks=max_chunks)
    seen = []
    for ids, found in zip(chunks.ids, chunks.embeddings):
        assert len(ids) == chunk_size + 2
        starts = dict(found)
        position = 1
        while position <= chunk_size and ids[position] != EOS_ID:
            if position in starts:
                count = int(starts[position][1:])
                assert position + count <= chunk_size + 1, "an embedding runs past its chunk"
                assert ids[position : position + count] == [0] * count
                seen.append(1000 + count)
                position += count
            else:
                seen.append(ids[position])
                position += 1
    assert seen + chunks.dropped == tokens


# -- the encoder ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from nai_fast.models.presets import build_preset

    model = build_preset("tiny")
    norm = model.text_encoder.final_layer_norm if hasattr(model.text_encoder, "final_layer_norm") else None
    if norm is None:
        norm = model.text_encoder.text_model.final_layer_norm
    # A fresh final layer norm centres each row on zero, which makes emphasis' mean restore ~0/0.
    torch.manual_seed(0)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
        norm.bias.normal_(0.0, 0.5)
    return model.tokenizer, model.text_encoder.eval()


def token_vectors(tokenizer, text_encoder, words):
    """The token embeddings of ``words``: an embedding that must give exactly their conditioning."""
    table = getattr(text_encoder, "text_model", text_encoder).embeddings.token_embedding.weight
    return table[tokenizer.encode(words, add_special_tokens=False)].detach().clone()


def encoder(tiny, **options):
    from nai_fast.text.encoder import LongPromptEncoder

    return LongPromptEncoder(*tiny, **options)


LONG = ", ".join(["purple eyes, short hair, smile, open mouth, pleated skirt"] * 6)  # about 90 tokens a copy


@torch.no_grad()
@pytest.mark.parametrize("emphasis", ["original", "no_norm"])
@pytest.mark.parametrize(
    "words, prompt, plain",
    [
        ("red hair", "1girl, myemb, smile", "1girl, red hair, smile"),
        ("blue", "(myemb:1.3) sky, [myemb]", "(blue:1.3) sky, [blue]"),
        # Across a chunk border: where the words are not split, the embedding sits as they do.
        ("green scarf", f"{LONG}, MyEmb, smile", f"{LONG}, green scarf, smile"),
    ],
)
def test_an_embedding_of_token_vectors_gives_exactly_the_words_conditioning(tiny, emphasis, words, prompt, plain):
    vectors = token_vectors(*tiny, words)
    with_embedding = encoder(tiny, emphasis=emphasis, embeddings={"myemb": vectors})
    assert any(with_embedding.chunks(prompt).embeddings), "the name was found"
    cond, uncond = with_embedding.encode(prompt, "lowres")
    expected, expected_uncond = encoder(tiny, emphasis=emphasis).encode(plain, "lowres")
    # Bit for bit: the same input vectors go through the same computation.
    assert torch.equal(cond, expected) and torch.equal(uncond, expected_uncond)


@torch.no_grad()
def test_without_an_embedding_in_the_prompt_the_ids_path_is_unchanged(tiny):
    plain = encoder(tiny).encode(LONG, "lowres, xmyemb")
    unused = encoder(tiny, embeddings={"myemb": torch.randn(2, WIDTH)}).encode(LONG, "lowres, xmyemb")
    assert torch.equal(plain[0], unused[0]) and torch.equal(plain[1], unused[1])


@torch.no_grad()
def test_unknown_names_and_names_inside_words_are_text(tiny):
    with_embedding = encoder(tiny, embeddings={"emb": torch.randn(2, WIDTH)})
    for prompt in ["myemb, smile", "embroidery", "other, embx", "em b"]:
        assert not any(with_embedding.chunks(prompt).embeddings), prompt
        assert torch.equal(with_embedding.encode(prompt)[0], encoder(tiny).encode(prompt)[0])
    for prompt in ["emb", "EMB, smile", "(emb:1.2)", "smile,emb", "emb2"]:
        assert any(with_embedding.chunks(prompt).embeddings), prompt


@torch.no_grad()
def test_batched_encoding_matches_chunk_by_chunk_with_embeddings_at_chunk_borders(tiny):
    from nai_fast.text.encoder import encode_chunk_by_chunk

    embeddings = {"style": torch.randn(6, WIDTH), "neg": torch.randn(1, WIDTH) * 0.1}
    with_embeddings = encoder(tiny, embeddings=embeddings)
    # 84 words before "style": whatever the backtrack does, its 6 vectors meet a chunk border.
    prompts = [f"{LONG}, style, smile", "style BREAK (style:1.2)"]
    negatives = ["neg, lowres", "neg"]
    batched = with_embeddings.encode(prompts, negatives)
    for got, expected in zip(batched, encode_chunk_by_chunk(with_embeddings, prompts, negatives)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # one call vs many: fp rounding
    chunks = with_embeddings.chunks(prompts[0])
    assert sum(len(found) for found in chunks.embeddings) == 1


def test_the_encoder_refuses_embeddings_it_cannot_use_by_name(tiny, tmp_path):
    webui_pt(tmp_path / "sd1-style.pt", torch.randn(2, 768))
    with pytest.raises(ValueError, match=r"embedding 'sd1-style' \(.*sd1-style\.pt\) has vectors of width 768, "
                       r"but this text encoder's are 32 wide"):  # fmt: skip
        encoder(tiny, embeddings=load_embeddings(tmp_path))
    with pytest.raises(ValueError, match="'x' has 76 vectors; at most 75"):
        encoder(tiny, embeddings={"x": torch.randn(76, WIDTH)})
    with pytest.raises(ValueError, match="'Style' and 'style' read as the same tokens"):
        encoder(tiny, embeddings={"Style": torch.randn(1, WIDTH), "style": torch.randn(1, WIDTH)})
    with pytest.raises(ValueError, match="reads as no token"):
        encoder(tiny, embeddings={"   ": torch.randn(1, WIDTH)})
    assert isinstance(load_embeddings(tmp_path), Embeddings)


def test_gradients_reach_the_encoder_and_a_cut_embedding_is_named(tiny, caplog):
    with_embedding = encoder(tiny, max_chunks=1, embeddings={"myemb": torch.randn(3, WIDTH)})
    cond, _ = with_embedding.encode("myemb smile")
    cond.sum().backward()
    weight = getattr(tiny[1], "text_model", tiny[1]).embeddings.token_embedding.weight
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    weight.grad = None
    with caplog.at_level(logging.WARNING, logger="nai_fast.text.encoder"):
        with_embedding.chunks(f"{LONG}, myemb")
    assert caplog.records and caplog.records[-1].getMessage().endswith("myemb'")


# -- comma backtrack: an option of its own ---------------------------------------------------------


def test_comma_backtrack_is_the_web_uis_for_every_syntax_and_0_disables_it(tiny):
    tags = ", ".join(["smile"] * 37) + ", a photo of a cat sitting on a red chair"  # its last comma: token 74
    a1111 = encoder(tiny, syntax="a1111").chunks(tags)
    for syntax in ("none", "nai"):
        chunks = encoder(tiny, syntax=syntax).chunks(tags)
        assert chunks.ids == a1111.ids, f"{syntax}: the web UI's 'None' emphasis still backtracks"
    first = chunk_tokens(a1111.ids[0])
    assert first[-1] == COMMA_ID and len(first) == 74
    assert len(chunk_tokens(encoder(tiny, syntax="none", comma_backtrack=0).chunks(tags).ids[0])) == 75
    for bad in (-1, 1.5, None, True):
        with pytest.raises(ValueError, match="comma_backtrack must be a non-negative integer"):
            encoder(tiny, comma_backtrack=bad)
    assert a1111.ids[0][0] == BOS_ID
