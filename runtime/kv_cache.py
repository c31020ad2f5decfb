"""KV caches for the generation loop: where a session's past comes from and where its present goes.

Two kinds, chosen by the folder (`KVCache.empty`):

- `BoundKVCache`, for graphs whose attention writes the new positions into a past allocated at a
  fixed capacity (GroupQueryAttention, `past_present_share_buffer` in genai_config.json): one
  buffer per layer and K/V is bound through ORT's IO binding as both the past input and the present
  output, so no step allocates, copies or concatenates the cache. The buffers live where the session
  computes: host memory on the CPU provider, GPU memory on CUDA (ORT copies only the step's ids, mask
  and positions in and its logits out). When a step needs more positions than the buffers hold, they
  are regrown (to the larger of twice the capacity and what the step needs, capped at the context
  length) and what they hold is copied once.
- `GrowingKVCache`, for every other graph (standard-op attention: the present is the past with the
  new positions concatenated): the past is fed and the present returned as arrays.

Both keep the attention mask over the positions they hold ([batch, T] int64, 0 for left padding)
and forget positions with `truncate` (a chat turn that rewrites the end of the conversation).
"""

from __future__ import annotations

import numpy as np

from lowbit.errors import LowbitError
from lowbit.runtime.session import DecoderSession, run_stepwise, stepwise

BUFFER_DEVICES = {"cpu": "cpu", "cuda": "cuda"}  # provider -> the ORT device its bound KV buffers live on


class KVCache:
    """The cache of one batch across `forward` calls."""

    def __init__(self, session: DecoderSession, batch: int):
        self.session = session
        self.batch = batch
        self.mask = np.zeros((batch, 0), np.int64)

    @staticmethod
    def empty(session: DecoderSession, batch: int, capacity: int = 0) -> "KVCache":
        """An empty cache for `batch` rows; `capacity`: the positions to preallocate where the graph allows it.
        Bound buffers sit in host memory on the CPU provider and in GPU memory on CUDA (host buffers bound to a
        GPU session would be copied to the device and back, and the node would no longer write into the buffer it
        reads); TensorRT keeps the growing cache."""
        if session.shares_kv_buffer and session.provider in BUFFER_DEVICES:
            return BoundKVCache(session, batch, capacity, BUFFER_DEVICES[session.provider])
        return GrowingKVCache(session, batch)

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def reserve(self, length: int) -> None:
        """Make room for `length` positions in all (a no-op where the cache grows by itself)."""

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on."""
        self.mask = self.mask[:, :length]

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                logits_to_keep: int = 0) -> np.ndarray:
        """Logits [B, S or logits_to_keep, V] of the new positions `input_ids` [B, S]; `attention_mask`
        [B, length + S] covers the cached positions and the new ones. The cache then holds all of them."""
        batch, seq = input_ids.shape
        if attention_mask.shape != (self.batch, self.length + seq) or batch != self.batch:
            raise LowbitError(f"attention_mask {attention_mask.shape} does not cover the {self.length} cached and "
                              f"{seq} new positions of a batch of {self.batch}")
        if run_stepwise(input_ids, attention_mask):
            return stepwise(self.forward, input_ids, attention_mask, position_ids, logits_to_keep)
        logits = self._run(input_ids, attention_mask, position_ids, logits_to_keep)
        self.mask = attention_mask
        return logits

    def _run(self, input_ids, attention_mask, position_ids, logits_to_keep: int) -> np.ndarray:
        raise NotImplementedError


class GrowingKVCache(KVCache):
    """Past and present as arrays: each step returns a longer present (standard-op attention)."""

    def __init__(self, session: DecoderSession, batch: int):
        super().__init__(session, batch)
        self.past = session.empty_past(batch)

    def truncate(self, length: int) -> None:
        super().truncate(length)
        self.past = {name: value[:, :, :length] for name, value in self.past.items()}

    def _run(self, input_ids, attention_mask, position_ids, logits_to_keep: int) -> np.ndarray:
        logits, self.past = self.session.forward(input_ids, attention_mask, position_ids, self.past, logits_to_keep,
                                                 prompts=True)
        return logits


class BoundKVCache(KVCache):
    """One preallocated buffer per layer and K/V, bound as past and present (IO binding). `device`: the ORT
    device the buffers live on ("cpu": host arrays ORT reads and writes in place; "cuda": GPU memory)."""

    def __init__(self, session: DecoderSession, batch: int, capacity: int = 0, device: str = "cpu"):
        super().__init__(session, batch)
        self.device = device
        self.bindings: dict[int, object] = {}  # id(ORT session) -> its IO binding, all over the same buffers
        self.buffers: dict[str, object] = {}  # past input name -> OrtValue [B, kv_heads, capacity, head_dim]
        self._host: dict[str, np.ndarray] = {}  # on the CPU: the arrays those OrtValues are views of
        self._allocate(max(capacity, 1))

    @property
    def capacity(self) -> int:
        return next(iter(self.buffers.values())).shape()[2]

    def reserve(self, length: int) -> None:
        if length > self.session.context_length:
            raise LowbitError(f"{length} positions exceed the model's context length ({self.session.context_length})")
        if length > self.capacity:
            self._allocate(min(self.session.context_length, max(length, 2 * self.capacity)))

    def _allocate(self, capacity: int) -> None:
        import onnxruntime as ort

        s = self.session
        shape = (self.batch, s.num_kv_heads, capacity, s.head_dim)
        held = self.length
        for past_name, _ in s.kv_names():
            host = np.zeros(shape, s.kv_dtype)
            if past_name in self.buffers and held:
                host[:, :, :held] = self.buffers[past_name].numpy()[:, :, :held]  # from the device: a copy
            if self.device == "cpu":
                self._host[past_name] = host
                self.buffers[past_name] = ort.OrtValue.ortvalue_from_numpy(host)  # the array's own memory
            else:
                self.buffers[past_name] = ort.OrtValue.ortvalue_from_numpy(host, self.device, 0)
        for binding in self.bindings.values():
            self._bind_buffers(binding)

    def _bind_buffers(self, binding) -> None:
        for past_name, present_name in self.session.kv_names():
            binding.bind_ortvalue_input(past_name, self.buffers[past_name])
            binding.bind_ortvalue_output(present_name, self.buffers[past_name])

    def _binding(self, session):
        if id(session) not in self.bindings:
            self.bindings[id(session)] = session.io_binding()
            self._bind_buffers(self.bindings[id(session)])
        return self.bindings[id(session)]

    def _run(self, input_ids, attention_mask, position_ids, logits_to_keep: int) -> np.ndarray:
        import onnxruntime as ort

        self.reserve(attention_mask.shape[1])
        session = self.session.ort_session(input_ids.shape[1])
        binding = self._binding(session)
        feeds = self.session.feeds(input_ids, attention_mask, position_ids, logits_to_keep)
        for name, value in feeds.items():  # bind_cpu_input would refuse `logits_to_keep` (a graph input with a default)
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value))
        seq = input_ids.shape[1]
        rows = min(logits_to_keep, seq) if logits_to_keep and self.session.has_logits_to_keep else seq
        # logits into an array of their own (reading them back through get_outputs() would wrap every bound output)
        logits = np.empty((self.batch, rows, self.session.vocab_size), self.session.logits_dtype)
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        session.run_with_iobinding(binding)
        return self.session.keep_last(logits, logits_to_keep)
