"""Step models over a package's onnxruntime sessions (the protocol is in runtime/steps.py).

Two decoder layouts (runtime/contract.py, FORMAT.md section 7):

* "concat" (:class:`ConcatSteps`): the traced graph takes left-padded rows with
  ``attention_mask`` and ``position_ids``; each step returns a new ``present.*`` cache (the past
  concatenated with the new tokens), fed back as the next step's ``past_key_values.*``.
* "shared" (:class:`SharedSteps`): the built graph keeps each layer's cache in ONE preallocated
  buffer (N, Hkv, C, Dh) bound as both past input and present output, so onnxruntime's
  GroupQueryAttention writes each new token's K/V in place; rows are right-padded and
  ``sequence_lengths`` says how long each is. The graph also computes the greedy choice.

Both run every step through I/O binding: inputs and the cache are OrtValues on the session's
device, and only the logits (and the greedy choice) come back to the host. On CPU this is the
code path CUDA uses; only the device name differs.

Encoder-decoder packages: ``prefill`` takes the sources; the encoder and cross-attention graphs
run once per prefill and their K/V are bound for every step (gathered only when a row's source
changes, never on beam search's reorders within a prompt). The decoder rows start from
``decoder_start``.

Shape letters: N rows, T tokens in a call, P cached columns, C buffer capacity, S source tokens,
Hkv key/value heads, Dh head size, V vocabulary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import onnxruntime as ort

from .contract import (
    ATTENTION_MASK,
    CROSS_ATTENTION,
    DECODER,
    ENCODER,
    ENCODER_ATTENTION_MASK,
    ENCODER_HIDDEN_STATES,
    INPUT_IDS,
    LAST_HIDDEN_STATE,
    LOGITS,
    NEXT_TOKEN,
    NEXT_TOKEN_LOGPROB,
    POSITION_IDS,
    SEQUENCE_LENGTHS,
    past_name_for,
)
from .errors import InputError
from .steps import AlignedSteps, StepModel, StepResult, as_tokens, left_pad, prefill_rows, rewind_counts

if TYPE_CHECKING:  # the Model type only; model.py imports this module
    from .model import Model


def aligned_zeros(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Zeros whose data starts on a 64-byte boundary (a cache line; numpy's large arrays start
    16 bytes past one). onnxruntime's kernels read the shared KV buffers in place: aligned,
    the batch-8 decode step is about 4% faster (int4: 3.82 vs 3.98 ms)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(nbytes + 64, dtype=np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _pad_axis(array: np.ndarray, axis: int, before: int) -> np.ndarray:
    """``array`` with ``before`` zero entries inserted at the start of ``axis``."""
    if before == 0:
        return array
    widths = [(0, 0)] * array.ndim
    widths[axis] = (before, 0)
    return np.pad(array, widths)


class _Encoded:
    """The encoder side of an encoder-decoder's rows: cross-attention K/V (N, Hkv, S, Dh) and
    the encoder mask (N, S) as OrtValues, and which source each row reads."""

    def __init__(self, values: dict[str, ort.OrtValue], sources: np.ndarray):
        self.values, self.sources = values, sources

    @staticmethod
    def of(model: "Model", prompts: list[list[int]], first_source: int) -> "_Encoded":
        """Encoder over the left-padded sources, then cross_attention once."""
        device = model.device
        batch = left_pad(prompts, max(model.manifest.special("pad"), 0))
        hidden = model.sessions[ENCODER].run(
            [LAST_HIDDEN_STATE], {INPUT_IDS: batch.input_ids, ATTENTION_MASK: batch.attention_mask}
        )[0]  # (B, S, D)
        cross = model.sessions[CROSS_ATTENTION]
        names = [o.name for o in cross.get_outputs()]
        binding = cross.io_binding()
        binding.bind_ortvalue_input(ENCODER_HIDDEN_STATES, ort.OrtValue.ortvalue_from_numpy(hidden, device, 0))
        for name in names:
            binding.bind_output(name, device)
        cross.run_with_iobinding(binding)
        values = {past_name_for(n): v for n, v in zip(names, binding.get_outputs())}  # (B, Hkv, S, Dh)
        values[ENCODER_ATTENTION_MASK] = ort.OrtValue.ortvalue_from_numpy(batch.attention_mask, device, 0)
        return _Encoded(values, first_source + np.arange(len(prompts)))

    def take(self, rows: np.ndarray, device: str) -> "_Encoded":
        sources = self.sources[rows]
        if np.array_equal(sources, self.sources):  # beam reorders within a prompt: nothing moves
            return _Encoded(self.values, sources)
        return _Encoded({name: _value(v.numpy()[rows], device) for name, v in self.values.items()}, sources)

    def join(self, other: "_Encoded", device: str) -> "_Encoded":
        """Rows of self then other; the shorter sources left-padded (masked) to the longer."""
        s_self = self.values[ENCODER_ATTENTION_MASK].shape()[1]
        s_other = other.values[ENCODER_ATTENTION_MASK].shape()[1]
        width = max(s_self, s_other)
        values = {}
        for name, value in self.values.items():
            axis = 1 if name == ENCODER_ATTENTION_MASK else 2  # the mask (N, S); K/V (N, Hkv, S, Dh)
            a = _pad_axis(value.numpy(), axis, width - s_self)
            b = _pad_axis(other.values[name].numpy(), axis, width - s_other)
            values[name] = _value(np.concatenate([a, b]), device)
        return _Encoded(values, np.concatenate([self.sources, other.sources]))


def _value(array: np.ndarray, device: str) -> ort.OrtValue:
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device, 0)


class _Sources:
    """What the two step models share: the decoder prompt of each prompt, and the encoder side."""

    def __init__(self, model: "Model"):
        self.model = model
        self.seq2seq = model.arch == "encoder-decoder"
        self.start = [model.manifest.special("decoder_start")] if self.seq2seq else None
        self.issued = 0  # sources encoded so far: a new source gets a new number

    def decoder_prompts(self, prompts: list[list[int]]) -> tuple[list[list[int]], _Encoded | None]:
        if not self.seq2seq:
            return prompts, None
        encoded = _Encoded.of(self.model, prompts, self.issued)
        self.issued += len(prompts)
        return [list(self.start) for _ in prompts], encoded


# ------------------------------------------------------------------------------------------
# "concat" layout: the traced graph
# ------------------------------------------------------------------------------------------
class _ConcatCache:
    def __init__(self, past: dict[str, ort.OrtValue], encoded: _Encoded | None):
        self.past, self.encoded = past, encoded  # past: {past_key_values.*: (N, Hkv, P, Dh)}


class ConcatSteps(AlignedSteps):
    """The step model over a "concat" layout decoder graph (left-padded rows, a new cache per step)."""

    def __init__(self, model: "Model"):
        super().__init__()
        self.model, self.device = model, model.device
        self.session = model.sessions[DECODER]
        self.vocab_size = model.dims.vocab_size
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._past_names = [past for _, past in model._self_cache]
        self._sources = _Sources(model)
        self.bidirectional_block = model.arch == "prefix-lm"  # a call's tokens are one bidirectional block

    def sequence_start(self, prompt: Sequence[int]) -> list[int]:
        return list(self._sources.start) if self._sources.seq2seq else list(prompt)

    def _start(self, prompts: list[list[int]]) -> tuple[_ConcatCache, list[list[int]]]:
        starts, encoded = self._sources.decoder_prompts(prompts)
        dims = self.model.dims
        empty = np.zeros((len(prompts), dims.n_kv_heads, 0, dims.d_head), dtype=self.model.float_dtype)  # P = 0
        return _ConcatCache({name: _value(empty, self.device) for name in self._past_names}, encoded), starts

    def _forward(self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, cache: _ConcatCache,
                 last_only: bool) -> tuple[np.ndarray, _ConcatCache]:
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(INPUT_IDS, _value(ids, self.device))
        binding.bind_ortvalue_input(POSITION_IDS, _value(positions, self.device))
        binding.bind_ortvalue_input(ATTENTION_MASK, _value(mask, self.device))
        for name, value in cache.past.items():
            binding.bind_ortvalue_input(name, value)
        if cache.encoded is not None:
            for name, value in cache.encoded.values.items():
                binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits = outputs[0].numpy()  # (N, T, V)
        past = {past_name_for(name): value for name, value in zip(self.output_names[1:], outputs[1:])}
        return (logits[:, -1] if last_only else logits), _ConcatCache(past, cache.encoded)

    def _trim(self, cache: _ConcatCache, width: int) -> _ConcatCache:
        past = {name: _value(value.numpy()[:, :, :width], self.device) for name, value in cache.past.items()}
        return _ConcatCache(past, cache.encoded)

    def _gather(self, cache: _ConcatCache, rows: np.ndarray) -> _ConcatCache:
        past = {name: _value(value.numpy()[rows], self.device) for name, value in cache.past.items()}
        encoded = None if cache.encoded is None else cache.encoded.take(rows, self.device)
        return _ConcatCache(past, encoded)

    def _join(self, a: _ConcatCache, b: _ConcatCache, pad_a: int, pad_b: int) -> _ConcatCache:
        past = {
            name: _value(np.concatenate([_pad_axis(value.numpy(), 2, pad_a), _pad_axis(b.past[name].numpy(), 2, pad_b)]),
                         self.device)
            for name, value in a.past.items()
        }
        encoded = None if a.encoded is None else a.encoded.join(b.encoded, self.device)
        return _ConcatCache(past, encoded)


# ------------------------------------------------------------------------------------------
# "shared" layout: the built graph
# ------------------------------------------------------------------------------------------
class _SharedRows:
    """The state of a batch over a "shared" layout decoder: buffers, lengths, the binding."""

    def __init__(self, rows: int, capacity: int):
        self.rows, self.capacity = rows, capacity
        self.buffers: dict[str, ort.OrtValue] = {}  # past name -> (N, Hkv, C, Dh), also the present
        self.lengths = np.zeros(rows, dtype=np.int64)  # tokens of each row in the buffers
        self.encoded: _Encoded | None = None
        self.binding: Any = None  # the I/O binding, rebuilt when rows or buffers change
        self.logits: ort.OrtValue | None = None
        self.logits_host: np.ndarray | None = None  # CPU: the array the logits OrtValue writes into
        self.ids: ort.OrtValue | None = None  # bound input_ids and sequence_lengths, updated in place
        self.lengths_value: ort.OrtValue | None = None
        self.choice: list[tuple[np.ndarray | None, ort.OrtValue]] = []  # next_token, next_token_logprob


class SharedSteps(StepModel):
    """The step model over a "shared" layout decoder graph.

    One I/O binding serves every step of a batch (only the new tokens and the row lengths are
    written per step); it is rebuilt when rows are selected, admitted or the buffers grow.
    ``capacity``: tokens per row the buffers hold at first (prompt + new tokens; grown on need).
    """

    def __init__(self, model: "Model", *, capacity: int):
        self.model, self.device = model, model.device
        self.session = model.sessions[DECODER]
        self.vocab_size = model.dims.vocab_size
        self.capacity = max(1, capacity)
        self._self_past = [past for _, past in model._self_cache]
        self._present_of = {past: present for present, past in model._self_cache}
        self._sources = _Sources(model)
        self._state = _SharedRows(0, self.capacity)

    @property
    def rows(self) -> int:
        return self._state.rows

    def sequence_start(self, prompt: Sequence[int]) -> list[int]:
        return list(self._sources.start) if self._sources.seq2seq else list(prompt)

    def _empty(self, rows: int, capacity: int) -> ort.OrtValue:
        dims = self.model.dims
        shape = (rows, dims.n_kv_heads, capacity, dims.d_head)  # (N, Hkv, C, Dh)
        return ort.OrtValue.ortvalue_from_numpy(aligned_zeros(shape, self.model.float_dtype), self.device, 0)

    # the protocol -------------------------------------------------------------------------
    def prefill(self, prompts: Sequence[Sequence[int]]) -> StepResult:
        starts, encoded = self._sources.decoder_prompts(prefill_rows(prompts, self.vocab_size))
        longest = max(len(s) for s in starts)
        new = _SharedRows(len(starts), max(self.capacity, longest))
        new.buffers = {past: self._empty(new.rows, new.capacity) for past in self._self_past}
        new.encoded = encoded
        ids = np.zeros((new.rows, longest), dtype=np.int64)  # (B, T) right-padded
        for b, row in enumerate(starts):
            ids[b, :len(row)] = row
        result = self._run(new, ids, np.array([len(s) for s in starts], dtype=np.int64))
        if not self.rows:
            self._state = new
            return result
        result = StepResult(result.logits.copy(), result.next_token.copy(), result.next_logprob.copy())
        self._state = self._join(self._state, new)
        return result

    def advance(self, tokens: np.ndarray) -> StepResult:
        ids = as_tokens(tokens, self.rows, self.vocab_size)  # (N, K)
        state = self._state
        if ids.shape[1] == 1:
            return self._run(state, ids, state.lengths + 1)
        # K tokens: K one-token steps (the graph projects only each row's last token)
        steps = []
        for j in range(ids.shape[1]):
            r = self._run(state, np.ascontiguousarray(ids[:, j:j + 1]), state.lengths + 1)
            steps.append((r.logits.copy(), r.next_token.copy(), r.next_logprob.copy()))
        logits, token, logprob = (np.stack(parts, axis=1) for parts in zip(*steps))  # (N, K, ...)
        return StepResult(logits, token, logprob)

    def rewind(self, counts: Sequence[int]) -> None:
        """Shorter ``sequence_lengths``: the next step writes over the forgotten tokens' K/V
        (GroupQueryAttention reads each row only up to its length), nothing is copied."""
        counts = rewind_counts(counts, self.rows)
        if (counts > self._state.lengths - 1).any():
            raise ValueError(f"rewind({counts.tolist()}) would drop whole rows of lengths {self._state.lengths.tolist()}")
        self._state.lengths = self._state.lengths - counts

    def select(self, rows: np.ndarray) -> None:
        """Gather rows of the buffers (only their filled part) and of the encoder side."""
        rows = np.asarray(rows, dtype=np.int64)
        old = self._state
        out = _SharedRows(len(rows), old.capacity)
        used = int(old.lengths.max()) if old.lengths.size else 0
        for name, value in old.buffers.items():
            gathered = aligned_zeros((len(rows), *value.shape()[1:]), self.model.float_dtype)
            gathered[:, :, :used] = value.numpy()[rows, :, :used]
            out.buffers[name] = ort.OrtValue.ortvalue_from_numpy(gathered, self.device, 0)
        out.lengths = old.lengths[rows]
        out.encoded = None if old.encoded is None else old.encoded.take(rows, self.device)
        self._state = out

    # internals ----------------------------------------------------------------------------
    def _join(self, a: _SharedRows, b: _SharedRows) -> _SharedRows:
        """Rows of a then b in buffers of the larger capacity."""
        out = _SharedRows(a.rows + b.rows, max(a.capacity, b.capacity))
        for name in self._self_past:
            joined = aligned_zeros((out.rows, self.model.dims.n_kv_heads, out.capacity, self.model.dims.d_head),
                                   self.model.float_dtype)
            joined[:a.rows, :, :a.capacity] = a.buffers[name].numpy()
            joined[a.rows:, :, :b.capacity] = b.buffers[name].numpy()
            out.buffers[name] = ort.OrtValue.ortvalue_from_numpy(joined, self.device, 0)
        out.lengths = np.concatenate([a.lengths, b.lengths])
        out.encoded = None if a.encoded is None else a.encoded.join(b.encoded, self.device)
        return out

    def _bind(self, state: _SharedRows) -> None:
        """One binding for the batch: buffers in and out (the same OrtValues), the encoder
        entries, and preallocated outputs; steps rebind only input_ids and lengths."""
        binding = self.session.io_binding()
        encoder = state.encoded.values.items() if state.encoded is not None else ()
        for name, value in (*state.buffers.items(), *encoder):
            binding.bind_ortvalue_input(name, value)
        for past, value in state.buffers.items():
            binding.bind_ortvalue_output(self._present_of[past], value)  # the same memory: updated in place
        shape = (state.rows, self.vocab_size)  # (N, V)
        if self.device == "cpu":  # onnxruntime writes the logits straight into this array: no copy per step
            state.logits_host = aligned_zeros(shape, self.model.float_dtype)
            state.logits = ort.OrtValue.ortvalue_from_numpy(state.logits_host, self.device, 0)
        else:  # on the device; copied to the host when the search reads them
            state.logits_host = None
            state.logits = ort.OrtValue.ortvalue_from_shape_and_type(shape, self.model.float_dtype, self.device, 0)
        binding.bind_ortvalue_output(LOGITS, state.logits)
        # The graph's greedy choice, (N,) each: written into host arrays on CPU as the logits are.
        state.choice = []
        for name, dtype in ((NEXT_TOKEN, np.int64), (NEXT_TOKEN_LOGPROB, np.float32)):
            if self.device == "cpu":
                host = np.empty((state.rows,), dtype=dtype)
                value = ort.OrtValue.ortvalue_from_numpy(host, self.device, 0)
            else:
                host, value = None, ort.OrtValue.ortvalue_from_shape_and_type((state.rows,), dtype, self.device, 0)
            binding.bind_ortvalue_output(name, value)
            state.choice.append((host, value))
        state.binding, state.ids = binding, None  # input_ids / sequence_lengths are bound by the next step

    def _grow(self, state: _SharedRows, needed: int) -> None:
        """Longer buffers when a row would pass the capacity (a caller past the hinted length)."""
        limit = self.model.manifest.max_seq_len
        capacity = min(max(needed, 2 * state.capacity), limit)
        if needed > capacity:
            raise InputError(f"rows of {needed} tokens exceed this model's max_seq_len ({limit})", code="E_TOO_LONG")
        for name, value in state.buffers.items():
            grown = aligned_zeros((state.rows, self.model.dims.n_kv_heads, capacity, self.model.dims.d_head),
                                  self.model.float_dtype)
            grown[:, :, :state.capacity] = value.numpy()
            state.buffers[name] = ort.OrtValue.ortvalue_from_numpy(grown, self.device, 0)
        state.capacity, state.binding = capacity, None

    def _run(self, state: _SharedRows, ids: np.ndarray, lengths: np.ndarray) -> StepResult:
        """Run ids (N, T) so that row b holds lengths[b] tokens afterwards."""
        if int(lengths.max()) > state.capacity:
            self._grow(state, int(lengths.max()))
        if state.binding is None:
            self._bind(state)
        if state.ids is None or state.ids.shape() != list(ids.shape):  # the prompt, then (N, 1) for every step
            state.ids = ort.OrtValue.ortvalue_from_numpy(ids.copy(), self.device, 0)
            state.lengths_value = ort.OrtValue.ortvalue_from_numpy(lengths.copy(), self.device, 0)
            state.binding.bind_ortvalue_input(INPUT_IDS, state.ids)
            state.binding.bind_ortvalue_input(SEQUENCE_LENGTHS, state.lengths_value)
        else:  # same shapes: write the values into the bound tensors
            state.ids.update_inplace(ids)
            state.lengths_value.update_inplace(lengths)
        self.session.run_with_iobinding(state.binding)
        state.lengths = lengths
        # The arrays are the step's output buffers (valid until the next step, the protocol's rule).
        token, logprob = (host if host is not None else value.numpy() for host, value in state.choice)
        if state.logits_host is not None:
            return StepResult(state.logits_host, token, logprob)
        return StepResult(state.logits.numpy, token, logprob)  # on the device: copied only if read


__all__ = ["aligned_zeros", "ConcatSteps", "SharedSteps"]
