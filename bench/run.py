"""Benchmark driver (GitHub issue 8): alignkit against TRL on identical work, in one invocation.

    bash bench/setup_peers.sh            # once: bench/.venv-trl116 (TRL 1.16), bench/.venv-trl112 (TRL 1.12, PPO)
    .venv/bin/python bench/run.py [--stages sft,dpo] [--quick] [--repeats 2]

For each stage it runs the alignkit side (`alignkit_side.py`, alignkit's venv) and the TRL side
(`trl_side.py`, a TRL venv) as separate processes, alternately (A, B, A, B, ...) so drifts in
machine load hit both, pools the per-step times of all repeats (median after warm-up), checks that
both sides did the same work per optimizer step (forward/backward passes, trained, generated and
scored tokens), prints a table of ratios (TRL time / alignkit time: > 1 means alignkit is faster)
and writes bench/results.json. The peak fp32 matmul throughput of this machine is measured in the
same run, before and after, and each side's achieved model FLOP/s is given as a fraction of it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import BENCH_DIR, RESULT_PREFIX, STAGES  # noqa: E402

REPO = BENCH_DIR.parent
TRL_VENVS = {"ppo": BENCH_DIR / ".venv-trl112"}  # TRL removed PPOTrainer after 1.12
DEFAULT_TRL_VENV = BENCH_DIR / ".venv-trl116"
LOG_DIR = common.WORK_DIR / "logs"
WORK_KEYS = ("forward/train", "backward", "forward/nograd", "forward/decode", "tokens/train",
             "tokens/backward", "tokens/nograd", "tokens/generated")
EARLIER_TRL = {"sft": 0.156, "reward": 0.148, "dpo": 0.423, "grpo": 0.476, "rloo": 0.550, "ppo": 0.943}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    p.add_argument("--repeats", type=int, default=2, help="runs per side and stage, interleaved A, B, A, B")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps per run (default {common.STEPS}; "
                   f"the first {common.WARMUP_STEPS} are warm-up)")
    p.add_argument("--quick", action="store_true", help=f"{common.QUICK_STEPS} steps per run, 1 repeat")
    p.add_argument("--sides", default="alignkit,trl", help="comma-separated: alignkit, trl")
    p.add_argument("--accel", default="auto", choices=["auto", "cpu", "plain"],
                   help="alignkit's acceleration backend (`--run.accel`): auto (cpu here), cpu, or plain "
                        "(the Hugging Face forward and KV-cache decoding alone)")
    p.add_argument("--omp-wait-policy", default="unset", choices=["passive", "active", "unset"],
                   help="OMP_WAIT_POLICY of both sides. unset (default): OpenMP's own default, as users run "
                        "both libraries; run on a quiet machine. passive: threads sleep between parallel "
                        "regions, which survives other processes sharing the cores (spinning threads made "
                        "generate 20-60x slower then) but costs every small op a wake-up (grpo 0.37 vs "
                        "0.25 s/step here)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per side run")
    p.add_argument("--output", default=str(BENCH_DIR / "results.json"))
    args = p.parse_args(argv)
    args.stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(args.stages) - set(STAGES))
    if unknown:
        p.error(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    args.sides = [s for s in args.sides.split(",") if s]
    if args.quick:
        args.steps, args.repeats = args.steps or common.QUICK_STEPS, 1
    args.steps = args.steps or common.STEPS
    return args


def side_command(side: str, stage: str, steps: int, accel: str = "auto") -> list[str]:
    if side == "alignkit":
        return [sys.executable, str(BENCH_DIR / "alignkit_side.py"), "--stage", stage, "--steps", str(steps),
                "--accel", accel]
    python = TRL_VENVS.get(stage, DEFAULT_TRL_VENV) / "bin" / "python"
    return [str(python), str(BENCH_DIR / "trl_side.py"), "--stage", stage, "--steps", str(steps)]


def side_env(omp_wait_policy: str) -> dict[str, str]:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(common.THREADS),
               MKL_NUM_THREADS=str(common.THREADS), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    env.pop("OMP_WAIT_POLICY", None)
    if omp_wait_policy != "unset":
        env["OMP_WAIT_POLICY"] = omp_wait_policy.upper()
    return env


def run_side(side: str, stage: str, repeat: int, args: argparse.Namespace) -> dict:
    """One child process; its BENCH_RESULT line as a dict (or an error dict)."""
    cmd = side_command(side, stage, args.steps, args.accel)
    if not Path(cmd[0]).exists():
        return {"side": side, "stage": stage, "error": f"{cmd[0]} missing: run `bash bench/setup_peers.sh`"}
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = LOG_DIR / f"{stage}-{side}-{repeat}.log"
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=REPO,
                              env=side_env(args.omp_wait_policy))
    except subprocess.TimeoutExpired:
        return {"side": side, "stage": stage, "error": f"timed out after {args.timeout:.0f} s"}
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"side": side, "stage": stage, "error": f"exit {proc.returncode}: {tail} (log: {log})"}
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result.update(wall_s=time.perf_counter() - t0, load_avg_1min=[load_before, os.getloadavg()[0]])
    return result


def run_stage(stage: str, args: argparse.Namespace) -> dict[str, list[dict]]:
    """Repeats of both sides, interleaved: A, B, A, B (a side that is unavailable is not retried)."""
    runs: dict[str, list[dict]] = {side: [] for side in args.sides}
    for repeat in range(args.repeats):
        for side in args.sides:
            if runs[side] and (runs[side][-1].get("available") is False or "error" in runs[side][-1]):
                continue
            result = run_side(side, stage, repeat, args)
            runs[side].append(result)
            status = result.get("error") or result.get("reason") or f"{result['s_per_step']:.3f} s/step"
            print(f"  {stage:6s} {side:8s} run {repeat + 1}/{args.repeats}: {status}", flush=True)
    return runs


def aggregate(runs: list[dict], peak_gflops: float) -> dict:
    """Pooled median s/step over all repeats; throughput, RSS and work from the runs."""
    ok = [r for r in runs if "s_per_step" in r]
    if not ok:
        last = runs[-1] if runs else {}
        return {"available": last.get("available", True) is not False,
                "error": last.get("error") or last.get("reason") or "not run"}
    warm = common.WARMUP_STEPS
    pooled = [t for r in ok for t in (r["step_times"][warm:] or r["step_times"])]
    s = statistics.median(pooled)
    work = {k: statistics.median(r["work_per_step"].get(k, 0.0) for r in ok) for k in WORK_KEYS}
    flops = statistics.median(r["work_per_step"].get("flops", 0.0) for r in ok)
    train_tokens = work["tokens/train"]
    generated = work["tokens/generated"]
    return {
        "available": True, "s_per_step": s, "run_medians": [r["s_per_step"] for r in ok],
        "measured_steps": len(pooled), "train_tokens_per_step": train_tokens,
        "generated_tokens_per_step": generated, "train_tokens_per_s": train_tokens / s,
        "generated_tokens_per_s": generated / s, "peak_rss_mb": max(r["peak_rss_mb"] for r in ok),
        "achieved_gflops": flops / s / 1e9, "fraction_of_peak": flops / s / 1e9 / peak_gflops,
        "work_per_step": work, "load_avg_1min": [r.get("load_avg_1min") for r in ok],
        "versions": ok[-1].get("versions"),
    }


def work_check(a: dict, b: dict) -> dict:
    """Same forward/backward passes and token counts per optimizer step on both sides?"""
    if "work_per_step" not in a or "work_per_step" not in b:
        return {"same_work": None, "note": "only one side ran"}
    diffs = {k: [a["work_per_step"][k], b["work_per_step"][k]] for k in WORK_KEYS
             if abs(a["work_per_step"][k] - b["work_per_step"][k]) > 0.5}
    note = "same passes and tokens per step" if not diffs else \
        "differs (alignkit, trl): " + ", ".join(f"{k} {v[0]:g} vs {v[1]:g}" for k, v in diffs.items())
    return {"same_work": not diffs, "differences": diffs, "note": note}


def stage_entry(stage: str, runs: dict[str, list[dict]], peak: float) -> dict:
    ak = aggregate(runs.get("alignkit", []), peak)
    trl = aggregate(runs.get("trl", []), peak)
    entry: dict[str, Any] = {
        "alignkit_s_per_step": ak.get("s_per_step"), "trl_s_per_step": trl.get("s_per_step"),
        "ratio": trl["s_per_step"] / ak["s_per_step"] if "s_per_step" in ak and "s_per_step" in trl else None,
        "trl_earlier_s_per_step": EARLIER_TRL.get(stage), "work_check": work_check(ak, trl),
        "alignkit": ak, "trl": trl, "runs": runs,
    }
    if not ak.get("available", True):
        entry["alignkit_status"] = "alignkit stage not available yet"
    return entry


def _fmt(value: float | None, spec: str) -> str:
    width = int(spec.split(".")[0] or 0)
    return "-".rjust(width) if value is None else format(value, spec)


def print_table(stages: dict[str, dict]) -> None:
    head = (f"{'stage':7s} {'alignkit s/step':>15s} {'TRL s/step':>10s} {'ratio':>6s} {'train tok/s':>17s} "
            f"{'gen tok/s':>13s} {'peak RSS MB':>13s} {'% of peak':>11s}  work")
    print("\n" + head + "\n" + "-" * len(head))
    for stage, e in stages.items():
        ak, trl = e["alignkit"], e["trl"]
        pair = [(ak.get(k), trl.get(k)) for k in ("train_tokens_per_s", "generated_tokens_per_s",
                                                 "peak_rss_mb", "fraction_of_peak")]
        cols = [f"{_fmt(x, '.0f')}/{_fmt(y, '.0f')}" for x, y in pair[:3]]
        frac = f"{_fmt(pair[3][0] and 100 * pair[3][0], '.0f')}/{_fmt(pair[3][1] and 100 * pair[3][1], '.0f')}"
        status = e.get("alignkit_status") or ak.get("error") or e["work_check"]["note"]
        if trl.get("error"):
            status += f"; TRL: {trl['error']}"
        print(f"{stage:7s} {_fmt(e['alignkit_s_per_step'], '15.3f')} {_fmt(e['trl_s_per_step'], '10.3f')} "
              f"{_fmt(e['ratio'], '6.2f')} {cols[0]:>17s} {cols[1]:>13s} {cols[2]:>13s} {frac:>11s}  {status}")
    print("ratio = TRL s/step / alignkit s/step (> 1: alignkit faster); pairs are alignkit/TRL; "
          "% of peak = model FLOP/s / measured peak fp32 matmul FLOP/s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.update({k: v for k, v in side_env(args.omp_wait_policy).items() if k.startswith(("OMP", "MKL"))})
    print(f"bench: building the shared model and data in {common.WORK_DIR}", flush=True)
    manifest = common.build_work_dir()
    peak_before = common.peak_matmul_gflops()
    print(f"bench: peak fp32 matmul {peak_before:.1f} GFLOP/s ({common.THREADS} threads); stages {args.stages}, "
          f"{args.steps} steps x {args.repeats} repeat(s) per side", flush=True)
    raw = {stage: run_stage(stage, args) for stage in args.stages}
    peak = max(peak_before, common.peak_matmul_gflops())
    stages = {stage: stage_entry(stage, runs, peak) for stage, runs in raw.items()}
    machine = {**common.machine_info(), "peak_matmul_gflops": peak, "peak_matmul_gflops_before": peak_before,
               "omp_wait_policy": args.omp_wait_policy, "load_avg_1min_at_end": os.getloadavg()[0]}
    settings = {"steps": args.steps, "warmup_steps": common.WARMUP_STEPS, "repeats": args.repeats, "accel": args.accel,
                "batch": common.BATCH, "prompt_tokens": common.PROMPT_TOKENS,
                "response_tokens": common.RESPONSE_TOKENS, "rl_prompts": common.RL_PROMPTS,
                "rl_generations": common.RL_GENERATIONS, "new_tokens": common.NEW_TOKENS, "model": manifest}
    print_table(stages)
    Path(args.output).write_text(json.dumps({"stages": stages, "machine": machine, "settings": settings},
                                            indent=1))
    print(f"bench: wrote {args.output}")
    return 0 if all("error" not in e["trl"] for e in stages.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
