"""aqua_alloc.hf.grouped_attention: sdpa, except a one-token decode step reads each KV head once (CPU).

What can fail here: the grouped decode's values against SDPA over repeated heads (bool and
additive masks, padding), the cases left to transformers' sdpa (bit-identical), token ids
of generate with a static cache (alone and in a context) against sdpa's, a compiled decode
step traced as one graph, and the error for something that is not a model.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from aqua_alloc.hf import grouped_attention
from aqua_alloc.hf.generate_hook import cache_argument
from aqua_alloc.hf.grouped_attention import NAME, grouped_attention_forward, use_grouped_attention
from aqua_alloc.hf.static_cache import ContextStaticCache
from test_static_cache import fake  # noqa: F401 - the fixture
from tiny_models import GREEDY, build, llama_config, mistral_config, prompt_ids


class Attention(torch.nn.Module):
    """What transformers' attention functions read off the module."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def decode_inputs(batch=2, heads=8, kv_heads=2, length=40, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, 1, dim, generator=g)
    k = torch.randn(batch, kv_heads, length, dim, generator=g)
    v = torch.randn(batch, kv_heads, length, dim, generator=g)
    mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)
    mask[0, ..., :5] = False   # left padding of the first sequence
    mask[:, ..., 30:] = False  # the static cache's unwritten tail
    return q, k, v, mask


@pytest.mark.parametrize("additive", [False, True])
def test_grouped_decode_equals_sdpa_over_repeated_heads(additive):
    q, k, v, mask = decode_inputs()
    groups = q.shape[1] // k.shape[1]
    attn_mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf")) if additive else mask
    out, weights = grouped_attention_forward(Attention(groups), q, k, v, attn_mask, scaling=0.25)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=attn_mask, scale=0.25)
    assert weights is None and out.shape == (2, 1, 8, 16)  # [B, Q, H, D], as transformers' functions return
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["prefill", "no mask", "one kv head per head", "dropout"])
def test_everything_else_is_transformers_sdpa(case):
    q, k, v, mask = decode_inputs(kv_heads=8 if case == "one kv head per head" else 2)
    kwargs = {}
    if case == "prefill":
        q = torch.randn(2, 8, 4, 16)
        mask = mask.expand(2, 1, 4, 40)
    elif case == "no mask":
        mask = None
    elif case == "dropout":
        kwargs["dropout"] = 0.5
        torch.manual_seed(1)
    module = Attention(q.shape[1] // k.shape[1])
    out, _ = grouped_attention_forward(module, q, k, v, mask, scaling=0.25, **kwargs)
    if case == "dropout":
        torch.manual_seed(1)
    expected, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25, **kwargs)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("make", [llama_config, lambda: mistral_config(sliding_window=8)],
                         ids=["llama", "mistral-sliding"])
def test_generate_on_a_static_cache_gives_sdpas_tokens(make, fake):  # noqa: F811 - the fixture
    reference = build(make())
    model = use_grouped_attention(build(make()))
    assert model.config._attn_implementation == NAME
    for ids, n in ((prompt_ids(9, 1), 12), (prompt_ids(7, 2, batch=3), 9)):
        mask = torch.ones_like(ids)
        mask[0, :3] = 0  # a left-padded row in a batch
        plain = dict(attention_mask=mask, max_new_tokens=n, cache_implementation="static", output_logits=True,
                     return_dict_in_generate=True, **GREEDY)
        expected, got = reference.generate(ids, **plain), model.generate(ids, **plain)
        assert torch.equal(got.sequences, expected.sequences)
        torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), rtol=1e-4, atol=1e-4)
        expected = expected.sequences
        cache = ContextStaticCache(model.config, max_cache_len=64, tag=f"grouped-{ids.shape[0]}")
        in_context = model.generate(ids, attention_mask=mask, max_new_tokens=n, **cache_argument(cache), **GREEDY)
        cache.release()
        assert torch.equal(in_context, expected)
    assert fake.inside["grouped-1"] > 0  # the cache's tensors were made in the context


def test_the_compiled_decode_step_traces_as_one_graph():
    """Under torch.compile (dynamo's eager backend, fullgraph: a graph break raises) the decode
    step with aqua_sdpa over a static cache picks the eager step's tokens."""
    model = use_grouped_attention(build(llama_config()))
    ids = prompt_ids(16, 3)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    torch._dynamo.reset()
    step = torch.compile(model.forward, fullgraph=True, backend="eager")
    tokens = {}
    with torch.inference_mode():
        for compiled in (False, True):
            cache = ContextStaticCache(model.config, max_cache_len=64)
            out = model(ids, **{cache_kw: cache}, use_cache=True)
            token, tokens[compiled] = out.logits[:, -1:].argmax(-1), []
            for k in range(4):
                forward = step if compiled else model.forward
                out = forward(token, **{cache_kw: cache}, use_cache=True, cache_position=torch.tensor([16 + k]))
                token = out.logits[:, -1:].argmax(-1)
                tokens[compiled].append(int(token))
    torch._dynamo.reset()
    assert tokens[True] == tokens[False]


def test_register_is_idempotent_and_a_non_model_is_refused():
    assert grouped_attention.register() == grouped_attention.register() == NAME
    with pytest.raises(TypeError, match="use_grouped_attention.*expected a transformers model.*got str"):
        use_grouped_attention("meta-llama/Llama-3.1-8B")


def test_the_package_offers_it():
    import aqua_alloc

    assert aqua_alloc.use_grouped_attention is use_grouped_attention and "use_grouped_attention" in aqua_alloc.__all__
