"""One step of a run, run in this process under torch.profiler: for each of its phases, the wall time, the
time the GPU ran kernels, the time it copied memory (checkpoint saves and loads show here), the time it
did neither (host-bound work, waiting on the disk), the kernels that took longest, and the wall time inside
each of the host-side calls in HOST_CALLS (issue 9: where an iteration's time goes; cProfile's call tree
breaks inside trl's training loop).

    python3 bench/profile_step.py --run-dir RUN --step e-step --iteration 1 --out OUT

The step runs as `coevolve step` runs it and writes its outputs: profile a step that is not done yet.
Writes OUT/STEP.profile.json (the summary) and prints it as a table; the raw trace is not kept (hundreds
of MB for a GPU step).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import log  # noqa: E402

GPU_WORK = {"kernel": "kernels", "gpu_memcpy": "copies", "gpu_memset": "copies"}
# Host-side calls suspected of the GPU's idle time (loads, saves, trainer set-up, data handling): each is
# wrapped in a profiler annotation, and every phase reports the wall time spent inside each.
HOST_CALLS = [
    "transformers.modeling_utils:PreTrainedModel.from_pretrained",
    "transformers.modeling_utils:PreTrainedModel.save_pretrained",
    "transformers:AutoTokenizer.from_pretrained",
    "transformers:Trainer._save_checkpoint",
    "transformers:Trainer.training_step",
    "transformers:Trainer.create_optimizer",
    "transformers:Trainer._maybe_log_save_evaluate",
    "trl:DPOTrainer.__init__",
    "trl:RewardTrainer.__init__",
    "accelerate:Accelerator.prepare",
    "torch.nn:Module.to",
    "datasets:Dataset.map",
    "datasets:Dataset.save_to_disk",
    "datasets:load_from_disk",
]


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: kernels of several streams may overlap."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def summarize(events: list[dict], top: int = 8) -> dict:
    phases = [e for e in events if e.get("cat") == "user_annotation" and e.get("name", "").startswith("phase:")]
    work = [e for e in events if e.get("cat") in GPU_WORK]
    out = {}
    for p in sorted(phases, key=lambda e: e["ts"]):
        start, end = p["ts"], p["ts"] + p["dur"]
        inside = [e for e in work if start <= e["ts"] < end]
        by_kind = {
            kind: busy_us([(e["ts"], e["ts"] + e["dur"]) for e in inside if GPU_WORK[e["cat"]] == kind])
            for kind in ("kernels", "copies")
        }
        names: dict[str, float] = {}
        for e in inside:
            if e["cat"] == "kernel":
                names[e["name"][:90]] = names.get(e["name"][:90], 0.0) + e["dur"]
        wall = p["dur"]
        host = {}
        for e in events:
            if e.get("cat") == "user_annotation" and e.get("name", "").startswith("host:") and start <= e["ts"] < end:
                host.setdefault(e["name"][len("host:") :], []).append((e["ts"], e["ts"] + e["dur"]))
        out[p["name"][len("phase:") :]] = {
            "wall_s": round(wall / 1e6, 3),
            "kernels_s": round(by_kind["kernels"] / 1e6, 3),
            "copies_s": round(by_kind["copies"] / 1e6, 3),
            "gpu_idle_s": round((wall - busy_us([(e["ts"], e["ts"] + e["dur"]) for e in inside])) / 1e6, 3),
            "kernel_count": sum(e["cat"] == "kernel" for e in inside),
            "top_kernels_s": {k: round(v / 1e6, 3) for k, v in sorted(names.items(), key=lambda kv: -kv[1])[:top]},
            # Union of each call's intervals: a call nested in itself counts once.
            "host_calls_s": {
                k: round(busy_us(v) / 1e6, 3) for k, v in sorted(host.items(), key=lambda kv: -busy_us(kv[1]))
            },
        }
    return out


def annotate(spec: str, record_function) -> None:
    """Wrap `module:Owner.attr` (a function, method or classmethod) in a `host:Owner.attr` annotation."""
    module, qualname = spec.split(":")
    owner = importlib.import_module(module)
    *path, attr = qualname.split(".")
    for name in path:
        owner = getattr(owner, name)
    raw = inspect.getattr_static(owner, attr)
    func = raw.__func__ if isinstance(raw, classmethod) else getattr(owner, attr)

    @functools.wraps(func)
    def wrapped(*args, **kwargs):
        with record_function(f"host:{qualname}"):
            return func(*args, **kwargs)

    setattr(owner, attr, classmethod(wrapped) if isinstance(raw, classmethod) else wrapped)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--step", required=True)
    ap.add_argument("--iteration", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from coevolve.cli import main as coevolve
    from coevolve.core.step import StepRun

    phase = StepRun.phase

    def annotated(self, name, build):
        with record_function(f"phase:{name}"):
            return phase(self, name, build)

    StepRun.phase = annotated
    for spec in HOST_CALLS:
        annotate(spec, record_function)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        coevolve(["step", a.step, "--run-dir", str(a.run_dir), "--iteration", str(a.iteration)])
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        summary = summarize(json.loads(trace.read_text())["traceEvents"])
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{a.step}.profile.json").write_text(json.dumps(summary, indent=1))
    log(f"{a.step}: phase | wall s | GPU kernels s | GPU copies s | GPU idle s | kernels")
    for name, p in summary.items():
        log(f"  {name} | {p['wall_s']} | {p['kernels_s']} | {p['copies_s']} | {p['gpu_idle_s']} | {p['kernel_count']}")
        for kernel, seconds in p["top_kernels_s"].items():
            log(f"      {seconds:8.3f}  {kernel}")
        for call, seconds in p["host_calls_s"].items():
            log(f"      {seconds:8.3f}  host: {call}")


if __name__ == "__main__":
    main()
