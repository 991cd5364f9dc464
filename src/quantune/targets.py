"""The one module-name matcher for LoRA targets, quantization targets and PTQ keep lists (peft's rules).

A string is a regex matched against the full dotted module name (re.fullmatch); a list matches a name exactly or
as a dotted suffix ("to_q" matches "...attn1.to_q"). `select` applies targets and exclusions together.
"""

from __future__ import annotations

import re


def matches(spec: str | list[str], name: str) -> bool:
    """True when `name` is matched by `spec` (a regex, or a list of names / dotted suffixes)."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def select(name: str, targets: str | list[str] | None, exclude: str | list[str] | None = None) -> bool:
    """Targets after exclusions: excluded names never match; `targets = None` matches every name."""
    if exclude is not None and matches(exclude, name):
        return False
    return targets is None or matches(targets, name)


def listed(patterns: list[str], name: str) -> bool:
    """Keep lists (PTQ's --keep-fp, a family's 8-bit layers): each entry a full name, a dotted suffix (conv_out)
    or a regex matching the whole name; an entry that is not a valid regex is only a name."""
    for p in patterns:
        if matches([p], name):
            return True
        try:
            if re.fullmatch(p, name):
                return True
        except re.error:
            pass
    return False


def pattern_value(patterns: dict, name: str, default):
    """peft's rank_pattern / alpha_pattern rule: the value of the first key that ends `name` as a dotted suffix
    (re.match(rf"(.*\\.)?({key})$", name)), else `default`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default
