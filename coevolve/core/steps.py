"""The steps a run is made of, one entry each, in run order: the one table that the run order
(core/rundir.py), the plan (core/plan.py), the launch (core/launch.py), `coevolve step`'s choices,
the report's columns and the Prefect flow read. Adding a step is its module (a `main(step)`, and an
optional `check(step)`) and one entry here.

Modules are named, not imported: importing this costs none of the libraries the steps import, and
core imports nothing of the steps above it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from coevolve.core.config import Config


@dataclass(frozen=True)
class Step:
    name: str
    module: str
    # "zero": the run's starting point; "later": the E-step/M-step iterations 1+; "any": both.
    iterations: Literal["zero", "later", "any"]
    # Trains a model: only these go through the multi-GPU launcher (cfg.launch).
    trains: bool
    # The field of cfg.retries that applies when its process fails; sampling fails in other ways than training.
    retry: Literal["training", "generation"]
    # Only measures: no step reads its outputs, so none waits for it or is built on it.
    measures: bool = False
    # The `steps.*` switch of the config that adds it to the plan; None: always in it.
    switch: str | None = None
    # Config fields (dotted prefixes) its outputs are made from (core/provenance.py): changed, they make
    # it stale. Fields in no step's list change how or how far a run goes, not what its steps compute:
    # iterations, run_name, steps, retries, tracking, and where and how the same distributions are
    # computed (device, launch, generation; the models' dtype after init).
    depends_on: tuple[str, ...] = ()
    # The report's per-iteration table: (column, metric key as the step writes it in DONE.json).
    columns: tuple[tuple[str, str], ...] = ()

    def runs_at(self, k: int) -> bool:
        return self.iterations == "any" or (self.iterations == "zero") == (k == 0)

    def enabled(self, cfg: Config) -> bool:
        return self.switch is None or bool(getattr(cfg.steps, self.switch))


def position(name: str) -> int:
    """Where a step comes in an iteration: the table's order is the run order."""
    return list(STEPS).index(name)


STEPS = {
    step.name: step
    for step in (
        # `init` only materialises models and data: it trains nothing, but a failure there is no sampling one.
        Step(
            "init",
            "coevolve.init_step",
            "zero",
            trains=False,
            retry="training",
            depends_on=("data", "policy", "rm", "evaluate.judge"),
        ),
        Step(
            "sft-warmup",
            "coevolve.policy.sft_warmup",
            "zero",
            trains=True,
            retry="training",
            switch="sft_warmup",
            depends_on=("seed", "sft_warmup"),
        ),
        Step(
            "rm-init",
            "coevolve.reward.rm_init",
            "zero",
            trains=True,
            retry="training",
            switch="rm_init",
            depends_on=("seed", "sampling", "data", "rm", "rm_init"),
        ),
        Step(
            "reviser-train",
            "coevolve.revision.reviser_train",
            "later",
            trains=True,
            retry="training",
            switch="reviser",
            depends_on=("seed", "reviser"),
        ),
        Step(
            "revise",
            "coevolve.revision.revise",
            "later",
            trains=False,
            retry="generation",
            switch="reviser",
            depends_on=("seed", "sampling", "reviser", "stores"),
        ),
        Step(
            "e-step",
            "coevolve.policy.e_step",
            "later",
            trains=True,
            retry="training",
            depends_on=("seed", "sampling", "e_step", "stores"),
            columns=(
                ("policy score (samples)", "score/mean"),
                ("select win rate", "select/best_win_rate"),
                ("policy_K score (D_MS)", "select/best_score_mean"),
                ("pairs", "pairs/count"),
                ("unpaired prompts", "pairs/unpaired"),
                ("response tokens", "generate/length_mean"),
                ("DPO loss (last)", "dpo/loss_last"),
            ),
        ),
        Step(
            "m-step",
            "coevolve.reward.m_step",
            "later",
            trains=True,
            retry="training",
            switch="m_step",
            depends_on=("seed", "sampling", "m_step", "stores", "data.task"),
            columns=(
                ("pseudo kept", "pseudo/kept"),
                ("pseudo dropped", "pseudo/dropped"),
                ("pseudo labels right by gold", "pseudo/gold_label_acc"),
                ("RM loss (last)", "rm_train/loss_last"),
                ("RM acc held-out, before", "rm_before/accuracy_heldout"),
                ("RM acc held-out, after", "rm_after/accuracy_heldout"),
                ("RM acc pseudo, before", "rm_before/accuracy_pseudo"),
                ("RM acc pseudo, after", "rm_after/accuracy_pseudo"),
            ),
        ),
        Step(
            "evaluate",
            "coevolve.evaluate_step",
            "any",
            trains=False,
            measures=True,
            retry="generation",
            switch="evaluate",
            depends_on=("seed", "sampling", "evaluate", "data.task"),
            columns=(
                # What a referee (the sandbox's gold, or a judge) says first; the RM's own view after it.
                ("eval: gold reward", "eval/gold_mean"),
                ("eval: judge reward", "eval/judge_mean"),
                ("eval: win rate vs policy_0", "eval/win_rate_vs_initial"),
                ("eval: KL to policy_0", "eval/kl_to_initial"),
                ("eval: RM score (proxy)", "eval/rm_score_mean"),
                ("eval: RM acc original pairs", "eval/rm_acc_original"),
                ("eval: RM acc current policy", "eval/rm_acc_current"),
                ("eval: current policy's pairs (n)", "eval/fresh_pairs"),
            ),
        ),
    )
}
