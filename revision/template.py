"""How the reviser is shown a response: one rendering for training it (reviser-train) and for using it
(revise), so it is asked exactly as it was taught. The wording is `reviser.template` in the config."""

from __future__ import annotations


def revision_prompt(template: str, prompt: str, response: str) -> str:
    """The reviser's user message for `response` to `prompt`; its answer is the revised response."""
    return template.format(prompt=prompt, response=response)
