"""Step `evaluate` (any iteration K, 0 included): how good policy_K is, and how well rm_K still judges it.

generate  on the held-out eval prompts (`data.eval_size`), `evaluate.samples_per_prompt` responses each
          from policy_K and one from policy_0 (the policy iteration 0 hands on), with the same seed at
          every iteration, so iterations and arms are compared on the same draws
score     rm_K scores policy_K's responses and the original held-out pairs; the referee scores them
          too: the sandbox task's gold reward r*, else the judge RM (`evaluate.judge`), else none
kl        KL(policy_K || policy_0) along policy_K's first responses: per response, the next-token
          distributions' KL summed over its tokens (core/divergence.py); the mean over prompts
measure   the policy's mean referee reward, rm_K's mean score, response length, the win rate of policy_K
          over policy_0 by the referee, and rm_K's pairwise accuracy against the referee on (a) the
          original held-out pairs and (b) fresh pairs, two responses of policy_K to one prompt: the
          distribution-shift measurement (a frozen RM loses accuracy on (b) as the policy moves)
"""

from __future__ import annotations

from pathlib import Path
from statistics import mean, pstdev

import datasets

from coevolve.core import rundir
from coevolve.core.divergence import response_kl
from coevolve.core.rollout import sample, score
from coevolve.core.scoring import pairwise_accuracy, win_rate
from coevolve.core.step import StepRun


class Referee:
    """What "better" means on this run: the task's gold reward, else a judge RM, else nothing."""

    def __init__(self, step: StepRun):
        cfg = step.cfg
        self.task = None
        self.judge = None
        if cfg.data.task:
            from coevolve.data.tasks import load_task

            self.task = load_task(cfg.data.task)
        elif cfg.evaluate.judge is not None:
            self.judge = step.inputs["judge"] = rundir.require_output(
                step.run_dir, "judge", (step.iteration, step.name)
            )
        self.cfg = cfg
        self.name = "gold" if self.task else "judge" if self.judge else None

    def __bool__(self) -> bool:
        return self.name is not None

    def __call__(self, prompts: list[str], responses: list[str], label: str) -> list[float]:
        if self.task is not None:
            return [self.task.gold(p, r) for p, r in zip(prompts, responses, strict=True)]
        return score(self.cfg, self.judge, prompts, responses, label)


def generate(step: StepRun, policy: Path, initial: Path, prompts: datasets.Dataset, tmp: Path) -> dict:
    cfg = step.cfg
    seed = cfg.seed * 1000 + 900
    texts = list(prompts["prompt"])
    gens = sample(cfg, policy, texts, cfg.evaluate.samples_per_prompt, seed, "generate: policy_K")
    rows = [
        {
            "prompt_id": r["prompt_id"],
            "prompt": r["prompt"],
            "sample": j,
            "response": text,
            "num_tokens": n,
            "model": "policy_K",
        }
        for r, outs, counts in zip(prompts, gens.texts, gens.num_tokens)
        for j, (text, n) in enumerate(zip(outs, counts))
    ]
    if initial != policy:
        first = sample(cfg, initial, texts, 1, seed, "generate: policy_0")
        rows += [
            {
                "prompt_id": r["prompt_id"],
                "prompt": r["prompt"],
                "sample": 0,
                "response": t[0],
                "num_tokens": n[0],
                "model": "policy_0",
            }
            for r, t, n in zip(prompts, first.texts, first.num_tokens)
        ]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp))
    return {"generate/tokens_per_s": gens.tokens_per_s}


def score_all(
    step: StepRun, rm: Path, referee: Referee, responses: datasets.Dataset, heldout: datasets.Dataset | None, tmp: Path
) -> dict:
    """rm_K's and the referee's scores of every response, and of both sides of the held-out pairs."""
    prompts, texts = list(responses["prompt"]), list(responses["response"])
    if heldout is not None:
        prompts += list(heldout["prompt"]) * 2
        texts += list(heldout["chosen"]) + list(heldout["rejected"])
    # The RM scores only what it is measured on: policy_K's responses and the held-out pairs.
    models = list(responses["model"])
    rm_rows = [i for i in range(len(prompts)) if i >= len(models) or models[i] == "policy_K"]
    rm_scores = dict(
        zip(rm_rows, score(step.cfg, rm, [prompts[i] for i in rm_rows], [texts[i] for i in rm_rows], "score: rm_K"))
    )
    ref_scores = referee(prompts, texts, "score: judge") if referee else [float("nan")] * len(prompts)
    n = len(responses)
    responses.add_column("rm_score", [rm_scores.get(i, float("nan")) for i in range(n)]).add_column(
        "referee", ref_scores[:n]
    ).save_to_disk(str(tmp / "responses"))
    if heldout is not None:
        m = len(heldout)
        heldout = heldout.select_columns(["prompt_id", "prompt", "chosen", "rejected"])
        for name, values in (
            ("rm_chosen", [rm_scores[n + i] for i in range(m)]),
            ("rm_rejected", [rm_scores[n + m + i] for i in range(m)]),
            ("referee_chosen", ref_scores[n : n + m]),
            ("referee_rejected", ref_scores[n + m :]),
        ):
            heldout = heldout.add_column(name, values)
        heldout.save_to_disk(str(tmp / "heldout"))
    return {"score/rm_mean": mean(rm_scores[i] for i in rm_rows if i < n)}


def fresh_pairs(responses: datasets.Dataset) -> list[dict]:
    """Per prompt, policy_K's first two responses, when they differ."""
    by_prompt: dict[str, dict[int, dict]] = {}
    for r in responses:
        if r["model"] == "policy_K" and r["sample"] < 2:
            by_prompt.setdefault(r["prompt_id"], {})[r["sample"]] = r
    return [
        {
            "prompt_id": pid,
            "prompt": s[0]["prompt"],
            "a": s[0]["response"],
            "b": s[1]["response"],
            "rm_a": s[0]["rm_score"],
            "rm_b": s[1]["rm_score"],
            "referee_a": s[0]["referee"],
            "referee_b": s[1]["referee"],
        }
        for pid, s in by_prompt.items()
        if len(s) == 2 and s[0]["response"] != s[1]["response"]
    ]


def kl_estimate(step: StepRun, policy: Path, initial: Path, first: datasets.Dataset, tmp: Path) -> dict:
    kl = response_kl(step.cfg, policy, initial, list(first["prompt"]), list(first["response"]))
    first.select_columns(["prompt_id", "prompt", "response"]).add_column("kl", kl).save_to_disk(str(tmp))
    return {"kl/to_initial": mean(kl)}


def measure(scored: Path, referee: Referee, kl: float, max_new_tokens: int, tmp: Path) -> dict:
    responses = datasets.load_from_disk(str(scored / "responses"))
    ours = responses.filter(lambda r: r["model"] == "policy_K")
    first = ours.filter(lambda r: r["sample"] == 0).sort("prompt_id")
    metrics = {
        "eval/prompts": len(first),
        "eval/rm_score_mean": mean(first["rm_score"]),
        "eval/length_mean": mean(first["num_tokens"]),
        # Answers that ran into the sampling limit: a constraint met only past it is never met.
        "eval/cut_share": mean(n >= max_new_tokens for n in first["num_tokens"]),
        "eval/kl_to_initial": kl,
    }
    tmp.mkdir()
    if referee:
        metrics[f"eval/{referee.name}_mean"] = mean(first["referee"])
        metrics[f"eval/{referee.name}_std"] = pstdev(first["referee"])
        initial = responses.filter(lambda r: r["model"] == "policy_0").sort("prompt_id")
        metrics["eval/win_rate_vs_initial"] = win_rate(first["referee"], initial["referee"]) if len(initial) else 0.5
        pairs = fresh_pairs(responses)
        acc, counted = pairwise_accuracy(
            *(list(p[c] for p in pairs) for c in ("rm_a", "rm_b", "referee_a", "referee_b"))
        )
        metrics.update({"eval/rm_acc_current": acc, "eval/fresh_pairs": counted})
        if pairs:
            datasets.Dataset.from_list(pairs).save_to_disk(str(tmp / "fresh_pairs"))
    if (scored / "heldout").exists():
        h = datasets.load_from_disk(str(scored / "heldout"))
        if referee:
            acc, counted = pairwise_accuracy(
                h["rm_chosen"], h["rm_rejected"], h["referee_chosen"], h["referee_rejected"]
            )
        else:  # no referee: the pairs' own labels are the reference
            acc, counted = win_rate(h["rm_chosen"], h["rm_rejected"]), len(h)
        metrics.update({"eval/rm_acc_original": acc, "eval/original_pairs": counted})
    return metrics


def main(step: StepRun) -> dict:
    k, run = step.iteration, step.run_dir
    here = (k, step.name)
    policy = step.inputs["policy"] = rundir.require_output(run, "policy", here)
    rm = step.inputs["rm"] = rundir.require_output(run, "rm", here)
    initial = step.inputs["policy_0"] = rundir.latest_output(run, "policy", iteration_max=0)
    prompts_path = step.inputs["prompts"] = rundir.require_output(run, "prompts", here)
    prompts = datasets.load_from_disk(str(prompts_path)).filter(lambda r: r["split"] == "eval")
    if len(prompts) == 0:
        raise RuntimeError(f"{prompts_path}: no prompt in split 'eval'; the run was initialised with data.eval_size=0")
    original = rundir.latest_output(run, "pairs", iteration_max=0)
    heldout = None
    if original is not None:
        step.inputs["original_pairs"] = original
        heldout = datasets.load_from_disk(str(original)).filter(lambda r: r["split"] == "heldout")
        heldout = heldout if len(heldout) else None
    referee = Referee(step)

    responses = step.phase("generate", lambda tmp: generate(step, policy, initial, prompts, tmp))
    scored = step.phase(
        "score", lambda tmp: score_all(step, rm, referee, datasets.load_from_disk(str(responses)), heldout, tmp)
    )
    kl = 0.0
    if policy != initial:
        first = datasets.load_from_disk(str(scored / "responses")).filter(
            lambda r: r["model"] == "policy_K" and r["sample"] == 0
        )
        step.phase("kl", lambda tmp: kl_estimate(step, policy, initial, first, tmp))
        kl = step.metrics["kl/to_initial"]
    step.phase("measure", lambda tmp: measure(scored, referee, kl, step.cfg.sampling.max_new_tokens, tmp))
    outputs = {"responses": "score/responses"}
    if (step.path("measure") / "fresh_pairs").exists():
        outputs["fresh_pairs"] = "measure/fresh_pairs"
    return step.finish(outputs)
