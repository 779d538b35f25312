"""KL divergence of a policy from a reference along given responses, batched by length."""
from __future__ import annotations

from pathlib import Path

import torch

from coevolve.core.chat import policy_prompt_text
from coevolve.core.config import Config
from coevolve.core.models import load_policy


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
        (tok(policy_prompt_text(tok, p), add_special_tokens=False)["input_ids"], tok(r, add_special_tokens=False)["input_ids"])
        for p, r in zip(prompts, responses, strict=True)
    ]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    out = [0.0] * len(rows)
    batch_size = cfg.generation.batch_size
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        width = max(len(rows[i][0]) + len(rows[i][1]) for i in idx)
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
