"""moe_infer.optimize and the "moe_infer" experts implementation against transformers v5's own forward.

Small models from configs with seeded weights (hf_models.py beside these tests); the reference is
transformers' eager experts implementation (NLLB-MoE: transformers' router with the expert loop of
fairseq / transformers 4.x, because transformers 5.x's loop ignores the routing, see hf_models).
"""

import copy
import functools
import os
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="the transformers integration needs transformers")

import hf_models  # noqa: E402
import moe_infer  # noqa: E402
from moe_infer.integrations import hf  # noqa: E402

from conftest import relative_error  # noqa: E402

ARCHS = hf_models.ARCHITECTURES
DECODER_ONLY = [a for a in ARCHS if a not in hf_models.ENCODER_DECODER]
VOCAB = 128


# Tiny shapes: one intra-op thread (conftest.one_thread) for the whole module.
pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def _reference(arch):
    model = hf_models.build_model(arch, vocab=VOCAB)
    return hf_models.correct_nllb_moe_experts(model) if arch == "nllb_moe" else model


def reference(arch):
    """A fresh copy of the seeded float32 reference model (transformers eager)."""
    return copy.deepcopy(_reference(arch))


def optimized(arch, **options):
    return moe_infer.optimize(copy.deepcopy(_reference(arch)), verbose=False, **options)


def run(arch, model, input_ids, attention_mask=None, **kwargs):
    """Logits (and router logits when asked) of a causal LM, or of an encoder-decoder with fixed decoder ids."""
    with torch.no_grad():
        if arch in hf_models.ENCODER_DECODER:
            decoder_ids = torch.arange(3, 10).repeat(input_ids.shape[0], 1)
            return model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_ids, **kwargs)
        return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def padded_batch(lengths, total):
    """Random tokens, right-padded with pad id 0, and the attention mask."""
    ids = torch.randint(3, VOCAB, (len(lengths), total))
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, length:] = 0
        mask[row, :length] = 1
    return ids, mask


def router_logits_of(arch, outputs):
    if arch in hf_models.ENCODER_DECODER:
        return tuple(outputs.encoder_router_logits) + tuple(outputs.decoder_router_logits)
    return tuple(outputs.router_logits)


def fused_blocks(model):
    return [m for m in model.modules() if hasattr(type(m), "_moe_infer_original") and hasattr(m, "experts")]


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_router_logits_match_transformers(arch):
    ref, opt = reference(arch), optimized(arch)
    num_blocks = len(opt.moe_infer_report.replaced)
    assert num_blocks == len(fused_blocks(opt)) == (4 if arch in hf_models.ENCODER_DECODER else 2)
    ids, mask = padded_batch([13, 9], 13)
    expected = run(arch, ref, ids, mask, output_router_logits=True)
    out = run(arch, opt, ids, mask, output_router_logits=True)
    assert relative_error(out.logits, expected.logits) <= 1e-5
    # The router logits transformers records for output_router_logits (and its aux losses).
    expected_routers, routers = router_logits_of(arch, expected), router_logits_of(arch, out)
    assert len(routers) == len(expected_routers) == num_blocks
    for got, want in zip(routers, expected_routers):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_does_not_change_other_sequences(arch):
    opt = optimized(arch)
    ids, mask = padded_batch([12, 7], 12)
    batch = run(arch, opt, ids, mask).logits
    alone = [run(arch, opt, ids[i : i + 1, :n], mask[i : i + 1, :n]).logits for i, n in enumerate([12, 7])]
    if arch in hf_models.ENCODER_DECODER:  # padding is in the source: every decoder position must agree
        for row in range(2):
            assert relative_error(batch[row], alone[row][0]) <= 1e-5
    else:  # right padding: the real positions must agree
        assert relative_error(batch[0], alone[0][0]) <= 1e-5
        assert relative_error(batch[1, :7], alone[1][0]) <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_is_identical(arch):
    ref, opt = reference(arch), optimized(arch)
    ids = torch.randint(3, VOCAB, (1, 9))
    options = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = ref.generate(ids, **options)
        tokens = opt.generate(ids, **options)
    assert tokens.shape[1] == expected.shape[1] >= 20
    assert torch.equal(tokens, expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_within_tolerance(arch):
    ids, mask = padded_batch([11, 8], 11)
    expected32 = run(arch, reference(arch), ids, mask).logits
    expected16 = run(arch, reference(arch).to(torch.bfloat16), ids, mask).logits
    # Optimized in float32, then cast: the expert stacks of Switch / NLLB are rebuilt in bfloat16.
    opt = optimized(arch).to(torch.bfloat16)
    out = run(arch, opt, ids, mask).logits
    assert out.dtype == torch.bfloat16
    hf_error = relative_error(expected16, expected32)
    assert relative_error(out, expected32) <= max(2 * hf_error, 1e-2)
    assert relative_error(out, expected16) <= max(2 * hf_error, 1e-2)
    assert all(p.dtype == torch.bfloat16 for n, p in opt.named_parameters() if "experts" in n)


def experts_per_token(arch, router, args, output):
    """(transformers' experts, ours) per token, as sorted [T, k] ids, for one call of a fused router.

    transformers' choice comes from the original router class's forward on the same input, its
    capacity lifted (Switch / NLLB-MoE) so that every token keeps its experts.
    """
    original = type(router)._moe_infer_original
    if arch == "switch":
        router.expert_capacity = 1 << 30
        mask, _, _ = original.forward(router, *args)
        theirs = mask.reshape(-1, mask.shape[-1]).argmax(-1, keepdim=True)
        ours = output[0].reshape(-1, 1)
    elif arch == "nllb_moe":
        fraction, router.moe_eval_capacity_token_fraction = router.moe_eval_capacity_token_fraction, 1.0
        _, gates, _ = original.forward(router, *args)
        router.moe_eval_capacity_token_fraction = fraction
        theirs = torch.stack([row.nonzero().flatten() for row in gates])
        ours = output[0]
    else:  # (router_logits, weights, ids)
        theirs, ours = original.forward(router, *args)[2], output[2]
    return theirs.long().sort(-1).values, ours.long().sort(-1).values


def tied_routers(model):
    """The model with experts 2i and 2i+1 given the same router row (and biases): every token's
    router logits tie, in pairs, whatever its hidden state."""
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("Router"):
                for tensor in [*module.parameters(), *module.buffers()]:
                    tensor[1::2] = tensor[0::2]
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_routes_every_token_as_transformers(arch):
    """Each router of a bfloat16 model picks transformers' experts for every token it sees, ties included."""
    opt = moe_infer.optimize(tied_routers(reference(arch)), verbose=False).to(torch.bfloat16)
    originals = [type(block)._moe_infer_original for block in fused_blocks(opt)]
    routers = [
        getattr(block, hf._BY_BLOCK[(cls.__module__, cls.__name__)].router_attr)
        for block, cls in zip(fused_blocks(opt), originals)
    ]
    calls = []
    hooks = [r.register_forward_hook(lambda m, a, o: calls.append((m, a, o))) for r in routers]
    ids = torch.randint(3, VOCAB, (4, 64))
    run(arch, opt, ids)
    for hook in hooks:
        hook.remove()
    assert len(calls) == len(routers)
    with torch.no_grad():
        for router, args, output in calls:
            theirs, ours = experts_per_token(arch, router, args, output)
            assert ours.shape[0] >= ids.numel() or arch in hf_models.ENCODER_DECODER
            assert torch.equal(ours, theirs)


@pytest.mark.parametrize("arch", DECODER_ONLY)
def test_bfloat16_greedy_generate_is_identical(arch):
    ref = tied_routers(reference(arch)).to(torch.bfloat16)
    opt = moe_infer.optimize(copy.deepcopy(ref), verbose=False)
    ids = torch.randint(3, VOCAB, (2, 9))
    options = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = ref.generate(ids, **options)
        tokens = opt.generate(ids, **options)
    assert torch.equal(tokens, expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_block_compiles_without_graph_breaks(arch):
    torch._dynamo.reset()
    model = optimized(arch, hf_capacity=True)
    block = fused_blocks(model)[0]
    hidden = torch.randn(2, 7, model.config.hidden_size)
    args = (hidden,)
    if arch == "nllb_moe":  # the additive attention mask its layers pass: the last key of row 1 is padding
        padding = torch.zeros(2, 1, 7, 7)
        padding[1, :, :, -1] = torch.finfo(torch.float32).min
        args = (hidden, padding)
    compiled = torch.compile(block, fullgraph=True)  # raises on a graph break
    with torch.no_grad():
        out, expected = compiled(*args), block(*args)
    if arch == "gpt_oss":
        out, expected = out[0], expected[0]
    assert relative_error(out, expected) <= 1e-6


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "switch", "nllb_moe"])
def test_save_pretrained_loads_in_plain_transformers(arch, tmp_path):
    opt = optimized(arch)
    ids, mask = padded_batch([10, 6], 10)
    out = run(arch, opt, ids, mask).logits
    assert list(opt.state_dict()) == list(_reference(arch).state_dict())
    opt.save_pretrained(tmp_path)
    loaded, info = type(_reference(arch)).from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert not fused_blocks(loaded)
    if arch == "nllb_moe":
        hf_models.correct_nllb_moe_experts(loaded)
    loaded.eval()
    if arch not in hf_models.ENCODER_DECODER:
        loaded.set_experts_implementation("eager")
    assert relative_error(run(arch, loaded, ids, mask).logits, out) <= 1e-5


@pytest.mark.parametrize("arch", DECODER_ONLY)
def test_experts_implementation_registry(arch):
    ref = reference(arch)
    model = reference(arch)
    model.set_experts_implementation(hf.EXPERTS_IMPLEMENTATION)
    assert model.config._experts_implementation == "moe_infer"
    ids, mask = padded_batch([10, 10], 10)
    assert relative_error(run(arch, model, ids, mask).logits, run(arch, ref, ids, mask).logits) <= 1e-5


def test_experts_implementation_at_load_and_compiled(tmp_path):
    _reference("qwen3_moe").save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="moe_infer").eval()
    assert model.config._experts_implementation == "moe_infer"
    experts = model.model.layers[0].mlp.experts
    hidden = torch.randn(9, model.config.hidden_size)
    _, weights, ids = model.model.layers[0].mlp.gate(hidden)
    torch._dynamo.reset()
    compiled = torch.compile(experts, fullgraph=True)
    with torch.no_grad():
        out = compiled(hidden, ids, weights)
        model.set_experts_implementation("eager")
        expected = experts(hidden, ids, weights)
    assert relative_error(out, expected) <= 1e-5


def test_model_without_supported_block_gets_a_clear_error():
    with pytest.raises(ValueError, match=r"has no supported sparse MoE block.*MixtralSparseMoeBlock \(Mixtral\)"):
        moe_infer.optimize(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


def test_unsupported_activation_is_reported():
    model = hf_models.build_model("mixtral", vocab=VOCAB, hidden_act="gelu_fast")
    with pytest.raises(ValueError, match=r"model.layers.0.mlp: moe_infer: MixtralExperts uses the gated activation"):
        moe_infer.optimize(model)
    # The registry route refuses the choice itself, not the first forward.
    with pytest.raises(NotImplementedError, match="gated activation FastGELUActivation"):
        model.set_experts_implementation("moe_infer")
    assert model.config._experts_implementation != "moe_infer"
    config = hf_models.make_config("mixtral", vocab=VOCAB, hidden_act="gelu_fast")
    config._experts_implementation = "moe_infer"
    with pytest.raises(NotImplementedError, match="gated activation FastGELUActivation"):
        transformers.MixtralForCausalLM(config)


@pytest.mark.parametrize(
    "hidden_act,activation",
    [("gelu", "gelu_glu"), ("gelu_pytorch_tanh", "gelu_tanh_glu"), ("gelu_new", "gelu_tanh_glu"), ("relu", "relu_glu")],
)
def test_gated_activations_from_hidden_act(hidden_act, activation):
    """Mixtral-like models whose config names another activation: optimize(), the buffered path and
    the registry route all compute transformers' act_fn(gate) * up."""
    model = hf_models.build_model("mixtral", vocab=VOCAB, hidden_act=hidden_act)
    assert moe_infer.experts.expert_spec(model.model.layers[0].mlp.experts).activation == activation
    ids, mask = padded_batch([9, 6], 9)
    expected = run("mixtral", model, ids, mask).logits
    opt = moe_infer.optimize(copy.deepcopy(model), verbose=False)
    assert relative_error(run("mixtral", opt, ids, mask).logits, expected) <= 1e-5
    buffered = moe_infer.optimize(copy.deepcopy(model), verbose=False, expert_buffer=3)
    assert relative_error(run("mixtral", buffered, ids, mask).logits, expected) <= 1e-5
    registry = copy.deepcopy(model)
    registry.set_experts_implementation("moe_infer")
    assert relative_error(run("mixtral", registry, ids, mask).logits, expected) <= 1e-5


def test_optimize_reports_and_is_idempotent(capsys):
    model = optimized("olmoe")
    assert model.moe_infer_report.replaced == {"model.layers.0.mlp": "OLMoE", "model.layers.1.mlp": "OLMoE"}
    capsys.readouterr()
    moe_infer.optimize(model)
    assert "replaced 0 sparse MoE block(s); 2 already optimized" in capsys.readouterr().out
    assert len(model.moe_infer_report.already_optimized) == 2
    hf.restore(model)
    assert not fused_blocks(model)
    ids = torch.randint(3, VOCAB, (1, 6))
    assert relative_error(run("olmoe", model, ids).logits, run("olmoe", reference("olmoe"), ids).logits) <= 1e-6


def test_reoptimize_reports_what_it_did(capsys):
    model = optimized("olmoe")
    capsys.readouterr()
    moe_infer.optimize(model, expert_buffer=2)
    out = capsys.readouterr().out
    assert "2 already optimized" in out
    assert "attached expert buffers to 2 experts module(s) (2 slots per layer)" in out
    assert len(model.moe_infer_report.buffers) == 2
    moe_infer.optimize(model, validate=False, verbose=False)  # the keywords reach the fused blocks again
    assert all(not block.gate._moe_infer_validate for block in fused_blocks(model))


def test_training_mode_runs_transformers_forward():
    ref, opt = reference("switch").train(), optimized("switch").train()
    ids, mask = padded_batch([8, 8], 8)
    torch.manual_seed(1)
    expected = run("switch", ref, ids, mask).logits  # dropout and router jitter: same seed, same draws
    torch.manual_seed(1)
    assert relative_error(run("switch", opt, ids, mask).logits, expected) <= 1e-5


def test_fused_block_pickles():
    block = fused_blocks(optimized("mixtral"))[0]
    copy_of_block = pickle.loads(pickle.dumps(block))
    assert type(copy_of_block) is type(block)
    hidden = torch.randn(1, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(copy_of_block(hidden), block(hidden))
    # The copy's experts are its own modules: a hook on them is seen (and not on the original's).
    for copied in (copy_of_block, copy.deepcopy(block)):
        assert not copied._runs_transformers
        copied.experts.register_forward_hook(_double_output)
        assert copied._runs_transformers and not block._runs_transformers


def test_import_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import torch, moe_infer\n"
        "try:\n"
        "    moe_infer.optimize(torch.nn.Linear(2, 2))\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    assert "ImportError: moe_infer.integrations.hf needs transformers >= 5.0" in result.stdout
    assert "pip install 'transformers>=5'" in result.stdout


# ---- capacity: SwitchTransformers and NLLB-MoE -------------------------------------------------


def _sparse_block_model(arch, **config):
    """A model holding one sparse MLP block of arch (seeded, eval), and the block's hidden size."""
    model = hf_models.build_model(arch, vocab=VOCAB, layers=1, experts=8, **config)
    if arch == "nllb_moe":
        hf_models.correct_nllb_moe_experts(model)
    block = next(m for m in model.modules() if type(m).__name__.endswith("SparseMLP"))
    return nn.ModuleDict({"block": block}), model.config.d_model


def _capacity_outputs(arch, inputs, router=None, **config):
    ref, _ = _sparse_block_model(arch, **config)
    for name, value in (router or {}).items():
        setattr(ref["block"].router, name, value)
    capacity_free = moe_infer.optimize(copy.deepcopy(ref), verbose=False)
    exact = moe_infer.optimize(copy.deepcopy(ref), verbose=False, hf_capacity=True)
    with torch.no_grad():
        outputs = []
        for model in (ref, exact, capacity_free):
            torch.manual_seed(7)  # the "sampling" / "random" policies draw: same draws for each
            outputs.append(model["block"](*inputs))
    return outputs


def test_switch_capacity_reproduced_exactly():
    hidden = torch.randn(2, 24, 64)
    expected, exact, capacity_free = _capacity_outputs("switch", (hidden,), expert_capacity=2)
    dropped_rows = (expected.abs().sum(-1) == 0).sum().item()
    assert dropped_rows > 0  # transformers drops tokens over capacity: their MoE output is zero
    assert relative_error(exact, expected) <= 1e-6
    assert ((exact.abs().sum(-1) == 0).sum().item()) == dropped_rows
    assert relative_error(capacity_free, expected) > 1e-2
    # Capacity-free equals transformers wherever transformers drops nothing.
    kept = expected.abs().sum(-1) != 0
    assert relative_error(capacity_free[kept], expected[kept]) <= 1e-6


@pytest.mark.parametrize(
    "config",
    [
        dict(),
        dict(batch_prioritized_routing=True),
        dict(normalize_router_prob_before_dropping=True),
        dict(second_expert_policy="random"),
        dict(second_expert_policy="sampling"),
        dict(second_expert_policy="random", normalize_router_prob_before_dropping=True),
        dict(moe_eval_capacity_token_fraction=0.0, expert_capacity=3),  # the configured capacity
        dict(moe_eval_capacity_token_fraction=0.0, router=dict(expert_capacity=None)),  # 2 * ceil(T / E)
    ],
    ids=[
        "all",
        "prioritized",
        "normalize_first",
        "random",
        "sampling",
        "random_normalize_first",
        "fixed_capacity",
        "default_capacity",
    ],
)
def test_nllb_capacity_reproduced_exactly(config):
    config = {"moe_eval_capacity_token_fraction": 0.1, "moe_token_dropout": 0.2, **config}
    hidden = torch.randn(2, 20, 64)
    padding = torch.zeros(2, 1, 20, 20)
    padding[1, :, :, 15:] = torch.finfo(torch.float32).min  # the last 5 tokens of row 1 are padding
    expected, exact, capacity_free = _capacity_outputs("nllb_moe", (hidden, padding), **config)
    assert relative_error(exact, expected) <= 1e-6
    assert (expected[1, 15:] == 0).all() and (exact[1, 15:] == 0).all()  # padding gets no expert
    if config.get("second_expert_policy", "all") == "all":
        assert relative_error(capacity_free, expected) > 1e-2  # transformers dropped pairs here


def test_nllb_capacity_free_equals_transformers_when_nothing_is_dropped():
    hidden = torch.randn(3, 10, 64)
    expected, exact, capacity_free = _capacity_outputs("nllb_moe", (hidden,), moe_eval_capacity_token_fraction=1.0)
    assert relative_error(capacity_free, expected) <= 1e-6
    assert relative_error(exact, expected) <= 1e-6


def test_transformers_nllb_expert_loop_ignores_the_routing():
    """Why the NLLB-MoE reference corrects transformers' expert loop (see hf_models)."""
    model, _ = _sparse_block_model("nllb_moe")
    block = model["block"]
    hidden = torch.randn(1, 16, 64)
    with torch.no_grad():
        corrected = block(hidden)
        del block.experts.forward  # back to transformers 5.x's own loop
        original = block(hidden)
        _, router_probs, _ = block.router(hidden.view(-1, 64))
    assert (router_probs[:, 2:] != 0).any()  # tokens are routed to experts >= 2 ...
    assert relative_error(original, corrected) > 1e-2  # ... which transformers' loop never runs


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_optimize_with_expert_buffer(arch, tmp_path):
    """optimize(model, expert_buffer=N): the experts live in host memory (or, with checkpoint, in
    the save_pretrained files through mmap) behind an N-slot pool; logits are unchanged."""
    ids, mask = padded_batch([11, 7], 11)
    expected = run(arch, optimized(arch), ids, mask).logits
    buffered = optimized(arch, expert_buffer=2)
    assert len(buffered.moe_infer_report.buffers) == 2
    torch.testing.assert_close(run(arch, buffered, ids, mask).logits, expected, rtol=1e-5, atol=1e-5)
    stats = [b.stats() for b in buffered.moe_infer_report.buffers.values()]
    assert all(s["misses"] > 0 for s in stats)
    before = buffered.moe_infer_report.buffers
    moe_infer.optimize(buffered, verbose=False)  # again: the report lists the buffers still in use
    assert buffered.moe_infer_report.buffers == before
    if arch == "mixtral":  # from the checkpoint files instead of the model's own weights
        reference(arch).save_pretrained(tmp_path)
        from_disk = optimized(arch, expert_buffer=3, checkpoint=str(tmp_path))
        torch.testing.assert_close(run(arch, from_disk, ids, mask).logits, expected, rtol=1e-5, atol=1e-5)


def test_optimize_expert_buffer_errors():
    with pytest.raises(ValueError, match="expert_buffer needs stacked experts"):
        optimized("switch", expert_buffer=2)
    with pytest.raises(ValueError, match="cannot be combined"):
        optimized("mixtral", expert_buffer=2, ep_group=object())


def test_buffered_checkpoint_model_saves_and_optimizes_again(tmp_path):
    """optimize(expert_buffer=N, checkpoint=dir) on per-expert checkpoint keys leaves placeholders
    in the model, yet save_pretrained writes the real weights; a second optimize(expert_buffer=N)
    keeps the buffers it has."""
    ids, mask = padded_batch([9, 5], 9)
    reference("mixtral").save_pretrained(tmp_path / "original")
    model = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "original").eval()
    moe_infer.optimize(model, expert_buffer=3, checkpoint=str(tmp_path / "original"), verbose=False)
    expected = run("mixtral", model, ids, mask).logits
    buffers = model.moe_infer_report.buffers
    model.save_pretrained(tmp_path / "saved")
    reloaded = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "saved").eval()
    torch.testing.assert_close(run("mixtral", reloaded, ids, mask).logits, expected, rtol=1e-5, atol=1e-5)
    again = moe_infer.optimize(model, expert_buffer=3, verbose=False).moe_infer_report.buffers
    assert again == buffers
    with pytest.raises(ValueError, match=r"already has an expert buffer \(\[3\] slots\)"):
        moe_infer.optimize(model, expert_buffer=5, verbose=False)


def test_refused_options_leave_the_model_unchanged():
    for arch, options, message in [
        ("mixtral", dict(expert_buffer=2, ep_group=object()), "cannot be combined"),
        ("switch", dict(expert_buffer=2), "expert_buffer needs stacked experts"),
    ]:
        model = reference(arch)
        classes = [type(m) for m in model.modules()]
        with pytest.raises(ValueError, match=message):
            moe_infer.optimize(model, verbose=False, **options)
        assert [type(m) for m in model.modules()] == classes


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"])
def test_experts_implementation_chosen_after_optimize_is_honoured(arch):
    ids, mask = padded_batch([9, 5], 9)
    model = optimized(arch)
    calls = []
    original = transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS["batched_mm"]

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS.register("counting_batched_mm", counting)
    model.set_experts_implementation("counting_batched_mm")
    got = run(arch, model, ids, mask).logits
    assert calls, "the experts implementation chosen after optimize() was not used"
    plain = reference(arch)
    plain.set_experts_implementation("batched_mm")
    torch.testing.assert_close(got, run(arch, plain, ids, mask).logits, rtol=1e-5, atol=1e-5)


def count_fused_runs(model, monkeypatch) -> list:
    """A list that grows by one each time a fused block of ``model`` computes its experts with moe_infer."""
    runs = []
    for block in fused_blocks(model):
        backend = block.experts_backend

        def counted(*args, _run=backend.run):
            runs.append(1)
            return _run(*args)

        monkeypatch.setattr(backend, "run", counted)
    return runs


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_choosing_the_experts_implementation_in_use_is_honoured_until_optimize(arch, monkeypatch):
    """transformers' own test of its experts implementations sets each in turn, the one in use at
    optimize() time included, and checks that it ran: any choice hands the experts to transformers'
    forward, and optimize() again takes them back."""
    ids, mask = padded_batch([9, 5], 9)
    expected = run(arch, reference(arch), ids, mask).logits
    model = optimized(arch)
    fused_runs = count_fused_runs(model, monkeypatch)
    torch.testing.assert_close(run(arch, model, ids, mask).logits, expected, rtol=1e-5, atol=1e-5)
    assert fused_runs
    fused_runs.clear()
    model.set_experts_implementation(model.config._experts_implementation)
    torch.testing.assert_close(run(arch, model, ids, mask).logits, expected, rtol=1e-5, atol=1e-5)
    assert not fused_runs, "the experts implementation chosen after optimize() was not used"
    moe_infer.optimize(model, verbose=False)
    torch.testing.assert_close(run(arch, model, ids, mask).logits, expected, rtol=1e-5, atol=1e-5)
    assert fused_runs


@pytest.mark.parametrize("top_k", [6, 8])
def test_deepseek_v3_with_more_experts_than_its_chosen_groups_hold(top_k, monkeypatch):
    """transformers' own DeepSeek-V3 test config routes k = 8 of 8 experts with one of two groups
    chosen: the k reach into the masked group. The optimized model routes as transformers does and
    its experts still run on the fused path."""
    options = dict(vocab=VOCAB, top_k=top_k, n_group=2, topk_group=1)
    ids, mask = padded_batch([9, 5], 9)
    plain = hf_models.build_model("deepseek_v3", **options)
    model = moe_infer.optimize(hf_models.build_model("deepseek_v3", **options), verbose=False)
    fused_runs = count_fused_runs(model, monkeypatch)
    torch.testing.assert_close(
        run("deepseek_v3", model, ids, mask).logits, run("deepseek_v3", plain, ids, mask).logits, rtol=1e-5, atol=1e-5
    )
    assert fused_runs


def test_generates_decoding_switch_is_not_a_choice(monkeypatch):
    """Off the CPU, generate() switches grouped_mm to batched_mm for its decoding steps and back
    (through set_experts_implementation): the fused blocks keep running moe_infer through it."""
    model = reference("mixtral")
    model.set_experts_implementation("grouped_mm")
    moe_infer.optimize(model, verbose=False)
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("meta")))
    with model._optimize_model_for_decode():
        assert model.config._experts_implementation == "batched_mm"  # the switch happened
        assert not any(block._runs_transformers for block in fused_blocks(model))
    assert model.config._experts_implementation == "grouped_mm"
    assert not any(block._runs_transformers for block in fused_blocks(model))


@pytest.mark.parametrize("offload", ["cpu_offload", "disk_offload"])
def test_accelerate_offloading_is_exact(offload, tmp_path):
    """accelerate's offloading hooks load the experts only inside the hooked forward: the fused
    blocks run it, so offloaded models give the logits of the plain model."""
    import accelerate  # pinned in scripts/setup.sh

    ids, mask = padded_batch([9, 5], 9)
    expected = run("mixtral", optimized("mixtral"), ids, mask).logits
    model = optimized("mixtral")
    if offload == "cpu_offload":
        accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    else:
        accelerate.disk_offload(model, str(tmp_path), execution_device=torch.device("cpu"))
    assert model.model.layers[0].mlp.experts.gate_up_proj.device.type == "meta"
    torch.testing.assert_close(run("mixtral", model, ids, mask).logits, expected, rtol=1e-5, atol=1e-5)


def _experts_on_disk(model: nn.Module, target: str) -> dict:
    """A device_map with the module ``target`` on "disk" and every other module on the CPU."""
    device_map = {}

    def place(prefix, module):
        for name, child in module.named_children():
            path = prefix + name
            if path == target:
                device_map[path] = "disk"
            elif target.startswith(path + "."):
                assert not any(True for _ in child.parameters(recurse=False)), path
                place(path + ".", child)
            else:
                device_map[path] = "cpu"

    place("", model)
    return device_map


@pytest.mark.parametrize("route", ["from_pretrained", "dispatch_model"])
def test_device_map_with_experts_on_disk_is_exact(route, tmp_path):
    """A device_map that puts one layer's experts on "disk": loaded that way and then optimized, or
    optimized and then dispatched, the model gives the logits of the plain, un-offloaded model."""
    import accelerate  # pinned in scripts/setup.sh

    ids, mask = padded_batch([9, 5], 9)
    plain = reference("mixtral")
    expected = run("mixtral", plain, ids, mask).logits
    device_map = _experts_on_disk(plain, "model.layers.1.mlp.experts")
    if route == "from_pretrained":
        plain.save_pretrained(tmp_path / "saved")
        model = transformers.MixtralForCausalLM.from_pretrained(
            tmp_path / "saved", device_map=device_map, offload_folder=str(tmp_path / "offload")
        ).eval()
        moe_infer.optimize(model, verbose=False)
    else:
        model = accelerate.dispatch_model(optimized("mixtral"), device_map, offload_dir=str(tmp_path / "offload"))
    assert model.model.layers[1].mlp.experts.gate_up_proj.device.type == "meta"
    assert model.model.layers[0].mlp.experts.gate_up_proj.device.type == "cpu"
    assert set(model.moe_infer_report.replaced) >= {"model.layers.0.mlp", "model.layers.1.mlp"}
    torch.testing.assert_close(run("mixtral", model, ids, mask).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["switch", "nllb_moe"])
def test_separate_experts_stay_independent_parameters(arch):
    """SwitchTransformers / NLLB-MoE keep one module per expert: after optimize() their parameters
    still have storages of their own (views of one stack would look tied to transformers' checks),
    and an in-place change to one expert is followed by the next forward."""
    model = optimized(arch)
    storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(storages) == len(set(storages))
    ids, mask = padded_batch([9, 5], 9)
    plain = reference(arch)
    for m in (model, plain):
        block = next(b for b in m.modules() if hasattr(b, "experts") and hasattr(b.experts, "expert_0"))
        with torch.no_grad():
            for name, expert in block.experts.named_children():
                if name.startswith("expert_"):
                    next(expert.parameters()).mul_(1.5)
    torch.testing.assert_close(
        run(arch, model, ids, mask).logits, run(arch, plain, ids, mask).logits, rtol=1e-5, atol=1e-5
    )


class _Scaled(nn.Module):
    def forward(self, weight):
        return 1.5 * weight


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_parametrized_weights_are_read_through_the_parametrization(arch):
    """A router or expert weight under torch.nn.utils.parametrize is no longer in its module's
    _parameters: the fused path reads it through the parametrization (moe_infer.experts.parameter_of),
    as transformers' forward does, also when the parametrization comes after optimize()."""
    from torch.nn.utils import parametrize

    ids, mask = padded_batch([9, 5], 9)
    model, plain = optimized(arch), reference(arch)
    unchanged = run(arch, model, ids, mask).logits
    for m in (model, plain):
        block = next(b for b in m.modules() if hasattr(b, "experts") and hasattr(b, "gate"))
        parametrize.register_parametrization(block.gate, "weight", _Scaled())
        parametrize.register_parametrization(block.experts, "down_proj", _Scaled())
    out = run(arch, model, ids, mask).logits
    assert fused_blocks(model)
    torch.testing.assert_close(out, run(arch, plain, ids, mask).logits, rtol=1e-5, atol=1e-5)
    assert relative_error(out, unchanged) > 1e-3  # the parametrizations did change the model


def _first_block(model):
    return next(
        b for b in model.modules() if hasattr(b, "experts") and hasattr(b, "gate" if hasattr(b, "gate") else "router")
    )


# The fc2 layer of each expert where the experts are separate modules.
_SEPARATE_FC2 = {"switch": "wo", "nllb_moe": "fc2"}


def _expert_tensor_owner(arch, block):
    """(module, name) of one expert weight of ``block``: the stacked down_proj, or expert 1's fc2 weight."""
    if arch in _SEPARATE_FC2:
        return block.experts.expert_1.get_submodule(_SEPARATE_FC2[arch]), "weight"
    return block.experts, "down_proj"


@pytest.mark.parametrize("arch", ["mixtral", "switch", "nllb_moe"])
def test_experts_parametrized_before_optimize_are_fused(arch, monkeypatch):
    """An expert weight under torch.nn.utils.parametrize before optimize(): the block is still
    fused (it used to stop optimize() with a bare StopIteration, or crash the first forward of
    SwitchTransformers / NLLB-MoE), reads the weight through the parametrization, and gives
    transformers' logits."""
    from torch.nn.utils import parametrize

    ids, mask = padded_batch([9, 5], 9)
    model, plain = reference(arch), reference(arch)
    for m in (model, plain):
        parametrize.register_parametrization(*_expert_tensor_owner(arch, _first_block(m)), _Scaled())
    moe_infer.optimize(model, verbose=False)
    assert not model.moe_infer_report.skipped
    fused_runs = count_fused_runs(model, monkeypatch)
    torch.testing.assert_close(
        run(arch, model, ids, mask).logits, run(arch, plain, ids, mask).logits, rtol=1e-5, atol=1e-5
    )
    assert fused_runs
    if arch in _SEPARATE_FC2:  # the stack is made again when the parametrization's tensors change, not each call
        stacks = []
        monkeypatch.setattr(
            hf._ExpertStack, "_stack", lambda self, _stack=hf._ExpertStack._stack: stacks.append(1) or _stack(self)
        )
        run(arch, model, ids, mask)
        assert not stacks
        for m in (model, plain):
            owner, name = _expert_tensor_owner(arch, _first_block(m))
            with torch.no_grad():
                owner.parametrizations[name].original.mul_(-2.0)
        torch.testing.assert_close(
            run(arch, model, ids, mask).logits, run(arch, plain, ids, mask).logits, rtol=1e-5, atol=1e-5
        )
        assert stacks


def _double_output(module, args, output):
    return 2 * output


@pytest.mark.parametrize("arch", ["mixtral", "switch"])
@pytest.mark.parametrize("change", ["prune", "forward_hook"])
def test_hooks_on_the_experts_run_in_transformers_forward(arch, change, monkeypatch):
    """torch.nn.utils.prune (a forward pre-hook computes the weight) and a user's forward hook act
    through the experts' modules' hooks, which the fused path, not calling those modules, would
    skip: such a block runs transformers' own forward and gives its logits; removing the hook
    brings the fused path back."""
    from torch.nn.utils import prune

    ids, mask = padded_batch([9, 5], 9)
    model, plain = optimized(arch), reference(arch)
    fused_runs = count_fused_runs(model, monkeypatch)
    handles = []
    for m in (model, plain):
        owner, name = _expert_tensor_owner(arch, _first_block(m))
        if change == "prune":
            prune.l1_unstructured(owner, name, amount=0.5)
            with torch.no_grad():
                getattr(owner, name + "_orig").mul_(3.0)  # read through the hook at the next forward
        else:
            handles.append(_first_block(m).experts.register_forward_hook(_double_output))
    out = run(arch, model, ids, mask).logits
    torch.testing.assert_close(out, run(arch, plain, ids, mask).logits, rtol=1e-5, atol=1e-5)
    assert len(fused_runs) == len(fused_blocks(model)) - 1  # every block but the hooked one
    assert relative_error(out, run(arch, optimized(arch), ids, mask).logits) > 1e-3  # the change shows
    if handles:
        handles[0].remove()
        fused_runs.clear()
        run(arch, model, ids, mask)
        assert len(fused_runs) == len(fused_blocks(model))


@pytest.mark.parametrize("arch,what", [("qwen3_moe", "experts"), ("qwen3_moe", "activation"), ("switch", "expert")])
def test_experts_replaced_after_optimize(arch, what, monkeypatch):
    """A block's experts module, its activation, or (where the experts are separate modules) one
    expert's module replaced after optimize(): the fused backend was built from the one before, so
    the block runs transformers' forward with the new one; and optimize() again fuses the new one."""
    ids, mask = padded_batch([9, 5], 9)
    model, plain = optimized(arch), reference(arch)
    run(arch, model, ids, mask)
    for m in (model, plain):
        experts = _first_block(m).experts
        if what == "activation":
            experts.act_fn = nn.GELU()
            continue
        replacement = copy.deepcopy(experts.expert_2 if what == "expert" else experts)
        with torch.no_grad():
            for p in replacement.parameters():
                p.mul_(-1.0)
        if what == "expert":
            experts.expert_1 = replacement
        else:
            _first_block(m).experts = replacement
    fused_runs = count_fused_runs(model, monkeypatch)
    out = run(arch, model, ids, mask).logits
    torch.testing.assert_close(out, run(arch, plain, ids, mask).logits, rtol=1e-5, atol=1e-5)
    assert len(fused_runs) == len(fused_blocks(model)) - 1
    moe_infer.optimize(model, verbose=False)
    fused_runs = count_fused_runs(model, monkeypatch)
    refused = run(arch, model, ids, mask).logits
    assert len(fused_runs) == len(fused_blocks(model))
    torch.testing.assert_close(refused, run(arch, plain, ids, mask).logits, rtol=1e-5, atol=1e-5)


def test_restore_keeps_a_parametrization_made_after_optimize():
    """hf.restore() on a router parametrized after optimize(): its class becomes the
    parametrization's class over transformers' router, so the weight is still computed."""
    from torch.nn.utils import parametrize

    ids, mask = padded_batch([9, 5], 9)
    model, plain = optimized("mixtral"), reference("mixtral")
    for m in (model, plain):
        parametrize.register_parametrization(_first_block(m).gate, "weight", _Scaled())
    hf.restore(model)
    gate = _first_block(model).gate
    assert type(gate).__name__ == "ParametrizedMixtralTopKRouter"
    assert not fused_blocks(model) and not hasattr(type(gate), "_moe_infer_original")
    assert parametrize.is_parametrized(gate, "weight")
    torch.testing.assert_close(
        run("mixtral", model, ids, mask).logits, run("mixtral", plain, ids, mask).logits, rtol=1e-5, atol=1e-5
    )


def test_router_renormalization_follows_transformers():
    """Mixtral's router always renormalizes (transformers ignores a norm_topk_prob set on it);
    Qwen3-MoE's reads its norm_topk_prob, and without one fails as transformers' does."""
    ids, mask = padded_batch([9, 5], 9)
    for arch in ("mixtral", "qwen3_moe"):
        model, plain = optimized(arch), reference(arch)
        for m in (model, plain):
            _first_block(m).gate.norm_topk_prob = False
        out = run(arch, model, ids, mask).logits
        torch.testing.assert_close(out, run(arch, plain, ids, mask).logits, rtol=1e-5, atol=1e-5)
        changed = relative_error(out, run(arch, optimized(arch), ids, mask).logits) > 1e-3
        assert changed == (arch == "qwen3_moe")
    for m in (model, plain):
        del _first_block(m).gate.norm_topk_prob
        with pytest.raises(AttributeError, match="norm_topk_prob"):
            run("qwen3_moe", m, ids, mask)
