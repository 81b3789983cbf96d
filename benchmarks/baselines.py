"""The eager ways nai_fast's fast paths are measured against, shared by the suites."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from conftest import BASELINE, FAST

from nai_fast.hypernetworks.processors import apply_hypernetworks, remove_hypernetworks
from nai_fast.hypernetworks.modules import Hypernetwork
from nai_fast.text.encoder import LongPromptEncoder, encode_chunk_by_chunk


class WebUIProcessor:
    """The web UI's way: each attention layer runs the modules on its k/v input, every step.

    Otherwise diffusers' ``AttnProcessor2_0`` for the layers of SD 1.x transformer blocks
    (3-D hidden states, no mask, no norms, no residual connection).
    """

    def __init__(self, hypernetworks: list[Hypernetwork]) -> None:
        self.hypernetworks = hypernetworks

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        context_k = context_v = context
        for hypernetwork in self.hypernetworks:  # the web UI's apply_hypernetworks
            pair = hypernetwork.modules_for(context.shape[-1])
            if pair is not None:
                context_k, context_v = pair[0](context_k), pair[1](context_v)
        query, key, value = attn.to_q(hidden_states), attn.to_k(context_k), attn.to_v(context_v)
        batch_size, inner_dim = query.shape[0], key.shape[-1]
        query, key, value = (
            tensor.view(batch_size, -1, attn.heads, inner_dim // attn.heads).transpose(1, 2)
            for tensor in (query, key, value)
        )
        hidden_states = F.scaled_dot_product_attention(query, key, value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, inner_dim).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](hidden_states))


class ChunkByChunkEncoder:
    """The web UI's text conditioning behind the encoder interface ``txt2img`` and the
    benchmarks take: ``encode`` returns what :meth:`LongPromptEncoder.encode` does, computed
    by :func:`~nai_fast.text.encoder.encode_chunk_by_chunk` (one text-encoder call per chunk, prompts
    and negative prompts apart, every layer run and one picked).

    ``encoder`` supplies the tokenizer, text encoder and options (chunks, syntax, emphasis).
    """

    def __init__(self, encoder: LongPromptEncoder) -> None:
        self.encoder = encoder

    def encode(
        self,
        prompts: str | Sequence[str],
        negative_prompts: str | Sequence[str] | None = None,
        *,
        clip_skip: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = self.encoder
        if clip_skip is not None and clip_skip != encoder.clip_skip:
            encoder = copy.copy(encoder)  # encode_chunk_by_chunk reads the encoder's own clip_skip
            encoder.clip_skip = clip_skip
        return encode_chunk_by_chunk(encoder, prompts, negative_prompts)


def install_processors(unet, stock_processors: dict, role: str, hypernetworks: Sequence[Hypernetwork], **options) -> None:
    """Put ``role``'s attention processors on ``unet``: nai_fast's (FAST; ``options`` go to
    ``apply_hypernetworks``; caches start empty), the web UI's (BASELINE), or for any other
    role the stock ``stock_processors`` (no hypernetwork)."""
    remove_hypernetworks(unet)
    if role == FAST:
        apply_hypernetworks(unet, list(hypernetworks), **options)
    elif role == BASELINE:
        unet.set_attn_processor(WebUIProcessor(list(hypernetworks)))
    else:
        unet.set_attn_processor(dict(stock_processors))
