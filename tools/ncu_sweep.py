"""Launch-shape sweep of the v2 expert kernels by GPU time, as a table (needs Nsight Compute).

    python3 tools/ncu_sweep.py [--bits 4] [--keep-l2] --gate-up R,W,tgs[,DB[,PF[,DH[,HP]]]] ... --down R,tgs[,PF[,HP]] ... [--mma S,WR,PD,tgs[,CS[,RBM[,PF[,XB[,DH[,MD]]]]]] ...]

Runs ``tools/profile_expert_mlp.py --sweep`` under ``ncu`` (boost clocks, L2 flushed before
every kernel, as a decode step meets its weights) and prints, per launch shape, the median GPU
time of each kernel, its DRAM bytes and throughput, registers a thread and achieved occupancy.
The first row is the library's default shape (``launch.TUNING``). ``--keep-l2`` leaves L2 as
the previous kernel left it (for gate/up's hints of down's rows, DH; each call reads another copy
of the records, so nothing else is warm) and collects GPU time alone: with several metrics ncu
replays a kernel, and the replay finds the first pass's bytes in L2 (down then read 3 of its 24
MB from DRAM with or without the hints, H200).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from math import nan
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("gpu__time_duration.sum", "dram__bytes_read.sum", "launch__registers_per_thread",
           "sm__warps_active.avg.pct_of_peak_sustained_active")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--gate-up", nargs="*", default=[])
    p.add_argument("--down", nargs="*", default=[])
    p.add_argument("--mma", nargs="*", default=[], help="v6 gate/up shapes S,WR,PD,tgs[,CS[,RBM[,PF[,XB[,DH[,MD]]]]]] (XB: x staged per token, its launch counted in gate/up; DH: down's rows hinted; MD: down on the matrix units, its h staging counted in down; its shape from FLASH_MOE_TUNING's down_mma; the last column gives each staging launch's own time)")
    p.add_argument("--keep-l2", action="store_true", help="do not flush L2 before each kernel")
    p.add_argument("--ncu", default=shutil.which("ncu") or "/usr/local/cuda/bin/ncu")
    p.add_argument("--best-json", type=Path, help="write the fastest gate/up and down shapes here, as JSON "
                   "for FLASH_MOE_TUNING")
    a = p.parse_args()
    if len(a.gate_up) != len(a.down):
        sys.exit("--gate-up and --down need as many shapes each")
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "ncu.csv"
        metrics = METRICS[:1] if a.keep_l2 else METRICS  # one metric: one pass, no replay
        cmd = [a.ncu, "--clock-control", "none", "--cache-control", "none" if a.keep_l2 else "all", "--csv",
               "--print-units", "base", "--log-file", str(log), "--metrics", ",".join(metrics),
               "-k", "regex:gate_up_pf|gate_up_mma|stage_x_mma|down_pf|stage_h_mma|down_mma", sys.executable, str(ROOT / "tools" / "profile_expert_mlp.py"),
               "--bits", str(a.bits), "--k", str(a.k), "--calls", str(a.calls), "--sweep",
               "--gate-up", *a.gate_up, "--down", *a.down, "--mma", *a.mma]
        run = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        shapes = [json.loads(line[4:]) for line in run.stdout.splitlines() if line.startswith("ran ")]
        if run.returncode or not log.exists():
            sys.exit(f"ncu failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        text = log.read_text()
        rows = list(csv.DictReader(io.StringIO(text[text.find('"ID"'):])))
    best = report(rows, shapes, a.calls, a.bits, a.k, a.keep_l2)
    if a.best_json:
        a.best_json.write_text(json.dumps(best))
        print("fastest:", json.dumps(best))


def report(rows, shapes, calls: int, bits: int, k: int, keep_l2: bool = False) -> dict:
    """Print the table (``shapes``: a [gate_up, down] pair of launch shapes per row); return the
    fastest shape of each kernel ({TUNING key: shape})."""
    kernels = {}  # (launch id, kernel) -> {metric: value}
    for r in rows:
        if "ID" not in r or r.get("Metric Name") not in METRICS:
            continue
        name = r["Kernel Name"]
        kind = ("stage" if "stage_x" in name else "stage_h" if "stage_h" in name else
                "gate_up" if "gate_up" in name else "down")
        kernels.setdefault((int(r["ID"]), kind), {})[r["Metric Name"]] = float(r["Metric Value"].replace(",", ""))
    per_kind = {"gate_up": [], "down": []}
    staged = {}  # v6 with XB (MD): its x (h) staging launch counts with the gate/up (down) launch after it
    for (_, kind), m in sorted(kernels.items()):
        if kind in ("stage", "stage_h"):
            staged["gate_up" if kind == "stage" else "down"] = m
            continue
        if kind in staged:
            first = staged.pop(kind)
            m = dict(m, **{key: m[key] + first[key] for key in ("gpu__time_duration.sum", "dram__bytes_read.sum")
                           if key in m}, staging=first["gpu__time_duration.sum"])
        per_kind[kind].append(m)
    l2 = "L2 as the previous kernel left it" if keep_l2 else "L2 flushed before each kernel"
    print(f"{bits}-bit k={k}, {calls} calls a shape, median; {l2}, boost clocks")
    print(f"{'gate_up / down shape':60s} {'gate_up us':>10s} {'down us':>8s} {'sum us':>7s} {'GB/s':>6s} "
          f"{'regs':>9s} {'occupancy %':>12s} {'staging us x/h':>14s}")
    best = {}
    for i, pair in enumerate(shapes):
        shape = " ".join(json.dumps(s) for s in pair)
        med = {}
        for kind in ("gate_up", "down"):
            ms = per_kind[kind][i * calls:(i + 1) * calls]
            med[kind] = {k: statistics.median(m.get(k, nan) for m in ms) for k in METRICS} if ms else None  # (nan: not collected)
            if ms:
                med[kind]["staging"] = statistics.median(m.get("staging", 0.0) for m in ms)
        if not med["gate_up"] or not med["down"]:
            print(f"{shape:60s} (no profile)")
            continue
        us = {k: med[k]["gpu__time_duration.sum"] / 1e3 for k in med}
        for kind, part in zip(("gate_up", "down"), pair):
            if kind not in best or us[kind] < best[kind][0]:
                best[kind] = (us[kind], part)
        total_bytes = med["gate_up"]["dram__bytes_read.sum"] + med["down"]["dram__bytes_read.sum"]
        print(f"{shape:60s} {us['gate_up']:10.1f} {us['down']:8.1f} {us['gate_up'] + us['down']:7.1f} "
              f"{total_bytes / (us['gate_up'] + us['down']) / 1e3:6.0f} "
              f"{med['gate_up']['launch__registers_per_thread']:4.0f}/{med['down']['launch__registers_per_thread']:<4.0f} "
              f"{med['gate_up']['sm__warps_active.avg.pct_of_peak_sustained_active']:5.1f}/"
              f"{med['down']['sm__warps_active.avg.pct_of_peak_sustained_active']:<5.1f} "
              f"{med['gate_up']['staging'] / 1e3:6.1f}/{med['down']['staging'] / 1e3:<6.1f}")
    # (a shape with HP 1 or 2 is a half-precision shape: the library takes it from the _hp key)
    return {("gate_up_mma" if "S" in shape else f"{kind}_hp" if shape.get("HP") else f"{kind}_pf"): shape
            for kind, (_, shape) in best.items()}


if __name__ == "__main__":
    main()
