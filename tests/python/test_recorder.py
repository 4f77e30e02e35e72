"""RoutingRecorder: the recorded expert ids are the ones each layer really used, on moe_infer
layers and on transformers models, and the trace feeds the simulator."""

import pytest
import torch

import hf_models
import moe_infer
from moe_infer import reference as ref
from moe_infer.buffer import NextLayerPrefetcher, attach_expert_buffers, simulate
from moe_infer.traces import RoutingRecorder, RoutingTrace

# Tiny shapes: one intra-op thread (conftest.one_thread) for the whole module.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_records_moe_layers(tmp_path):
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(
        [moe_infer.MoELayer(16, 8, 8, 2, renormalize=True), moe_infer.MoELayer(16, 8, 8, 2, expert_buffer=3)]
    )
    inputs = [torch.randn(5, 16), torch.randn(2, 3, 16), torch.randn(1, 16)]
    layer_inputs = [[], []]
    with RoutingRecorder(layers) as recorder, torch.no_grad():
        for x in inputs:
            h = x
            for i, layer in enumerate(layers):
                layer_inputs[i].append(h.reshape(-1, 16))
                h = h + layer(h)
    layers[0](torch.randn(4, 16))  # after stop(): not recorded
    trace = recorder.trace
    assert recorder.names == ["0", "1"] and trace.num_layers == 2 and trace.num_batches == 3
    assert (trace.num_experts, trace.top_k) == (8, 2)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            for got, h in zip(trace.layers[i], layer_inputs[i]):
                # Independent: the reference's top-k on the layer's logits.
                want = ref.topk_gating(layer.gate(h), 2, renormalize=layer.renormalize)[1]
                assert torch.equal(got, want.to(torch.int32))
    trace.save(str(tmp_path / "trace.pt"))
    assert simulate(RoutingTrace.load(str(tmp_path / "trace.pt")), [2]).accesses > 0


pytest.importorskip("transformers")


def test_records_a_transformers_model_and_its_buffered_twin():
    model = hf_models.build_model("qwen3_moe", seed=2, hidden=32, ffn=16, experts=8, layers=2, vocab=64)
    tokens = torch.randint(0, 64, (2, 6))
    with RoutingRecorder(model) as recorder, torch.no_grad():
        out = model(tokens, output_router_logits=True)
    trace = recorder.trace
    assert trace.num_layers == 2 and trace.num_batches == 1 and trace.top_k == 2
    for layer, logits in enumerate(out.router_logits):  # HF's own record of each router
        expected = torch.topk(torch.softmax(logits.float(), -1), 2).indices.to(torch.int32)
        assert torch.equal(trace.layers[layer][0], expected)
    buffers = attach_expert_buffers(model, 2)
    prefetcher = NextLayerPrefetcher([layer.mlp for layer in model.model.layers])  # the HF routers
    with RoutingRecorder(model) as buffered_recorder, torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, out.logits, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(buffered_recorder.trace.layers, trace.layers))
    assert [a["predictions"] for a in prefetcher.accuracy()] == [1]
    assert buffers["model.layers.1.mlp.experts"].stats()["prefetches"] > 0


def test_recorder_errors():
    with pytest.raises(ValueError, match="no MoE layer"):
        RoutingRecorder(torch.nn.Linear(4, 4))
    layers = torch.nn.ModuleList([moe_infer.MoELayer(8, 4, 4, 1), moe_infer.MoELayer(8, 4, 6, 1)])
    with pytest.raises(ValueError, match="a trace holds one shape"), RoutingRecorder(layers), torch.no_grad():
        for layer in layers:
            layer(torch.randn(3, 8))
    layers = torch.nn.ModuleList([moe_infer.MoELayer(8, 4, 4, 1), moe_infer.MoELayer(8, 4, 4, 1)])
    with RoutingRecorder(layers) as recorder, torch.no_grad():
        layers[0](torch.randn(3, 8))
    with pytest.raises(ValueError, match="different numbers of batches"):
        _ = recorder.trace


def test_unbuffered_layers_cannot_be_prefetched():
    layers = [moe_infer.MoELayer(16, 8, 4, 2) for _ in range(3)]
    with pytest.raises(ValueError, match=r"NextLayerPrefetcher: layers \[1, 2\] have no expert buffer"):
        NextLayerPrefetcher(layers)
