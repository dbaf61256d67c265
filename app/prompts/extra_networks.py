"""A1111's extra-network tags, `<type:arg1:arg2>`: removed from the prompt text and returned per type."""

from __future__ import annotations

import re
from dataclasses import dataclass

_TAG = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class ExtraNetworkTag:
    kind: str  # "hypernet", "lora", ...
    args: tuple[str, ...]
    text: str  # the tag as written


def extract_extra_networks(prompt: str) -> tuple[str, list[ExtraNetworkTag]]:
    """(prompt without tags, the tags in order). Every `<word:...>` tag is removed, as A1111 does."""
    tags: list[ExtraNetworkTag] = []

    def take(match: re.Match) -> str:
        tags.append(ExtraNetworkTag(match.group(1), tuple(match.group(2).split(":")), match.group(0)))
        return ""

    return _TAG.sub(take, prompt), tags
