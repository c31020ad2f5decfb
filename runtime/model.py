"""A converted folder opened for use: the object `lowbit.load()` returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from lowbit.errors import LowbitError
from lowbit.runtime.generate import (
    SamplingConfig, TextStream, eos_token_ids, generate_ids, pad_token_id, stream_ids,
)
from lowbit.runtime.kv_cache import KVCache
from lowbit.runtime.session import DecoderSession, create_session
from lowbit.runtime.tokenizer import Tokenizer, load_tokenizer


@dataclass
class Model:
    """An ONNX Runtime session over a `lowbit convert` folder and its tokenizer.

        model = lowbit.load("out/stories260K")
        model.generate("Once upon a time", max_new_tokens=40)       # the continuation, a str
        for piece in model.stream("Once upon a time"): print(piece, end="")
        model.perplexity(text, seq_len=256).perplexity
        model.bench(prompt_len=128, new_tokens=64).decode_tokens_per_s
    """

    session: DecoderSession
    tokenizer: Tokenizer

    @classmethod
    def load(cls, folder: str | Path, provider: str = "cpu", threads: int | None = None,
             prompt_session: bool = True) -> "Model":
        """`prompt_session`: see runtime/session.py create_session (float32 compute for long prompts)."""
        return cls(create_session(folder, provider, threads, prompt_session=prompt_session), load_tokenizer(folder))

    @property
    def folder(self) -> Path:
        return self.session.model_dir

    @property
    def eos_ids(self) -> set[int]:
        return eos_token_ids(self.tokenizer, self.folder)

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def generate(self, prompt: str | list[str], max_new_tokens: int = 64, **sampling) -> str | list[str]:
        """The continuation of each prompt (prompt text not included). `sampling`: do_sample, temperature,
        top_k, top_p, seed (see SamplingConfig); greedy by default. A list of prompts runs as one batch."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        encoded = [self.encode(p) for p in prompts]
        config = SamplingConfig(max_new_tokens, **sampling)
        new = generate_ids(self.session, encoded, config, self.eos_ids, self.pad_id)
        texts = [self._continuation(ids, tokens) for ids, tokens in zip(encoded, new)]
        return texts[0] if isinstance(prompt, str) else texts

    def _continuation(self, prompt_ids: list[int], new_ids: list[int]) -> str:
        stream = TextStream(self.tokenizer, prompt_ids)
        return stream.push(*new_ids) + stream.flush()

    def stream(self, prompt: str | list[int], max_new_tokens: int = 64, cache: KVCache | None = None,
               **sampling) -> Iterator[str]:
        """Yield the continuation's text piece by piece as tokens are generated (one prompt: text, or token ids
        used as they are). With `cache`, the prompt continues what the cache holds."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        text = TextStream(self.tokenizer, ids)
        for tokens in stream_ids(self.session, [ids], SamplingConfig(max_new_tokens, **sampling), self.eos_ids,
                                 self.pad_id, cache):
            piece = text.push(int(tokens[0]))
            if piece:
                yield piece
        tail = text.flush()
        if tail:
            yield tail

    def perplexity(self, text: str | None = None, *, path: str | Path | None = None, seq_len: int | None = None,
                   stride: int | None = None, max_tokens: int | None = None, progress=None,
                   reference: "Model | str | Path | None" = None):
        """Sliding-window perplexity of `text` (or the file at `path`): a PerplexityResult. With `reference` (a
        Model or a folder, e.g. the q0f32 conversion) also the mean KL divergence to its next-token distribution,
        its 99th percentile and the top-1 agreement, over the same scored positions."""
        from lowbit.runtime.evaluate import check_windows, perplexity, read_text_file

        if (text is None) == (path is None):
            raise LowbitError("give either text or path")
        if path is not None:
            text = read_text_file(path)
        seq_len = seq_len or min(2048, self.session.context_length)
        stride = stride or seq_len
        check_windows(2, seq_len, stride)  # before the text is tokenized
        if seq_len > self.session.context_length:
            raise LowbitError(f"seq_len {seq_len} exceeds the model's context length ({self.session.context_length})")
        ids = np.asarray(self.tokenizer.encode(text), np.int64)
        if max_tokens is not None:
            ids = ids[:max_tokens]
        if len(ids) < 2:
            raise LowbitError("the evaluation text has fewer than 2 tokens: nothing to score")
        ref_session = None
        if reference is not None:
            ref = reference if isinstance(reference, Model) else Model.load(reference)  # a folder: CPU
            self._check_reference(ref, text, ids, max_tokens, seq_len)
            ref_session = ref.session
        return perplexity(self.session, ids, seq_len, stride, progress, reference=ref_session)

    def _check_reference(self, ref: "Model", text: str, ids: np.ndarray, max_tokens: int | None, seq_len: int):
        """KL compares distributions token by token: the same vocabulary and the same tokens are needed."""
        if ref.session.vocab_size != self.session.vocab_size:
            raise LowbitError(f"{ref.folder}: a vocabulary of {ref.session.vocab_size} tokens, {self.folder} has "
                              f"{self.session.vocab_size}: KL needs the same vocabulary")
        if not np.array_equal(np.asarray(ref.tokenizer.encode(text), np.int64)[:max_tokens], ids):
            raise LowbitError(f"{ref.folder}: its tokenizer encodes the text differently from {self.folder}'s: "
                              "KL needs the same tokens")
        if seq_len > ref.session.context_length:
            raise LowbitError(f"{ref.folder}: seq_len {seq_len} exceeds the reference's context length "
                              f"({ref.session.context_length})")

    def bench(self, prompt_len: int = 128, new_tokens: int = 64, repeats: int = 3):
        """Prefill and decode tokens per second, peak RSS and model bytes: a BenchResult."""
        from lowbit.runtime.bench import benchmark

        return benchmark(self.session, prompt_len, new_tokens, repeats)
