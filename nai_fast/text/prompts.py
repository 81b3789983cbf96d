"""Prompt text front end: emphasis syntax -> weighted runs -> 75-token chunks.

Pure Python (no torch, no transformers). The pipeline is::

    runs = parse(text, syntax="a1111")                  # [(text, weight) | BREAK, ...]
    prompt = tokenize_runs(runs, tokenize)              # one token stream + weights + BREAKs
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
"""

from __future__ import annotations

import enum
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "A1111_EMPHASIS",
    "BOS_ID",
    "BREAK",
    "CHUNK_SIZE",
    "COMMA_ID",
    "EOS_ID",
    "NAI_EMPHASIS",
    "ChunkBreak",
    "Chunks",
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


@dataclass
class TokenizedPrompt:
    """A prompt as one token stream.

    ``ids[i]`` carries ``weights[i]``; each entry ``p`` of ``breaks`` is a BREAK just before
    ``ids[p]`` (``p == len(ids)``: at the end). ``breaks`` is sorted and may repeat a position.
    """

    ids: list[int]
    weights: list[float]
    breaks: list[int]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.weights):
            raise ValueError(f"{len(self.ids)} ids but {len(self.weights)} weights")
        if self.breaks != sorted(self.breaks) or any(not 0 <= p <= len(self.ids) for p in self.breaks):
            raise ValueError(f"breaks must be sorted positions in 0..{len(self.ids)}: {self.breaks}")


def tokenize_runs(
    runs: Iterable[Run | ChunkBreak], tokenize: Callable[[str], Sequence[int]]
) -> TokenizedPrompt:
    """Tokenize each run on its own (as the web UI does) and give each token its run's weight."""
    ids: list[int] = []
    weights: list[float] = []
    breaks: list[int] = []
    for run in runs:
        if run is BREAK:
            breaks.append(len(ids))
            continue
        text, weight = run
        run_ids = list(tokenize(text))
        ids.extend(run_ids)
        weights.extend([weight] * len(run_ids))
    return TokenizedPrompt(ids, weights, breaks)


@dataclass
class Chunks:
    """A prompt cut into chunks of ``BOS + chunk_size tokens (EOS-padded) + EOS`` ids.

    ``weights`` match ``ids`` position for position, 1.0 on BOS, EOS and padding.
    ``dropped`` holds the token ids cut off by ``max_chunks``, in prompt order (decode them
    to tell the user what was lost).
    """

    ids: list[list[int]]
    weights: list[list[float]]
    dropped: list[int]

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
        )


def make_chunks(
    prompt: TokenizedPrompt,
    *,
    chunk_size: int = CHUNK_SIZE,
    max_chunks: int | None = 3,
    comma_backtrack: int = 20,
    comma_token: int = COMMA_ID,
    bos: int = BOS_ID,
    eos: int = EOS_ID,
) -> Chunks:
    """Cut a token stream into chunks the way the web UI does.

    Tokens fill chunks of ``chunk_size``; a BREAK closes the current chunk early (even an
    empty one). When a token arrives for a full chunk whose last comma sits within
    ``comma_backtrack`` tokens of its end, the tokens after that comma move to the next chunk
    so a tag is not split (``0`` disables). Chunks past ``max_chunks`` (``None``: no limit)
    are dropped and their tokens reported in ``Chunks.dropped``. An empty prompt gives one
    empty chunk.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if max_chunks is not None and max_chunks < 1:
        raise ValueError(f"max_chunks must be at least 1 or None, got {max_chunks}")
    if comma_backtrack < 0:
        raise ValueError(f"comma_backtrack must be non-negative, got {comma_backtrack}")

    pieces = _split_tokens(prompt, chunk_size, comma_backtrack, comma_token)
    kept = pieces if max_chunks is None else pieces[:max_chunks]
    return Chunks(
        ids=[[bos, *ids, *[eos] * (chunk_size - len(ids)), eos] for ids, _ in kept],
        weights=[[1.0, *weights, *[1.0] * (chunk_size - len(weights)), 1.0] for _, weights in kept],
        dropped=[token for ids, _ in pieces[len(kept) :] for token in ids],
    )


def _split_tokens(
    prompt: TokenizedPrompt, chunk_size: int, comma_backtrack: int, comma_token: int
) -> list[tuple[list[int], list[float]]]:
    """The chunks' tokens and weights, unpadded (the web UI's ``tokenize_line`` loop)."""
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1  # index in `ids` of the current chunk's last comma, -1 for none

    def close_chunk() -> None:
        nonlocal last_comma
        chunks.append((ids.copy(), weights.copy()))
        ids.clear()
        weights.clear()
        last_comma = -1

    breaks_at = Counter(prompt.breaks)
    for position, (token, weight) in enumerate(zip(prompt.ids, prompt.weights)):
        for _ in range(breaks_at[position]):
            close_chunk()
        if token == comma_token:
            last_comma = len(ids)
        elif len(ids) == chunk_size and 0 <= last_comma and chunk_size - last_comma <= comma_backtrack:
            # Full chunk with a comma near its end: carry the words after it over.
            cut = last_comma + 1
            moved_ids, moved_weights = ids[cut:], weights[cut:]
            del ids[cut:], weights[cut:]
            close_chunk()
            ids.extend(moved_ids)
            weights.extend(moved_weights)
        if len(ids) == chunk_size:
            close_chunk()
        ids.append(token)
        weights.append(weight)

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
