"""Prompt text front end: emphasis syntax -> weighted runs -> 75-token chunks.

Long because the three emphasis syntaxes, tokenizing runs (embeddings included) and chunking
share one data model (runs, chunks, breaks) and the web UI's rules at chunk borders.

Pure Python (no torch, no transformers). The pipeline is::

    runs = parse(text, syntax="a1111")                  # [(text, weight) | BREAK, ...]
    prompt = tokenize_runs(runs, tokenize, names)       # one token stream + weights + BREAKs
                                                        # (+ where embeddings' vectors go)
    chunks = make_chunks(prompt, max_chunks=3)          # n chunks of 77 ids: BOS, 75, EOS
    positions = kept_positions(len(chunks), "compact")  # which of the 77*n positions to keep

where ``tokenize(text) -> list[int]`` returns CLIP token ids without BOS/EOS, e.g.
``functools.partial(tokenizer.encode, add_special_tokens=False, verbose=False)`` (``verbose``
off: transformers otherwise warns about runs longer than 77 tokens, which are fine here).

Syntaxes understood by :func:`parse`:

``"a1111"`` -- AUTOMATIC1111 web UI (``parse_prompt_attention``), matched quirk for quirk:
    ``(x)`` multiplies by 1.1, ``[x]`` by 1/1.1, ``(x:w)`` by ``w`` (spaces allowed around
    ``w``); nesting multiplies. Round and square brackets keep separate stacks, so
    ``( [ a ) ]`` closes cleanly. An opener never closed applies its factor to the rest of
    the prompt; a closer with nothing open is literal text, and so is ``:w)`` with no ``(``
    open. ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters; any other
    backslash is dropped, as the web UI drops it. ``BREAK`` as a whole word (the web UI's
    ``\\bBREAK\\b``, so ``smile, BREAK, red`` breaks too) ends the chunk, and the whitespace
    around it goes with it. Deliberate differences from the web UI, all on inputs where it
    misbehaves: a weight that is not a finite number (``(a:.)``, ``(a:1.2.3)``; the web UI
    raises) is literal text; ``BREAK`` inside brackets still breaks (the web UI then
    tokenizes the word "BREAK"); empty pieces are dropped before equal weights merge, so
    ``a()b`` is the single run ``ab``.

``"nai"`` -- NovelAI: ``{x}`` multiplies by 1.05, ``[x]`` by 1/1.05, nesting multiplies,
    ``(`` ``)`` ``:`` and backslashes are ordinary text (NovelAI has no escapes). Unbalanced
    brackets behave as in ``"a1111"``. NovelAI itself has no ``BREAK``; it is honoured here
    all the same (same rule as ``"a1111"``), since an uppercase ``BREAK`` in a tag prompt is
    never meant as a tag.

``"none"`` -- everything is literal: one run of weight 1.0 (no ``BREAK`` either).

Every syntax: the empty string gives ``[]``; empty runs are dropped; adjacent runs whose
weights are equal are merged; ``parse`` never raises on any string.

Textual-inversion embeddings (:class:`EmbeddingName`): :func:`tokenize_runs` replaces a name
found in a run by as many placeholder positions as the embedding has vectors, each with the
run's weight (emphasis applies to them as to words). The rule, the web UI's made stricter: a
name matches where its own token ids (tokenized alone, as the prompt is: CLIP lowercases, so
case does not matter) occur in a run's tokens and start a word, i.e. the token before them ends
one (CLIP's ``</w>`` tokens; ``word_ends``) or the run starts there. The web UI requires only
the token sequence, so it also finds ``cat`` in ``bobcat`` (tokens ``bob``, ``cat</w>``).
CLIP splits words at letters/digits/punctuation changes, so ``myemb`` is found in
``myemb,``, ``(myemb:1.2)`` and ``myemb2`` but not in ``xmyemb``. A name never spans two
runs (``my(emb)`` is not ``myemb``); at one position the longest name wins.

:func:`make_chunks` never splits an embedding: one that does not fit in the current chunk
closes it (without comma backtrack, as the web UI does) and starts the next. An embedding in
the tail that comma backtrack carries over moves with it (the web UI leaves its vectors behind,
in the padding of the closed chunk).
"""

from __future__ import annotations

import enum
import math
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

__all__ = [
    "A1111_EMPHASIS",
    "BOS_ID",
    "BREAK",
    "CHUNK_SIZE",
    "COMMA_BACKTRACK",
    "COMMA_ID",
    "EMBEDDING_PLACEHOLDER",
    "EOS_ID",
    "NAI_EMPHASIS",
    "ChunkBreak",
    "Chunks",
    "EmbeddingName",
    "EmbeddingSpan",
    "Layout",
    "Run",
    "Syntax",
    "TokenizedPrompt",
    "kept_positions",
    "make_chunks",
    "parse",
    "tokenize_runs",
]

# CLIP (SD 1.x) vocabulary ids: <|startoftext|>, <|endoftext|> and ",</w>".
BOS_ID: Final = 49406
EOS_ID: Final = 49407
COMMA_ID: Final = 267
# Tokens per chunk between its BOS and EOS: CLIP's 77 positions minus those two.
CHUNK_SIZE: Final = 75
# The id at an embedding's positions in the chunks (the web UI's); its vectors replace the lookup.
EMBEDDING_PLACEHOLDER: Final = 0
# The web UI's comma_padding_backtrack default, whatever the emphasis mode.
COMMA_BACKTRACK: Final = 20

A1111_EMPHASIS: Final = 1.1
NAI_EMPHASIS: Final = 1.05


class ChunkBreak(enum.Enum):
    """Type of :data:`BREAK`, the marker that ends the current chunk."""

    BREAK = "BREAK"

    def __repr__(self) -> str:
        return "BREAK"


BREAK: Final = ChunkBreak.BREAK

Run = tuple[str, float]
Syntax = Literal["a1111", "nai", "none"]
Layout = Literal["a1111", "compact"]


# ---------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True)
class _Rules:
    """One emphasis syntax: how to cut the text into tokens, and what brackets do."""

    # Alternatives are named groups: escape, weight (with value), open, close, text.
    tokens: re.Pattern[str]
    factors: dict[str, float]  # opener -> factor applied to its contents
    opener_of: dict[str, str]  # closer -> opener


_A1111_TOKENS = re.compile(
    r"""
    (?P<escape>\\[()\[\]\\]?)                      # an escaped char; a lone "\" escapes nothing
    | (?P<weight>:\s*(?P<value>[+-]?[.\d]+)\s*\))  # ":1.5)" closes "(" with that weight
    | (?P<open>[(\[])
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+|:)
    """,
    re.VERBOSE,
)
_NAI_TOKENS = re.compile(r"(?P<open>[{\[])|(?P<close>[}\]])|(?P<text>[^{}\[\]]+)")

_RULES: Final[dict[str, _Rules]] = {
    "a1111": _Rules(
        tokens=_A1111_TOKENS,
        # Insertion order is the order in which unclosed openers apply (web UI: round first).
        factors={"(": A1111_EMPHASIS, "[": 1 / A1111_EMPHASIS},
        opener_of={")": "(", "]": "["},
    ),
    "nai": _Rules(
        tokens=_NAI_TOKENS,
        factors={"{": NAI_EMPHASIS, "[": 1 / NAI_EMPHASIS},
        opener_of={"}": "{", "]": "["},
    ),
}
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")


def parse(text: str, syntax: Syntax = "a1111") -> list[Run | ChunkBreak]:
    """Split ``text`` into ``(text, weight)`` runs and :data:`BREAK` markers.

    See the module docstring for the syntaxes. Raises ``ValueError`` only for an unknown
    ``syntax``; every string parses.
    """
    if syntax == "none":
        return [(text, 1.0)] if text else []
    try:
        rules = _RULES[syntax]
    except KeyError:
        raise ValueError(f"unknown prompt syntax {syntax!r}; expected 'a1111', 'nai' or 'none'") from None

    # Parallel lists, so a closing bracket can scale every piece since its opener.
    pieces: list[str | ChunkBreak] = []
    weights: list[float] = []
    open_at: dict[str, list[int]] = {opener: [] for opener in rules.factors}

    def scale_from(start: int, factor: float) -> None:
        for index in range(start, len(weights)):
            weights[index] *= factor

    def add_text(piece: str) -> None:
        for index, part in enumerate(_BREAK_WORD.split(piece)):
            if index:
                pieces.append(BREAK)
                weights.append(1.0)
            pieces.append(part)
            weights.append(1.0)

    for match in rules.tokens.finditer(text):
        kind, token = match.lastgroup, match.group()
        if kind == "escape":
            pieces.append(token[1:])
            weights.append(1.0)
        elif kind == "open":
            open_at[token].append(len(pieces))
        elif kind == "close" and open_at[rules.opener_of[token]]:
            opener = rules.opener_of[token]
            scale_from(open_at[opener].pop(), rules.factors[opener])
        elif kind == "weight" and open_at["("] and (weight := _finite_float(match["value"])) is not None:
            scale_from(open_at["("].pop(), weight)
        else:  # plain text, a closer with nothing open, or a weight with no usable "("
            add_text(token)

    for opener, starts in open_at.items():
        for start in starts:
            scale_from(start, rules.factors[opener])
    return _merge_runs(pieces, weights)


def _finite_float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _merge_runs(pieces: Sequence[str | ChunkBreak], weights: Sequence[float]) -> list[Run | ChunkBreak]:
    """Drop empty pieces, then join neighbours of equal weight."""
    runs: list[Run | ChunkBreak] = []
    for piece, weight in zip(pieces, weights):
        if piece is BREAK:
            runs.append(BREAK)
        elif piece:
            if runs and runs[-1] is not BREAK and runs[-1][1] == weight:
                runs[-1] = (runs[-1][0] + piece, weight)
            else:
                runs.append((piece, weight))
    return runs


# ---------------------------------------------------------------------------
# Tokenizing and chunking


@dataclass(frozen=True)
class EmbeddingName:
    """A textual-inversion embedding as a prompt sees it: the token ids of its ``name`` and the
    number of ``vectors`` that replace them."""

    name: str
    ids: tuple[int, ...]
    vectors: int

    def __post_init__(self) -> None:
        if not self.ids:
            raise ValueError(f"embedding {self.name!r}: its name reads as no token")
        if self.vectors < 1:
            raise ValueError(f"embedding {self.name!r}: needs at least one vector, got {self.vectors}")


@dataclass(frozen=True)
class EmbeddingSpan:
    """An embedding's ``length`` positions from ``start`` in a :class:`TokenizedPrompt`;
    ``source`` holds the name's token ids (what a cut reports)."""

    start: int
    length: int
    name: str
    source: tuple[int, ...] = ()


@dataclass
class TokenizedPrompt:
    """A prompt as one token stream.

    ``ids[i]`` carries ``weights[i]``; each entry ``p`` of ``breaks`` is a BREAK just before
    ``ids[p]`` (``p == len(ids)``: at the end). ``breaks`` is sorted and may repeat a position.
    ``embeddings`` lists, in order, the spans of ``ids`` that are embeddings' vectors
    (placeholder ids); a BREAK never falls inside one.
    """

    ids: list[int]
    weights: list[float]
    breaks: list[int]
    embeddings: list[EmbeddingSpan] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.weights):
            raise ValueError(f"{len(self.ids)} ids but {len(self.weights)} weights")
        if self.breaks != sorted(self.breaks) or any(not 0 <= p <= len(self.ids) for p in self.breaks):
            raise ValueError(f"breaks must be sorted positions in 0..{len(self.ids)}: {self.breaks}")
        end = 0
        for span in self.embeddings:
            if span.length < 1 or span.start < end or span.start + span.length > len(self.ids):
                raise ValueError(f"embedding spans must be ordered, apart and in 0..{len(self.ids)}: {span}")
            if any(span.start < p < span.start + span.length for p in self.breaks):
                raise ValueError(f"a BREAK falls inside the embedding {span}")
            end = span.start + span.length


def tokenize_runs(
    runs: Iterable[Run | ChunkBreak],
    tokenize: Callable[[str], Sequence[int]],
    embeddings: Iterable[EmbeddingName] = (),
    *,
    word_ends: Collection[int] | None = None,
    placeholder: int = EMBEDDING_PLACEHOLDER,
) -> TokenizedPrompt:
    """Tokenize each run on its own (as the web UI does) and give each token its run's weight.

    Where an embedding's name starts a word (see the module doc), its tokens become
    ``vectors`` positions of id ``placeholder`` with the run's weight. ``word_ends``: the ids
    that end a word (CLIP's ``...</w>`` tokens); ``None`` treats every token as a word (the web
    UI's rule).
    """
    by_first: dict[int, list[EmbeddingName]] = {}
    for embedding in embeddings:
        by_first.setdefault(embedding.ids[0], []).append(embedding)
    for candidates in by_first.values():
        candidates.sort(key=lambda embedding: len(embedding.ids), reverse=True)  # the longest name wins

    def word_ends_at(token: int) -> bool:
        return word_ends is None or token in word_ends

    ids: list[int] = []
    weights: list[float] = []
    breaks: list[int] = []
    spans: list[EmbeddingSpan] = []
    for run in runs:
        if run is BREAK:
            breaks.append(len(ids))
            continue
        text, weight = run
        run_ids = list(tokenize(text))
        position = 0
        while position < len(run_ids):
            token = run_ids[position]
            found = None
            if position == 0 or word_ends_at(run_ids[position - 1]):
                for candidate in by_first.get(token, ()):
                    end = position + len(candidate.ids)
                    if tuple(run_ids[position:end]) == candidate.ids and word_ends_at(candidate.ids[-1]):
                        found = candidate
                        break
            if found is None:
                ids.append(token)
                weights.append(weight)
                position += 1
            else:
                spans.append(EmbeddingSpan(len(ids), found.vectors, found.name, found.ids))
                ids.extend([placeholder] * found.vectors)
                weights.extend([weight] * found.vectors)
                position += len(found.ids)
    return TokenizedPrompt(ids, weights, breaks, spans)


@dataclass
class Chunks:
    """A prompt cut into chunks of ``BOS + chunk_size tokens (EOS-padded) + EOS`` ids.

    ``weights`` match ``ids`` position for position, 1.0 on BOS, EOS and padding.
    ``dropped`` holds the token ids cut off by ``max_chunks``, in prompt order (decode them
    to tell the user what was lost; an embedding cut off is reported by its name's tokens).
    ``embeddings`` holds, per chunk, ``(position, name)`` for each embedding whose vectors
    start at that position of the chunk's ``ids`` (BOS is position 0).
    """

    ids: list[list[int]]
    weights: list[list[float]]
    dropped: list[int]
    embeddings: list[list[tuple[int, str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.embeddings:
            self.embeddings = [[] for _ in self.ids]
        if len(self.embeddings) != len(self.ids):
            raise ValueError(f"{len(self.ids)} chunks but embeddings for {len(self.embeddings)}")

    def __len__(self) -> int:
        return len(self.ids)

    def padded_to(self, count: int) -> Chunks:
        """These chunks followed by empty ones (BOS, then EOS only) up to ``count`` chunks,
        e.g. to give a negative prompt the chunk count of its prompt."""
        missing = count - len(self)
        empty_ids = [self.ids[0][0]] + [self.ids[0][-1]] * (len(self.ids[0]) - 1)
        empty_weights = [1.0] * len(empty_ids)
        return Chunks(
            ids=self.ids + [list(empty_ids) for _ in range(missing)],
            weights=self.weights + [list(empty_weights) for _ in range(missing)],
            dropped=self.dropped,
            embeddings=self.embeddings + [[] for _ in range(missing)],
        )


def make_chunks(
    prompt: TokenizedPrompt,
    *,
    chunk_size: int = CHUNK_SIZE,
    max_chunks: int | None = 3,
    comma_backtrack: int = COMMA_BACKTRACK,
    comma_token: int = COMMA_ID,
    bos: int = BOS_ID,
    eos: int = EOS_ID,
) -> Chunks:
    """Cut a token stream into chunks the way the web UI does.

    Tokens fill chunks of ``chunk_size``; a BREAK closes the current chunk early (even an
    empty one). Comma backtrack: when a token arrives for a full chunk whose last comma sits
    within ``comma_backtrack`` tokens of its end, the tokens after that comma move to the
    next chunk so a tag is not split. The default, 20, is the web UI's
    (``comma_padding_backtrack``), which it applies whatever the emphasis mode, "None"
    included; ``0`` disables it (chunks cut at exactly ``chunk_size`` tokens). An embedding's
    vectors are never split: when they do not fit, the chunk closes and they start the next
    (an embedding longer than ``chunk_size`` is a ValueError). Chunks past ``max_chunks``
    (``None``: no limit) are dropped and their tokens reported in ``Chunks.dropped``. An empty
    prompt gives one empty chunk.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if max_chunks is not None and max_chunks < 1:
        raise ValueError(f"max_chunks must be at least 1 or None, got {max_chunks}")
    if comma_backtrack < 0:
        raise ValueError(f"comma_backtrack must be non-negative, got {comma_backtrack}")

    for span in prompt.embeddings:
        if span.length > chunk_size:
            raise ValueError(
                f"embedding {span.name!r} has {span.length} vectors; at most {chunk_size} fit in a chunk"
            )
    pieces = _split_tokens(prompt, chunk_size, comma_backtrack, comma_token)
    kept = pieces if max_chunks is None else pieces[:max_chunks]
    return Chunks(
        ids=[[bos, *ids, *[eos] * (chunk_size - len(ids)), eos] for ids, _, _ in kept],
        weights=[[1.0, *weights, *[1.0] * (chunk_size - len(weights)), 1.0] for _, weights, _ in kept],
        dropped=[token for ids, _, spans in pieces[len(kept) :] for token in _with_names(ids, spans)],
        embeddings=[[(1 + offset, span.name) for offset, span in spans] for _, _, spans in kept],
    )


def _with_names(ids: list[int], spans: list[tuple[int, EmbeddingSpan]]) -> list[int]:
    """A chunk's ids with each embedding's placeholders replaced by its name's tokens."""
    out: list[int] = []
    position = 0
    for offset, span in spans:
        out += ids[position:offset]
        out += span.source
        position = offset + span.length
    return out + ids[position:]


_Piece = tuple[list[int], list[float], list[tuple[int, EmbeddingSpan]]]


def _split_tokens(prompt: TokenizedPrompt, chunk_size: int, comma_backtrack: int, comma_token: int) -> list[_Piece]:
    """The chunks' tokens, weights and embeddings (offset in the tokens, span), unpadded
    (the web UI's ``tokenize_line`` loop)."""
    chunks: list[_Piece] = []
    ids: list[int] = []
    weights: list[float] = []
    spans: list[tuple[int, EmbeddingSpan]] = []
    last_comma = -1  # index in `ids` of the current chunk's last comma, -1 for none

    def close_chunk() -> None:
        nonlocal last_comma
        chunks.append((ids.copy(), weights.copy(), spans.copy()))
        ids.clear()
        weights.clear()
        spans.clear()
        last_comma = -1

    breaks_at = Counter(prompt.breaks)
    span_at = {span.start: span for span in prompt.embeddings}
    position = 0
    while position < len(prompt.ids):
        for _ in range(breaks_at[position]):
            close_chunk()
        token, span = prompt.ids[position], span_at.get(position)
        if span is None and token == comma_token:
            last_comma = len(ids)
        elif len(ids) == chunk_size and 0 <= last_comma and chunk_size - last_comma <= comma_backtrack:
            # Full chunk with a comma near its end: carry the words (and embeddings) after it over.
            cut = last_comma + 1
            moved_ids, moved_weights = ids[cut:], weights[cut:]
            moved_spans = [(offset - cut, moved) for offset, moved in spans if offset >= cut]
            del ids[cut:], weights[cut:]
            spans[:] = [(offset, kept) for offset, kept in spans if offset < cut]
            close_chunk()
            ids.extend(moved_ids)
            weights.extend(moved_weights)
            spans.extend(moved_spans)
        if len(ids) == chunk_size:
            close_chunk()
        if span is None:
            ids.append(token)
            weights.append(prompt.weights[position])
            position += 1
            continue
        if len(ids) + span.length > chunk_size:  # never split an embedding: it starts the next chunk
            close_chunk()
        end = position + span.length
        spans.append((len(ids), span))
        ids.extend(prompt.ids[position:end])
        weights.extend(prompt.weights[position:end])
        position = end

    for _ in range(breaks_at[len(prompt.ids)]):
        close_chunk()
    if ids or not chunks:
        close_chunk()
    return chunks


def kept_positions(num_chunks: int, layout: Layout = "a1111", chunk_size: int = CHUNK_SIZE) -> list[int]:
    """Which of the ``(chunk_size + 2) * num_chunks`` encoded positions a layout keeps.

    ``"a1111"`` keeps all of them (every chunk's BOS and EOS, 77*n); ``"compact"`` keeps the
    first BOS, every chunk's tokens and the last EOS (75*n + 2), as if one long sequence had
    been encoded.
    """
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be at least 1, got {num_chunks}")
    width = chunk_size + 2
    total = width * num_chunks
    if layout == "a1111":
        return list(range(total))
    if layout == "compact":
        inner = (start + offset for start in range(0, total, width) for offset in range(1, width - 1))
        return [0, *inner, total - 1]
    raise ValueError(f"unknown layout {layout!r}; expected 'a1111' or 'compact'")
