"""An iteration in a few lines of markdown, for the Prefect UI's artifact: the numbers that say whether
the run is going well first (the referee's reward and win rate, the RM's score as the proxy, KL, the
RM's accuracy on both distributions, the pseudo pairs kept, the stop decision), then where the report
and the W&B runs are, then every metric of the iteration's steps. Read from the run directory alone."""

from __future__ import annotations

from pathlib import Path

from coevolve.core import rundir

# (label, metric key, key of its count n): the evaluate step's, on held-out prompts.
HEADLINE = [
    ("gold reward", "eval/gold_mean", None),
    ("judge reward", "eval/judge_mean", None),
    ("win rate vs policy_0", "eval/win_rate_vs_initial", None),
    ("RM score (the proxy)", "eval/rm_score_mean", None),
    ("KL to policy_0", "eval/kl_to_initial", None),
    ("RM accuracy, current policy's pairs", "eval/rm_acc_current", "eval/fresh_pairs"),
    ("RM accuracy, original pairs", "eval/rm_acc_original", "eval/original_pairs"),
]


def iteration_summary(run: Path, k: int, tau: float, report: Path | None) -> str:
    done = {name: d for i, name, d in rundir.finished_steps(run) if i == k}
    start = rundir.read_done(run, 0, "evaluate")["metrics"] if rundir.is_done(run, 0, "evaluate") else {}
    lines = [f"# Iteration {k} of {run.name}", ""]
    evaluated = done.get("evaluate", {}).get("metrics")
    if evaluated:
        lines += ["On held-out prompts (the evaluate step):", "", f"| | iteration {k} | iteration 0 |", "|---|---|---|"]
        for label, key, n_key in HEADLINE:
            if key in evaluated:
                lines.append(f"| {label} | {_value(evaluated, key, n_key)} | {_value(start, key, n_key)} |")
    else:
        lines += ["No held-out evaluation in this run (`steps.evaluate=true` adds one)."]
    lines.append("")
    if "m-step" in done:
        m = done["m-step"]["metrics"]
        lines.append(
            f"- **pseudo pairs** (M-step): {m.get('pseudo/kept', '–')} kept, {m.get('pseudo/dropped', '–')} dropped"
        )
    if "e-step" in done:
        e = done["e-step"]
        lines.append(f"- **E-step pairs**: {e['metrics'].get('pairs/count', '–')}")
        win = e["metrics"].get("select/best_win_rate")
        against = f" (best checkpoint's win rate {_fmt(win)} vs tau {tau})" if win is not None else ""
        lines.append(
            f"- **stop**: {'yes, the run stops with the previous policy' if e['stop'] else 'no, the run goes on'}{against}"
        )
    lines += ["", "## Where to look", ""]
    lines.append(f"- report: `{report}`" if report else f"- report: `coevolve report {run}`")
    for name, d in done.items():
        tracked = d.get("wandb")
        if tracked:
            lines.append(
                f"- W&B {name}: "
                + (
                    f"[{tracked['run']}]({tracked['url']})"
                    if "url" in tracked
                    else f"`{tracked['run']}`, offline in `{tracked['dir']}` (`wandb sync` uploads it)"
                )
            )
    if not any(d.get("wandb") for d in done.values()):
        lines.append("- W&B: not tracked (tracking disabled)")
    lines += ["", "## Every metric of the iteration's steps", "", "| step | metric | value |", "|---|---|---|"]
    for name, d in done.items():
        lines += [
            f"| {name} | {key} | {_fmt(value)} |"
            for key, value in d["metrics"].items()
            if not isinstance(value, (list, dict))
        ]
        lines.append(f"| {name} | seconds | {_fmt(float(sum(d['timings'].values())))} |")
    return "\n".join(lines) + "\n"


def _value(metrics: dict, key: str, n_key: str | None) -> str:
    if key not in metrics:
        return "–"
    return _fmt(metrics[key]) + (f" (n={metrics[n_key]})" if n_key and n_key in metrics else "")


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
