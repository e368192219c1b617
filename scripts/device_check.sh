#!/usr/bin/env bash
# GPU checks of GaLore (FSDP2 with NCCL, the fused step at each projection precision) and of the
# R-Sparse decode kernels and their end-to-end decode path, for a session that has a GPU machine. None of the rsparse
# and hf steps as they stand (both kernel designs, segmented fusion, the HF 8B-shaped decode) has run on a GPU yet:
# their time is unknown, so each step has a timeout that keeps the default call (rsparse, hf) within 8 minutes, and
# the benchmark writes its JSON after every row (layer) and variant (hf): a step cut short keeps what it measured.
# Rerun a group alone (CHECKS=hf) in a second call where one was cut; CHECKS=galore re-measures GaLore.
#
#   bash scripts/device_check.sh            # results and a log in ${OUT:-outputs/device}
#
# Steps: environment report; per group, the kernel tests on CUDA (interpreter off, so the CUDA-only parity
# tests at the 7B shapes run) and the GPU benchmark. A failing step makes the script exit non-zero, but the
# later steps still run.
#
# Nothing here needs hydra-core or omegaconf. The GPU image lacks them; if a step ever does, they travel as
# wheels in .whl/ (see the device README): this script installs whatever .whl/ holds, with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}  # the image's python3 is the one with CUDA PyTorch and Triton
OUT_DIR=${OUT:-outputs/device}
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/device_check.log") 2>&1
unset TRITON_INTERPRET  # the point is to compile for the GPU
export PYTHONUNBUFFERED=1

status=0
step() {  # step NAME COMMAND...: run it, report, remember a failure, carry on
  local name=$1 rc=0
  shift
  echo; echo "=== $name"
  "$@" || rc=$?
  if [ "$rc" -eq 0 ]; then echo "=== $name: ok"; else echo "=== $name: FAILED (exit $rc)"; status=1; fi
}

if compgen -G ".whl/*.whl" >/dev/null; then
  step "install .whl/" "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# llmx is not installed there, and kernels/ only becomes llmx.kernels through pyproject's package-dir:
# build that layout from symlinks. `python -P` keeps the checkout's own llmx/ (which has no kernels/)
# from shadowing it.
if ! "$PY" -P -c "import llmx.kernels" 2>/dev/null; then
  SHIM=$(mktemp -d)
  mkdir "$SHIM/llmx"
  ln -s "$REPO"/llmx/* "$SHIM/llmx/"
  ln -s "$REPO/kernels" "$SHIM/llmx/kernels"
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi

versions() {
  "$PY" -P - <<'EOF'
import importlib.util, sys
import torch, triton
print("python", sys.version.split()[0], "| torch", torch.__version__, "| triton", triton.__version__,
      "| cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0), "| SMs", torch.cuda.get_device_properties(0).multi_processor_count)
for name in ("hydra", "omegaconf"):
    print(name, "importable" if importlib.util.find_spec(name) else "missing (not needed here)")
import llmx.kernels.galore_step as gs
print("llmx.kernels.galore_step from", gs.__file__, "| fused_available(cuda):", gs.fused_available("cuda"))
EOF
}

step "nvidia-smi" nvidia-smi
step "versions" versions

# CHECKS picks the groups (default rsparse and hf; galore was measured on 2026-11-26): CHECKS="galore" bash ...
CHECKS=${CHECKS:-"rsparse hf"}
if [[ " $CHECKS " == *" galore "* ]]; then
  # -s shows the measured parity errors ("galore-parity ...") next to the tolerances they are held to.
  step "pytest tests/test_galore_kernels.py" timeout 240 "$PY" -P -m pytest -q -s tests/test_galore_kernels.py
  # FSDP2 on CUDA with NCCL: one GPU (FSDP forced over a world of one), two processes where there are two
  # GPUs; sharded projector state, owner-rank refresh and the DCP round trip, against the CPU run.
  step "pytest tests/test_galore_dist.py -k cuda" timeout 240 "$PY" -P -m pytest -q -s tests/test_galore_dist.py -k cuda
  # svd and step only: the memory section composes recipes (Hydra) and gives the same figures on any device.
  # step: ieee / tf32 / bf16 projections, PyTorch and fused paths, against fused AdamW at the 7B layer.
  step "bench_galore.py" timeout 240 "$PY" -P scripts/bench_galore.py --device cuda --sections svd,step --out "$OUT_DIR"
fi
if [[ " $CHECKS " == *" rsparse "* ]]; then
  # "rsparse-parity ..." lines: the fused decode kernel against its fp32 reference, bf16 at the 7B shapes.
  step "pytest tests/test_rsparse_kernels.py" timeout 150 "$PY" -P -m pytest -q -s tests/test_rsparse_kernels.py
  # Per-layer time against cuBLAS (CUDA graphs, rotated weights; both kernel designs, untuned and tuned), R-Sparse
  # q/k/v and gate/up as one segmented call against one call per projection, batches of 4 and 8. (The plain-torch
  # 7B decoder and the tile sweep, sections decode and sweep, are left out: hf and the tuned columns replace them.)
  step "bench_rsparse_kernels.py" timeout 180 "$PY" -P scripts/bench_rsparse_kernels.py --device cuda \
    --sections layer,fused,batch --out "$OUT_DIR"
fi
if [[ " $CHECKS " == *" hf "* ]]; then
  # The product path: an HF Llama of the 8B shape decoding through llmx.sparse (compiled step, CUDA graphs, the
  # fused kernel in RSparseLinear), tokens/s of dense, TEAL and R-Sparse at 50%. Its JSON: rsparse_kernels_hf_cuda.
  step "bench_rsparse_kernels.py --sections hf" timeout 150 "$PY" -P scripts/bench_rsparse_kernels.py --device cuda \
    --sections hf --out "$OUT_DIR/hf"
fi
ls -l "$OUT_DIR"/*.json 2>/dev/null || echo "(no benchmark JSON in $OUT_DIR)"

echo; echo "=== device_check: $([ "$status" -eq 0 ] && echo all steps passed || echo SOME STEPS FAILED); log in $OUT_DIR"
exit "$status"
