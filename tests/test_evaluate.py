"""The evaluate step, the gold reward as an RM (the oracle arm), and `coevolve experiment`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import datasets
import numpy as np
import pytest
from coevolve.data.tasks import load_task
from conftest import FAST, ROOT, TINY
from matplotlib.image import imread

from coevolve.cli import main, run_step
from coevolve.core import divergence, rundir
from coevolve.core.config import ConfigError, load_config, prepare_run
from coevolve.core.divergence import batches
from coevolve.core.models import load_rm
from coevolve.core.rollout import score
from coevolve.core.scoring import RewardScorer, pairwise_accuracy
from coevolve.experiment import ARMS, arm_overrides, collect, write_outputs


def test_pairwise_accuracy_by_hand():
    rm_a, rm_b = [0.9, 0.1, 0.5, 0.3, 0.7], [0.2, 0.4, 0.5, 0.8, 0.6]
    gold_a, gold_b = [1.0, 0.0, 0.7, 0.2, 0.5], [0.5, 1.0, 0.1, 0.2, 0.9]
    # Pair 1: both prefer a (1). Pair 2: both prefer b (1). Pair 3: RM tie (0.5). Pair 4: gold tie,
    # left out. Pair 5: gold prefers b, the RM a (0). 2.5 right of 4 counted.
    assert pairwise_accuracy(rm_a, rm_b, gold_a, gold_b) == (pytest.approx(2.5 / 4), 4)


def _by_hand(rm_path, cfg, prompts, a, b, gold_a, gold_b) -> float:
    model, tok = load_rm(rm_path, cfg)
    scorer = RewardScorer(model, tok)
    sa, sb = scorer.score(prompts, a), scorer.score(prompts, b)
    right = counted = 0.0
    for x, y, ga, gb in zip(sa, sb, gold_a, gold_b):
        if ga == gb:
            continue
        counted += 1
        right += 0.5 if x == y else float((x > y) == (ga > gb))
    return right / counted


@pytest.fixture(scope="module")
def evaluated(iterated_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("evaluated") / "run"
    shutil.copytree(iterated_run, run)
    cfg = prepare_run(None, [], run)
    for k in (0, 1):
        run_step("evaluate", run, k, cfg)
    return run, cfg


def test_evaluate_rm_accuracy_equals_a_hand_computation(evaluated):
    run, cfg = evaluated
    task = load_task("toy")
    metrics = rundir.read_done(run, 1, "evaluate")["metrics"]
    rm = run / rundir.read_done(run, 1, "evaluate")["inputs"]["rm"]
    assert rm == run / rundir.read_done(run, 1, "m-step")["outputs"]["rm"]

    pairs = datasets.load_from_disk(str(run / "iter_0/init/data/pairs")).filter(lambda r: r["split"] == "heldout")
    gold_c = [task.gold(p, r) for p, r in zip(pairs["prompt"], pairs["chosen"])]
    gold_r = [task.gold(p, r) for p, r in zip(pairs["prompt"], pairs["rejected"])]
    expected = _by_hand(rm, cfg, pairs["prompt"], pairs["chosen"], pairs["rejected"], gold_c, gold_r)
    assert metrics["eval/rm_acc_original"] == pytest.approx(expected)
    assert metrics["eval/original_pairs"] == sum(c != r for c, r in zip(gold_c, gold_r))

    fresh = datasets.load_from_disk(str(run / "iter_1/evaluate/measure/fresh_pairs"))
    gold_a = [task.gold(p, r) for p, r in zip(fresh["prompt"], fresh["a"])]
    gold_b = [task.gold(p, r) for p, r in zip(fresh["prompt"], fresh["b"])]
    assert gold_a == fresh["referee_a"] and gold_b == fresh["referee_b"]
    assert metrics["eval/rm_acc_current"] == pytest.approx(
        _by_hand(rm, cfg, fresh["prompt"], fresh["a"], fresh["b"], gold_a, gold_b)
    )
    assert all(a != b for a, b in zip(fresh["a"], fresh["b"]))


def test_evaluate_measures_the_policy_against_policy_0(evaluated):
    run, cfg = evaluated
    task = load_task("toy")
    m0 = rundir.read_done(run, 0, "evaluate")["metrics"]
    m1 = rundir.read_done(run, 1, "evaluate")["metrics"]
    # Iteration 0 compares policy_0 with itself.
    assert m0["eval/kl_to_initial"] == 0 and m0["eval/win_rate_vs_initial"] == 0.5
    assert m1["eval/kl_to_initial"] > 0 and 0 <= m1["eval/win_rate_vs_initial"] <= 1
    responses = datasets.load_from_disk(str(run / "iter_1/evaluate/score/responses"))
    first = responses.filter(lambda r: r["model"] == "policy_K" and r["sample"] == 0)
    assert len(first) == m1["eval/prompts"] == 24
    assert m1["eval/gold_mean"] == pytest.approx(
        sum(task.gold(p, r) for p, r in zip(first["prompt"], first["response"])) / len(first)
    )
    assert m1["eval/length_mean"] == pytest.approx(sum(first["num_tokens"]) / len(first))
    cut = [n >= cfg.sampling.max_new_tokens for n in first["num_tokens"]]
    assert m1["eval/cut_share"] == pytest.approx(sum(cut) / len(cut)) and 0 < sum(cut) < len(cut)
    eval_prompts = datasets.load_from_disk(str(run / "iter_0/init/data/prompts")).filter(lambda r: r["split"] == "eval")
    assert set(first["prompt_id"]) == set(eval_prompts["prompt_id"])


def test_kl_batches_hold_at_most_the_logit_budget():
    """The KL batches' logits stay within the budget (256 rows of 400 tokens over a 49K vocabulary asked
    for 15 GiB at once on the GPU), keep every row once, and take as many rows as fit."""
    lengths = [400, 380, 12, 390, 20, 395] * 50
    plan = batches(lengths, batch_size=256, vocab_size=49152, budget=2**28)
    assert sorted(i for idx in plan for i in idx) == list(range(len(lengths)))
    assert all(len(idx) * max(lengths[i] for i in idx) * 49152 <= 2**28 for idx in plan)
    assert (
        max(len(idx) for idx in plan) == 100
    )  # the short rows: 2**28 // (20 * 49152) = 273, capped by the 100 there are
    assert batches([5000], 8, 49152, budget=2**20) == [[0]]  # one row over the budget still goes, alone


def test_kl_is_the_same_one_row_at_a_time(evaluated, monkeypatch):
    run, cfg = evaluated
    first = datasets.load_from_disk(str(run / "iter_1/evaluate/kl"))
    inputs = rundir.read_done(run, 1, "evaluate")["inputs"]
    policy, initial = run / inputs["policy"], run / inputs["policy_0"]
    monkeypatch.setattr(divergence, "LOGIT_BUDGET", 1)
    kl = divergence.response_kl(cfg, policy, initial, list(first["prompt"]), list(first["response"]))
    assert kl == pytest.approx(first["kl"], rel=1e-4, abs=1e-5)


def test_gold_reward_stands_in_for_the_rm(tmp_path):
    oracle = ["rm.gold=true", "rm.tiny=null", "steps.rm_init=false", "steps.m_step=false"]
    cfg = prepare_run(str(TINY), [*FAST, *oracle], tmp_path / "run")
    run_step("init", tmp_path / "run", 0, cfg)
    rm = rundir.latest_output(tmp_path / "run", "rm")
    task = load_task("toy")
    prompt = task.prompts(1, 0)[0]
    responses = [task.respond(prompt, frozenset(), __import__("random").Random(0)), "cat cat cat"]
    assert score(cfg, rm, [prompt] * 2, responses) == [task.gold(prompt, r) for r in responses]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["rm={gold: true}"], "rm.gold: the gold reward cannot be trained"),
        (
            [
                "rm={gold: true}",
                "steps.rm_init=false",
                "steps.m_step=false",
                "data.task=null",
                "data.prompts.path=x.jsonl",
            ],
            "rm.gold: the gold reward needs a sandbox task",
        ),
        (["policy.gold=true", "policy.tiny=null"], "policy: gold and from_policy are RM-only"),
        (
            ["rm.from_policy=true", "rm.tiny=null", "steps.rm_init=false"],
            "rm.from_policy: the RM is made from the policy by rm-init",
        ),
        (["steps.evaluate=true"], "steps.evaluate: needs held-out prompts"),
        (["rm={tiny: {}}", "steps.rm_init=false"], "data.pair_source: 'policy' needs"),
    ],
)
def test_gold_and_evaluate_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)


@pytest.mark.slow
def test_experiment_writes_its_table_and_plot(tmp_path, monkeypatch):
    out = tmp_path / "exp"
    cmd = [
        sys.executable,
        "-m",
        "coevolve",
        "experiment",
        "--config",
        str(TINY),
        "--run-dir",
        str(out),
        "--arms",
        "frozen-rm,mutual-taught,oracle",
        "--seeds",
        "1",
        "--parallel",
        "3",
        *FAST,
        "iterations=1",
        "tracking.mode=disabled",
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "experiment.json").read_text())
    arms = summary["arms"]
    assert set(arms) == {"frozen-rm", "mutual-taught", "oracle"} and summary["seeds"] == 1 and summary["task"] == "toy"
    for row in arms.values():
        assert len(row["gold"]) == len(row["rm_acc_current"]) == 2 and None not in row["gold"]
        assert row["gold_std"] == [0.0, 0.0]
    # The gold reward agrees with itself; a frozen RM judges the original pairs alike at every iteration.
    assert arms["oracle"]["rm_acc_current"] == [1.0, 1.0] and arms["oracle"]["rm_acc_original"] == [1.0, 1.0]
    assert arms["frozen-rm"]["rm_acc_original"][0] == arms["frozen-rm"]["rm_acc_original"][1]
    # Same seed, same iteration-0 policy: every arm starts from the same measurement.
    assert arms["frozen-rm"]["gold"][0] == arms["mutual-taught"]["gold"][0] == arms["oracle"]["gold"][0]
    # frozen-rm and mutual-taught differ only from iteration 1 on: their iteration 0 ran once, and was
    # copied into both; the oracle (no trained RM) has its own.
    assert [p.name for p in (out / ".start").iterdir()] == ["seed_0-frozen-rm"]
    # Shared files are hard links: one inode in both runs, another in the oracle's.
    inode = {
        arm: (out / arm / "seed_0" / "iter_0" / "sft-warmup" / "train" / "policy" / "model.safetensors").stat().st_ino
        for arm in arms
    }
    assert inode["frozen-rm"] == inode["mutual-taught"] != inode["oracle"]
    assert (out / "mutual-taught" / "seed_0" / "iter_1" / "m-step" / "DONE.json").exists()
    table = (out / "table.md").read_text()
    assert "| frozen-rm |" in table and "| oracle |" in table and "**gold**" in table
    assert (out / "experiment.png").stat().st_size > 10_000
    assert (out / "oracle" / "seed_0" / "iter_1" / "evaluate" / "DONE.json").exists()

    # The benches record such a summary as a results.jsonl row (here caught, not appended to bench/).
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import bench_real
    import bench_sandbox

    rows = []
    monkeypatch.setattr(bench_sandbox, "append_result", lambda folder, line, md: rows.append(line))
    for bench in (bench_real, bench_sandbox):
        monkeypatch.setattr(sys, "argv", ["bench", "--record", str(out / "experiment.json"), "--command", "cmd"])
        bench.main()
    assert [row["bench"] for row in rows] == ["real", "sandbox"]
    assert rows[0]["arms"]["oracle"]["gold"] == arms["oracle"]["gold"] and rows[0]["seeds"] == 1


def test_experiment_table_leaves_out_what_could_not_be_measured(tmp_path):
    # rm_acc_current is NaN when the referee tells no fresh pairs apart (e.g. a collapsed policy).
    for seed, (gold, acc) in enumerate([(0.5, 0.6), (0.7, float("nan"))]):
        step = tmp_path / "frozen-rm" / f"seed_{seed}" / "iter_0" / "evaluate"
        step.mkdir(parents=True)
        (step / "DONE.json").write_text(json.dumps({"metrics": {"eval/gold_mean": gold, "eval/rm_acc_current": acc}}))
    row = collect(tmp_path, ["frozen-rm"], [0, 1], 0, "toy")["arms"]["frozen-rm"]
    assert row["gold"] == [0.6] and row["gold_std"] == [0.1]
    assert row["rm_acc_current"] == [0.6] and row["rm_acc_current_std"] == [0.0]


def _fake_run(root, arm, seed, evals, stop_at=None, m_steps=()):
    """DONE.json files of a run: an evaluate per iteration in `evals`, an e-step per later one (the one at
    `stop_at` stopped), m-step pseudo-label metrics at `m_steps`."""
    run = root / arm / f"seed_{seed}"
    for k in range(len(evals) + (stop_at is not None)):
        steps = {}
        if k < len(evals):
            gold, kl, rm = evals[k]
            steps["evaluate"] = {"eval/gold_mean": gold, "eval/kl_to_initial": kl, "eval/rm_score_mean": rm}
        if k:
            steps["e-step"] = {}
        if k in m_steps:
            steps["m-step"] = {"pseudo/gold_label_acc": m_steps[k], "pseudo/kept": 10, "pseudo/dropped": 2}
        for name, metrics in steps.items():
            (run / f"iter_{k}" / name).mkdir(parents=True)
            (run / f"iter_{k}" / name / "DONE.json").write_text(json.dumps({"metrics": metrics, "stop": k == stop_at}))


def test_experiment_carries_a_stopped_run_and_reports_the_m_step_and_gold_vs_kl(tmp_path, capsys):
    _fake_run(tmp_path, "frozen-rm", 0, [(0.5, 0.0, 0.1), (0.6, 1.0, 0.9), (0.4, 4.0, 1.5)])
    # Stopped at iteration 2: its iteration-1 measurement stands for iterations 2 (and would for later ones).
    _fake_run(tmp_path, "mutual-taught", 0, [(0.5, 0.0, 0.1), (0.7, 1.0, 2.0)], stop_at=2, m_steps={1: 0.75})
    summary = collect(tmp_path, ["frozen-rm", "mutual-taught"], [0], 2, "toy")
    mt, frozen = summary["arms"]["mutual-taught"], summary["arms"]["frozen-rm"]
    assert mt["gold"] == [0.5, 0.7, 0.7] and mt["stopped_runs"] == 1
    assert mt["pseudo_label_acc"] == [None, 0.75, 0.75] and mt["pseudo_kept"][1] == 10
    assert "pseudo_label_acc" not in frozen  # no M-step in that arm
    # Each seed's series too, as the means carry it.
    assert summary["per_seed"]["mutual-taught"]["seeds"] == [0]
    assert summary["per_seed"]["mutual-taught"]["gold"] == [[0.5, 0.7, 0.7]]
    assert summary["per_seed"]["mutual-taught"]["pseudo_label_acc"] == [[None, 0.75, 0.75]]
    assert "pseudo_label_acc" not in summary["per_seed"]["frozen-rm"]
    write_outputs(tmp_path, summary)
    table = (tmp_path / "table.md").read_text()
    assert "**pseudo_label_acc**" in table and "| mutual-taught | – | 0.750 ± 0.000 | 0.750 ± 0.000 |" in table
    assert "| frozen-rm | 0.500 ± 0.000 | 0.600 ± 0.000 | 0.400 ± 0.000 |" in table
    image = imread(tmp_path / "gold_vs_kl.png")
    assert image.shape[1] > 500 and len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 10
    # `coevolve report` on the experiment folder: the gold-vs-KL figure first, then a table per metric.
    main(["report", str(tmp_path)])
    page = (tmp_path / "report" / "index.html").read_text()
    assert page.index("gold_vs_kl.png") < page.index("metrics.png") < page.index("<h3>gold</h3>")
    assert "<td>0.750 ± 0.000</td>" in page and (tmp_path / "report" / "gold_vs_kl.png").exists()


def test_recording_pools_the_same_arms_run_on_more_seeds_in_another_call(tmp_path, monkeypatch):
    # Seeds 0-1 in one device call, seed 2 in another: the recorded row is what one call over all three gives.
    evals = {
        0: [(0.5, 0.0, 0.1), (0.6, 1.0, 0.9)],
        1: [(0.4, 0.0, 0.1), (0.5, 2.0, 1.0)],
        2: [(0.3, 0.0, 0.2), (0.8, 3.0, 2.0)],
    }
    summaries = []
    for call, seeds in enumerate(([0, 1], [2])):
        for seed in seeds:
            _fake_run(tmp_path / "all", "mutual-taught", seed, evals[seed], m_steps={1: 0.25 * (seed + 1)})
            _fake_run(tmp_path / str(call), "mutual-taught", seed, evals[seed], m_steps={1: 0.25 * (seed + 1)})
        summary = collect(tmp_path / str(call), ["mutual-taught"], seeds, 1, "toy")
        summary.update(overrides=["x=1", f"seed={seeds[0]}"], wall_s=10.0, failed=[])
        summaries.append(tmp_path / f"{call}.json")
        summaries[-1].write_text(json.dumps(summary))
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from bench_sandbox import merged

    pooled, whole = merged(summaries), collect(tmp_path / "all", ["mutual-taught"], [0, 1, 2], 1, "toy")
    assert pooled["arms"] == whole["arms"] and pooled["per_seed"] == whole["per_seed"]
    assert pooled["arms"]["mutual-taught"]["gold"] == [0.4, 0.6333] and pooled["seeds"] == 3
    assert pooled["overrides"] == ["x=1"] and pooled["wall_s"] == 20.0
    # A call of another design is not pooled.
    other = json.loads(summaries[1].read_text()) | {"overrides": ["x=2", "seed=2"]}
    summaries[1].write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="not the same iterations and overrides"):
        merged(summaries)


def test_recording_an_arm_run_again_replaces_it_and_its_failures(tmp_path, monkeypatch):
    # The first call's frozen-rm seed 1 failed; after a fix that arm alone ran again on the same seeds.
    evals = [(0.5, 0.0, 0.1), (0.6, 1.0, 0.9)]
    summaries = []
    for call, (arms, failed) in enumerate(
        (
            (["mutual-taught", "frozen-rm"], ["frozen-rm seed 1 (exit 1)", "mutual-taught seed 0 (exit deadline)"]),
            (["frozen-rm"], []),
        )
    ):
        for arm in arms:
            for seed in (0, 1):
                _fake_run(tmp_path / str(call), arm, seed, [(g + call, kl, s) for g, kl, s in evals])
        summary = collect(tmp_path / str(call), arms, [0, 1], 1, "toy")
        summary.update(overrides=["x=1"], wall_s=10.0, failed=failed)
        summaries.append(tmp_path / f"{call}.json")
        summaries[-1].write_text(json.dumps(summary))
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from bench_sandbox import merged

    both = merged(summaries)
    assert both["arms"]["frozen-rm"]["gold"] == [1.5, 1.6] and both["arms"]["mutual-taught"]["gold"] == [0.5, 0.6]
    assert both["failed"] == ["mutual-taught seed 0 (exit deadline)"] and both["wall_s"] == 20.0


def test_the_ablation_arms_are_the_papers():
    assert "e_step.select=false" in ARMS["mt-no-selection"] and "m_step.epsilon_filter=false" in ARMS["mt-no-filter"]
    assert "m_step.original_pairs_ratio=1.0" in ARMS["mt-original-pairs"]
    assert "m_step.max_heldout_drop=0.05" in ARMS["mt-heldout-stop"]
    for arm in ("mt-no-selection", "mt-no-filter", "mt-original-pairs", "mt-heldout-stop"):
        cfg = load_config(ROOT / "configs" / "sandbox-gpu.yaml", arm_overrides(arm, 0, "x"))
        assert cfg.steps.m_step and cfg.steps.evaluate


@pytest.mark.parametrize("arm", ["frozen-rm", "mutual-taught", "oracle"])
def test_the_online_arms_are_the_offline_ones_trained_by_grpo(arm):
    cfg = load_config(ROOT / "configs" / "sandbox-gpu.yaml", arm_overrides(f"{arm}-online", 0, "x"))
    offline = load_config(ROOT / "configs" / "sandbox-gpu.yaml", arm_overrides(arm, 0, "x"))
    assert cfg.e_step.mode == "grpo" and cfg.steps.evaluate
    assert cfg.model_dump(exclude={"e_step", "run_name"}) == offline.model_dump(exclude={"e_step", "run_name"})
    # Whole groups of rollouts in a batch, and a rate that moves the sandbox's models.
    train = cfg.e_step.online.train
    assert train.per_device_train_batch_size % cfg.e_step.num_samples == 0 and train.learning_rate == 1e-4
    if arm != "oracle":  # no KL arm: the gold cannot be over-optimised
        with_kl = load_config(ROOT / "configs" / "sandbox-gpu.yaml", arm_overrides(f"{arm}-online-kl", 0, "x"))
        assert cfg.e_step.online.kl == 0 and with_kl.e_step.online.kl == 0.04
        assert with_kl.model_dump(exclude={"e_step": {"online": {"kl"}}, "run_name": True}) == cfg.model_dump(
            exclude={"e_step": {"online": {"kl"}}, "run_name": True}
        )
