"""Prints the latency tails of `kindling bench invoke --out` files (invoke-*.json in a folder):
per setting, handler and client count, p50/p90/p99/p99.9/max, p99 over the same run's /healthz,
the server's handler and instantiate split, and the share of instances made ahead of their
request.

usage: python3 scripts/bench/invoke_summary.py FOLDER
"""

import glob
import json
import os
import sys


def main(folder: str) -> None:
    for path in sorted(glob.glob(os.path.join(folder, "invoke-*.json"))):
        setting = os.path.basename(path)[len("invoke-"):-len(".json")]
        for level in json.load(open(path))["levels"]:
            r = level["result"]
            if level["target"].startswith("healthz"):
                continue
            print(
                f"{setting} {level['target']} x{r['clients']}: "
                f"p50 {r['p50_ms']:.3f} p90 {r['p90_ms']:.3f} p99 {r['p99_ms']:.3f} "
                f"p99.9 {r['p999_ms']:.3f} max {r['max_ms']:.3f} ms; "
                f"p99 over /healthz +{level['p99_over_baseline_ms']:.3f}; "
                f"handler p50/p99 {r['handler_p50_ms']:.3f}/{r['handler_p99_ms']:.3f}, "
                f"instantiate p99 {r['instantiate_p99_ms']:.3f}; made ahead {r['made_ahead']:.0%}; "
                f"{r['req_s']:.0f} req/s"
            )


if __name__ == "__main__":
    main(sys.argv[1])
