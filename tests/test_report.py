"""`coevolve report RUN_DIR`: an HTML page and PNG plots, from the run directory alone."""

from __future__ import annotations

import html
import math
import re

import datasets
import numpy as np
import pytest
from matplotlib.image import imread
from tiny_run import tiny_run  # noqa: F401  (the fixture)

from coevolve.cli import main
from coevolve.core import rundir
from coevolve.report import verdict

PLOTS = {
    "gold_vs_kl.png",
    "policy_reward.png",
    "rm_accuracy.png",
    "pair_counts.png",
    "losses.png",
    "response_lengths.png",
    "wall_time.png",
    "evaluation.png",
}


@pytest.mark.slow
def test_report_page_shows_every_iteration_and_its_plots(tiny_run, capsys):
    main(["report", str(tiny_run)])
    page = tiny_run / "report" / "index.html"
    assert capsys.readouterr().out.strip() == str(page)
    text = page.read_text()
    assert set(re.findall(r"<img src='([^']+)'", text)) == PLOTS
    for name in PLOTS:
        image = imread(page.parent / name)
        # A real plot: more than a blank canvas.
        assert image.shape[0] > 200 and len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 10, name
    for k in (1, 2):
        pairs = rundir.read_done(tiny_run, k, "e-step")["metrics"]["pairs/count"]
        kept = rundir.read_done(tiny_run, k, "m-step")["metrics"]["pseudo/kept"]
        row = re.search(rf"<tr><td>{k}</td>(.*?)</tr>", text).group(1)
        assert f"<td>{pairs}</td>" in row and f"<td>{kept}</td>" in row, row
    assert "../iter_2/m-step/log.txt" in text
    # The report leads with what the referee says, not with the RM's opinion: the held-out evaluation is the
    # first figure and the first columns, the RM's score after the gold and labelled as the proxy.
    assert re.findall(r"<img src='([^']+)'", text)[0] == "evaluation.png"
    captions = re.findall(r"<figcaption>([^<]+)</figcaption>", text)
    assert len(captions) == len(PLOTS) and not any(c.endswith(".png") for c in captions)
    headers = re.findall(r"<th>([^<]*)</th>", text)
    assert (
        headers.index("eval: gold reward")
        < headers.index("eval: RM score (proxy)")
        < headers.index("policy score (samples)")
    )
    assert "" not in headers
    gold_0 = rundir.read_done(tiny_run, 0, "evaluate")["metrics"]["eval/gold_mean"]
    assert re.search(rf"<tr><td>0</td><td>{gold_0:.3g}</td>", text)  # the starting policy has its row


def test_report_of_a_run_with_nothing_finished_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["report", str(tmp_path)])
    assert stop.value.code == 2
    assert "no finished step" in capsys.readouterr().err


@pytest.mark.slow
def test_report_shows_policy_0_and_policy_k_side_by_side(tiny_run):
    from coevolve.report import write_report

    text = write_report(tiny_run).read_text()
    section = text[text.index("<h2>Responses side by side</h2>") : text.index("<h2>Steps</h2>")]
    for k in (1, 2):
        ds = datasets.load_from_disk(str(rundir.step_dir(tiny_run, k, "evaluate") / "score" / "responses"))
        firsts = {(r["model"], r["prompt_id"]): r for r in ds if r["sample"] == 0}
        pid = min(p for m, p in firsts if m == "policy_0")
        table = section[section.index(f"<h3>Iteration {k}</h3>") :].split("</table>")[0]
        assert f"<th>policy_{k}</th>" in table
        # One row: the prompt, then policy_0's answer and its gold, then policy_K's and its gold.
        row = re.search(
            rf"<tr><td class='text'>{re.escape(html.escape(firsts['policy_0', pid]['prompt']))}</td>(.*?)</tr>", table
        ).group(1)
        before, after = row.split("</td>")[:2]
        for cell, model in ((before, "policy_0"), (after, "policy_K")):
            r = firsts[model, pid]
            assert (
                html.escape(r["response"]) in cell and f"referee {r['referee']:.2f}, RM {r['rm_score']:.2f}" in cell
            ), (model, cell)


@pytest.mark.slow
def test_gold_against_sqrt_kl_is_plotted_with_the_proxy_beside_it(tiny_run):
    from coevolve.report import gold_vs_kl

    done = {(k, name): d for k, name, d in rundir.finished_steps(tiny_run)}
    evaluated = [done[k, "evaluate"]["metrics"] for k in (0, 1, 2)]
    ax, twin = gold_vs_kl(done).axes
    assert ax.lines[0].get_xydata().tolist() == [
        [math.sqrt(m["eval/kl_to_initial"]), m["eval/gold_mean"]] for m in evaluated
    ]
    assert twin.lines[0].get_ydata().tolist() == [m["eval/rm_score_mean"] for m in evaluated]
    assert [t.get_text() for t in ax.texts] == ["0", "1", "2"]


@pytest.mark.parametrize(
    "after, win, rm_after, expected",
    [
        (0.60, 0.62, 1.0, "Improved: gold 0.400 -> 0.600 (noise on 100 prompts: ±0.060), win rate vs policy_0 0.620."),
        (
            0.43,
            0.55,
            1.0,
            "Not improved: gold 0.400 -> 0.430 (noise on 100 prompts: ±0.060), win rate vs policy_0 0.550; "
            "the gold moved by less than its noise.",
        ),
        (
            0.30,
            0.40,
            2.0,
            "Not improved: gold 0.400 -> 0.300 (noise on 100 prompts: ±0.060), win rate vs policy_0 0.400; the gold fell; "
            "the new policy does not win most comparisons with policy_0; the RM's score rose while the referee's did not: "
            "the policy learned what the RM rewards, not what the referee does.",
        ),
        (
            0.43,
            0.45,
            0.4,
            "Not improved: gold 0.400 -> 0.430 (noise on 100 prompts: ±0.060), win rate vs policy_0 0.450; "
            "the gold moved by less than its noise; the new policy does not win most comparisons with policy_0; "
            "90% of the answers ran into sampling.max_new_tokens: what a prompt asks for past it cannot be met.",
        ),
    ],
)
def test_the_run_ends_by_saying_whether_the_policy_improved(after, win, rm_after, expected):
    first = {"eval/gold_mean": 0.4, "eval/rm_score_mean": 0.5, "eval/win_rate_vs_initial": 0.5, "eval/prompts": 100}
    last = {
        "eval/gold_mean": after,
        "eval/gold_std": 0.3,
        "eval/rm_score_mean": rm_after,
        "eval/win_rate_vs_initial": win,
        "eval/prompts": 100,
        "eval/cut_share": 0.9 if "max_new_tokens" in expected else 0.1,
    }
    assert verdict(first, last, "gold") == expected
