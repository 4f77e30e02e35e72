"""Routing traces: the synthetic generator's knobs do what they say; save/load round trips."""

import os

import pytest
import torch

from moe_infer.traces import RoutingTrace, synthetic_trace, zipf_weights


def share_of_top(trace, top):
    counts = trace.expert_counts(0).sum(0).double()
    return (counts.sort(descending=True).values[:top].sum() / counts.sum()).item()


def test_shapes_distinct_experts_and_determinism():
    trace = synthetic_trace(32, 4, num_batches=5, tokens_per_batch=64, num_layers=2, seed=3)
    assert trace.num_layers == 2 and trace.num_batches == 5
    for batches in trace.layers:
        for ids in batches:
            assert ids.shape == (64, 4) and ids.dtype == torch.int32
            assert int(ids.min()) >= 0 and int(ids.max()) < 32
            sorted_ids = ids.sort(-1).values
            assert (sorted_ids[:, 1:] != sorted_ids[:, :-1]).all(), "an expert twice in one token"
    again = synthetic_trace(32, 4, num_batches=5, tokens_per_batch=64, num_layers=2, seed=3)
    assert all(torch.equal(a, b) for la, lb in zip(trace.layers, again.layers) for a, b in zip(la, lb))


def test_skew_concentrates_load():
    uniform = synthetic_trace(64, 1, 20, 500, skew=0.0, locality=1.0, seed=0)
    skewed = synthetic_trace(64, 1, 20, 500, skew=1.5, locality=1.0, seed=0)
    assert share_of_top(uniform, 4) < 0.1  # 4/64 = 0.0625 expected
    expected = zipf_weights(64, 1.5)[:4].sum().item()
    assert share_of_top(skewed, 4) == pytest.approx(expected, abs=0.03)


def test_locality_keeps_hot_sets_across_batches():
    def overlap(trace):
        hot = [set(trace.expert_counts(0)[b].topk(8).indices.tolist()) for b in range(trace.num_batches)]
        return sum(len(a & b) for a, b in zip(hot, hot[1:])) / (8 * (len(hot) - 1))

    assert overlap(synthetic_trace(64, 2, 30, 400, skew=1.2, locality=0.95, seed=1)) > 0.7
    assert overlap(synthetic_trace(64, 2, 30, 400, skew=1.2, locality=0.0, seed=1)) < 0.4


def test_coactivation_pairs_experts_of_one_cluster():
    def same_cluster_rate(trace):
        ids = torch.cat(trace.layers[0]).long()
        cluster = torch.tensor(trace.meta["clusters"][0])
        return (cluster[ids[:, 0]] == cluster[ids[:, 1]]).double().mean().item()

    loose = synthetic_trace(64, 2, 20, 500, skew=0.0, coactivation=0.0, cluster_size=4, seed=2)
    tight = synthetic_trace(64, 2, 20, 500, skew=0.0, coactivation=0.95, cluster_size=4, seed=2)
    # Uniform popularity: 3 of the 63 other experts share the first's cluster (4.8%); a boost of
    # 1 / (1 - 0.95) = 20 makes that 60 / 120 = 50%.
    assert same_cluster_rate(loose) == pytest.approx(3 / 63, abs=0.02)
    assert same_cluster_rate(tight) == pytest.approx(0.5, abs=0.04)


def test_save_load_round_trip_and_corrupt_file(tmp_path):
    trace = synthetic_trace(16, 2, 3, 10, num_layers=2, seed=4)
    trace.layers[1][2][0, 1] = -1  # an unrouted pair survives the round trip
    path = tmp_path / "trace.pt"
    trace.save(str(path))
    loaded = RoutingTrace.load(str(path))
    assert loaded.num_experts == 16 and loaded.top_k == 2 and loaded.meta["skew"] == 1.0
    assert all(torch.equal(a, b) for la, lb in zip(trace.layers, loaded.layers) for a, b in zip(la, lb))
    assert loaded.active_experts(1, 2) == sorted(set(trace.layers[1][2].flatten().tolist()) - {-1})
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match="not a readable routing trace"):
        RoutingTrace.load(str(path))


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"top_k \(9\)"):
        synthetic_trace(8, 9, 1, 1)
    with pytest.raises(ValueError, match=r"locality"):
        synthetic_trace(8, 2, 1, 1, locality=1.5)
    with pytest.raises(ValueError, match=r"coactivation"):
        synthetic_trace(8, 2, 1, 1, coactivation=1.0)
    bad = RoutingTrace(4, 2, [[torch.tensor([[0, 4]], dtype=torch.int32)]])
    with pytest.raises(ValueError, match=r"ids outside"):
        bad.validate()


def test_every_batch_keeps_the_skew_while_the_hot_set_drifts():
    # Drift changes which experts are hot, never how skewed a batch is: the share of each batch's
    # four busiest experts stays the Zipf value at any locality.
    expected = zipf_weights(64, 1.5)[:4].sum().item()
    for locality in (0.0, 0.8, 0.99):
        trace = synthetic_trace(64, 1, 30, 2000, skew=1.5, locality=locality, seed=6)
        counts = trace.expert_counts(0).double()
        top4 = (counts.topk(4, dim=1).values.sum(1) / counts.sum(1)).mean().item()
        assert top4 == pytest.approx(expected, abs=0.03), locality
    # ...and the hot set does drift below locality 1: the hottest expert of the first batch is not
    # the hottest of every batch.
    drifting = synthetic_trace(64, 1, 30, 2000, skew=1.5, locality=0.8, seed=6).expert_counts(0)
    assert len(set(drifting.argmax(1).tolist())) > 1


RECORDED = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "results", "traces")


@pytest.mark.parametrize("name, tokens_per_batch", [("lm_prefill.pt", 1024), ("lm_decode.pt", 4)])
def test_recorded_traces_are_whole_and_routed_top2(name, tokens_per_batch):
    # The committed traces of bench/routing_lm.py: every batch, both layers, two distinct experts a token.
    trace = RoutingTrace.load(os.path.join(RECORDED, name))
    assert (trace.num_experts, trace.top_k, trace.num_layers) == (32, 2, 2)
    assert trace.num_batches >= 64 and "text" in trace.meta
    for layer in range(trace.num_layers):
        for ids in trace.layers[layer]:
            assert ids.shape == (tokens_per_batch, 2)
            assert bool((ids >= 0).all()) and bool((ids[:, 0] != ids[:, 1]).all())
        # A router trained with a balancing loss spreads 64K held-out tokens over every expert.
        if tokens_per_batch > 4:
            assert bool((trace.expert_counts(layer).sum(0) > 0).all())
