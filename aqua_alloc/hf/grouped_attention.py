"""A decode attention that reads each KV head once: transformers' ``sdpa`` otherwise.

transformers' ``sdpa`` attention, on a one-token decode step over a static cache under
``torch.compile``, cannot use SDPA's grouped-query mode (a static cache needs a mask and
masked GQA runs SDPA's math kernel), so it copies every KV head ``G = num_attention_heads /
num_key_value_heads`` times (``repeat_kv``) and attends over the copies. That costs twice:

- on the GPU: the 8B shape (G = 4) at 32,768 tokens made 58.9 ms per token against 21 ms for
  the eager dynamic cache;
- on a context spilled to host or a peer GPU and read in place: the copy reads each
  off-GPU element G times over the link: 227 ms per token with half of that cache on host.

``aqua_sdpa`` (:data:`NAME`) is ``sdpa`` except for that one case: a single query token,
grouped KV heads and a mask (a static cache's decode step; also a dynamic cache's when the
batch is padded or a layer has a sliding window). There the query's heads are folded onto their KV head
(``[B, H, 1, D]`` -> ``[B, Hkv, G, D]``; head ``h`` pairs with KV head ``h // G``, as
``repeat_kv`` pairs them) and attention is transformers' eager formula on the KV heads as
they are: ``softmax(q K^T * scale + mask)`` in float32, then ``@ V``. Each K and V element is
read once, by matrix multiplies spread over the whole GPU, which read host memory in place
at the link's speed. Same run, same shape (benchmarks/results/probe_static_attention-*):
10.9 ms per token on the GPU, 56.3 ms with half on host.

Use: ``use_grouped_attention(model)`` (or ``register()`` then
``model.set_attn_implementation("aqua_sdpa")``, or ``attn_implementation="aqua_sdpa"`` at
load). aqua_alloc never switches a model's attention by itself. Tokens can differ from
``sdpa``'s (the scores ``q K^T`` are rounded to the model's dtype before the float32
softmax, as in transformers' eager attention: in bf16 a score near 20 is rounded to a
multiple of 0.125), so compare runs with the same attention. The query is scaled before
the product, so fp16 scores do not overflow where SDPA's would not. A row the mask hides
entirely gives zeros, as SDPA does.

Models whose attention takes more than ``sdpa``'s inputs (sparse indices, attention sinks)
are refused at their first step with a ValueError; some model files also branch on the
name ``"sdpa"`` itself, and such a model may run another path under ``aqua_sdpa``: use it
with the decoder models it was measured on (Llama-style grouped-query attention).
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "aqua_sdpa"
# Inputs some models' attention takes beyond sdpa's (sparse-attention indices, attention
# sinks): neither this function nor sdpa would use them, so the result would be wrong.
UNSUPPORTED_INPUTS = ("indices", "block_indices", "s_aux", "sinks")


def grouped_attention_forward(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, dropout: float = 0.0,
                              scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query [B, H, Q, D]``, ``key`` and
    ``value [B, Hkv, L, D]``, ``attention_mask`` as ``sdpa`` gets it (bool, True = attend, or
    additive float; ``[B or 1, 1, Q, L]``). Returns ``([B, Q, H, D], None)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    unsupported = [name for name in UNSUPPORTED_INPUTS if kwargs.get(name) is not None]
    if unsupported:
        raise ValueError(f"attn_implementation={NAME!r} cannot run this model's attention (it passes "
                         f"{', '.join(unsupported)}); use 'sdpa' or the model's own implementation")
    batch, num_heads, q_length, head_dim = query.shape
    num_kv_heads = key.shape[1]
    grouped_decode = (q_length == 1 and attention_mask is not None and num_kv_heads < num_heads
                      and num_heads % num_kv_heads == 0 and dropout == 0.0
                      and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
                      and key.shape[-1] == value.shape[-1] == head_dim
                      and attention_mask.shape[1] == 1)
    if not grouped_decode:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else head_dim ** -0.5
    grouped_query = query.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim) * scale  # [B, Hkv, G, D]
    scores = torch.matmul(grouped_query, key.transpose(-1, -2)).float()                              # [B, Hkv, G, L]
    if attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, float("-inf"))  # [B, 1, 1, L] broadcasts over heads
    else:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(value.dtype)  # a fully hidden row: 0, as SDPA
    out = torch.matmul(probs, value)                                                          # [B, Hkv, G, D]
    return out.reshape(batch, 1, num_heads, head_dim), None


def register() -> str:
    """Make ``aqua_sdpa`` known to transformers (the attention function, with ``sdpa``'s mask).
    Idempotent. Returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, grouped_attention_forward)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return NAME


def use_grouped_attention(model: Any) -> Any:
    """Switch ``model`` (a transformers ``PreTrainedModel``) to ``aqua_sdpa``; returns it.
    Raises TypeError naming what was passed if it is not such a model. It changes the model
    object for every caller: not while another thread generates with it."""
    if not callable(getattr(model, "set_attn_implementation", None)):
        raise TypeError(f"use_grouped_attention(model): expected a transformers model (with set_attn_implementation), "
                        f"got {type(model).__name__}")
    model.set_attn_implementation(register())
    return model
