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
# What the links move, pinned host memory to each GPU alone and to both at once, contiguous and
# pitched (LINKS=0 skips): the floor for a split model's start.
[ "${LINKS:-1}" = 1 ] && python3 scripts/bench/link_floor.py 4 "$OUT/link-floor.json"
# The tiny model first (seconds): with NCCL's P2P on and off, and with our fused kernels off. Its
# greedy text against the whole model's, in bf16 and in f32, shows whether the split is right on
# these GPUs before the 8B is tried. NCCL's own log of the first run says which transport it took.
"$BIN" models make-tiny $M/tiny-llama --arch llama >/dev/null
tiny() { # LABEL ENV...
  local label=$1; shift
  env "$@" timeout 90 "$BIN" bench coldstart --device cuda:0,cuda:1 --model tiny=$M/tiny-llama --runs 1 \
    --skip-fresh --tensor-parallel 2 --out "$OUT/coldstart-tp2-tiny-$label.json" > /tmp/tiny-$label.log 2>&1
  echo "tiny, $label: exit $?"; grep "tensor parallel\|collectives" /tmp/tiny-$label.log | tail -4 | cut -c 1-200
}
if [ "${TINY:-1}" = 1 ]; then
  tiny p2p NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,P2P,SHM,GRAPH
  grep -o "NCCL INFO .*\(via\|Channel 00\|comm 0x[0-9a-f]* rank\|NCCL version\|P2P\|NVLS\).*" /tmp/tiny-p2p.log | sort -u | head -12 | cut -c 1-200
  tiny no-p2p NCCL_P2P_DISABLE=1
  tiny unfused KINDLING_FUSED_KERNELS=0
fi
# Then the 8B, watched: if it has not finished after TP_TIMEOUT s, what each thread waits in and
# what the GPUs are doing are printed (cuda-gdb attaches; the binary is stripped, so the driver's
# and NCCL's frames are what names the wait), then it is killed. BIG: LABEL[:ENV=VALUE,...] runs,
# each in turn (default: as is, then with P2P off when that does not finish).
big() { # NAME LABEL ENV...
  local name=$1 label=$2; shift 2
  echo "$(date +%T) $name, $label: starting"
  env "$@" KINDLING_LOG=${KINDLING_LOG:-info} "$BIN" bench coldstart --device cuda:0,cuda:1 --model $name=$M/$name \
    --runs ${RUNS:-3} --skip-fresh --tensor-parallel 2 --out "$OUT/coldstart-tp2-$name-$label.json" > /tmp/tp-$name-$label.log 2>&1 &
  local pid=$! waited=0
  while kill -0 $pid 2>/dev/null && [ $waited -lt ${TP_TIMEOUT:-180} ]; do sleep 5; waited=$((waited + 5)); done
  if kill -0 $pid 2>/dev/null; then
    echo "$name, $label: still running after ${waited} s; the GPUs and the threads:"
    nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
    # Which threads burn CPU (user+system ticks over 2 s), and where each waits.
    cpu() { for t in /proc/$pid/task/*; do echo "${t##*/} $(awk '{print $14 + $15}' $t/stat)"; done; }
    cpu > /tmp/cpu-a; sleep 2; cpu > /tmp/cpu-b
    join /tmp/cpu-a /tmp/cpu-b | while read tid a b; do t=/proc/$pid/task/$tid
      echo "$(cat $t/comm) $(awk '{print $3}' $t/stat) ticks=$((b - a)) $(cat $t/wchan) syscall=$(cut -d' ' -f1 $t/syscall)"
    done | sort | uniq -c | sort -rn | head -24
    timeout -s KILL 45 cuda-gdb -p $pid -batch -ex "thread apply all bt 12" 2>&1 | grep -v "^\[New\|^$\|warning" | cut -c 1-160 | head -100
    kill -9 $pid; wait $pid 2>/dev/null
    sed 's/\x1b\[[0-9;]*m//g' /tmp/tp-$name-$label.log | grep -v "admitting\|^\s*$" | tail -8 | cut -c 1-300
    return 1
  fi
  wait $pid; echo "$name, $label: exit $?"
  sed 's/\x1b\[[0-9;]*m//g' /tmp/tp-$name-$label.log | grep -v "admitting\|^\s*$" | tail -${LINES_SHOWN:-16} | cut -c 1-300
}
for name in ${MODELS:-llama3.1-8b}; do
  [ -e $M/$name ] || python3 scripts/bench/make_models.py $M $name 2>&1 | tail -1
  if [ -z "${BIG:-}" ]; then
    big $name p2p || big $name no-p2p NCCL_P2P_DISABLE=1
  else
    for v in $BIG; do big $name ${v%%:*} $([ "$v" = "${v#*:}" ] || echo "${v#*:}" | tr , ' '); done
  fi
done
# Then the warm path through HTTP (SERVE=1, the default; needs the OpenAI plugin carried): each
# model whole on one GPU (with the HF baseline) against `serve --tensor-parallel NAME=2`, which
# the registry places over both GPUs, at LEVELS streams.
if [ "${SERVE:-1}" = 1 ] && [ -f /tmp/openai-python.wasm ]; then
  for name in ${MODELS:-llama3.1-8b}; do
    bench_serve whole "$name" "$M/$name" --hf-python python3
    "$BIN" bench serve --device cuda:0,cuda:1 --model "$name=$M/$name" --plugin /tmp/openai-python.wasm \
      --concurrency ${LEVELS:-1,64} --prompt-tokens 128-512 --output-tokens 256 \
      --serve-args "--kv-cache-gib 24 --max-step-tokens 4096 --tensor-parallel $name=2" \
      --out "$OUT/serve-$name-tp2.json" 2>"/tmp/serve-$name-tp2.log" | tail -1 \
      || { echo "bench serve $name tp2 failed"; grep -v " INFO " "/tmp/serve-$name-tp2.log" | tail -10; }
    python3 scripts/bench/serve_summary.py "$OUT/serve-$name-tp2.json" tp2
  done
fi
