"""W&B tracking, read back from the files real wandb writes in offline mode (no network, no account)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from tiny_run import FAKE_KEY, ROOT, tiny_run  # noqa: F401  (tiny_run is the fixture)

from coevolve.core import tracking
from coevolve.core.config import load_config
from coevolve.core.step import StepRun
from coevolve.core.training import trainer_args

TINY = ROOT / "configs" / "tiny.yaml"
STEPS = [
    "iter0-init",
    "iter0-sft-warmup",
    "iter0-rm-init",
    "iter0-evaluate",
    "iter1-e-step",
    "iter1-m-step",
    "iter1-evaluate",
    "iter2-e-step",
    "iter2-m-step",
    "iter2-evaluate",
]


def wandb_runs(run_dir: Path) -> list[dict]:
    """Every W&B run under RUN/wandb, in start order, read back with wandb's own reader of a run's
    transaction log (`wandb leet inspect --json`: one JSON record a line): its run record, config,
    history and summary, logged artifacts and exit code."""
    runs = []
    for path in run_dir.glob("wandb/*run-*/run-*.wandb"):
        cmd = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)]
        info = {"config": {}, "history": {}, "summary": {}, "artifacts": [], "exit_code": None}
        for line in subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines():
            record = json.loads(line)
            kind = record["type"]
            body = record.get(kind, {})
            if kind == "run":
                info.update(
                    id=body["run_id"],
                    name=body["display_name"],
                    group=body["run_group"],
                    job_type=body["job_type"],
                    project=body["project"],
                    tags=body.get("tags", []),
                    started=datetime.fromisoformat(body["start_time"]),
                )
                info["config"].update(body["config"]["update"])
            elif kind in ("config", "summary"):
                info[kind].update(body.get("update", {}))
            elif kind == "history":
                info["history"].update(body["item"])
            elif kind == "artifact":
                info["artifacts"].append(body)
            elif kind == "exit":
                # Protobuf's JSON leaves out fields at their default (exit code 0).
                info["exit_code"] = body.get("exit_code", 0)
        runs.append(info)
    return sorted(runs, key=lambda r: r["started"])


def group(run_dir: Path) -> str:
    return f"tiny-{(run_dir / '.wandb-id').read_text().strip()}"


@pytest.fixture(scope="module")
def runs(tiny_run) -> dict[str, dict]:
    found = wandb_runs(tiny_run)
    # Each step ran once, so its name is unique: keyed by step, without the group that prefixes them all.
    assert [r["name"] for r in found] == [f"{group(tiny_run)}-{step}" for step in STEPS]
    return {step: r for step, r in zip(STEPS, found)}


@pytest.mark.slow
def test_every_step_is_a_w_and_b_run_in_the_run_group(tiny_run, runs):
    for name, r in runs.items():
        k, step = name.split("-", 1)
        assert (r["group"], r["job_type"], r["project"], r["exit_code"]) == (group(tiny_run), step, "coevolve", 0)
        assert r["config"]["step"]["iteration"] == int(k.removeprefix("iter"))
        # The full resolved config, as saved in the run directory (TRL adds its trainer args beside it).
        assert (
            r["config"]["run_name"] == "tiny"
            and r["config"]["e_step"]["beta"] == 0.1
            and r["config"]["sampling"]["temperature"] == 0.8
        )
        assert r["config"]["tracking"] == {"mode": None, "project": "coevolve", "upload": False}
    # wandb says nothing on the console (its offline summaries were most of it); the step's log says where the run is.
    assert "wandb" not in (tiny_run / "coevolve-run.log").read_text()
    e_step = runs["iter1-e-step"]
    assert (
        f"W&B run {e_step['id']} (offline): {tiny_run.resolve()}/wandb/offline-run-"
        in (tiny_run / "iter_1" / "e-step" / "log.txt").read_text()
    )


@pytest.mark.slow
def test_steps_log_their_metrics_trl_curves_distributions_and_phase_times(runs):
    e_step, m_step = runs["iter1-e-step"]["history"], runs["iter1-m-step"]["history"]
    for key in [
        "generate/tokens_per_s",
        "generate/length_mean",
        "score/mean",
        "score/std",
        "pairs/count",
        "pairs/margin_mean",
        "train/loss",
        "train/rewards/chosen",
        "train/rewards/rejected",
        "train/rewards/accuracies",
        "train/rewards/margins",
        "select/best_win_rate",
        "select/win_rates/checkpoint-2",
        "dist/pairs/chosen_score_std",
        "dist/pairs/rejected_score_std",
        "dist/samples/num_tokens_mean",
        "time/generate",
        "time/score",
        "time/pairs",
        "time/train",
        "time/select",
    ]:
        assert key in e_step, key
    assert e_step["dist/pairs/margin._type"] == e_step["dist/samples/num_tokens._type"] == "histogram"
    for key in [
        "pseudo/kept",
        "pseudo/dropped",
        "pseudo/epsilon",
        "train/loss",
        "train/accuracy",
        "rm_before/accuracy_heldout",
        "rm_after/accuracy_heldout",
        "rm_after/accuracy_pseudo",
        "rm_after/accuracy_train_mix",
        "time/pseudo",
        "time/after",
    ]:
        assert key in m_step, key
    assert (
        "select/best_checkpoint" in runs["iter1-e-step"]["summary"] and "time/total" in runs["iter1-e-step"]["summary"]
    )
    assert (
        "train/loss" in runs["iter0-sft-warmup"]["history"]
        and "rm_after/accuracy_heldout" in runs["iter0-rm-init"]["history"]
    )
    for key in [
        "eval/gold_mean",
        "eval/rm_acc_original",
        "eval/rm_acc_current",
        "eval/kl_to_initial",
        "eval/win_rate_vs_initial",
        "time/measure",
    ]:
        assert key in runs["iter1-evaluate"]["history"], key
    assert (
        e_step["responses/samples._type"]
        == runs["iter1-evaluate"]["history"]["responses/responses._type"]
        == "table-file"
    )


@pytest.mark.slow
def test_outputs_are_reference_artifacts_and_inputs_name_their_producers(tiny_run, runs):
    logged, digests = {}, {}
    for name in STEPS:
        # Tables of responses are artifacts of wandb's own (type run_table), not the step's outputs.
        arts = [art for art in runs[name]["artifacts"] if art["type"] in ("model", "dataset")]
        outputs = [art for art in arts if not art.get("use_after_commit")]
        used = {art["name"]: art for art in arts if art.get("use_after_commit")}
        names = [art["name"] for art in outputs]
        assert len(names) == len(set(names)), names
        for art in arts:
            # References into the run directory, nothing copied or uploaded.
            assert all(e["ref"].startswith(tiny_run.resolve().as_uri() + "/") for e in art["manifest"]["contents"]), (
                art["name"]
            )
        # Lineage: every input is declared as used, and is the very version (digest) an earlier step logged.
        inputs = runs[name]["config"]["step"].get("inputs", {})
        assert set(used) == set(inputs.values()), name
        for role, artifact in inputs.items():
            assert artifact in logged, (name, role, artifact)
            assert used[artifact]["digest"] == digests[artifact], (name, role, artifact)
        for art in outputs:
            logged[art["name"]], digests[art["name"]] = art["type"], art["digest"]
    g = group(tiny_run)
    assert logged[f"{g}-prompts-iter_0-init"] == "dataset" and logged[f"{g}-policy-iter_0-init"] == "model"
    assert {
        f"{g}-pairs-iter_1-e-step",
        f"{g}-samples-iter_1-e-step",
        f"{g}-pseudo_pairs-iter_2-m-step",
        f"{g}-train_mix-iter_2-m-step",
    } <= set(logged)
    assert logged[f"{g}-policy-iter_2-e-step"] == logged[f"{g}-rm-iter_2-m-step"] == "model"
    inputs = {name: runs[name]["config"]["step"]["inputs"] for name in STEPS[1:]}
    assert inputs["iter1-e-step"]["policy"] == f"{g}-policy-iter_0-sft-warmup"
    assert inputs["iter1-e-step"]["prompts"] == f"{g}-prompts-iter_0-init"
    assert inputs["iter1-m-step"]["policy_new"] == f"{g}-policy-iter_1-e-step"
    assert inputs["iter2-e-step"]["rm"] == f"{g}-rm-iter_1-m-step"


@pytest.mark.slow
def test_the_api_key_is_stored_nowhere_in_the_run_directory(tiny_run):
    # The run had WANDB_API_KEY set (tracking forced offline by WANDB_MODE): W&B files, logs, configs.
    assert any(tiny_run.glob("wandb/offline-run-*"))
    for path in tiny_run.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path


def test_mode_comes_from_config_then_env_then_login(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    cfg = load_config(TINY)
    assert tracking.resolve_mode(cfg) == "offline"
    (tmp_path / "netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    assert tracking.resolve_mode(cfg) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.resolve_mode(cfg) == "disabled"
    assert tracking.resolve_mode(load_config(TINY, ["tracking.mode=offline"])) == "offline"


def test_disabled_tracking_starts_no_w_and_b_run(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = load_config(TINY)
    with StepRun(tmp_path / "run", 0, "init", cfg):
        assert not tracking.active()
        assert trainer_args(dict, cfg.rm_init, cfg, tmp_path)["report_to"] == "none"
    assert not (tmp_path / "run" / "wandb").exists()


def test_a_failed_attempt_and_the_one_that_resumes_it_are_one_w_and_b_run(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = load_config(TINY)
    run = tmp_path / "run"

    def killed(tmp):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError), StepRun(run, 1, "e-step", cfg) as step:
        step.phase("generate", lambda tmp: {"generate/samples": 3})
        assert tracking.active() and trainer_args(dict, cfg.e_step.train, cfg, tmp_path)["report_to"] == "wandb"
        step.phase("score", killed)
    assert not tracking.active()
    with StepRun(run, 1, "e-step", cfg) as step:
        step.phase("generate", killed)  # done by the first attempt: kept, not rerun
        step.phase("score", lambda tmp: {"score/mean": 0.5})
        step.finish({})
    first, second = wandb_runs(run)
    short = (run / ".wandb-id").read_text().strip()
    assert first["id"] == second["id"] == f"{short}-iter1-e-step"
    assert first["name"] == second["name"] == f"tiny-{short}-iter1-e-step"
    assert (first["exit_code"], first["tags"]) == (1, ["iter1"])
    assert (second["exit_code"], second["tags"]) == (0, ["iter1", "resumed"])
    assert second["summary"]["resumed_after"] == ["generate"]
    assert {"generate/samples", "time/generate", "score/mean", "time/score"} <= set(second["history"])
    # wandb's own lines go to the step's log, not to the console.
    assert f"W&B run {first['id']} (offline): " in (run / "iter_1" / "e-step" / "log.txt").read_text()


def _responses_step(run: Path, cfg) -> None:
    """An init step whose output is a dataset of the toy task's prompts and responses, RM-scored."""
    import datasets
    from coevolve.data.tasks import load_task

    task, rng = load_task("toy"), random.Random(0)
    prompts = [task.draw_prompt(rng) for _ in range(tracking.TABLE_ROWS + 6)]
    rows = [{"prompt": p, "response": task.respond(p, frozenset(), rng), "score": 0.25} for p in prompts]
    with StepRun(run, 0, "init", cfg) as step:
        step.phase("samples", lambda tmp: datasets.Dataset.from_list(rows).save_to_disk(str(tmp)))
        step.finish({"samples": "samples"})


def test_two_runs_from_one_config_have_their_own_group_run_and_artifact_names(monkeypatch, tmp_path, capfd):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = load_config(TINY)
    found = []
    for run in (tmp_path / "a", tmp_path / "b"):
        _responses_step(run, cfg)
        (r,) = wandb_runs(run)
        found.append(r)
        short = (run / ".wandb-id").read_text().strip()
        assert (
            r["group"] == f"tiny-{short}"
            and r["name"] == f"tiny-{short}-iter0-init"
            and r["id"] == f"{short}-iter0-init"
        )
        assert [a["name"] for a in r["artifacts"] if a["type"] == "dataset"] == [f"tiny-{short}-samples-iter_0-init"]
    a, b = found
    assert a["group"] != b["group"] and a["id"] != b["id"] and a["artifacts"][0]["name"] != b["artifacts"][0]["name"]
    # Nothing of wandb's on the console (no banner, no offline summary): its notices are in the step's log.
    assert "wandb" not in capfd.readouterr().err
    assert "Generating checksum" in (tmp_path / "b" / "iter_0" / "init" / "log.txt").read_text()
    # The step run again: the same W&B run, in the same group.
    _responses_step(tmp_path / "a", cfg)
    assert [(r["id"], r["group"]) for r in wandb_runs(tmp_path / "a")] == [(a["id"], a["group"])] * 2


def test_an_output_of_responses_is_a_table_with_rm_and_gold_scores(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    _responses_step(run, load_config(TINY))
    (r,) = wandb_runs(run)
    assert r["history"]["responses/samples._type"] == "table-file"
    (table,) = run.glob(f"wandb/offline-run-*/files/{r['history']['responses/samples.path']}")
    table = json.loads(table.read_text())
    assert table["columns"] == ["prompt", "response", "rm_score", "gold"]
    assert len(table["data"]) == tracking.TABLE_ROWS
    # Perfect template responses: the toy task's gold reward is 1.
    assert all(row[2] == 0.25 and row[3] == 1.0 for row in table["data"])
