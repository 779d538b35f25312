"""KL divergence of a policy from a reference along given responses, batched by length."""

from __future__ import annotations

from pathlib import Path

import torch

from coevolve.core.chat import policy_prompt_text
from coevolve.core.config import Config
from coevolve.core.models import load_policy

# Float32 logit elements one batch may hold (1 GiB each for the policy's and the reference's, and as
# much again for their log-softmax and its exp): generation's batch of 256 rows at 400 tokens over
# SmolLM2's 49K vocabulary asked for 15 GiB at once and ran a shared GPU out of memory.
LOGIT_BUDGET = 2**28


@torch.no_grad()
def response_kl(cfg: Config, policy: Path, reference: Path, prompts: list[str], responses: list[str]) -> list[float]:
    """Per response, the sum over its tokens of KL(policy(.|prefix) || reference(.|prefix)), the full
    next-token distributions compared at every prefix of the response. With responses sampled from the
    policy this estimates the sequence-level KL, never negative and with less variance than a
    difference of sampled log-probabilities. Responses are re-tokenized from their text; both models
    share the policy's tokenizer (the reference is an earlier policy of the same run)."""
    model, tok = load_policy(policy, cfg)
    ref, _ = load_policy(reference, cfg)
    device = next(model.parameters()).device
    rows = [
        (
            tok(policy_prompt_text(tok, p), add_special_tokens=False)["input_ids"],
            tok(r, add_special_tokens=False)["input_ids"],
        )
        for p, r in zip(prompts, responses, strict=True)
    ]
    out = [0.0] * len(rows)
    lengths = [len(head) + len(tail) for head, tail in rows]
    for idx in batches(lengths, cfg.generation.batch_size, model.config.vocab_size, LOGIT_BUDGET):
        width = max(lengths[i] for i in idx)
        ids = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        # Position t predicts token t+1: a response token's distribution sits one position earlier.
        at = torch.zeros((len(idx), width), dtype=torch.bool)
        for row, i in enumerate(idx):
            head, tail = rows[i]
            ids[row, : len(head) + len(tail)] = torch.tensor(head + tail)
            mask[row, : len(head) + len(tail)] = 1
            at[row, len(head) - 1 : len(head) + len(tail) - 1] = True
        ids, mask, at = ids.to(device), mask.to(device), at.to(device)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        logq = torch.log_softmax(ref(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
        sums = (kl * at).sum(-1).cpu().tolist()
        for row, i in enumerate(idx):
            out[i] = sums[row]
    del model, ref
    return out


def batches(lengths: list[int], batch_size: int, vocab_size: int, budget: int) -> list[list[int]]:
    """Indices of `lengths` in batches of similar length, each at most `batch_size` rows and (but for a
    single row) at most `budget` logit elements: rows x its longest x `vocab_size`."""
    out: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        # Sorted ascending, so row i is the batch's longest.
        if out and len(out[-1]) < batch_size and (len(out[-1]) + 1) * lengths[i] * vocab_size <= budget:
            out[-1].append(i)
        else:
            out.append([i])
    return out
