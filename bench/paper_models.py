"""Dynamic vs static gating on whole models: the paper's LM and MT workloads, scaled to this CPU.

The paper (Huang et al., NeurIPS 2024) compares dynamic with static gating on whole models: a
fairseq MoE language model (52B, E=512, top-2, an MoE layer every other layer, fairseq's eval
capacity ceil(0.25 * S)) and NLLB-MoE (54.5B, E=128, top-2, an MoE layer every 4th layer, eval
capacity ceil(1.0 * S)); it reports maximum throughput 6.21x (LM), 5.75x (MT encoder) and 2.58x
(MT decoder, incremental generation), LM memory down up to 1.36x and the LM's largest batch
8 -> 64. This benchmark keeps what drives those results -- the number of experts, top-2, the
capacity fractions, the MoE frequency, the share of the vocabulary projection -- and shrinks width
and depth:

  lm          decoder-only LM (pre-norm, causal self-attention, gelu), MoE every other layer as
              fairseq's MoE LMs: moe_infer.fairseq.MOELayer + Top2Gate (policy 'sampling', eval
              capacity fraction 0.25). static: gating="static" (fairseq's computation: capacity,
              [S, E, C] routing tensors, every expert computes its whole capacity buffer,
              placeholders included); dynamic: gating="dynamic" (capacity-free). Same weights.
  mt_encoder  transformers' NllbMoeForConditionalGeneration from a config (E=128, top-2, eval
              capacity fraction 1.0, MoE every 4th layer): the encoder's forward on a batch of
              source sentences. static: transformers 5.24 as shipped (its capacity routing with
              one-hot [tokens, experts] masks; its expert loop runs E x tokens rows whatever the
              routing -- the same expert FLOPs as fairseq's static gating at fraction 1.0, E x
              ceil(1.0 * S) rows); dynamic: moe_infer.optimize(model) (capacity-free, fused ops).
  mt_decoder  the same two models generating a fixed number of new tokens greedily with a KV cache
              from precomputed encoder outputs (the encoder is not timed).

For each workload, dtype (bfloat16, float32) and batch size (sequences): throughput (tokens per
second of CPU time, torch.set_num_threads(1), the modes interleaved and repeated: min / median /
max) and total peak memory (model weights + the peak resident memory of the call above the
resident set before it: activations and KV cache). Memory budgets are multiples of the model's
weight bytes (the paper's GPUs held about 2.4x their share of the weights: 32 GB V100s, 13 GB of
fp16 weights each); per budget: each mode's largest batch, the throughput ratio at static's
largest batch (per-round ratios: min / median / max) and each mode's best throughput within the
budget. Writes bench/results/paper_models.{md,json}.

    python bench/paper_models.py [--quick] [--dtype bf16,fp32] [--workloads lm,mt_encoder,mt_decoder]
"""

import argparse
import json
import statistics
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from common import (
    Progress,
    commit,
    machine_description,
    markdown_table,
    peak_memory,
    results_header,
    return_freed_memory_to_os,
    spread,
    time_interleaved,
    write_result,
)
from moe_infer.fairseq import MOELayer, Top2Gate

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MODES = ("static", "dynamic")
WORKLOADS = ("lm", "mt_encoder", "mt_decoder")
# Budgets: total memory as multiples of the model's weight bytes.
BUDGETS = (1.5, 2.5, 4.0)
HEADLINE_BUDGET = 2.5  # closest to the paper's GPUs (about 2.4x their share of the weights)
PAPER = {
    "lm": {"max_throughput": 6.21, "memory": 1.36, "largest_batch": [8, 64]},
    "mt_encoder": {"max_throughput": 5.75, "largest_batch": [48, 96]},
    "mt_decoder": {"max_throughput": 2.58},
}

# ---- the LM: fairseq's MoE LM, scaled --------------------------------------------------------

# Both models keep the paper's ffn / d_model = 4 (LM 1024 / 4096, MT 2048 / 8192), scaled down.
SCALED = dict(d_model=128, ffn=512, heads=4)
LM = dict(
    SCALED,
    layers=4,
    num_experts=512,
    moe_freq=2,
    eval_capacity_fraction=0.25,
    # The vocabulary projection's share of a token's (dynamic) FLOPs as in the paper's LM
    # (51200 x 1024 against 24 layers): about 11%.
    vocab=1024,
    seq_len=64,
)
LM_SETTING = (
    "decoder-only LM, d_model {d_model}, ffn {ffn}, {layers} layers, MoE every {moe_freq}nd layer, E={num_experts}, "
    "top-2 (policy 'sampling'), gelu, eval capacity ceil({eval_capacity_fraction} * S), vocab {vocab}, sequences of "
    "{seq_len} tokens"
)


class LMLayer(nn.Module):
    """Pre-norm transformer decoder layer: causal self-attention, then a dense FFN or an MoE layer."""

    def __init__(self, spec: dict, moe: bool, dtype: torch.dtype):
        super().__init__()
        d, f = spec["d_model"], spec["ffn"]
        self.heads = spec["heads"]
        self.causal = spec.get("causal", True)  # an encoder's layer (bench/placement.py) attends both ways
        self.attn_norm = nn.LayerNorm(d, dtype=dtype)
        self.qkv = nn.Linear(d, 3 * d, dtype=dtype)
        self.attn_out = nn.Linear(d, d, dtype=dtype)
        self.ffn_norm = nn.LayerNorm(d, dtype=dtype)
        if moe:
            gate = Top2Gate(
                d,
                spec["num_experts"],
                second_expert_policy="sampling",
                moe_eval_capacity_token_fraction=spec["eval_capacity_fraction"],
                dtype=dtype,
            )
            self.moe = MOELayer.build(gate, f, "gelu", dtype=dtype)
        else:
            self.moe = None
            self.fc1 = nn.Linear(d, f, dtype=dtype)
            self.fc2 = nn.Linear(f, d, dtype=dtype)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] plus its self-attention sublayer."""
        batch, length, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(batch, length, 3, self.heads, d // self.heads).unbind(2)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=self.causal
        )
        return x + self.attn_out(attn.transpose(1, 2).reshape(batch, length, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attend(x)
        h = self.ffn_norm(x)
        return x + (self.moe(h)[0] if self.moe is not None else self.fc2(F.gelu(self.fc1(h))))


class MoELanguageModel(nn.Module):
    """fairseq's MoE LM layout (fairseq: layer i is MoE when (i + 1) % moe_freq == 0), tied embeddings.

    forward(tokens [B, T] int64) -> logits [B, T, vocab]."""

    def __init__(self, spec: dict, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.embed = nn.Embedding(spec["vocab"], spec["d_model"], dtype=dtype)
        self.layers = nn.ModuleList(
            LMLayer(spec, (i + 1) % spec["moe_freq"] == 0, dtype) for i in range(spec["layers"])
        )
        self.norm = nn.LayerNorm(spec["d_model"], dtype=dtype)

    def moe_layers(self) -> list:
        return [layer.moe for layer in self.layers if layer.moe is not None]

    def set_gating(self, gating: str) -> None:
        for moe in self.moe_layers():
            moe.gating = gating

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return F.linear(self.norm(x), self.embed.weight)


def build_lm(spec: dict = LM, dtype: torch.dtype = torch.float32, seed: int = 0) -> MoELanguageModel:
    torch.manual_seed(seed)
    return MoELanguageModel(spec, dtype).eval()


# ---- MT: transformers' NLLB-MoE, scaled ------------------------------------------------------

MT = dict(
    SCALED,
    encoder_layers=8,
    decoder_layers=8,
    num_experts=128,
    sparse_step=4,
    eval_capacity_fraction=1.0,
    # The LM head's share of a decoder token's (dynamic) FLOPs about as in NLLB-MoE (256k x 2048).
    vocab=4096,
    src_len=32,
    new_tokens=16,
)
MT_SETTING = (
    "NLLB-MoE (transformers NllbMoeForConditionalGeneration), d_model {d_model}, ffn {ffn}, "
    "{encoder_layers}+{decoder_layers} layers, MoE every {sparse_step}th layer, E={num_experts}, top-2 (policy "
    "'all'), relu, eval capacity ceil({eval_capacity_fraction} * S), moe_token_dropout 0.2, vocab {vocab}, source "
    "sentences of {src_len} tokens, {new_tokens} new tokens per sentence (greedy, KV cache)"
)


def mt_config(spec: dict = MT):
    import transformers

    # The encoder and the decoder are alike: encoder_ffn_dim = decoder_ffn_dim = ffn, and so on.
    per_side = dict(ffn_dim=spec["ffn"], attention_heads=spec["heads"], sparse_step=spec["sparse_step"])
    config = transformers.NllbMoeConfig(
        **{f"{side}_{key}": value for side in ("encoder", "decoder") for key, value in per_side.items()},
        vocab_size=spec["vocab"],
        d_model=spec["d_model"],
        encoder_layers=spec["encoder_layers"],
        decoder_layers=spec["decoder_layers"],
        num_experts=spec["num_experts"],
        moe_eval_capacity_token_fraction=spec["eval_capacity_fraction"],
        max_position_embeddings=1024,
        init_std=spec["d_model"] ** -0.5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    config._attn_implementation = "eager"  # NLLB-MoE supports no other
    return config


MT_STATIC = ("transformers", "fairseq")


def build_mt(spec: dict = MT, dtype: torch.dtype = torch.float32, seed: int = 0, static: str = "transformers") -> dict:
    """{"static": NLLB-MoE with static gating, "dynamic": a copy run by moe_infer.optimize} (the same
    weights), both in eval mode. static: "transformers" (as shipped) or "fairseq" (fairseq_static_mt)."""
    import copy

    import transformers

    import moe_infer

    torch.manual_seed(seed)
    shipped = transformers.NllbMoeForConditionalGeneration(mt_config(spec)).to(dtype).eval()
    dynamic = moe_infer.optimize(copy.deepcopy(shipped), verbose=False)
    return {"static": shipped if static == "transformers" else fairseq_static_mt(shipped), "dynamic": dynamic}


def fairseq_static_mt(model: nn.Module) -> nn.Module:
    """NLLB-MoE whose sparse MLPs compute as fairseq does at evaluation (in place): each becomes a
    moe_infer.fairseq.MOELayer with gating="static" -- a Top2Gate with NLLB's router weights and
    options (second-expert policy, normalisation, batch-prioritised routing, eval capacity
    ceil(fraction * S)), [S, E, C] routing, every expert computing its whole capacity buffer, outputs
    scaled by 1 - moe_token_dropout -- over the same expert weights (moved into the layer's stack)."""
    import types

    config = model.config
    for module in model.modules():
        if type(module).__name__ != "NllbMoeSparseMLP":
            continue
        router = module.router.classifier
        gate = Top2Gate(
            config.d_model,
            config.num_experts,
            second_expert_policy=config.second_expert_policy,
            normalize_gate_prob_before_dropping=config.normalize_router_prob_before_dropping,
            moe_eval_capacity_token_fraction=config.moe_eval_capacity_token_fraction,
            batch_prioritized_routing=config.batch_prioritized_routing,
            dtype=router.weight.dtype,
        )
        with torch.no_grad():
            gate.wg.weight.copy_(router.weight)
        experts = nn.ModuleList(module.experts[f"expert_{e}"] for e in range(config.num_experts))
        module.fairseq = MOELayer(
            gate,
            experts,
            activation=config.activation_function,
            tok_dropout=module.experts.moe_token_dropout,
            gating="static",
        ).eval()
        del module.experts, module.router  # the layer holds them now (its own stacked copy)
        module.forward = types.MethodType(_fairseq_sparse_mlp_forward, module)
    return model


def _fairseq_sparse_mlp_forward(self, hidden_states: torch.Tensor, padding_mask=None) -> torch.Tensor:
    """NllbMoeSparseMLP.forward through the fairseq layer; its padding mask read as transformers'
    router reads it (nonzero = padding; of a 4-D mask, the last query row)."""
    mask = None
    if padding_mask is not None:
        tokens = hidden_states.shape[0] * hidden_states.shape[1]
        if padding_mask.dim() == 4:
            padding_mask = padding_mask[:, :, -1, :].reshape(-1)[-tokens:]
        mask = padding_mask.bool().reshape(hidden_states.shape[:2])
    return self.fairseq(hidden_states, input_padding_mask=mask)[0]


def mt_source(batch: int, spec: dict = MT, seed: int = 0) -> torch.Tensor:
    """[batch, src_len] source token ids, no special tokens (ids 3 and up)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, spec["vocab"], (batch, spec["src_len"]), generator=generator)


def mt_encode(model, source: torch.Tensor):
    with torch.no_grad():
        return model.get_encoder()(input_ids=source, attention_mask=torch.ones_like(source))


def mt_generate(model, encoder_outputs, source: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy incremental decoding with a KV cache: exactly ``new_tokens`` tokens per sentence."""
    with torch.no_grad():
        return model.generate(
            encoder_outputs=encoder_outputs,
            attention_mask=torch.ones_like(source),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
        )


# ---- measurement -----------------------------------------------------------------------------


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


class Workload:
    """One workload in one dtype: ``run(mode, batch)`` builds a call (a zero-argument function) and
    its token count; ``weights`` the model's weight bytes (the same in both modes)."""

    def __init__(self, name: str, dtype: torch.dtype, args):
        self.name, self.dtype = name, dtype
        if name == "lm":
            self.spec = LM if not args.quick else {**LM, "seq_len": 32}
            self.model = build_lm(self.spec, dtype)
            self.setting = LM_SETTING.format(**self.spec)
            self.weights = weight_bytes(self.model)
        else:
            self.spec = MT if not args.quick else {**MT, "new_tokens": 4}
            self.models = build_mt(self.spec, dtype, static=args.mt_static)
            self.setting = MT_SETTING.format(**self.spec)
            self.weights = weight_bytes(self.models["static"])
            # Nothing is dropped at fraction 1.0, so the outputs must agree; in float32 only: in bfloat16
            # fairseq's gate computes its logits in bfloat16 and NLLB's router in float32, so near-ties differ.
            if args.mt_static == "fairseq" and dtype == torch.float32:
                source = mt_source(2, self.spec)
                static, dynamic = (mt_encode(self.models[m], source).last_hidden_state.float() for m in MODES)
                error = (static - dynamic).abs().max().item() / dynamic.abs().max().item()
                if error > 1e-4:
                    raise RuntimeError(f"fairseq-static NLLB disagrees with dynamic gating: relative error {error:.2e}")
        self._encoded = {}

    def call(self, mode: str, batch: int):
        """(fn, tokens): one forward (lm, mt_encoder) or one generation (mt_decoder) of ``batch`` sequences."""
        if self.name == "lm":
            generator = torch.Generator().manual_seed(batch)
            tokens = torch.randint(0, self.spec["vocab"], (batch, self.spec["seq_len"]), generator=generator)

            def forward():
                self.model.set_gating(mode)
                with torch.no_grad():
                    return self.model(tokens)

            return forward, tokens.numel()
        model = self.models[mode]
        source = mt_source(batch, self.spec, seed=batch)
        if self.name == "mt_encoder":
            return (lambda: mt_encode(model, source)), source.numel()
        encoded = mt_encode(model, source)  # outside the timed call
        new_tokens = self.spec["new_tokens"]
        return (lambda: mt_generate(model, encoded, source, new_tokens)), batch * new_tokens


def measure_batch(workload: Workload, batch: int, modes: list, budget_bytes: float, args) -> dict:
    """Peak memory of each mode's call (which also warms it up), then interleaved timed rounds of the
    modes that fit the largest budget."""
    row = {"batch": batch}
    calls = {}
    for mode in modes:
        fn, row["tokens"] = workload.call(mode, batch)
        start = time.process_time()
        activation = peak_memory(fn)
        seconds = time.process_time() - start
        total = workload.weights + activation
        row[mode] = {
            "peak_mib": total / 2**20,
            "activation_mib": activation / 2**20,
            "fits_largest_budget": total <= budget_bytes,
        }
        if total <= budget_bytes:
            if seconds < 1.0:
                fn()  # a second warm-up for quick calls (the memory run was the first)
            calls[mode] = (fn, seconds)
    if calls:
        slowest = max(seconds for _, seconds in calls.values())
        repeats = args.repeats or (2 if args.quick else max(3, min(10, int(3.0 / max(slowest, 1e-3)))))
        samples = time_interleaved(
            {mode: fn for mode, (fn, _) in calls.items()},
            torch.device("cpu"),
            repeats,
            warmup=0,
            statistic=list,
            clock=time.process_time,
        )
        for mode, seconds in samples.items():
            row[mode]["seconds"] = seconds
            row[mode]["tokens_per_s"] = spread([row["tokens"] / s for s in seconds])
        if len(samples) == 2:
            ratios = [s / d for s, d in zip(samples["static"], samples["dynamic"])]
            row["ratio"] = dict(zip(("min", "median", "max"), spread(ratios)))
            row["memory_ratio"] = row["static"]["peak_mib"] / row["dynamic"]["peak_mib"]
    return row


def sweep(workload: Workload, args, progress: Progress) -> list:
    largest_budget = max(BUDGETS) * workload.weights
    active = list(MODES)
    rows = []
    batch = 1
    while active and batch <= args.max_batch[workload.name]:
        row = measure_batch(workload, batch, active, largest_budget, args)
        rows.append(row)
        active = [m for m in active if "seconds" in row[m] and statistics.median(row[m]["seconds"]) < args.max_call_s]
        progress.step(f"{workload.name} {args.dtype_name} batch {batch}")
        batch *= 2
    return rows


def summarize(rows: list, weights: int, max_batch: int) -> dict:
    """Per budget: largest batch of each mode, the ratio at static's largest batch, best vs best."""
    per_budget = {}
    for factor in BUDGETS:
        budget = factor * weights / 2**20

        def fitting(mode, budget=budget):
            return [r for r in rows if "tokens_per_s" in r.get(mode, {}) and r[mode]["peak_mib"] <= budget]

        fit = {mode: fitting(mode) for mode in MODES}
        entry = {
            "budget_mib": budget,
            "largest_batch": {mode: fit[mode][-1]["batch"] if fit[mode] else None for mode in MODES},
            # The sweep ended before dynamic outgrew the budget: its largest batch is a lower bound.
            "dynamic_limited_by_sweep": bool(fit["dynamic"]) and fit["dynamic"][-1] is rows[-1],
            "static_limited_by_sweep": bool(fit["static"]) and fit["static"][-1] is rows[-1],
        }
        if fit["static"] and fit["dynamic"]:
            at = fit["static"][-1]
            if "ratio" in at:
                entry["ratio_equal_batch"] = {**at["ratio"], "batch": at["batch"]}
                entry["memory_ratio_equal_batch"] = at["memory_ratio"]
            best = {mode: max(fit[mode], key=lambda r, mode=mode: r[mode]["tokens_per_s"][1]) for mode in MODES}
            s, d = best["static"]["static"]["tokens_per_s"], best["dynamic"]["dynamic"]["tokens_per_s"]
            entry["best_vs_best"] = {
                "min": d[0] / s[2],
                "median": d[1] / s[1],
                "max": d[2] / s[0],
                "static_batch": best["static"]["batch"],
                "dynamic_batch": best["dynamic"]["batch"],
                "static_tokens_per_s": s[1],
                "dynamic_tokens_per_s": d[1],
            }
            entry["largest_batch_ratio"] = entry["largest_batch"]["dynamic"] / entry["largest_batch"]["static"]
        per_budget[f"{factor:g}x weights"] = entry
    both = [r for r in rows if "memory_ratio" in r]
    return {
        "budgets": per_budget,
        "memory_ratio_max": max((r["memory_ratio"] for r in both), default=None),
        "sweep_max_batch": max_batch,
    }


# ---- report ----------------------------------------------------------------------------------


def _band(ratio: dict) -> str:
    return f"{ratio['median']:.2f}x [{ratio['min']:.2f}-{ratio['max']:.2f}]"


def _rate(mode_row: dict) -> str:
    if "tokens_per_s" not in mode_row:
        return "—"
    low, mid, high = mode_row["tokens_per_s"]
    return f"{mid:,.0f} [{low:,.0f}-{high:,.0f}]"


def _largest(budget: dict) -> str:
    """'static -> dynamic' largest batches, '+' where the sweep ended first."""
    largest = budget["largest_batch"]
    more = {m: "+" if budget.get(f"{m}_limited_by_sweep") else "" for m in MODES}
    return f"{largest['static']}{more['static']} -> {largest['dynamic']}{more['dynamic']}"


def sweep_table(results: dict) -> str:
    headers = ["workload", "dtype", "batch", "tokens", "static tok/s", "dynamic tok/s", "dyn / static"]
    headers += ["static MiB", "dynamic MiB", "static / dyn mem"]
    lines = []
    for name, by_dtype in results.items():
        for dtype_name, result in by_dtype.items():
            for r in result["rows"]:
                lines.append(
                    [
                        name,
                        dtype_name,
                        r["batch"],
                        r["tokens"],
                        _rate(r["static"]) if "static" in r else "—",
                        _rate(r["dynamic"]) if "dynamic" in r else "—",
                        _band(r["ratio"]) if "ratio" in r else "—",
                        f"{r['static']['peak_mib']:.0f}" if "static" in r else "—",
                        f"{r['dynamic']['peak_mib']:.0f}" if "dynamic" in r else "—",
                        f"{r['memory_ratio']:.2f}x" if "memory_ratio" in r else "—",
                    ]
                )
    return markdown_table(headers, lines)


def budget_table(results: dict) -> str:
    headers = ["workload", "dtype", "budget", "largest batch static -> dynamic", "dyn / static at static's largest"]
    headers += ["memory static / dyn there", "best vs best (batches)"]
    lines = []
    for name, by_dtype in results.items():
        for dtype_name, result in by_dtype.items():
            for label, b in result["budgets"].items():
                best = b.get("best_vs_best")
                lines.append(
                    [
                        name,
                        dtype_name,
                        f"{label} = {b['budget_mib']:.0f} MiB",
                        _largest(b),
                        _band(b["ratio_equal_batch"]) if "ratio_equal_batch" in b else "—",
                        f"{b['memory_ratio_equal_batch']:.2f}x" if "memory_ratio_equal_batch" in b else "—",
                        f"{_band(best)} ({best['static_batch']}, {best['dynamic_batch']})" if best else "—",
                    ]
                )
    return markdown_table(headers, lines)


def paper_table(results: dict) -> str:
    headers = ["claim", "paper (8x V100, full models)", "ours (this CPU, scaled models)", "dtype"]
    lines = []
    label = f"{HEADLINE_BUDGET:g}x weights"
    for name, by_dtype in results.items():
        for dtype_name, result in by_dtype.items():
            b = result["budgets"][label]
            best = b.get("best_vs_best")
            ours = _band(best) if best else "—"
            if best and (b["static_limited_by_sweep"] or b["dynamic_limited_by_sweep"]):
                ours += " (sweep-limited: " + _largest(b) + ")"
            lines.append(
                [f"{name}: max throughput dynamic / static", f"{PAPER[name]['max_throughput']}x", ours, dtype_name]
            )
            if name == "lm":
                lines.append(["lm: largest batch", "8 -> 64", _largest(b), dtype_name])
                mem = b.get("memory_ratio_equal_batch")
                lines.append(
                    [
                        "lm: memory static / dynamic",
                        "up to 1.36x",
                        f"{mem:.2f}x at static's largest batch, up to {result['memory_ratio_max']:.2f}x"
                        if mem
                        else "—",
                        dtype_name,
                    ]
                )
    return markdown_table(headers, lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sweeps, 2 rounds, no verdicts (about a minute)")
    parser.add_argument("--dtype", default="bf16,fp32", help="comma-separated: bf16, fp32")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per batch (default: 5-12 by cost)")
    parser.add_argument("--max-call-s", type=float, default=None, help="a mode stops growing past a call this slow")
    parser.add_argument("--output", default=None, help="results file stem under bench/results/")
    parser.add_argument("--render", default=None, help="only recompute the tables of this results JSON")
    parser.add_argument(
        "--mt-static",
        default="transformers",
        choices=MT_STATIC,
        help="the MT static baseline: transformers' NLLB-MoE as shipped, or fairseq's static gating on its weights",
    )
    args = parser.parse_args()
    if args.render:
        return render(args.render, args.output)
    dtype_names = [d.strip() for d in args.dtype.split(",") if d.strip()]
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for d in dtype_names:
        if d not in DTYPES:
            raise SystemExit(f"unknown dtype '{d}'; expected some of {sorted(DTYPES)}")
    for w in workloads:
        if w not in WORKLOADS:
            raise SystemExit(f"unknown workload '{w}'; expected some of {list(WORKLOADS)}")
    if args.quick:
        args.max_batch = {"lm": 4, "mt_encoder": 4, "mt_decoder": 4}
        args.max_call_s = args.max_call_s or 1.0
    else:
        args.max_batch = {"lm": 128, "mt_encoder": 256, "mt_decoder": 128}
        args.max_call_s = args.max_call_s or 4.0
    return_freed_memory_to_os()
    torch.set_num_threads(1)  # a shared machine: one thread, CPU time
    progress = Progress(len(workloads) * len(dtype_names) * (3 if args.quick else 8), "bench/paper_models")
    results = {}
    for name in workloads:
        results[name] = {}
        for dtype_name in dtype_names:
            args.dtype_name = dtype_name
            workload = Workload(name, DTYPES[dtype_name], args)
            rows = sweep(workload, args, progress)
            results[name][dtype_name] = {
                "setting": workload.setting,
                "weights_mib": workload.weights / 2**20,
                "rows": rows,
                **summarize(rows, workload.weights, args.max_batch[name]),
            }
            del workload
    sys.stderr.write("\n")
    write_report(results, machine_description(torch.device("cpu")), commit(), args.quick, args.output, args.mt_static)


MT_STATIC_TEXT = {
    "transformers": "mt, transformers 5.24's NLLB-MoE as shipped (one-hot [tokens, experts] routing masks; its expert "
    "loop runs E x tokens rows whatever the routing, the expert FLOPs of fairseq's static gating at capacity "
    "fraction 1.0)",
    "fairseq": "mt, fairseq's static gating on the NLLB-MoE weights (each sparse MLP a moe_infer.fairseq.MOELayer "
    "gating='static': Top2Gate with NLLB's options, eval capacity ceil(1.0 * S), [S, E, C] routing tensors, "
    "E x C expert rows, placeholders included; its float32 outputs checked equal to dynamic gating's, since nothing "
    "is dropped at fraction 1.0; in bfloat16 its gate computes the logits in bfloat16, as fairseq's does)",
}


def write_report(
    results: dict, machine: str, revision: str, quick: bool, stem: Optional[str], mt_static: str = "transformers"
) -> None:
    settings = "\n".join(f"- {name}: {next(iter(r.values()))['setting']}" for name, r in results.items())
    text = results_header("Dynamic vs static gating on whole models", machine, revision, quick) + (
        f"Settings:\n{settings}\n\n"
        f"static: lm, fairseq's computation (moe_infer.fairseq.MOELayer gating='static': capacity, [S, E, C] "
        f"routing tensors, E x C expert rows, placeholders included); {MT_STATIC_TEXT[mt_static]}. dynamic: "
        f"gating='dynamic' (lm), moe_infer.optimize(model) (mt); capacity-free.\n\n"
        f"Throughput: tokens per second of CPU time (one thread), the two modes interleaved, "
        f"{'2' if quick else '3-10'} rounds: median [min-max]; 'dyn / static': per-round ratios, median "
        f"[min-max]; best vs best: median of the best over median of the best [worst pairing - best pairing]. "
        f"Memory: the model's weights plus the peak resident memory of the call above the resident "
        f"set before it (activations, KV cache). Budgets: multiples of the weight bytes. mt_encoder tokens: "
        f"source tokens; mt_decoder tokens: generated tokens (the encoder is not timed). A '+' after a largest "
        f"batch: the sweep ended before that mode outgrew the budget (a lower bound; its best throughput may be "
        f"higher too).\n\n"
    )
    if not quick:
        text += f"## Against the paper (budget {HEADLINE_BUDGET:g}x weights)\n\n{paper_table(results)}\n\n"
    text += f"## Per memory budget\n\n{budget_table(results)}\n\n## Sweep\n\n{sweep_table(results)}\n"
    print(text)
    stem = stem or f"paper_models{'' if mt_static == 'transformers' else '_mt_' + mt_static}{'_quick' if quick else ''}"
    md_path = write_result(f"{stem}.md", text)
    payload = {
        "machine": machine,
        "commit": revision,
        "summary_commit": commit(),
        "quick": quick,
        "mt_static": mt_static,
        "budgets_x_weights": list(BUDGETS),
        "headline_budget": f"{HEADLINE_BUDGET:g}x weights",
        "paper": PAPER,
        "workloads": results,
    }
    json_path = write_result(f"{stem}.json", json.dumps(payload, indent=1))
    print(f"written: {md_path}, {json_path}")


def render(path: str, stem: Optional[str]) -> None:
    """Recomputes the summaries and tables of a results file from its measured rows."""
    with open(path) as f:
        saved = json.load(f)
    results = saved["workloads"]
    for by_dtype in results.values():
        for result in by_dtype.values():
            weights = result["weights_mib"] * 2**20
            result.update(summarize(result["rows"], weights, result["sweep_max_batch"]))
    write_report(
        results, saved["machine"], saved["commit"], saved["quick"], stem, saved.get("mt_static", "transformers")
    )


if __name__ == "__main__":
    main()
