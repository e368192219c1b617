"""R-Sparse decode speed on CPU: SmolLM2-135M, batch 1, greedy, dense against R-Sparse and TEAL, all on the
PyTorch path (one decoded token reads only the active rows of W^T through embedding_bag).

    python scripts/bench_rsparse.py                 # ~3 min on 2 cores
    python scripts/bench_rsparse_kernels.py --device cuda   # the GPU side: per-layer kernel vs cuBLAS, 7B decode

Thresholds come from 8 calibration sequences of the pydoc corpus (uniform allocation: every projection at the
level; R-Sparse alpha 0.9). Prompts run dense (token_mode=decode), as in deployment. Variants are timed in
alternating rounds (best of `--repeats` per variant) so that machine noise hits all of them alike.
Prints a table and writes bench_rsparse.json (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from llmx.config.schema import DataConfig, ModelConfig  # noqa: E402
from llmx.data import build_datasets, build_tokenizer  # noqa: E402
from llmx.models.pretrained import load_pretrained  # noqa: E402
from llmx.sparse import apply_plan, calibrate, layer_shapes, remove_sparsity, uniform_plan  # noqa: E402
from llmx.sparse.evaluate import decode_speed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--levels", default="0.5,0.7")
    ap.add_argument("--out", default="outputs/bench")
    args = ap.parse_args()
    torch.manual_seed(0)
    mcfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(ROOT / f"conf/model/{args.model}.yaml"))
    dcfg = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(ROOT / "conf/data/pydoc_eval.yaml"))
    model, model_tok = load_pretrained(mcfg)
    model.eval().requires_grad_(False)
    tok = build_tokenizer(dcfg, model_tokenizer=model_tok)
    train, val = build_datasets(dcfg, tok)
    cal = calibrate(model, [train[i][None] for i in range(8)])
    shapes = layer_shapes(model)
    prompt = val[0][None, :32]

    variants = [("dense", None, None)]
    for level in (float(x) for x in args.levels.split(",")):
        variants += [("rsparse", level, 0.9), ("teal", level, 1.0)]
    best = {v: float("inf") for v in variants}
    outputs = {}
    for _ in range(args.repeats):
        for v in variants:
            name, level, alpha = v
            if name != "dense":
                for layer in apply_plan(model, cal, uniform_plan(shapes, level, alpha), token_mode="decode").values():
                    layer.decode_layout()
            r = decode_speed(model, prompt, args.new_tokens, repeats=1)
            best[v] = min(best[v], r["seconds"])
            outputs[v] = r["tokens"]
            remove_sparsity(model)
    dense_t = best[variants[0]]
    rows = []
    for v in variants:
        name, level, alpha = v
        same = sum(a == b for a, b in zip(outputs[v], outputs[variants[0]]))
        rows.append({"variant": name, "level": level, "alpha": alpha, "seconds": round(best[v], 3),
                     "tokens_per_s": round(args.new_tokens / best[v], 2), "speedup": round(dense_t / best[v], 3),
                     "tokens_equal_to_dense": same})
    print(f"\nSmolLM2 decode, batch 1, {args.new_tokens} new tokens, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'variant':8} {'level':>5} {'tok/s':>8} {'vs dense':>9} {'same tokens as dense':>22}")
    for r in rows:
        level = "-" if r["level"] is None else f"{r['level']:.0%}"
        print(f"{r['variant']:8} {level:>5} {r['tokens_per_s']:>8.1f} {r['speedup']:>8.2f}x "
              f"{r['tokens_equal_to_dense']:>15}/{args.new_tokens}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    (out / "bench_rsparse.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out / 'bench_rsparse.json'}")


if __name__ == "__main__":
    main()
