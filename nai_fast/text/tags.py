"""Network tags in prompts: the web UI's ``<hypernet:NAME:STRENGTH>`` and ``<lora:NAME:STRENGTH>``.

Pure Python. :func:`extract_network_tags` ``(prompt) -> (text, tags)`` removes every tag of the web
UI's extra-network syntax (``<word:...>``) from a prompt and returns the text left (what is encoded)
and the tags, in prompt order, as :class:`NetworkTag` ``(kind, name, strength)``:

- ``kind`` is ``hypernet`` or ``lora`` (:data:`NETWORK_KINDS`); any other kind (``<lyco:...>``,
  ``<hypernetwork:...>``) is a ValueError naming it, since leaving it as text or dropping it would
  silently change the image. ``strict=False`` (reading another tool's PNG) skips such tags instead.
- ``STRENGTH`` is optional (1) and must be one finite number: the web UI's further fields
  (``<lora:name:te:unet>``, ``te=``/``unet=``/``dyn=``) are refused.
- Each tag counts: a name given twice applies twice, as in the web UI (two LoRAs add up, two
  hypernetworks run one after the other).

The web UI keeps the tags in the prompt it saves, removes them before encoding, and reads them from
the positive prompt only; tags in a negative prompt are encoded as the text they are (so are they
here, with a warning from :func:`nai_fast.engine.generate.txt2img`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from numbers import Real
from typing import NamedTuple

__all__ = ["NETWORK_KINDS", "NetworkTag", "extract_network_tags", "format_strength", "network_strengths"]

NETWORK_KINDS = ("hypernet", "lora")
# The web UI's extra-network syntax (modules/extra_networks.py): <kind:arguments>.
_TAG = re.compile(r"<(\w+):([^>]+)>")


class NetworkTag(NamedTuple):
    """One ``<kind:name:strength>`` tag."""

    kind: str
    name: str
    strength: float = 1.0

    @property
    def text(self) -> str:
        """The tag as the web UI writes it: ``<lora:name:0.8>`` (strength always written)."""
        return f"<{self.kind}:{self.name}:{format_strength(self.strength)}>"


def format_strength(value: float) -> str:
    """1.0 -> ``"1"``, 0.8 -> ``"0.8"``: the shortest text that reads back the same."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def extract_network_tags(prompt: str, *, strict: bool = True) -> tuple[str, list[NetworkTag]]:
    """``prompt`` without its network tags, and the tags (see the module doc).

    Raises:
        ValueError: (``strict``) a tag of another kind, an empty name, or a strength that is
            not one finite number; the message quotes the tag.
    """
    tags: list[NetworkTag] = []

    def take(match: re.Match[str]) -> str:
        try:
            tags.append(_tag(match[1], match[2], match[0]))
        except ValueError:
            if strict:
                raise
        return ""

    return _TAG.sub(take, prompt), tags


def _tag(kind: str, arguments: str, text: str) -> NetworkTag:
    if kind not in NETWORK_KINDS:
        raise ValueError(
            f"prompt tag {text!r}: unknown kind {kind!r}; nai_fast applies <hypernet:NAME:STRENGTH> and "
            "<lora:NAME:STRENGTH> (LyCORIS, LoHa and LoKr files are not supported)"
        )
    name, *rest = arguments.split(":")
    name = name.strip()
    if not name:
        raise ValueError(f"prompt tag {text!r}: no name")
    if len(rest) > 1:
        raise ValueError(f"prompt tag {text!r}: one strength only (separate text-encoder/U-Net strengths are not supported)")
    if not rest:
        return NetworkTag(kind, name)
    try:
        strength = float(rest[0])
    except ValueError:
        raise ValueError(f"prompt tag {text!r}: the strength must be a number, got {rest[0]!r}") from None
    if not math.isfinite(strength):
        raise ValueError(f"prompt tag {text!r}: the strength must be finite, got {rest[0]!r}")
    return NetworkTag(kind, name, strength)


def network_strengths(strengths: float | Sequence[float] | None, count: int, what: str) -> tuple[float, ...]:
    """One finite strength per network, from None (1 each), one number for all, or a sequence of
    ``count``; ``what`` names the networks in the error (``"LoRAs"``)."""
    if strengths is None:
        values = (1.0,) * count
    elif isinstance(strengths, Real):
        values = (float(strengths),) * count
    else:
        values = tuple(float(strength) for strength in strengths)
        if len(values) != count:
            raise ValueError(f"{len(values)} strengths given for {count} {what}")
    if not all(math.isfinite(value) for value in values):
        raise ValueError(f"strengths must be finite, got {list(values)}")
    return values
