"""What the host-to-GPU links of this machine move, independent of our code: pinned host memory to
each GPU, one GPU alone and every GPU at once, contiguous and pitched (a column part of a
row-major matrix: rows of WIDTH bytes taken from rows of twice that, as a tensor-parallel rank
gets its part of an o or down projection). The floor for a split model's start is its largest
rank's bytes over the at-once rate. Usage: link_floor.py [GIB per GPU] [OUT.json]"""
import ctypes
import json
import sys
import time

import torch

GIB = float(sys.argv[1]) if len(sys.argv) > 1 else 4.0
gpus = torch.cuda.device_count()
n = int(GIB * (1 << 30))
cudart = ctypes.CDLL("libcudart.so." + torch.version.cuda.split(".")[0])
H2D = 1


def timed(copies):
    """Starts each (gpu, copy) on its own stream, waits for all; returns seconds."""
    streams = [torch.cuda.Stream(device=g) for g, _ in copies]
    for g in {g for g, _ in copies}:
        torch.cuda.synchronize(g)
    start = time.perf_counter()
    for (g, copy), s in zip(copies, streams):
        with torch.cuda.device(g), torch.cuda.stream(s):
            copy(s)
    for s in streams:
        s.synchronize()
    return time.perf_counter() - start


def contiguous(src, dst):
    return lambda s: dst.copy_(src, non_blocking=True)


def pitched(src, dst, width):
    """Rows of `width` bytes, every `2 * width` bytes of `src`, packed into `dst`."""
    rows = dst.numel() // width

    def copy(s):
        rc = cudart.cudaMemcpy2DAsync(ctypes.c_void_p(dst.data_ptr()), ctypes.c_size_t(width),
                                      ctypes.c_void_p(src.data_ptr()), ctypes.c_size_t(2 * width),
                                      ctypes.c_size_t(width), ctypes.c_size_t(rows), H2D, ctypes.c_void_p(s.cuda_stream))
        assert rc == 0, f"cudaMemcpy2DAsync: {rc}"
    return copy


srcs = [torch.empty(2 * n, dtype=torch.uint8).pin_memory() for _ in range(gpus)]
dsts = [torch.empty(n, dtype=torch.uint8, device=f"cuda:{g}") for g in range(gpus)]
results = {"gib_per_gpu": GIB, "gpus": gpus, "gpu": torch.cuda.get_device_name(0)}
for label, make in [("contiguous", lambda g: contiguous(srcs[g][:n], dsts[g])),
                    ("pitched 4 KiB rows", lambda g: pitched(srcs[g], dsts[g], 4096)),
                    ("pitched 14 KiB rows", lambda g: pitched(srcs[g], dsts[g], 14336))]:
    timed([(0, make(0))])  # warm
    alone = min(timed([(0, make(0))]) for _ in range(3))
    together = min(timed([(g, make(g)) for g in range(gpus)]) for _ in range(3))
    row = {"alone_gb_s": round(n / alone / 1e9, 1), "each_at_once_gb_s": round(n / together / 1e9, 1)}
    results[label] = row
    print(f"{label}: one GPU alone {row['alone_gb_s']} GB/s; all {gpus} at once {row['each_at_once_gb_s']} GB/s each", flush=True)
if len(sys.argv) > 2:
    json.dump(results, open(sys.argv[2], "w"), indent=1)
