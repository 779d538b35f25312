"""DPO whose reference log-probs come from the pass that sampled the pairs.

In Mutual-Taught's E-step the reference is the iteration's starting policy, the very model that
sampled the responses. The generation backend can return each sampled token's log-prob under that
model (untempered, no top-p: fastgen/sampling.py), so the reference forward trl runs in every training
step (a quarter of the step's FLOPs) computes numbers already at hand. For them to be the right numbers
DPO must train on the tokens as sampled, not on the decoded text tokenized again (which need not give
the same tokens back), so the rows handed to trl are token ids.
"""

from __future__ import annotations

from unittest import mock

import datasets
from trl import DPOTrainer
from trl.trainer import dpo_trainer

from coevolve.core.config import Config
from coevolve.core.generation import with_logprobs

# The pair columns build_pairs adds when the samples came with their log-probs.
SAMPLED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "chosen_logps", "rejected_logps")


def not_sampled_because(cfg: Config, same_as_policy: bool) -> str | None:
    """Why the sampling pass cannot give the reference's log-probs, or None: then the e-step asks for them."""
    if cfg.e_step.reference_logps == "forward":
        return "e_step.reference_logps is forward"
    if not same_as_policy:
        return "the reference is the initial policy, not the policy that sampled (e_step.reference: initial)"
    return None


def unusable_because(cfg: Config, same_as_policy: bool, pairs: datasets.Dataset, args) -> str | None:
    """Why the sampled log-probs cannot stand for the reference's in this training, or None if they can."""
    if (why := not_sampled_because(cfg, same_as_policy)) is not None:
        return why
    if any(c not in pairs.column_names for c in SAMPLED_COLUMNS):
        if cfg.e_step.mode == "dpo+seft":
            return "the revision pairs mixed in (e_step.mode dpo+seft) were not sampled by the policy"
        return f"the generation backend that sampled them returned no log-probs (those that do: {', '.join(with_logprobs())})"
    if args.ld_alpha is not None or args.truncation_mode != "keep_start":
        return "ld_alpha or truncation_mode keep_end weigh or cut the completions differently from a plain sum"
    return None


def sampled_rows(pairs: datasets.Dataset, max_length: int | None, group_by_length: bool) -> datasets.Dataset:
    """trl's tokenized preference rows, with each completion's reference log-prob summed over the tokens
    trl keeps: its collator cuts prompt + completion to `max_length` from the start, and a prompt that
    fills it leaves no completion (trl drops such rows; so does this)."""
    rows = []
    for p in pairs:
        keep = None if max_length is None else max_length - len(p["prompt_ids"])
        if keep is not None and keep <= 0:
            continue
        row = {
            "prompt_ids": p["prompt_ids"],
            "chosen_ids": p["chosen_ids"],
            "rejected_ids": p["rejected_ids"],
            "ref_chosen_logps": sum(p["chosen_logps"][:keep]),
            "ref_rejected_logps": sum(p["rejected_logps"][:keep]),
        }
        if group_by_length:
            row["length"] = len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"]))
        rows.append(row)
    return datasets.Dataset.from_list(rows)


class SampledReferenceDPOTrainer(DPOTrainer):
    """trl's DPOTrainer in its precomputed-reference mode (`precompute_ref_log_probs`: the loss reads
    `ref_chosen_logps` / `ref_rejected_logps` from the batch, no reference model is built), on rows
    from `sampled_rows`. It only keeps trl from tokenizing the rows again and from computing the
    log-probs it is given."""

    def __init__(self, *args, **kwargs):
        if not kwargs["args"].precompute_ref_log_probs:
            raise ValueError("SampledReferenceDPOTrainer needs a DPOConfig with precompute_ref_log_probs=True")
        # trl keys the cache of its precompute pass with a sha256 of every weight, read on the CPU (5-6 s
        # for 0.5B); that pass never runs here.
        with mock.patch.object(dpo_trainer, "hash_module", lambda module: ""):
            super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset

    def _precompute_ref_logps(self, dataset, name, batch_size):
        return dataset
