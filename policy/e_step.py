"""Step `e-step` (iteration K >= 1): improve the policy under the current RM (Mutual-Taught's E-step).

generate  M samples per policy-update prompt from policy_{K-1}
score     the current RM scores every sample, re-rendered with the RM's own template
pairs     chosen/rejected per prompt by the configured rule (policy/pairs.py); unpaired prompts kept with why
train     DPO with trl from policy_{K-1}; reference = the iteration's start (paper) or the initial policy;
          when it is the start, its log-probs are the ones taken while sampling (no reference forward);
          a checkpoint every `save_steps` and one at the end, written while training goes on
select    on D_MS each checkpoint and policy_{K-1} answer every prompt; the RM judges; the checkpoint
          with the best win rate becomes policy_K, unless its win rate is under tau: then the loop stops
          and policy_{K-1} is handed on

`e_step.mode` dpo is the above (the paper). The SEFT modes use iteration K's revise step
(revision/revise.py): `seft` replaces generate, score, pairs and DPO by SFT (trl) on its `sft` set,
kept revisions plus the responses left alone, and hands its kept-revision pairs on to the M-step as
the RM-ranked pairs; `dpo+seft` adds a phase `mix` after pairs: the kept revisions, chosen over the
responses they revise (source "revision"), join this step's pairs for DPO.

The online modes `grpo` and `rloo` (policy/online.py) replace generate, score, pairs and DPO by one
phase train: trl's GRPO or RLOO trainer from policy_{K-1} on this iteration's policy prompts, the
current RM scoring each rollout; select and the tau stop are as above, and no pairs are handed on.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from statistics import mean, pstdev

import datasets
from coevolve.data.records import pair_records, response_records
from coevolve.data.selection import policy_batch
from coevolve.policy import online
from coevolve.policy.pairs import RULES
from coevolve.policy.sampled_reference import (
    SampledReferenceDPOTrainer,
    not_sampled_because,
    sampled_rows,
    unusable_because,
)
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer

from coevolve.core import distributed, loaded, rundir
from coevolve.core.checkpoints import BackgroundCheckpoints
from coevolve.core.config import Config
from coevolve.core.models import device_of, dtype_of, load_tokenizer
from coevolve.core.rollout import sample, sample_each, score, score_each
from coevolve.core.scoring import win_rate
from coevolve.core.step import StepRun
from coevolve.core.training import (
    keep_log,
    lora_config,
    merge_adapter_checkpoint,
    preference_dataset,
    start_model,
    train_sft,
    trainer_args,
)

log = logging.getLogger("coevolve")


def generate(step: StepRun, policy: Path, prompts: datasets.Dataset, tmp: Path, logprobs: bool) -> dict:
    """M samples per prompt; with `logprobs` (where the backend gives them), each sample's token ids and
    their log-probs too, for DPO's reference (policy/sampled_reference.py)."""
    m = step.cfg.e_step.num_samples
    gens = sample(
        step.cfg, policy, list(prompts["prompt"]), m, seed=step.cfg.seed * 1000 + step.iteration, logprobs=logprobs
    )
    rows = [
        {"prompt_id": r["prompt_id"], "prompt": r["prompt"], "sample": j, "response": text, "num_tokens": n}
        for r, texts, counts in zip(prompts, gens.texts, gens.num_tokens)
        for j, (text, n) in enumerate(zip(texts, counts))
    ]
    if gens.logprobs is not None:
        sampled = [
            (p, ids, lp)
            for p, rows_ids, rows_lp in zip(gens.prompt_ids, gens.token_ids, gens.logprobs)
            for ids, lp in zip(rows_ids, rows_lp)
        ]
        for row, (p, ids, lp) in zip(rows, sampled, strict=True):
            row.update(prompt_ids=p, response_ids=ids, response_logps=lp)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp))
    lengths = [r["num_tokens"] for r in rows]
    return {
        "generate/backend": gens.stats["backend"],
        "generate/samples": len(rows),
        "generate/tokens_per_s": gens.tokens_per_s,
        "generate/length_mean": mean(lengths),
        "generate/length_max": max(lengths),
        "generate/empty_share": sum(not r["response"] for r in rows) / len(rows),
    }


def score_samples(step: StepRun, rm: Path, samples: datasets.Dataset, tmp: Path) -> dict:
    scores = score(step.cfg, rm, list(samples["prompt"]), list(samples["response"]))
    samples.add_column("score", scores).save_to_disk(str(tmp))
    return {"score/mean": mean(scores), "score/std": pstdev(scores)}


def build_pairs(step: StepRun, scored: datasets.Dataset, tmp: Path) -> dict:
    rule = RULES[step.cfg.e_step.pair_rule]
    by_prompt: dict[str, list[tuple[int, dict]]] = {}
    # generate's token lists (where the backend gave log-probs) are read for the paired rows only:
    # converting every sample's costs seconds at the paper's scale.
    for i, row in enumerate(scored.select_columns(["prompt_id", "prompt", "response", "score", "num_tokens"])):
        by_prompt.setdefault(row["prompt_id"], []).append((i, row))
    pairs, unpaired, picked_rows = [], [], []
    for pid, rows in by_prompt.items():
        picked = rule(
            [r["response"] for _, r in rows], [r["score"] for _, r in rows], [r["num_tokens"] for _, r in rows]
        )
        if isinstance(picked, str):
            unpaired.append({"prompt_id": pid, "prompt": rows[0][1]["prompt"], "reason": picked})
            continue
        (ci, c), (ri, r) = rows[picked[0]], rows[picked[1]]
        pairs.append(
            {
                "prompt_id": pid,
                "prompt": c["prompt"],
                "chosen": c["response"],
                "rejected": r["response"],
                "chosen_score": c["score"],
                "rejected_score": r["score"],
                "chosen_tokens": c["num_tokens"],
                "rejected_tokens": r["num_tokens"],
                "source": "e-step",
            }
        )
        picked_rows.append((ci, ri))
    if "response_logps" in scored.column_names and pairs:
        tokens = scored.select_columns(["prompt_ids", "response_ids", "response_logps"])
        chosen, rejected = (tokens.select([at[side] for at in picked_rows]) for side in (0, 1))
        for pair, c, r in zip(pairs, chosen, rejected, strict=True):
            pair.update(
                prompt_ids=c["prompt_ids"],
                chosen_ids=c["response_ids"],
                rejected_ids=r["response_ids"],
                chosen_logps=c["response_logps"],
                rejected_logps=r["response_logps"],
            )
    if not pairs:
        raise RuntimeError(
            f"iteration {step.iteration} e-step: no prompt gave a pair ({len(unpaired)} unpaired); the RM scores every sample alike"
        )
    datasets.Dataset.from_list(pairs).save_to_disk(str(tmp / "pairs"))
    # datasets cannot load back a saved empty dataset, so an empty set is simply not written.
    if unpaired:
        datasets.Dataset.from_list(unpaired).save_to_disk(str(tmp / "unpaired"))
    return {
        "pairs/count": len(pairs),
        "pairs/unpaired": len(unpaired),
        "pairs/chosen_score_mean": mean(p["chosen_score"] for p in pairs),
        "pairs/rejected_score_mean": mean(p["rejected_score"] for p in pairs),
        "pairs/margin_mean": mean(p["chosen_score"] - p["rejected_score"] for p in pairs),
        "pairs/chosen_tokens_mean": mean(p["chosen_tokens"] for p in pairs),
        "pairs/rejected_tokens_mean": mean(p["rejected_tokens"] for p in pairs),
    }


def reference_model(cfg: Config, policy: Path, reference: Path):
    """DPO's reference, loaded as the steps load a policy to sample from (`policy.dtype`: bf16 on a
    GPU), not as trl would build it (in the trained dtype, fp32): it is frozen, so half the memory, and
    its forward needs none of autocast's casts. None under LoRA when it is the policy itself: trl's
    reference is then the policy with its adapters off, the iteration's start, as the paper's."""
    if reference == policy and cfg.e_step.train.lora is not None:
        return None
    dtype = dtype_of(cfg.policy.dtype, device_of(cfg))
    # The step's copy of the model that sampled, where it is the reference; trl prepares it for its
    # training (under mixed precision it wraps its forward), which selection's baseline must not see.
    kept = loaded.copy_of(reference, "policy", dtype)
    return kept if kept is not None else AutoModelForCausalLM.from_pretrained(reference, dtype=dtype)


def train(step: StepRun, policy: Path, reference: Path, pairs: datasets.Dataset, tmp: Path) -> dict:
    """DPO on `pairs`; the reference's log-probs are the sampled ones where they stand for it
    (policy/sampled_reference.py), else trl runs the reference forward in every step."""
    cfg = step.cfg
    tok = load_tokenizer(policy)
    args = trainer_args(DPOConfig, cfg.e_step.train, cfg, tmp / "checkpoints", beta=cfg.e_step.beta)
    peft = lora_config(cfg.e_step.train, policy, "CAUSAL_LM")
    why_not = unusable_because(cfg, reference == policy, pairs, args)
    if why_not is None:
        args.precompute_ref_log_probs = True
        rows = sampled_rows(pairs, args.max_length, cfg.e_step.train.group_by_length)
        trainer = SampledReferenceDPOTrainer(
            model=start_model(policy, "policy", args),
            args=args,
            train_dataset=rows,
            processing_class=tok,
            peft_config=peft,
        )
    else:
        log.info(f"dpo: the reference's log-probs come from its forward in every step: {why_not}")
        rows = preference_dataset(tok, pairs, cfg.e_step.train, for_rm=False)
        trainer = DPOTrainer(
            model=start_model(policy, "policy", args),
            ref_model=reference_model(cfg, policy, reference),
            args=args,
            train_dataset=rows,
            processing_class=tok,
            peft_config=peft,
        )
    candidates = BackgroundCheckpoints(trainer, tmp / "checkpoints", cfg.e_step.save_steps)
    trainer.train()
    candidates.finish()
    merge_candidates(tmp)
    return {
        "dpo/pairs": len(rows),
        "dpo/reference_logps": "sampling" if why_not is None else "forward",
        **keep_log(trainer, tmp / "train_log.jsonl", "dpo"),
    }


def train_seft(step: StepRun, policy: Path, rows: datasets.Dataset, tmp: Path) -> dict:
    cfg = step.cfg
    trainer = train_sft(cfg, policy, rows, cfg.e_step.sft, tmp / "checkpoints", save_every=cfg.e_step.save_steps)
    merge_candidates(tmp)
    return {
        "sft/rows": len(rows),
        "sft/revised": sum(s == "revision" for s in rows["source"]),
        **keep_log(trainer, tmp / "train_log.jsonl", "sft"),
    }


def train_online(step: StepRun, policy: Path, rm: Path, prompts: list[str], tmp: Path) -> dict:
    metrics = online.train(step.cfg, policy, rm, prompts, step.cfg.seed * 1000 + step.iteration, tmp)
    merge_candidates(tmp)
    return metrics


def merge_candidates(tmp: Path) -> None:
    """After LoRA training every candidate needs its adapters merged: it may become the next step's policy."""
    if distributed.is_main():
        for ckpt in (tmp / "checkpoints").glob("checkpoint-*"):
            merge_adapter_checkpoint(ckpt)


def mix_revisions(pairs: datasets.Dataset, revisions: datasets.Dataset, tmp: Path) -> dict:
    columns = ["prompt_id", "prompt", "chosen", "rejected", "chosen_score", "rejected_score", "source"]
    datasets.concatenate_datasets([pairs.select_columns(columns), revisions.select_columns(columns)]).save_to_disk(
        str(tmp)
    )
    return {"mix/e-step": len(pairs), "mix/revision": len(revisions)}


def pick_checkpoint(rows: list[dict], tau: float) -> tuple[str, str | None]:
    """The candidate with the best win rate (ties: the later checkpoint), and why the loop stops if
    even it wins less than tau."""
    best = max(rows, key=lambda r: (r["win_rate"], _step_number(Path(r["checkpoint"]))))
    won = best["win_rate"]
    stop = f"the E-step's best checkpoint won {won:.3f} of the model-selection prompts, under tau={tau}"
    return best["checkpoint"], stop if won < tau else None


def select(
    step: StepRun, policy: Path, rm: Path, select_prompts: list[str], checkpoints: list[Path], tmp: Path
) -> dict:
    cfg = step.cfg
    seed = cfg.seed * 1000 + 500 + step.iteration
    # Every model answers with the same seed, so the comparison is paired; the RM scores all answers in one pass.
    models = [(policy, seed, "select: start")] + [(ckpt, seed, f"select: {ckpt.name}") for ckpt in checkpoints]
    answers = [[t[0] for t in gens.texts] for gens in sample_each(cfg, models, select_prompts, 1)]
    baseline, *scored = score_each(cfg, rm, select_prompts, answers, "select: score")
    rows = [
        {"checkpoint": ckpt.name, "win_rate": win_rate(scores, baseline), "score_mean": mean(scores)}
        for ckpt, scores in zip(checkpoints, scored, strict=True)
    ]
    best, stop = pick_checkpoint(rows, cfg.e_step.tau)
    tmp.mkdir(parents=True)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp / "candidates"))
    # The stop's reason, or the checkpoint picked.
    (tmp / ("stop.txt" if stop else "selected.txt")).write_text(stop or best)
    best_row = next(r for r in rows if r["checkpoint"] == best)
    return {
        "select/best_checkpoint": best,
        "select/best_win_rate": best_row["win_rate"],
        "select/baseline_score_mean": mean(baseline),
        "select/best_score_mean": best_row["score_mean"],
        "select/win_rates": {r["checkpoint"]: r["win_rate"] for r in rows},
        "select/stopped": stop is not None,
    }


def _step_number(path: Path) -> int:
    return int(path.name.split("-")[-1])


def revise_outputs(run: Path, k: int, mode: str) -> dict:
    """The outputs of iteration k's revise step, which the SEFT modes train on; none in the other modes."""
    if mode not in ("seft", "dpo+seft"):
        return {}
    if not rundir.is_done(run, k, "revise"):
        raise RuntimeError(f"e_step.mode={mode} needs iteration {k}'s revise step finished first (steps.reviser: true)")
    outputs = rundir.read_done(run, k, "revise")["outputs"]
    if mode == "seft" and "sft" not in outputs:
        raise RuntimeError(
            f"iteration {k} revise kept no revision and left no response alone: nothing to fine-tune the policy on"
        )
    return outputs


def main(step: StepRun) -> dict:
    cfg, k, run = step.cfg, step.iteration, step.run_dir
    mode = cfg.e_step.mode
    here = (k, step.name)
    policy = step.inputs["policy"] = rundir.require_output(run, "policy", here)
    rm = step.inputs["rm"] = rundir.require_output(run, "rm", here)
    prompts_path = step.inputs["prompts"] = rundir.require_output(run, "prompts", here)
    prompts = datasets.load_from_disk(str(prompts_path))
    revised = revise_outputs(run, k, mode)

    if mode == "seft":
        sft = step.inputs["sft"] = run / revised["sft"]
        trained = step.phase("train", lambda tmp: train_seft(step, policy, datasets.load_from_disk(str(sft)), tmp))
    elif mode in online.TRAINERS:
        batch = list(policy_batch(cfg, run, prompts, k)["prompt"])
        trained = step.phase("train", lambda tmp: train_online(step, policy, rm, batch, tmp))
    else:
        initial = rundir.latest_output(run, "policy", iteration_max=0)
        reference = step.inputs["reference"] = policy if cfg.e_step.reference == "iteration_start" else initial
        batch = policy_batch(cfg, run, prompts, k)
        logprobs = not_sampled_because(cfg, reference == policy) is None
        samples = step.phase("generate", lambda tmp: generate(step, policy, batch, tmp, logprobs))
        scored = step.phase("score", lambda tmp: score_samples(step, rm, datasets.load_from_disk(str(samples)), tmp))
        built = step.phase("pairs", lambda tmp: build_pairs(step, datasets.load_from_disk(str(scored)), tmp))
        train_pairs = "pairs/pairs"
        if mode == "dpo+seft" and "pairs" in revised:
            kept = step.inputs["revision_pairs"] = run / revised["pairs"]
            step.phase(
                "mix",
                lambda tmp: mix_revisions(
                    datasets.load_from_disk(str(built / "pairs")), datasets.load_from_disk(str(kept)), tmp
                ),
            )
            train_pairs = "mix"
        trained = step.phase(
            "train",
            lambda tmp: train(step, policy, reference, datasets.load_from_disk(str(step.path(train_pairs))), tmp),
        )

    checkpoints = sorted((trained / "checkpoints").glob("checkpoint-*"), key=_step_number)
    if cfg.e_step.select:
        select_prompts = list(prompts.filter(lambda r: r["split"] == "select")["prompt"])
        chosen = step.phase("select", lambda tmp: select(step, policy, rm, select_prompts, checkpoints, tmp))
        stop = (chosen / "stop.txt").read_text() if (chosen / "stop.txt").exists() else None
        selected = "" if stop else (chosen / "selected.txt").read_text()
    else:
        stop, selected = None, checkpoints[-1].name
    if not cfg.e_step.keep_checkpoints and distributed.is_main():
        for ckpt in checkpoints:
            if ckpt.name != selected:
                shutil.rmtree(ckpt)

    if mode == "seft":
        # The kept revisions are this E-step's RM-ranked pairs; they are in the revisions store already.
        outputs = {"pairs": revised["pairs"]} if "pairs" in revised else {}
    elif mode in online.TRAINERS:
        outputs = {}  # the rollouts trained on are the trainer's own; its log keeps their rewards
    else:
        store = step.store()
        scored_rows = datasets.load_from_disk(str(scored))
        store.append(
            "responses",
            k,
            response_records(scored_rows, k, step.name, rundir.relative(run, policy), rundir.relative(run, rm)),
        )
        store.append("pairs", k, pair_records(datasets.load_from_disk(str(built / "pairs")), k, step.name, "e-step"))
        outputs = {"pairs": "pairs/pairs", "samples": "score", "train_pairs": train_pairs}

    outputs["policy"] = rundir.relative(run, policy) if stop else f"train/checkpoints/{selected}"
    return step.finish(outputs, stop=stop)
