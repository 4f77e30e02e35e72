"""Attaching expert buffers to expert modules: moe_infer layers and transformers v5 experts."""

import functools
from typing import Mapping, Optional, Union

import torch
from torch import nn

from ..experts import ExpertSpec, MoEExperts, expert_spec, is_transformers_experts, tensor_names
from .checkpoint import SafetensorsCheckpoint
from .runtime import ExpertBuffer
from .store import ExpertStore


def _stacked_experts(experts: nn.Module, activation: Optional[str]) -> tuple[ExpertSpec, dict[str, str]]:
    """(the module's ExpertSpec, {part: its parameter name}); TypeError for a module that is not
    stacked experts grouped_mlp can compute."""
    try:
        spec = expert_spec(experts, activation)
    except NotImplementedError as error:
        raise TypeError(f"attach_expert_buffer: {error}") from None
    names = {}
    for part, name in zip(spec.tensors(), tensor_names(experts)):
        if name is None:
            continue
        if experts._parameters.get(name) is None:
            # Parametrized (torch.nn.utils.parametrize) or pruned: computed on each read, which the
            # buffer's copies of the weights would not follow.
            raise TypeError(
                f"attach_expert_buffer: {type(experts).__name__}.{name} is not a parameter (parametrized or pruned: "
                "computed on each read); make it one first (e.g. torch.nn.utils.parametrize.remove_parametrizations)"
            )
        names[part] = name
    return spec, names


def _apply_nothing(module: nn.Module, fn, recurse=True) -> nn.Module:
    return module


def _keep_on_host(module: nn.Module) -> None:
    """Makes ``.to()`` / ``.cuda()`` / ``.half()`` leave this module's (host store) tensors alone
    (a partial of a module-level function: pickling the module reaches ExpertBuffer's own error)."""
    module._apply = functools.partial(_apply_nothing, module)


def attach_expert_buffer(
    experts: nn.Module,
    num_slots: int,
    policy: str = "paper",
    store: Optional[ExpertStore] = None,
    device: Union[str, torch.device, None] = None,
    activation: Optional[str] = None,
    copy_threads: int = 2,
    overlap: bool = True,
) -> ExpertBuffer:
    """Moves an experts module's weights off the compute device and gives it a slot pool there.

    Works on :class:`moe_infer.MoEExperts` and on transformers v5 experts modules (3-D
    ``gate_up_proj``/``up_proj`` and ``down_proj``, optional biases, GPT-OSS's transposed layout).

    Args:
        experts: the module. Its expert parameters are replaced by the store's host tensors
            (``requires_grad=False``; meta tensors when the store has no stacked view, e.g.
            per-expert checkpoint keys), and ``.to()`` no longer moves them.
        num_slots: slots in the pool.
        policy: see :class:`ExpertBuffer`.
        store: where the experts live; default: the module's own weights in host memory (pinned
            when ``device`` is a GPU). Give :meth:`ExpertStore.from_safetensors` for a disk store.
        device: the compute device; default: where the module's weights are (cpu if meta).
        activation: override the activation inferred from the module.

    Returns:
        The :class:`ExpertBuffer`, also set as ``experts.expert_buffer``. A transformers experts
        module's ``forward`` becomes the buffer's (same signature: hidden, top_k_index,
        top_k_weights). moe_infer's :class:`MoELayer` runs its experts through the buffer it was
        built with (``expert_buffer=N``); for an existing one, set ``layer.experts_backend`` to the
        returned buffer. A module has one buffer: a second attach is a ValueError.
    """
    if experts.__dict__.get("expert_buffer") is not None:
        raise ValueError(
            f"attach_expert_buffer: this {type(experts).__name__} has an expert buffer already (its weights are that "
            "buffer's store); build the layer again to change its buffer"
        )
    spec, param_names = _stacked_experts(experts, activation)
    present = {part: t for part, t in spec.tensors().items() if t is not None}
    if device is None:
        device = spec.fc1_weight.device
        device = torch.device("cpu") if device.type == "meta" else device
    device = torch.device(device)
    if store is None:
        store = ExpertStore.from_tensors(
            present["fc1_weight"],
            present["fc2_weight"],
            present.get("fc1_bias"),
            present.get("fc2_bias"),
            pin_memory=device.type == "cuda",
        )
    else:
        expected = {part: tuple(t.shape[1:]) for part, t in present.items()}
        found = {part: store.shapes.get(part) for part in expected}
        if set(store.parts) != set(expected) or any(found[p] != expected[p] for p in expected):
            raise ValueError(
                f"attach_expert_buffer: the store's parts {dict((p, store.shapes[p]) for p in store.parts)} do not "
                f"match the module's per-expert shapes {expected}"
            )
        if store.num_experts != present["fc1_weight"].shape[0]:
            raise ValueError(
                f"attach_expert_buffer: the store has {store.num_experts} experts, the module {present['fc1_weight'].shape[0]}"
            )
        if present["fc1_weight"].device.type != "meta" and store.dtype != present["fc1_weight"].dtype:
            raise ValueError(
                f"attach_expert_buffer: the store is {store.dtype} but the module is {present['fc1_weight'].dtype}"
            )
    buffer = ExpertBuffer(
        store,
        num_slots,
        device,
        policy,
        spec.activation,
        spec.weights_transposed,
        spec.swiglu_alpha,
        spec.swiglu_limit,
        copy_threads=copy_threads,
        overlap=overlap,
    )
    for part in store.parts:
        # A file store's parameters are meta placeholders (never views of the mapped file); the
        # state_dict reads them from the file (see _state_dict_from_store).
        host = store.stacked(part, materialize=not store.file_backed)
        if host is None:
            host = torch.empty((store.num_experts, *store.shapes[part]), dtype=store.dtype, device="meta")
        experts._parameters[param_names[part]] = nn.Parameter(host, requires_grad=False)
    _keep_on_host(experts)
    experts.expert_buffer = buffer
    names = {part: param_names[part] for part in store.parts}
    buffer.watch_parameters(experts, names)
    if store.file_backed:
        handle = experts._register_state_dict_hook(_state_dict_from_store(store, names))
        # First, before a hook of the module's own that renames the stacked keys (FairseqExperts
        # writes fairseq's per-expert keys).
        experts._state_dict_hooks.move_to_end(handle.id, last=False)
    if not isinstance(experts, MoEExperts):  # a transformers module: route its forward to the buffer

        def forward(hidden_states, top_k_index=None, top_k_weights=None, **kwargs):
            # GPT-OSS names the routing arguments router_indices / routing_weights.
            top_k_index = kwargs.pop("router_indices", top_k_index)
            top_k_weights = kwargs.pop("routing_weights", top_k_weights)
            return buffer(hidden_states, top_k_index, top_k_weights)

        experts.forward = forward
    return buffer


def _state_dict_from_store(store: ExpertStore, names: Mapping[str, str]):
    """A state_dict hook that gives a file store's parameters as host copies read from the files
    (the parameters themselves are meta placeholders), so saving a buffered model works."""

    def hook(module, state_dict, prefix, local_metadata):
        for part, name in names.items():
            if prefix + name in state_dict and state_dict[prefix + name].device.type == "meta":
                state_dict[prefix + name] = store.stacked(part)
        return state_dict

    return hook


def _checkpoint_prefixes(name: str) -> list[str]:
    """Key prefixes under which a checkpoint may store the experts of module ``name``
    (transformers v5 saves Mixtral's ``mlp`` as the original ``block_sparse_moe``)."""
    prefixes = [name + "."]
    if ".mlp." in name + ".":
        prefixes.append(name.replace(".mlp", ".block_sparse_moe", 1) + ".")
    return prefixes


def attach_expert_buffers(
    model: nn.Module,
    num_slots: int,
    policy: str = "paper",
    checkpoint: Union[str, SafetensorsCheckpoint, None] = None,
    device: Union[str, torch.device, None] = None,
    copy_threads: int = 2,
    overlap: bool = True,
) -> dict[str, ExpertBuffer]:
    """Attaches an :class:`ExpertBuffer` to every MoE layer of a model (moe_infer
    :class:`MoELayer` or transformers v5 sparse blocks). This is what
    ``moe_infer.optimize(model, expert_buffer=N)`` calls.

    With ``checkpoint`` (a safetensors file or ``save_pretrained`` directory), each layer's store is
    read from it through mmap (build the model on the meta device to never load the experts);
    otherwise the model's own expert weights move to host memory. Returns {module name: buffer}.
    """
    if checkpoint is not None and not isinstance(checkpoint, SafetensorsCheckpoint):
        checkpoint = SafetensorsCheckpoint(checkpoint)
    # Layers that hold an experts backend (moe_infer.MoELayer, the fairseq layer, optimized
    # transformers blocks): their backend becomes the buffer.
    layers = {id(m.experts): m for m in model.modules() if hasattr(m, "experts_backend") and hasattr(m, "experts")}
    buffers, existing = {}, {}
    for name, module in list(model.named_modules()):
        if not (is_transformers_experts(module) or (isinstance(module, MoEExperts) and id(module) in layers)):
            continue
        target, target_name = module, name
        if getattr(target, "expert_buffer", None) is not None:
            existing[target_name] = target.expert_buffer
            continue
        store = None
        if checkpoint is not None:
            errors = []
            for prefix in _checkpoint_prefixes(target_name):
                try:
                    store = ExpertStore.from_safetensors(
                        checkpoint, prefix, num_experts=_stacked_experts(target, None)[0].num_experts
                    )
                    break
                except ValueError as error:
                    errors.append(str(error))
            if store is None:
                raise ValueError(f"attach_expert_buffers: no experts for '{target_name}' in the checkpoint: {errors}")
        buffer = attach_expert_buffer(
            target, num_slots, policy, store, device, copy_threads=copy_threads, overlap=overlap
        )
        if id(target) in layers:
            layers[id(target)].__dict__["experts_backend"] = buffer
        buffers[target_name] = buffer
    if not buffers and existing:
        sizes = {buffer.num_slots for buffer in existing.values()}
        if sizes != {min(num_slots, buffer.num_experts) for buffer in existing.values()}:
            raise ValueError(
                f"attach_expert_buffers: every MoE layer already has an expert buffer ({sorted(sizes)} slots); a "
                f"buffer of {num_slots} slots needs a model that is not buffered yet (load it again)"
            )
        return existing  # buffered already, as asked: the same buffers
    if not buffers:
        raise ValueError(
            "attach_expert_buffers: the model has no MoE layer (moe_infer.MoELayer or a transformers experts module)"
        )
    return {**existing, **buffers}


def buffer_stats(buffers: Mapping[str, ExpertBuffer]) -> dict[str, dict[str, float]]:
    """Per-layer statistics: {layer name: ExpertBuffer.stats()}."""
    return {name: buffer.stats() for name, buffer in buffers.items()}
