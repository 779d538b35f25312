"""Step `revise` (iteration K >= 1, with steps.reviser): SEFT's revision of the policy's weak responses.

generate  `reviser.samples_per_prompt` responses per prompt of the E-step's batch, from policy_{K-1}
score     rm_{K-1} scores them
revise    those scoring under this iteration's threshold (`reviser.threshold`, `reviser.schedule`: the
          share of responses revised grows over the iterations) are rewritten by iteration K's reviser
rescore   the same RM scores each revision
decide    a revision is kept only when the RM scores it above the response it revises. Written:
          `revisions` (every response, its revision if any, the verdict; also to the store), `sft`
          (kept revisions + the responses left alone; E-step mode seft trains on it), `pairs` (each kept
          revision chosen over its original; mode dpo+seft adds them to DPO)
"""

from __future__ import annotations

import math
from pathlib import Path
from statistics import mean, pstdev

import datasets
import numpy as np
from coevolve.data.records import revision_records
from coevolve.data.selection import policy_batch
from coevolve.revision.template import revision_prompt

from coevolve.core import rundir
from coevolve.core.rollout import sample, score
from coevolve.core.step import StepRun


def generate(step: StepRun, policy: Path, prompts: datasets.Dataset, tmp: Path) -> dict:
    seed = step.cfg.seed * 1000 + 200 + step.iteration
    gens = sample(step.cfg, policy, list(prompts["prompt"]), step.cfg.reviser.samples_per_prompt, seed)
    rows = [
        {"prompt_id": r["prompt_id"], "prompt": r["prompt"], "original": text}
        for r, texts in zip(prompts, gens.texts)
        for text in texts
    ]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp))
    return {"generate/samples": len(rows), "generate/tokens_per_s": gens.tokens_per_s}


def score_originals(step: StepRun, rm: Path, rows: datasets.Dataset, tmp: Path) -> dict:
    scores = score(step.cfg, rm, list(rows["prompt"]), list(rows["original"]))
    rows.add_column("original_score", scores).save_to_disk(str(tmp))
    return {"score/mean": mean(scores), "score/std": pstdev(scores)}


def threshold(scores: list[float], kind: str, value: float) -> float:
    """The score under which a response is revised: `value` itself (absolute), or the `value`-quantile
    of the scores, so that about that share of the responses is revised."""
    return value if kind == "absolute" else float(np.quantile(scores, value))


def revise(step: StepRun, reviser: Path, scored: datasets.Dataset, tmp: Path) -> dict:
    cfg, k = step.cfg, step.iteration
    schedule = cfg.reviser.schedule
    scores = list(scored["original_score"])
    cut = threshold(scores, cfg.reviser.threshold, schedule[min(k, len(schedule)) - 1])
    flagged = [s < cut for s in scores]
    asks = [revision_prompt(cfg.reviser.template, r["prompt"], r["original"]) for r, f in zip(scored, flagged) if f]
    texts = iter(t[0] for t in sample(cfg, reviser, asks, 1, cfg.seed * 1000 + 300 + k, "revise").texts)
    revised = [next(texts) if f else "" for f in flagged]
    scored.add_column("revised_flag", flagged).add_column("revised", revised).save_to_disk(str(tmp))
    return {"revise/threshold": cut, "revise/candidates": len(asks)}


def rescore(step: StepRun, rm: Path, revised: datasets.Dataset, tmp: Path) -> dict:
    todo = revised.filter(lambda r: r["revised_flag"])
    scores = iter(score(step.cfg, rm, list(todo["prompt"]), list(todo["revised"]), "rescore"))
    revised.add_column(
        "revised_score", [next(scores) if f else math.nan for f in revised["revised_flag"]]
    ).save_to_disk(str(tmp))
    return {"revise/unchanged": sum(r["revised"] == r["original"] for r in todo)}


def decide(rows: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """Each row with its verdict `kept` (revised, changed, and scored above the original by the RM),
    the SFT rows (kept revisions and the responses left alone) and the pairs (kept revision over its
    original). Revisions the RM does not prefer are dropped, and so are their weak originals."""
    revisions, sft, pairs = [], [], []
    for r in rows:
        # An unchanged text is no revision, whatever float noise between two scoring batches says.
        kept = r["revised_flag"] and r["revised"] != r["original"] and r["revised_score"] > r["original_score"]
        revisions.append({**r, "kept": kept})
        if kept or not r["revised_flag"]:
            sft.append(
                {
                    "prompt_id": r["prompt_id"],
                    "prompt": r["prompt"],
                    "completion": r["revised"] if kept else r["original"],
                    "source": "revision" if kept else "untouched",
                }
            )
        if kept:
            pairs.append(
                {
                    "prompt_id": r["prompt_id"],
                    "prompt": r["prompt"],
                    "chosen": r["revised"],
                    "rejected": r["original"],
                    "chosen_score": r["revised_score"],
                    "rejected_score": r["original_score"],
                    "source": "revision",
                }
            )
    return revisions, sft, pairs


def write_decisions(rescored: datasets.Dataset, tmp: Path) -> dict:
    revisions, sft, pairs = decide(rescored.to_list())
    # datasets cannot load back a saved empty dataset, so an empty set is simply not written.
    for name, rows in {"revisions": revisions, "sft": sft, "pairs": pairs}.items():
        if rows:
            datasets.Dataset.from_list(rows).save_to_disk(str(tmp / name))
    candidates = [r for r in revisions if r["revised_flag"]]
    kept = sum(r["kept"] for r in candidates)
    return {
        "revise/kept": kept,
        "revise/rejected": len(candidates) - kept,
        "revise/kept_fraction": kept / len(candidates) if candidates else 0.0,
        "revise/score_gain_mean": mean(r["revised_score"] - r["original_score"] for r in candidates)
        if candidates
        else 0.0,
        "revise/sft_rows": len(sft),
    }


def main(step: StepRun) -> dict:
    cfg, k, run = step.cfg, step.iteration, step.run_dir
    here = (k, step.name)
    if not rundir.is_done(run, k, "reviser-train"):
        raise RuntimeError(f"iteration {k} revise needs iteration {k}'s reviser-train finished first")
    reviser = step.inputs["reviser"] = run / rundir.read_done(run, k, "reviser-train")["outputs"]["reviser"]
    policy = step.inputs["policy"] = rundir.require_output(run, "policy", here)
    rm = step.inputs["rm"] = rundir.require_output(run, "rm", here)
    prompts = step.inputs["prompts"] = rundir.require_output(run, "prompts", here)

    batch = policy_batch(cfg, run, datasets.load_from_disk(str(prompts)), k)
    samples = step.phase("generate", lambda tmp: generate(step, policy, batch, tmp))
    scored = step.phase("score", lambda tmp: score_originals(step, rm, datasets.load_from_disk(str(samples)), tmp))
    revised = step.phase("revise", lambda tmp: revise(step, reviser, datasets.load_from_disk(str(scored)), tmp))
    rescored = step.phase("rescore", lambda tmp: rescore(step, rm, datasets.load_from_disk(str(revised)), tmp))
    decided = step.phase("decide", lambda tmp: write_decisions(datasets.load_from_disk(str(rescored)), tmp))

    revisions = datasets.load_from_disk(str(decided / "revisions"))
    step.store().append("revisions", k, revision_records(revisions, k, step.name, rundir.relative(run, policy)))
    return step.finish({name: f"decide/{name}" for name in ("revisions", "sft", "pairs") if (decided / name).exists()})
