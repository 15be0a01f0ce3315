"""The core on a real GPU: moves keep pointers and bytes, memory leaves and returns,
kernels work in place on host, moves wait for writers, out-of-memory is torch's error.

Marked `gpu`: skipped with a reason on machines with no CUDA device (CI).
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import aqua_alloc as aq  # noqa: E402
from aqua_alloc.memory import sim  # noqa: E402,F401 - imported for parity with the CPU suite
from conftest import reset_aqua  # noqa: E402

pytestmark = pytest.mark.gpu

MiB, GiB = 1 << 20, 1 << 30


@pytest.fixture
def gpu(request):
    settings = dict(host_reserve="3GiB")
    settings.update(getattr(request, "param", {}))
    aq.enable(backend="cuda", **settings)
    yield
    torch.cuda.synchronize()
    gc.collect()
    reset_aqua()


def _free_bytes() -> int:
    torch.cuda.synchronize()
    aq.allocator.flush_releases()   # backings given back are released a few ms later otherwise
    return torch.cuda.mem_get_info()[0]


def test_move_to_host_and_back_keeps_pointer_and_bytes(gpu):
    with aq.context("t1"):
        x = torch.randn(96 * MiB // 4, device="cuda")     # a large segment (96 MiB)
        y = torch.arange(1000, device="cuda")               # a small-pool segment (2 MiB)
    ptr_x, ptr_y = x.data_ptr(), y.data_ptr()
    ref_x, ref_y = x.cpu(), y.cpu()
    total = sum(aq.where("t1").values())
    assert total >= 96 * MiB + 2 * MiB
    assert aq.where("t1")["gpu0"] == total

    free_before = _free_bytes()
    aq.park("t1")
    moved = aq.evict("t1", "host")
    free_parked = _free_bytes()
    assert moved == total
    assert aq.where("t1") == {**{k: 0 for k in aq.where("t1")}, "host": total}
    assert free_parked - free_before >= 96 * MiB, "the GPU should get the context's memory back"
    assert (x.data_ptr(), y.data_ptr()) == (ptr_x, ptr_y)
    assert torch.equal(x.cpu(), ref_x) and torch.equal(y.cpu(), ref_y)   # read in place over PCIe

    result = aq.resume("t1")
    assert result.bytes_moved == total and result.bytes_elsewhere == 0
    assert free_parked - _free_bytes() >= 96 * MiB, "the memory should come back on resume"
    assert aq.where("t1")["gpu0"] == total
    assert (x.data_ptr(), y.data_ptr()) == (ptr_x, ptr_y)
    assert torch.equal(x.cpu(), ref_x) and torch.equal(y.cpu(), ref_y)
    s = aq.stats()
    assert s["tiers"]["host"]["peak"] >= total and s["bytes_moved"] == 2 * total


def test_kernels_read_and_write_in_place_on_host(gpu):
    with aq.context("inplace"):
        x = torch.randn(64 * MiB // 4, device="cuda")
    ref = x.cpu()
    aq.evict("inplace", "host")
    assert aq.where("inplace")["host"] > 0
    x.mul_(2).add_(1)                      # kernels on host-backed memory
    assert torch.equal(x.cpu(), ref * 2 + 1)
    aq.resume("inplace")
    assert torch.equal(x.cpu(), ref * 2 + 1)


def test_move_waits_for_a_kernel_still_writing(gpu):
    with aq.context("writer"):
        z = torch.zeros(256 * MiB // 4, device="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(400_000_000)     # ~0.2 s of spinning before the write
        z.fill_(7.0)
        aq.park("writer")                  # the park event is recorded on `side`
    aq.evict("writer", "host")             # must wait for fill_ before copying
    assert aq.where("writer")["host"] > 0
    assert bool((z == 7.0).all())
    aq.resume("writer")
    assert bool((z == 7.0).all())


@pytest.mark.parametrize("gpu", [dict(local_budget="512MiB", host_reserve="1GiB")], indirect=True)
def test_parked_context_is_evicted_under_pressure(gpu):
    with aq.context("old"):
        a = torch.full((300 * MiB // 4,), 3.0, device="cuda")
    aq.park("old")
    with aq.context("new"):
        b = torch.full((300 * MiB // 4,), 5.0, device="cuda")   # does not fit beside "old"
    assert aq.where("old")["gpu0"] < 300 * MiB, "the parked context should have been evicted"
    assert aq.where("new")["gpu0"] >= 300 * MiB
    assert bool((a == 3.0).all()) and bool((b == 5.0).all())


@pytest.mark.parametrize("gpu", [dict(local_budget="256MiB", host_budget="512MiB", host_reserve="512MiB",
                                      lend="0")], indirect=True)
def test_out_of_memory_on_every_tier_is_torch_oom(gpu, capfd):
    with aq.context("ok"):
        keep = torch.ones(64 * MiB // 4, device="cuda")
    with pytest.raises(torch.OutOfMemoryError):
        with aq.context("huge"):
            torch.empty(2 * GiB, dtype=torch.uint8, device="cuda")
    err = capfd.readouterr().err
    assert "out of memory" in err and "host:" in err and "gpu0:" in err
    assert bool((keep == 1).all())         # the other context goes on
    with aq.context("ok"):
        more = torch.ones(16 * MiB // 4, device="cuda")
    assert bool((more == 1).all())


def test_weights_outside_contexts_are_not_touched(gpu):
    w = torch.randn(1024, 1024, device="cuda")
    # The first matmul on a stream makes cuBLAS's workspace through the caching allocator:
    # made inside a context it would live in the context's pool (see README, limitations).
    w @ w
    segments_before = aq.stats()["num_segments"]
    with pytest.raises(aq.CoreError):
        aq.where(w)
    with aq.context("kv"):
        kv = torch.randn(1024, 1024, device="cuda")
        act = w @ kv                       # allocated inside the context too
    assert aq.stats()["num_segments"] > segments_before
    assert aq.where(kv)["gpu0"] > 0
    del act


def test_release_gives_the_memory_back(gpu):
    with aq.context("short"):
        t = torch.empty(128 * MiB, dtype=torch.uint8, device="cuda")
    before = aq.stats()["num_segments"]
    assert before >= 1
    del t
    aq.release("short")
    gc.collect()
    torch.cuda.synchronize()
    assert aq.stats()["num_segments"] == before - 1
    with pytest.raises(aq.ContextError):
        aq.release("short")


def test_peer_tier_needs_two_gpus(gpu):
    if torch.cuda.device_count() < 2:
        pytest.skip("peer tier: this machine has one GPU; needs two or more")
    with aq.context("p", device=0):
        x = torch.randn(64 * MiB // 4, device="cuda:0")
    ref = x.cpu()
    aq.evict("p", "gpu1")
    assert aq.where("p")["gpu1"] > 0
    x.add_(1)
    aq.resume("p")
    assert torch.equal(x.cpu(), ref + 1)


def test_trace_dump_with_memory_snapshot_shows_context_segments(gpu, tmp_path):
    import pickle

    from aqua_alloc.obs import trace
    from aqua_alloc.obs import trace_reader

    with aq.context("snap"):
        kv = torch.ones(32 * MiB // 4, device="cuda")
    aq.evict("snap", "host")
    aq.resume("snap")
    path = trace.dump(tmp_path / "trace.json", snapshot=True)
    events = trace_reader.read_trace(path).events
    kinds = {e.kind.value for e in events}
    assert {"segment_alloc", "move_start", "move_end"} <= kinds
    snapshot_file = trace.snapshot_path_for(path)
    with open(snapshot_file, "rb") as f:
        snapshot = pickle.load(f)
    # PyTorch's own snapshot still works with aqua_alloc's pools, and shows the segment
    # that the core gave the context's pool.
    addresses = {seg["address"] for seg in snapshot["segments"]}
    owner = [a for a in addresses if a <= kv.data_ptr() < a + 64 * MiB]
    assert owner, "the context's segment is missing from torch's memory snapshot"
    assert aq.where(kv)["gpu0"] >= 32 * MiB


def _tiny_llama_on_cuda(max_positions: int = 4096, kv_heads: int = 4):
    """A Llama of 4 layers with random weights (seed 0) on the GPU: 4 layers x 2 (K, V) x
    ``kv_heads`` KV heads (4 query heads) x 64 dims x 4 bytes = 8 KiB of fp32 KV per token
    with 4 KV heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                         initializer_range=0.5, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).cuda().eval()


def _at_steps(actions: dict):
    """A stopping criterion that calls ``actions[n]()`` at the n-th step; never stops."""
    from transformers import StoppingCriteria

    class AtSteps(StoppingCriteria):
        n = 0

        def __call__(self, input_ids, scores, **kwargs):
            self.n += 1
            if self.n in actions:
                actions[self.n]()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return AtSteps()


@pytest.mark.parametrize("tier", ["host", "gpu1"])
@pytest.mark.parametrize("read_ahead_bytes", [0, 64 * MiB], ids=["in-place", "read-ahead"])
def test_generate_with_kv_spilled_and_back_is_identical(gpu, read_ahead_bytes, tier):
    """A context larger than its local budget spills at allocation, to host (no GPU lends)
    or to a second GPU (it lends; skipped with one GPU); attention reads the spilled KV in
    place (or from copies staged on a side stream by read-ahead), and generate's tokens
    equal a plain run's; raising the budget and resuming brings the spilled ranges home
    with the same bytes."""
    if tier == "gpu1" and torch.cuda.device_count() < 2:
        pytest.skip(f"spill to a peer GPU: torch.cuda.device_count() is {torch.cuda.device_count()}")
    from transformers import StoppingCriteriaList

    from aqua_alloc.memory import native as _native
    from aqua_alloc.hf.generate_hook import cache_argument
    from aqua_alloc.hf.kv_cache import ContextKVCache

    model = _tiny_llama_on_cuda()
    prompt = torch.randint(1, 256, (1, 3000), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    greedy = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        aq.disable()
        reference = model.generate(prompt, **greedy)
        lending = {"lend": 0} if tier == "host" else {}  # host: no peer tier, whatever the machine
        aq.enable(backend="cuda", host_reserve="256MiB", local_budget="12MiB", **lending)
        cache = ContextKVCache(model.config, tag="spill", device=prompt.device, read_ahead_bytes=read_ahead_bytes)
        seen: list[dict[str, int]] = []
        def note():
            seen.append(aq.where("spill"))

        probe = _at_steps({2: note, 20: note})
        out = model.generate(prompt, **cache_argument(cache), stopping_criteria=StoppingCriteriaList([probe]), **greedy)
    assert torch.equal(out, reference), "generate with spilled KV differs from the plain run"
    assert seen and all(w["gpu0"] <= 12 * MiB and w[tier] > 0 for w in seen), seen
    spilled_layers = [i for i, layer in enumerate(cache.layers) if aq.placement(layer._key_store.chunks[0])[tier]]
    assert spilled_layers and spilled_layers[0] > 0, spilled_layers  # the first layers fit, later ones spill
    if read_ahead_bytes:
        ra = cache.read_ahead
        # Every decode step (23 after the prefill) stages and uses each spilled layer.
        assert ra.layers_used >= 23 * len(spilled_layers) and ra.layers_dropped == 0, vars(ra)
        assert ra.peak_bytes <= max(read_ahead_bytes, max(cache.layers[i].nbytes for i in spilled_layers))
    else:
        assert cache.read_ahead is None
    layer = cache.layers[0]
    keys_before = layer.keys.clone()
    before = aq.where("spill")
    _native.check(_native.lib().aqua_set_local_budget(0, 1 * GiB), "raising the local budget")
    result = aq.resume("spill")
    assert result.bytes_elsewhere == 0 and result.bytes_moved == before[tier] > 0
    assert aq.where("spill")[tier] == 0
    assert torch.equal(layer.keys, keys_before)
    cache.release()


def test_reclaim_moves_borrowed_contexts_off_a_peer(gpu):
    if torch.cuda.device_count() < 2:
        pytest.skip("reclaim from a peer: this machine has one GPU; needs two or more")
    aq.lend(1, "1GiB")
    tensors = {}
    for k in range(3):
        with aq.context(f"b{k}", device=0):
            tensors[k] = torch.randn(64 * MiB // 4, device="cuda:0")
        aq.evict(f"b{k}", "gpu1")
    refs = {k: t.cpu() for k, t in tensors.items()}
    assert aq.stats()["tiers"]["gpu1"]["lent"] >= 3 * 64 * MiB
    result = aq.reclaim(1)
    assert result.pending_bytes == 0 and result.moved_bytes >= 3 * 64 * MiB
    assert aq.stats()["tiers"]["gpu1"]["lent"] == 0
    for k, t in tensors.items():
        assert aq.where(f"b{k}")["gpu1"] == 0
        assert torch.equal(t.cpu(), refs[k])


def test_resume_without_waiting_orders_kernels_after_the_move_on_the_gpu(gpu):
    with aq.context("pf"):
        x = torch.randn(256 * MiB // 4, device="cuda")
    ref = x.cpu()
    aq.park("pf")
    aq.evict("pf", "host")
    future = aq.resume("pf", wait=False)
    # Queued at once, behind a GPU-side wait for the move: it must write the moved bytes
    # at their new home, not the old host backing.
    x.add_(1)
    assert future.result(timeout=30).bytes_elsewhere == 0
    torch.cuda.synchronize()
    assert aq.where("pf")["host"] == 0
    assert torch.equal(x.cpu(), ref + 1)
    # prefetch + wait_on_stream: the same, in two steps (what the scheduler does).
    aq.park("pf")
    aq.evict("pf", "host")
    future = aq.prefetch("pf")
    assert aq.wait_on_stream(future) is True
    x.mul_(2)
    future.result(timeout=30)
    torch.cuda.synchronize()
    assert torch.equal(x.cpu(), (ref + 1) * 2)


@pytest.mark.parametrize("tier", ["host", "gpu1"])
@pytest.mark.parametrize("moves", ["away-and-back", "read-while-away"])
def test_compiled_step_on_a_static_cache_survives_moves_of_its_context(gpu, moves, tier):
    """generate with a static cache in a context compiles its decode step (CUDA graphs:
    transformers' default compile mode, reduce-overhead) on the cache's fixed pointers. The
    context is parked and evicted to host, or to a second GPU (skipped with one), between
    steps, then resumed at once (away-and-back) or only eight steps later (read-while-away:
    the replayed graph reads the KV in place over PCIe or NVLink meanwhile): tokens equal
    the same compiled call on plain memory, and no pointer of the cache changes."""
    if tier == "gpu1" and torch.cuda.device_count() < 2:
        pytest.skip(f"evict to a peer GPU: torch.cuda.device_count() is {torch.cuda.device_count()}")
    from transformers import StoppingCriteriaList

    from aqua_alloc.hf.generate_hook import cache_argument
    from aqua_alloc.hf.static_cache import ContextStaticCache

    model = _tiny_llama_on_cuda()
    prompt = torch.randint(1, 256, (1, 200), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    greedy = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    aq.disable()
    reference = model.generate(prompt, **cache_argument(ContextStaticCache(model.config, max_cache_len=256)), **greedy)
    aq.enable(backend="cuda", host_reserve="256MiB", **({"lend": 0} if tier == "host" else {}))
    cache = ContextStaticCache(model.config, max_cache_len=256, tag="graph", device=prompt.device)
    seen: list[dict[str, int]] = []
    pointers: list[list[int]] = []

    def away():
        pointers.append([t.data_ptr() for layer in cache.layers for t in (layer.keys, layer.values)])
        aq.park("graph")
        aq.evict("graph", tier)
        seen.append(aq.where("graph"))

    def home():
        aq.resume("graph")
        seen.append(aq.where("graph"))
        pointers.append([t.data_ptr() for layer in cache.layers for t in (layer.keys, layer.values)])

    actions = {4: away, 5: home} if moves == "away-and-back" else {4: away, 12: home}
    out = model.generate(prompt, **cache_argument(cache), stopping_criteria=StoppingCriteriaList([_at_steps(actions)]),
                         **greedy)
    assert torch.equal(out, reference), "the compiled step on a moved static cache gave other tokens"
    assert seen[0][tier] >= cache.nbytes and seen[0]["gpu0"] == 0, seen  # whole segments: a little more
    assert seen[1]["gpu0"] >= cache.nbytes and seen[1][tier] == 0, seen
    assert pointers[0] == pointers[1]
    cache.release()


@pytest.mark.parametrize("attention", ["sdpa", "aqua_sdpa"])
def test_compiled_step_reads_a_static_cache_that_spilled_at_allocation(gpu, attention):
    """A static cache larger than its context's local budget spills to host when it is
    allocated; the prefill attends over GPU copies of the spilled layers, and the compiled
    decode step reads them in place: tokens equal the same compiled call on plain memory,
    with transformers' sdpa and with aqua_sdpa (2 KV heads for 4 query heads: its grouped
    path)."""
    from aqua_alloc.hf.generate_hook import cache_argument
    from aqua_alloc.hf.grouped_attention import use_grouped_attention
    from aqua_alloc.hf.static_cache import ContextStaticCache

    model = _tiny_llama_on_cuda(max_positions=8192, kv_heads=2)
    if attention == "aqua_sdpa":
        use_grouped_attention(model)
    prompt = torch.randint(1, 256, (1, 200), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    greedy = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    # 4096 tokens x 2 KV heads x 64 dims x 4 bytes = 2 MiB per tensor; 8 tensors = 16 MiB.
    aq.disable()
    reference = model.generate(prompt, **cache_argument(ContextStaticCache(model.config, max_cache_len=4096)), **greedy)
    aq.enable(backend="cuda", host_reserve="256MiB", local_budget="12MiB", lend=0)  # lend 0: host, not a peer
    cache = ContextStaticCache(model.config, max_cache_len=4096, tag="spilled", device=prompt.device)
    out = model.generate(prompt, **cache_argument(cache), **greedy)
    where = aq.where("spilled")
    assert torch.equal(out, reference), "the compiled step over spilled static KV gave other tokens"
    assert where["gpu0"] <= 12 * MiB and where["host"] >= cache.nbytes - 12 * MiB, where
    cache.release()


def test_a_reset_with_live_tensors_in_a_context_that_cannot_come_home_leaves_the_process_alive(tmp_path):
    """What a failed GPU test leaves: tensors alive in a context spilled to host (it cannot
    come home: disable() refuses), then the tests' reset, then the tensors freed by the
    garbage collector. In a subprocess: before the reset kept every context's pool, torch
    aborted at that free (issue 18, the GPU suite on two GPUs)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import gc, sys
        import torch
        import aqua_alloc as aq
        sys.path.insert(0, %r)
        from conftest import reset_aqua
        aq.enable(backend="cuda", host_reserve="64MiB", local_budget="8MiB", lend=0)
        with aq.context("stuck"):
            kept = [torch.ones(4 << 20, device="cuda") for _ in range(4)]   # 64 MiB: 56 MiB spill to host
        assert aq.where("stuck")["host"] > 0
        reset_aqua()
        del kept
        gc.collect()
        torch.cuda.synchronize()
        print("alive")
    """) % str(Path(__file__).resolve().parent)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("alive"), (proc.returncode, proc.stderr[-2000:])


def test_topology_is_indexed_by_cuda_ordinal():
    """NVML's GPUs matched to CUDA's by UUID: names and memory per ordinal agree with torch's,
    also when CUDA_VISIBLE_DEVICES leaves some GPUs out or reorders them."""
    from aqua_alloc.memory import topology

    topo = topology.discover()
    n = torch.cuda.device_count()
    assert [g.index for g in topo.gpus] == list(range(n)), topo.notes
    for d, g in enumerate(topo.gpus):
        assert g.name == torch.cuda.get_device_name(d)
        cuda_total = torch.cuda.mem_get_info(d)[1]   # the driver keeps some of NVML's total for itself
        assert cuda_total <= g.total_bytes <= cuda_total * 1.02
    assert len(topo.nvlink) == n and all(len(row) == n for row in topo.nvlink)
    assert not [note for note in topo.notes if "PCI bus order" in note]
