"""Multi-turn chat over one KV cache: each turn feeds only the tokens the cache does not hold yet."""

from __future__ import annotations

from typing import Iterator

from lowbit.runtime.generate import SamplingConfig, TextStream, stream_ids
from lowbit.runtime.kv_cache import KVCache


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Chat:
    """A conversation with a `Model`. Every turn renders the whole conversation with the folder's chat
    template, keeps the cached positions whose tokens are unchanged, and feeds the rest."""

    def __init__(self, model, system: str | None = None, **sampling):
        self.model = model
        self.sampling = sampling
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.cache = KVCache.empty(model.session, 1)
        self.cached_ids: list[int] = []  # the tokens whose keys and values the cache holds
        self.reused_tokens = 0  # of the last turn's prompt, how many came from the cache

    def prompt_ids(self) -> list[int]:
        text = self.model.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True)
        return self.model.tokenizer.encode(text, add_special_tokens=False)

    def send(self, user_text: str, max_new_tokens: int = 256) -> Iterator[str]:
        """Add a user turn and yield the reply's text as it is generated."""
        self.messages.append({"role": "user", "content": user_text})
        ids = self.prompt_ids()
        keep = min(common_prefix(self.cached_ids, ids), len(ids) - 1)  # at least one token to feed
        self.cache.truncate(keep)
        self.reused_tokens = keep
        eos = self.model.eos_ids
        text = TextStream(self.model.tokenizer, ids[keep:])
        reply_ids: list[int] = []
        reply = ""
        config = SamplingConfig(max_new_tokens, **self.sampling)
        for tokens in stream_ids(self.model.session, [ids[keep:]], config, eos, self.model.pad_id,
                                 self.cache):
            token = int(tokens[0])
            reply_ids.append(token)
            if token in eos:
                break
            piece = text.push(token)
            reply += piece
            if piece:
                yield piece
        tail = text.flush()
        reply += tail
        if tail:
            yield tail
        self.cached_ids = ids + reply_ids[:-1]  # the last token was sampled but never fed
        self.messages.append({"role": "assistant", "content": reply})
