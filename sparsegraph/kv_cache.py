"""A static, preallocated KV cache for Hugging Face causal LMs, and the module that decoding graphs are
traced from.

Why our own cache: ``torch.export`` captures a function of tensors. Hugging Face's default
``DynamicCache`` grows by concatenation (a new shape every step) and its ``StaticCache`` keeps its own
state (a running length) inside Python objects. Here the cache is one tensor *argument* of the traced
function, written in place, and the position to write at is an argument too, so one graph serves every
step and the caller owns all state:

    cache          [2·layers, batch, kv_heads, max_len, head_dim]   keys of layer i at 2i, values at 2i+1
    mask           [batch, max_len]  1 where a slot holds a real token (prompt or generated), 0 for left
                                     padding and for slots not written yet
    start          the slot the first new token is written to (a 0-d int64 tensor)
    position_ids   [batch, q]        each token's position in its own sequence (left padding excluded):
                                     what rotary or learned position embeddings read

A step writes the q new keys and values to slots ``start … start+q−1`` (``index_copy_`` into views of
``cache``: the exported graph keeps the in-place write, so nothing is copied) and attends over all
``max_len`` slots with the additive mask

    M[b, i, j] = 0    if j ≤ start + i and mask[b, j] = 1
               = −max otherwise            (exp underflows to exactly 0: masked slots add nothing)

built here, in the graph, and handed to the model as a ready 4-D mask (Hugging Face uses a 4-D mask
as given). Slots are sequence-aligned with left padding: row b's prompt ends at the same slot for every
row, exactly as ``model.generate`` lays a left-padded batch out, so greedy tokens are identical to it.

`CacheStep` wraps the model; `sparsegraph.generation` traces it twice (prompt length q ≥ 2: prefill;
q = 1: decode step) and re-roots the graphs so parameter paths, hence site ids and the plan's
fingerprint, are the model's own, not the wrapper's.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from sparsegraph.errors import InputError

ROOT = "lm"  # the attribute of `CacheStep` holding the model; stripped from the traced graph's paths


@dataclass(frozen=True)
class CacheShape:
    """What one cache slot holds for a model: layers, key/value heads and head size, dtype."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    max_positions: int | None  # the model's position limit (learned position tables), if it has one
    sliding_window: int | None  # the smallest sliding window of any layer, if some layer slides

    @classmethod
    def of(cls, model: torch.nn.Module) -> CacheShape:
        """Read from a Hugging Face config (``num_key_value_heads`` falls back to the query heads;
        ``head_dim`` to hidden / heads). Raises `InputError` for a model that is not a causal LM."""
        config = getattr(model, "config", None)
        can_generate = getattr(model, "can_generate", None)
        if config is None or not callable(can_generate) or not can_generate():
            raise InputError("generate needs a Hugging Face causal LM (a model with .generate and a "
                             f"config); got {type(model).__name__}. Compile e.g. "
                             "AutoModelForCausalLM.from_config(...) or .from_pretrained(...)")
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        dtype = next(model.parameters()).dtype
        sliding = None
        if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
            sliding = getattr(config, "sliding_window", None)
        max_positions = getattr(config, "max_position_embeddings", None)
        return cls(config.num_hidden_layers, kv_heads, head_dim, dtype, max_positions, sliding)

    def allocate(self, batch: int, max_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """A zeroed cache for `batch` sequences of up to `max_len` tokens."""
        return torch.zeros(2 * self.layers, batch, self.kv_heads, max_len, self.head_dim, dtype=self.dtype,
                           device=device)

    def check_length(self, max_len: int) -> None:
        """Refuse a cache longer than the model can attend over correctly."""
        if self.max_positions is not None and max_len > self.max_positions:
            raise InputError(f"the cache needs {max_len} slots but the model has positions for "
                             f"{self.max_positions} (config.max_position_embeddings): shorten the prompt or "
                             "max_new_tokens")
        if self.sliding_window is not None and max_len > self.sliding_window:
            raise InputError(f"the cache needs {max_len} slots but some layers attend over a sliding window "
                             f"of {self.sliding_window}, which the static cache does not implement: keep "
                             f"prompt + max_new_tokens ≤ {self.sliding_window}")


def additive_mask(start: torch.Tensor, queries: int, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``M [batch, 1, queries, max_len]``: 0 where query i may read slot j (causal over slots and a real
    token there), the dtype's lowest value elsewhere (see the module docstring)."""
    slots = torch.arange(mask.shape[-1], device=mask.device)
    query_slots = start + torch.arange(queries, device=mask.device)
    allowed = (slots[None, :] <= query_slots[:, None])[None, None] & mask[:, None, None, :].bool()
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


def _layer_class():
    """A Hugging Face cache layer that writes at the caller's slot into the caller's tensors (built on
    first use: transformers is imported only when a causal LM is compiled for generation)."""
    from transformers.cache_utils import StaticLayer

    class SlotLayer(StaticLayer):
        def __init__(self, keys: torch.Tensor, values: torch.Tensor, start: torch.Tensor):
            super().__init__(keys.shape[2])
            self.keys, self.values, self.start = keys, values, start
            self.batch_size, self.num_heads = keys.shape[:2]
            self.k_head_dim = self.v_head_dim = keys.shape[-1]
            self.device = keys.device
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            slots = torch.arange(key_states.shape[-2], device=key_states.device) + self.start
            self.keys.index_copy_(2, slots, key_states)
            self.values.index_copy_(2, slots, value_states)
            return self.keys, self.values

        def get_seq_length(self):
            return self.start

    return SlotLayer


class CacheStep(torch.nn.Module):
    """``logits = step(input_ids, position_ids, mask, start, cache)``: run q new tokens of a causal LM
    against the static cache, writing their keys and values into it (see the module docstring)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        setattr(self, ROOT, model)
        self._layer = _layer_class()
        # transformers 5 calls the argument ``cache``, earlier versions ``past_key_values``
        parameters = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                start: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        from transformers.cache_utils import Cache

        model = getattr(self, ROOT)
        layers = [self._layer(cache[2 * i], cache[2 * i + 1], start) for i in range(cache.shape[0] // 2)]
        attention = additive_mask(start, input_ids.shape[1], mask, cache.dtype)
        return model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention,
                     use_cache=True, **{self._cache_arg: Cache(layers=layers)}).logits
