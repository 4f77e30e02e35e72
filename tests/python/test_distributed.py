"""Expert parallelism over torch.distributed: gloo process groups of 2 and 4 ranks on this machine.

Each test spawns one group of processes that runs several checks against the single-process
MoELayer (same parameters) and independent references; a child's failure comes back with its
traceback, and a group that does not finish in time fails the test (it never hangs the suite).
"""

import datetime
import os
import queue as queue_module
import re
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moe_infer
from moe_infer import reference as ref
from moe_infer.distributed import ExpertParallelError, expert_parallel, static_capacity
from moe_infer.placement import LoadRecorder, Placement, pearson_correlation, plan_placement

HIDDEN, FFN, EXPERTS, TOP_K = 12, 8, 8, 2
GROUP_DEADLINE_S = 90  # a whole spawned group, imports included (the machine may be busy)


def run_ranks(worker, world_size, tmp_path, *args):
    """Runs worker(rank, world_size, *args) in world_size spawned processes of one gloo group.

    Returns {rank: result} for the ranks that returned; raises on any child's exception, and
    kills the group if it has not finished within GROUP_DEADLINE_S.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = str(tmp_path / f"store_{worker.__name__}_{world_size}")
    procs = [
        ctx.Process(target=_rank_entry, args=(worker, rank, world_size, store, results, args))
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + GROUP_DEADLINE_S
    outcomes = {}
    try:
        while len(outcomes) < world_size and any(p.is_alive() for p in procs) or not results.empty():
            try:
                rank, status, payload = results.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
                outcomes[rank] = (status, payload)
            except queue_module.Empty:
                if time.monotonic() > deadline:
                    pytest.fail(f"{worker.__name__} with {world_size} ranks did not finish in {GROUP_DEADLINE_S} s")
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    errors = [f"rank {rank}:\n{payload}" for rank, (status, payload) in sorted(outcomes.items()) if status == "error"]
    if errors:
        pytest.fail("\n".join(errors), pytrace=False)
    return {rank: payload for rank, (_, payload) in outcomes.items()}


def _rank_entry(worker, rank, world_size, store, results, args):
    torch.set_num_threads(1)  # several ranks share two cores
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=60),
        )
        results.put((rank, "ok", worker(rank, world_size, *args)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def make_layer():
    torch.manual_seed(0)  # the same parameters on every rank
    return moe_infer.MoELayer(HIDDEN, FFN, EXPERTS, TOP_K, expert_bias=True, renormalize=True).eval()


def rank_inputs(world_size):
    """Uneven batches, and rank 1 gets no tokens at all."""
    sizes = [5, 0, 13, 7][:world_size]
    gen = torch.Generator().manual_seed(123)
    return [torch.randn(n, HIDDEN, generator=gen) for n in sizes]


def placements_for(world_size):
    gen = torch.Generator().manual_seed(7)
    load = torch.rand(EXPERTS, generator=gen, dtype=torch.float64) ** 3 * 100
    correlation = pearson_correlation(torch.rand(16, EXPERTS, generator=gen))
    spare = EXPERTS // world_size + 1
    placements = {
        "contiguous": Placement.contiguous(EXPERTS, world_size),
        "greedy": plan_placement(load, world_size),
        "anti_correlation": plan_placement(load, world_size, algorithm="anti_correlation", correlation=correlation),
        "greedy+replicas": plan_placement(load, world_size, spare, replicate=True),
        "anti_correlation+replicas": plan_placement(
            load, world_size, spare, "anti_correlation", replicate=True, correlation=correlation
        ),
        # an empty slot, and expert 0 twice on rank 0
        "hand-made": Placement.from_rank_experts(
            [[0, 0, 1, 2, 3]] + [[4, 5, 6, 7, 0]] + [[e] for e in range(world_size - 2)], EXPERTS
        ),
    }
    if world_size == 4:
        placements["hierarchical"] = plan_placement(
            load, 4, 3, replicate=True, num_nodes=2, expert_group=torch.arange(EXPERTS) // 2
        )
    return placements


# ---- workers (run in the spawned ranks) ---------------------------------------------------------


def _equivalence_worker(rank, world_size):
    layer = make_layer()
    inputs = rank_inputs(world_size)
    x = inputs[rank]
    with torch.no_grad():
        expected = layer(x)
        for name, placement in placements_for(world_size).items():
            dynamic = expert_parallel(layer, placement)
            out = dynamic(x)
            torch.testing.assert_close(out, expected, msg=f"dynamic, {name}")
            assert dynamic.experts.last_stats.rows_sent == x.shape[0] * TOP_K  # exactly the routed pairs
            # Static with a capacity of the largest batch: nothing is dropped, same result.
            static = expert_parallel(layer, placement, mode="static", capacity_fraction=1.0)
            torch.testing.assert_close(static(x), out, msg=f"static, {name}")
            stats = static.experts.last_stats
            assert stats.dropped_pairs == 0 and stats.capacity == max(t.shape[0] for t in inputs)
            assert stats.rows_sent == placement.num_slots * stats.capacity  # placeholders are sent too
            if placement.max_replicas == 1:  # rows received = every rank's pairs for this rank's experts
                mine = set(placement.rank_experts(rank))
                routed = torch.cat([layer.route(t)[2].flatten() for t in inputs]).tolist()
                assert dynamic.experts.last_stats.rows_received == sum(e in mine for e in routed)
            else:  # a replicated expert's pairs are dealt evenly to its replicas
                ids = layer.route(x)[2]
                slots = dynamic.experts.physical_slots(ids)
                for e in range(EXPERTS):
                    replicas = placement.expert_slots[e][: placement.replica_count[e]]
                    per_replica = [int((slots[ids == e] == s).sum()) for s in replicas.tolist()]
                    assert sum(per_replica) == int((ids == e).sum())
                    assert max(per_replica) - min(per_replica) <= 1, (name, e, per_replica)
        # Every rank without tokens: both all-to-alls run empty.
        for mode in ("dynamic", "static"):
            empty = expert_parallel(layer, placements_for(world_size)["greedy+replicas"], mode=mode)
            assert empty(torch.zeros(0, HIDDEN)).shape == (0, HIDDEN)
        # GPT-OSS's layout: transposed stacked weights, biases, clamped swiGLU, top-k then softmax.
        torch.manual_seed(1)
        gpt_oss = moe_infer.MoELayer(
            HIDDEN, FFN, EXPERTS, TOP_K, "gpt_oss_swiglu", "softmax_topk", expert_bias=True, weights_transposed=True
        ).eval()
        placement = placements_for(world_size)["anti_correlation+replicas"]
        torch.testing.assert_close(expert_parallel(gpt_oss, placement)(x), gpt_oss(x), msg="gpt-oss layout")
        # Gated activations other than SiLU (transformers' hidden_act "gelu", "gelu_pytorch_tanh", "relu").
        for activation in ("gelu_glu", "gelu_tanh_glu", "relu_glu"):
            torch.manual_seed(2)
            gated = moe_infer.MoELayer(HIDDEN, FFN, EXPERTS, TOP_K, activation).eval()
            torch.testing.assert_close(expert_parallel(gated, placement)(x), gated(x), msg=activation)
    return "ok"


def _static_drops_worker(rank, world_size):
    """Static mode with a small capacity: fairseq's drop rule, checked with a plain loop."""
    layer = make_layer()
    inputs = rank_inputs(world_size)
    x = inputs[rank]
    with torch.no_grad():
        static = expert_parallel(layer, Placement.contiguous(EXPERTS, world_size), mode="static", capacity_factor=0.5)
        out = static(x)
        capacity = static_capacity(max(t.shape[0] for t in inputs), EXPERTS, TOP_K, 0.5)
        _, weights, ids = layer.route(x)
        used = [0] * EXPERTS
        expected = torch.zeros_like(x)
        dropped = 0
        for j in range(TOP_K):  # all first choices, then all second choices, in token order
            for t in range(x.shape[0]):
                e = int(ids[t, j])
                if used[e] >= capacity:
                    dropped += 1
                    continue
                used[e] += 1
                experts = layer.experts
                row = ref.expert_ffn(
                    x[t : t + 1],
                    experts.gate_up_proj[e],
                    experts.gate_up_proj_bias[e],
                    experts.down_proj[e],
                    experts.down_proj_bias[e],
                    layer.activation,
                )
                expected[t] += weights[t, j] * row[0]
        torch.testing.assert_close(out, expected)
        assert static.experts.last_stats.dropped_pairs == dropped
    return dropped


def _rebalance_worker(rank, world_size):
    layer = make_layer()
    inputs = rank_inputs(world_size)
    x = inputs[rank]
    recorder = LoadRecorder(num_layers=1, num_experts=EXPERTS, window=4)
    with torch.no_grad():
        expected = layer(x)
        ep = expert_parallel(layer, Placement.contiguous(EXPERTS, world_size), recorder=recorder)
        ep(x)
        ep(x)
        recorder.all_reduce()
        # The global load: every rank's tokens (each rank can route every rank's batch).
        global_counts = sum(torch.bincount(layer.route(t)[2].flatten().long(), minlength=EXPERTS) for t in inputs)
        assert recorder.window_counts(0).tolist() == [global_counts.tolist()] * 2
        old = ep.experts.placement
        new = recorder.plan(0, world_size, algorithm="greedy", replicate=True, slots_per_rank=EXPERTS // world_size + 1)
        report = ep.rebalance(new)
        moves = sum(
            1 for r in range(world_size) for e in new.rank_experts(r) if e >= 0 and r not in old.ranks_of_expert(e)
        )
        experts = layer.experts
        expert_bytes = 4 * (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel() + 2 * FFN + HIDDEN)
        assert (report.experts_moved, report.bytes_moved) == (moves, moves * expert_bytes)
        for slot, e in enumerate(new.rank_experts(rank)):
            torch.testing.assert_close(ep.experts.gate_up_proj[slot], experts.gate_up_proj[e])
            torch.testing.assert_close(ep.experts.down_proj_bias[slot], experts.down_proj_bias[e])
        torch.testing.assert_close(ep(x), expected)
    return report.bytes_moved


def _errors_worker(rank, world_size):
    layer = make_layer()
    gen = torch.Generator().manual_seed(5)
    load = torch.rand(EXPERTS, generator=gen)
    messages = []
    # Ranks that disagree on the placement, or a placement for another world size: every rank raises.
    disagreeing = Placement.contiguous(EXPERTS, world_size) if rank == 0 else plan_placement(load, world_size)
    for placement, pattern in [
        (disagreeing, r"the ranks disagree on (.*; )?placement fingerprint \(rank 0 has -?\d+, rank 1 has -?\d+"),
        (
            Placement.contiguous(EXPERTS, world_size + 1),
            rf"placement is for {world_size + 1} ranks but the process group has {world_size}",
        ),
    ]:
        try:
            expert_parallel(layer, placement)
        except ExpertParallelError as error:
            assert re.search(pattern, str(error)), str(error)
            messages.append(str(error))
        else:
            raise AssertionError(f"no error for {pattern}")
    ep = expert_parallel(layer, validate=True)  # the group still works after the refused constructions
    x = torch.randn(3, HIDDEN)
    for call, error_type, pattern in [
        (lambda: ep(x.clone().requires_grad_()), RuntimeError, "inference-only"),
        (lambda: ep.experts(x, torch.rand(3, 2), torch.tensor([[0, 8]] * 3)), ValueError, r"values in \[0, 8\]"),
        (lambda: ep.experts(x, torch.rand(3, 2), torch.zeros(3, 2)), ValueError, r"int32 or int64"),
        (
            lambda: ep.experts(x[:, :5], torch.rand(3, 2), torch.zeros(3, 2, dtype=torch.int32)),
            ValueError,
            r"\[num_tokens, 12\]",
        ),
    ]:
        try:
            call()
        except error_type as error:
            assert re.search(pattern, str(error)), str(error)
        else:
            raise AssertionError(f"no error for {pattern}")
    with torch.no_grad():
        torch.testing.assert_close(ep(x), layer(x))
    return messages


# Each setting that changes what is exchanged or computed, as (name in the error, MoELayer
# arguments, expert_parallel options) for rank 1; rank 0 builds the default layer.
DIFFERING_SETTINGS = [
    ("hidden_size", {"hidden_size": HIDDEN + 4}, {}),
    ("ffn_size", {"ffn_size": FFN * 2}, {}),
    ("num_experts", {"num_experts": EXPERTS * 2}, {}),
    ("top_k", {"top_k": TOP_K - 1}, {}),
    ("activation", {"activation": "gelu"}, {}),
    ("weight dtype", {"dtype": torch.float16}, {}),
    ("expert biases", {"expert_bias": False}, {}),
    ("weights_transposed", {"weights_transposed": True}, {}),
    ("scoring", {"scoring": "sigmoid"}, {}),
    ("renormalize", {"renormalize": False}, {}),
    ("scaling_factor", {"scaling_factor": 2.5}, {}),
    ("selection_bias", {"selection_bias": True}, {}),
    ("mode", {}, {"mode": "static"}),
    ("capacity_factor", {}, {"capacity_factor": 2.0}),
    ("capacity_fraction", {}, {"capacity_fraction": 0.5}),
    ("placement fingerprint", {}, {"placement": "planned"}),
]


def _differing_settings_worker(rank, world_size):
    """Rank 1 differs from rank 0 in one setting at a time: both must raise the same error."""
    messages = []
    for name, layer_args, options in DIFFERING_SETTINGS:
        mine_layer, mine_options = ({}, {}) if rank == 0 else (layer_args, dict(options))
        if name.startswith("capacity"):  # both ranks static, so only the named setting differs
            mine_options["mode"] = "static"
        args = {"hidden_size": HIDDEN, "ffn_size": FFN, "num_experts": EXPERTS, "top_k": TOP_K}
        args.update(mine_layer)
        torch.manual_seed(0)
        sizes = [args.pop(k) for k in ("hidden_size", "ffn_size", "num_experts", "top_k")]
        layer = moe_infer.MoELayer(*sizes, **{"expert_bias": True, "renormalize": True, **args}).eval()
        if mine_options.get("placement") == "planned":
            mine_options["placement"] = plan_placement(torch.arange(EXPERTS, dtype=torch.float64) ** 2, world_size)
        try:
            expert_parallel(layer, **mine_options)
        except ExpertParallelError as error:
            assert re.search(rf"disagree on (.*; )?{name} \(rank 0 has .*, rank 1 has ", str(error)), (name, str(error))
            messages.append(str(error))
        else:
            raise AssertionError(f"no error when the ranks differ in {name}")
    # A whole layer on rank 0, its bare experts on rank 1: other settings, the same size on the wire.
    layer = make_layer()
    try:
        expert_parallel(layer if rank == 0 else layer.experts)
    except ExpertParallelError as error:
        assert "setting names" in str(error), str(error)
        messages.append(str(error))
    else:
        raise AssertionError("no error when one rank builds a layer and the other bare experts")
    # The experts alone (no top_k at construction) in static mode: k is agreed at the forward.
    ep = expert_parallel(make_layer().experts, mode="static")
    k = TOP_K if rank == 0 else 1
    try:
        with torch.no_grad():
            ep(torch.randn(4, HIDDEN), torch.rand(4, k), torch.zeros(4, k, dtype=torch.int32))
    except ExpertParallelError as error:
        assert "disagree on top_k" in str(error), str(error)
        messages.append(str(error))
    else:
        raise AssertionError("no error when the ranks route with different k")
    # Load recorders of other shapes: the same error, not a gloo abort on collectives of other sizes.
    recorder = LoadRecorder(num_layers=1, num_experts=EXPERTS * (1 + rank), window=4)
    try:
        recorder.all_reduce()
    except ValueError as error:
        assert "differ in (num_layers, window, num_experts)" in str(error), str(error)
        messages.append(str(error))
    else:
        raise AssertionError("no error when the ranks' recorders differ in shape")
    # The static exchange with the caller's capacity: one capacity per rank is refused the same way.
    ids = torch.zeros(4, TOP_K, dtype=torch.int32)
    try:
        with torch.no_grad():
            ep.forward_static_positions(torch.randn(4, HIDDEN), torch.rand(4, TOP_K), ids, ids, 4 * (1 + rank))
    except ExpertParallelError as error:
        assert "disagree on capacity (from 4 to 8)" in str(error), str(error)
        messages.append(str(error))
    else:
        raise AssertionError("no error when the ranks pass different capacities")
    with torch.no_grad():  # and the group still works
        layer = make_layer()
        x = torch.randn(3, HIDDEN)
        torch.testing.assert_close(expert_parallel(layer)(x), layer(x))
    return messages


def test_ranks_that_differ_in_any_setting_raise_the_same_error(tmp_path):
    results = run_ranks(_differing_settings_worker, 2, tmp_path)
    assert sorted(results) == [0, 1]
    assert len(results[0]) == len(DIFFERING_SETTINGS) + 4
    assert results[0] == results[1]  # the very same message on both ranks


def _dying_peer_worker(rank, world_size):
    layer = make_layer()
    ep = expert_parallel(layer)
    if rank == 1:
        os._exit(0)  # dies without a word
    start = time.monotonic()
    try:
        with torch.no_grad():
            for _ in range(3):
                ep(torch.randn(4, HIDDEN))
    except ExpertParallelError as error:
        return time.monotonic() - start, str(error)
    raise AssertionError("the forward did not notice the dead rank")


def _silent_peer_worker(rank, world_size, timeout_s):
    group = dist.new_group(list(range(world_size)), timeout=datetime.timedelta(seconds=timeout_s))
    layer = make_layer()
    ep = expert_parallel(layer, group=group)
    if rank == 1:
        time.sleep(2 * timeout_s)  # alive, but never joins the forward
        return None
    start = time.monotonic()
    try:
        with torch.no_grad():
            ep(torch.randn(4, HIDDEN))
    except ExpertParallelError as error:
        return time.monotonic() - start, str(error)
    raise AssertionError("the forward did not time out")


def _fairseq_worker(rank, world_size):
    """moe_infer.fairseq's MOELayer with an expert group: each rank holds its E / R local experts
    (fairseq's shards) and equals the single-process layer holding all E, in both gating modes."""
    from moe_infer.fairseq import FairseqExperts, MOELayer, Top2Gate

    # The reference: a one-rank expert group holding all E experts (every rank makes every group).
    solo = [dist.new_group([r]) for r in range(world_size)][rank]
    torch.manual_seed(0)
    gate = Top2Gate(HIDDEN, EXPERTS, second_expert_policy="all", moe_eval_capacity_token_fraction=0.1)
    full = MOELayer.build(gate, FFN, "relu", group=solo).eval()
    per_rank = EXPERTS // world_size
    local = FairseqExperts(per_rank, HIDDEN, FFN, "relu")
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
            getattr(local, name).copy_(getattr(full.experts, name)[rank * per_rank : (rank + 1) * per_rank])
    gen = torch.Generator().manual_seed(100 + rank)
    dropped = 0
    for gating, batch in (("static", 3), ("dynamic", [2, 0, 4, 1][rank])):  # static: equal batches
        full.gating = gating
        layer = MOELayer(gate, local, gating=gating).eval()
        x = torch.randn(batch, 6, HIDDEN, generator=gen)
        padding = torch.zeros(batch, 6, dtype=torch.bool)
        padding[:, 4:] = True
        with torch.no_grad():
            want, want_l_aux = full(x, input_padding_mask=padding)
            got, got_l_aux = layer(x, input_padding_mask=padding)
        torch.testing.assert_close(got, want, msg=gating)
        if batch:
            torch.testing.assert_close(got_l_aux, want_l_aux)
        if gating == "static":
            dropped = int(full.metadata["overflow_expert1"]) + int(full.metadata["overflow_expert2"])
    return dropped


def _hf_worker(rank, world_size):
    """moe_infer.optimize(model, ep_group=...): every block's experts spread over the group; each
    rank's logits equal the single-process optimized model's on its own (uneven) batch."""
    import copy

    import hf_models

    for arch in ("mixtral", "gpt_oss"):
        model = hf_models.build_model(arch, vocab=64)  # seeded: the same weights on every rank
        ids = torch.randint(3, 64, (2, 4 + 3 * rank), generator=torch.Generator().manual_seed(rank))
        with torch.no_grad():
            expected = moe_infer.optimize(copy.deepcopy(model), verbose=False)(input_ids=ids).logits
            spread = moe_infer.optimize(model, verbose=False, ep_group=dist.group.WORLD)
            torch.testing.assert_close(spread(input_ids=ids).logits, expected, msg=arch)
        assert spread.moe_infer_report.expert_parallel
    return "ok"


# ---- tests --------------------------------------------------------------------------------------


def _all_checks(rank, world_size):
    return {
        "equivalence": _equivalence_worker(rank, world_size),
        "static_drops": _static_drops_worker(rank, world_size),
        "rebalance": _rebalance_worker(rank, world_size),
        "errors": _errors_worker(rank, world_size),
        "fairseq": _fairseq_worker(rank, world_size),
        "hf": _hf_worker(rank, world_size),
    }


@pytest.mark.parametrize("world_size", [2, 4])
def test_expert_parallel_layer(tmp_path, world_size):
    """Every placement, uneven batches, a rank without tokens, static = dynamic when nothing drops,
    fairseq's drops, rebalancing, and the handshake's errors, in one group per world size."""
    results = run_ranks(_all_checks, world_size, tmp_path)
    assert sorted(results) == list(range(world_size))
    assert sum(r["static_drops"] for r in results.values()) > 0  # the drop check did drop pairs
    assert len({r["rebalance"] for r in results.values()}) == 1  # every rank reports the same bytes
    assert results[0]["rebalance"] > 0
    assert sum(r["fairseq"] for r in results.values()) > 0  # fairseq's static mode did drop pairs


def test_dead_rank_raises_within_bounded_time(tmp_path):
    results = run_ranks(_dying_peer_worker, 2, tmp_path)
    elapsed, message = results[0]
    assert 1 not in results
    assert elapsed < 30, f"took {elapsed:.1f} s to notice the dead rank"
    assert "expert-parallel" in message and "a peer rank died" in message


def test_silent_rank_raises_after_the_group_timeout(tmp_path):
    timeout_s = 2
    results = run_ranks(_silent_peer_worker, 2, tmp_path, timeout_s)
    elapsed, message = results[0]
    assert timeout_s * 0.5 <= elapsed < timeout_s + 20, f"raised after {elapsed:.1f} s (timeout {timeout_s} s)"
    assert "expert-parallel counts all-to-all failed on rank 0 of 2" in message


def test_static_capacity_is_the_layers():
    """The static exchange sizes its slots with the one capacity formula (fairseq's int(), as
    ops.static_capacity and the fairseq layer), not a rounded-up variant."""
    from moe_infer import ops

    assert static_capacity(3156, 216, 1, 0.5) == ops.static_capacity(3156, 216, 1, 0.5) == 7
    assert static_capacity(100, 8, 2, 1.0, 0.25) == ops.static_capacity(100, 8, 2, 1.0, 0.25, eval_mode=True) == 25
    with pytest.raises(ValueError, match="capacity is 0"):
        static_capacity(3, 8, 1, 0.5)
