"""Convert an SAE in OpenAI's `sparse_autoencoder` layout (the GPT-2 small v5_32k files CoCoMix reads) into llmx's,
and publish it where the cocomix recipes find it by name.

    # with network access: az://openaipublic/sparse-autoencoder/gpt2-small/resid_post_mlp_v5_32k/autoencoders/5.pt
    python scripts/convert_openai_sae.py 5.pt --teacher gpt2 --layer 5 --name gpt2_resid_post_l5_32k
    llmx run recipe=cocomix_69m cocomix.sae=gpt2_resid_post_l5_32k

The teacher name must be the `model` config name the cocomix recipe uses for its teacher (cocomix.teacher.name),
since the recipe refuses an SAE made for another model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from llmx.concept.sae import from_openai_state_dict, save_sae
from llmx.utils import cache_dir


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("state_dict", type=Path, help="the .pt file (torch.load-able dict)")
    ap.add_argument("--teacher", required=True, help="the llmx model config name of the model the SAE reads")
    ap.add_argument("--layer", type=int, required=True, help="the block whose output (resid_post) it reads")
    ap.add_argument("--name", required=True, help="published as cache_dir/sae/<name>")
    ap.add_argument("--out", type=Path, help="a directory instead of the cache")
    args = ap.parse_args()
    sd = torch.load(args.state_dict, map_location="cpu", weights_only=False)
    sae = from_openai_state_dict(sd, teacher=args.teacher, layer=args.layer)
    out = save_sae(sae, args.out or cache_dir() / "sae" / args.name,
                   extra={"converted_from": str(args.state_dict), "layout": "openai sparse_autoencoder"})
    print(f"{sae.cfg.n_latents} latents, k={sae.cfg.k}, width {sae.cfg.d_model}, block {args.layer}: {out}")


if __name__ == "__main__":
    main()
