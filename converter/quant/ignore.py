"""`--ignore PATTERN`: modules kept in float whatever the scheme says.

A pattern is a shell glob (`lm_head`, `layers.*.mlp.down_proj`) or, after `re:`, a regular
expression matched at the start of the name as llm-compressor and compressed-tensors do
(`re:.*down_proj$`). It is tried on each weight node's module name in our graph
(`layers.3.attn.qkv_proj`) and on the transformers module names that node computes
(`model.layers.3.self_attn.q_proj`, `model.layers.3.self_attn.k_proj`, ...; recorded by the
decoder as `lowbit.hf_modules`). A fused node is ignored when the pattern matches its own name or
every one of its transformers modules; matching only some of them is an error, as is a pattern
that matches nothing (a typo must not silently quantize what the user meant to keep).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class IgnorePattern:
    text: str

    def __post_init__(self):
        if not self.text or not self.text.strip():
            raise LowbitError("--ignore: empty pattern")
        if self.text.startswith("re:"):
            try:
                re.compile(self.text[3:])
            except re.error as e:
                raise LowbitError(f"--ignore {self.text}: not a regular expression ({e})") from None

    def matches(self, name: str) -> bool:
        if self.text.startswith("re:"):
            return re.match(self.text[3:], name) is not None
        return fnmatch.fnmatchcase(name, self.text)


@dataclass(frozen=True)
class WeightModule:
    """A weight node of our graph: its module name and the transformers modules it computes."""

    name: str
    hf_modules: tuple[str, ...]


def ignored_modules(modules: list[WeightModule], patterns: tuple[str, ...] | list[str]) -> set[str]:
    """Names of the modules that `patterns` keep in float; LowbitError for a pattern that matches nothing
    or only part of a fused module."""
    ignored = set()
    for pattern in map(IgnorePattern, patterns):
        matched = False
        for module in modules:
            hits = [h for h in module.hf_modules if pattern.matches(h)]
            if pattern.matches(module.name) or (hits and len(hits) == len(module.hf_modules)):
                ignored.add(module.name)
                matched = True
            elif hits:
                rest = [h for h in module.hf_modules if h not in hits]
                raise LowbitError(
                    f"--ignore {pattern.text}: matches {', '.join(hits)} but not {', '.join(rest)}, which lowbit "
                    f"computes in the same node {module.name}; ignore all of them or none"
                )
        if not matched:
            example = next((m for m in modules if m.hf_modules and m.name != m.hf_modules[0]), None)
            hint = f" (names look like {example.hf_modules[0]} or {example.name})" if example else ""
            raise LowbitError(f"--ignore {pattern.text}: matches no weight module{hint}")
    return ignored
