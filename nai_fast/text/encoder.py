"""Long-prompt CLIP conditioning: the penultimate layer, 75-token chunks, emphasis.

:class:`LongPromptEncoder` turns prompts and negative prompts into the
cross-attention context of a Stable Diffusion 1.x U-Net the way NovelAI and
the web UI do, in one pass:

    text -> weighted runs (emphasis syntax, BREAK) -> chunks of 75 tokens
         -> every chunk of every prompt and negative prompt in ONE encoder call,
            running only the layers up to the chosen one
         -> final layer norm, emphasis, per-chunk mean restore and
            concatenation in one fused op (:func:`nai_fast.kernels.chunk_concat`)

Prompt and negative prompt come back with the same number of chunks, so
classifier-free guidance needs one U-Net call per step.

``clip_skip`` counts like the web UI: 1 is the last layer, 2 NovelAI's
penultimate layer. diffusers counts layers skipped: its ``clip_skip`` is ours
minus one.

Textual-inversion embeddings (``embeddings=``, e.g. from
:func:`nai_fast.text.embeddings.load_embeddings`): a name in a prompt becomes
its vectors (see :mod:`nai_fast.text.prompts` for the matching rule and the
chunking). For the call that uses one, the text encoder's token-embedding
module is swapped for one that looks the ids up and then writes the vectors
over the embedding's positions (the web UI's way); the model adds position
embeddings to them as to any token. A call with no embedding in any of its
prompts runs exactly the plain ``input_ids`` path.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn

from ..kernels import chunk_concat
from .prompts import (
    CHUNK_SIZE,
    COMMA_BACKTRACK,
    Chunks,
    EmbeddingName,
    kept_positions,
    make_chunks,
    parse,
    tokenize_runs,
)
from .tokenizer import load_tokenizer

__all__ = ["EMPHASIS_MODES", "SYNTAXES", "LongPromptEncoder", "VectorsAt", "load_tokenizer"]

logger = logging.getLogger(__name__)

EMPHASIS_MODES = ("original", "no_norm", "ignore")
SYNTAXES = ("a1111", "nai", "none")


class LongPromptEncoder:
    """Encode long, weighted prompts with a CLIP text encoder.

    Args:
        tokenizer: the CLIP tokenizer (see :func:`load_tokenizer`).
        text_encoder: a transformers ``CLIPTextModel``.
        clip_skip: 1 = last layer, 2 = penultimate (NovelAI), ...; the chosen
            layer's output goes through the encoder's final layer norm.
        max_chunks: chunks of 75 tokens per prompt (3 = 225 tokens); ``None``
            for no limit. Longer prompts are cut with a warning quoting the cut.
        syntax: emphasis syntax, ``"a1111"``, ``"nai"`` or ``"none"``.
        emphasis: ``"original"`` multiplies each token's vector by its weight,
            then restores the chunk's mean (the web UI's default, per chunk
            here where the web UI takes the mean over the whole batch);
            ``"no_norm"`` only multiplies; ``"ignore"`` parses but applies
            no weight.
        comma_backtrack: when a chunk fills, the words after a comma at most
            this many tokens from its end move to the next chunk, so a tag is
            not cut in two. Independent of ``syntax``: the default, 20, is the
            web UI's, which backtracks with every emphasis mode ("None"
            included); 0 cuts at exactly 75 tokens. Training uses 0: its
            captions are trimmed to ``75 * max_chunks`` tokens, which only fit
            when chunks hold 75 each (with backtrack their last tags would be cut).
        layout: ``"a1111"`` keeps every chunk's BOS and EOS (77 per chunk, what
            existing models and files expect); ``"compact"`` keeps only the
            first BOS and the last EOS (75 per chunk + 2).
        embeddings: textual-inversion embeddings, name -> vectors ``[n, width]``
            (``n`` at most 75, ``width`` the encoder's), as
            :func:`~nai_fast.text.embeddings.load_embeddings` returns them. A
            wrong width is a ValueError naming the embedding (and its file).
            Two names that read as the same tokens (``A`` and ``a``) are refused.
    """

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: nn.Module,
        clip_skip: int = 2,
        max_chunks: int | None = 3,
        syntax: str = "a1111",
        emphasis: str = "original",
        comma_backtrack: int = COMMA_BACKTRACK,
        layout: str = "a1111",
        embeddings: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self._transformer = getattr(text_encoder, "text_model", text_encoder)  # transformers 4 nests it
        _check_clip_skip(clip_skip, len(self._transformer.encoder.layers))
        if syntax not in SYNTAXES:
            raise ValueError(f"unknown prompt syntax {syntax!r}; choose one of {SYNTAXES}")
        if emphasis not in EMPHASIS_MODES:
            raise ValueError(f"unknown emphasis mode {emphasis!r}; choose one of {EMPHASIS_MODES}")
        if isinstance(comma_backtrack, bool) or not isinstance(comma_backtrack, int) or comma_backtrack < 0:
            raise ValueError(f"comma_backtrack must be a non-negative integer (0 disables), got {comma_backtrack!r}")
        kept_positions(1, layout)  # validates the layout name
        self.clip_skip = clip_skip
        self.max_chunks = max_chunks
        self.syntax = syntax
        self.emphasis = emphasis
        self.comma_backtrack = comma_backtrack
        self.layout = layout
        self._tokenize = functools.partial(tokenizer.encode, add_special_tokens=False, verbose=False)
        self.embeddings = self._checked_embeddings(embeddings or {})
        self._names = self._embedding_names()
        self._word_ends = _word_end_ids(tokenizer) if self._names else None

    def _checked_embeddings(self, embeddings: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The embeddings as ``[n, width]`` tensors, refused by name where they cannot work here."""
        width = self._transformer.embeddings.token_embedding.weight.shape[1]
        source = getattr(embeddings, "source", repr)  # load_embeddings' result also names the file
        checked = {}
        for name, vectors in embeddings.items():
            if not isinstance(vectors, torch.Tensor) or not vectors.is_floating_point():
                raise ValueError(f"embedding {source(name)}: vectors must be a floating-point tensor [n, width]")
            if vectors.dim() == 1:
                vectors = vectors[None]
            if vectors.dim() != 2 or vectors.shape[0] < 1:
                raise ValueError(f"embedding {source(name)}: vectors must be [n, width], got {list(vectors.shape)}")
            if vectors.shape[1] != width:
                raise ValueError(
                    f"embedding {source(name)} has vectors of width {vectors.shape[1]}, but this text encoder's "
                    f"are {width} wide: it was made for another model"
                )
            if vectors.shape[0] > CHUNK_SIZE:
                raise ValueError(
                    f"embedding {source(name)} has {vectors.shape[0]} vectors; at most {CHUNK_SIZE} fit in a chunk"
                )
            checked[name] = vectors
        return checked

    def _embedding_names(self) -> list[EmbeddingName]:
        """Each embedding's name as tokens; two names reading alike are refused."""
        names: dict[tuple[int, ...], EmbeddingName] = {}
        for name, vectors in self.embeddings.items():
            ids = tuple(self._tokenize(name))
            if not ids:
                raise ValueError(f"embedding {name!r}: its name reads as no token, so no prompt can use it")
            if ids in names:
                raise ValueError(
                    f"embeddings {names[ids].name!r} and {name!r} read as the same tokens (CLIP ignores case); "
                    "rename one"
                )
            names[ids] = EmbeddingName(name, ids, vectors.shape[0])
        return list(names.values())

    def chunks(self, prompt: str) -> Chunks:
        """A prompt's chunks of token ids and emphasis weights (warns if it is cut)."""
        chunks = make_chunks(
            tokenize_runs(parse(prompt, self.syntax), self._tokenize, self._names, word_ends=self._word_ends),
            max_chunks=self.max_chunks,
            comma_backtrack=self.comma_backtrack,
        )
        if chunks.dropped:
            dropped = self.tokenizer.decode(chunks.dropped)
            logger.warning("prompt longer than %d tokens; cut: %r", self.max_chunks * CHUNK_SIZE, dropped)
        return chunks

    def encode(
        self,
        prompts: str | Sequence[str],
        negative_prompts: str | Sequence[str] | None = None,
        *,
        clip_skip: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cond, uncond)``, each ``[batch, tokens, width]`` and of equal shape.

        ``negative_prompts`` defaults to the empty prompt; a single string
        applies to every prompt. ``clip_skip`` overrides the encoder's for this
        call. Both come back in the text encoder's dtype and on its device;
        gradients flow to the encoder's parameters.
        """
        prompts, negative_prompts = _prompt_lists(prompts, negative_prompts)
        encoded = [self.chunks(text) for text in [*prompts, *negative_prompts]]
        count = max(map(len, encoded))
        encoded = [chunks.padded_to(count) for chunks in encoded]
        device = self._transformer.embeddings.token_embedding.weight.device
        ids = torch.tensor([chunk for chunks in encoded for chunk in chunks.ids], device=device)
        weights = torch.tensor([chunk for chunks in encoded for chunk in chunks.weights], device=device)
        if self.emphasis == "ignore":  # parsed all the same: weights still split the text into runs
            weights = torch.ones_like(weights)

        vectors = self._vectors_at([chunk for chunks in encoded for chunk in chunks.embeddings], device)
        hidden = self.hidden_states(ids, self.clip_skip if clip_skip is None else clip_skip, vectors=vectors)
        destination, length = self._destination(len(encoded), count, device)
        norm = self._transformer.final_layer_norm
        context = chunk_concat(
            hidden,
            norm.weight,
            norm.bias,
            norm.eps,
            weights,
            destination,
            len(encoded) * length,
            restore_mean=self.emphasis == "original",
        ).view(len(encoded), length, -1)
        return context[: len(prompts)], context[len(prompts) :]

    def hidden_states(self, ids: torch.Tensor, clip_skip: int, *, vectors: VectorsAt | None = None) -> torch.Tensor:
        """Layer ``clip_skip``'s output (counted from the last) for chunks of
        token ids ``[n, 77]``, before the final layer norm, running no layer above it.
        ``vectors``: token embeddings written over the lookup of ``ids`` first."""
        layers = self._transformer.encoder.layers
        _check_clip_skip(clip_skip, len(layers))
        with ExitStack() as swaps:
            swaps.enter_context(_swapped(self._transformer.encoder, "layers", layers[: len(layers) + 1 - clip_skip]))
            swaps.enter_context(_swapped(self._transformer, "final_layer_norm", nn.Identity()))
            swaps.enter_context(_token_vectors(self._transformer, vectors))
            return self._transformer(input_ids=ids).last_hidden_state

    def _vectors_at(
        self, chunk_embeddings: Sequence[Sequence[tuple[int, str]]], device: torch.device
    ) -> VectorsAt | None:
        """Where the chunks' embeddings go (``Chunks.embeddings`` of each row), or None if nowhere."""
        rows: list[int] = []
        columns: list[int] = []
        pieces: list[torch.Tensor] = []
        for row, found in enumerate(chunk_embeddings):
            for position, name in found:
                vectors = self.embeddings[name]
                rows += [row] * len(vectors)
                columns += range(position, position + len(vectors))
                pieces.append(vectors)
        if not pieces:
            return None
        weight = self._transformer.embeddings.token_embedding.weight
        return VectorsAt(
            torch.tensor(rows, device=device),
            torch.tensor(columns, device=device),
            torch.cat([piece.to(weight.device, weight.dtype) for piece in pieces]),
        )

    def _destination(self, sequences: int, count: int, device: torch.device) -> tuple[torch.Tensor, int]:
        """Where each chunk row lands in the flattened context: ``[sequences * count, 77]``
        row indices (-1 where the layout drops a row), and the context length."""
        width = CHUNK_SIZE + 2
        kept = torch.tensor(kept_positions(count, self.layout), device=device)
        within = torch.full((count * width,), -1, dtype=torch.long, device=device)
        within[kept] = torch.arange(len(kept), device=device)
        offsets = torch.arange(sequences, device=device)[:, None] * len(kept)
        destination = torch.where(within >= 0, within + offsets, -1)
        return destination.view(sequences * count, width), len(kept)


def _prompt_lists(
    prompts: str | Sequence[str], negative_prompts: str | Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """Prompts as a list, and a negative prompt for each (the empty one by default)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if negative_prompts is None or isinstance(negative_prompts, str):
        negative_prompts = [negative_prompts or ""] * len(prompts)
    negative_prompts = list(negative_prompts)
    if len(negative_prompts) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(negative_prompts)} negative prompts")
    if not prompts:
        raise ValueError("no prompt to encode")
    return prompts, negative_prompts


class VectorsAt(NamedTuple):
    """Token embeddings to use at ``(rows[i], columns[i])`` of a batch of chunks: ``vectors[i]``."""

    rows: torch.Tensor
    columns: torch.Tensor
    vectors: torch.Tensor


class _TokenEmbeddingWithVectors(nn.Module):
    """A token-embedding lookup whose result has some positions overwritten."""

    def __init__(self, lookup: nn.Module, vectors: VectorsAt) -> None:
        super().__init__()
        self.lookup = lookup
        self.at = vectors

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embedded = self.lookup(input_ids)
        return embedded.index_put((self.at.rows, self.at.columns), self.at.vectors.to(embedded.dtype))


@contextmanager
def _token_vectors(transformer: nn.Module, vectors: VectorsAt | None) -> Iterator[None]:
    """Swap in the overwriting lookup for one call (nothing at all when ``vectors`` is None)."""
    if vectors is None:
        yield
        return
    embeddings = transformer.embeddings
    with _swapped(embeddings, "token_embedding", _TokenEmbeddingWithVectors(embeddings.token_embedding, vectors)):
        yield


def _word_end_ids(tokenizer: Any) -> frozenset[int] | None:
    """The ids of CLIP's word-final tokens (``...</w>``); None if the vocabulary has no such marks."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    ends = frozenset(index for token, index in vocab.items() if token.endswith("</w>"))
    return ends or None


def _check_clip_skip(clip_skip: int, layers: int) -> None:
    if not 1 <= clip_skip <= layers:
        raise ValueError(f"clip_skip must lie in 1..{layers} for this {layers}-layer encoder, got {clip_skip}")


@contextmanager
def _swapped(module: nn.Module, name: str, replacement: nn.Module) -> Iterator[None]:
    """Temporarily replace a submodule (the encoder call is not thread-safe while it runs)."""
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


def encode_chunk_by_chunk(
    encoder: LongPromptEncoder, prompts: str | Sequence[str], negative_prompts: str | Sequence[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """What :meth:`LongPromptEncoder.encode` computes, the web UI's eager way:
    one chunk per encoder call, prompts and negative prompts apart, all layers
    run and one picked, then emphasis and concatenation step by step.

    The baseline of the tests and benchmarks; not for use.
    """
    prompts, negatives = _prompt_lists(prompts, negative_prompts)
    encoded = [encoder.chunks(text) for text in [*prompts, *negatives]]
    count = max(map(len, encoded))
    transformer = encoder._transformer
    device = transformer.embeddings.token_embedding.weight.device
    keep = torch.tensor(kept_positions(count, encoder.layout), device=device)
    contexts = []
    for chunks in encoded:
        chunks = chunks.padded_to(count)
        pieces = []
        for ids, weights, found in zip(chunks.ids, chunks.weights, chunks.embeddings):
            with _token_vectors(transformer, encoder._vectors_at([found], device)):
                outputs = encoder.text_encoder(torch.tensor([ids], device=device), output_hidden_states=True)
            states = outputs.hidden_states
            normed = transformer.final_layer_norm(states[-encoder.clip_skip])
            weighted = normed * torch.tensor(weights, device=device, dtype=normed.dtype)[None, :, None]
            if encoder.emphasis == "ignore":
                weighted = normed
            elif encoder.emphasis == "original":
                weighted = weighted * (normed.mean() / weighted.mean())
            pieces.append(weighted)
        contexts.append(torch.cat(pieces, dim=1)[:, keep])
    return torch.cat(contexts[: len(prompts)]), torch.cat(contexts[len(prompts) :])
