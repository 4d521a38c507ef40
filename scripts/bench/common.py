"""Shared by the benchmarks: the machine they ran on, a run's metrics.jsonl and its per-phase table."""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path


def machine() -> str:
    """One line naming the CPU, its cores and its matrix units: the hosts behind these machines change
    between sessions (AMD EPYC in some, Intel Xeon with AMX in others), and the timings with them."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    units = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model}, {len(os.sched_getaffinity(0))} cores, {' '.join(units) or 'no AVX-512'}"


def step_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "timing/step_s" in r]


def print_phase_table(steps: list[dict], title: str, first: int = 2) -> dict[str, float]:
    """Per-step phase seconds, then the median of each phase over steps >= `first`."""
    phases = sorted({k for m in steps for k in m if k.startswith("timing/")})
    names = [p.removeprefix("timing/").removesuffix("_s") for p in phases]
    print(f"\n{title}")
    print("| step | " + " | ".join(names) + " | reward |")
    print("|---" * (len(phases) + 2) + "|")
    for m in steps:
        print(f"| {m['step']} | " + " | ".join(f"{m.get(p, 0):.2f}" for p in phases) + f" | {m['reward/mean']:.3f} |")
    chosen = [m for m in steps if m["step"] >= first] or steps
    medians = {p: statistics.median(m.get(p, 0.0) for m in chosen) for p in phases}
    print(f"| median (steps >= {first}) | " + " | ".join(f"{medians[p]:.2f}" for p in phases) + " | |")
    return medians
