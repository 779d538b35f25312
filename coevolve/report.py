"""`coevolve report RUN_DIR`: one HTML page with PNG plots, per iteration, read from the run directory
alone (DONE.json files, the trainers' logs, the E-step's scored samples), for users who are not on W&B.
Written to RUN/report/index.html. On a `coevolve experiment` folder (it holds experiment.json), the page
compares the arms instead: the referee's reward against sqrt(KL) per arm first, then every metric's table."""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Any

import datasets
from matplotlib import colormaps
from matplotlib.figure import Figure

from coevolve.core import rundir
from coevolve.core.steps import STEPS, position

NAN = float("nan")


def columns() -> list[tuple[str, str, str]]:
    """The per-iteration table, from the registry: (column, step, metric key as the step writes it in
    DONE.json). What the steps that only measure say comes first, the other steps' own numbers after."""
    return [
        (label, step.name, key)
        for step in sorted(STEPS.values(), key=lambda s: not s.measures)
        for label, key in step.columns
    ]


# What `before_after` compares between the first and the last evaluation.
EVAL_LINES = [
    ("gold reward", "eval/gold_mean"),
    ("judge reward", "eval/judge_mean"),
    ("RM score", "eval/rm_score_mean"),
    ("RM accuracy, original pairs", "eval/rm_acc_original"),
    ("RM accuracy, current policy's pairs", "eval/rm_acc_current"),
    ("win rate vs policy_0", "eval/win_rate_vs_initial"),
    ("KL to policy_0", "eval/kl_to_initial"),
    ("response tokens", "eval/length_mean"),
    ("answers cut at max_new_tokens", "eval/cut_share"),
]


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """The page and its plots in `out` (default RUN/report; elsewhere for a read-only run directory)."""
    run_dir = Path(run_dir)
    if (run_dir / "experiment.json").is_file():
        return write_experiment_report(run_dir)
    steps = rundir.finished_steps(run_dir)
    if not steps:
        raise rundir.RunDirError(f"{run_dir}: no finished step (no iter_*/<step>/DONE.json) to report on")
    done = {(k, name): d for k, name, d in steps}
    iterations = sorted({k for k, _, _ in steps if k > 0})
    out = Path(out) if out is not None else run_dir / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise rundir.RunDirError(f"{out}: cannot write the report there ({err.strerror}); give --out DIR") from None
    figures = {
        "evaluation.png": evaluation(done),
        "gold_vs_kl.png": gold_vs_kl(done),
        "policy_reward.png": policy_reward(done, iterations),
        "rm_accuracy.png": rm_accuracy(done, iterations),
        "pair_counts.png": pair_counts(done, iterations),
        "losses.png": losses(run_dir, steps),
        "response_lengths.png": response_lengths(run_dir, done, iterations),
        "wall_time.png": wall_time(steps),
    }
    plots = []
    for name, fig in figures.items():
        if fig is not None:
            fig.savefig(out / name, dpi=100, bbox_inches="tight")
            plots.append((name, CAPTIONS[name]))
    page = out / "index.html"
    page.write_text(
        render(run_dir, steps, done, iterations, plots, os.path.relpath(run_dir, out), side_by_side(run_dir, done))
    )
    return page


CAPTIONS = {
    "evaluation.png": "On held-out prompts (the evaluate step, iteration 0 included): the referee's reward (gold or judge) and "
    "the win rate over policy_0, with the RM's own score beside it as the proxy being optimised; KL to policy_0; "
    "and the RM's accuracy on the original pairs and on pairs of the current policy's answers (n pairs by each point).",
    "gold_vs_kl.png": "The referee's reward (solid, left axis) and the RM's score (dashed, right axis) of the policy against "
    "sqrt(KL to policy_0), each point labelled with its iteration: a proxy that keeps rising while the "
    "referee's reward falls is over-optimisation (Gao et al.).",
    "policy_reward.png": "The E-step as the RM sees it: each iteration's scores come from that iteration's RM, so they compare "
    "within an iteration only; right, the model-selection win rate of the chosen checkpoint.",
    "rm_accuracy.png": "The M-step: the RM before (rm_K-1) and after (rm_K) retraining, on held-out original pairs and on "
    "this iteration's pseudo pairs.",
    "pair_counts.png": "How many pairs each step built, kept and dropped.",
    "losses.png": "Training curves of every trainer in the run.",
    "response_lengths.png": "Length of the policy's sampled answers per iteration.",
    "wall_time.png": "Wall time per step and phase.",
}


def write_experiment_report(out_dir: Path) -> Path:
    from coevolve.experiment import metric_names, plot, plot_gold_vs_kl

    summary = json.loads((out_dir / "experiment.json").read_text())
    out = out_dir / "report"
    out.mkdir(exist_ok=True)
    figures = []
    if plot_gold_vs_kl(summary, out / "gold_vs_kl.png"):
        figures.append(
            (
                "gold_vs_kl.png",
                "Per arm: the referee's reward (solid, left axis) and the RM's own score of the policy "
                "(dashed, right axis) against sqrt(KL to policy_0); the numbers are iterations. A proxy that keeps "
                "rising while the reward falls is over-optimisation.",
            )
        )
    plot(summary, out / "metrics.png")
    figures.append(("metrics.png", "The first four metrics per iteration, mean ± std over seeds."))
    images = "".join(
        f"<figure><img src='{name}' alt='{html.escape(caption)}'><figcaption>{html.escape(caption)}</figcaption></figure>"
        for name, caption in figures
    )
    iters = range(summary["iterations"] + 1)
    tables = []
    for name in metric_names(summary):
        rows = "".join(
            f"<tr><td>{html.escape(arm)}</td>"
            + "".join(
                "<td>–</td>" if m is None else f"<td>{m:.3f} ± {sd:.3f}</td>"
                for m, sd in zip(row[name], row[f"{name}_std"])
            )
            + "</tr>"
            for arm, row in summary["arms"].items()
            if name in row
        )
        head = "".join(f"<th>iteration {k}</th>" for k in iters)
        tables.append(f"<h3>{html.escape(name)}</h3><table><tr><th>arm</th>{head}</tr>{rows}</table>")
    failed = (
        f"<p>Runs that did not finish: {html.escape(', '.join(summary['failed']))}</p>" if summary.get("failed") else ""
    )
    page = out / "index.html"
    page.write_text(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>coevolve experiment: {html.escape(out_dir.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}} img{{max-width:100%}}</style></head>
<body><h1>coevolve experiment {html.escape(str(out_dir.resolve()))}</h1>
<p>{summary["seeds"]} seed(s) per arm, {summary["iterations"]} iteration(s), task {html.escape(str(summary.get("task")))},
{html.escape(summary["device"])}, {summary["date"]}; mean ± std over seeds.</p>{failed}
{images}{"".join(tables)}
</body></html>
""")
    return page


def before_after(run_dir: Path, examples: int = 3, width: int = 200) -> str | None:
    """The first and the last evaluation of a run side by side, with a few held-out prompts' responses
    (policy_0's and the last policy's first sample); None when the run has no two evaluations."""
    evals = [(k, d) for k, name, d in rundir.finished_steps(run_dir) if name == "evaluate"]
    if len(evals) < 2:
        return None
    (k0, first), (k1, last) = evals[0], evals[-1]
    lines = [f"Evaluation on held-out prompts, iteration {k0} -> {k1}:"]
    for label, key in EVAL_LINES:
        if key in first["metrics"] and key in last["metrics"]:
            lines.append(f"  {label:<38} {first['metrics'][key]:8.3f} -> {last['metrics'][key]:8.3f}")

    def firsts(k: int) -> dict:
        ds = datasets.load_from_disk(str(rundir.step_dir(run_dir, k, "evaluate") / "score" / "responses"))
        return {r["prompt_id"]: r for r in ds if r["model"] == "policy_K" and r["sample"] == 0}

    referee = (
        "gold" if "eval/gold_mean" in last["metrics"] else "judge" if "eval/judge_mean" in last["metrics"] else "-"
    )
    if referee != "-":
        lines += ["", verdict(first["metrics"], last["metrics"], referee)]
    before, after = firsts(k0), firsts(k1)
    for pid in sorted(before)[:examples]:
        b, a = before[pid], after.get(pid)
        if a is None:
            continue
        lines += ["", f"  prompt: {b['prompt'][:width]}"]
        for tag, row in (("before", b), ("after", a)):
            text = " ".join(row["response"].split())
            lines.append(f"  {tag:<6} [{referee} {row['referee']:.2f}] {text[:width]}")
    return "\n".join(lines)


def verdict(first: dict, last: dict, referee: str) -> str:
    """One sentence on whether the policy got better by the referee's measure: its mean up by more than
    twice its standard error on these prompts, and a win rate over policy_0 above one half."""
    before, after = first[f"eval/{referee}_mean"], last[f"eval/{referee}_mean"]
    n = last["eval/prompts"]
    noise = 2 * last.get(f"eval/{referee}_std", 0.0) / math.sqrt(n)
    win = last["eval/win_rate_vs_initial"]
    said = f"{referee} {before:.3f} -> {after:.3f} (noise on {n} prompts: ±{noise:.3f}), win rate vs policy_0 {win:.3f}"
    if after - before > noise and win > 0.5:
        return f"Improved: {said}."
    why = []
    if after - before <= noise:
        why.append(f"the {referee} moved by less than its noise" if after > before else f"the {referee} fell")
    if win <= 0.5:
        why.append("the new policy does not win most comparisons with policy_0")
    if last.get("eval/cut_share", 0.0) >= 0.5:
        why.append(
            f"{last['eval/cut_share']:.0%} of the answers ran into sampling.max_new_tokens: what a prompt asks for past it cannot be met"
        )
    if last.get("eval/rm_score_mean", 0.0) > first.get("eval/rm_score_mean", 0.0) and after <= before:
        why.append(
            "the RM's score rose while the referee's did not: the policy learned what the RM rewards, not what the referee does"
        )
    return f"Not improved: {said}; " + "; ".join(why) + "."


def side_by_side(run_dir: Path, done: dict, examples: int = 3) -> str:
    """Per evaluated iteration, policy_0's and policy_K's first answer to the same held-out prompts (the
    first few by id, so every iteration shows the same ones), with the referee's and the RM's scores:
    what the numbers above mean in words."""
    sections = []
    for k in sorted(k for k, step in done if step == "evaluate" and k > 0):
        ds = datasets.load_from_disk(str(rundir.step_dir(run_dir, k, "evaluate") / "score" / "responses"))
        firsts = {(r["model"], r["prompt_id"]): r for r in ds if r["sample"] == 0}
        ids = sorted(pid for model, pid in firsts if model == "policy_0" and ("policy_K", pid) in firsts)[:examples]
        if not ids:
            continue

        def cell(row: dict) -> str:
            scores = (
                "" if math.isnan(row["referee"]) else f"referee {row['referee']:.2f}, "
            ) + f"RM {row['rm_score']:.2f}"
            return f"<td class='text'>{html.escape(row['response'])}<br><small>{scores}</small></td>"

        rows = "".join(
            f"<tr><td class='text'>{html.escape(firsts['policy_0', pid]['prompt'])}</td>"
            f"{cell(firsts['policy_0', pid])}{cell(firsts['policy_K', pid])}</tr>"
            for pid in ids
        )
        sections.append(
            f"<h3>Iteration {k}</h3><table><tr><th>held-out prompt</th><th>policy_0</th><th>policy_{k}</th></tr>{rows}</table>"
        )
    if not sections:
        return ""
    return (
        "<h2>Responses side by side</h2><p>The same held-out prompts answered by the starting policy and by each iteration's.</p>"
        + "".join(sections)
    )


def metric(done: dict, k: int, step: str, key: str) -> float:
    value = done.get((k, step), {}).get("metrics", {}).get(key, NAN)
    return float(value) if isinstance(value, (int, float)) else NAN


def series(done: dict, iterations: list[int], step: str, key: str) -> list[float]:
    return [metric(done, k, step, key) for k in iterations]


def _lines(ax, iterations: list[int], lines: dict[str, list[float]], styles: dict[str, str] | None = None) -> bool:
    styles = styles or {}
    drawn = False
    for label, ys in lines.items():
        if not all(math.isnan(y) for y in ys):
            ax.plot(iterations, ys, styles.get(label, "o-"), label=label)
            drawn = True
    ax.set_xlabel("iteration")
    ax.set_xticks(iterations)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    return drawn


def policy_reward(done: dict, iterations: list[int]) -> Figure | None:
    if not iterations:
        return None
    fig = Figure(figsize=(10, 3.5))
    left, right = fig.subplots(1, 2)
    # Each iteration's scores come from that iteration's RM, so compare within an iteration.
    drawn = _lines(
        left,
        iterations,
        {
            "samples of policy_K-1 (e-step score/mean)": series(done, iterations, "e-step", "score/mean"),
            "policy_K-1 on D_MS": series(done, iterations, "e-step", "select/baseline_score_mean"),
            "policy_K on D_MS": series(done, iterations, "e-step", "select/best_score_mean"),
        },
    )
    left.set_title("policy reward under the current RM")
    _lines(right, iterations, {"policy_K vs policy_K-1": series(done, iterations, "e-step", "select/best_win_rate")})
    right.set_title("model-selection win rate")
    right.set_ylim(0, 1)
    return fig if drawn else None


def evaluation(done: dict) -> Figure | None:
    """The evaluate step's measurements, iteration 0 included: the referee's reward first, the RM's
    score beside it as the proxy, KL, and the distribution-shift view with each point's n."""
    ks = sorted(k for k, step in done if step == "evaluate")
    if not ks:
        return None
    # Constrained: the proxy's axis on the right of the first panel must not run into the second.
    fig = Figure(figsize=(15, 3.5), layout="constrained")
    left, middle, right = fig.subplots(1, 3)
    _lines(
        left,
        ks,
        {
            "gold reward": series(done, ks, "evaluate", "eval/gold_mean"),
            "judge reward": series(done, ks, "evaluate", "eval/judge_mean"),
            "win rate vs policy_0": series(done, ks, "evaluate", "eval/win_rate_vs_initial"),
        },
    )
    left.set_title("policy on held-out prompts, by the referee")
    proxy = series(done, ks, "evaluate", "eval/rm_score_mean")
    if not all(math.isnan(y) for y in proxy):
        twin = left.twinx()
        twin.plot(ks, proxy, "s--", color="C3", markersize=4)
        twin.set_ylabel("RM score (proxy)", color="C3")
        twin.tick_params(axis="y", labelcolor="C3")
    _lines(middle, ks, {"KL(policy_K || policy_0)": series(done, ks, "evaluate", "eval/kl_to_initial")})
    middle.set_title("how far the policy moved")
    accuracies = {
        "original held-out pairs": ("eval/rm_acc_original", "eval/original_pairs"),
        "current policy's pairs": ("eval/rm_acc_current", "eval/fresh_pairs"),
    }
    _lines(right, ks, {label: series(done, ks, "evaluate", key) for label, (key, _) in accuracies.items()})
    for key, n_key in accuracies.values():
        for k, acc, n in zip(ks, series(done, ks, "evaluate", key), series(done, ks, "evaluate", n_key)):
            if not (math.isnan(acc) or math.isnan(n)):
                right.annotate(f"n={int(n)}", (k, acc), textcoords="offset points", xytext=(3, -10), fontsize=7)
    right.set_title("RM accuracy against the referee")
    right.set_ylim(0, 1.05)
    return fig


def gold_vs_kl(done: dict) -> Figure | None:
    """Gao et al.'s picture for one run: the referee's reward and the RM's score against sqrt(KL)."""
    ks = sorted(k for k, step in done if step == "evaluate")
    kl = series(done, ks, "evaluate", "eval/kl_to_initial")
    referees = [
        (label, series(done, ks, "evaluate", key))
        for label, key in (("gold reward", "eval/gold_mean"), ("judge reward", "eval/judge_mean"))
    ]
    referee = next(((label, ys) for label, ys in referees if not all(math.isnan(y) for y in ys)), None)
    if referee is None or all(math.isnan(x) for x in kl):
        return None
    xs = [math.sqrt(x) for x in kl]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot(xs, referee[1], "o-", label=referee[0])
    for k, x, y in zip(ks, xs, referee[1]):
        ax.annotate(str(k), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("sqrt(KL(policy_K || policy_0))")
    ax.set_ylabel(referee[0])
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(xs, series(done, ks, "evaluate", "eval/rm_score_mean"), "s--", color="C3", markersize=4)
    twin.set_ylabel("RM score (proxy)", color="C3")
    ax.set_title("reward against distance from policy_0")
    return fig


def rm_accuracy(done: dict, iterations: list[int]) -> Figure | None:
    if not any((k, "m-step") in done for k in iterations):
        return None
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    _lines(
        ax,
        iterations,
        {
            "held-out original pairs, rm_K": series(done, iterations, "m-step", "rm_after/accuracy_heldout"),
            "held-out original pairs, rm_K-1": series(done, iterations, "m-step", "rm_before/accuracy_heldout"),
            "fresh policy pairs, rm_K": series(done, iterations, "m-step", "rm_after/accuracy_pseudo"),
            "fresh policy pairs, rm_K-1": series(done, iterations, "m-step", "rm_before/accuracy_pseudo"),
            "training mix, rm_K": series(done, iterations, "m-step", "rm_after/accuracy_train_mix"),
        },
        {
            "held-out original pairs, rm_K-1": "o--",
            "fresh policy pairs, rm_K-1": "s--",
            "fresh policy pairs, rm_K": "s-",
        },
    )
    ax.set_title("RM accuracy: original vs current distribution")
    ax.set_ylim(0, 1.05)
    return fig


def pair_counts(done: dict, iterations: list[int]) -> Figure | None:
    if not iterations:
        return None
    bars = {
        "e-step pairs": series(done, iterations, "e-step", "pairs/count"),
        "unpaired prompts": series(done, iterations, "e-step", "pairs/unpaired"),
        "pseudo pairs kept": series(done, iterations, "m-step", "pseudo/kept"),
        "pseudo pairs dropped": series(done, iterations, "m-step", "pseudo/dropped"),
    }
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    width = 0.8 / len(bars)
    for i, (label, ys) in enumerate(bars.items()):
        ax.bar(
            [k - 0.4 + width * (i + 0.5) for k in iterations],
            [0 if math.isnan(y) else y for y in ys],
            width,
            label=label,
        )
    ax.set_xticks(iterations)
    ax.set_xlabel("iteration")
    ax.set_title("pair counts")
    ax.legend(fontsize=8)
    return fig


def losses(run_dir: Path, steps: list) -> Figure | None:
    """Training loss curves from each trainer's log, one panel per kind of training."""
    panels: dict[str, dict[str, tuple[list, list]]] = {}
    titles = {
        "sft-warmup": "SFT loss",
        "rm-init": "RM loss (rm-init)",
        "e-step": "DPO loss",
        "m-step": "RM loss (m-step)",
    }
    for k, name, _ in steps:
        log = rundir.step_dir(run_dir, k, name) / "train" / "train_log.jsonl"
        if name not in titles or not log.exists():
            continue
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "loss" in r and "step" in r]
        if rows:
            panels.setdefault(name, {})[f"iter {k}"] = ([r["step"] for r in rows], [r["loss"] for r in rows])
    if not panels:
        return None
    fig = Figure(figsize=(4 * len(panels), 3.5))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, curves) in zip(axes, sorted(panels.items(), key=lambda p: position(p[0]))):
        for label, (xs, ys) in curves.items():
            ax.plot(xs, ys, label=label)
        ax.set_title(titles[name])
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def response_lengths(run_dir: Path, done: dict, iterations: list[int]) -> Figure | None:
    """Tokens per sampled response (the e-step's scored samples), and in the chosen vs rejected ones."""
    shown, lengths = [], []
    for k in iterations:
        samples = done.get((k, "e-step"), {}).get("outputs", {}).get("samples")
        if samples and (run_dir / samples).exists():
            shown.append(k)
            lengths.append(datasets.load_from_disk(str(run_dir / samples))["num_tokens"])
    if not shown:
        return None
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.boxplot(lengths, positions=shown, widths=0.5)
    _lines(
        ax,
        shown,
        {
            "chosen (mean)": series(done, shown, "e-step", "pairs/chosen_tokens_mean"),
            "rejected (mean)": series(done, shown, "e-step", "pairs/rejected_tokens_mean"),
        },
    )
    ax.set_ylabel("tokens")
    ax.set_title("response lengths (all samples; chosen vs rejected)")
    return fig


def wall_time(steps: list) -> Figure:
    fig = Figure(figsize=(8, 0.4 * len(steps) + 1.5))
    ax = fig.subplots()
    colors: dict[str, Any] = {}
    palette = colormaps["tab20"]
    labels = [f"iter{k} {name}" for k, name, _ in steps]
    for row, (_, _, d) in enumerate(steps):
        left = 0.0
        for phase, seconds in d.get("timings", {}).items():
            first = phase not in colors
            color = colors.setdefault(phase, palette(len(colors) % palette.N))
            ax.barh(row, seconds, left=left, color=color, label=phase if first else None)
            left += seconds
    ax.set_yticks(range(len(steps)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title("wall time per phase")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    return fig


def _fmt(value) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.3g}"
    return html.escape(str(value))


def render(
    run_dir: Path,
    steps: list,
    done: dict,
    iterations: list[int],
    plots: list[tuple[str, str]],
    to_run: str = "..",
    responses: str = "",
) -> str:
    table = columns()
    head = "".join(f"<th>{html.escape(c)}</th>" for c, _, _ in table)
    rows = ([0] if any(k == 0 for k, _ in done) else []) + iterations
    body = "".join(
        f"<tr><td>{k}</td>" + "".join(f"<td>{_fmt(metric(done, k, s, key))}</td>" for _, s, key in table) + "</tr>"
        for k in rows
    )
    step_rows = "".join(
        f"<tr><td>{k}</td><td><a href='{to_run}/{rundir.step_dir(Path(), k, name)}/log.txt'>{html.escape(name)}</a></td>"
        f"<td>{_fmt(sum(d.get('timings', {}).values()))}</td><td>{'stop' if d.get('stop') else ''}</td>"
        f"<td>{html.escape(', '.join(f'{key}: {path}' for key, path in d.get('outputs', {}).items()))}</td></tr>"
        for k, name, d in steps
    )
    images = "".join(
        f"<figure><img src='{name}' alt='{html.escape(caption)}'><figcaption>{html.escape(caption)}</figcaption></figure>"
        for name, caption in plots
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>coevolve report: {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}} td.text{{text-align:left;max-width:40em}} img{{max-width:100%}}</style></head>
<body><h1>coevolve run {html.escape(str(run_dir.resolve()))}</h1>
<h2>Per iteration</h2>
<p>The "eval" columns are the evaluate step's, on held-out prompts: the referee's reward (gold or judge) comes first,
the RM's own score of the policy (the proxy it is optimised against) after it. Policy scores are under that iteration's
RM (rm_K-1); RM accuracy "before" is rm_K-1, "after" is rm_K, on held-out original pairs (the original distribution) and
on this iteration's pseudo pairs (the policy's current distribution).</p>
<table><tr><th>iteration</th>{head}</tr>{body}</table>
{images}
{responses}
<h2>Steps</h2>
<table><tr><th>iteration</th><th>step (log)</th><th>wall time (s)</th><th>stop</th><th>outputs</th></tr>{step_rows}</table>
</body></html>
"""
