"""Train a small fairseq-style MoE language model on real text, then record its routing and measure
what capacity costs in quality.

Why: the buffering and placement results need routing that a trained router produces (skew,
co-activation and drift that a synthetic trace only imitates), and the paper's throughput argument
for dynamic gating leaves out what static gating's dropped tokens cost in quality.

The model (fairseq's MoE LM, scaled to a 2-core CPU): byte-level (vocabulary 256), pre-LayerNorm
decoder, d_model 128, 4 layers with an MoE FFN in every other layer (layers 1 and 3, as fairseq's
MoE LMs), E=32 experts of ffn 512, fairseq's Top2Gate (policy 'all', eval capacity fraction 0.25),
trained with fairseq's training capacity (2 * ceil(S / E), tokens over it dropped) and its
load-balancing loss l_aux (weight 0.01), AdamW.

The text: the reStructuredText sources of the Python 3.11 documentation, as Debian's python3.11-doc
package ships them (/usr/share/doc/python3.11/html/_sources, 497 files, 12 MB of English prose with
code). Every tenth file in sorted order is held out; the model never trains on it.

Outputs (under bench/results/traces/, committed, small):
  lm_prefill.pt   routing of the held-out text in batches of 8 sequences x 128 bytes (1024 tokens)
  lm_decode.pt    routing of incremental generation: 4 sequences, one new token each per batch
  routing_lm.json how they were made, training curve, held-out quality under every gating
and bench/results/routing_lm_quality.md (the quality table). The trained weights go to
build/routing_lm.pt (not committed; --eval-only reuses them).

--dtype bfloat16: training stays float32; the held-out quality is measured in float32 and in
bfloat16 on the same weights, side by side, with the share of routed pairs whose expert bfloat16
changes, and the routing is recorded in bfloat16. Its files carry a _bfloat16 suffix
(routing_lm_quality_bfloat16.md, traces/lm_prefill_bfloat16.pt, ...); the float32 traces, which
bench/buffer.py and bench/placement.py read, are left alone.

    python bench/routing_lm.py [--minutes 20] [--eval-only] [--quick] [--dtype {float32,bfloat16}]
"""

import argparse
import copy
import glob
import json
import math
import os
import signal
import subprocess
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import RESULTS_DIR, dtype_suffix, machine_description, markdown_table, write_result
from moe_infer.fairseq import MOELayer, Top2Gate
from moe_infer.traces import RoutingTrace

CORPUS = "/usr/share/doc/python3.11/html/_sources"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = os.path.join(ROOT, "build", "routing_lm.pt")
TRACE_DIR = os.path.join(RESULTS_DIR, "traces")

D_MODEL, NUM_LAYERS, NUM_HEADS, FFN_DIM = 128, 4, 4, 512
NUM_EXPERTS, SEQ_LEN, BATCH = 32, 128, 16
MOE_LAYERS = (1, 3)
AUX_WEIGHT = 0.01
# Held-out quality under each gating: (label, gating, eval capacity fraction, capacity factor).
GATINGS = [
    ("dynamic (capacity-free)", "dynamic", None, None),
    ("static, eval fraction 1.0", "static", 1.0, None),
    ("static, eval fraction 0.5", "static", 0.5, None),
    ("static, eval fraction 0.25 (fairseq LM)", "static", 0.25, None),
    ("static, capacity factor 1.25", "static", 0.0, 1.25),
    ("static, capacity factor 1.0 (training capacity)", "static", 0.0, 1.0),
]


def load_corpus() -> tuple[torch.Tensor, torch.Tensor, int]:
    files = sorted(glob.glob(os.path.join(CORPUS, "**", "*.txt"), recursive=True))
    if not files:
        raise SystemExit(
            f"routing_lm: no text under {CORPUS}; install Debian's python3.11-doc (apt-get install python3.11-doc)"
        )
    train, held_out = [], []
    for i, path in enumerate(files):
        with open(path, "rb") as f:
            (held_out if i % 10 == 0 else train).append(f.read())
    as_tensor = lambda parts: torch.frombuffer(bytearray(b"\n".join(parts)), dtype=torch.uint8).long()
    return as_tensor(train), as_tensor(held_out), len(files)


class Block(nn.Module):
    def __init__(self, moe: bool, generator: torch.Generator):
        super().__init__()
        self.ln1 = nn.LayerNorm(D_MODEL)
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)
        self.proj = nn.Linear(D_MODEL, D_MODEL)
        self.ln2 = nn.LayerNorm(D_MODEL)
        if moe:
            gate = Top2Gate(D_MODEL, NUM_EXPERTS, second_expert_policy="all", moe_eval_capacity_token_fraction=0.25)
            self.ffn = MOELayer.build(gate, FFN_DIM, activation="gelu", gating="static")
        else:
            self.ffn = nn.Sequential(nn.Linear(D_MODEL, FFN_DIM), nn.GELU(), nn.Linear(FFN_DIM, D_MODEL))

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, NUM_HEADS, D_MODEL // NUM_HEADS).permute(2, 0, 3, 1, 4)
        if cache is not None:  # incremental decoding: keys and values of earlier positions
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None or t > 1)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, D_MODEL))
        h = self.ln2(x)
        if isinstance(self.ffn, MOELayer):
            out, l_aux = self.ffn(h)
        else:
            out, l_aux = self.ffn(h), h.new_zeros(())
        return x + out, l_aux


class MoELM(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.embed = nn.Embedding(256, D_MODEL)
        self.pos = nn.Embedding(4 * SEQ_LEN, D_MODEL)
        self.blocks = nn.ModuleList(Block(i in MOE_LAYERS, generator) for i in range(NUM_LAYERS))
        self.ln = nn.LayerNorm(D_MODEL)
        # Small embeddings (GPT-2's 0.02): the output layer is tied to them.
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def moe_layers(self) -> list[MOELayer]:
        return [blk.ffn for blk in self.blocks if isinstance(blk.ffn, MOELayer)]

    def forward(self, tokens: torch.Tensor, caches: list | None = None, start: int = 0):
        positions = torch.arange(start, start + tokens.shape[1])
        x = self.embed(tokens) + self.pos(positions)
        l_aux = x.new_zeros(())
        for i, blk in enumerate(self.blocks):
            x, aux = blk(x, None if caches is None else caches[i])
            l_aux = l_aux + aux
        return self.ln(x) @ self.embed.weight.t(), l_aux


def batches(data: torch.Tensor, generator: torch.Generator, batch: int = BATCH):
    while True:
        starts = torch.randint(0, data.numel() - SEQ_LEN - 1, (batch,), generator=generator)
        window = torch.stack([data[s : s + SEQ_LEN + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


def train(model: MoELM, data: torch.Tensor, minutes: float, log: list) -> None:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01, betas=(0.9, 0.98))
    generator = torch.Generator().manual_seed(1)
    start, step = time.process_time(), 0
    budget = minutes * 60 * torch.get_num_threads()  # CPU seconds: the budget holds on a shared machine
    stop = []
    previous = signal.signal(signal.SIGINT, lambda *_: stop.append(True))  # Ctrl-C: stop training, keep going
    for inputs, targets in batches(data, generator):
        elapsed = time.process_time() - start
        if elapsed > budget or stop:
            break
        lr = 2e-3 * min(1.0, (step + 1) / 100) * max(0.1, 1 - elapsed / budget)
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits, l_aux = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1))
        (loss + AUX_WEIGHT * l_aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0:
            dropped = [float(layer.metadata.get("overflow_expert1", 0.0)) for layer in model.moe_layers()]
            log.append(
                dict(step=step, cpu_s=round(elapsed, 1), loss=round(loss.item(), 4), l_aux=round(l_aux.item(), 4))
            )
            print(
                f"step {step:5d}  cpu {elapsed:7.1f}s  loss {loss.item():.3f} (bits/byte {loss.item() / math.log(2):.3f})"
                f"  l_aux {l_aux.item():.3f}  first-expert overflow % {dropped}",
                flush=True,
            )
        step += 1
    signal.signal(signal.SIGINT, previous)


def set_gating(model: MoELM, gating: str, fraction, factor) -> None:
    for layer in model.moe_layers():
        layer.gating = gating
        if fraction is not None:
            layer.gate.moe_eval_capacity_token_fraction = fraction
        if factor is not None:
            layer.gate.capacity_factor = factor


@torch.no_grad()
def evaluate(model: MoELM, data: torch.Tensor, num_batches: int, batch: int = 8) -> dict:
    """Held-out bits per byte and the share of (token, slot) pairs dropped by capacity."""
    model.eval()
    generator = torch.Generator().manual_seed(2)
    total_loss, total_tokens, dropped, routed = 0.0, 0, 0, 0
    for _, (inputs, targets) in zip(range(num_batches), batches(data, generator, batch)):
        logits, _ = model(inputs)
        total_loss += float(F.cross_entropy(logits.float().reshape(-1, 256), targets.reshape(-1), reduction="sum"))
        total_tokens += targets.numel()
        for layer in model.moe_layers():
            meta = layer.metadata
            if "capacity" in meta:  # static: pairs at or past capacity were dropped
                routed_pairs = 2 * inputs.numel()
                routed += routed_pairs
                dropped += int(
                    round(float(meta["overflow_expert1"] + meta["overflow_expert2"]) / 100 * routed_pairs / 2)
                )
            else:
                routed += 2 * inputs.numel()
    return dict(
        bits_per_byte=total_loss / total_tokens / math.log(2),
        dropped_pair_fraction=dropped / max(routed, 1),
        tokens=total_tokens,
    )


def _route_ids(layer: MOELayer, hidden: torch.Tensor) -> torch.Tensor:
    tokens = hidden.reshape(-1, hidden.shape[-1])
    _, routing = layer.gate.route(tokens, None, max(tokens.shape[0], 1))
    return routing.expert_ids.to(torch.int32)


@torch.no_grad()
def record_traces(model: MoELM, data: torch.Tensor, prefill_batches: int, decode_steps: int) -> tuple:
    """Routing of the held-out text: prefill batches (8 x 128 tokens) and incremental decoding
    (4 sequences, greedy, one token per step, with a KV cache) under dynamic gating."""
    model.eval()
    set_gating(model, "dynamic", None, None)
    layers = model.moe_layers()
    captured: list[list[torch.Tensor]] = [[] for _ in layers]

    def capture(index):
        def pre_hook(module, args):
            captured[index].append(_route_ids(module, args[0]))

        return pre_hook

    handles = [layer.register_forward_pre_hook(capture(i)) for i, layer in enumerate(layers)]
    try:
        generator = torch.Generator().manual_seed(3)
        for _, (inputs, _) in zip(range(prefill_batches), batches(data, generator, 8)):
            model(inputs)
        prefill = [list(c) for c in captured]
        for c in captured:
            c.clear()
        # Decode: 4 prompts of 32 held-out bytes, then decode_steps greedy tokens.
        prompts = next(batches(data, torch.Generator().manual_seed(4), 4))[0][:, :32]
        caches = [dict() for _ in model.blocks]
        logits, _ = model(prompts, caches, 0)
        for c in captured:
            c.clear()  # the prompt's prefill is not a decode step
        token = logits[:, -1].argmax(-1, keepdim=True)
        for step in range(decode_steps):
            position = prompts.shape[1] + step
            if position >= model.pos.num_embeddings:
                break
            logits, _ = model(token, caches, position)
            token = logits[:, -1].argmax(-1, keepdim=True)
        decode = [list(c) for c in captured]
    finally:
        for h in handles:
            h.remove()
    return prefill, decode


def changed_routing(reference: list[list[torch.Tensor]], other: list[list[torch.Tensor]]) -> dict:
    """How much of the routing ``other`` changes against ``reference`` (record_traces' prefill of
    the same batches): the share of (token, slot) pairs sent to another expert, and of tokens whose
    pair of experts differs as a set."""
    pairs = tokens = changed_pairs = changed_tokens = 0
    for reference_layer, other_layer in zip(reference, other):
        for a, b in zip(reference_layer, other_layer):
            pairs += a.numel()
            tokens += a.shape[0]
            changed_pairs += int((a != b).sum())
            changed_tokens += int((a.sort(dim=1).values != b.sort(dim=1).values).any(dim=1).sum())
    return dict(
        changed_pair_fraction=changed_pairs / max(pairs, 1), changed_token_fraction=changed_tokens / max(tokens, 1)
    )


def quality_table(quality: list[dict], dtypes: list[str]) -> str:
    """Held-out bits per byte under each gating (quality[i][dtype]: evaluate's result) in each
    dtype; where there are two, the last against the first. 'vs dynamic' and the dropped pairs are
    the last dtype's."""
    base = quality[0][dtypes[-1]]["bits_per_byte"]
    header = [f"held-out bits/byte, {d}" for d in dtypes]
    if len(dtypes) > 1:
        header.append(f"{dtypes[-1]} / {dtypes[0]}")
    header += [f"vs dynamic ({dtypes[-1]})", f"pairs dropped ({dtypes[-1]})"]
    rows = []
    for q in quality:
        bits = [q[d]["bits_per_byte"] for d in dtypes]
        row = [q["gating"], *(f"{b:.4f}" for b in bits)]
        if len(dtypes) > 1:
            row.append(f"{bits[-1] / bits[0]:.4f}x")
        row += [f"{bits[-1] / base:.3f}x", f"{q[dtypes[-1]]['dropped_pair_fraction']:.2%}"]
        rows.append(row)
    return markdown_table(["gating", *header], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget in CPU minutes per thread")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-only", action="store_true", help="reuse build/routing_lm.pt")
    parser.add_argument("--quick", action="store_true", help="1 minute of training, small evaluation; writes nothing")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="of the evaluation and the recorded routing (training is float32); bfloat16 also evaluates float32",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    suffix = dtype_suffix(dtype)
    train_data, held_out, num_files = load_corpus()
    print(
        f"corpus: {num_files} files, {train_data.numel() / 1e6:.1f} MB train, {held_out.numel() / 1e6:.1f} MB held out"
    )
    model = MoELM()
    log: list = []
    if args.eval_only:
        state = torch.load(CHECKPOINT, weights_only=True)
        model.load_state_dict(state["model"])
        log = state["log"]
    else:
        train(model, train_data, 1.0 if args.quick else args.minutes, log)
        if not args.quick:
            os.makedirs(os.path.dirname(CHECKPOINT), exist_ok=True)
            torch.save({"model": model.state_dict(), "log": log}, CHECKPOINT)
    # The trained float32 weights, and (--dtype bfloat16) the same weights in bfloat16.
    models = {"float32": model}
    if dtype != torch.float32:
        models[args.dtype] = copy.deepcopy(model).to(dtype)
    eval_batches = 4 if args.quick else 64
    # Per gating: evaluate's result in each dtype (by name).
    evaluated = []
    for label, gating, fraction, factor in GATINGS:
        entry = dict(gating=label)
        for name, m in models.items():
            set_gating(m, gating, fraction, factor)
            result = evaluate(m, held_out, eval_batches)
            entry[name] = result
            print(
                f"{label:48s} {name:9s} bits/byte {result['bits_per_byte']:.4f}  "
                f"dropped pairs {result['dropped_pair_fraction']:.3%}"
            )
        evaluated.append(entry)
    # The results file's entries: the run's dtype at the top level (as float32 runs have always
    # written them, which paper_claims.py reads), float32 beside it in a bfloat16 run.
    quality = [
        dict(
            gating=label,
            eval_capacity_fraction=fraction,
            capacity_factor=factor,
            **entry[args.dtype],
            **({"float32": entry["float32"]} if dtype != torch.float32 else {}),
        )
        for (label, _, fraction, factor), entry in zip(GATINGS, evaluated)
    ]
    recorded = {}
    for name, m in models.items():
        set_gating(m, "static", 0.25, 1.0)
        recorded[name] = record_traces(m, held_out, 8 if args.quick else 64, 16 if args.quick else 256)
    prefill, decode = recorded[args.dtype]
    changed = None
    if dtype != torch.float32:
        changed = changed_routing(recorded["float32"][0], prefill)
        print(
            f"bfloat16 against float32 routing (held-out prefill): {changed['changed_pair_fraction']:.3%} of pairs, "
            f"{changed['changed_token_fraction']:.3%} of tokens"
        )
    table = quality_table(evaluated, list(models))
    print(table)
    if args.quick:
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    made = dict(
        model=f"byte-level MoE LM, d_model {D_MODEL}, {NUM_LAYERS} layers, MoE in layers {list(MOE_LAYERS)}, "
        f"E={NUM_EXPERTS} top-2 (fairseq Top2Gate, policy 'all'), ffn {FFN_DIM}, gelu, trained with fairseq's "
        f"training capacity and l_aux x {AUX_WEIGHT}",
        text=f"Python 3.11 documentation reST sources (Debian python3.11-doc, {CORPUS}); every 10th file held out",
        training_cpu_minutes=log[-1]["cpu_s"] / 60 if log else None,
        dtype=args.dtype,
        commit=commit.strip(),
        machine=machine_description(torch.device("cpu")),
    )
    os.makedirs(TRACE_DIR, exist_ok=True)
    traces = {}
    for stem, layers, how in (
        ("lm_prefill", prefill, "held-out text, batches of 8 sequences x 128 bytes (1024 tokens)"),
        ("lm_decode", decode, "greedy decoding of 4 held-out prompts, one token per sequence per batch"),
    ):
        name = f"{stem}{suffix}.pt"
        trace = RoutingTrace(NUM_EXPERTS, 2, layers, dict(made, batches=how))
        trace.validate()
        trace.save(os.path.join(TRACE_DIR, name))
        traces[name] = dict(num_batches=trace.num_batches, num_layers=trace.num_layers, batches=how)
    summary = dict(made=made, training=log, quality=quality, traces=traces)
    if changed is not None:
        summary["changed_routing_vs_float32"] = changed
    write_result(f"traces/routing_lm{suffix}.json", json.dumps(summary, indent=1) + "\n")
    text = (
        f"# What capacity costs in quality (bench/routing_lm.py, {args.dtype})\n\n"
        f"{made['model']}.\nText: {made['text']}.\nTraining: {made['training_cpu_minutes']:.1f} CPU minutes, "
        f"float32; commit {made['commit']}; {made['machine']}.\n\nHeld-out bits per byte ({eval_batches} batches "
        f"of 8 x {SEQ_LEN} bytes; lower is better) under each gating of the same trained weights"
        f"{', in float32 and in ' + args.dtype if changed is not None else ''}:\n\n{table}\n"
    )
    if changed is not None:
        text += (
            f"\nRouting in {args.dtype} against float32, same weights, the held-out prefill batches (capacity-free): "
            f"{changed['changed_pair_fraction']:.2%} of the (token, slot) pairs go to another expert; "
            f"{changed['changed_token_fraction']:.2%} of the tokens get another pair of experts. Each run trains "
            "its own weights (for CPU minutes), so this table's float32 figures are not those of "
            "routing_lm_quality.md.\n"
        )
    write_result(f"routing_lm_quality{suffix}.md", text)


if __name__ == "__main__":
    main()
