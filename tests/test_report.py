"""`coevolve report RUN_DIR`: an HTML page and PNG plots, from the run directory alone."""
from __future__ import annotations

import re

import numpy as np
import pytest
from matplotlib.image import imread
from tiny_run import tiny_run  # noqa: F401  (the fixture)

from coevolve.cli import main
from coevolve.core import rundir

PLOTS = {"policy_reward.png", "rm_accuracy.png", "pair_counts.png", "losses.png", "response_lengths.png", "wall_time.png", "evaluation.png"}


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
    assert headers.index("eval: gold reward") < headers.index("eval: RM score (proxy)") < headers.index("policy score (samples)")
    assert "" not in headers
    gold_0 = rundir.read_done(tiny_run, 0, "evaluate")["metrics"]["eval/gold_mean"]
    assert re.search(rf"<tr><td>0</td><td>{gold_0:.3g}</td>", text)  # the starting policy has its row


def test_report_of_a_run_with_nothing_finished_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["report", str(tmp_path)])
    assert stop.value.code == 2
    assert "no finished step" in capsys.readouterr().err
