"""The sandbox experiment at GPU scale: every arm x 5 seeds x 5 iterations of configs/sandbox-gpu.yaml,
run by `coevolve experiment` with the runs sharing one GPU, then recorded.

On the GPU machine, with the wheels of `bash bench/carry.sh` carried in `.whl`:
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:. && bash bench/device_layout.sh
    python3 bench/bench_sandbox.py --out OUT --runs /tmp/runs        # the experiment; OUT/sandbox/experiment.json
    python3 bench/bench_sandbox.py --arms frozen-rm,mutual-taught,oracle,frozen-rm-online,mutual-taught-online,oracle-online \
        --out OUT --runs /tmp/runs --parallel 30 --deadline-s 545  # offline and online (GRPO) E-steps side by side
    python3 bench/bench_sandbox.py --record OUT/sandbox/experiment.json --command "..."   # here: RESULTS.md, results.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import append_result, log, record_args  # noqa: E402

ARMS = "frozen-rm,mutual-taught,mutual-taught+seft,oracle,mt-no-selection,mt-no-filter,mt-original-pairs"
# The bench JSON line's per-arm lists (mean and std over seeds per iteration), by the names it gives them.
LINE_METRICS = {
    "gold": "gold",
    "rm_score": "rm_score_mean",
    "rm_acc_current": "rm_acc_current",
    "rm_acc_original": "rm_acc_original",
    "kl": "kl_to_initial",
    "win_rate": "win_rate_vs_initial",
    "pseudo_label_acc": "pseudo_label_acc",
}
MD_METRICS = (
    "gold",
    "rm_score_mean",
    "kl_to_initial",
    "rm_acc_current",
    "rm_acc_original",
    "win_rate_vs_initial",
    "pseudo_label_acc",
)


def _seeds(summary: dict) -> list[int]:
    return next(iter(summary["per_seed"].values()))["seeds"]


def _design(summary: dict) -> list[str]:
    """The overrides a run's design is made of: all but the first seed's."""
    return [o for o in summary["overrides"] if not o.startswith("seed=")]


def _pooled(s: dict, other: dict) -> None:
    """`other`'s seeds added to `s`'s: each seed's series joined, means and stds recomputed from them."""
    from coevolve.experiment import seed_stats

    for arm, series in s["per_seed"].items():
        row = s["arms"][arm]
        for name, runs in other["per_seed"][arm].items():
            series[name] = series[name] + runs
            if name != "seeds":
                row[name], row[f"{name}_std"] = seed_stats(series[name])
        row["stopped_runs"] += other["arms"][arm]["stopped_runs"]
    s["seeds"] += other["seeds"]
    s["overrides"] = _design(s)


def merged(paths: list[Path]) -> dict:
    """One experiment from the summaries of several device calls of the same design: other arms on the
    same seeds side by side, or the same arms on other seeds pooled; their walls added."""
    s = json.loads(paths[0].read_text())
    for path in paths[1:]:
        other = json.loads(path.read_text())
        if other["iterations"] != s["iterations"] or _design(other) != _design(s):
            raise SystemExit(f"--also {path}: not the same iterations and overrides as {paths[0]}")
        if other["overrides"] == s["overrides"]:
            # An arm run again (after a fix) replaces the earlier call's, and its failures with it.
            s["failed"] = [f for f in s["failed"] if f.split(" seed ")[0] not in other["arms"]]
            s["arms"].update(other["arms"])
            if "per_seed" in s:
                s["per_seed"].update(other.get("per_seed", {}))
        elif set(other["arms"]) == set(s["arms"]) and not set(_seeds(other)) & set(_seeds(s)):
            _pooled(s, other)
        else:
            raise SystemExit(
                f"--also {path}: neither other arms on the seeds of {paths[0]} nor its arms on other seeds"
            )
        s["wall_s"] += other["wall_s"]
        s["failed"] += other["failed"]
    return s


def experiment_record_args(ap, script: str) -> None:
    """--record and --also of the benches that record an experiment (`coevolve experiment`'s summary)."""
    record_args(ap, "experiment.json", script)
    ap.add_argument(
        "--also",
        type=Path,
        action="append",
        default=[],
        help="--record: another call's experiment.json, with more arms on the same seeds or the same arms on more seeds",
    )


def record(paths: list[Path], command: str, bench: str = "sandbox") -> None:
    from coevolve.experiment import table

    s = merged(paths)
    arms = {
        arm: {k + tail: row[m + tail] for k, m in LINE_METRICS.items() if m in row for tail in ("", "_std")}
        for arm, row in s["arms"].items()
    }
    line = {
        "bench": bench,
        "task": s["task"],
        "device": s["device"],
        "date": s["date"],
        "seeds": s["seeds"],
        "overrides": s["overrides"],
        "iterations": s["iterations"],
        "wall_s": s["wall_s"],
        "arms": arms,
        "per_seed": s.get("per_seed"),  # older summaries have none
    }
    md = [
        f"\n## {bench}: {s['date']}, {s['device']}",
        f"`{command}`",
        f"Task {s['task']}, {s['seeds']} seeds"
        + (f" ({', '.join(map(str, _seeds(s)))})" if s.get("per_seed") else "")
        + f" x {s['iterations']} iterations per arm, {s['wall_s']:.0f} s wall for all runs"
        f" (sharing the GPU); mean ± std over seeds, iteration 0 first."
        + (f" Overrides: {' '.join(s['overrides'])}." if s["overrides"] else "")
        + (f" Failed: {s['failed']}" if s["failed"] else ""),
        "",
        table(s, MD_METRICS),
        "",
    ]
    append_result(ROOT / "bench", line, md)
    log("\n".join(md))


def step_seconds(out: Path) -> dict:
    """Mean seconds per step kind and arm (phases summed, process start excluded), from every run's DONE.json."""
    per: dict = {}
    for done in out.glob("*/seed_*/iter_*/*/DONE.json"):
        arm = done.parents[3].name
        d = json.loads(done.read_text())
        per.setdefault(arm, {}).setdefault(d["step"], []).append(sum(d["timings"].values()))
    return {arm: {step: round(sum(v) / len(v), 1) for step, v in sorted(steps.items())} for arm, steps in per.items()}


def export(runs: Path, out: Path, seconds: dict) -> None:
    """The experiment's summary, each run's console log and its steps' DONE.json, flattened into `out`
    (the device brings back only a few folder levels, and no names with '+')."""
    import shutil

    (out / "logs").mkdir(parents=True, exist_ok=True)
    for name in ("experiment.json", "table.md", "experiment.png", "gold_vs_kl.png"):
        if (runs / name).exists():
            shutil.copy(runs / name, out / name)
    for run in runs.glob("*/seed_*"):
        flat = f"{run.parent.name}_{run.name}".replace("+", "_")
        if (run / "run.log").exists():
            shutil.copy(run / "run.log", out / "logs" / f"{flat}.log")
        for done in run.glob("iter_*/*/DONE.json"):
            shutil.copy(done, out / "logs" / f"{flat}_{done.parents[1].name}_{done.parent.name}.json")
    (out / "step_seconds.json").write_text(json.dumps(seconds, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "sandbox-gpu.yaml"))
    ap.add_argument("--out", type=Path)
    ap.add_argument(
        "--runs",
        type=Path,
        help="where the runs' folders go (default OUT/sandbox); OUT/sandbox gets the summary and logs",
    )
    ap.add_argument("--arms", default=ARMS)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--parallel", type=int, default=20)
    ap.add_argument(
        "--deadline-s",
        type=float,
        help="stop runs still going after this many seconds (a device call lasts 600 s at most)",
    )
    experiment_record_args(ap, "bench_sandbox.py")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.record:
        record([args.record, *args.also], args.command)
        return
    from coevolve.experiment import run_experiment

    runs = args.runs or args.out / "sandbox"
    summary = run_experiment(
        args.config, args.overrides, runs, args.arms.split(","), args.seeds, args.parallel, args.deadline_s
    )
    seconds = step_seconds(runs)
    log("mean seconds per step (phases only), per arm: " + json.dumps(seconds, indent=1))
    if runs != args.out / "sandbox":
        export(runs, args.out / "sandbox", seconds)
    if summary["failed"]:
        raise SystemExit(f"failed: {summary['failed']}")


if __name__ == "__main__":
    main()
