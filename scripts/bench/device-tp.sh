#!/usr/bin/env bash
# Runs on the lent 2-GPU machine (nvidia-h100-x2): a model split over both GPUs (tensor parallel,
# NCCL) scaled from the pool, against the same model whole on one GPU, in the same run:
# `kindling bench coldstart --tensor-parallel 2` (time to first token, and the split model's
# greedy text against the whole one's). MODELS: make_models.py shapes (default llama3.1-8b).
set -uo pipefail
source "$(dirname "$0")/device-env.sh"
echo "NCCL from ${NCCL_LIB:-nowhere}"
# Preflight, independent of our code: can the GPUs reach each other, and does PyTorch's NCCL sum
# right on this machine? (P2P between GPUs passed into a VM can be reported and still fail.)
python3 - <<'PY'
import torch, torch.cuda.nccl as nccl
print("peer access 0->1:", torch.cuda.can_device_access_peer(0, 1))
xs = [torch.full((1 << 24,), float(i + 1), device=f"cuda:{i}", dtype=torch.bfloat16) for i in range(2)]
nccl.all_reduce(xs)
torch.cuda.synchronize(0); torch.cuda.synchronize(1)
print("torch NCCL all_reduce of 32 MiB bf16:", sorted({float(v) for x in xs for v in x[::4096].tolist()}), "(expected [3.0])")
PY
# The tiny model first (seconds), with NCCL's P2P on and off: its text shows whether the split
# is right on these GPUs before the 8B is tried.
"$BIN" models make-tiny $M/tiny-llama --arch llama >/dev/null
for p2p in 0 1; do
  NCCL_P2P_DISABLE=$p2p timeout 90 "$BIN" bench coldstart --device cuda:0,cuda:1 --model tiny=$M/tiny-llama --runs 1 \
    --skip-fresh --tensor-parallel 2 --out "$OUT/coldstart-tp2-tiny-p2p-off$p2p.json" 2>&1 | grep "tensor parallel\|collectives" | tail -3
done
for name in ${MODELS:-llama3.1-8b}; do
  [ -e $M/$name ] || python3 scripts/bench/make_models.py $M $name 2>&1 | tail -1
  KINDLING_LOG=${KINDLING_LOG:-info} timeout ${TP_TIMEOUT:-240} "$BIN" bench coldstart --device cuda:0,cuda:1 --model $name=$M/$name --runs ${RUNS:-3} \
    --skip-fresh --tensor-parallel 2 --out "$OUT/coldstart-tp2-$name.json" > /tmp/tp-$name.log 2>&1
  echo "$name: exit $?"; sed 's/\x1b\[[0-9;]*m//g' /tmp/tp-$name.log | grep -v "admitting\|^\s*$" | tail -${LINES_SHOWN:-16} | cut -c 1-300
done
