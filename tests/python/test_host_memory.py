"""Expert weights on 2 MiB pages (moe_infer.host_memory): the memory is advised as asked (checked
in /proc/self/smaps, independently of the module), values and parameters stay what they were, and
tensors whose move would change sharing are left alone. Where the OS gives no huge pages, the
same calls return ordinary tensors and move nothing."""

import copy
import sys

import pytest
import torch
from torch import nn

import hf_models  # noqa: E402
import moe_infer  # noqa: E402
from moe_infer import host_memory, reference  # noqa: E402
from moe_infer.buffer import ExpertBuffer, ExpertStore  # noqa: E402

SUPPORTED = host_memory.huge_pages_supported()
MiB = 1 << 20


def _vm_flags(tensor: torch.Tensor) -> list[str]:
    """The VmFlags of the mapping holding the tensor's first byte, read here from smaps."""
    address = tensor.data_ptr()
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(part, 16) for part in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    return []


def _is_advised(tensor: torch.Tensor) -> bool:
    return "hg" in _vm_flags(tensor)


@pytest.mark.parametrize("setting, supported", [("always [madvise] never", True), ("always madvise [never]", False)])
def test_support_follows_the_kernel_setting(tmp_path, monkeypatch, setting, supported):
    """With THP "never" nothing is advised and nothing moves; with "madvise" (on Linux) both happen."""
    path = tmp_path / "enabled"
    path.write_text(setting + "\n")
    monkeypatch.setattr(host_memory, "_THP_SETTING", str(path))
    expected = supported and sys.platform.startswith("linux")
    assert host_memory.huge_pages_supported() == expected
    t = host_memory.empty((MiB,), torch.float32)
    assert _is_advised(t) == expected
    layer = nn.Linear(1024, 2048, bias=False)
    assert host_memory.to_huge_pages(layer) == (layer.weight.numel() * 4 if expected else 0)
    assert _is_advised(layer.weight) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_is_advised_aligned_and_writable(dtype):
    t = host_memory.empty((4, MiB), dtype)
    assert t.shape == (4, MiB) and t.dtype == dtype and t.is_contiguous()
    t.fill_(3)
    assert t.sum(dtype=torch.float64).item() == 3 * 4 * MiB
    assert _is_advised(t) == SUPPORTED == host_memory.advised(t)
    if SUPPORTED:
        assert t.data_ptr() % host_memory.HUGE_PAGE_BYTES == 0


def test_small_tensors_stay_ordinary():
    t = host_memory.empty((1000,), torch.float32)
    assert t.numel() == 1000 and not host_memory.advised(t)


def test_a_view_keeps_the_memory_alive():
    t = host_memory.empty((MiB,), torch.float32)
    t.fill_(2)
    view = t[10:20]
    del t
    assert view.sum().item() == 20  # still mapped: the mapping goes with the last tensor on it


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_keeps_every_bit(dtype):
    source = torch.randn(3, 1024, 700).to(dtype)
    source[0, 0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40])
    moved = host_memory.copy(source)
    assert moved.dtype == dtype and moved.shape == source.shape
    assert torch.equal(
        moved.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
        source.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
    )
    assert _is_advised(moved) == SUPPORTED


def test_copy_refuses_a_device_tensor():
    with pytest.raises(ValueError, match="on meta, expected the CPU"):
        host_memory.copy(torch.empty(4, device="meta"))


def test_to_huge_pages_moves_large_parameters_in_place():
    torch.manual_seed(0)
    layer = nn.Linear(1024, 4096)
    weight, bias = layer.weight, layer.bias
    before = weight.detach().clone()
    moved = host_memory.to_huge_pages(layer)
    assert moved == (weight.numel() * 4 if SUPPORTED else 0)
    assert layer.weight is weight and weight.requires_grad and isinstance(weight, nn.Parameter)
    assert torch.equal(layer.weight, before)
    assert _is_advised(layer.weight) == SUPPORTED
    assert not _is_advised(layer.bias) and layer.bias is bias  # 16 KiB: below one huge page
    assert host_memory.to_huge_pages(layer) == 0  # moved already
    # Still trains: the parameter's gradient lands on the moved weight.
    layer(torch.randn(2, 1024)).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.shape == (4096, 1024)


def test_to_huge_pages_keeps_tied_and_shared_tensors_tied():
    a, b = nn.Linear(1024, 2048, bias=False), nn.Linear(1024, 2048, bias=False)
    b.weight = a.weight  # one parameter in two modules: moved once, still one
    pair = nn.ModuleList([a, b])
    assert host_memory.to_huge_pages(pair) == (a.weight.numel() * 4 if SUPPORTED else 0)
    assert a.weight is b.weight

    base = torch.randn(4, 1024, 1024)
    halves = [nn.Parameter(base[:2]), nn.Parameter(base[2:])]  # views of one storage
    assert host_memory.to_huge_pages(halves) == 0
    assert halves[0].data_ptr() == base.data_ptr()

    shared = nn.Linear(1024, 2048, bias=False).share_memory()
    assert host_memory.to_huge_pages(shared) == 0 and shared.weight.is_shared()


def test_moe_experts_keep_huge_pages_across_dtype_changes():
    torch.manual_seed(0)
    experts = moe_infer.MoEExperts(4, 256, 1024)  # gate_up_proj: 8 MiB in float32
    assert _is_advised(experts.gate_up_proj) == SUPPORTED
    reference = experts.gate_up_proj.detach().to(torch.bfloat16)
    experts = experts.to(torch.bfloat16)
    assert experts.gate_up_proj.dtype == torch.bfloat16
    assert torch.equal(experts.gate_up_proj, reference)
    assert _is_advised(experts.gate_up_proj) == _is_advised(experts.down_proj) == SUPPORTED


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_optimize_moves_the_expert_weights_and_changes_no_bit(arch):
    model = hf_models.build_model(arch, hidden=256, ffn=1024, experts=4, layers=1).to(torch.bfloat16)
    plain = moe_infer.optimize(copy.deepcopy(model), verbose=False, huge_pages=False)
    names = {name for name, _ in model.named_parameters()}
    moved = moe_infer.optimize(model, verbose=False)
    experts = next(m for m in model.modules() if type(m).__name__.endswith("Experts"))
    expected = experts.gate_up_proj.numel() * 2 + experts.down_proj.numel() * 2 if SUPPORTED else 0
    assert moved.moe_infer_report.huge_page_bytes == expected
    assert plain.moe_infer_report.huge_page_bytes == 0
    assert ("2 MiB pages" in str(moved.moe_infer_report)) == SUPPORTED
    assert _is_advised(experts.gate_up_proj) == _is_advised(experts.down_proj) == SUPPORTED
    assert {name for name, _ in model.named_parameters()} == names
    ids = torch.randint(2, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(moved(ids).logits, plain(ids).logits)


def test_cpu_buffer_pool_is_on_huge_pages():
    torch.manual_seed(0)
    experts = moe_infer.MoEExperts(8, 256, 1024)
    store = ExpertStore.from_tensors(experts.gate_up_proj.detach(), experts.down_proj.detach())
    buffer = ExpertBuffer(store, 4, "cpu", "lru")
    for pool in buffer.pools.values():
        assert _is_advised(pool) == SUPPORTED
        assert pool.abs().sum().item() == 0  # zero-filled: committed memory from the start
    x = torch.randn(5, 256)
    ids = torch.tensor([[0, 3]] * 5, dtype=torch.int32)
    weights = torch.rand(5, 2)
    with torch.no_grad():
        expected = reference.grouped_mlp_combine(x, weights, ids, *experts.spec)
        torch.testing.assert_close(buffer(x, ids, weights), expected)


def test_subclasses_sparse_and_file_backed_tensors_stay(tmp_path):
    """FakeTensors (and other subclasses), sparse tensors and memory mapped from a file are not moved."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = moe_infer.MoEExperts(4, 256, 1024)  # builds under fake mode, as before
    assert type(fake.gate_up_proj.data).__name__ == "FakeTensor"
    assert host_memory.to_huge_pages(fake) == 0

    dense = torch.zeros(1024, 1024)
    dense[0, :10] = 1
    sparse = dense.to_sparse()
    holder = nn.Module()
    holder.register_buffer("sparse", sparse)
    assert host_memory.to_huge_pages(holder, min_bytes=1) == 0 and holder.sparse is sparse

    path = tmp_path / "w.pt"
    torch.save({"weight": torch.randn(1024, 2048)}, path)
    mapped = torch.load(path, mmap=True)["weight"]
    module = nn.Linear(2048, 1024, bias=False)
    module.weight.data = mapped
    assert host_memory.to_huge_pages(module) == 0
    assert module.weight.data_ptr() == mapped.data_ptr()  # still the file's pages


def test_a_second_optimize_moves_the_blocks_it_replaced_before():
    model = hf_models.build_model("mixtral", hidden=256, ffn=1024, experts=4, layers=1).to(torch.bfloat16)
    moe_infer.optimize(model, verbose=False, huge_pages=False)
    experts = next(m for m in model.modules() if type(m).__name__.endswith("Experts"))
    assert not _is_advised(experts.gate_up_proj)
    moe_infer.optimize(model, verbose=False)
    report = model.moe_infer_report
    assert report.already_optimized and not report.replaced
    expected = (experts.gate_up_proj.numel() + experts.down_proj.numel()) * 2 if SUPPORTED else 0
    assert report.huge_page_bytes == expected
    assert _is_advised(experts.gate_up_proj) == SUPPORTED
