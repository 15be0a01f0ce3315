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


def guard_sdpa(monkeypatch):
    """Fails a test whose one-token masked grouped steps would reach transformers' sdpa (the
    fallback reproduces sdpa exactly, so comparisons alone cannot tell which ran). Returns
    the count of calls sdpa got."""
    import transformers.integrations.sdpa_attention as sdpa_module

    real = sdpa_module.sdpa_attention_forward
    calls = {"sdpa": 0}

    def guarded(module, query, key, value, attention_mask, *args, **kwargs):
        assert not (query.shape[2] == 1 and attention_mask is not None and key.shape[1] < query.shape[1]), \
            "a grouped one-token masked step went to sdpa"
        calls["sdpa"] += 1
        return real(module, query, key, value, attention_mask, *args, **kwargs)

    monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", guarded)
    return calls


@pytest.fixture
def grouped_path_runs(monkeypatch):
    return guard_sdpa(monkeypatch)


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
def test_grouped_decode_equals_sdpa_over_repeated_heads(additive, grouped_path_runs):
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
def test_generate_on_a_static_cache_gives_sdpas_tokens(make, fake, monkeypatch):  # noqa: F811 - the fixture
    reference = build(make())
    model = use_grouped_attention(build(make()))
    assert model.config._attn_implementation == NAME
    cases = [(prompt_ids(9, 1), 12), (prompt_ids(7, 2, batch=3), 9)]
    plain, expected = [], []
    for ids, n in cases:
        mask = torch.ones_like(ids)
        mask[0, :3] = 0  # a left-padded row in a batch
        kwargs = dict(attention_mask=mask, max_new_tokens=n, cache_implementation="static", output_logits=True,
                      return_dict_in_generate=True, **GREEDY)
        plain.append(kwargs)
        expected.append(reference.generate(ids, **kwargs))
    calls = guard_sdpa(monkeypatch)  # from here on, sdpa may see prefills only
    for (ids, n), kwargs, want in zip(cases, plain, expected):
        got = model.generate(ids, **kwargs)
        assert torch.equal(got.sequences, want.sequences)
        torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), rtol=1e-4, atol=1e-4)
        cache = ContextStaticCache(model.config, max_cache_len=64, tag=f"grouped-{ids.shape[0]}")
        in_context = model.generate(ids, attention_mask=kwargs["attention_mask"], max_new_tokens=n,
                                    **cache_argument(cache), **GREEDY)
        cache.release()
        assert torch.equal(in_context, want.sequences)
    assert fake.inside["grouped-1"] > 0  # the cache's tensors were made in the context
    # sdpa ran the 4 prefills of every layer and nothing else: the decode steps took the grouped path.
    assert calls["sdpa"] == 4 * model.config.num_hidden_layers


def test_the_compiled_decode_step_traces_as_one_graph(grouped_path_runs):
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
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    assert grouped_attention.register() == grouped_attention.register() == NAME
    assert AttentionInterface._global_mapping[NAME] is grouped_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS[NAME] is ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    with pytest.raises(TypeError, match="use_grouped_attention.*expected a transformers model.*got str"):
        use_grouped_attention("meta-llama/Llama-3.1-8B")


def test_the_package_offers_it():
    import aqua_alloc

    assert aqua_alloc.use_grouped_attention is use_grouped_attention and "use_grouped_attention" in aqua_alloc.__all__


@pytest.mark.parametrize("name", ["indices", "block_indices", "s_aux", "sinks"])
def test_inputs_neither_it_nor_sdpa_would_use_are_refused(name):
    q, k, v, mask = decode_inputs()
    with pytest.raises(ValueError, match=f"aqua_sdpa.*cannot run this model's attention.*{name}.*use 'sdpa'"):
        grouped_attention_forward(Attention(4), q, k, v, mask, **{name: torch.zeros(1)})


def test_a_fully_hidden_row_gives_zeros_and_fp16_scores_do_not_overflow(grouped_path_runs):
    q, k, v, mask = decode_inputs()
    mask[1] = False  # the second sequence may see nothing
    out, _ = grouped_attention_forward(Attention(4), q, k, v, mask, scaling=0.25)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isfinite(out).all()
    # fp16: q.k = 100 * 100 * 16 dims = 160,000, above fp16's largest (65,504); scaled by
    # 1/4 first, 40,000: finite, as SDPA's result is.
    q16, k16, v16 = torch.full_like(q, 100).half(), torch.full_like(k, 100).half(), v.half()
    out16, _ = grouped_attention_forward(Attention(4), q16, k16, v16, mask.clone().fill_(True), scaling=0.25)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q16.float(), repeat_kv(k16.float(), 4), repeat_kv(v16.float(), 4), scale=0.25).transpose(1, 2)
    torch.testing.assert_close(out16.float(), expected, rtol=1e-2, atol=1e-2)
