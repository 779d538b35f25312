"""Where an iteration's checkpoint hand-offs spend their time: each way our steps load and save a
0.5B-shaped model and its tokenizer, timed on its own (issue 9, the "save/load" part of the overhead).

Loads read files the page cache holds, as in an iteration (each checkpoint was just written). Every
case runs `--repeat` times; the table gives the median, and the first run apart when it differs.

On the GPU machine (see bench_iteration.py for the setup):
    python3 bench/bench_io.py --model qwen2-0.5b --out OUT
    python3 bench/bench_io.py --model tiny             # CPU smoke run
    python3 bench/bench_io.py --record OUT/io.json --command "..."   # here: RESULTS.md, results.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import MODELS, append_result, folders, log, record_args  # noqa: E402


def timed(fn, repeat: int) -> dict:
    import torch

    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        del out
    return {"first_s": round(times[0], 3), "median_s": round(statistics.median(times), 3)}


def cases(work: Path, device: str) -> dict:
    """name -> a call that does one load or save the way a step does it."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy, fp32 = work / "policy", work / "fp32"
    on_gpu = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).to(device)
    on_gpu.save_pretrained(fp32)
    tok = AutoTokenizer.from_pretrained(policy)
    counter = iter(range(10**6))

    def fresh(name: str) -> Path:
        return work / f"{name}-{next(counter)}"

    def state_to_cpu():
        return {k: v.detach().to("cpu", copy=True) for k, v in on_gpu.state_dict().items() if k != "lm_head.weight"}

    return {
        "tokenizer load": lambda: AutoTokenizer.from_pretrained(policy),
        "tokenizer save": lambda: tok.save_pretrained(fresh("tok")),
        # a policy or RM read on the CPU, then moved (load_policy/load_rm did so until they took device_map)
        "bf16 load, then .to(device)": lambda: AutoModelForCausalLM.from_pretrained(policy, dtype=torch.bfloat16).to(
            device
        ),
        "bf16 load, device_map": lambda: AutoModelForCausalLM.from_pretrained(
            policy, dtype=torch.bfloat16, device_map=device
        ),
        # selection reading a candidate checkpoint (saved fp32 by the trainer) for sampling
        "fp32 ckpt as bf16, then .to(device)": lambda: AutoModelForCausalLM.from_pretrained(
            fp32, dtype=torch.bfloat16
        ).to(device),
        "fp32 ckpt as bf16, device_map": lambda: AutoModelForCausalLM.from_pretrained(
            fp32, dtype=torch.bfloat16, device_map=device
        ),
        # trl's own load of the model it trains (fp32 weights, bf16 autocast), moved by the trainer
        "fp32 load, then .to(device)": lambda: AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).to(
            device
        ),
        # a trainer's checkpoint save (fp32 weights on the GPU)
        "fp32 save_pretrained": lambda: on_gpu.save_pretrained(fresh("save")),
        # its parts: the copy to the host, and safetensors writing host tensors
        "fp32 state to host": state_to_cpu,
        "fp32 safetensors save_file (host tensors)": (
            lambda cpu: lambda: save_file(cpu, str(fresh("st")) + ".safetensors")
        )(state_to_cpu()),
    }


def record(path: Path, command: str) -> None:
    r = json.loads(path.read_text())
    rows = [f"| {name} | {v['median_s']:.3f} | {v['first_s']:.3f} |" for name, v in r["cases"].items()]
    md = [
        f"\n## io: {r['date']}, {r['device']}",
        f"`{command}`",
        f"Model: {r['model']} shape, random weights, {r['params'] / 1e6:.0f}M params, saved bf16 (the fp32 cases: "
        f"a copy saved fp32, as the trainers save); files in the page cache; {r['repeat']} runs each.",
        "",
        "| case | median s | first s |",
        "|---|---|---|",
        *rows,
        "",
    ]
    line = {k: r[k] for k in ("bench", "device", "date", "model", "params", "cases")}
    append_result(ROOT / "bench", line, md)
    log("\n".join(md))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2-0.5b", choices=sorted(MODELS))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--out", type=Path)
    record_args(ap, "io.json", "bench_io.py")
    a = ap.parse_args()
    if a.record:
        record(a.record, a.command)
        return
    import torch
    from bench_training import build_tokenizer, save_model

    work, out = folders(a, "io")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    params = save_model(a.model, build_tokenizer(MODELS[a.model]["vocab_size"]), work / "policy", model_type="llama")
    result = {
        "bench": "io",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": a.model,
        "params": params,
        "repeat": a.repeat,
        "cases": {},
    }
    for name, fn in cases(work, device).items():
        result["cases"][name] = timed(fn, a.repeat)
        log(f"{name}: {result['cases'][name]}")
        (out / "io.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
