"""Prompts too long for the policy, found at init: a prompt the policy cannot read and still answer
within its context makes the sampler allocate for it (a 50,000-word prompt asked for 220 GB) or fail
deep inside a step. `data.long_prompts` says what happens to them: dropped, truncated, or an error."""

from __future__ import annotations

import datasets

from coevolve.core.chat import policy_prompt_text

from .sources import DataError


def fit_prompts(ds: datasets.Dataset, source: str, tok, limit: int, rule: str) -> tuple[datasets.Dataset, int]:
    """`ds` with every row's prompt within `limit` tokens as the policy reads it (chat-rendered), by
    `rule` (drop | truncate | error); returns it and how many rows were dropped or truncated."""
    prompts = ds["prompt"]
    rendered = tok([policy_prompt_text(tok, p) for p in prompts], add_special_tokens=False)["input_ids"]
    long = [i for i, ids in enumerate(rendered) if len(ids) > limit]
    if not long:
        return ds, 0
    if rule == "error":
        first = long[0]
        raise DataError(
            f"{source}: row {first}: prompt of {len(rendered[first])} tokens, over data.max_prompt_tokens={limit} "
            f"({len(long)} such rows; data.long_prompts: drop or truncate to keep going without them)"
        )
    if rule == "drop":
        keep = set(range(len(ds))) - set(long)
        return ds.select(sorted(keep)), len(long)
    raw = tok([prompts[i] for i in long], add_special_tokens=False)["input_ids"]
    cut = {}
    for i, ids in zip(long, raw):
        # The template's own tokens count against the limit too; the prompt's start is kept.
        room = limit - (len(rendered[i]) - len(ids))
        if room < 1:
            raise DataError(
                f"{source}: row {i}: the chat template alone takes {len(rendered[i]) - len(ids)} tokens, "
                f"over data.max_prompt_tokens={limit}"
            )
        cut[i] = tok.decode(ids[:room], skip_special_tokens=True)
    return ds.map(lambda row, i: {"prompt": cut.get(i, row["prompt"])}, with_indices=True), len(long)
