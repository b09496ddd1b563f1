"""Per-kernel device time per step, from two Nsight Compute runs that differ only in how many
steps they ran (same boot, same prefill): (B - A) / STEPS for each kernel name, so boot-time and
prefill kernels cancel out. Each input is `ncu --csv --metrics gpu__time_duration.sum` output
(xz'd or not). Usage: kernel_profile.py A.csv[.xz] B.csv[.xz] STEPS [LABEL]"""
import collections
import csv
import lzma
import sys


def kernel_times(path):
    opener = lzma.open if path.endswith(".xz") else open
    with opener(path, "rt") as f:
        rows = csv.DictReader(line for line in f if line.startswith('"'))
        totals, counts = collections.Counter(), collections.Counter()
        for row in rows:
            if row.get("Metric Name") != "gpu__time_duration.sum":
                continue
            value = float(row["Metric Value"].replace(",", ""))
            unit = row.get("Metric Unit", "nsecond")
            scale = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}.get(unit, 1e-3)
            name = row["Kernel Name"].split("(")[0][:60]
            totals[name] += value * scale
            counts[name] += 1
    return totals, counts


(a, a_n), (b, b_n) = kernel_times(sys.argv[1]), kernel_times(sys.argv[2])
steps = int(sys.argv[3])
label = sys.argv[4] if len(sys.argv) > 4 else ""
per_step = {k: (b[k] - a[k]) / steps for k in b}
launches = {k: (b_n[k] - a_n[k]) / steps for k in b_n}
total = sum(per_step.values())
print(f"{label} device time per step {total / 1e3:.3f} ms over {sum(launches.values()):.0f} launches")
for name, us in sorted(per_step.items(), key=lambda kv: -kv[1])[:25]:
    print(f"  {us:9.1f} us  {100 * us / total:5.1f}%  x{launches[name]:6.1f}  {name}")
