"""How alike are adjacent MLPs? SHARP's premise (arXiv 2502.07832: "consecutive layers have similar outputs"),
measured per layer on a real model (llmx.sharing.adjacent_similarity):
  - the mean cosine between the outputs of MLP_{i-1} and MLP_i in the model's own forward pass;
  - Direct Sharing's relative error on layer i's own inputs, ||MLP_{i-1}(X_i) - MLP_i(X_i)||^2 / ||MLP_i(X_i)||^2
    (above 1: worse than deleting layer i's MLP), and the cosine of those two outputs.

    python scripts/sharp_similarity.py --model smollm2_135m gemma3_270m --out sharp_similarity.json

Text: the held-out split of the pydoc_eval data group (the model's own tokenizer), `--windows` windows of
256 tokens (no padding). Prints a table per model and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from llmx.config.schema import DataConfig, ModelConfig  # noqa: E402
from llmx.data import build_datasets, build_tokenizer  # noqa: E402
from llmx.models.pretrained import load_pretrained  # noqa: E402
from llmx.sharing import adjacent_similarity  # noqa: E402


def measure(name: str, windows: int):
    mcfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(ROOT / f"conf/model/{name}.yaml"))
    dcfg = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(ROOT / "conf/data/pydoc_eval.yaml"))
    t0 = time.perf_counter()
    model, model_tok = load_pretrained(mcfg)
    model.eval().requires_grad_(False)
    tok = build_tokenizer(dcfg, model_tokenizer=model_tok)
    _, val = build_datasets(dcfg, tok)
    batches = [val[i][None] for i in range(min(windows, len(val)))]
    rows = adjacent_similarity(model, batches)
    return {"model": name, "tokens": sum(b.numel() for b in batches), "rows": rows,
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", nargs="+", default=["smollm2_135m", "gemma3_270m"])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--out", default="sharp_similarity.json")
    args = ap.parse_args()
    results = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "models": []}
    for name in args.model:
        res = measure(name, args.windows)
        results["models"].append(res)
        print(f"\n{name}: {res['tokens']} held-out tokens ({res['seconds']} s)")
        print("| layer i | cos(MLP_{i-1} out, MLP_i out) | Direct Sharing rel. error | cos(MLP_{i-1}(X_i), MLP_i(X_i)) |")
        print("|---|---|---|---|")
        for r in res["rows"]:
            print(f"| {r['layer']} | {r['cos_adjacent_outputs']:.3f} | {r['direct_sharing_rel_err']:.3f} | "
                  f"{r['cos_direct_sharing']:.3f} |")
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
