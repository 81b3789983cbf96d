"""Training captions as NovelAI trained on them: tags shuffled, prompt lengths varied, some dropped.

A caption is a comma-separated tag list (``"red circle, blue background, top left"``).
For each image and epoch, :class:`CaptionAugmenter` draws, from a generator seeded by
``(seed, epoch, item)`` (so a resumed run sees the same captions):

1. **Caption dropout**: with probability ``dropout`` the caption becomes ``""``, which
   trains the unconditional prediction classifier-free guidance needs.
2. **Tag shuffle**: the tags after the first ``keep_tokens`` are permuted (the kept ones,
   e.g. a character or artist tag, stay in front, in order).
3. **Length variation**: a token budget is drawn uniformly from
   ``[min_tokens, max_tokens]`` (default 50..225: from under one 75-token chunk to the
   3-chunk limit), and trailing tags are dropped until the caption's token count fits
   the budget. A caption already within the budget is kept whole; at least
   ``max(keep_tokens, 1)`` tags always stay. Long tag lists thus train at every length
   from one chunk to three, as NovelAI's did, and never exceed the limit (so nothing is
   silently cut by the text encoder); short ones are untouched.

Token counts add up tag by tag: CLIP's tokenizer splits words and punctuation before
BPE, so ``"a, b"`` has ``len(a) + 1 + len(b)`` tokens. Each tag is tokenized once and
remembered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["CaptionAugmenter", "CaptionPolicy", "split_tags"]

_STREAM = 0x63617074  # "capt": keeps these draws apart from the crop draws seeded by (seed, epoch, item)


@dataclass(frozen=True)
class CaptionPolicy:
    """How captions are varied; see the module doc."""

    keep_tokens: int = 0  # leading tags never shuffled or dropped
    shuffle: bool = True
    dropout: float = 0.0  # probability of an empty caption
    min_tokens: int = 50
    max_tokens: int = 225  # 3 chunks of 75

    def __post_init__(self) -> None:
        if self.keep_tokens < 0:
            raise ValueError(f"keep_tokens must be >= 0, got {self.keep_tokens}")
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"caption dropout must lie in [0, 1], got {self.dropout}")
        if not 1 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"need 1 <= min_tokens <= max_tokens, got {self.min_tokens} and {self.max_tokens}")


def split_tags(caption: str) -> list[str]:
    """The non-empty, stripped comma-separated tags of a caption."""
    return [tag for tag in (part.strip() for part in caption.split(",")) if tag]


class CaptionAugmenter:
    """``augmenter(caption, epoch, item) -> caption`` under a :class:`CaptionPolicy`.

    ``tokenize(text) -> list[int]`` gives token ids without BOS/EOS.
    """

    def __init__(self, policy: CaptionPolicy, tokenize: Callable[[str], list[int]], seed: int = 0) -> None:
        self.policy = policy
        self.seed = int(seed)
        self._tokenize = tokenize
        self._lengths: dict[str, int] = {}
        self._comma = len(tokenize(","))

    def __call__(self, caption: str, epoch: int, item: int) -> str:
        policy = self.policy
        rng = np.random.default_rng([self.seed, int(epoch), int(item), _STREAM])
        # Every draw is made whatever the outcome, so one caption's draws never depend on another's.
        dropped = rng.random() < policy.dropout
        tags = split_tags(caption)
        kept, rest = tags[: policy.keep_tokens], tags[policy.keep_tokens :]
        order = rng.permutation(len(rest)) if policy.shuffle else np.arange(len(rest))
        budget = int(rng.integers(policy.min_tokens, policy.max_tokens + 1))
        if dropped:
            return ""
        tags = kept + [rest[i] for i in order]
        return ", ".join(tags[: self._tags_within(tags, budget, minimum=max(len(kept), 1))])

    def token_count(self, tags: list[str]) -> int:
        """Tokens of ``", ".join(tags)``."""
        return sum(map(self._length, tags)) + self._comma * max(len(tags) - 1, 0)

    def _tags_within(self, tags: list[str], budget: int, minimum: int) -> int:
        """The most leading tags whose joined token count fits ``budget`` (at least ``minimum``)."""
        total = 0
        for count, tag in enumerate(tags):
            total += self._length(tag) + (self._comma if count else 0)
            if total > budget:
                return max(count, minimum)
        return len(tags)

    def _length(self, tag: str) -> int:
        length = self._lengths.get(tag)
        if length is None:
            length = self._lengths[tag] = len(self._tokenize(tag))
        return length
