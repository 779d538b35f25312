"""Conversation rendering, in one place for generation, scoring and training.

The policy and the RM need not share a tokenizer or chat template: text crosses between them decoded,
and each side re-renders the conversation with its own template. Training data for trl uses the same
forms (conversational when the tokenizer has a chat template, plain text otherwise), so what the RM is
trained on is exactly what it scores.
"""

from __future__ import annotations


def has_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def prompt_messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def policy_prompt_text(tok, prompt: str) -> str:
    """What the policy is conditioned on when it answers `prompt`."""
    if has_template(tok):
        return tok.apply_chat_template(prompt_messages(prompt), tokenize=False, add_generation_prompt=True)
    return prompt + "\n"


def rm_example(tok, prompt: str, response: str):
    """One (prompt, response) as the RM sees it, in trl's RewardTrainer format: messages when the RM
    tokenizer has a chat template, else `prompt\\nresponse` text (trl appends EOS to plain text)."""
    if has_template(tok):
        return prompt_messages(prompt) + [{"role": "assistant", "content": response}]
    return prompt + "\n" + response


def rm_input_ids(tok, prompt: str, response: str) -> list[int]:
    """Token ids exactly as trl's RewardTrainer tokenizes `rm_example` (see trl.data_utils._tokenize)."""
    example = rm_example(tok, prompt, response)
    if isinstance(example, list):
        return list(tok.apply_chat_template(example, tokenize=True, return_dict=True)["input_ids"])
    text = example if example.endswith(tok.eos_token) else example + tok.eos_token
    return list(tok(text=text)["input_ids"])


def trl_prompt(tok, prompt: str):
    """A trl row's prompt for the policy: messages when its tokenizer has a chat template, else the text
    it is conditioned on (`policy_prompt_text`)."""
    return prompt_messages(prompt) if has_template(tok) else prompt + "\n"


def trl_completion(tok, completion: str):
    return [{"role": "assistant", "content": completion}] if has_template(tok) else completion


def preference_example(tok, prompt: str, chosen: str, rejected: str, for_rm: bool) -> dict:
    """A trl preference row: for the RM, whole conversations; for DPO, prompt + completions."""
    if for_rm:
        return {"chosen": rm_example(tok, prompt, chosen), "rejected": rm_example(tok, prompt, rejected)}
    return {
        "prompt": trl_prompt(tok, prompt),
        "chosen": trl_completion(tok, chosen),
        "rejected": trl_completion(tok, rejected),
    }


def completion_example(tok, prompt: str, completion: str) -> dict:
    """A trl prompt-completion row for SFT."""
    return {"prompt": trl_prompt(tok, prompt), "completion": trl_completion(tok, completion)}
