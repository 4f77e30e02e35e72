"""Bad input gets a clear error that names the argument; an empty batch gets an empty result."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import moe_infer
from moe_infer import ops
from moe_infer.buffer import simulate_expert_cache
from moe_infer.placement import Placement

from conftest import argument_error


def ids_of(rows, device="cpu"):
    return torch.tensor(rows, dtype=torch.int32, device=device)


OP_ARGUMENT_ERRORS = [
    (lambda d: ops.topk_gating(torch.randn(4, 8, 2, device=d), 2), r"router_logits must be 2-D"),
    (lambda d: ops.topk_gating(torch.randn(4, 8, device=d).long(), 2), r"router_logits must be float32"),
    (lambda d: ops.topk_gating(torch.randn(4, 8, device=d), 0), r"k \(0\) must be >= 1"),
    (lambda d: ops.topk_gating(torch.randn(4, 8, device=d), 9), r"k \(9\) must be <= num_experts \(8\)"),
    (lambda d: ops.topk_gating(torch.randn(4, 8, device=d), 2, "argmax"), r"scoring must be one of"),
    (
        lambda d: ops.topk_gating(torch.randn(4, 8, device=d), 2, "sigmoid", False, torch.zeros(7, device=d)),
        r"selection_bias has 7 entries",
    ),
    (
        lambda d: ops.topk_gating(torch.randn(4, 8, device=d), 2, "sigmoid", False, None, 1.0, 3, 1),
        r"divisible by n_group \(3\)",
    ),
    (
        lambda d: ops.topk_gating(torch.randn(4, 8, device=d), 2, "sigmoid", False, None, 1.0, 4, 5),
        r"topk_group \(5\)",
    ),
    (
        lambda d: ops.topk_gating(torch.randn(4, 8, device=d), 2, "softmax", False, None, float("nan")),
        r"scaling_factor must be finite",
    ),
    pytest.param(
        lambda d: ops.topk_gating(
            torch.randn(4, 8, device=d),
            2,
            "sigmoid",
            False,
            torch.tensor([0.0, float("nan")] + [0.0] * 6, device=d),
        ),
        r"selection_bias must be finite, but entry 1 is not",
        marks=pytest.mark.data_dependent,
    ),
    (lambda d: ops.dispatch_plan(torch.zeros(4, device=d, dtype=torch.int32), 8), r"expert_ids must be 2-D"),
    (lambda d: ops.dispatch_plan(torch.zeros(4, 2, device=d), 8), r"expert_ids must be int32 or int64"),
    pytest.param(
        lambda d: ops.dispatch_plan(ids_of([[0, 8]], d), 8),
        r"expert_ids\[0, 1\] = 8 is out of range",
        marks=pytest.mark.data_dependent,
    ),
    pytest.param(
        lambda d: ops.dispatch_plan(ids_of([[0, 1], [-2, 3]], d), 8),
        r"expert_ids\[1, 0\] = -2 is out of range",
        marks=pytest.mark.data_dependent,
    ),
    (lambda d: ops.dispatch_plan(ids_of([[0, 1]], d), 0), r"num_experts \(0\) must be >= 1"),
    (
        lambda d: ops.permute(torch.randn(3, 4, device=d), ids_of([0, 1], d), 2),
        r"sorted_pair_ids has 2 entries, expected num_tokens \* top_k",
    ),
    pytest.param(
        lambda d: ops.permute(torch.randn(3, 4, device=d), ids_of([0, 1, 2, 3, 4, 6], d), 2),
        r"sorted_pair_ids has values in \[0, 6\], expected \[0, 6\)",
        marks=[pytest.mark.cpu_values, pytest.mark.data_dependent],
    ),
    (
        lambda d: ops.permute(torch.randn(3, 4, device=d), ids_of([0, 1, 2, 3, 4, 5], d).long(), 2),
        r"sorted_pair_ids must be int32",
    ),
    (
        lambda d: ops.unpermute_combine(torch.randn(5, 4, device=d), torch.rand(3, 2, device=d), ids_of(range(6), d)),
        r"expert_out has 5 rows, expected num_tokens \* top_k = 6",
    ),
    pytest.param(
        lambda d: ops.unpermute_combine(
            torch.randn(6, 4, device=d), torch.rand(3, 2, device=d), ids_of([0, 1, 2, 3, 4, 9], d)
        ),
        r"row_of_pair has values in \[0, 9\]",
        marks=[pytest.mark.cpu_values, pytest.mark.data_dependent],
    ),
    (
        lambda d: ops.unpermute_combine(
            torch.randn(6, 4, device=d), torch.rand(3, 2, device=d).long(), ids_of(range(6), d)
        ),
        r"topk_weights must be float32",
    ),
]


@pytest.mark.parametrize("call,message", OP_ARGUMENT_ERRORS)
def test_op_argument_errors(request, device, impl, call, message):
    if device.type == "cuda" and request.node.get_closest_marker("cpu_values"):
        pytest.skip(
            "on CUDA the values of index tensors from dispatch_plan are not checked (no host sync); see test_cuda.py"
        )
    with pytest.raises(argument_error(message), match=message):
        call(device)
        ops.check_device_errors(device)  # CUDA validates on the device and raises later


def mlp_args(device, **overrides):
    num_experts, hidden_size, ffn_size = 4, 8, 6
    args = dict(
        hidden=torch.randn(10, hidden_size, device=device),
        expert_offsets=torch.tensor([0, 3, 3, 7, 10], dtype=torch.int32, device=device),
        fc1_weight=torch.randn(num_experts, 2 * ffn_size, hidden_size, device=device),
        fc1_bias=None,
        fc2_weight=torch.randn(num_experts, hidden_size, ffn_size, device=device),
        fc2_bias=None,
        activation="silu_glu",
    )
    args.update(overrides)
    return args


GROUPED_MLP_ARGUMENT_ERRORS = [
    (dict(activation="swish"), r"activation must be one of"),
    (dict(fc1_weight=torch.randn(4, 12, 9)), r"fc1_weight \[4, 12, 9\] does not match hidden_size 8"),
    (
        dict(fc1_weight=torch.randn(4, 10, 8)),
        r"fc1_weight has 10 outputs but activation 'silu_glu' with ffn_size 6 .* needs 12",
    ),
    (dict(fc2_weight=torch.randn(3, 8, 6)), r"fc2_weight has 3 experts but expert_offsets describes 4"),
    (
        dict(fc1_weight=torch.randn(4, 12, 8).double()),
        r"fc1_weight must be 3-D|fc1_weight is Double but hidden is Float",
    ),
    (dict(fc1_bias=torch.randn(4, 11)), r"fc1_bias must have shape \[4, 12\]"),
    (dict(expert_offsets=torch.tensor([0, 3, 3, 7, 10])), r"expert_offsets must be int32"),
    pytest.param(
        dict(expert_offsets=torch.tensor([0, 3, 2, 7, 10], dtype=torch.int32)),
        r"expert_offsets must be non-decreasing",
        marks=pytest.mark.data_dependent,
    ),
    pytest.param(
        dict(expert_offsets=torch.tensor([0, 3, 3, 7, 11], dtype=torch.int32)),
        r"expert_offsets\[-1\] \(11\) exceeds the number of rows in hidden \(10\)",
        marks=pytest.mark.data_dependent,
    ),
    (dict(hidden=torch.randn(10, 8, 1)), r"hidden must be 2-D"),
]


@pytest.mark.parametrize("overrides,message", GROUPED_MLP_ARGUMENT_ERRORS)
def test_grouped_mlp_argument_errors(impl, overrides, message):
    args = mlp_args("cpu", **overrides)
    with pytest.raises(argument_error(message), match=message):
        ops.grouped_mlp(**args)


def test_mixed_devices_named():
    if not torch.cuda.is_available() or not moe_infer.built_with_cuda():
        pytest.skip("needs a CUDA device to put arguments on two devices")
    args = mlp_args("cuda", expert_offsets=torch.tensor([0, 3, 3, 7, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"expert_offsets is on cpu but hidden is on cuda"):
        ops.grouped_mlp(**args)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_logits_are_an_error(device, impl, bad):
    logits = torch.randn(6, 8, device=device)
    logits[4, 2] = bad
    with pytest.raises(ValueError, match=r"router_logits row 4 contains NaN or \+inf"):
        ops.topk_gating(logits, 2)
        ops.check_device_errors(device)


def test_layer_nan_input_is_an_error(device):
    layer = moe_infer.MoELayer(16, 8, 4, 2, device=device)
    x = torch.randn(3, 16, device=device)
    x[1, 0] = float("nan")
    with torch.no_grad(), pytest.raises(ValueError, match=r"router_logits row 1 contains NaN"):
        layer(x)
        ops.check_device_errors(device)


def test_layer_configuration_errors():
    with pytest.raises(ValueError, match=r"top_k \(5\) must be in \[1, num_experts \(4\)\]"):
        moe_infer.MoELayer(16, 8, 4, 5)
    with pytest.raises(ValueError, match=r"dtype must be float32, bfloat16 or float16 .*got torch.float64"):
        moe_infer.MoELayer(16, 8, 4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"activation must be one of"):
        moe_infer.MoELayer(16, 8, 4, 2, activation="tanh")
    with pytest.raises(ValueError, match=r"scoring must be one of"):
        moe_infer.MoELayer(16, 8, 4, 2, scoring="max")
    layer = moe_infer.MoELayer(16, 8, 4, 2)
    with pytest.raises(ValueError, match=r"MoELayer: the input's last dimension must be 16, got shape \(2, 15\)"):
        layer(torch.randn(2, 15))
    with pytest.raises(ValueError, match=r"MoELayer: the input's last dimension must be 16, got shape \(\)"):
        layer(torch.tensor(1.0))
    with pytest.raises(
        TypeError, match=r"MoELayer: the input is torch.float64 but the layer's weights are torch.float32"
    ):
        layer(torch.randn(2, 16, dtype=torch.float64))


def test_empty_batch_gives_empty_result(device):
    layer = moe_infer.MoELayer(16, 8, 4, 2, device=device)
    with torch.no_grad():
        out = layer(torch.randn(0, 16, device=device))
        assert out.shape == (0, 16)
        out = layer(torch.randn(2, 0, 16, device=device))
        assert out.shape == (2, 0, 16)
    weights, ids = ops.topk_gating(torch.randn(0, 4, device=device), 2)
    assert weights.shape == ids.shape == (0, 2)
    plan = ops.dispatch_plan(ids, 4)
    assert plan.tokens_per_expert.tolist() == [0] * 4 and plan.expert_offsets.tolist() == [0] * 5


# An op's argument error: the C++ checks raise RuntimeError (ValueError / TypeError where they say
# which kind of argument is wrong).
ARGUMENT_ERRORS = (RuntimeError, ValueError, TypeError)


def _meta_cases():
    """One call per op with a single argument on the meta device and the rest on the CPU."""
    meta = torch.device("meta")

    def logits(d="cpu"):
        return torch.randn(4, 8, device=d)

    def mlp(**moved):
        args = mlp_args("cpu", fc2_bias=torch.randn(4, 8))
        for name in moved:
            args[name] = args[name].to(meta)
        return lambda: ops.grouped_mlp(**args)

    plan = ops.dispatch_plan(ids_of([[0, 1], [2, 3]]), 4)
    hidden = torch.randn(2, 8)
    w1, w2 = torch.randn(4, 6, 8), torch.randn(4, 8, 3)
    routing = ops.static_gating(logits(), 1, 4)
    combine, mask = ops.static_routing_tensors(routing.expert_ids, routing.locations, routing.topk_weights, 8, 4)
    return [
        (
            "topk_gating",
            "selection_bias",
            lambda: ops.topk_gating(logits(), 2, "sigmoid", False, torch.zeros(8, device=meta)),
        ),
        ("topk_gating", "router_logits", lambda: ops.topk_gating(logits(meta), 2, "sigmoid", False, torch.zeros(8))),
        ("permute", "sorted_pair_ids", lambda: ops.permute(hidden, plan.sorted_pair_ids.to(meta), 2)),
        (
            "unpermute_combine",
            "row_of_pair",
            lambda: ops.unpermute_combine(torch.randn(4, 8), torch.rand(2, 2), plan.row_of_pair.to(meta)),
        ),
        (
            "unpermute_combine",
            "topk_weights",
            lambda: ops.unpermute_combine(torch.randn(4, 8), torch.rand(2, 2, device=meta), plan.row_of_pair),
        ),
        ("grouped_mlp", "fc1_weight", mlp(fc1_weight=True)),
        ("grouped_mlp", "fc2_bias", mlp(fc2_bias=True)),
        ("grouped_mlp", "expert_offsets", mlp(expert_offsets=True)),
        (
            "grouped_mlp_combine",
            "fc2_weight",
            lambda: ops.grouped_mlp_combine(hidden, torch.rand(2, 2), plan, w1, None, w2.to(meta), None, "silu_glu"),
        ),
        (
            "grouped_mlp_combine",
            "topk_weights",
            lambda: ops.grouped_mlp_combine(
                hidden, torch.rand(2, 2, device=meta), plan, w1, None, w2, None, "silu_glu"
            ),
        ),
        (
            "static_gating",
            "padding_mask",
            lambda: ops.static_gating(logits(), 1, 4, torch.zeros(4, dtype=torch.bool, device=meta)),
        ),
        (
            "static_routing_tensors",
            "locations",
            lambda: ops.static_routing_tensors(
                routing.expert_ids, routing.locations.to(meta), routing.topk_weights, 8, 4
            ),
        ),
        ("static_dispatch", "dispatch_mask", lambda: ops.static_dispatch(torch.randn(4, 16), mask.to(meta))),
        ("static_combine", "combine_weights", lambda: ops.static_combine(torch.randn(8, 4, 16), combine.to(meta))),
        (
            "expert_placement",
            "correlation",
            lambda: torch.ops.moe_infer.expert_placement(
                torch.rand(4), 2, 2, "anti_correlation", False, torch.rand(4, 4, device=meta)
            ),
        ),
        (
            "simulate_expert_cache",
            "batch_offsets",
            lambda: torch.ops.moe_infer.simulate_expert_cache(
                torch.tensor([0, 1]), torch.tensor([0, 2], device=meta), 4, [2], ["lru"]
            ),
        ),
    ]


@pytest.mark.parametrize("op,argument,call", _meta_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_meta_argument_next_to_real_tensors_is_an_error(op, argument, call):
    # A meta argument sends the call to the op's fake implementation; it must refuse, not return
    # uninitialised CPU memory.
    with pytest.raises(ARGUMENT_ERRORS, match=rf"{op}: .*{argument}|{argument} is on meta|is on meta"):
        call()


def test_arguments_that_would_allocate_too_much_are_errors():
    ids = ids_of([[0, 1]])
    with pytest.raises(ARGUMENT_ERRORS, match=r"dispatch_plan: num_experts \(2147483647\) exceeds 16777216"):
        ops.dispatch_plan(ids, 2**31 - 1)
    with pytest.raises(ARGUMENT_ERRORS, match=r"static_routing_tensors: num_experts \* capacity"):
        ops.static_routing_tensors(ids, ids, torch.ones(1, 2), 2, 2**31 - 1)
    with pytest.raises(ARGUMENT_ERRORS, match=r"dense routing tensors .* would exceed"):
        ops.static_routing_tensors(ids_of([[0]] * 70000), ids_of([[0]] * 70000), torch.ones(70000, 1), 256, 256)
    with pytest.raises(ARGUMENT_ERRORS, match=r"expert_placement: num_ranks \* slots_per_rank"):
        torch.ops.moe_infer.expert_placement(torch.rand(4), 2**20, 2**20)
    with pytest.raises(ARGUMENT_ERRORS, match=r"simulate_expert_cache: num_experts \(1099511627776\) exceeds"):
        torch.ops.moe_infer.simulate_expert_cache(torch.tensor([0]), torch.tensor([0, 1]), 2**40, [2], ["lru"])


def test_simulated_cache_larger_than_the_experts_is_the_full_cache():
    # A cache of 2^40 slots (more than experts) never evicts: the same counters as one of E slots.
    accesses = torch.tensor([0, 2, 1, 3, 0, 1, 2])
    offsets = torch.tensor([0, 2, 4, 7])
    huge = torch.ops.moe_infer.simulate_expert_cache(accesses, offsets, 4, [2**40], ["lru", "belady"])
    full = torch.ops.moe_infer.simulate_expert_cache(accesses, offsets, 4, [4], ["lru", "belady"])
    assert torch.equal(huge, full)
    assert full[0, 0].tolist() == [3, 4, 0]


def test_layer_with_experts_on_the_meta_device_is_an_error():
    # The fused entry points (MoELayer, the transformers blocks' experts backend) reach the ops with
    # the weights as they are: placeholders on the meta device are refused, not computed with.
    from moe_infer.experts import ExpertSpec, run_local

    layer = moe_infer.MoELayer(16, 8, 4, 2)
    layer.experts.down_proj = torch.nn.Parameter(torch.empty(4, 16, 8, device="meta"), requires_grad=False)
    with torch.no_grad(), pytest.raises(ARGUMENT_ERRORS, match=r"grouped_mlp(_combine)?: fc2_weight is on meta"):
        layer(torch.randn(3, 16))
    spec = ExpertSpec(
        torch.empty(4, 16, 16, device="meta"), None, torch.empty(4, 16, 8, device="meta"), None, "silu_glu"
    )
    ids = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    with pytest.raises(ARGUMENT_ERRORS, match=r"is on meta but hidden is on cpu"):
        run_local(spec, torch.randn(2, 16), torch.rand(2, 2), ids)


# ---- every bad-argument case of the suite, eagerly and under FakeTensorMode ----------------------


def _argument_cases():
    """(id, call(device), message) of every bad-argument case of the op tests; data-dependent cases
    (NaN logits, ids out of range, ...) are the kernels' to find and are left out."""
    from test_grouped_mlp_combine import COMBINE_ARGUMENT_ERRORS, combine_call
    from test_static_gating import STATIC_ARGUMENT_ERRORS

    cases = []

    def add(name, entries, make_call):
        for index, entry in enumerate(entries):
            values, marks = (entry.values, entry.marks) if hasattr(entry, "values") else (entry, ())
            if any(mark.name == "data_dependent" for mark in marks):
                continue
            cases.append(pytest.param(make_call(values[0]), values[1], id=f"{name}-{index}"))

    add("ops", OP_ARGUMENT_ERRORS, lambda call: call)
    add(
        "grouped_mlp",
        GROUPED_MLP_ARGUMENT_ERRORS,
        lambda overrides: lambda d: ops.grouped_mlp(**mlp_args(d, **overrides)),
    )
    add("static", STATIC_ARGUMENT_ERRORS, lambda call: call)
    add("combine", COMBINE_ARGUMENT_ERRORS, lambda change: lambda d: combine_call(d, change))
    return cases


@pytest.mark.parametrize("call,message", _argument_cases())
def test_argument_errors_are_the_same_eagerly_and_under_fake_tensors(call, message):
    """One source of argument errors (the C++ checks): the same exception type and message whether
    the op runs or is traced (FakeTensorMode, as torch.compile does)."""
    error = argument_error(message)
    with pytest.raises(error, match=message):
        call("cpu")
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(error, match=message):
        call("cpu")


def test_sizes_that_would_overflow_or_exhaust_memory_are_refused():
    """Products of sizes are bounded without being formed (4 * 2**62 wrapped to 0 and passed), and
    static_gating bounds num_experts as the other ops do (an empty [0, 2**28] batch took 6 GiB)."""
    with pytest.raises(ValueError, match=r"permute: num_tokens \* top_k \(4 \* 4611686018427387904\) exceeds"):
        ops.permute(torch.randn(4, 8), torch.empty(0, dtype=torch.int32), 2**62)
    with pytest.raises(ValueError, match=r"static_dispatch: num_experts \* capacity \(4294967296 \* 4294967296\)"):
        ops.static_dispatch(torch.randn(0, 1), torch.zeros(0, 1, 1, dtype=torch.bool).expand(0, 2**32, 2**32))
    with pytest.raises(ValueError, match=r"static_gating: num_experts \(33554432\) exceeds 16777216"):
        ops.static_gating(torch.zeros(0, 2**25), 2, 4)


def test_routing_input_that_has_no_answer_is_refused():
    """A row of only -inf logits has no softmax over the k best either (NaN weights came out); a
    placement id of 2**32 is refused before int32 (it wrapped to expert 0); simulate_expert_cache
    checks every batch offset before it reads (one past the end read past the tensor)."""
    with pytest.raises(ValueError, match=r"row 0 contains NaN or \+inf \(or only -inf"):
        ops.topk_gating(torch.full((1, 4), float("-inf")), 2, "softmax_topk")
    assert (
        ops.topk_gating(torch.tensor([[0.0, float("-inf"), float("-inf"), 1.0]]), 2, "softmax_topk")[0].isfinite().all()
    )
    with pytest.raises(ValueError, match=r"slot \(0, 0\) holds expert 4294967296"):
        Placement([[2**32, 2**32 + 1]], 2)
    with pytest.raises(ValueError, match=r"batch_offsets must be non-decreasing, but batch_offsets\[2\] \(3\) < "):
        simulate_expert_cache(torch.tensor([1, 2, 3]), torch.tensor([0, 2**40, 3]), 4, [2], ["lru"])


def test_composite_combine_refuses_pair_ids_that_are_not_a_permutation():
    """The composite grouped_mlp_combine (the path off the CPU) maps each pair to one row: pair ids
    that repeat leave pairs unnamed, whose rows it read from uninitialised memory."""
    w1, w2, h = torch.randn(2, 6, 4), torch.randn(2, 4, 3), torch.randn(5, 4)
    pairs, offsets = torch.zeros(5, dtype=torch.int32), torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"sorted_pair_ids must name every pair exactly once"):
        moe_infer._C.composite.grouped_mlp_combine(
            h, torch.ones(5, 1), pairs, offsets, w1, None, w2, None, "silu_glu", False, 1.702, 7.0
        )


def test_expert_arguments_and_load_counts_are_checked():
    """The loose expert arguments name what is missing; swiGLU's parameters must be finite (NaN
    gave NaN outputs); a LoadRecorder takes integer counts >= 0 (NaN became -9.2e18 in its window)
    and a saved state of its own shape."""
    from moe_infer.placement import LoadRecorder

    hidden, offsets, fc1 = torch.randn(2, 4), torch.tensor([0, 2], dtype=torch.int32), torch.randn(1, 6, 4)
    with pytest.raises(TypeError, match=r"missing: fc2_weight, activation"):
        ops.grouped_mlp(hidden, offsets, fc1)
    fc2 = torch.randn(1, 4, 3)
    with pytest.raises(ValueError, match=r"swiglu_alpha and swiglu_limit must be finite, got nan"):
        ops.grouped_mlp(hidden, offsets, fc1, None, fc2, None, "gpt_oss_swiglu", True, float("nan"), 7.0)
    recorder = LoadRecorder(num_layers=1, num_experts=4, window=2)
    with pytest.raises(ValueError, match=r"counts must be integer token counts, got torch.float32"):
        recorder.record_counts(0, torch.tensor([1.0, float("nan"), 0.0, 2.0]))
    with pytest.raises(ValueError, match=r"counts must be >= 0, got -3"):
        recorder.record_counts(0, torch.tensor([1, -3, 0, 2]))
    state = LoadRecorder(num_layers=1, num_experts=4, window=2).state_dict()
    state["steps"] = [0, 0]
    with pytest.raises(ValueError, match=r"saved ema \(1, 4\) and steps \(2\) do not match"):
        recorder.load_state_dict(state)
