"""Expert buffering: cache policies against an independent model, exact outputs, prefetch, warm start,
the simulator, and the safetensors store."""

import copy
import gc
import itertools
import json
import math
import pickle

import pytest
import torch

import moe_infer
from moe_infer import ops
from moe_infer.buffer import (
    LIVE_POLICIES,
    POLICIES,
    ExpertBuffer,
    ExpertStore,
    NextLayerPrefetcher,
    attach_expert_buffer,
    load_activation_profile,
    save_activation_profile,
    simulate,
    simulate_expert_cache,
    trace_accesses,
    warm_start_buffers,
)
from moe_infer.traces import RoutingTrace, synthetic_trace

# Tiny shapes: one intra-op thread (conftest.one_thread) for the whole module.
pytestmark = pytest.mark.usefixtures("one_thread")


# ---- an independent model of each policy (plain Python, no shared code) -----------------------


def model_policy(batches, num_slots, policy):
    """Hits, misses, evictions of one cache over batches of active experts (each sorted).

    The semantics of csrc/buffer.h, written independently: each batch's active experts are
    accessed in increasing id order; a miss takes the lowest free slot, else evicts:
      paper:  among residents inactive in the batch (all residents if none), the last loaded
      fifo:   the first loaded;  lru: the least recently used
      lfu:    the fewest accesses so far, ties to the least recently used
      belady: the one needed furthest in the future, ties to the lowest slot
    """
    accesses = [(b, e) for b, batch in enumerate(batches) for e in batch]
    slots = [None] * num_slots
    loaded, used, freq = {}, {}, {}
    hits = misses = evictions = 0
    for pos, (b, e) in enumerate(accesses):
        freq[e] = freq.get(e, 0) + 1
        if e in slots:
            hits += 1
            used[e] = pos
            continue
        misses += 1
        if None in slots:
            slot = slots.index(None)
        else:
            evictions += 1
            candidates = list(range(num_slots))
            if policy == "paper":
                inactive = [s for s in candidates if slots[s] not in batches[b]]
                candidates = inactive or candidates
                slot = max(candidates, key=lambda s: loaded[slots[s]])
            elif policy == "fifo":
                slot = min(candidates, key=lambda s: loaded[slots[s]])
            elif policy == "lru":
                slot = min(candidates, key=lambda s: used[slots[s]])
            elif policy == "lfu":
                slot = min(candidates, key=lambda s: (freq[slots[s]], used[slots[s]]))
            else:

                def next_use(s, pos=pos):
                    later = [p for p in range(pos + 1, len(accesses)) if accesses[p][1] == slots[s]]
                    return later[0] if later else math.inf

                best = max(next_use(s) for s in candidates)
                slot = next(s for s in candidates if next_use(s) == best)
        slots[slot] = e
        loaded[e] = used[e] = pos
    return hits, misses, evictions


HAND_BUILT = {
    "paper_example": [[1, 2, 3]],
    "cyclic": [[1, 2, 3]] * 6,
    "frequency": [[0], [0, 1], [0, 2], [0, 3], [1, 2], [0, 3], [1, 4], [0, 4]],
    "shifting_hot_set": [[0, 1], [0, 1, 2], [2, 3], [3, 4, 5], [0, 5], [], [1, 2, 3, 4, 5], [0]],
    "tie_breaks": [[0, 1, 2, 3], [4], [5], [0, 6], [1, 7], [2, 3]],
}


def random_traces():
    return {
        "uniform": synthetic_trace(12, 2, 25, 6, skew=0.0, locality=0.0, seed=1),
        "skewed": synthetic_trace(12, 3, 25, 10, skew=1.4, locality=0.8, seed=2),
        "coactive": synthetic_trace(16, 2, 25, 8, skew=0.8, locality=0.5, coactivation=0.9, seed=3),
    }


def batches_of(trace, layer=0):
    return [trace.active_experts(layer, b) for b in range(trace.num_batches)]


def flatten(batches):
    offsets = [0]
    for batch in batches:
        offsets.append(offsets[-1] + len(batch))
    accesses = torch.tensor([e for batch in batches for e in batch], dtype=torch.long)
    return accesses, torch.tensor(offsets, dtype=torch.long)


# ---- helpers: a small buffered expert set and its resident reference --------------------------


def make_experts(num_experts, hidden, ffn, activation="silu_glu", bias=False, transposed=False, dtype=torch.float32):
    return moe_infer.layer.MoEExperts(num_experts, hidden, ffn, activation, bias, transposed, dtype=dtype)


def resident_output(experts, x, ids, weights):
    """The resident layer's expert path: dispatch over all E experts, grouped_mlp, combine."""
    plan = ops.dispatch_plan(ids, experts.num_experts)
    rows = ops.permute(x, plan.sorted_pair_ids, ids.shape[1])
    return ops.unpermute_combine(experts(rows, plan.expert_offsets), weights, plan.row_of_pair)


def buffered(experts, num_slots, policy="paper", device="cpu", **kwargs):
    store = ExpertStore.from_tensors(
        experts.gate_up_proj,
        experts.down_proj,
        experts.gate_up_proj_bias,
        experts.down_proj_bias,
        pin_memory=torch.device(device).type == "cuda",
    )
    options = dict(
        activation=experts.activation,
        weights_transposed=experts.weights_transposed,
        swiglu_alpha=experts.swiglu_alpha,
        swiglu_limit=experts.swiglu_limit,
    )
    return ExpertBuffer(store, num_slots, device, policy, **options, **kwargs)


def run_batches(buffer, experts, batches_ids, hidden, device):
    """Feeds each batch's ids to the buffer; returns whether every output equals the resident one."""
    resident = experts.to(device) if device != "cpu" else experts
    exact = True
    for ids in batches_ids:
        ids = ids.to(device)
        x = torch.randn(ids.shape[0], hidden, device=device)
        weights = torch.rand(ids.shape, device=device)
        with torch.no_grad():
            out = buffer(x, ids, weights)
            expected = resident_output(resident, x, ids, weights)
        exact &= torch.equal(out, expected)
    return exact


# ---- cache semantics ---------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_simulator_matches_independent_model(policy):
    traces = {name: batches for name, batches in HAND_BUILT.items()}
    traces.update({name: batches_of(trace) for name, trace in random_traces().items()})
    for name, batches in traces.items():
        num_experts = 1 + max((e for batch in batches for e in batch), default=0)
        sizes = sorted({1, 2, 3, 5, max(1, num_experts - 1), num_experts})
        accesses, offsets = flatten(batches)
        counts = simulate_expert_cache(accesses, offsets, num_experts, sizes, [policy])
        for c, size in enumerate(sizes):
            expected = model_policy(batches, size, policy)
            assert tuple(counts[0, c].tolist()) == expected, (name, size)


@pytest.mark.parametrize("policy", LIVE_POLICIES)
def test_live_buffer_counts_and_outputs(device, policy):
    """The live buffer's counters equal the independent model on random traces, and every batch's
    output equals the resident layer's bit for bit, for every cache size (1 slot to all)."""
    trace = synthetic_trace(8, 2, 12, 9, skew=1.0, locality=0.6, seed=5)
    trace.layers[0][3][0, 1] = -1  # an unrouted pair
    experts = make_experts(8, 32, 32)
    for num_slots in (1, 2, 3, 5, 8):
        buffer = buffered(experts, num_slots, policy, device)
        assert run_batches(buffer, experts, trace.layers[0], 32, device), num_slots
        stats = buffer.stats()
        expected = model_policy(batches_of(trace), num_slots, policy)
        assert (stats["hits"], stats["misses"], stats["evictions"]) == expected, num_slots
        assert stats["bytes_copied"] == stats["misses"] * buffer.store.expert_bytes


def test_lifo_evicts_the_papers_victim():
    # Cache of 2, experts {1, 2, 3} needed: 1 and 2 load, 3 evicts 2 (the last loaded).
    experts = make_experts(4, 16, 16)
    buffer = buffered(experts, 2, "paper")
    ids = torch.tensor([[1, 2], [3, 1]], dtype=torch.int32)
    assert run_batches(buffer, experts, [ids], 16, "cpu")
    table = buffer.slot_table().tolist()
    assert table[2] == -1 and table[1] >= 0 and table[3] >= 0
    assert buffer.stats()["evictions"] == 1
    # The simulator agrees: after [1, 2, 3], a batch needing 1 hits (2 was evicted, not 1).
    counts = simulate_expert_cache(*flatten([[1, 2, 3], [1]]), 4, [2], ["paper", "fifo"])
    assert counts[0, 0].tolist() == [1, 3, 1]  # paper: 1 hits
    assert counts[1, 0].tolist() == [0, 4, 2]  # fifo evicted 1 first


def test_belady_is_never_beaten():
    traces = list(random_traces().values()) + [
        synthetic_trace(32, 4, 40, 16, num_layers=2, skew=s, locality=loc, coactivation=c, seed=i)
        for i, (s, loc, c) in enumerate([(0.0, 0.0, 0.0), (1.5, 0.9, 0.0), (0.7, 0.3, 0.8)])
    ]
    for trace in traces:
        result = simulate(trace)
        belady = result.counts[POLICIES.index("belady"), :, 1]
        for p, policy in enumerate(POLICIES):
            assert (result.counts[p, :, 1] >= belady).all(), policy
        # Every expert fits: only compulsory misses.
        assert (result.counts[:, -1, 1] == result.counts[POLICIES.index("belady"), -1, 1]).all()


@pytest.mark.parametrize("top_k", [2, 4])
@pytest.mark.parametrize(
    "options",
    [
        dict(activation="silu_glu"),
        dict(activation="gpt_oss_swiglu", bias=True, transposed=True),
        dict(activation="relu", bias=True),
        dict(activation="gelu_glu"),
        dict(activation="gelu_tanh_glu", bias=True),
        dict(activation="relu_glu", transposed=True),
    ],
    ids=["silu_glu", "gpt_oss", "relu_bias", "gelu_glu", "gelu_tanh_glu", "relu_glu"],
)
def test_buffer_smaller_than_one_batch_is_exact(device, top_k, options):
    """A batch needing more experts than slots runs in rounds, resident experts computed while later
    rounds copy (the paper's LIFO keeps them for the whole batch); outputs stay bitwise identical."""
    experts = make_experts(8, 32, 16, **options)
    batches = [torch.stack([torch.randperm(8)[:top_k] for _ in range(20)]).to(torch.int32) for _ in range(4)]
    for policy in ("lru", "paper"):
        for num_slots, overlap in ((1, True), (3, True), (5, True), (3, False)):
            buffer = buffered(experts, num_slots, policy, device, overlap=overlap)
            assert run_batches(buffer, experts, batches, 32, device), (policy, num_slots, overlap)
            stats = buffer.stats()
            assert stats["rounds"] > stats["batches"]  # it really needed rounds


def test_odd_sizes_match_to_float_rounding():
    # MKL's kernels depend on operand alignment, which odd sizes change: not bitwise, but close.
    experts = make_experts(6, 37, 21, activation="gelu", bias=True)
    buffer = buffered(experts, 2, "paper")
    for _ in range(3):
        ids = torch.stack([torch.randperm(6)[:3] for _ in range(15)]).to(torch.int32)
        x, w = torch.randn(15, 37), torch.rand(15, 3)
        with torch.no_grad():
            torch.testing.assert_close(buffer(x, ids, w), resident_output(experts, x, ids, w), rtol=1e-6, atol=1e-6)


def test_pool_never_grows():
    experts = make_experts(16, 16, 16)
    buffer = buffered(experts, 3, "lfu")
    pointers = {name: (t.data_ptr(), tuple(t.shape)) for name, t in buffer.pools.items()}
    trace = synthetic_trace(16, 2, 40, 8, skew=0.5, locality=0.2, seed=7)
    for ids in trace.layers[0]:
        with torch.no_grad():
            buffer(torch.randn(ids.shape[0], 16), ids, torch.rand(ids.shape))
        assert len(buffer.resident_experts()) <= 3
    assert {name: (t.data_ptr(), tuple(t.shape)) for name, t in buffer.pools.items()} == pointers
    assert buffer.pool_bytes == 3 * buffer.store.expert_bytes


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_no_leak_over_10000_swaps(device):
    experts = make_experts(64, 16, 16)
    buffer = buffered(experts, 1, "fifo", device)
    # Each batch needs 8 distinct experts with one slot: 8 swaps per batch.
    ids = torch.arange(8, dtype=torch.int32).view(4, 2)
    x, w = torch.randn(4, 16, device=device), torch.rand(4, 2, device=device)

    def run(batches):
        for b in range(batches):
            with torch.no_grad():
                buffer(x, ((ids + 8 * b) % 64).to(device), w)

    run(200)  # warm up the allocators
    gc.collect()
    rss, allocated = _rss_bytes(), torch.cuda.memory_allocated() if device.type == "cuda" else 0
    before = buffer.stats()["evictions"]
    run(1250)
    gc.collect()
    assert buffer.stats()["evictions"] - before >= 10_000
    assert _rss_bytes() - rss < 4 << 20
    if device.type == "cuda":
        assert torch.cuda.memory_allocated() == allocated


# ---- prefetch, prediction, warm start ----------------------------------------------------------


def test_prefetch_loads_ahead_and_scores_predictions():
    experts = make_experts(8, 16, 16)
    buffer = buffered(experts, 3, "paper")
    assert buffer.prefetch([3, 5, 7], is_prediction=True) == 3
    buffer.synchronize()
    assert sorted(buffer.resident_experts()) == [3, 5, 7]
    ids = torch.tensor([[3, 5], [6, 3]], dtype=torch.int32)  # active {3, 5, 6}
    assert run_batches(buffer, experts, [ids], 16, "cpu")
    stats = buffer.stats()
    assert (stats["hits"], stats["misses"], stats["prefetch_hits"]) == (2, 1, 2)
    assert stats["prefetches"] == 3 and stats["prefetch_unused"] == 1  # 7 made room for 6
    assert stats["precision"] == pytest.approx(2 / 3) and stats["recall"] == pytest.approx(2 / 3)
    # A request larger than the pool loads only what fits, never evicting its own experts.
    assert buffer.prefetch([0, 1, 2, 4]) == 3
    assert sorted(buffer.resident_experts()) == [0, 1, 2]


def test_next_layer_prefetcher_accuracy_and_exactness():
    torch.manual_seed(0)
    options = dict(hidden_size=32, ffn_size=16, num_experts=8, top_k=2)
    plain = [moe_infer.MoELayer(**options) for _ in range(3)]
    layers = [moe_infer.MoELayer(**options, expert_buffer=4) for _ in range(3)]
    for p, b in zip(plain, layers):
        b.load_state_dict(p.state_dict())
        b.expert_buffer.clear()
    prefetcher = NextLayerPrefetcher(layers)
    tp = fp = fn = 0
    for _ in range(4):
        h = h_plain = torch.randn(10, 32)
        previous = None
        with torch.no_grad():
            for i, (p, b) in enumerate(zip(plain, layers)):
                if i > 0:  # independent: layer i's router on layer i-1's input, vs its real routing
                    predicted = set(torch.topk(p.gate(previous), 2).indices.flatten().tolist())
                    actual = set(torch.topk(p.gate(h_plain), 2).indices.flatten().tolist())
                    tp, fp, fn = (
                        tp + len(predicted & actual),
                        fp + len(predicted - actual),
                        fn + len(actual - predicted),
                    )
                previous = h_plain
                h_plain = h_plain + p(h_plain)
                h = h + b(h)
        assert torch.equal(h, h_plain)
    accuracy = prefetcher.accuracy()
    assert sum(a["predictions"] for a in accuracy) == 8
    stats = [layer.expert_buffer.stats() for layer in layers[1:]]
    assert sum(s["predicted_tp"] for s in stats) == tp
    assert sum(s["predicted_fp"] for s in stats) == fp
    assert sum(s["predicted_fn"] for s in stats) == fn
    prefetcher.remove()
    assert all(not layer._forward_pre_hooks for layer in layers)


def test_warm_start_from_saved_profile(tmp_path):
    experts = make_experts(8, 16, 16)
    buffer = buffered(experts, 3, "lfu")
    ids = torch.tensor([[0, 4], [4, 6], [6, 4], [1, 4], [6, 0]], dtype=torch.int32)
    assert run_batches(buffer, experts, [ids, ids[:2]], 16, "cpu")
    path = tmp_path / "profile.json"
    save_activation_profile(str(path), {"layer0": buffer})
    profile = load_activation_profile(str(path))
    assert profile["layer0"]["tokens"].tolist() == [3, 1, 0, 0, 6, 0, 4, 0]
    assert profile["layer0"]["batches"].tolist() == [2, 1, 0, 0, 2, 0, 2, 0]
    fresh = buffered(experts, 3, "lfu")
    assert warm_start_buffers({"layer0": fresh, "other": buffered(experts, 2)}, profile) == ["layer0"]
    assert sorted(fresh.resident_experts()) == [0, 4, 6]
    assert run_batches(fresh, experts, [torch.tensor([[4, 6], [0, 7]], dtype=torch.int32)], 16, "cpu")
    stats = fresh.stats()
    assert (stats["hits"], stats["misses"], stats["warm_loads"]) == (3, 1, 3)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable profile"):
        load_activation_profile(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match=r"tokens_per_expert must be \[8\] \(one count per expert\), got \[5\]"):
        fresh.warm_start(torch.ones(5))
    with pytest.raises(ValueError, match=r"tokens_per_expert must be \[8\].*got \[2, 4\]"):
        fresh.warm_start(torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"batches_active has NaN or infinite counts"):
        fresh.warm_start(torch.ones(8), torch.full((8,), float("nan")))
    (tmp_path / "partial.json").write_text(json.dumps({"format": json.loads(path.read_text())["format"]}))
    with pytest.raises(ValueError, match="not a complete profile"):
        load_activation_profile(str(tmp_path / "partial.json"))
    with pytest.raises(ValueError, match="expert ids must be integers"):
        fresh.prefetch(torch.tensor([1.7]))


# ---- MoELayer integration ----------------------------------------------------------------------


def test_moe_layer_expert_buffer_option():
    torch.manual_seed(1)
    options = dict(hidden_size=32, ffn_size=32, num_experts=8, top_k=2, expert_bias=True)
    plain = moe_infer.MoELayer(**options)
    layer = moe_infer.MoELayer(**options, expert_buffer=3, buffer_policy="lru")
    assert {k: v.shape for k, v in layer.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    layer.load_state_dict(plain.state_dict())  # the buffer follows its parameters
    layer.to(torch.device("cpu"))
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        assert torch.equal(layer(x), plain(x))
    assert layer.expert_buffer.num_slots == 3 and layer.expert_buffer.policy == "lru"
    assert moe_infer.MoELayer(**options, expert_buffer=100).expert_buffer.num_slots == 8  # at most E slots


def test_buffered_layer_refuses_gradients():
    """The buffer overwrites its slots within a batch, out of autograd's sight: a call that autograd
    would record is refused (the input gradients came out wrong); under no_grad it runs."""
    torch.manual_seed(2)
    layer = moe_infer.MoELayer(16, 8, 4, 2, expert_buffer=2).eval()
    x = torch.randn(6, 16)
    with pytest.raises(RuntimeError, match=r"ExpertBuffer is inference-only .*torch.no_grad\(\)"):
        layer(x)  # the router's weights need gradients
    with torch.no_grad():
        layer(x)
    with torch.inference_mode():
        layer.train()(x)


def test_buffer_of_experts_with_one_bias():
    """MoEExperts with an fc1 bias and no fc2 bias: each bias is its own part."""
    experts = make_experts(4, 16, 16, bias=True)
    experts.down_proj_bias = None
    reference = copy.deepcopy(experts)
    buffer = attach_expert_buffer(experts, 2)
    x, ids, w = torch.randn(6, 16), torch.randint(0, 4, (6, 2)), torch.rand(6, 2)
    given = ids.clone()
    with torch.no_grad():
        torch.testing.assert_close(buffer(x, ids, w), resident_output(reference, x, ids, w), rtol=1e-6, atol=1e-6)
    assert torch.equal(ids, given)  # the caller's int64 ids, which the range check clamps a copy of


def test_buffer_attachment_is_one_per_module():
    """A module takes one buffer (a second would swap the first's store from under it); a layer
    reports the buffer it runs its experts through, and runs one set as its backend."""
    layer = moe_infer.MoELayer(16, 8, 4, 2, expert_buffer=2).eval()
    with pytest.raises(ValueError, match="has an expert buffer already"):
        attach_expert_buffer(layer.experts, 3)
    plain = moe_infer.MoELayer(16, 8, 4, 2).eval()
    reference = copy.deepcopy(plain)
    buffer = attach_expert_buffer(plain.experts, 2)
    assert plain.expert_buffer is None  # attached, not yet the layer's backend
    plain.experts_backend = buffer
    assert plain.expert_buffer is buffer
    x = torch.randn(6, 16)
    with torch.no_grad():
        assert torch.equal(plain(x), reference(x))
    assert buffer.stats()["batches"] == 1
    for copy_ in (copy.deepcopy, lambda m: pickle.dumps(m)):
        with pytest.raises(TypeError, match="ExpertBuffer cannot be copied or pickled"):
            copy_(layer)


def test_buffered_layer_under_torch_compile():
    # The buffer decides on the host which experts to copy: a graph break, and the same output.
    torch.manual_seed(2)
    plain = moe_infer.MoELayer(32, 32, 8, 2)
    layer = moe_infer.MoELayer(32, 32, 8, 2, expert_buffer=3)
    layer.load_state_dict(plain.state_dict())
    layer.expert_buffer.clear()
    compiled = torch.compile(layer)
    with torch.no_grad():
        for num_tokens in (5, 9):
            x = torch.randn(num_tokens, 32)
            assert torch.equal(compiled(x), plain(x))
    torch._dynamo.reset()


def test_simulate_entry_point_and_bytes():
    trace = synthetic_trace(8, 2, 10, 6, num_layers=2, skew=1.0, seed=0)
    result = simulate(trace, cache_sizes=[2, 8], policies=["paper", "belady"], expert_bytes=1000)
    accesses = sum(trace_accesses(trace, layer)[0].numel() for layer in range(2))
    assert result.accesses == accesses
    for row in result.rows():
        assert row["hits"] + row["misses"] == accesses
        assert row["bytes_moved"] == row["misses"] * 1000
        expected = sum(
            model_policy(batches_of(trace, layer), row["cache_size"], row["policy"])[1] for layer in range(2)
        )
        assert row["misses"] == expected


def test_simulate_expert_cache_opcheck():
    accesses, offsets = flatten(batches_of(random_traces()["skewed"]))
    torch.library.opcheck(torch.ops.moe_infer.simulate_expert_cache, (accesses, offsets, 12, [1, 4], ["paper", "lfu"]))


# ---- bad input ---------------------------------------------------------------------------------


def _parametrized(experts):
    """experts with down_proj computed on each read (torch.nn.utils.parametrize)."""
    torch.nn.utils.parametrize.register_parametrization(experts, "down_proj", torch.nn.Identity())
    return experts


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: simulate_expert_cache(*flatten([[2, 1]]), 4, [2], ["lru"]), r"must be distinct and increasing"),
        (lambda: simulate_expert_cache(*flatten([[1, 4]]), 4, [2], ["lru"]), r"accesses\[1\] = 4 is out of range"),
        (lambda: simulate_expert_cache(*flatten([[1]]), 4, [0], ["lru"]), r"every cache size must be >= 1"),
        (lambda: simulate_expert_cache(*flatten([[1]]), 4, [2], ["mru"]), r"policy must be one of"),
        (
            lambda: simulate_expert_cache(torch.tensor([1, 2]), torch.tensor([0, 1]), 4, [2], ["lru"]),
            r"batch_offsets must start at 0 and end at the number of accesses",
        ),
        (lambda: buffered(make_experts(4, 16, 16), 2, "belady"), r"'belady' needs the future"),
        (lambda: buffered(make_experts(4, 16, 16), 2, "random"), r"policy must be one of"),
        (lambda: buffered(make_experts(4, 16, 16), 0), r"num_slots \(0\) must be >= 1"),
        (lambda: buffered(make_experts(4, 16, 16), 2).prefetch([4]), r"expert id 4 is out of range"),
        (
            lambda: buffered(make_experts(4, 16, 16), 2)(
                torch.randn(3, 16).double(), torch.zeros(3, 1).int(), torch.ones(3, 1)
            ),
            r"hidden is torch.float64 but the experts are torch.float32",
        ),
        (
            lambda: buffered(make_experts(4, 16, 16), 2)(
                torch.randn(3, 16), torch.full((3, 1), 4).int(), torch.ones(3, 1)
            ),
            r"ids outside \[-1, 4\)",
        ),
        (
            lambda: buffered(make_experts(4, 16, 16), 2)(
                torch.randn(3, 16), torch.full((3, 1), -2).int(), torch.ones(3, 1)
            ),
            r"ids outside \[-1, 4\)",
        ),
        (lambda: attach_expert_buffer(torch.nn.Linear(4, 4), 2), r"is not a stacked experts module"),
        (lambda: ExpertStore.from_tensors(torch.randn(0, 4, 4), torch.randn(0, 4, 4)), r"there are no experts"),
        (
            lambda: moe_infer.MoELayer(
                16,
                8,
                4,
                2,
                expert_buffer=2,
                expert_store=ExpertStore.from_tensors(
                    torch.randn(4, 16, 16, dtype=torch.bfloat16), torch.randn(4, 16, 8, dtype=torch.bfloat16)
                ),
            ),
            r"the expert store holds torch.bfloat16 weights but the layer is torch.float32; pass dtype=torch.bfloat16",
        ),
        (
            lambda: ExpertStore.from_tensors(torch.randn(2, 4, 4), torch.randn(2, 4)),
            r"fc2_weight must be a 3-D floating tensor \[experts, ...\], got torch.float32 of shape \(2, 4\)",
        ),
        (
            lambda: ExpertStore.from_tensors(torch.ones(2, 4, 4, dtype=torch.int32), torch.randn(2, 4, 4)),
            r"fc1_weight must be a 3-D floating tensor",
        ),
        (
            lambda: buffered(make_experts(4, 16, 16), 2)(
                torch.randn(3, 16), torch.full((3, 1), 2**32 + 3), torch.ones(3, 1)
            ),
            r"ids outside \[-1, 4\)",
        ),
        (lambda: attach_expert_buffer(_parametrized(make_experts(4, 16, 16)), 2), r"down_proj is not a parameter"),
    ],
)
def test_errors(call, message):
    with pytest.raises((ValueError, RuntimeError, TypeError), match=message):
        call()


def test_buffer_recovers_after_a_failed_batch():
    experts = make_experts(4, 16, 16)
    buffer = buffered(experts, 2)
    with pytest.raises(ValueError):
        buffer(torch.randn(3, 16), torch.full((3, 1), 9).int(), torch.ones(3, 1))
    assert run_batches(buffer, experts, [torch.tensor([[0, 3], [1, 2]], dtype=torch.int32)], 16, "cpu")


def test_trace_round_trip_through_simulator(tmp_path):
    trace = synthetic_trace(8, 2, 6, 5, seed=9)
    trace.save(str(tmp_path / "t.pt"))
    loaded = RoutingTrace.load(str(tmp_path / "t.pt"))
    assert torch.equal(simulate(loaded).counts, simulate(trace).counts)


def test_every_policy_on_every_small_trace_exhaustively():
    # Every trace (a, b, a) over 4 experts, each batch a non-empty subset, every cache size.
    subsets = [list(s) for r in range(1, 5) for s in itertools.combinations(range(4), r)]
    for a, b in itertools.product(subsets, subsets):
        batches = [a, b, a]
        counts = simulate_expert_cache(*flatten(batches), 4, [1, 2, 3], list(POLICIES))
        for (p, policy), (c, size) in itertools.product(enumerate(POLICIES), enumerate((1, 2, 3))):
            assert tuple(counts[p, c].tolist()) == model_policy(batches, size, policy), (batches, policy, size)
