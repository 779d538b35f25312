"""`coevolve experiment`: one config run under several arms and seeds, the same budget for each, and a
table (mean ± std over seeds per iteration) of what the evaluate step measured, with plots.

Each arm × seed is an ordinary `coevolve run` in `OUT/ARM/seed_S` (so it resumes, and can be opened
with `coevolve report`), its console output in `run.log` there. An arm is a list of config overrides.
Arms whose configs differ only where steps of iteration 1+ look (e.g. frozen-rm and mutual-taught)
share one iteration 0 per seed: run once in `OUT/.start/seed_S-ARM`, then linked into each run, so
their comparison starts from the very same policy and RM, and iteration 0 is paid once.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import mean, pstdev
from typing import Any

from coevolve.core import rundir
from coevolve.core.config import Config, ConfigError, load_config
from coevolve.core.plan import iteration_steps
from coevolve.core.runner import stopped as stop_rule
from coevolve.core.steps import STEPS

ARMS = {
    # Iterative DPO against the RM of iteration 0, never updated.
    "frozen-rm": ["steps.m_step=false"],
    "mutual-taught": ["steps.m_step=true"],
    "mutual-taught+seft": ["steps.m_step=true", "steps.reviser=true", "e_step.mode=dpo+seft"],
    # The sandbox's gold reward as the RM: the upper bound. It trains no RM, so it samples no "human"
    # pairs from the policy either (the generator's pairs only serve its RM-accuracy column, 1.0 anyway).
    "oracle": [
        "rm.gold=true",
        "rm.name_or_path=null",
        "rm.gguf_file=null",
        "rm.tiny=null",
        "rm.from_policy=false",
        "steps.rm_init=false",
        "steps.m_step=false",
        "data.pair_source=generator",
    ],
    # The paper's ablations of Mutual-Taught: the last DPO checkpoint, with no model selection and no tau
    # stop; every pseudo pair kept, with no epsilon filter.
    "mt-no-selection": ["steps.m_step=true", "e_step.select=false"],
    "mt-no-filter": ["steps.m_step=true", "m_step.epsilon_filter=false"],
    # As many original "human" pairs as pseudo pairs mixed into every M-step's training set.
    "mt-original-pairs": ["steps.m_step=true", "m_step.original_pairs_ratio=1.0"],
    # Not in the paper: the loop ends when the M-step's RM loses more than 0.05 on the held-out "human"
    # pairs (bench/RESULTS.md, 2026-12-07, says how 0.05 was chosen and on which seeds it was tested).
    "mt-heldout-stop": ["steps.m_step=true", "m_step.max_heldout_drop=0.05"],
}
# The same arms with the E-step trained online by GRPO against the RM (the config's `e_step.online`), for
# gold against KL of online and offline optimisation side by side (Gao et al. 2022).
ARMS.update({f"{arm}-online": [*ARMS[arm], "e_step.mode=grpo"] for arm in ("frozen-rm", "mutual-taught", "oracle")})
# And with a KL penalty to the iteration's start: trl's former GRPO default (0.04), set before any run of
# these arms, not tuned on them.
ARMS.update(
    {f"{arm}-online-kl": [*ARMS[f"{arm}-online"], "e_step.online.kl=0.04"] for arm in ("frozen-rm", "mutual-taught")}
)
# Evaluate-step metrics in the table, in order; the referee's reward (gold or judge) comes first.
METRICS = ("rm_acc_current", "rm_acc_original", "win_rate_vs_initial", "kl_to_initial", "length_mean", "rm_score_mean")
# The M-step's own measurements, by the name the table gives them: how often its pseudo labels ("the
# new policy's response is better") agree with the referee, and how many pairs the epsilon filter kept.
M_STEP_METRICS = {
    "pseudo_label_acc": "pseudo/gold_label_acc",
    "pseudo_kept": "pseudo/kept",
    "pseudo_dropped": "pseudo/dropped",
    # What `m_step.max_heldout_drop` compares: rm_{K-1} and rm_K on the held-out original pairs.
    "rm_heldout_before": "rm_before/accuracy_heldout",
    "rm_heldout_after": "rm_after/accuracy_heldout",
}


# What only the steps of iterations 1+ read (and the run's name).
LATER_FIELDS = {"run_name", "iterations", "e_step", "m_step", "reviser", "stores"}
LATER_STEPS = {"m_step", "reviser"}


def arm_overrides(arm: str, seed: int, run_name: str) -> list[str]:
    return [
        *ARMS[arm],
        f"seed={seed}",
        f"data.seed={seed}",
        "steps.evaluate=true",
        f"run_name={run_name}-{arm}-seed{seed}",
    ]


def start_key(cfg: Config) -> str:
    """Equal for two configs exactly when their iteration 0 is the same."""
    tree = cfg.model_dump(mode="json", exclude=LATER_FIELDS)
    tree["steps"] = {k: v for k, v in tree["steps"].items() if k not in LATER_STEPS}
    return json.dumps(tree, sort_keys=True)


def share_start(start: Path, run: Path, cfg: Config) -> None:
    """Iteration 0 (and what it stored) from the shared start into `run`, unless `run` has its own."""
    if all(rundir.is_done(run, 0, s) for s in iteration_steps(cfg, 0)):
        return
    for part in ("iter_0", "stores"):
        shutil.rmtree(run / part, ignore_errors=True)
        shutil.copytree(start / part, run / part, copy_function=_link_or_copy)


def _link_or_copy(src: str, dst: str) -> None:
    # Hard links: finished files never change (steps and stores replace whole folders), so the runs can
    # share them, and a real model's iteration 0 (several GB) is not copied once per arm.
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links
        shutil.copy2(src, dst)


def run_experiment(
    config: str,
    overrides: list[str],
    out: Path,
    arms: list[str],
    seeds: int,
    parallel: int = 1,
    deadline_s: float | None = None,
) -> dict:
    """`deadline_s`: runs still going that long after the start are stopped (with their step
    processes); the table keeps what they finished, and they are listed as failed."""
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ConfigError(f"--arms: unknown arm(s) {unknown}; arms: {sorted(ARMS)}")
    base = load_config(config, overrides)
    jobs = [(arm, base.seed + s) for s in range(seeds) for arm in arms]
    # Every arm's config must be valid before any of them starts.
    configs = {job: load_config(config, [*overrides, *arm_overrides(*job, base.run_name)]) for job in jobs}
    # Per seed, the first arm of each group with the same iteration 0 runs it for the group.
    groups: dict[tuple, list] = {}
    for job, cfg in configs.items():
        groups.setdefault((job[1], start_key(cfg)), []).append(job)
    starts = {job: group[0] for group in groups.values() if len(group) > 1 for job in group}
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # Runs sharing the machine split its CPU threads: each torch process otherwise starts one per core,
    # and parallel runs oversubscribe the cores (a tiny SFT took 176 s instead of 12 on 2 cores).
    threads = max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)) // max(1, parallel))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}

    def coevolve_run(run: Path, job: tuple[str, int], *more: str) -> int | str:
        run.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "coevolve",
            "run",
            "--config",
            config,
            "--run-dir",
            str(run),
            *overrides,
            *arm_overrides(*job, base.run_name),
            *more,
        ]
        with open(run / "run.log", "a") as log:
            # Its own process group, so that a stop at the deadline reaches the step process too.
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
            try:
                return proc.wait(
                    timeout=None if deadline_s is None else max(1.0, t0 + deadline_s - time.perf_counter())
                )
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
                return "deadline"

    locks = {lead: threading.Lock() for lead in set(starts.values())}
    start_codes: dict[tuple[str, int], int | str] = {}

    def shared_start(job: tuple[str, int]) -> tuple[Path, int | str]:
        start = out / ".start" / f"seed_{job[1]}-{job[0]}"
        with locks[job]:  # the group's first thread runs it; the others wait for its result
            if job not in start_codes:
                print(f"iteration 0 of seed {job[1]}, shared: started ({start / 'run.log'})", flush=True)
                start_codes[job] = coevolve_run(start, job, "iterations=0")
        return start, start_codes[job]

    def one(job: tuple[str, int]) -> tuple[str, int, int | str]:
        arm, seed = job
        run = out / arm / f"seed_{seed}"
        began = time.perf_counter()
        code: int | str = 0
        if job in starts:
            start, code = shared_start(starts[job])
            if code == 0:
                share_start(start, run, configs[job])
        if code == 0:
            print(f"{arm} seed {seed}: started ({run / 'run.log'})", flush=True)
            code = coevolve_run(run, job)
        seconds = time.perf_counter() - began
        status = (
            "finished" if code == 0 else "STOPPED at the deadline" if code == "deadline" else f"FAILED (exit {code})"
        )
        print(f"{arm} seed {seed}: {status} in {seconds:.0f}s", flush=True)
        return arm, seed, code

    with ThreadPoolExecutor(max(1, parallel)) as pool:
        results = list(pool.map(one, jobs))
    summary = collect(out, arms, [seed for _, seed in jobs[:: len(arms)]], base.iterations, base.data.task)
    summary.update(
        {
            "config": config,
            "overrides": list(overrides),
            "wall_s": round(time.perf_counter() - t0, 1),
            "failed": [f"{arm} seed {seed} (exit {code})" for arm, seed, code in results if code != 0],
        }
    )
    write_outputs(out, summary)
    return summary


def _device() -> str:
    import torch

    return f"cuda: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "cpu"


def run_series(run: Path, iterations: int) -> tuple[list[dict | None], bool]:
    """Evaluate metrics for iterations 0..N of one run. After a stop (core/runner.py's rules) the loop
    hands the same policy and RM on, so its last measurement stands for the iterations it did not run."""
    series, stopped, last = [], False, None
    for k in range(iterations + 1):
        stopped = stopped or any(stop_rule(run, k, name) for name in STEPS)
        if rundir.is_done(run, k, "evaluate") and not stopped:
            last = {
                key.removeprefix("eval/"): v
                for key, v in rundir.read_done(run, k, "evaluate")["metrics"].items()
                if key.startswith("eval/")
            }
            if rundir.is_done(run, k, "m-step"):
                m = rundir.read_done(run, k, "m-step")["metrics"]
                last.update({name: m[key] for name, key in M_STEP_METRICS.items() if key in m})
        elif not stopped:
            last = None
        series.append(last)
    return series, stopped


def seed_stats(series: list[list[float | None]]) -> tuple[list[float | None], list[float | None]]:
    """Mean and std over seeds per iteration of each seed's series; None (not measured) and NaN
    ("nothing to measure", e.g. no fresh pairs the referee tells apart) are left out."""
    means, stds = [], []
    for values in zip(*series, strict=True):
        kept = [v for v in values if v is not None and v == v]
        means.append(round(mean(kept), 4) if kept else None)
        stds.append(round(pstdev(kept), 4) if kept else None)
    return means, stds


def collect(out: Path, arms: list[str], seeds: list[int], iterations: int, task: str | None) -> dict:
    referee = "gold" if task else "judge"
    summary: dict[str, Any] = {
        "bench": "sandbox",
        "task": task,
        "device": _device(),
        "date": dt.date.today().isoformat(),
        "seeds": len(seeds),
        "iterations": iterations,
        "arms": {},
        # Each seed's own series beside the means, so that a rule read off one set of seeds can be checked
        # on another's without running them again.
        "per_seed": {},
    }
    for arm in arms:
        runs = [run_series(out / arm / f"seed_{s}", iterations) for s in seeds]
        row: dict[str, Any] = {"stopped_runs": sum(stopped for _, stopped in runs)}
        per_seed: dict[str, Any] = {"seeds": list(seeds)}
        for metric in (f"{referee}_mean", *METRICS, *M_STEP_METRICS):
            name = referee if metric == f"{referee}_mean" else metric
            per_seed[name] = [
                [None if s[k] is None else s[k].get(metric) for k in range(iterations + 1)] for s, _ in runs
            ]
            row[name], row[f"{name}_std"] = seed_stats(per_seed[name])
        if not any(v is not None for m in M_STEP_METRICS for v in row[m]):  # no M-step in this arm
            for m in M_STEP_METRICS:
                del row[m], row[f"{m}_std"], per_seed[m]
        summary["arms"][arm] = row
        summary["per_seed"][arm] = per_seed
    return summary


def metric_names(summary: dict) -> list[str]:
    """The measured metrics of the summary's arms (the union, in order), the referee's reward first."""
    names = dict.fromkeys(
        m for row in summary["arms"].values() for m in row if not m.endswith("_std") and m != "stopped_runs"
    )
    return list(names)


def table(summary: dict, metrics: list[str] | tuple[str, ...] | None = None) -> str:
    """Markdown: per metric (all by default), a row per arm of mean ± std per iteration."""
    arms = summary["arms"]
    metrics = metrics or metric_names(summary)
    head = "| arm | " + " | ".join(f"iter {k}" for k in range(summary["iterations"] + 1)) + " |"
    rule = "|---" * (summary["iterations"] + 2) + "|"
    lines = []
    for metric in metrics:
        lines += [f"**{metric}** (mean ± std over {summary['seeds']} seed(s))", "", head, rule]
        for arm, row in arms.items():
            if metric in row:
                cells = ["–" if m is None else f"{m:.3f} ± {s:.3f}" for m, s in zip(row[metric], row[f"{metric}_std"])]
                lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines.append("")
    stopped = {arm: row["stopped_runs"] for arm, row in arms.items() if row["stopped_runs"]}
    if stopped:
        lines.append(f"Runs stopped early by a stop rule (their last measurement carried forward): {stopped}")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = summary["arms"]
    metrics = metric_names(summary)[:4]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4))
    iters = list(range(summary["iterations"] + 1))
    for ax, metric in zip(axes, metrics):
        for arm, row in arms.items():
            pts = [(k, m, s) for k, m, s in zip(iters, row[metric], row[f"{metric}_std"]) if m is not None]
            if pts:
                ks, ms, ss = zip(*pts)
                ax.errorbar(ks, ms, yerr=ss, marker="o", capsize=3, label=arm)
        ax.set_title(metric)
        ax.set_xlabel("iteration")
        ax.set_xticks(iters)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gold_vs_kl(summary: dict, path: Path) -> bool:
    """Gao et al.'s picture, one panel per arm: the referee's reward (solid) and the RM's own score of the
    policy (dashed, right axis: the proxy being optimised) against sqrt(KL(policy_K || policy_0)), one
    point per iteration (mean ± std over seeds). Over-optimisation shows as the proxy still rising while
    the reward turns over. False when no arm measured KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    referee = metric_names(summary)[0]
    arms = {
        arm: row
        for arm, row in summary["arms"].items()
        if "kl_to_initial" in row and any(v is not None for v in row["kl_to_initial"])
    }
    if not arms:
        return False
    cols = min(4, len(arms))
    rows = -(-len(arms) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False, sharex=True, sharey=True)
    top = max((m + s) for row in arms.values() for m, s in zip(row[referee], row[f"{referee}_std"]) if m is not None)
    for ax, (arm, row) in zip(axes.flat, arms.items()):
        proxies = row.get("rm_score_mean", [None] * len(row[referee]))
        pts = [
            (k, math.sqrt(max(kl, 0.0)), g, gs, r)
            for k, (kl, g, gs, r) in enumerate(zip(row["kl_to_initial"], row[referee], row[f"{referee}_std"], proxies))
            if kl is not None and g is not None
        ]
        if not pts:
            continue
        iters, xs, gold, gold_std, proxy = zip(*pts)
        ax.errorbar(xs, gold, yerr=gold_std, marker="o", capsize=3, color="C0")
        for k, x, g in zip(iters, xs, gold):
            ax.annotate(str(k), (x, g), textcoords="offset points", xytext=(3, 4), fontsize=7)
        ax.set_ylim(0, max(1.0, top))
        ax.set_title(arm, fontsize=9)
        ax.set_xlabel("sqrt(KL to policy_0)")
        if all(p is not None for p in proxy) and not arm.startswith("oracle"):
            twin = ax.twinx()
            twin.plot(xs, proxy, "--s", color="C3", markersize=3)
            twin.tick_params(axis="y", labelcolor="C3", labelsize=7)
    for ax in axes.flat[len(arms) :]:
        ax.axis("off")
    axes[0][0].set_ylabel(f"{referee} (mean ± std)")
    fig.suptitle(
        f"{referee} and the RM's score vs sqrt(KL), per iteration (numbers), {summary['seeds']} seed(s)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(out: Path, summary: dict) -> None:
    (out / "experiment.json").write_text(json.dumps(summary, indent=2))
    text = table(summary)
    (out / "table.md").write_text(text + "\n")
    plot(summary, out / "experiment.png")
    wrote = [out / "table.md", out / "experiment.json", out / "experiment.png"]
    if plot_gold_vs_kl(summary, out / "gold_vs_kl.png"):
        wrote.append(out / "gold_vs_kl.png")
    print(f"\n{text}\nWrote " + ", ".join(str(p) for p in wrote))
