"""Expert stores: safetensors read through mmap (stacked and per-expert keys, HF save_pretrained),
clear errors for broken files, and a disk-backed store that does not grow the resident set."""

import json
import os
import struct
import time

import pytest
import torch

save_file = pytest.importorskip("safetensors.torch", reason="safetensors stores need safetensors").save_file

import hf_models  # noqa: E402
import moe_infer  # noqa: E402
from moe_infer import ops  # noqa: E402
from moe_infer.buffer import (  # noqa: E402
    ExpertBuffer,
    ExpertStore,
    SafetensorsFile,
    attach_expert_buffer,
    attach_expert_buffers,
)

# Tiny shapes: one intra-op thread (conftest.one_thread) for the whole module.
pytestmark = pytest.mark.usefixtures("one_thread")


PREFIX = "model.layers.0.mlp.experts."


def resident(fc1, fc2, fc1_bias, fc2_bias, activation, x, ids, w, transposed=False):
    plan = ops.dispatch_plan(ids, fc1.shape[0])
    rows = ops.permute(x, plan.sorted_pair_ids, ids.shape[1])
    out = ops.grouped_mlp(rows, plan.expert_offsets, fc1, fc1_bias, fc2, fc2_bias, activation, transposed)
    return ops.unpermute_combine(out, w, plan.row_of_pair)


def check_store(store, fc1, fc2, fc1_bias=None, fc2_bias=None, activation="silu_glu", transposed=False, slots=2):
    """The store's stacked tensors equal the originals and a buffer over it is exact."""
    assert torch.equal(store.stacked("fc1_weight"), fc1) and torch.equal(store.stacked("fc2_weight"), fc2)
    buffer = ExpertBuffer(store, slots, "cpu", "paper", activation, transposed)
    num_experts, hidden = fc1.shape[0], fc2.shape[2] if transposed else fc2.shape[1]
    for _ in range(3):
        ids = torch.stack([torch.randperm(num_experts)[:2] for _ in range(9)]).to(torch.int32)
        x, w = torch.randn(9, hidden), torch.rand(9, 2)
        with torch.no_grad():
            expected = resident(fc1, fc2, fc1_bias, fc2_bias, activation, x, ids, w, transposed)
            assert torch.equal(buffer(x, ids, w), expected)
    return buffer


def test_stacked_file(tmp_path):
    fc1, fc2 = torch.randn(5, 32, 16), torch.randn(5, 16, 16)
    path = tmp_path / "experts.safetensors"
    save_file({PREFIX + "gate_up_proj": fc1, PREFIX + "down_proj": fc2, "other.weight": torch.ones(3)}, str(path))
    store = ExpertStore.from_safetensors(str(path), PREFIX, dtype=torch.float32, num_experts=5)
    assert store.file_backed and store.num_experts == 5 and store.parts == ["fc1_weight", "fc2_weight"]
    check_store(store, fc1, fc2)


@pytest.mark.parametrize("naming", ["hf", "mixtral", "fairseq"])
def test_per_expert_keys(tmp_path, naming):
    num_experts, hidden, ffn = 4, 16, 16
    gate, up = torch.randn(num_experts, ffn, hidden), torch.randn(num_experts, ffn, hidden)
    down, b1, b2 = (
        torch.randn(num_experts, hidden, ffn),
        torch.randn(num_experts, ffn),
        torch.randn(num_experts, hidden),
    )
    tensors = {}
    for e in range(num_experts):
        p = f"{PREFIX}{e}."
        if naming == "hf":
            tensors.update(
                {p + "gate_proj.weight": gate[e], p + "up_proj.weight": up[e], p + "down_proj.weight": down[e]}
            )
        elif naming == "mixtral":
            tensors.update({p + "w1.weight": gate[e], p + "w3.weight": up[e], p + "w2.weight": down[e]})
        else:
            tensors.update(
                {p + "fc1.weight": up[e], p + "fc1.bias": b1[e], p + "fc2.weight": down[e], p + "fc2.bias": b2[e]}
            )
    path = tmp_path / "experts.safetensors"
    save_file(tensors, str(path))
    store = ExpertStore.from_safetensors(str(path), PREFIX)
    if naming == "fairseq":
        check_store(store, up, down, b1, b2, activation="relu")
        # Each bias on its own: the one the file has is kept (the fc1 biases were dropped when
        # no fc2 bias came with them).
        for kept, dropped in (("fc1", "fc2"), ("fc2", "fc1")):
            path = tmp_path / f"{kept}_bias.safetensors"
            save_file({k: v for k, v in tensors.items() if not k.endswith(f"{dropped}.bias")}, str(path))
            store = ExpertStore.from_safetensors(str(path), PREFIX)
            assert sorted(store.parts) == sorted(["fc1_weight", "fc2_weight", f"{kept}_bias"])
            biases = (b1, None) if kept == "fc1" else (None, b2)
            check_store(store, up, down, *biases, activation="relu")
    else:
        check_store(store, torch.cat([gate, up], dim=1), down)  # transformers' gate_up_proj layout


def _write_raw(path, header, data=b""):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda p, good: p.write_bytes(good[:5]), r"is truncated: 5 bytes"),
        (lambda p, good: p.write_bytes(good[:-8]), r"is truncated: tensor '.*' ends at data byte"),
        (lambda p, good: p.write_bytes(struct.pack("<Q", 1 << 40) + good[8:]), r"header claims \d+ bytes"),
        (lambda p, good: p.write_bytes(good[:8] + b"#" + good[9:]), r"header is not valid JSON"),
        (lambda p, good: _write_raw(p, [1, 2]), r"header is not a JSON object"),
        (lambda p, good: _write_raw(p, {"t": {"dtype": "F32", "shape": [2]}}), r"lacks dtype/shape/data_offsets"),
        (
            lambda p, good: _write_raw(p, {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(8)),
            r"needs 8 bytes but its data_offsets are \[0, 4\]",
        ),
        (
            lambda p, good: _write_raw(
                p,
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                bytes(12),
            ),
            r"tensors 'a' and 'b' overlap",
        ),
        (
            lambda p, good: _write_raw(p, {"t": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}, bytes(1)),
            r"unsupported dtype 'Q4'",
        ),
    ],
    ids=[
        "too_short",
        "truncated_data",
        "bad_length",
        "bad_json",
        "not_object",
        "no_offsets",
        "bad_size",
        "overlap",
        "dtype",
    ],
)
def test_corrupt_or_truncated_file(tmp_path, damage, message):
    path = tmp_path / "experts.safetensors"
    save_file({PREFIX + "gate_up_proj": torch.randn(2, 8, 4), PREFIX + "down_proj": torch.randn(2, 4, 4)}, str(path))
    good = path.read_bytes()
    damage(path, good)
    with pytest.raises(ValueError, match=message):
        SafetensorsFile(str(path))
    with pytest.raises(ValueError, match=message):
        ExpertStore.from_safetensors(str(path), PREFIX)


def test_missing_tensors_and_dtype_mismatch(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({PREFIX + "gate_up_proj": torch.randn(2, 8, 4)}, str(path))
    with pytest.raises(ValueError, match=r"found '.*gate_up_proj' but no tensor '.*down_proj'"):
        ExpertStore.from_safetensors(str(path), PREFIX)
    with pytest.raises(ValueError, match=r"no expert tensors found \(missing tensor: tried"):
        ExpertStore.from_safetensors(str(path), "model.layers.1.mlp.experts.")

    tensors = {
        f"{PREFIX}{e}.{n}.weight": torch.randn(4, 4) for e in range(3) for n in ("gate_proj", "up_proj", "down_proj")
    }
    del tensors[f"{PREFIX}1.up_proj.weight"]
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"missing tensor '.*experts\.1\.up_proj\.weight'"):
        ExpertStore.from_safetensors(str(path), PREFIX)
    with pytest.raises(
        ValueError, match=r"missing tensor '.*experts\.3\.gate_proj\.weight' \(expected 4 experts, found 3\)"
    ):
        ExpertStore.from_safetensors(str(path), PREFIX, num_experts=4)

    save_file(
        {PREFIX + "gate_up_proj": torch.randn(2, 8, 4).half(), PREFIX + "down_proj": torch.randn(2, 4, 4).half()},
        str(path),
    )
    with pytest.raises(ValueError, match=r"dtype mismatch: tensor '.*gate_up_proj' is torch.float16 but torch.float32"):
        ExpertStore.from_safetensors(str(path), PREFIX, dtype=torch.float32)
    save_file(
        {PREFIX + "gate_up_proj": torch.randn(2, 8, 4), PREFIX + "down_proj": torch.randn(2, 4, 4).half()}, str(path)
    )
    with pytest.raises(ValueError, match=r"dtype mismatch: tensor '.*down_proj' is torch.float16"):
        ExpertStore.from_safetensors(str(path), PREFIX)
    save_file({PREFIX + "gate_up_proj": torch.randn(2, 8, 4), PREFIX + "down_proj": torch.randn(2, 4, 4)}, str(path))
    with pytest.raises(
        ValueError, match=r"fc2_weight has per-expert shape \(4, 4\) in the checkpoint but the layer expects \(4, 5\)"
    ):
        ExpertStore.from_safetensors(str(path), PREFIX, expected_shapes={"fc2_weight": (4, 5)})
    experts = moe_infer.layer.MoEExperts(2, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"the store is torch.float32 but the module is torch.float64"):
        attach_expert_buffer(experts, 1, store=ExpertStore.from_safetensors(str(path), PREFIX))


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_disk_store_keeps_the_resident_set_small(tmp_path):
    """64 experts of 768 KiB in a file; a 2-slot buffer runs batches that touch every expert. The
    copies read the file with pread (nothing of it is mapped in), so RSS grows by about the pool."""
    num_experts, hidden, ffn = 64, 128, 512
    path = tmp_path / "big.safetensors"
    save_file(
        {
            PREFIX + "gate_up_proj": torch.randn(num_experts, 2 * ffn, hidden),
            PREFIX + "down_proj": torch.randn(num_experts, hidden, ffn),
        },
        str(path),
    )
    store = ExpertStore.from_safetensors(str(path), PREFIX)
    buffer = ExpertBuffer(store, 2, "cpu", "lru")
    x, w = torch.randn(4, hidden), torch.rand(4, 2)
    with torch.no_grad():
        buffer(x, torch.tensor([[0, 1]] * 4, dtype=torch.int32), w)  # allocator warm-up
        rss = _rss_bytes()
        for first in range(0, num_experts, 2):
            buffer(x, torch.tensor([[first, first + 1]] * 4, dtype=torch.int32), w)
    assert buffer.stats()["misses"] >= num_experts
    assert store.total_bytes == 48 << 20
    assert _rss_bytes() - rss < 12 << 20


def test_file_truncated_after_opening(tmp_path):
    """The file shrinks under an open store: the copy that needs the lost bytes fails with an error
    naming the problem (a read through the mapping would crash the process with SIGBUS), the pool
    is emptied, and once the file is whole again the buffer is exact."""
    fc1, fc2 = torch.randn(4, 64, 32), torch.randn(4, 32, 32)
    path = tmp_path / "experts.safetensors"
    save_file({PREFIX + "gate_up_proj": fc1, PREFIX + "down_proj": fc2}, str(path))
    whole = path.read_bytes()
    store = ExpertStore.from_safetensors(str(path), PREFIX)
    buffer = ExpertBuffer(store, 2, "cpu", "paper")
    x, w = torch.randn(3, 32), torch.rand(3, 2)
    first, last = torch.tensor([[0, 1]] * 3, dtype=torch.int32), torch.tensor([[2, 3]] * 3, dtype=torch.int32)
    with torch.no_grad():
        buffer(x, first, w)
        with open(path, "r+b") as f:
            f.truncate(len(whole) - 1000)  # the last bytes (of expert 3) are gone
        with pytest.raises(RuntimeError, match=r"changed on disk .* shrank from \d+ to \d+ bytes"):
            buffer(x, last, w)
        assert buffer.resident_experts() == []
        path.write_bytes(whole)
        expected = resident(fc1, fc2, None, None, "silu_glu", x, last, w)
        assert torch.equal(buffer(x, last, w), expected)
        assert torch.equal(buffer(x, first, w), resident(fc1, fc2, None, None, "silu_glu", x, first, w))


# ---- transformers checkpoints -----------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def test_mixtral_save_pretrained_checkpoint(tmp_path):
    """transformers v5 saves Mixtral's experts per expert (w1/w3/w2 under block_sparse_moe); buffers
    read them through mmap and the logits match HF eager and the in-memory buffers bit for bit."""
    model = hf_models.build_model("mixtral", hidden=32, ffn=32, experts=6, layers=2, vocab=64)
    model.save_pretrained(str(tmp_path))
    tokens = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        eager = model(tokens).logits
        attach_expert_buffers(model, 3)  # from the model's own weights, in host memory
        in_memory = model(tokens).logits
    loaded = transformers.MixtralForCausalLM.from_pretrained(str(tmp_path)).eval()
    buffers = attach_expert_buffers(loaded, 3, policy="lru", checkpoint=str(tmp_path))
    assert sorted(buffers) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert all(b.store.file_backed and "per-expert" in b.store.description for b in buffers.values())
    assert loaded.model.layers[0].mlp.experts.gate_up_proj.device.type == "meta"  # nothing left resident
    with torch.no_grad():
        from_file = loaded(tokens).logits
    assert torch.equal(from_file, in_memory)
    torch.testing.assert_close(from_file, eager, rtol=1e-5, atol=1e-5)
    assert sum(b.stats()["misses"] for b in buffers.values()) > 0


def test_gpt_oss_stacked_checkpoint(tmp_path):
    """GPT-OSS saves stacked, transposed experts with biases; its clamped swiGLU is used."""
    model = hf_models.build_model("gpt_oss", seed=1, hidden=32, ffn=16, experts=4, layers=1, vocab=64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(str(tmp_path))
    tokens = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        eager = model(tokens).logits
        buffers = attach_expert_buffers(model, 2, checkpoint=str(tmp_path))
        buffered = model(tokens).logits
    (buffer,) = buffers.values()
    assert buffer.activation == "gpt_oss_swiglu" and buffer.weights_transposed
    assert set(buffer.store.parts) == {"fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"}
    torch.testing.assert_close(buffered, eager, rtol=1e-5, atol=1e-5)


# ---- a buffered layer and changes to its weights or files ---------------------------------------------

LAYER = dict(hidden_size=32, ffn_size=16, num_experts=4, top_k=2)


def _stacked_layer_file(path, seed=0, scale=1.0):
    torch.manual_seed(seed)
    plain = moe_infer.MoELayer(**LAYER).eval()
    with torch.no_grad():
        plain.experts.down_proj.mul_(scale)
    save_file(
        {
            PREFIX + "gate_up_proj": plain.experts.gate_up_proj.detach(),
            PREFIX + "down_proj": plain.experts.down_proj.detach(),
        },
        str(path),
    )
    return plain


def _rewrite_in_place(path, seed, scale):
    """Writes new weights into the same file (same inode), as a process updating it would."""
    other = path.with_suffix(".new")
    plain = _stacked_layer_file(other, seed, scale)
    with open(path, "r+b") as f:
        f.write(other.read_bytes())
        f.truncate()
    return plain


def _file_layer(path, plain):
    layer = moe_infer.MoELayer(**LAYER, expert_buffer=2, expert_store=ExpertStore.from_safetensors(str(path), PREFIX))
    layer.gate.load_state_dict(plain.gate.state_dict())
    return layer.eval()


def test_truncated_file_under_a_layer_is_an_error_not_a_signal(tmp_path):
    """The parameters of a file-backed layer are never views of the mapped file: reading them
    (state_dict) after the file shrank raises, where a mapped view would kill the process (SIGBUS)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import torch, moe_infer
        from moe_infer.buffer import ExpertStore
        layer = moe_infer.MoELayer(32, 16, 4, 2, expert_buffer=2,
                                   expert_store=ExpertStore.from_safetensors({str(tmp_path / "e.safetensors")!r}, {PREFIX!r}))
        whole = layer.state_dict()["experts.gate_up_proj"].clone()
        with open({str(tmp_path / "e.safetensors")!r}, "r+b") as f:
            f.truncate(200)
        try:
            layer.state_dict()["experts.gate_up_proj"].sum()
        except ValueError as error:
            print("ERROR:", error)
        print("device:", layer.experts.gate_up_proj.device, "sum:", float(whole.sum()))
        """
    )
    plain = _stacked_layer_file(tmp_path / "e.safetensors")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ERROR:" in done.stdout and "changed on disk" in done.stdout, done.stdout
    assert "device: meta" in done.stdout
    assert f"sum: {float(plain.experts.gate_up_proj.detach().sum())}" in done.stdout


def test_file_backed_layer_saves_its_weights(tmp_path):
    plain = _stacked_layer_file(tmp_path / "e.safetensors")
    layer = _file_layer(tmp_path / "e.safetensors", plain)
    state = layer.state_dict()
    assert torch.equal(state["experts.gate_up_proj"], plain.experts.gate_up_proj)
    assert torch.equal(state["experts.down_proj"], plain.experts.down_proj)


def test_host_buffered_layer_follows_its_parameters():
    torch.manual_seed(3)
    plain = moe_infer.MoELayer(**LAYER).eval()
    layer = moe_infer.MoELayer(**LAYER, expert_buffer=2).eval()
    x = torch.randn(9, 32)
    with torch.no_grad():
        layer(x)  # fills the pool with the old weights
        layer.load_state_dict(plain.state_dict())  # no clear(): the buffer notices
        assert torch.equal(layer(x), plain(x))
        layer.experts.down_proj.mul_(2)  # an in-place edit
        plain.experts.down_proj.mul_(2)
        assert torch.equal(layer(x), plain(x))
        layer.experts.down_proj = torch.nn.Parameter(torch.zeros_like(plain.experts.down_proj), requires_grad=False)
        with pytest.raises(RuntimeError, match=r"parameter 'down_proj' was replaced"):
            layer(x)
    # param.data = ... (as torch.nn.utils.vector_to_parameters does) keeps the Parameter and its
    # version but not its storage, which the host store was.
    layer = moe_infer.MoELayer(**LAYER, expert_buffer=2).eval()
    with torch.no_grad():
        layer(x)
        layer.experts.gate_up_proj.data = layer.experts.gate_up_proj.data.clone()
        with pytest.raises(RuntimeError, match=r"parameter 'gate_up_proj' was replaced .*param.data = "):
            layer(x)


def test_file_backed_layer_refuses_new_parameters_and_follows_its_file(tmp_path):
    path = tmp_path / "e.safetensors"
    plain = _stacked_layer_file(path)
    layer = _file_layer(path, plain)
    x = torch.randn(9, 32)
    with torch.no_grad():
        assert torch.equal(layer(x), plain(x))
        # The same layout with new values (rewritten in place): the buffer follows the file.
        new = _rewrite_in_place(path, seed=0, scale=3.0)
        assert torch.equal(layer(x), new(x))
        # Rewritten in place again, its modification time set back (cp -p, rsync -t): the change
        # time still tells.
        before = os.stat(path)
        time.sleep(0.05)  # past a timer tick: kernels before 6.13 move the change time once a tick
        newer = _rewrite_in_place(path, seed=0, scale=5.0)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert torch.equal(layer(x), newer(x))
        new = newer
        # Loading weights into the layer cannot change the file it reads: refused.
        layer.load_state_dict(plain.state_dict())
        with pytest.raises(
            RuntimeError, match=r"parameter '(gate_up_proj|down_proj)' was written, but its experts are read"
        ):
            layer(x)
    layer = _file_layer(path, new)
    with torch.no_grad():
        layer(x)
        save_file(
            {PREFIX + "gate_up_proj": torch.randn(4, 32, 32), PREFIX + "down_proj": torch.randn(4, 32, 16)}, str(path)
        )
        with pytest.raises(RuntimeError, match=r"was replaced on disk by another file|no longer has the same tensors"):
            layer(x)
    layer = _file_layer(path, new)
    with torch.no_grad():
        layer(x)
        with open(path, "r+b") as f:  # the same file, another layout
            f.write(b"\x00" * 16)
        with pytest.raises(RuntimeError, match=r"no longer has the same tensors"):
            layer(x)


def test_file_backed_fairseq_layer_saves_its_weights(tmp_path):
    """A fairseq MOELayer on a file store: its state_dict has fairseq's per-expert keys with the
    weights read from the file (the store's hook runs before the layer's renaming hook), and a
    plain layer loads it."""
    from moe_infer.fairseq import MOELayer, Top2Gate

    torch.manual_seed(5)
    plain = MOELayer.build(Top2Gate(32, 4, second_expert_policy="all"), 16).eval()
    save_file({PREFIX + name: t.detach() for name, t in plain.experts.named_parameters()}, str(tmp_path / "f.st"))
    store = ExpertStore.from_safetensors(str(tmp_path / "f.st"), PREFIX)
    layer = MOELayer.build(Top2Gate(32, 4, second_expert_policy="all"), 16, expert_buffer=2, expert_store=store).eval()
    layer.gate.load_state_dict(plain.gate.state_dict())
    state = layer.state_dict()
    assert all(t.device.type == "cpu" for t in state.values())
    torch.testing.assert_close(state, plain.state_dict(), rtol=0, atol=0)
    again = MOELayer.build(Top2Gate(32, 4, second_expert_policy="all"), 16).eval()
    again.load_state_dict(state)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.equal(again(x)[0], plain(x)[0]) and torch.equal(layer(x)[0], plain(x)[0])


def test_buffered_layer_from_two_threads():
    """Calls from several threads run one at a time and give the single-threaded results."""
    import threading

    torch.manual_seed(4)
    plain = moe_infer.MoELayer(**LAYER).eval()
    layer = moe_infer.MoELayer(**LAYER, expert_buffer=2, buffer_policy="lru").eval()
    layer.load_state_dict(plain.state_dict())
    inputs = [torch.randn(5, 32) for _ in range(8)]
    with torch.no_grad():
        expected = [plain(x) for x in inputs]
    errors, mismatches = [], []

    def worker():
        try:
            with torch.no_grad():
                for _ in range(10):
                    for x, want in zip(inputs, expected):
                        if not torch.equal(layer(x), want):
                            mismatches.append(1)
        except Exception as error:  # noqa: BLE001  (reported below)
            errors.append(repr(error))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not mismatches


@pytest.mark.parametrize(
    "index,message",
    [
        ('{"weight_map": {"a": ', r"model.safetensors.index.json' is not valid JSON"),
        ('{"weight_map": ["a.safetensors"]}', r"weight_map must be a JSON object .* got list"),
        ('["a.safetensors"]', r"weight_map must be a JSON object .* got list"),
    ],
)
def test_corrupt_sharded_index(tmp_path, index, message):
    from moe_infer.buffer import SafetensorsCheckpoint

    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ValueError, match=message):
        SafetensorsCheckpoint(str(tmp_path))


def test_zero_dimensional_per_expert_tensor(tmp_path):
    path = tmp_path / "experts.safetensors"
    tensors = {f"{PREFIX}{e}.{name}.weight": torch.randn(8, 4) for e in range(2) for name in ("gate_proj", "up_proj")}
    tensors.update({f"{PREFIX}{e}.down_proj.weight": torch.randn(4, 8) for e in range(2)})
    tensors[f"{PREFIX}1.up_proj.weight"] = torch.tensor(1.0)
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mlp.experts.1.up_proj.weight' is 0-D"):
        ExpertStore.from_safetensors(str(path), PREFIX)
