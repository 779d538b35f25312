"""Step `m-step` (iteration K >= 1): refit the RM to the policy's shifted outputs (Mutual-Taught's M-step).

generate  one response per RM-update prompt from policy_K (after the E-step) and from policy_{K-1}
          (before it), drawn independently (different seeds), as the paper's y_t and y_{t-1}: with
          one seed, a policy that one DPO pass changed little answers identically and the pair is lost
score     rm_{K-1} scores both
pseudo    pseudo pair per prompt: policy_K's response preferred. delta = r(new) - r(old); epsilon = the
          std of the old policy's scores on these prompts; pairs with delta <= -epsilon (confidently
          worse) are dropped, and so are identical responses; slightly negative ones are kept (they act
          as regularisation, per the paper; `m_step.epsilon_filter: false` drops none of them). Dropped
          pairs are kept with the reason; when none is left the loop ends there, with policy_{K-1} and
          rm_{K-1} (not in the paper). On a sandbox task,
          the share of pseudo labels the gold reward agrees with is measured too (it trains nothing).
mix       the training set: kept pseudo pairs + the E-step's RM-ranked pairs (+ original pairs, if set)
train     Bradley-Terry with trl's RewardTrainer, restarting from the base RM (paper) or rm_{K-1}
measure   accuracy of rm_{K-1} and rm_K on held-out original pairs, the training mix and the pseudo pairs;
          with `m_step.max_heldout_drop` set, rm_K losing more than that on the held-out pairs ends the
          loop with policy_{K-1} and rm_{K-1} (not in the paper)
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from statistics import mean, pstdev

import datasets
from coevolve.data.records import pair_records
from coevolve.data.sampling import replay_mix
from coevolve.data.selection import iteration_prompts
from coevolve.data.store import Store
from coevolve.data.tasks import load_task
from coevolve.reward.training import accuracy_phase, train_rm

from coevolve.core import rundir
from coevolve.core.config import ConfigError
from coevolve.core.rollout import sample_each, score_each
from coevolve.core.scoring import pairwise_accuracy
from coevolve.core.step import StepRun


def generate(step: StepRun, new: Path, old: Path, prompts: datasets.Dataset, tmp: Path) -> dict:
    seed = step.cfg.seed * 1000 + 700 + step.iteration
    texts = list(prompts["prompt"])
    new_gen, old_gen = sample_each(
        step.cfg, [(new, seed, "generate: policy_K"), (old, seed + 1, "generate: policy_K-1")], texts, 1
    )
    datasets.Dataset.from_dict(
        {
            "prompt_id": list(prompts["prompt_id"]),
            "prompt": texts,
            "new": [t[0] for t in new_gen.texts],
            "old": [t[0] for t in old_gen.texts],
            "new_tokens": [n[0] for n in new_gen.num_tokens],
            "old_tokens": [n[0] for n in old_gen.num_tokens],
        }
    ).save_to_disk(str(tmp))
    return {"generate/prompts": len(texts), "generate/tokens_per_s": (new_gen.tokens_per_s + old_gen.tokens_per_s) / 2}


def score_both(step: StepRun, rm: Path, responses: datasets.Dataset, tmp: Path) -> dict:
    prompts = list(responses["prompt"])
    new, old = score_each(
        step.cfg, rm, prompts, [list(responses["new"]), list(responses["old"])], "score: policy_K, policy_K-1"
    )
    responses.add_column("new_score", new).add_column("old_score", old).save_to_disk(str(tmp))
    return {"score/new_mean": mean(new), "score/old_mean": mean(old)}


def pseudo_pairs(
    scored: datasets.Dataset, tmp: Path, gold: Callable[[str, str], float] | None = None, filtered: bool = True
) -> dict:
    epsilon = pstdev(scored["old_score"])
    kept, dropped = [], []
    for r in scored:
        delta = r["new_score"] - r["old_score"]
        row = {
            "prompt_id": r["prompt_id"],
            "prompt": r["prompt"],
            "chosen": r["new"],
            "rejected": r["old"],
            "chosen_score": r["new_score"],
            "rejected_score": r["old_score"],
            "delta": delta,
            "epsilon": epsilon,
        }
        if r["new"] == r["old"]:
            dropped.append({**row, "kept": False, "reason": "identical responses"})
        elif filtered and delta <= -epsilon:
            dropped.append({**row, "kept": False, "reason": "delta <= -epsilon (confidently worse)"})
        else:
            kept.append({**row, "kept": True, "reason": "kept"})
    # datasets cannot load back a saved empty dataset, so an empty set is simply not written.
    features = datasets.Dataset.from_list(kept + dropped).features
    for name, rows in (("kept", kept), ("dropped", dropped)):
        if rows:
            datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp / name))
    reasons: dict[str, int] = {}
    for d in dropped:
        reasons[d["reason"]] = reasons.get(d["reason"], 0) + 1
    return {
        **(gold_agreement(gold, kept, dropped) if gold and kept else {}),
        "pseudo/epsilon": epsilon,
        "pseudo/kept": len(kept),
        "pseudo/dropped": len(dropped),
        "pseudo/dropped_by_reason": reasons,
        "pseudo/kept_negative_delta": sum(p["delta"] < 0 for p in kept),
        "pseudo/delta_mean": mean(p["delta"] for p in kept + dropped),
    }


def nothing_kept(metrics: dict) -> str:
    """Why the loop ends when no pseudo pair is left: a policy that stopped moving answers alike before
    and after its E-step (seen with online RL collapsed to one answer per prompt), and pairs the old RM
    finds confidently worse say the E-step went backwards by its own measure."""
    n = metrics["pseudo/dropped"]
    reasons = ", ".join(f"{count} {reason}" for reason, count in metrics["pseudo/dropped_by_reason"].items())
    return f"the M-step dropped every one of its {n} pseudo pairs ({reasons}), leaving nothing to train the RM on"


def gold_agreement(gold: Callable[[str, str], float], kept: list[dict], dropped: list[dict]) -> dict:
    """How often "policy_K's response is better" is true by the gold reward (pairs it ties left out):
    Mutual-Taught's pseudo labels are only as good as the E-step's improvement."""

    def agreement(rows: list[dict]) -> tuple[float, int]:
        g_new = [gold(r["prompt"], r["chosen"]) for r in rows]
        g_old = [gold(r["prompt"], r["rejected"]) for r in rows]
        return pairwise_accuracy([1.0] * len(rows), [0.0] * len(rows), g_new, g_old)

    kept_acc, kept_n = agreement(kept)
    out = {"pseudo/gold_label_acc": kept_acc, "pseudo/gold_label_pairs": kept_n}
    worse = [d for d in dropped if d["reason"].startswith("delta")]
    if worse:  # the filter is right where the gold agrees the new response is worse: a low share here
        out["pseudo/gold_label_acc_dropped"], out["pseudo/gold_label_pairs_dropped"] = agreement(worse)
    return out


def mix(step: StepRun, kept: datasets.Dataset, e_pairs: Path | None, original: Path | None, tmp: Path) -> dict:
    """This iteration's pairs (kept pseudo pairs, the E-step's pairs, original pairs if asked for),
    then, if `stores.replay` is set, pairs of earlier iterations replayed in those proportions."""
    cfg, k = step.cfg, step.iteration
    parts = {"pseudo": kept}
    if cfg.m_step.include_e_step_pairs and e_pairs is not None:
        parts["e-step"] = datasets.load_from_disk(str(e_pairs))
    if cfg.m_step.original_pairs_ratio > 0 and original is not None:
        train = datasets.load_from_disk(str(original)).filter(lambda r: r["split"] == "train")
        n = min(len(train), round(cfg.m_step.original_pairs_ratio * len(kept)))
        rng = random.Random(cfg.seed + k)
        chosen = train.select(sorted(rng.sample(range(len(train)), n)))
        parts["original"] = chosen.map(lambda r: {"chosen_score": float("nan"), "rejected_score": float("nan")})
    rows = [r for name, ds in parts.items() for r in pair_records(ds, k, step.name, name)]
    current = datasets.Dataset.from_list(rows).shuffle(seed=cfg.seed + k)
    if cfg.stores.replay:
        current = replay_mix(current, Store(step.run_dir, cfg.stores.max_rows), k, cfg.stores.replay, cfg.seed + k)
    current.save_to_disk(str(tmp))
    return {
        **{f"mix/{name}": n for name, n in Counter(current["source"]).items()},
        "mix/replayed": sum(i < k for i in current["iteration"]),
    }


def check(step: StepRun) -> None:
    """Refused before the step writes anything: the held-out rule with no held-out pairs to measure."""
    original = rundir.latest_output(step.run_dir, "pairs", iteration_max=0)
    if step.cfg.m_step.max_heldout_drop is not None and original is None:
        raise ConfigError(
            "m_step.max_heldout_drop: the run has no original preference pairs to hold out (data.pairs); unset it"
        )


def main(step: StepRun) -> dict:
    cfg, k, run = step.cfg, step.iteration, step.run_dir
    here = (k, step.name)
    if not rundir.is_done(run, k, "e-step"):
        raise RuntimeError(f"iteration {k} m-step needs iteration {k}'s e-step finished first")
    e_done = rundir.read_done(run, k, "e-step")
    if e_done["stop"]:
        raise RuntimeError(f"iteration {k} e-step stopped (best win rate under tau): the loop ends, there is no m-step")
    new = step.inputs["policy_new"] = run / e_done["outputs"]["policy"]
    old = step.inputs["policy_old"] = run / e_done["inputs"]["policy"]
    rm = step.inputs["rm"] = rundir.require_output(run, "rm", here)
    base = rundir.latest_output(run, "rm", iteration_max=0)
    start_from = step.inputs["rm_start"] = base if cfg.m_step.restart_from == "base" else rm
    prompts_path = step.inputs["prompts"] = rundir.require_output(run, "prompts", here)
    prompts = datasets.load_from_disk(str(prompts_path))
    original = rundir.latest_output(run, "pairs", iteration_max=0)
    # Mode seft with no kept revision leaves the E-step without pairs.
    e_pairs = run / e_done["outputs"]["pairs"] if "pairs" in e_done["outputs"] else None
    if e_pairs is not None:
        step.inputs["e_step_pairs"] = e_pairs
    if original is not None:  # its held-out split measures the RM, whatever the mix
        step.inputs["original_pairs"] = original

    batch = iteration_prompts(prompts, "rm", cfg.m_step.prompts_per_iteration, k)
    responses = step.phase("generate", lambda tmp: generate(step, new, old, batch, tmp))
    scored = step.phase("score", lambda tmp: score_both(step, rm, datasets.load_from_disk(str(responses)), tmp))
    gold = load_task(cfg.data.task).gold if cfg.data.task else None
    pseudo = step.phase(
        "pseudo", lambda tmp: pseudo_pairs(datasets.load_from_disk(str(scored)), tmp, gold, cfg.m_step.epsilon_filter)
    )
    if not (pseudo / "kept").exists():
        store_pseudo_pairs(step, pseudo)
        outputs = {"rm": rundir.relative(run, rm), "policy": rundir.relative(run, old), "dropped": "pseudo/dropped"}
        return step.finish(outputs, stop=nothing_kept(step.metrics))
    kept = datasets.load_from_disk(str(pseudo / "kept"))
    train_mix = step.phase("mix", lambda tmp: mix(step, kept, e_pairs, original, tmp))
    mixed = datasets.load_from_disk(str(train_mix))
    step.phase("train", lambda tmp: train_rm(step, start_from, mixed, cfg.m_step.train, tmp))

    sets = {"train_mix": mixed, "pseudo": kept}
    if original is not None:
        sets["heldout"] = datasets.load_from_disk(str(original)).filter(lambda r: r["split"] == "heldout")
    step.phase("before", lambda tmp: accuracy_phase(step, rm, sets, "rm_before"))
    step.phase("after", lambda tmp: accuracy_phase(step, step.path("train") / "rm", sets, "rm_after"))

    store_pseudo_pairs(step, pseudo)
    outputs = {"rm": "train/rm", "pseudo_pairs": "pseudo/kept", "train_mix": "mix"}
    if (pseudo / "dropped").exists():
        outputs["dropped"] = "pseudo/dropped"
    stop = None
    if heldout_guard(step.metrics, cfg.m_step.max_heldout_drop):
        # the run goes on from what it had before this iteration, as after a tau stop
        outputs.update(rm=rundir.relative(run, rm), policy=rundir.relative(run, old))
        stop = f"the M-step's RM lost more than {cfg.m_step.max_heldout_drop} accuracy on the held-out original pairs"
    return step.finish(outputs, stop=stop)


def store_pseudo_pairs(step: StepRun, pseudo: Path) -> None:
    """Every pseudo pair, kept or dropped (with why), into the run's store."""
    parts = [datasets.load_from_disk(str(pseudo / name)) for name in ("kept", "dropped") if (pseudo / name).exists()]
    rows = datasets.concatenate_datasets(parts)
    k = step.iteration
    step.store().append(
        "pseudo_pairs", k, pair_records(rows, k, step.name, "pseudo", extra=("delta", "epsilon", "kept", "reason"))
    )


def heldout_guard(metrics: dict, max_drop: float | None) -> bool:
    """Whether rm_K fell more than `max_drop` below rm_{K-1} on the held-out original pairs."""
    if max_drop is None:
        return False
    return metrics["rm_before/accuracy_heldout"] - metrics["rm_after/accuracy_heldout"] > max_drop
