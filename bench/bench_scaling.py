"""Ours' Mutual-Taught iteration (bench_iteration.py's, without the naive side) on 1, 2, 4 ... GPUs of one
machine (issue 10): every training step under `accelerate launch` with DeepSpeed ZeRO-2 or ZeRO-3
(configs/deepspeed/; `--zero 0` is plain DDP), sampling and scoring split by prompt. The global batch is
the same at every GPU count (per-device batch = batch / GPUs), so each count takes the same optimizer
steps. Reported per configuration: the iteration's wall time, its time by phase kind, and the scaling
efficiency t(1 GPU) / (N x t(N GPUs)) under the same ZeRO stage.

On a machine of several GPUs (the device tool's nvidia-h200-x2 or -x4), with the wheels of
`bash bench/carry.sh deepspeed` carried in `.whl` (install them as bench_iteration.py says):
    python3 bench/bench_scaling.py --model qwen2-1.5b --gpus 1,2 --zero 2,3 --out OUT
    python3 bench/bench_scaling.py --model tiny --prompts 24 --select 4 --num-samples 3 --new-tokens 8 --gpus 1,2 --zero 0   # CPU smoke run (DDP over gloo)
    python3 bench/bench_scaling.py --record OUT/scaling.json --command "..."   # here: RESULTS.md, results.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_iteration import make_models, run_ours, workload, workload_args, write_prompts  # noqa: E402
from common import MODELS, append_result, folders, log, record_args  # noqa: E402


def launch_section(gpus: int, zero: int) -> dict:
    section = {"launcher": "accelerate", "gpus": gpus}
    if zero:
        section["deepspeed_config"] = str(ROOT / "configs" / "deepspeed" / f"zero{zero}.json")
    return section


def record(path: Path, command: str) -> None:
    r = json.loads(path.read_text())
    rows = [
        f"| {run['zero'] or 'DDP'} | {run['gpus']} | {run['iter_s']:.1f} | {run['efficiency']:.2f} | "
        + ", ".join(f"{k} {v:.1f}" for k, v in run["breakdown"].items())
        + " |"
        for run in r["runs"]
    ]
    md = [
        f"\n## scaling: {r['date']}, {r['gpu_count']} x {r['device']}",
        f"`{command}`",
        f"Model: {r['model']} shape, random weights, {r['params'] / 1e6:.0f}M params. Workload: {json.dumps(r['workload'])}.",
        "",
        "| ZeRO | GPUs | iteration s | efficiency | by phase kind (s) |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]
    common = {k: r[k] for k in ("device", "date", "model", "params", "workload")}
    lines = [
        {"bench": "scaling", **common, **{k: run[k] for k in ("gpus", "zero", "iter_s", "efficiency")}}
        for run in r["runs"]
    ]
    append_result(ROOT / "bench", lines, md)
    log("\n".join(md))


def main() -> None:
    ap = argparse.ArgumentParser()
    workload_args(ap, model="qwen2-1.5b")
    ap.add_argument("--gpus", default="1,2", help="GPU counts, 1 first (the efficiency's base)")
    ap.add_argument("--zero", default="2,3", help="ZeRO stages; 0 is plain DDP")
    record_args(ap, "scaling.json", "bench_scaling.py")
    a = ap.parse_args()
    if a.record:
        record(a.record, a.command)
        return
    import torch

    counts, stages = [int(g) for g in a.gpus.split(",")], [int(z) for z in a.zero.split(",")]
    cuda = torch.cuda.is_available()
    if counts[0] != 1:
        ap.error("--gpus: start with 1, the base of the efficiency")
    if cuda and max(counts) > torch.cuda.device_count():
        ap.error(f"--gpus: {max(counts)} asked for, {torch.cuda.device_count()} here")
    if any(a.dpo_batch % n or a.rm_batch % n for n in counts):
        ap.error("--dpo-batch and --rm-batch must divide by every GPU count (the global batch stays the same)")
    work, out = folders(a, "scaling")
    backend = a.backend or ("static" if cuda else "hf")
    params, _ = make_models(a.model, work)
    write_prompts(a.prompts, MODELS[a.model]["vocab_size"], work / "prompts.jsonl")
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "gpu_count": max(counts),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": a.model,
        "params": params,
        "workload": workload(a, backend),
        "runs": [],
    }
    warm = False
    for zero in stages:
        base = None
        for n in counts:
            per_device = argparse.Namespace(**{**vars(a), "dpo_batch": a.dpo_batch // n, "rm_batch": a.rm_batch // n})
            wall, kinds, _ = run_ours(per_device, work, backend, launch_section(n, zero), warmup=not warm)
            warm = True
            base = base or wall
            run = {
                "gpus": n,
                "zero": zero,
                "iter_s": round(wall, 1),
                "efficiency": round(base / (n * wall), 3),
                "breakdown": kinds,
            }
            result["runs"].append(run)
            log(json.dumps(run))
            # Saved after every configuration: a device call may end before the last.
            (out / "scaling.json").write_text(json.dumps(result, indent=1))
            if out != work:
                (out / "ours.log").write_text((work / "ours.log").read_text()[-200_000:])


if __name__ == "__main__":
    main()
