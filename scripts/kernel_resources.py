"""Compile the R-Sparse decode kernels for an NVIDIA GPU without one, and report each configuration's registers, stack
(spills) and shared memory, as ptxas assigns them.

    python scripts/kernel_resources.py [--arch 90] [--quick] [--out outputs/bench] [--max-stack 64]

What it checks that the interpreter cannot: that every kernel configuration the tuner may pick (both designs:
``rsparse_gemv``'s split-K grid and ``rsparse_compact``'s compacted loop; TEAL and R-Sparse; 1 and 8 rows) compiles
through Triton's real pipeline to a cubin for the target (sm_90: H100/H200), how many registers it takes -- a kernel
that spills to the stack pays local-memory traffic on every call, and registers bound the programs an SM holds --
and how its global loads are vectorised (PTX ld.global instructions by width: the weight rows should stream as
16-byte v4 loads). Needs Triton with its bundled ptxas and cuobjdump; no GPU and no CUDA driver. ``--quick``: the
heuristic configurations only (the test suite's check). Exit status 1 if any configuration fails to compile or uses
more than ``--max-stack`` bytes of stack.

Argument types are those of the product path: bf16 x, W^T, U, Vs and output; fp32 scale and scratch; unit strides
(channel / output / rank) specialised to 1, as Triton specialises them at launch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be real JIT functions, not the interpreter's
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from bench_rsparse_kernels import rs  # noqa: E402  (llmx.kernels, or kernels/ loaded by path)

POINTERS = {"x": "bf16", "scale": "fp32", "wt": "bf16", "u": "bf16", "vs": "bf16", "vt": "bf16", "out": "bf16",
            "z": "fp32", "xm": "fp32", "acc": "fp32", "xc": "fp32", "zp": "fp32", "cnt": "i32", "idx": "i32",
            "tk": "i32"}
FLOATS = {"threshold", "T0", "T1", "T2"}
UNIT_STRIDES = {"stride_xk", "stride_wn", "stride_on", "stride_ur", "stride_vr"}
# multiples of 16 at the Llama shapes (4096, 14336 channels; ranks rounded to 16 as rsparse_allocation(rank_multiple=16)
# does; fused outputs 6144, 28672; NP = 4096 / 256 channel blocks)
ALIGNED = {"K", "N", "R", "R0", "R1", "R2", "RMAX", "NP", "N1", "N2",
           "stride_xb", "stride_wk", "stride_un", "stride_ob", "stride_vk", "stride_ss"}


def compile_kernel(fn, constexprs: dict, num_warps: int, arch: int) -> dict:
    """Registers, stack and shared bytes of ``fn`` compiled for sm_<arch> with these constexprs."""
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs or name in UNIT_STRIDES:
            sig[name] = "constexpr"
            consts[(i,)] = constexprs.get(name, 1)
            continue
        if name.endswith("_ptr"):
            sig[name] = "*" + POINTERS[name[: -len("_ptr")]]
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
        if name.endswith("_ptr") or name in ALIGNED:
            attrs[(i,)] = [["tt.divisibility", 16]]  # what Triton's launcher infers for these at the 8B shapes
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    try:
        usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if not m:
        raise RuntimeError(f"no resource line in cuobjdump's output: {usage[-300:]}")
    # global loads by width in the PTX: 16-byte vectors stream the weights; 2-byte scalars would not
    ops = [line.split()[1 if line.lstrip().startswith("@") else 0] for line in kernel.asm["ptx"].splitlines()
           if "ld.global" in line]
    loads = {"v4": sum(".v4." in op for op in ops), "v2": sum(".v2." in op for op in ops)}
    loads["scalar"] = len(ops) - loads["v4"] - loads["v2"]
    return dict(regs=int(m[1]), stack=int(m[2]), shared=int(m[3]), local=int(m[4]), loads=loads)


def split_jobs(quick: bool):
    """rsparse_gemv: kernel A (R-Sparse only) and kernel B per tile; 1 row (per-row FMAs) and 8 rows (tl.dot)."""
    tiles = [dict(block_k=128, block_n=64, num_warps=4)]  # _pick_config's one-row tile
    if not quick:
        tiles = [{k: v for k, v in c.items() if k != "design"} for c in rs.tile_candidates()]
    for lr in (False, True):
        if lr:
            yield ("split", "A", 1, lr, "block_ka=64 block_r=32"), rs._rsparse_lowrank_kernel, \
                dict(B=1, BLOCK_B=1, BLOCK_K=64, BLOCK_R=32, HAS_SCALE=True), 4
            yield ("split", "A", 8, lr, "block_ka=64 block_r=32"), rs._rsparse_lowrank_kernel, \
                dict(B=8, BLOCK_B=8, BLOCK_K=64, BLOCK_R=32, HAS_SCALE=True), 4
        for t in tiles:
            common = dict(BLOCK_K=t["block_k"], BLOCK_N=t["block_n"], BLOCK_R=32, HAS_SCALE=lr, HAS_LR=lr,
                          TICKET=True, DOT_F32=False, INTERPRET=False)
            yield ("split", "B", 1, lr, f"{t['block_k']}x{t['block_n']} w{t['num_warps']}"), rs._rsparse_gemv_kernel, \
                dict(B=1, BLOCK_B=1, USE_DOT=False, **common), t["num_warps"]
        yield ("split", "B", 8, lr, "64x64 w4 dot"), rs._rsparse_gemv_kernel, \
            dict(B=8, BLOCK_B=16, BLOCK_K=64, BLOCK_N=64, BLOCK_R=32, HAS_SCALE=lr, HAS_LR=lr, TICKET=True,
                 USE_DOT=True, DOT_F32=False, INTERPRET=False), 4


def compact_jobs(rc, quick: bool):
    """rsparse_compact: kernel P per row count, kernel G per tile (in = out = 4096 for the candidate list)."""
    base = rc._default_config(4096, 1, True)
    tiles = [base] if quick else [{**base, **c} for c in rc.compact_candidates(4096)]
    for lr in (False, True):
        for rows in (1, 8):
            yield ("compact", "P", rows, lr, f"p{base['block_p']} pl{base['block_pl']} r{base['block_r']}"), \
                rc._compact_prep_kernel, dict(B=rows, BLOCK_B=rows, BLOCK_P=base["block_p"],
                                              BLOCK_PL=base["block_pl"], BLOCK_R=base["block_r"], HAS_SCALE=True,
                                              HAS_LR=lr), base["num_warps"]
        for t in tiles:
            split = min(t["split"], triton.cdiv(4096, t["block_p"]))  # as rsparse_gemv_compact clips it
            common = dict(BLOCK_P=t["block_p"], BLOCK_K=t["block_k"], BLOCK_N=t["block_n"], BLOCK_R=base["block_re"],
                          BLOCK_Z=base["block_z"], SPLIT=split, HAS_LR=lr, DOT_F32=False, INTERPRET=False)
            label = f"{t['block_k']}x{t['block_n']} split {split} w{t['num_warps']}"
            yield ("compact", "G", 1, lr, label), rc._compact_gemv_kernel, dict(B=1, BLOCK_B=1, USE_DOT=False,
                                                                               **common), t["num_warps"]
        yield ("compact", "G", 8, lr, "64x64 split 4 w4 dot"), rc._compact_gemv_kernel, \
            dict(B=8, BLOCK_B=16, USE_DOT=True, **{**common, "BLOCK_K": 64, "BLOCK_N": 64, "SPLIT": 4}), 4


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    ap.add_argument("--quick", action="store_true", help="heuristic configurations only")
    ap.add_argument("--max-stack", type=int, default=64, help="bytes of stack above which a configuration fails")
    ap.add_argument("--out", default="outputs/bench")
    args = ap.parse_args()
    import importlib

    rc = importlib.import_module(rs.__name__.rsplit(".", 1)[0] + ".rsparse_compact")
    rows, failed, t0 = [], 0, time.perf_counter()
    print(f"{'design':>8} {'kernel':>6} {'rows':>4} {'low-rank':>8} {'config':>26} | {'regs':>4} {'stack':>5} "
          f"{'shared':>6} | global loads v4/v2/scalar")
    for (design, kernel, b, lr, label), fn, constexprs, warps in [*split_jobs(args.quick),
                                                                 *compact_jobs(rc, args.quick)]:
        row = dict(design=design, kernel=kernel, rows=b, low_rank=lr, config=label, num_warps=warps)
        try:
            row.update(compile_kernel(fn, constexprs, warps, args.arch))
            bad = row["stack"] > args.max_stack or row["local"] > 0
            ld = row["loads"]
            print(f"{design:>8} {kernel:>6} {b:>4} {str(lr):>8} {label:>26} | {row['regs']:>4} {row['stack']:>5} "
                  f"{row['shared']:>6} | {ld['v4']}/{ld['v2']}/{ld['scalar']}" + ("  <- spills" if bad else ""))
        except Exception as e:  # noqa: BLE001 -- report every configuration, then fail
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            bad = True
            print(f"{design:>8} {kernel:>6} {b:>4} {str(lr):>8} {label:>26} | FAILED {row['error']}")
        failed += bad
        rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kernel_resources_sm{args.arch}{'_quick' if args.quick else ''}.json"
    path.write_text(json.dumps(dict(arch=args.arch, triton=triton.__version__, rows=rows), indent=2))
    print(f"\n{len(rows)} configurations compiled for sm_{args.arch} in {time.perf_counter() - t0:.0f} s; "
          f"{failed} failed or spilled; wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
