"""`make demo`, run as the Makefile runs it: the loop must visibly work on the tiny models, ending with
the before/after table and a verdict, and without the policy collapsing into empty answers."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import datasets
import pytest
from conftest import ROOT


def demo_command() -> tuple[dict[str, str], list[str]]:
    """The environment and the `coevolve run` arguments of the Makefile's demo recipe, so this test runs
    what a newcomer runs and cannot drift from it."""
    recipe = re.search(r"^demo:.*\n\t(.*coevolve run .*)$", (ROOT / "Makefile").read_text(), re.M)
    assert recipe, "the Makefile's demo target no longer runs `coevolve run`"
    words = shlex.split(recipe.group(1))
    env = dict(w.split("=", 1) for w in words[: next(i for i, w in enumerate(words) if "=" not in w)])
    args = words[words.index("run") + 1 :]
    return env, args


def done(run, k: int, step: str) -> dict:
    return json.loads((run / f"iter_{k}" / step / "DONE.json").read_text())


@pytest.mark.slow
@pytest.mark.integration
def test_make_demo_improves_the_policy_and_says_so(tmp_path):
    env, args = demo_command()
    run = tmp_path / "demo"
    args = [str(run) if a == "$(RUN)" else a for a in args]
    out = subprocess.run(
        [sys.executable, "-m", "coevolve", "run", *args],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    assert "Evaluation on held-out prompts, iteration 0 -> 2:" in out.stdout
    assert re.search(r"^  gold reward +[0-9.]+ -> +[0-9.]+$", out.stdout, re.M)
    assert re.search(r"^Improved: gold ", out.stdout, re.M), out.stdout[-2000:]

    # The RM starts out better than chance on held-out "human" pairs, so the E-step has a signal to follow.
    assert done(run, 0, "rm-init")["metrics"]["rm_after/accuracy_heldout"] > 0.7
    # The policy still answers: few empty samples, in training and on held-out prompts.
    assert done(run, 2, "e-step")["metrics"]["generate/empty_share"] < 0.1
    answers = datasets.load_from_disk(str(run / "iter_2/evaluate/score/responses")).filter(
        lambda r: r["model"] == "policy_K"
    )
    assert sum(not r for r in answers["response"]) / len(answers) < 0.1
    # "policy_K beats policy_K-1" is right more often than not, so the M-step learns from the truth.
    for k in (1, 2):
        assert done(run, k, "m-step")["metrics"]["pseudo/gold_label_acc"] > 0.5
    gold = [done(run, k, "evaluate")["metrics"]["eval/gold_mean"] for k in (0, 2)]
    assert gold[1] > gold[0]
