"""Expert placement: the C++ algorithms against plain-Python re-implementations and brute force,
the metrics, the load recorder, and the errors on invalid placements."""

import itertools

import numpy as np
import pytest
import torch

from moe_infer.placement import (
    LoadRecorder,
    Placement,
    load_metrics,
    pearson_correlation,
    plan_placement,
    rank_loads,
)
from moe_infer.traces import synthetic_trace

# ---- independent references ---------------------------------------------------------------------


def reference_replicas(load, experts, num_slots, max_replicas):
    """EPLB's rule with a plain loop: each spare slot to the largest load per replica."""
    replicas = {e: 1 for e in experts}
    for _ in range(num_slots - len(experts)):
        open_experts = [e for e in experts if replicas[e] < max_replicas]
        if not open_experts:
            break
        best = max(open_experts, key=lambda e: (load[e] / replicas[e], -replicas[e], -e))
        replicas[best] += 1
    return replicas


def reference_pack(items, num_bins, capacity, correlation=None, weight=0.5):
    """The greedy packing with plain loops: items (expert, load) by load desc -> bins of experts."""
    items = sorted(items, key=lambda item: (-item[1], item[0]))
    unit = sum(load for _, load in items) / num_bins or 1.0
    bins, bin_load = [[] for _ in range(num_bins)], [0.0] * num_bins
    for expert, load in items:
        candidates = []
        for b in range(num_bins):
            if len(bins[b]) >= capacity:
                continue
            cost = bin_load[b]
            if correlation is not None:
                cost /= unit
                for other in bins[b]:
                    cost += weight * correlation[expert][other]
            candidates.append((expert in bins[b], cost, len(bins[b]), b))
        best = min(candidates)[3]
        bins[best].append(expert)
        bin_load[best] += load
    return bins


def reference_placement(load, num_ranks, slots, algorithm="greedy", replicate=False, correlation=None):
    num_experts = len(load)
    if algorithm == "contiguous":
        return [list(range(r * num_experts // num_ranks, (r + 1) * num_experts // num_ranks)) for r in range(num_ranks)]
    experts = list(range(num_experts))
    replicas = (
        reference_replicas(load, experts, num_ranks * slots, num_ranks) if replicate else dict.fromkeys(experts, 1)
    )
    items = [(e, load[e] / replicas[e]) for e in experts for _ in range(replicas[e])]
    corr = correlation.tolist() if algorithm == "anti_correlation" else None
    return [sorted(b) for b in reference_pack(items, num_ranks, slots, corr)]


def table_of(rank_experts, slots):
    return [experts + [-1] * (slots - len(experts)) for experts in rank_experts]


def max_rank_load(placement, load):
    return rank_loads(placement, torch.tensor(load, dtype=torch.float64)).max().item()


def brute_force_max_load(load, num_ranks, slots, replicate=False):
    """Smallest max rank load over every way to give each expert one rank (or, with replicate,
    any number of replicas on distinct ranks, its load split evenly), at most `slots` per rank."""
    num_experts = len(load)
    if replicate:  # each expert: a non-empty set of ranks
        rank_sets = [c for n in range(1, num_ranks + 1) for c in itertools.combinations(range(num_ranks), n)]
    else:
        rank_sets = [(r,) for r in range(num_ranks)]
    best = float("inf")
    for choice in itertools.product(rank_sets, repeat=num_experts):
        used, rank_load = [0] * num_ranks, [0.0] * num_ranks
        for e, ranks in enumerate(choice):
            for r in ranks:
                used[r] += 1
                rank_load[r] += load[e] / len(ranks)
        if max(used) <= slots:
            best = min(best, max(rank_load))
    return best


def skewed_loads(count, num_experts, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        skew = float(torch.empty(1).uniform_(0.5, 2.0, generator=gen))
        ranks = torch.arange(1, num_experts + 1, dtype=torch.float64)
        yield (ranks.pow(-skew) * 1000)[torch.randperm(num_experts, generator=gen)]


# ---- the algorithms -----------------------------------------------------------------------------


@pytest.mark.parametrize("num_experts,num_ranks,slots", [(16, 4, 4), (12, 4, 3), (10, 3, 4), (64, 8, 9), (7, 7, 1)])
@pytest.mark.parametrize(
    "algorithm,replicate",
    [
        ("contiguous", False),
        ("greedy", False),
        ("greedy", True),
        ("anti_correlation", False),
        ("anti_correlation", True),
    ],
)
def test_placement_matches_python_reference(num_experts, num_ranks, slots, algorithm, replicate):
    load = (torch.rand(num_experts, dtype=torch.float64) ** 3 * 100).tolist()
    correlation = pearson_correlation(torch.rand(20, num_experts))
    placement = plan_placement(torch.tensor(load), num_ranks, slots, algorithm, replicate, correlation)
    expected = reference_placement(load, num_ranks, slots, algorithm, replicate, correlation)
    assert placement.slot_expert.tolist() == table_of(expected, slots)
    assert placement.replica_count.min() >= 1  # every expert placed
    if replicate:
        assert (placement.slot_expert >= 0).all()  # every spare slot used


@pytest.mark.parametrize(
    "load,num_ranks,slots",
    [([7, 5, 4, 3, 2, 1], 2, 3), ([9, 8, 3, 3, 2, 2, 1, 0], 4, 2), ([5, 5, 4, 4, 3, 3], 3, 2), ([6, 1, 1, 1], 2, 2)],
)
def test_greedy_is_optimal_on_small_cases(load, num_ranks, slots):
    placement = plan_placement(torch.tensor(load, dtype=torch.float64), num_ranks, slots, "greedy")
    assert max_rank_load(placement, load) == pytest.approx(brute_force_max_load(load, num_ranks, slots))


def test_greedy_is_never_worse_than_contiguous_on_skewed_loads():
    worse, gains = 0, []
    for load in skewed_loads(40, 32, seed=1):
        for num_ranks in (2, 4, 8):
            greedy = max_rank_load(plan_placement(load, num_ranks, algorithm="greedy"), load.tolist())
            contiguous = max_rank_load(Placement.contiguous(32, num_ranks), load.tolist())
            worse += greedy > contiguous + 1e-9
            gains.append(contiguous / greedy)
    assert worse == 0
    assert np.mean(gains) > 1.2  # and usually much better


def test_greedy_stays_close_to_brute_force_on_random_small_cases():
    for load in skewed_loads(12, 6, seed=2):
        load = load.tolist()
        greedy = max_rank_load(plan_placement(torch.tensor(load), 3, 2, "greedy"), load)
        assert greedy <= brute_force_max_load(load, 3, 2) * 4 / 3 + 1e-9  # Graham's LPT bound


def test_replication_cuts_max_load_and_nears_brute_force():
    for load, num_ranks, slots in [([10.0, 1, 1, 1], 2, 3), ([12.0, 6, 1, 1, 1, 1], 3, 3), ([20.0, 2, 2, 2], 2, 3)]:
        greedy = max_rank_load(plan_placement(torch.tensor(load), num_ranks, slots, "greedy"), load)
        replicated = plan_placement(torch.tensor(load), num_ranks, slots, "greedy", replicate=True)
        best = brute_force_max_load(load, num_ranks, slots, replicate=True)
        assert max_rank_load(replicated, load) < greedy
        assert max_rank_load(replicated, load) <= best * 1.1 + 1e-9
        hot = int(np.argmax(load))
        assert sorted(replicated.ranks_of_expert(hot)) == list(range(num_ranks))  # one replica per rank


def test_replication_reaches_balance_where_greedy_cannot():
    load = next(skewed_loads(1, 32, seed=3)) * 0 + torch.tensor([300.0] + [10.0] * 31)
    greedy = plan_placement(load, 8, 5, "greedy")
    replicated = plan_placement(load, 8, 5, "greedy", replicate=True)
    balance = lambda p: load_metrics(rank_loads(p, load)).balancedness  # noqa: E731
    assert balance(greedy) < 0.5 and balance(replicated) > 0.9


def test_anti_correlation_splits_correlated_experts():
    # Equal loads; experts 0 and 2 fire together, so do 1 and 3. Greedy pairs them, anti-correlation splits them.
    correlation = torch.eye(4, dtype=torch.float64)
    correlation[0, 2] = correlation[2, 0] = correlation[1, 3] = correlation[3, 1] = 0.9
    load = torch.full((4,), 4.0, dtype=torch.float64)
    greedy = plan_placement(load, 2, 2, "greedy")
    anti = plan_placement(load, 2, 2, "anti_correlation", correlation=correlation)
    assert greedy.slot_expert.tolist() == [[0, 2], [1, 3]]
    assert anti.slot_expert.tolist() == [[0, 3], [1, 2]]
    # On batches where the correlated experts spike together, that lowers the busiest rank's share.
    gen = torch.Generator().manual_seed(0)
    spikes = torch.rand(200, 2, generator=gen) * 10
    counts = torch.stack([spikes[:, 0], spikes[:, 1], spikes[:, 0], spikes[:, 1]], 1) + 1
    assert load_metrics(rank_loads(anti, counts)).avg_max_load < load_metrics(rank_loads(greedy, counts)).avg_max_load


def test_hierarchical_keeps_groups_on_one_node_and_balances_nodes():
    gen = torch.Generator().manual_seed(4)
    load = torch.rand(16, generator=gen, dtype=torch.float64) ** 2 * 100
    group = torch.randperm(16, generator=gen) % 4  # 4 groups of 4 experts
    placement = plan_placement(load, 4, 5, "greedy", replicate=True, num_nodes=2, expert_group=group)
    node_of_rank = [0, 0, 1, 1]
    for g in range(4):
        nodes = {
            node_of_rank[r] for e in (group == g).nonzero().flatten().tolist() for r in placement.ranks_of_expert(e)
        }
        assert len(nodes) == 1, f"group {g} spans nodes {nodes}"
    group_load = [load[group == g].sum().item() for g in range(4)]
    node_load = rank_loads(placement, load).view(2, 2).sum(1)
    best = min(
        max(sum(group_load[g] for g in pair), sum(group_load) - sum(group_load[g] for g in pair))
        for pair in itertools.combinations(range(4), 2)
    )
    assert node_load.max().item() == pytest.approx(best)  # greedy on 4 groups into 2 nodes is optimal here


def test_placement_op_opcheck():
    load = torch.rand(12, dtype=torch.float64)
    correlation = pearson_correlation(torch.rand(30, 12))
    for args in [
        (load, 4, 3, "greedy", False, None, 0.5, 1, None),
        (load, 4, 4, "anti_correlation", True, correlation, 0.5, 2, None),
        (load.float(), 3, 4, "contiguous", False, None, 0.5, 1, None),
        (load, 4, 4, "greedy", True, None, 0.5, 2, torch.arange(12) // 3),
    ]:
        torch.library.opcheck(torch.ops.moe_infer.expert_placement, args)


@pytest.mark.parametrize(
    "call,message",
    [
        (
            lambda: plan_placement(torch.rand(10), 2, 4),
            r"10 experts do not fit on 2 ranks x 4 slots per rank \(8 slots\)",
        ),
        (lambda: plan_placement(torch.rand(8), 2, 4, "round_robin"), r"algorithm must be one of"),
        (lambda: plan_placement(torch.rand(8), 2, 4, "anti_correlation"), r"needs a correlation matrix"),
        (lambda: plan_placement(torch.rand(8), 2, 4, "contiguous", replicate=True), r"replicate needs a load-aware"),
        (lambda: plan_placement(torch.tensor([1.0, float("nan")]), 2, 1), r"expert_load\[1\] = nan must be finite"),
        (lambda: plan_placement(torch.tensor([1.0, -2.0]), 2, 1), r"expert_load\[1\] = -2 must be finite and >= 0"),
        (lambda: plan_placement(torch.rand(8), 4, 2, num_nodes=3), r"num_nodes \(3\) must be >= 1 and divide"),
        (
            lambda: plan_placement(torch.rand(8), 2, 4, "anti_correlation", correlation=torch.eye(7)),
            r"correlation must have shape \[8, 8\]",
        ),
        (
            lambda: plan_placement(
                torch.rand(8), 4, 2, num_nodes=2, expert_group=torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
            ),
            r"equal groups; group 0 has 3",
        ),
        (
            lambda: plan_placement(torch.rand(6), 4, 2, num_nodes=2, expert_group=torch.arange(6) // 2),
            r"groups \(3\) must be a multiple of num_nodes \(2\)",
        ),
        (lambda: plan_placement(torch.rand(4), 0, 2), r"num_ranks \(0\) must be >= 1"),
        (lambda: Placement([[0, 1], [1, -1]], 3), r"expert 2 is on no rank"),
        (lambda: Placement([[0, 1], [3, 2]], 3), r"slot \(1, 0\) holds expert 3"),
        (lambda: Placement([0, 1, 2], 3), r"must be a non-empty \[num_ranks, slots_per_rank\] table"),
        (lambda: Placement([[0.0, 1.0]], 2), r"must hold integer expert ids"),
        (
            lambda: Placement.from_rank_experts([[0, 1, 2], [3]], 4, 2),
            r"rank 0 is given 3 experts but has only 2 slots",
        ),
        (lambda: rank_loads(Placement.contiguous(4, 2), torch.ones(5)), r"counts have 5 experts, placement has 4"),
        (lambda: load_metrics(torch.zeros(3, 2)), r"no batch has any tokens"),
    ],
)
def test_invalid_placements_are_rejected(call, message):
    with pytest.raises((ValueError, RuntimeError), match=message):
        call()


def test_placement_tables_and_replica_maps():
    placement = Placement.from_rank_experts([[0, 3], [1, 0, 2], [3]], num_experts=4)
    assert placement.slot_expert.tolist() == [[0, 3, -1], [1, 0, 2], [3, -1, -1]]
    assert placement.replica_count.tolist() == [2, 1, 1, 2]
    assert placement.expert_slots.tolist() == [[0, 4], [3, -1], [5, -1], [1, 6]]
    assert placement.ranks_of_expert(3) == [0, 2]
    same = Placement.from_state_dict(placement.state_dict())
    assert same == placement and same.fingerprint() == placement.fingerprint()
    assert Placement.contiguous(4, 3).fingerprint() != placement.fingerprint()
    assert Placement.contiguous(10, 4).slot_expert.tolist() == [[0, 1, -1], [2, 3, 4], [5, 6, -1], [7, 8, 9]]


# ---- metrics ------------------------------------------------------------------------------------


def test_rank_loads_and_metrics_by_hand():
    placement = Placement.from_rank_experts([[0, 1], [0, 2]], num_experts=3)  # expert 0 replicated
    counts = torch.tensor([[8.0, 2.0, 0.0], [0.0, 1.0, 3.0], [0.0, 0.0, 0.0]])
    loads = rank_loads(placement, counts)
    assert loads.tolist() == [[6.0, 4.0], [1.0, 3.0], [0.0, 0.0]]
    metrics = load_metrics(loads)  # the empty batch is left out
    assert metrics.max_load == pytest.approx(0.75)
    assert metrics.avg_max_load == pytest.approx((0.6 + 0.75) / 2)
    assert metrics.balancedness == pytest.approx((5 / 6 + 2 / 3) / 2)


def test_pearson_correlation_matches_numpy():
    samples = torch.randn(50, 6, dtype=torch.float64)
    samples[:, 3] = 2.0  # a constant column correlates with nothing
    with np.errstate(invalid="ignore"):  # numpy divides by the constant column's zero deviation
        expected = np.corrcoef(samples.numpy(), rowvar=False)
    expected[3, :] = 0.0
    expected[:, 3] = 0.0
    expected[3, 3] = 1.0
    np.testing.assert_allclose(pearson_correlation(samples).numpy(), expected, atol=1e-12)


# ---- load recorder ------------------------------------------------------------------------------


def test_load_recorder_window_ema_and_correlation(tmp_path):
    recorder = LoadRecorder(num_layers=2, num_experts=5, window=3, ema_decay=0.5)
    batches = [torch.randint(-1, 5, (7, 2), dtype=torch.int32) for _ in range(5)]
    expected_counts = []
    for ids in batches:
        recorder.record(1, ids)
        flat = ids.flatten()
        expected_counts.append([int((flat == e).sum()) for e in range(5)])
    expected_ema = np.array(expected_counts[0], dtype=np.float64)
    for counts in expected_counts[1:]:
        expected_ema = 0.5 * expected_ema + 0.5 * np.array(counts)
    assert recorder.window_counts(1).tolist() == expected_counts[-3:]  # oldest first, after wrapping
    assert recorder.window_counts(0).shape == (0, 5)
    np.testing.assert_allclose(recorder.load(1).numpy(), np.mean(expected_counts[-3:], 0))
    np.testing.assert_allclose(recorder.load(1, "ema").numpy(), expected_ema)
    torch.testing.assert_close(recorder.correlation(1), pearson_correlation(torch.tensor(expected_counts[-3:])))
    path = tmp_path / "load.pt"
    recorder.save(str(path))
    loaded = LoadRecorder.load_file(str(path))
    assert loaded.window_counts(1).tolist() == expected_counts[-3:] and loaded.steps == [0, 5]
    torch.testing.assert_close(loaded.load(1, "ema"), recorder.load(1, "ema"))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="not a readable load record"):
        LoadRecorder.load_file(str(path))
    with pytest.raises(IndexError, match=r"layer 2 is out of range"):
        recorder.record(2, batches[0])
    with pytest.raises(ValueError, match=r"source must be 'window' or 'ema'"):
        recorder.load(0, "median")


def test_recorder_plans_from_a_trace():
    trace = synthetic_trace(16, 2, num_batches=20, tokens_per_batch=200, skew=1.5, locality=0.9, seed=5)
    recorder = LoadRecorder.from_trace(trace, range(10))
    load = trace.expert_counts(0)[:10].double().mean(0)
    torch.testing.assert_close(recorder.load(0), load)
    planned = recorder.plan(0, 4, algorithm="anti_correlation", replicate=True, slots_per_rank=5)
    direct = plan_placement(load, 4, 5, "anti_correlation", True, pearson_correlation(trace.expert_counts(0)[:10]))
    assert planned == direct


def test_recorder_rejects_expert_ids_out_of_range():
    recorder = LoadRecorder(num_layers=2, num_experts=5)
    with pytest.raises(ValueError, match=r"LoadRecorder.record: expert_ids has 5 \(flat index 3\); expected -1"):
        recorder.record(0, torch.tensor([[0, 1], [-1, 5]]))
    with pytest.raises(ValueError, match=r"expert_ids has -2"):
        recorder.record(0, torch.tensor([[-2, 1]]))
    with pytest.raises(IndexError, match=r"layer 2 is out of range"):
        recorder.record(2, torch.tensor([[0, 1]]))
    recorder.record(1, torch.tensor([[0, -1], [4, 4]]))
    assert recorder.counts[1, 0].tolist() == [1, 0, 0, 0, 2]
