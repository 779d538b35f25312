"""Each step alone on a prepared tiny run directory, with real trl training and assertions on values."""

from __future__ import annotations

import gc
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from statistics import mean, pstdev

import datasets
import pytest
import torch
from coevolve.data.store import Store
from coevolve.data.tasks import load_task
from coevolve.policy.e_step import reference_model
from coevolve.policy.pairs import length_controlled
from coevolve.policy.sampled_reference import SampledReferenceDPOTrainer, sampled_rows, unusable_because
from coevolve.reward.m_step import heldout_guard
from conftest import FAST, TINY
from tiny_run import tiny_run  # noqa: F401  (the fixture)
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    TrainerCallback,
)
from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
from trl.data_utils import _tokenize

from coevolve.cli import run_step
from coevolve.core import io_timing, rundir
from coevolve.core.chat import completion_example, prompt_messages, rm_example, rm_input_ids
from coevolve.core.checkpoints import BackgroundCheckpoints
from coevolve.core.config import TrainConfig, load_config, prepare_run
from coevolve.core.models import load_tokenizer
from coevolve.core.plan import step_plan
from coevolve.core.rollout import sample, sample_each, score
from coevolve.core.runner import stop_reason, stopped
from coevolve.core.training import preference_dataset, trainer_args


def done(run, k, step):
    return rundir.read_done(run, k, step)


def test_init_splits_prompts_like_the_paper(prepared_run):
    metrics = done(prepared_run, 0, "init")["metrics"]
    # 120 prompts: 16 for model selection, 24 held out for evaluation, the rest split two thirds / one third.
    assert metrics["data/prompts_select"] == 16
    assert metrics["data/prompts_eval"] == 24
    assert metrics["data/prompts_rm"] == round(80 / 3)
    assert metrics["data/prompts_policy"] == 80 - round(80 / 3)
    prompts = datasets.load_from_disk(str(prepared_run / "iter_0/init/data/prompts"))
    assert len(set(prompts["prompt_id"])) == len(prompts) == 120
    assert Store(prepared_run).load("prompts")["prompt_id"] == prompts["prompt_id"]


def test_policy_and_rm_tokenizers_differ_and_rm_scores_its_own_rendering(prepared_run):
    policy_tok = AutoTokenizer.from_pretrained(prepared_run / "iter_0/init/policy")
    rm_tok = AutoTokenizer.from_pretrained(prepared_run / "iter_0/init/rm")
    assert policy_tok.get_vocab() != rm_tok.get_vocab() and len(policy_tok) != len(rm_tok)
    assert policy_tok.chat_template != rm_tok.chat_template
    prompt, response = "list three animals", "cat dog fox"
    # What the scorer feeds the RM is exactly what trl's RewardTrainer trains it on.
    assert (
        rm_input_ids(rm_tok, prompt, response) == _tokenize(rm_tok, rm_example(rm_tok, prompt, response))["input_ids"]
    )
    assert rm_tok.decode(rm_input_ids(rm_tok, prompt, response)) == "Q:list three animals\nA:cat dog fox</s>"


def test_sft_warmup_lowers_loss(prepared_run):
    m = done(prepared_run, 0, "sft-warmup")["metrics"]
    assert m["sft/loss_last"] < m["sft/loss_first"] - 0.5


def test_rm_init_raises_accuracy_on_its_training_pairs(prepared_run):
    m = done(prepared_run, 0, "rm-init")["metrics"]
    assert m["rm_after/accuracy_train"] > m["rm_before/accuracy_train"] + 0.05


def completion_logp(model, tok, prompt: str, completion: str) -> float:
    head = tok.apply_chat_template(
        prompt_messages(prompt), add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    full = tok.apply_chat_template(
        prompt_messages(prompt) + [{"role": "assistant", "content": completion}], tokenize=True, return_dict=True
    )["input_ids"]
    ids = torch.tensor([full])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(logps[len(head) - 1 :].sum())


def implicit_margin(policy, reference, tok, pairs, beta) -> float:
    """DPO's implicit reward margin: beta * [(log pi - log ref)(chosen) - (log pi - log ref)(rejected)]."""
    margins = []
    for p in pairs:
        chosen = completion_logp(policy, tok, p["prompt"], p["chosen"]) - completion_logp(
            reference, tok, p["prompt"], p["chosen"]
        )
        rejected = completion_logp(policy, tok, p["prompt"], p["rejected"]) - completion_logp(
            reference, tok, p["prompt"], p["rejected"]
        )
        margins.append(beta * (chosen - rejected))
    return mean(margins)


def test_e_step_builds_paper_pairs_and_dpo_raises_their_margin(iterated_run):
    run = iterated_run
    cfg = load_config(None, [], run)
    result = done(run, 1, "e-step")
    step = run / "iter_1/e-step"
    samples = datasets.load_from_disk(str(step / "score"))
    pairs = datasets.load_from_disk(str(step / "pairs/pairs"))
    unpaired = datasets.load_from_disk(str(step / "pairs/unpaired")) if (step / "pairs/unpaired").exists() else []
    assert (
        len(samples)
        == result["metrics"]["generate/samples"]
        == cfg.e_step.num_samples * done(run, 0, "init")["metrics"]["data/prompts_policy"]
    )
    assert len(pairs) + len(unpaired) == len(set(samples["prompt_id"]))
    by_prompt = {}
    for s in samples:
        by_prompt.setdefault(s["prompt_id"], []).append(s)
    for p in pairs:
        rows = by_prompt[p["prompt_id"]]
        c, r = length_controlled(
            [x["response"] for x in rows], [x["score"] for x in rows], [x["num_tokens"] for x in rows]
        )
        assert (p["chosen"], p["rejected"]) == (rows[c]["response"], rows[r]["response"])
        assert p["chosen_score"] > mean(x["score"] for x in rows) and p["rejected_score"] == min(
            x["score"] for x in rows
        )

    start = run / result["inputs"]["policy"]
    tok = AutoTokenizer.from_pretrained(start)
    reference = AutoModelForCausalLM.from_pretrained(start).eval()
    trained = AutoModelForCausalLM.from_pretrained(run / result["outputs"]["policy"]).eval()
    sample = pairs.select(range(min(24, len(pairs))))
    # Before training the policy is its reference, so the margin starts at exactly 0.
    assert implicit_margin(trained, reference, tok, sample, cfg.e_step.beta) > 0.01
    # tiny.yaml adds an NLL term to DPO's loss; the DPO part shows in trl's reward margin.
    assert result["metrics"]["dpo/rewards/margins_last"] > result["metrics"]["dpo/rewards/margins_first"]
    assert Store(run).load("pairs", [1])["chosen"] == pairs["chosen"]
    # On a CPU, auto samples with HF generate, which returns no log-probs: trl ran the reference forward.
    assert result["metrics"]["generate/backend"] == "hf (auto: no CUDA)"
    assert result["metrics"]["dpo/reference_logps"] == "forward"

    # Loads and saves, phase by phase: each checkpoint saved once; selection loads nothing: the policy
    # that sampled, the RM that scored and the weights written are in memory (tests/test_loaded.py).
    # (This process may hold the policy's tokenizer from an earlier test: models count, not it.)
    io, candidates = result["io"], len(result["metrics"]["select/win_rates"])
    assert io["generate"]["loads"] >= 1 and io["generate"]["load_s"] > 0 and io["generate"]["saves"] == 0
    assert io["pairs"] == {"load_s": 0.0, "loads": 0, "save_s": 0.0, "saves": 0}
    assert io["train"]["saves"] == candidates > 1 and io["train"]["save_s"] > 0
    assert (io["select"]["loads"], io["select"]["saves"]) == (0, 0)


def test_m_step_filters_pseudo_pairs_and_fits_the_rm(iterated_run):
    run = iterated_run
    result = done(run, 1, "m-step")
    m = result["metrics"]
    scored = datasets.load_from_disk(str(run / "iter_1/m-step/score"))
    assert m["pseudo/epsilon"] == pstdev(scored["old_score"])
    kept = datasets.load_from_disk(str(run / "iter_1/m-step/pseudo/kept"))
    assert all(d > -m["pseudo/epsilon"] for d in kept["delta"]) and m["pseudo/kept"] == len(kept)
    assert m["pseudo/kept"] + m["pseudo/dropped"] == len(scored)
    assert m["mix/pseudo"] == m["pseudo/kept"] and m["mix/e-step"] == done(run, 1, "e-step")["metrics"]["pairs/count"]
    # The fit shows in the Bradley-Terry loss on the pairs the RM trained on, not in their accuracy:
    # its E-step pairs were ranked by rm_K-1 itself (accuracy near 1 before any training), and the
    # pseudo pairs are noisy, so accuracy on the mix may even dip while the loss falls.
    mix = datasets.load_from_disk(str(run / "iter_1/m-step/mix"))
    cfg = load_config(None, [], run)
    loss = {}
    for name, rm in (("before", run / result["inputs"]["rm"]), ("after", run / "iter_1/m-step/train/rm")):
        chosen, rejected = (score(cfg, rm, mix["prompt"], mix[side]) for side in ("chosen", "rejected"))
        loss[name] = mean(-torch.nn.functional.logsigmoid(torch.tensor(c - r)).item() for c, r in zip(chosen, rejected))
    assert loss["after"] < loss["before"] - 0.001, loss
    # The paper's default: the M-step restarts from the base RM, not from the previous one.
    assert result["inputs"]["rm_start"] == "iter_0/rm-init/train/rm"
    assert len(Store(run).load("pseudo_pairs", [1])) == len(scored)


def test_m_step_heldout_rule_ends_the_loop_with_the_previous_policy_and_rm(iterated_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(iterated_run, run)
    # -1: the RM would have to gain a whole 1.0 of accuracy, so this M-step stops whatever it measures.
    cfg = prepare_run(None, ["m_step.max_heldout_drop=-1.0"], run, redo=True)
    run_step("m-step", run, 1, cfg, force=True)
    result = done(run, 1, "m-step")
    assert result["stop"] and stopped(run, 1, "m-step")
    assert result["outputs"]["rm"] == result["inputs"]["rm"] == "iter_0/rm-init/train/rm"
    assert result["outputs"]["policy"] == result["inputs"]["policy_old"]
    assert rundir.latest_output(run, "policy") == run / result["inputs"]["policy_old"]
    assert (run / "iter_1/m-step/train/rm/config.json").exists()  # the RM it turned down stays to be looked at
    assert stop_reason(run, 1, "m-step") == (
        "iteration 1: the M-step's RM lost more than -1.0 accuracy on the held-out original pairs;"
        " stopping with the previous policy"
    )
    # The rule itself, at the drop the fixture's own M-step measured, and unset (the paper).
    m = done(iterated_run, 1, "m-step")["metrics"]
    drop = m["rm_before/accuracy_heldout"] - m["rm_after/accuracy_heldout"]
    assert heldout_guard(m, drop - 0.001) and not heldout_guard(m, drop + 0.001) and not heldout_guard(m, None)
    assert not done(iterated_run, 1, "m-step")["stop"]


def test_m_step_with_every_pseudo_pair_dropped_ends_the_loop_with_the_previous_policy_and_rm(iterated_run, tmp_path):
    # Seen on the GPU: a policy that online RL collapsed to one answer per prompt answers the same before
    # and after its E-step whatever the seed, so no pseudo pair is left. Made here by scaling the
    # policy's final norm until its sampling is deterministic, as both the M-step's policies.
    run = tmp_path / "run"
    shutil.copytree(iterated_run, run)
    e_done_path = run / "iter_1/e-step/DONE.json"
    e_done = json.loads(e_done_path.read_text())
    collapsed = run / "iter_1/e-step/collapsed"
    shutil.copytree(run / e_done["inputs"]["policy"], collapsed)
    model = AutoModelForCausalLM.from_pretrained(collapsed)
    with torch.no_grad():
        model.model.norm.weight.mul_(1000.0)
    model.save_pretrained(collapsed)
    e_done["inputs"]["policy"] = e_done["outputs"]["policy"] = rundir.relative(run, collapsed)
    e_done_path.write_text(json.dumps(e_done))

    cfg = prepare_run(None, [], run)
    run_step("m-step", run, 1, cfg, force=True)
    result = done(run, 1, "m-step")
    m = result["metrics"]
    n = m["generate/prompts"]
    assert (m["pseudo/kept"], m["pseudo/dropped"], m["pseudo/dropped_by_reason"]) == (
        0,
        n,
        {"identical responses": n},
    )
    assert result["outputs"]["rm"] == result["inputs"]["rm"] == "iter_0/rm-init/train/rm"
    assert result["outputs"]["policy"] == result["inputs"]["policy_old"]
    assert not (run / "iter_1/m-step/train").exists()
    assert len(Store(run).load("pseudo_pairs", [1])) == n  # the dropped pairs are kept to be looked at
    assert stopped(run, 1, "m-step")
    assert stop_reason(run, 1, "m-step") == (
        f"iteration 1: the M-step dropped every one of its {n} pseudo pairs ({n} identical responses),"
        " leaving nothing to train the RM on; stopping with the previous policy"
    )


def test_finished_step_is_skipped(prepared_run):
    path = prepared_run / "iter_0/sft-warmup/DONE.json"
    before = path.stat().st_mtime_ns
    cfg = load_config(None, [], prepared_run)
    assert run_step("sft-warmup", prepared_run, 0, cfg) == json.loads(path.read_text())
    assert path.stat().st_mtime_ns == before


def test_rm_from_policy_starts_from_the_sft_policy(fresh_run):
    cfg = prepare_run(None, ["rm.tiny=null", "rm.from_policy=true"], fresh_run, redo=True)
    run_step("init", fresh_run, 0, cfg, force=True)
    assert "rm" not in done(fresh_run, 0, "init")["outputs"]
    # Built on the init just redone, sft-warmup is stale and redone first.
    run_step("sft-warmup", fresh_run, 0, cfg)
    run_step("rm-init", fresh_run, 0, cfg)
    d = done(fresh_run, 0, "rm-init")
    assert d["inputs"]["rm"] == d["inputs"]["policy"] == "iter_0/sft-warmup/train/policy"
    rm = AutoModelForSequenceClassification.from_pretrained(fresh_run / d["outputs"]["rm"])
    policy = AutoModelForCausalLM.from_pretrained(fresh_run / d["inputs"]["policy"])
    # The policy's body under a new score head: its vocabulary and embeddings, moved only by training
    # (a freshly built RM's would be unrelated: cosine ~0).
    embed_rm, embed_policy = rm.get_input_embeddings().weight.flatten(), policy.get_input_embeddings().weight.flatten()
    assert embed_rm.shape == embed_policy.shape
    assert torch.nn.functional.cosine_similarity(embed_rm, embed_policy, dim=0) > 0.9
    assert d["metrics"]["rm_after/accuracy_train"] > d["metrics"]["rm_before/accuracy_train"]


def padding_share(trainer) -> float:
    """Share of the positions in the trainer's batches (one epoch) that are padding."""
    pad = total = 0
    for batch in trainer.get_train_dataloader():
        for key, mask in batch.items():
            if key.endswith("attention_mask"):
                pad, total = pad + int((mask == 0).sum()), total + mask.numel()
    return pad / total


@pytest.mark.parametrize("kind", ["dpo", "rm"])
def test_length_grouped_batches_carry_less_padding(prepared_run, tmp_path, kind):
    cfg = load_config(None, [], prepared_run)
    rng = random.Random(0)
    animals = ["cat", "dog", "bear", "fox", "owl"]
    # Half the pairs one word long, half forty: random batches of 8 mix them. (The sampler sorts within
    # random chunks of up to 50 batches, fewer on a small set: 400 pairs make chunks of 12 batches.)
    pairs = [
        {
            "prompt": "name animals",
            "chosen": " ".join(rng.choices(animals, k=n)),
            "rejected": " ".join(rng.choices(animals, k=n)),
        }
        for n in rng.choices([1, 40], k=400)
    ]
    path = prepared_run / ("iter_0/sft-warmup/train/policy" if kind == "dpo" else "iter_0/rm-init/train/rm")
    tok = AutoTokenizer.from_pretrained(path)
    shares = {}
    for grouped in (False, True):
        train = TrainConfig(per_device_train_batch_size=8, max_length=512, group_by_length=grouped)
        rows = preference_dataset(tok, pairs, train, for_rm=kind == "rm")
        trainer_cls, config_cls = (DPOTrainer, DPOConfig) if kind == "dpo" else (RewardTrainer, RewardConfig)
        trainer = trainer_cls(
            model=str(path),
            args=trainer_args(config_cls, train, cfg, tmp_path / str(grouped)),
            train_dataset=rows,
            processing_class=tok,
        )
        shares[grouped] = padding_share(trainer)
    assert shares[False] > 0.3 and shares[True] < 0.5 * shares[False], shares


def test_killed_step_resumes_at_its_first_unfinished_phase(fresh_run):
    partial = rundir.partial_dir(fresh_run, 1, "e-step")
    cmd = [sys.executable, "-m", "coevolve", "step", "e-step", "--run-dir", str(fresh_run), "--iteration", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (partial / "phases/pairs.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the step ended before it could be killed"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not rundir.is_done(fresh_run, 1, "e-step")
    samples_before = datasets.load_from_disk(str(partial / "generate"))["response"]

    cfg = load_config(None, [], fresh_run)
    run_step("e-step", fresh_run, 1, cfg)
    log = (fresh_run / "iter_1/e-step/log.txt").read_text()
    assert "generate: done earlier, kept" in log and "score: done earlier, kept" in log
    assert datasets.load_from_disk(str(fresh_run / "iter_1/e-step/generate"))["response"] == samples_before
    assert not partial.exists()


def test_stores_feed_hard_prompts_back_and_replay_pairs(fresh_run):
    """Iteration 2 with retrospective sampling and RM replay on: its E-step batch holds hard prompts of
    iteration 1, and its M-step mix replays earlier pairs."""
    cfg = load_config(
        None,
        [
            "e_step.prompts_per_iteration=30",
            "stores.hard_fraction=0.5",
            "stores.easy_threshold=0.0",
            "stores.replay={current: 0.6, pseudo_pairs: 0.2, original: 0.2}",
        ],
        fresh_run,
    )
    for k in (1, 2):
        run_step("e-step", fresh_run, k, cfg)
        run_step("m-step", fresh_run, k, cfg)
    first = set(datasets.load_from_disk(str(fresh_run / "iter_1/e-step/score"))["prompt_id"])
    second = set(datasets.load_from_disk(str(fresh_run / "iter_2/e-step/score"))["prompt_id"])
    assert len(second) == 30 and len(first & second) == 15
    mix = datasets.load_from_disk(str(fresh_run / "iter_2/m-step/mix"))
    assert {"original", "pseudo"} <= set(mix["source"]) and sum(i < 2 for i in mix["iteration"]) > 0


def test_run_leaves_a_complete_run_directory(tiny_run):
    """`coevolve run` (each step its own process): every planned step finished, with its log and outputs."""
    cfg = load_config(None, [], tiny_run)
    for k, name in step_plan(cfg):
        record = done(tiny_run, k, name)
        assert (rundir.step_dir(tiny_run, k, name) / "log.txt").stat().st_size > 0
        assert record["config_hash"] == cfg.hash() and record["timings"]
        for path in record["outputs"].values():
            assert (tiny_run / path).exists(), (k, name, path)
    assert not list(tiny_run.glob("iter_*/.*.partial"))
    final = rundir.latest_output(tiny_run, "policy")
    assert final.parent.parent.parent.name == "e-step" and AutoModelForCausalLM.from_pretrained(final)


@pytest.mark.integration
def test_rm_init_labels_pairs_sampled_from_the_starting_policy(tmp_path):
    run = tmp_path / "run"
    cfg = prepare_run(str(TINY), [*FAST, "data.pair_source=policy"], run)
    for name in ("init", "sft-warmup", "rm-init"):
        run_step(name, run, 0, cfg)
    assert not (run / "iter_0/init/data/pairs").exists()
    assert rundir.latest_output(run, "pairs", iteration_max=0) == run / "iter_0/rm-init/pairs"
    pairs = datasets.load_from_disk(str(run / "iter_0/rm-init/pairs"))
    # The pairs are the starting policy's own two samples: sampling again with the same seed gives them.
    task = load_task("toy")
    prompts = task.pair_prompts(cfg.data.num_pairs, cfg.data.seed)
    again = sample(cfg, run / "iter_0/sft-warmup/train/policy", prompts, 2, cfg.seed * 1000 + 300)
    samples = {p: set(t) for p, t in zip(prompts, again.texts)}
    assert len(pairs) > 0.5 * len(prompts)
    assert all({c, r} == samples[p] for p, c, r in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"]))
    # Labelled by Bradley-Terry on gold at T = 0.05: mostly, not always, the gold-better one is chosen.
    agree = mean(c > r for c, r in zip(pairs["chosen_gold"], pairs["rejected_gold"]))
    assert 0.7 < agree < 1.0 or agree == 1.0 and len(pairs) < 30
    assert set(pairs["split"]) == {"train", "heldout"}
    assert len(Store(run).load("pairs")) == len(pairs)
    m = done(run, 0, "rm-init")["metrics"]
    assert m["pairs/labelled"] == len(pairs) and m["rm_after/accuracy_train"] > m["rm_before/accuracy_train"]


@pytest.mark.parametrize("backend", ["hf", "static"])
def test_one_loaded_model_samples_each_checkpoint_as_its_own_load_would(prepared_run, backend):
    """sample_each copies each next policy's weights into the model it loaded first (select and the
    m-step sample several checkpoints); every policy's samples must be those of its own load."""
    cfg = load_config(prepared_run / "config.yaml", [f"generation.backend={backend}"])
    first, second = prepared_run / "iter_0/init/policy", prepared_run / "iter_0/sft-warmup/train/policy"
    prompts = list(datasets.load_from_disk(str(prepared_run / "iter_0/init/data/prompts"))["prompt"][:6])
    each = sample_each(cfg, [(first, 1, "a"), (second, 2, "b"), (first, 1, "c")], prompts, 2)
    alone = [sample(cfg, first, prompts, 2, 1), sample(cfg, second, prompts, 2, 2)]
    assert [g.texts for g in each] == [alone[0].texts, alone[1].texts, alone[0].texts]
    assert alone[0].texts != alone[1].texts
    assert each[0].stats["backend"] == f"{backend} (generation.backend)"


def test_sampling_and_scoring_free_their_models_without_a_collector_pass(prepared_run):
    """rollout frees each model by deleting it, with no `gc.collect` (~0.3 s a model on the GPU
    machine): that holds only while models, backends and scorers form no reference cycles."""
    from transformers import PreTrainedModel

    cfg = load_config(prepared_run / "config.yaml", ["generation.backend=static"])
    first, second = prepared_run / "iter_0/init/policy", prepared_run / "iter_0/sft-warmup/train/policy"
    prompts = list(datasets.load_from_disk(str(prepared_run / "iter_0/init/data/prompts"))["prompt"][:4])
    live = lambda: sum(isinstance(o, PreTrainedModel) for o in gc.get_objects())  # noqa: E731
    gc.collect()
    before = live()
    gc.disable()
    try:
        gens = sample_each(cfg, [(first, 1, "a"), (second, 1, "b")], prompts, 1)
        score(cfg, prepared_run / "iter_0/rm-init/train/rm", prompts, [t[0] for t in gens[1].texts])
        after = live()
    finally:
        gc.enable()
    assert after == before


def test_a_tokenizer_loads_once_per_set_of_files_and_sampling_and_scoring_leave_it_as_loaded(prepared_run, tmp_path):
    policy, rm = prepared_run / "iter_0/init/policy", prepared_run / "iter_0/rm-init/train/rm"
    first, second, changed = (tmp_path / name for name in ("first", "second", "changed"))
    for folder in (first, second, changed):
        shutil.copytree(policy, folder)
    # Files no earlier test loaded, so the first load below is this process's first of them.
    for folder, mark in ((first, "a"), (second, "a"), (changed, "b")):
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "test_mark": mark}))
    with io_timing.counted() as io:
        tok = load_tokenizer(first)
        assert load_tokenizer(second) is tok
        assert load_tokenizer(changed) is not tok
    assert io["loads"] == 2
    cfg = load_config(prepared_run / "config.yaml", ["generation.backend=hf"])
    side = load_tokenizer(policy).padding_side
    prompts = ["a", "list three animals and a plant"]
    sample(cfg, policy, prompts, 2, seed=1)
    score(cfg, rm, prompts, ["cat", "a much longer answer than the first one"])
    assert load_tokenizer(policy).padding_side == side and load_tokenizer(rm).padding_side == side


def test_background_checkpoints_hold_the_weights_of_their_step(prepared_run, tmp_path):
    cfg = load_config(prepared_run / "config.yaml", [])
    start = prepared_run / "iter_0/init/policy"
    tok = load_tokenizer(start)
    rows = datasets.Dataset.from_list([completion_example(tok, f"say {i}", f"w{i} w{i}") for i in range(10)])
    args = trainer_args(
        SFTConfig, TrainConfig(learning_rate=1e-2, per_device_train_batch_size=2), cfg, tmp_path / "trainer"
    )
    trainer = SFTTrainer(model=str(start), args=args, train_dataset=rows, processing_class=tok)
    checkpoints = BackgroundCheckpoints(trainer, tmp_path, every=2)
    weights = {}

    class Probe(TrainerCallback):  # runs after the checkpoints' callback, at the same step
        def on_step_end(self, args, state, control, model=None, **kwargs):
            weights[state.global_step] = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    trainer.add_callback(Probe())
    with io_timing.counted() as io:
        trainer.train()
        checkpoints.finish()
    # Every 2 steps of 5, and the last.
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    for step in (2, 4, 5):
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / f"checkpoint-{step}").state_dict()
        assert saved.keys() == weights[step].keys()
        assert all(torch.equal(saved[k], weights[step][k]) for k in saved), step
        # Saved with the trainer's tokenizer (as resaved by transformers, one set of files for all).
        assert load_tokenizer(tmp_path / f"checkpoint-{step}") is load_tokenizer(tmp_path / "checkpoint-2")
        assert load_tokenizer(tmp_path / f"checkpoint-{step}").get_vocab() == tok.get_vocab()
    name = "model.embed_tokens.weight"
    assert not torch.equal(weights[2][name], weights[4][name])
    # The phase counts each candidate once, not the writes made on the writer's thread.
    assert io["saves"] == 3 and io["save_s"] > 0


def test_dpo_reference_is_loaded_frozen_in_the_policy_dtype(prepared_run):
    policy = prepared_run / "iter_0/init/policy"
    other = rundir.latest_output(prepared_run, "policy")  # sft-warmup's
    assert other != policy
    cfg = load_config(prepared_run / "config.yaml", ["policy.dtype=bfloat16"])
    ref = reference_model(cfg, policy, policy)
    # Not trl's fp32 copy: the dtype the steps sample in; and the very weights of the reference.
    assert {p.dtype for p in ref.parameters()} == {torch.bfloat16}
    saved = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.bfloat16).state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in ref.state_dict().items())
    lora = load_config(prepared_run / "config.yaml", ["e_step.train.lora.r=4"])
    # Under LoRA the policy with its adapters off is the reference; another reference is still loaded.
    assert reference_model(lora, policy, policy) is None
    assert reference_model(lora, policy, other) is not None


class _TokenRowsDPOTrainer(DPOTrainer):
    """trl's DPOTrainer, reference forward included, on rows already tokenized."""

    def _prepare_dataset(self, dataset, *args):
        return dataset


def test_dpo_on_sampled_logprobs_trains_as_dpo_with_the_reference_forward(prepared_run, tmp_path):
    """The static backend's log-probs stand in for the reference forward: on the same sampled tokens,
    trl's DPO logs the same loss and rewards step by step either way (the reference is the policy that
    sampled, as in the E-step)."""
    cfg = load_config(prepared_run / "config.yaml", ["generation.backend=static"])
    policy = prepared_run / "iter_0/sft-warmup/train/policy"
    prompts = list(datasets.load_from_disk(str(prepared_run / "iter_0/init/data/prompts"))["prompt"][:32])
    gens = sample(cfg, policy, prompts, 2, seed=5, logprobs=True)
    pairs = datasets.Dataset.from_list(
        [
            {
                "prompt_ids": p,
                "chosen_ids": ids[0],
                "rejected_ids": ids[1],
                "chosen_logps": lp[0],
                "rejected_logps": lp[1],
            }
            for p, ids, lp in zip(gens.prompt_ids, gens.token_ids, gens.logprobs)
        ]
    )
    train = TrainConfig(
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        learning_rate=5e-3,
        max_length=20,
        logging_steps=1,
        num_train_epochs=3,
    )
    # max_length cuts some completions: the sums must stop where trl's collator cuts.
    assert max(len(p["prompt_ids"]) + len(p["chosen_ids"]) for p in pairs) > 20
    rows = sampled_rows(pairs, train.max_length, group_by_length=False)
    tok = load_tokenizer(policy)
    logs = {}
    for name in ("sampling", "forward"):
        args = trainer_args(
            DPOConfig, train, cfg, tmp_path / name, beta=0.1, precompute_ref_log_probs=name == "sampling"
        )
        if name == "sampling":
            trainer = SampledReferenceDPOTrainer(model=str(policy), args=args, train_dataset=rows, processing_class=tok)
            assert trainer.ref_model is None
        else:
            trainer = _TokenRowsDPOTrainer(
                model=str(policy),
                ref_model=AutoModelForCausalLM.from_pretrained(policy),
                args=args,
                train_dataset=rows.remove_columns(["ref_chosen_logps", "ref_rejected_logps"]),
                processing_class=tok,
            )
        trainer.train()
        logs[name] = [
            (h["loss"], h["rewards/chosen"], h["rewards/rejected"]) for h in trainer.state.log_history if "loss" in h
        ]
    losses = [h[0] for h in logs["sampling"]]
    assert len(losses) == 12 and mean(losses[-4:]) < mean(losses[:4]) - 0.01, losses
    for a, b in zip(logs["sampling"], logs["forward"], strict=True):
        assert a == pytest.approx(b, abs=2e-4), logs


def test_e_step_with_the_static_backend_trains_dpo_on_the_sampled_tokens_and_logprobs(fresh_run):
    cfg = load_config(None, ["generation.backend=static", "e_step.select=false"], fresh_run)
    run_step("e-step", fresh_run, 1, cfg)
    result = done(fresh_run, 1, "e-step")
    assert result["metrics"]["dpo/reference_logps"] == "sampling"
    assert result["metrics"]["dpo/loss_last"] < result["metrics"]["dpo/loss_first"]
    pairs = datasets.load_from_disk(str(fresh_run / "iter_1/e-step/pairs/pairs"))
    tok = load_tokenizer(fresh_run / result["inputs"]["policy"])
    for p in pairs:
        for side in ("chosen", "rejected"):
            assert tok.decode(p[f"{side}_ids"], skip_special_tokens=True).strip() == p[side]
            assert len(p[f"{side}_logps"]) == len(p[f"{side}_ids"]) == p[f"{side}_tokens"]
            assert all(lp <= 0 for lp in p[f"{side}_logps"])
    # Where the sampler is not the reference, they cannot stand for it.
    initial = load_config(None, ["generation.backend=static", "e_step.reference=initial"], fresh_run)
    args = trainer_args(DPOConfig, initial.e_step.train, initial, fresh_run / "unused")
    assert "e_step.reference: initial" in unusable_because(initial, False, pairs, args)
    assert unusable_because(cfg, True, pairs, args) is None
    texts_only = pairs.remove_columns(["prompt_ids", "chosen_ids", "rejected_ids", "chosen_logps", "rejected_logps"])
    assert "returned no log-probs (those that do: static)" in unusable_because(
        load_config(None, [], fresh_run), True, texts_only, args
    )


def test_a_failed_background_write_fails_the_training_and_names_its_folder(prepared_run, tmp_path):
    cfg = load_config(prepared_run / "config.yaml", [])
    start = prepared_run / "iter_0/init/policy"
    tok = load_tokenizer(start)
    rows = datasets.Dataset.from_list([completion_example(tok, f"say {i}", f"w{i}") for i in range(4)])
    trainer = SFTTrainer(
        model=str(start),
        args=trainer_args(SFTConfig, TrainConfig(per_device_train_batch_size=2), cfg, tmp_path / "trainer"),
        train_dataset=rows,
        processing_class=tok,
    )
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the checkpoints' folder should be")
    checkpoints = BackgroundCheckpoints(trainer, blocked, every=1)
    with pytest.raises(OSError, match="blocked"):
        trainer.train()
        checkpoints.finish()


def test_load_and_save_counts_end_with_their_phase(prepared_run, tmp_path):
    policy = rundir.latest_output(prepared_run, "policy")
    originals = {name: PreTrainedModel.__dict__[name] for name in ("from_pretrained", "save_pretrained")}
    with pytest.raises(RuntimeError), io_timing.counted() as io:
        model = AutoModelForCausalLM.from_pretrained(policy)
        model.save_pretrained(tmp_path / "copy")
        AutoTokenizer.from_pretrained(policy)
        raise RuntimeError("the phase failed")
    # Each call counted once, and nothing counted once the phase is over, even a failed one.
    assert (io["loads"], io["saves"]) == (2, 1) and io["load_s"] > 0 and io["save_s"] > 0
    assert {name: PreTrainedModel.__dict__[name] for name in originals} == originals
    AutoModelForCausalLM.from_pretrained(tmp_path / "copy")
    assert io["loads"] == 2
