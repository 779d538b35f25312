"""The iteration summary the Prefect flow posts as a markdown artifact (flows/summary.py): the numbers
that matter first, each the value its step recorded, then where the report and the W&B runs are."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from coevolve.flows.summary import iteration_summary
from tiny_run import tiny_run  # noqa: F401  (the fixture)

from coevolve.core import rundir


def row(text: str, label: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")[1:]]


@pytest.mark.slow
def test_the_iteration_summary_leads_with_the_numbers_that_matter(tiny_run):
    page = tiny_run / "report" / "index.html"
    text = iteration_summary(tiny_run, 2, 0.0, page)
    now = rundir.read_done(tiny_run, 2, "evaluate")["metrics"]
    start = rundir.read_done(tiny_run, 0, "evaluate")["metrics"]
    # The referee's verdict comes before the RM's own score of the policy.
    assert (
        text.index("| gold reward |") < text.index("| win rate vs policy_0 |") < text.index("| RM score (the proxy) |")
    )
    assert row(text, "gold reward") == [f"{now['eval/gold_mean']:.4g}", f"{start['eval/gold_mean']:.4g}"]
    assert row(text, "win rate vs policy_0")[0] == f"{now['eval/win_rate_vs_initial']:.4g}"
    assert row(text, "RM score (the proxy)")[0] == f"{now['eval/rm_score_mean']:.4g}"
    assert row(text, "KL to policy_0")[0] == f"{now['eval/kl_to_initial']:.4g}"
    assert (
        row(text, "RM accuracy, current policy's pairs")[0]
        == f"{now['eval/rm_acc_current']:.4g} (n={now['eval/fresh_pairs']})"
    )
    assert (
        row(text, "RM accuracy, original pairs")[0]
        == f"{now['eval/rm_acc_original']:.4g} (n={now['eval/original_pairs']})"
    )
    m = rundir.read_done(tiny_run, 2, "m-step")["metrics"]
    assert f"{m['pseudo/kept']} kept, {m['pseudo/dropped']} dropped" in text
    e = rundir.read_done(tiny_run, 2, "e-step")
    assert f"**stop**: {'yes' if e['stop'] else 'no'}" in text
    assert f"best checkpoint's win rate {e['metrics']['select/best_win_rate']:.4g} vs tau 0.0" in text
    assert f"- report: `{page}`" in text
    # Each step's W&B run, offline here: its name and its files, which exist.
    for step in ("e-step", "m-step", "evaluate"):
        found = re.search(rf"- W&B {step}: `([^`]+)`, offline in `([^`]+)`", text)
        assert found, text
        assert found.group(1) == rundir.read_done(tiny_run, 2, step)["wandb"]["run"] and Path(found.group(2)).exists()
    # Everything else is still there, after the headline.
    assert text.index("## Every metric") > text.index("## Where to look")
    assert f"| e-step | pairs/count | {e['metrics']['pairs/count']} |" in text
