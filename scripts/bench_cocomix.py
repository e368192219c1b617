"""The cost of CoCoMix per training step against NTP: tokens/s and peak memory of one optimizer step (forward,
backward, AdamW) for NTP, KD (a teacher forward per step), pause tokens, CoCoMix with cached labels and CoCoMix with
labels computed online (a teacher forward and backward per step). Above the insert layer CoCoMix's sequence is
twice as long, so its cost grows with the number of blocks above it.

    .venv/bin/python scripts/bench_cocomix.py                              # SmolLM2-135M teacher, tiny student
    .venv/bin/python scripts/bench_cocomix.py --hidden 256 --layers 8 --insert 3 --seq 256 --batch 8

Each method runs in its own process (so that its peak memory is its own: VmHWM on CPU, max_memory_allocated on
CUDA), with the same student shape, tokens, teacher and a random SAE of the teacher's width. As in the recipe,
NTP and pause tokens load only the teacher's tokenizer; KD and CoCoMix hold the teacher. Prints a table with
ratios against NTP and writes JSON (--out, default outputs/bench/cocomix.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

METHODS = ("ntp", "kd", "pause", "cocomix_cached", "cocomix_online")


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one(args) -> dict:
    """Time `args.steps` optimizer steps of one method after `args.warmup` untimed ones."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmx.concept.attribution import concept_labels
    from llmx.concept.cocomix import CoCoMixLM, cocomix_loss, kd_loss
    from llmx.concept.sae import SAEConfig, TopKSAE
    from llmx.config.compose import compose
    from llmx.models import load_pretrained, pretrained_dir

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    teacher_cfg = compose(["recipe=cocomix_tiny"]).cocomix.teacher
    method = args.one
    if method in ("ntp", "pause"):  # as the recipe: the teacher's tokenizer only, no teacher weights in memory
        from transformers import AutoConfig, AutoTokenizer

        teacher, tok = None, AutoTokenizer.from_pretrained(pretrained_dir(teacher_cfg))
        d_t = AutoConfig.from_pretrained(pretrained_dir(teacher_cfg)).hidden_size
    else:
        teacher, tok = load_pretrained(teacher_cfg)
        teacher = teacher.to(device).eval().requires_grad_(False)
        d_t = teacher.config.hidden_size
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_model=d_t, n_latents=args.latents, k=32, layer=args.teacher_layer,
                            teacher=teacher_cfg.name)).to(device).eval()
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                      num_key_value_heads=args.heads, tie_word_embeddings=True,
                                      attn_implementation="sdpa"))
    mix = {"pause": "pause", "cocomix_cached": "interleave", "cocomix_online": "interleave"}.get(method)
    net = (CoCoMixLM(lm, args.latents, args.insert, mix=mix) if mix else lm).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, len(tok), (args.batch, args.seq), generator=g).to(device)
               for _ in range(args.warmup + args.steps)]
    cached = {i: concept_labels(teacher, sae, b) for i, b in enumerate(batches)} if method == "cocomix_cached" else {}

    def step(i, ids):
        if method == "ntp":
            loss = torch.nn.functional.cross_entropy(net(input_ids=ids).logits[:, :-1].flatten(0, 1),
                                                     ids[:, 1:].flatten())
        elif method == "kd":
            with torch.no_grad():
                t = teacher(input_ids=ids).logits
            loss = kd_loss(net(input_ids=ids).logits, t, ids)["loss"]
        else:
            logits, cl = net(ids)
            labels = None
            if method == "cocomix_cached":
                labels = cached[i]
            elif method == "cocomix_online":
                labels = concept_labels(teacher, sae, ids)
            loss = cocomix_loss(logits, cl, ids, labels)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(args.warmup):
        step(i, batches[i])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i, batches[i])
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"method": method, "parameters": sum(p.numel() for p in net.parameters()),
            "tokens_per_s": args.steps * args.batch * args.seq / dt, "step_s": dt / args.steps,
            "peak_mb": peak_mb(device)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--insert", type=int, default=1)
    ap.add_argument("--latents", type=int, default=4096)
    ap.add_argument("--teacher-layer", type=int, default=9)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path("outputs/bench/cocomix.json"))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    from llmx.config.compose import compose
    from llmx.models import pretrained_dir

    pretrained_dir(compose(["recipe=cocomix_tiny"]).cocomix.teacher)  # convert/cache the teacher before measuring
    rows = []
    for m in args.methods:  # one process each, one after another (never two at once on a 2-core machine)
        cmd = [sys.executable, __file__, "--one", m] + [a for a in sys.argv[1:] if not a.startswith("--methods")]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    base = next((r for r in rows if r["method"] == "ntp"), rows[0])
    print("| method | parameters | tokens/s | vs NTP | step (s) | peak MB | vs NTP |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        r["speed_ratio"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["memory_ratio"] = r["peak_mb"] / base["peak_mb"]
        print(f"| {r['method']} | {r['parameters'] / 1e6:.2f}M | {r['tokens_per_s']:.0f} | {r['speed_ratio']:.2f}x | "
              f"{r['step_s']:.3f} | {r['peak_mb']:.0f} | {r['memory_ratio']:.2f}x |")
    doc = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "settings": {k: v for k, v in vars(args).items() if k != "out"},
           "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
