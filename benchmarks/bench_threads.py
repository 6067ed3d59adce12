"""Thread settings on a shared machine: 1 thread vs N threads, OpenMP spin-waiting vs passive waiting.

Each setting runs in its own subprocess (the OpenMP wait policy is read when torch loads) and times
``--evaluations`` CFG evaluations of the bundled default transformer at the real shapes of a 10.24 s clip
(batch 2, 1024 music + 56 text tokens; the solve is 31 of them) after a warm-up; rounds interleave the
settings so the machine's load hits them alike. (A whole generation per subprocess was too slow to repeat
on a machine loaded 6x over.) The load average is printed with every round, because the
result depends on it: on an idle machine spinning costs little, on an oversubscribed one it costs a lot.

Settings:
  1 thread                       torch.set_num_threads(1)
  N threads, spin (torch default) OMP_WAIT_POLICY unset (libgomp spins 300 000 iterations at barriers)
  N threads, short spin           GOMP_SPINCOUNT=100000, KMP_BLOCKTIME=1 (fluxmusic's choice on a free machine)
  N threads, passive              OMP_WAIT_POLICY=PASSIVE, KMP_BLOCKTIME=0 (fluxmusic's choice under load)
  auto (fluxmusic default)        fluxmusic.threads.choose_wait_policy() + default_threads() (cores minus load)

    python benchmarks/bench_threads.py --rounds 3 --evaluations 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
spec = json.loads(sys.argv[1])
if spec["threads"] == "auto":  # as the fluxmusic CLI does, before torch loads
    from fluxmusic.threads import choose_wait_policy
    choose_wait_policy()
import torch
from fluxmusic.threads import configure_threads
from fluxmusic.transformer_io import load_transformer
from pathlib import Path
import fluxmusic
n = configure_threads(spec["threads"])
model = load_transformer(Path(fluxmusic.__file__).parent / "default_model" / "transformer")
cfg = model.config
# One CFG evaluation at the real shapes of a 10.24 s clip: batch 2, 1024 music + 56 text tokens.
x, t = torch.randn(2, 1024, cfg.in_channels), torch.full((2,), 0.5)
txt, y = torch.randn(2, 56, cfg.context_in_dim), torch.randn(2, cfg.vec_in_dim)
rope = model.rope_for(56, 128, 8)
times = []
with torch.no_grad():
    model(x, t, txt, y, rope)
    for _ in range(spec["evaluations"]):
        t0 = time.perf_counter()
        model(x, t, txt, y, rope)
        times.append(time.perf_counter() - t0)
print(json.dumps({"threads": n, "times": times}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--evaluations", type=int, default=5, help="timed evaluations per subprocess")
    ap.add_argument("--threads", type=int, default=None, help="N (default: the cores this process may use)")
    args = ap.parse_args()
    from fluxmusic.threads import PASSIVE_WAIT_ENV, SHORT_SPIN_ENV, WAIT_ENV_KEYS, available_cores

    n = args.threads or available_cores()
    base_env = {k: v for k, v in os.environ.items() if k not in WAIT_ENV_KEYS and k != "OMP_NUM_THREADS"}
    settings = {
        "1 thread, passive": (1, PASSIVE_WAIT_ENV),
        "1 thread, spin": (1, {}),
        f"{n} threads, spin (torch default)": (n, {}),
        f"{n} threads, short spin": (n, SHORT_SPIN_ENV),
        f"{n} threads, passive": (n, PASSIVE_WAIT_ENV),
        "auto (fluxmusic default: wait policy and threads from the load)": ("auto", {}),
    }
    results: dict[str, list[float]] = {k: [] for k in settings}
    chosen: dict[str, list[int]] = {k: [] for k in settings}
    loads = []
    for r in range(args.rounds):
        for name, (threads, extra) in settings.items():
            spec = json.dumps({"threads": threads, "evaluations": args.evaluations})
            out = subprocess.run(
                [sys.executable, "-c", CHILD, spec], env={**base_env, **extra}, capture_output=True, text=True
            )
            if out.returncode != 0:
                raise SystemExit(f"{name} failed:\n{out.stderr[-2000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[name] += res["times"]
            chosen[name].append(res["threads"])
            loads.append(os.getloadavg()[0])
            print(f"  {name}: threads {res['threads']}, ms {[round(x * 1e3) for x in res['times']]}, "
                  f"load {loads[-1]:.1f}", file=sys.stderr, flush=True)
        print(f"round {r + 1}/{args.rounds}: load average {loads[-1]:.2f}", file=sys.stderr, flush=True)
    print(f"bundled default transformer, CFG evaluation at 10.24 s shapes, {args.rounds} rounds x "
          f"{args.evaluations} evaluations; load average during the run {min(loads):.1f}-{max(loads):.1f} "
          f"on {available_cores()} cores")
    one = statistics.median(results["1 thread, passive"])
    print("| setting | threads | median ms per evaluation | min | max | vs 1 thread |\n|---|---|---|---|---|---|")
    for name, ts in results.items():
        med = statistics.median(ts)
        th = sorted(set(chosen[name]))
        print(f"| {name} | {','.join(map(str, th))} | {med * 1e3:.0f} | {min(ts) * 1e3:.0f} | {max(ts) * 1e3:.0f} "
              f"| {one / med:.2f}x |")


if __name__ == "__main__":
    main()
