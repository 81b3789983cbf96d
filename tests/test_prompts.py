"""Tests for nai_fast.text.prompts: emphasis parsing, tokenizing runs, chunking, layouts."""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nai_fast.text.prompts import (
    BOS_ID,
    BREAK,
    COMMA_ID,
    EOS_ID,
    TokenizedPrompt,
    kept_positions,
    make_chunks,
    parse,
    tokenize_runs,
)

SYNTAXES = ("a1111", "nai", "none")


def assert_runs_equal(actual, expected):
    """Texts and chunk breaks exactly, weights to float rounding (``approx`` takes no nested lists)."""
    assert [run if run is BREAK else run[0] for run in actual] == [
        run if run is BREAK else run[0] for run in expected
    ]
    assert [run[1] for run in actual if run is not BREAK] == pytest.approx(
        [run[1] for run in expected if run is not BREAK]
    )

# ---------------------------------------------------------------------------
# a1111 syntax


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The examples in the web UI's parse_prompt_attention docstring, floats included.
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        (r"\(literal\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        ),
        ("(abc:1.1", [("abc:1.1", 1.1)]),
        (r"\(literal\)", [("(literal)", 1.0)]),
        ("a (b:1.5) c", [("a ", 1.0), ("b", 1.5), (" c", 1.0)]),
    ],
)
def test_a1111_matches_web_ui_examples(text, expected):
    assert parse(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("( x : 1.5 )", [(" x ", 1.5)]),
        ("(x:.5)", [("x", 0.5)]),
        ("(x:2)", [("x", 2.0)]),
        ("(x:-1)", [("x", -1.0)]),
        ("((x:2))", [("x", 2.2)]),
        ("[x]", [("x", 1 / 1.1)]),
        ("[[x]]", [("x", 1 / 1.1 / 1.1)]),
        ("([x])", [("x", 1 / 1.1 * 1.1)]),
    ],
)
def test_a1111_weights_and_nesting(text, expected):
    assert_runs_equal(parse(text), expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"\\", [("\\", 1.0)]),
        (r"\[x\]", [("[x]", 1.0)]),
        (r"(\(a\))", [("(a)", 1.1)]),  # escaped characters take the group's weight
        (r"a\b", [("ab", 1.0)]),  # a backslash escaping nothing is dropped, as in the web UI
        (r"tag \(artist\)", [("tag (artist)", 1.0)]),
    ],
)
def test_a1111_escapes(text, expected):
    assert parse(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[a", [("a", 1 / 1.1)]),
        ("a ((b", [("a ", 1.0), ("b", 1.1 * 1.1)]),
        ("a) b]", [("a) b]", 1.0)]),
        ("a:1.5) b", [("a:1.5) b", 1.0)]),  # a weight with no "(" open is text
        ("(a) b)", [("a", 1.1), (" b)", 1.0)]),
        ("( [ a ) ]", [(" ", 1.1), (" a ", 1.0), (" ", 1 / 1.1)]),  # separate stacks per bracket kind
        ("(a:.)", [("a:.)", 1.1)]),  # not a number: literal, and the "(" stays open
        ("(a:1.2.3)", [("a:1.2.3)", 1.1)]),
        ("(a:" + "9" * 400 + ")", [("a:" + "9" * 400 + ")", 1.1)]),  # would be infinite
    ],
)
def test_a1111_unbalanced_and_stray(text, expected):
    assert_runs_equal(parse(text), expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
        ("a\nBREAK\nb", [("a", 1.0), BREAK, ("b", 1.0)]),
        ("smile, BREAK, red", [("smile,", 1.0), BREAK, (", red", 1.0)]),  # the web UI's \bBREAK\b
        ("BREAK", [BREAK]),
        ("BREAK a", [BREAK, ("a", 1.0)]),
        ("a BREAK BREAK b", [("a", 1.0), BREAK, BREAK, ("b", 1.0)]),
        ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),
        ("BREAKING news", [("BREAKING news", 1.0)]),
        ("aBREAK b", [("aBREAK b", 1.0)]),
        ("a break b", [("a break b", 1.0)]),
    ],
)
def test_a1111_break(text, expected):
    assert parse(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("(a)(b)", [("ab", 1.1)]),
        ("a()b", [("ab", 1.0)]),  # the empty group leaves nothing to separate a and b
        ("(a)[(b)]c", [("a", 1.1), ("bc", 1.0)]),
    ],
)
def test_equal_weights_merge(text, expected):
    assert parse(text) == expected


# ---------------------------------------------------------------------------
# nai and none syntaxes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{a}", [("a", 1.05)]),
        ("{{a}}", [("a", 1.05 * 1.05)]),
        ("[a]", [("a", 1 / 1.05)]),
        ("{[a]}", [("a", 1.0)]),
        ("(a) (b:1.5)", [("(a) (b:1.5)", 1.0)]),  # parentheses and weights are plain text
        ("{a", [("a", 1.05)]),
        ("a} b]", [("a} b]", 1.0)]),
        ("{a} [b]", [("a", 1.05), (" ", 1.0), ("b", 1 / 1.05)]),
        (r"\{a}", [("\\", 1.0), ("a", 1.05)]),  # NovelAI has no escapes
        ("{a BREAK b}", [("a", 1.05), BREAK, ("b", 1.05)]),
        ("{a}{b}", [("ab", 1.05)]),
    ],
)
def test_nai(text, expected):
    assert_runs_equal(parse(text, "nai"), expected)


def test_none_is_literal():
    text = r"(a:1.5) {b} [c] \( BREAK"
    assert parse(text, "none") == [(text, 1.0)]


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_empty_and_blank(syntax):
    assert parse("", syntax) == []
    assert parse(" ", syntax) == [(" ", 1.0)]


def test_unknown_syntax():
    with pytest.raises(ValueError, match="unknown prompt syntax"):
        parse("a", "comfy")


def test_break_marker():
    assert repr(BREAK) == "BREAK"
    assert parse("a BREAK b")[1] is BREAK


# ---------------------------------------------------------------------------
# Fuzzing the parser

_SYNTAX_PIECES = ["a", "b ", " ", "(", ")", "[", "]", "{", "}", "\\", ":", ":1.5)", ": .5 )", "BREAK", " BREAK ", ","]
prompt_texts = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(_SYNTAX_PIECES), max_size=25).map("".join),
)


def _is_subsequence(short: str, long: str) -> bool:
    remaining = iter(long)
    return all(char in remaining for char in short)


@settings(max_examples=300, deadline=None)
@given(text=prompt_texts, syntax=st.sampled_from(SYNTAXES))
def test_parse_never_raises_and_is_well_formed(text, syntax):
    runs = parse(text, syntax)
    for previous, run in zip(runs, runs[1:]):
        if previous is not BREAK and run is not BREAK:
            assert previous[1] != run[1], "equal neighbours must merge"
    for run in runs:
        if run is not BREAK:
            assert isinstance(run[0], str) and run[0], "no empty runs"
            assert isinstance(run[1], float)
    # Syntax only ever removes characters: what is left comes from the text, in order.
    assert _is_subsequence("".join(run[0] for run in runs if run is not BREAK), text)


@settings(max_examples=200, deadline=None)
@given(text=prompt_texts)
def test_none_reproduces_the_text(text):
    assert "".join(text for text, _ in parse(text, "none")) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_characters="()[]{}\\:"), min_size=1))
def test_plain_text_is_one_run(text):
    if "BREAK" not in text:
        for syntax in SYNTAXES:
            assert parse(text, syntax) == [(text, 1.0)]


# ---------------------------------------------------------------------------
# tokenize_runs


def test_tokenize_runs_tokenizes_each_run_alone():
    calls = []

    def tokenize(text):
        calls.append(text)
        return [len(word) for word in text.split()]

    prompt = tokenize_runs([("aa bbb", 1.1), BREAK, ("c", 0.5), BREAK], tokenize)
    assert calls == ["aa bbb", "c"]
    assert prompt.ids == [2, 3, 1]
    assert prompt.weights == [1.1, 1.1, 0.5]
    assert prompt.breaks == [2, 3]


def test_tokenized_prompt_validates():
    with pytest.raises(ValueError, match="weights"):
        TokenizedPrompt([1, 2], [1.0], [])
    with pytest.raises(ValueError, match="breaks"):
        TokenizedPrompt([1], [1.0], [2])
    with pytest.raises(ValueError, match="breaks"):
        TokenizedPrompt([1, 2], [1.0, 1.0], [2, 1])


# ---------------------------------------------------------------------------
# make_chunks on synthetic token streams (ids 1..999; COMMA_ID marks commas)


def stream(ids, weights=None, breaks=()):
    return TokenizedPrompt(list(ids), list(weights or [1.0] * len(ids)), list(breaks))


def words(count):
    """`count` distinct token ids that are neither commas nor BOS/EOS."""
    return list(range(1000, 1000 + count))


def real_tokens(chunk_ids):
    """A chunk's ids between BOS and EOS, padding removed."""
    assert chunk_ids[0] == BOS_ID and chunk_ids[-1] == EOS_ID
    return [token for token in chunk_ids[1:-1] if token != EOS_ID]


def chunk_sizes(chunks):
    return [len(real_tokens(ids)) for ids in chunks.ids]


def test_empty_prompt_is_one_empty_chunk():
    chunks = make_chunks(stream([]))
    assert chunks.ids == [[BOS_ID] + [EOS_ID] * 76]
    assert chunks.weights == [[1.0] * 77]
    assert chunks.dropped == []


def test_chunk_shape_and_weights():
    chunks = make_chunks(stream([5, 6, 7], [1.1, 0.9, 1.0]))
    assert len(chunks) == 1
    assert chunks.ids[0] == [BOS_ID, 5, 6, 7] + [EOS_ID] * 73
    assert chunks.weights[0] == [1.0, 1.1, 0.9, 1.0] + [1.0] * 73


@pytest.mark.parametrize(("count", "sizes"), [(75, [75]), (76, [75, 1]), (150, [75, 75]), (151, [75, 75, 1])])
def test_tokens_fill_chunks_of_75(count, sizes):
    tokens = words(count)
    chunks = make_chunks(stream(tokens), max_chunks=None)
    assert chunk_sizes(chunks) == sizes
    assert [t for ids in chunks.ids for t in real_tokens(ids)] == tokens
    assert all(len(ids) == 77 for ids in chunks.ids)


def _with_comma_at(index, count=80):
    tokens = words(count)
    tokens[index] = COMMA_ID
    return tokens


@pytest.mark.parametrize(("comma_at", "first_size"), [(60, 61), (55, 56), (74, 75), (54, 75)])
def test_comma_backtrack_moves_the_tail(comma_at, first_size):
    tokens = _with_comma_at(comma_at)
    weights = [1.0 + index / 100 for index in range(len(tokens))]
    chunks = make_chunks(stream(tokens, weights))
    assert real_tokens(chunks.ids[0]) == tokens[:first_size]
    assert real_tokens(chunks.ids[1]) == tokens[first_size:]
    # Weights travel with their tokens.
    assert chunks.weights[1][1 : 1 + len(tokens) - first_size] == weights[first_size:]


def test_comma_backtrack_window_and_disable():
    tokens = _with_comma_at(60)
    assert len(real_tokens(make_chunks(stream(tokens), comma_backtrack=0).ids[0])) == 75
    assert len(real_tokens(make_chunks(stream(tokens), comma_backtrack=10).ids[0])) == 75
    assert len(real_tokens(make_chunks(stream(tokens), comma_backtrack=15).ids[0])) == 61


def test_comma_as_76th_token_starts_the_next_chunk():
    tokens = _with_comma_at(75)
    chunks = make_chunks(stream(tokens))
    assert real_tokens(chunks.ids[0]) == tokens[:75]
    assert real_tokens(chunks.ids[1]) == tokens[75:]


def test_no_backtrack_when_the_prompt_ends_at_the_chunk_end():
    tokens = _with_comma_at(60, count=75)
    assert len(make_chunks(stream(tokens))) == 1


@pytest.mark.parametrize(
    ("breaks", "sizes"),
    [
        ([2], [2, 1]),
        ([0], [0, 3]),  # a leading BREAK leaves an empty first chunk, as in the web UI
        ([3], [3]),  # a trailing BREAK adds nothing
        ([1, 1], [1, 0, 2]),
        ([0, 3], [0, 3]),
    ],
)
def test_break_closes_the_chunk(breaks, sizes):
    chunks = make_chunks(stream([5, 6, 7], breaks=breaks), max_chunks=None)
    assert chunk_sizes(chunks) == sizes
    first = chunks.ids[0]
    assert first[1 + sizes[0] :] == [EOS_ID] * (76 - sizes[0])  # padded with EOS


def test_break_forgets_the_last_comma():
    # The comma at 60 belongs to the first chunk; the full second chunk has none to go back to.
    tokens = _with_comma_at(60, count=150)
    assert chunk_sizes(make_chunks(stream(tokens, breaks=[62]))) == [62, 75, 13]


def test_max_chunks_truncates_and_reports():
    tokens = words(200)
    chunks = make_chunks(stream(tokens), max_chunks=2)
    assert len(chunks) == 2
    assert chunks.dropped == tokens[150:]
    assert make_chunks(stream(tokens), max_chunks=None).dropped == []
    assert len(make_chunks(stream(tokens), max_chunks=None)) == 3


def test_padded_to():
    chunks = make_chunks(stream([5]))
    padded = chunks.padded_to(3)
    assert len(padded) == 3
    assert padded.ids[0] == chunks.ids[0]
    assert padded.ids[1] == padded.ids[2] == make_chunks(stream([])).ids[0]
    assert padded.weights[2] == [1.0] * 77
    assert chunks.padded_to(1).ids == chunks.ids


@pytest.mark.parametrize(
    "options",
    [{"chunk_size": 0}, {"max_chunks": 0}, {"comma_backtrack": -1}],
)
def test_make_chunks_rejects_bad_options(options):
    with pytest.raises(ValueError):
        make_chunks(stream([1]), **options)


@settings(max_examples=300, deadline=None)
@given(
    tokens=st.lists(st.sampled_from([1, 2, 3, COMMA_ID]), max_size=60),
    break_fractions=st.lists(st.floats(0, 1), max_size=4),
    chunk_size=st.integers(1, 12),
    comma_backtrack=st.integers(0, 14),
    max_chunks=st.one_of(st.none(), st.integers(1, 5)),
)
def test_chunks_keep_every_token_in_order(tokens, break_fractions, chunk_size, comma_backtrack, max_chunks):
    breaks = sorted(round(fraction * len(tokens)) for fraction in break_fractions)
    weights = [float(index) for index in range(len(tokens))]
    chunks = make_chunks(
        stream(tokens, weights, breaks),
        chunk_size=chunk_size,
        comma_backtrack=comma_backtrack,
        max_chunks=max_chunks,
    )
    assert 1 <= len(chunks) and (max_chunks is None or len(chunks) <= max_chunks)
    kept_ids, kept_weights = [], []
    for ids, chunk_weights in zip(chunks.ids, chunks.weights):
        assert len(ids) == len(chunk_weights) == chunk_size + 2
        real = real_tokens(ids)
        kept_ids += real
        kept_weights += chunk_weights[1 : 1 + len(real)]
        assert ids[1 + len(real) :] == [EOS_ID] * (chunk_size + 1 - len(real))
        assert chunk_weights[len(real) + 1 :] == [1.0] * (chunk_size + 1 - len(real))
    assert kept_ids + chunks.dropped == tokens
    assert kept_weights == weights[: len(kept_ids)]


# ---------------------------------------------------------------------------
# Layouts


@pytest.mark.parametrize("num_chunks", [1, 2, 3, 5])
def test_kept_positions(num_chunks):
    total = 77 * num_chunks
    assert kept_positions(num_chunks, "a1111") == list(range(total))
    compact = kept_positions(num_chunks, "compact")
    assert len(compact) == 75 * num_chunks + 2
    assert compact == sorted(set(compact))
    assert compact[0] == 0 and compact[-1] == total - 1
    dropped = set(range(total)) - set(compact)
    # Every chunk's EOS but the last and BOS but the first.
    assert dropped == {77 * c - 1 for c in range(1, num_chunks)} | {77 * c for c in range(1, num_chunks)}


def test_kept_positions_gather_one_long_sequence():
    chunks = make_chunks(stream(words(100)))
    flat = [token for ids in chunks.ids for token in ids]
    gathered = [flat[position] for position in kept_positions(len(chunks), "compact")]
    assert gathered == [BOS_ID, *words(100), *[EOS_ID] * 50, EOS_ID]


def test_kept_positions_rejects_bad_input():
    with pytest.raises(ValueError):
        kept_positions(0)
    with pytest.raises(ValueError, match="layout"):
        kept_positions(1, "sdxl")


# ---------------------------------------------------------------------------
# Real CLIP tokens: Danbooru tag prompts

TAGS = (
    "purple eyes, 1girl, short hair, smile, open mouth, ruffled blouse, red blouse, "
    "pleated skirt, blonde hair, green scarf, waving at viewer"
)


@pytest.fixture(scope="module")
def clip_tokenize(tmp_path_factory):
    pytest.importorskip("transformers")
    from nai_fast.text import tokenizer

    try:
        tokenizer.find_bpe_file()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NAI_FAST_CACHE", str(tmp_path_factory.mktemp("cache")))
        clip = tokenizer.load_tokenizer()
    return clip, functools.partial(clip.encode, add_special_tokens=False, verbose=False)


def test_comma_id_is_the_real_comma(clip_tokenize):
    clip, tokenize = clip_tokenize
    assert tokenize(",") == [COMMA_ID]
    assert (clip.bos_token_id, clip.eos_token_id) == (BOS_ID, EOS_ID)


@pytest.mark.parametrize(
    ("repeats", "token_count", "chunk_count"),
    [(1, 34, 1), (2, 69, 1), (3, 104, 2), (4, 139, 2), (5, 174, 3), (6, 209, 3), (7, 244, 4)],
)
def test_danbooru_prompt_chunk_counts(clip_tokenize, repeats, token_count, chunk_count):
    _, tokenize = clip_tokenize
    prompt = tokenize_runs(parse(", ".join([TAGS] * repeats)), tokenize)
    assert len(prompt.ids) == token_count
    chunks = make_chunks(prompt, max_chunks=None)
    assert len(chunks) == chunk_count
    # No chunk ends inside a tag: each is followed by a comma or ends with one.
    position = 0
    for ids in chunks.ids[:-1]:
        position += len(real_tokens(ids))
        assert prompt.ids[position - 1] == COMMA_ID or prompt.ids[position] == COMMA_ID


def test_danbooru_backtrack_and_truncation(clip_tokenize):
    _, tokenize = clip_tokenize
    prompt = tokenize_runs(parse(", ".join([TAGS] * 7)), tokenize)
    assert chunk_sizes(make_chunks(prompt, max_chunks=None, comma_backtrack=0)) == [75, 75, 75, 19]
    # With backtracking "ruffled" follows its tag into the fourth chunk.
    chunks = make_chunks(prompt, max_chunks=3)
    assert chunk_sizes(chunks) == [75, 75, 74]
    assert chunks.dropped == tokenize(
        "ruffled blouse, red blouse, pleated skirt, blonde hair, green scarf, waving at viewer"
    )


def test_weighted_real_prompt(clip_tokenize):
    _, tokenize = clip_tokenize
    chunks = make_chunks(tokenize_runs(parse("a (photo:1.5) of a cat BREAK dog"), tokenize))
    assert chunks.ids[0][:7] == [BOS_ID, 320, 1125, 539, 320, 2368, EOS_ID]
    assert chunks.weights[0][:6] == [1.0, 1.0, 1.5, 1.0, 1.0, 1.0]
    assert real_tokens(chunks.ids[1]) == tokenize("dog")


# ---------------------------------------------------------------------------
# Purity


def test_prompts_module_is_pure_python():
    """Loaded on its own, prompts.py pulls in neither torch nor transformers (nor NumPy)."""
    path = Path(importlib.util.find_spec("nai_fast.text.prompts").origin)
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('prompts', {str(path)!r})\n"
        "sys.modules['prompts'] = module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "print(sorted({'torch', 'transformers', 'numpy'} & set(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
