"""moe_infer.fairseq (Top1Gate, Top2Gate, MOELayer) against a fairseq stand-in (fairseq_like.py:
same names and contracts, computed by the plain-PyTorch re-implementation of fairseq's gating)."""

import argparse
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fairseq_like
import moe_infer
from moe_infer import ops
from moe_infer.fairseq import FairseqExperts, MOELayer, Top1Gate, Top2Gate, convert_fairseq_moe

MODEL_DIM, FFN_DIM, NUM_EXPERTS = 16, 24, 8

# (top_k, gate options) covering the policies, normalisation, priority and top-1's capacity factor
GATES = [
    (1, dict(capacity_factor=1.0)),
    (1, dict(capacity_factor=2.0, moe_eval_capacity_token_fraction=0.1)),
    (2, dict(second_expert_policy="all")),
    (2, dict(second_expert_policy="sampling", normalize_gate_prob_before_dropping=True)),
    (2, dict(second_expert_policy="random", batch_prioritized_routing=True)),
    (2, dict(second_expert_policy="sampling", batch_prioritized_routing=True, moe_eval_capacity_token_fraction=0.0)),
]
GATE_IDS = [
    "top1",
    "top1-cf2",
    "top2-all",
    "top2-sampling-norm-before",
    "top2-random-bpr",
    "top2-sampling-bpr-no-fraction",
]


def fairseq_layer(top_k, activation_fn=F.relu, **gate_kwargs):
    return fairseq_like.make_moe_layer(MODEL_DIM, FFN_DIM, NUM_EXPERTS, top_k, activation_fn, **gate_kwargs)


def inputs(batch=3, seq=20, padded=True, device="cpu"):
    x = torch.randn(batch, seq, MODEL_DIM, device=device)
    padding = None
    if padded:
        lengths = torch.randint(seq // 2, seq + 1, (batch,))
        padding = torch.arange(seq).unsqueeze(0) >= lengths.unsqueeze(1)
        padding = padding.to(device)
    return x, padding


def run_seeded(layer, x, padding, seed=7):
    torch.manual_seed(seed)  # the same Gumbel / uniform draws for the 'sampling' / 'random' policies
    with torch.no_grad():
        return layer(x, input_padding_mask=padding)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("top_k,gate_kwargs", GATES, ids=GATE_IDS)
def test_static_mode_reproduces_fairseq(top_k, gate_kwargs, training):
    reference = fairseq_layer(top_k, **gate_kwargs).train(training)
    layer = convert_fairseq_moe(fairseq_layer(top_k, **gate_kwargs), gating="static").train(training)
    layer.load_state_dict(reference.state_dict())
    x, padding = inputs()
    want, want_l_aux = run_seeded(reference, x, padding)
    got, got_l_aux = run_seeded(layer, x, padding)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_l_aux, want_l_aux, rtol=1e-5, atol=1e-6)
    assert (got[padding] == 0).all()  # padding tokens are not routed: zero MoE output
    assert 0 <= float(layer.metadata["placeholder_fraction"]) < 1


@pytest.mark.parametrize("top_k,gate_kwargs", GATES, ids=GATE_IDS)
def test_dynamic_equals_static_when_nothing_is_dropped(top_k, gate_kwargs):
    gate_kwargs = dict(gate_kwargs, moe_eval_capacity_token_fraction=1.0)  # C = S: no drops
    layer = convert_fairseq_moe(fairseq_layer(top_k, **gate_kwargs), gating="static").eval()
    x, padding = inputs()
    static, static_l_aux = run_seeded(layer, x, padding)
    assert float(layer.metadata["overflow_expert1"]) == 0
    layer.gating = "dynamic"
    dynamic, dynamic_l_aux = run_seeded(layer, x, padding)
    torch.testing.assert_close(dynamic, static, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dynamic_l_aux, static_l_aux)


@pytest.mark.parametrize("top_k", [1, 2])
def test_dropped_tokens_get_zero_output_in_static_mode_only(top_k):
    # Small capacities (C = 4 of 80 tokens for top-1, 12 for top-2): many drops, some kept tokens.
    gate_kwargs = dict(moe_eval_capacity_token_fraction=0.05)
    if top_k == 2:
        gate_kwargs = dict(moe_eval_capacity_token_fraction=0.15, second_expert_policy="all")
    source = fairseq_layer(top_k, **gate_kwargs)
    with torch.no_grad():
        source.gate.wg.weight[0] += 1.0  # crowd expert 0 so that it overflows
    layer = convert_fairseq_moe(source, gating="static").eval()
    x = torch.randn(2, 40, MODEL_DIM) + 0.3
    tokens = x.reshape(-1, MODEL_DIM)
    capacity = layer.gate.capacity(tokens.shape[0])
    _, routing = layer.gate.route(tokens, None, capacity)
    kept = (routing.locations >= 0) & (routing.locations < capacity)
    lost_all = ~kept.any(-1)
    untouched = kept.all(-1)
    assert lost_all.sum() > 5 and untouched.sum() > 5  # the case exercises both

    with torch.no_grad():
        static, _ = layer(x)
        layer.gating = "dynamic"
        dynamic, _ = layer(x)
    static, dynamic = static.reshape(-1, MODEL_DIM), dynamic.reshape(-1, MODEL_DIM)
    assert (static[lost_all] == 0).all()
    assert (dynamic[lost_all].abs().sum(-1) > 0).all()
    torch.testing.assert_close(dynamic[untouched], static[untouched], rtol=1e-6, atol=1e-6)
    # Dynamic mode is fairseq with a capacity that fits everything.
    unbounded = fairseq_layer(top_k, **dict(gate_kwargs, moe_eval_capacity_token_fraction=1.0)).eval()
    unbounded.load_state_dict(layer.state_dict())
    with torch.no_grad():
        want, _ = unbounded(x)
    torch.testing.assert_close(dynamic, want.reshape(-1, MODEL_DIM), rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip():
    source = fairseq_layer(2, second_expert_policy="all")
    layer = MOELayer.build(Top2Gate(MODEL_DIM, NUM_EXPERTS, second_expert_policy="all"), FFN_DIM).eval()
    assert layer.load_state_dict(source.state_dict()) is not None  # strict: every key matched
    ours = layer.state_dict()
    theirs = source.state_dict()
    assert list(ours) == list(theirs)
    assert list(ours)[:5] == [
        "gate.wg.weight",
        "experts.0.fc1.weight",
        "experts.0.fc1.bias",
        "experts.0.fc2.weight",
        "experts.0.fc2.bias",
    ]
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    # Through a file, into a fresh fairseq layer and a fresh moe_infer layer.
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)
    back = fairseq_layer(2, second_expert_policy="all").eval()
    back.load_state_dict(loaded)
    again = MOELayer.build(Top2Gate(MODEL_DIM, NUM_EXPERTS, second_expert_policy="all"), FFN_DIM).eval()
    again.load_state_dict(loaded)
    x, padding = inputs()
    layer.gating = again.gating = "static"
    with torch.no_grad():
        torch.testing.assert_close(again(x, input_padding_mask=padding)[0], back(x, input_padding_mask=padding)[0])
    # Stored stacked: the per-expert tensors are views of one parameter, no copy per call.
    assert [name for name, _ in layer.named_parameters()] == [
        "gate.wg.weight",
        "experts.gate_up_proj",
        "experts.down_proj",
        "experts.gate_up_proj_bias",
        "experts.down_proj_bias",
    ]
    assert ours["experts.3.fc1.weight"].data_ptr() == layer.experts.gate_up_proj[3].data_ptr()


def test_load_state_dict_reports_missing_expert_keys():
    layer = MOELayer.build(Top2Gate(MODEL_DIM, NUM_EXPERTS), FFN_DIM)
    state = fairseq_layer(2).state_dict()
    del state["experts.5.fc2.weight"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*experts\.5\.fc2\.weight"):
        layer.load_state_dict(state)
    state = fairseq_layer(2).state_dict()
    state["experts.8.fc1.bias"] = torch.zeros(FFN_DIM)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*experts\.8\.fc1\.bias"):
        layer.load_state_dict(state)


def test_convert_a_fairseq_model_in_place():
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "layers": nn.ModuleList(
                [
                    fairseq_like.TransformerLayer(fairseq_layer(2, second_expert_policy="all"), MODEL_DIM),
                    fairseq_like.TransformerLayer(fairseq_layer(1, activation_fn=F.gelu), MODEL_DIM),
                ]
            ),
            "output": nn.Linear(MODEL_DIM, 5),
        }
    ).eval()
    keys = list(model.state_dict())
    x, padding = inputs()

    def run(m):
        h = x
        total = 0
        with torch.no_grad():
            for block in m["layers"]:
                h, l_aux = block(h, padding)
                total = total + l_aux
            return m["output"](h), total

    want, want_l_aux = run(model)
    assert convert_fairseq_moe(model, gating="static") is model
    assert all(isinstance(block.moe_layer, MOELayer) for block in model["layers"])
    assert model["layers"][1].moe_layer.experts.activation == "gelu"
    assert not model["layers"][0].moe_layer.training
    assert list(model.state_dict()) == keys
    got, got_l_aux = run(model)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_l_aux, want_l_aux)
    convert_fairseq_moe(model)  # back to the default, dynamic
    assert all(block.moe_layer.gating == "dynamic" for block in model["layers"])


def test_gradients_match_fairseq_in_training():
    reference = fairseq_layer(2, second_expert_policy="all").train()
    layer = convert_fairseq_moe(fairseq_layer(2, second_expert_policy="all"), gating="static").train()
    layer.load_state_dict(reference.state_dict())
    x, padding = inputs(batch=2, seq=16)
    grad = torch.randn_like(x)
    results = []
    for module in (reference, layer):
        xi = x.clone().requires_grad_(True)
        out, l_aux = module(xi, input_padding_mask=padding)
        (out * grad).sum().add(3 * l_aux).backward()
        results.append(xi.grad)
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.gate.wg.weight.grad, reference.gate.wg.weight.grad, rtol=1e-5, atol=1e-5)
    fc1 = torch.stack([e.fc1.weight.grad for e in reference.experts])
    fc2_bias = torch.stack([e.fc2.bias.grad for e in reference.experts])
    torch.testing.assert_close(layer.experts.gate_up_proj.grad, fc1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.experts.down_proj_bias.grad, fc2_bias, rtol=1e-5, atol=1e-5)


def test_generator_seeds_the_sampling_policy():
    def make(seed):
        torch.manual_seed(0)  # the same weights
        gate = Top2Gate(MODEL_DIM, NUM_EXPERTS, generator=torch.Generator().manual_seed(seed))
        return MOELayer.build(gate, FFN_DIM).eval()

    x, _ = inputs(padded=False)
    with torch.no_grad():
        a, b, c = make(1)(x)[0], make(1)(x)[0], make(2)(x)[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # other second experts


def test_batches_are_padded_to_batch_size_valid():
    """fairseq pads eval batches to --batch-size-valid (changing S, so the capacity)."""
    source = fairseq_layer(1)
    layer = MOELayer.build(Top1Gate(MODEL_DIM, NUM_EXPERTS), FFN_DIM, args=argparse.Namespace(batch_size_valid=4))
    layer.load_state_dict(source.state_dict())
    layer.eval().gating = "static"
    source.eval()
    x = torch.randn(2, 20, MODEL_DIM)
    padded = torch.cat([x, torch.zeros(2, 20, MODEL_DIM)])
    padding = torch.zeros(4, 20, dtype=torch.bool)
    padding[2:] = True
    with torch.no_grad():
        got, _ = layer(x)
        want, _ = source(padded, input_padding_mask=padding)
        assert layer.metadata["capacity"] == 20  # ceil(0.25 * 4 * 20)
        torch.testing.assert_close(got, want[:2])
        layer.prepare_for_inference_()
        layer(x)
        assert layer.metadata["capacity"] == 10  # no padding at generation time


def test_metadata():
    layer = convert_fairseq_moe(fairseq_layer(2, second_expert_policy="all"), gating="static").eval()
    x, padding = inputs(padded=False)
    with torch.no_grad():
        layer(x)
    md = layer.metadata
    for key in (
        "entropy_gating",
        "overflow_expert1",
        "overflow_expert2",
        "unused_expert1_count",
        "expert2_balance_top",
    ):
        assert key in md
    capacity = md["capacity"]
    assert capacity == 15  # ceil(0.25 * 60)
    tokens = x.reshape(-1, MODEL_DIM)
    _, _, dispatch_mask, _ = layer.gate(tokens)
    want = 1 - dispatch_mask.sum() / (NUM_EXPERTS * capacity)
    torch.testing.assert_close(md["placeholder_fraction"], want)


@pytest.mark.parametrize("gating", ["static", "dynamic"])
def test_layer_under_torch_compile_fullgraph(gating):
    layer = convert_fairseq_moe(fairseq_layer(2, second_expert_policy="all"), gating=gating).eval()
    compiled = torch.compile(layer, fullgraph=True)
    x, padding = inputs()
    with torch.no_grad():
        got, got_l_aux = compiled(x, input_padding_mask=padding)
        want, want_l_aux = layer(x, input_padding_mask=padding)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_l_aux, want_l_aux)
    torch._dynamo.reset()


def test_empty_batch():
    layer = MOELayer.build(Top2Gate(MODEL_DIM, NUM_EXPERTS), FFN_DIM, gating="static").eval()
    out, l_aux = layer(torch.randn(0, 5, MODEL_DIM))
    assert out.shape == (0, 5, MODEL_DIM) and l_aux.item() == 0


def test_configuration_errors():
    # Capacity 0: top-1 with capacity_factor 0.5 and fewer tokens than experts, in training.
    layer = MOELayer.build(Top1Gate(MODEL_DIM, 16, capacity_factor=0.5), FFN_DIM, gating="static").train()
    with pytest.raises(ValueError, match=r"capacity is 0 .* every token would be dropped"):
        layer(torch.randn(1, 10, MODEL_DIM))
    layer.gating = "dynamic"  # no capacity, nothing to drop
    assert layer(torch.randn(1, 10, MODEL_DIM))[0].shape == (1, 10, MODEL_DIM)
    # An eval fraction <= 0 falls back to the training formula; without a capacity factor it cannot.
    gate = Top1Gate(MODEL_DIM, NUM_EXPERTS, capacity_factor=None, moe_eval_capacity_token_fraction=0.0)
    layer = MOELayer.build(gate, FFN_DIM, gating="static").eval()
    with pytest.raises(
        ValueError, match=r"eval_capacity_token_fraction \(0.0\) <= 0 .* nothing|no capacity to fall back on"
    ):
        layer(torch.randn(1, 10, MODEL_DIM))
    # Experts that do not divide across ranks, or only part of the experts on one process.
    experts = nn.ModuleList(fairseq_like.FeedForwardNetwork(MODEL_DIM, FFN_DIM) for _ in range(3))
    with pytest.raises(ValueError, match=r"routes to 8 experts, which do not divide across ranks of 3 local experts"):
        MOELayer(Top2Gate(MODEL_DIM, 8), experts)
    experts = nn.ModuleList(fairseq_like.FeedForwardNetwork(MODEL_DIM, FFN_DIM) for _ in range(4))
    with pytest.raises(ValueError, match=r"1 rank\(s\) x 4 local experts hold 4; this layer runs on one process"):
        MOELayer(Top2Gate(MODEL_DIM, 8), experts)
    with pytest.raises(ValueError, match=r"num_experts \(1\) must be >= 2"):
        Top2Gate(MODEL_DIM, 1)
    with pytest.raises(ValueError, match=r"second_expert_policy must be one of"):
        Top2Gate(MODEL_DIM, 4, second_expert_policy="best")
    with pytest.raises(ValueError, match=r"gating must be one of"):
        MOELayer.build(Top2Gate(MODEL_DIM, 4), FFN_DIM, gating="capacity")
    with pytest.raises(ValueError, match=r"activation_fn 'tanh' is not supported"):
        MOELayer.build(Top2Gate(MODEL_DIM, 4), FFN_DIM, activation="tanh")
    with pytest.raises(ValueError, match=r"expected fairseq's Top1Gate or Top2Gate"):
        MOELayer(nn.Linear(MODEL_DIM, 4), experts)
    layer = MOELayer.build(Top2Gate(MODEL_DIM, 4), FFN_DIM)
    with pytest.raises(ValueError, match=r"input must be \[batch, seq, model_dim\]"):
        layer(torch.randn(10, MODEL_DIM))
    with pytest.raises(ValueError, match=r"input_padding_mask must be \[batch, seq\] = \(2, 5\)"):
        layer(torch.randn(2, 5, MODEL_DIM), input_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"only a single input tensor"):
        layer(torch.randn(2, 5, MODEL_DIM), torch.randn(2, 5, MODEL_DIM))
    with pytest.raises(ValueError, match=r"MOELayer: the input's last dimension must be 16"):
        layer(torch.randn(2, 5, MODEL_DIM + 1))
    with pytest.raises(
        TypeError, match=r"MOELayer: the input is torch.bfloat16 but the layer's weights are torch.float32"
    ):
        layer(torch.randn(2, 5, MODEL_DIM, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"MOELayer: the gate is torch.float32 but the experts are torch.bfloat16"):
        MOELayer.build(Top2Gate(MODEL_DIM, 4), FFN_DIM, dtype=torch.bfloat16)


def test_package_exposes_the_fairseq_module():
    assert moe_infer.fairseq.MOELayer is MOELayer
    assert isinstance(MOELayer.build(Top1Gate(8, 2), 4).experts, FairseqExperts)
    assert ops.SECOND_EXPERT_POLICIES == ("all", "sampling", "random")


@pytest.mark.parametrize("gating", ["static", "dynamic"])
@pytest.mark.parametrize("num_slots", [2, 8])
def test_expert_buffer_gives_the_resident_layers_output(gating, num_slots):
    """expert_buffer=N keeps the experts in host memory with N slots; outputs are unchanged, in
    static mode too (dropped pairs stay dropped; placeholders are simply not computed)."""
    source = fairseq_layer(2, second_expert_policy="all", moe_eval_capacity_token_fraction=0.2)
    resident = convert_fairseq_moe(source, gating=gating).eval()
    buffered = MOELayer(
        resident.gate,
        FairseqExperts.from_modules(list(source.experts)),
        gating=gating,
        expert_buffer=num_slots,
        tok_dropout=0.0,
    ).eval()
    x, padding = inputs()
    want, want_l_aux = run_seeded(resident, x, padding)
    got, got_l_aux = run_seeded(buffered, x, padding)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_l_aux, want_l_aux)
    stats = buffered.experts.expert_buffer.stats()
    assert stats["misses"] >= min(num_slots, NUM_EXPERTS) and buffered.experts.expert_buffer.num_slots == num_slots
    with pytest.raises(RuntimeError, match="inference-only"):
        buffered.train()(x, input_padding_mask=padding)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"inference-only: call eval\(\)"):
        buffered.train()(x, input_padding_mask=padding)  # training's expert-row dropout would be skipped
