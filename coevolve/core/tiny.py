"""Tiny Llama-shaped models and tokenizers made locally from a task's corpus: the CPU demo and the
tests need no download. The policy and the RM get different tokenizers (word vs char level) and
different chat templates on purpose: coevolve must not assume they share either."""

from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

from coevolve.core.config import TinyModel

SPECIAL = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
ROLE_TOKENS = ["<|user|>", "<|assistant|>"]

# Word-level template: role tags are single tokens; each turn ends with the EOS token.
WORD_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' </s> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)
# Char-level template, deliberately unlike the word one.
CHAR_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'Q:' + m['content'] + '\n' }}"
    "{% else %}{{ 'A:' + m['content'] + '</s>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'A:' }}{% endif %}"
)


def build_tokenizer(kind: str, corpus: list[str]) -> PreTrainedTokenizerFast:
    specials = list(SPECIAL.values()) + ROLE_TOKENS
    if kind == "word":
        words = sorted({piece for text in corpus for piece, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)})
        vocab = {t: i for i, t in enumerate(specials + [w for w in words if w not in specials])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        template = WORD_TEMPLATE
    elif kind == "char":
        chars = sorted({c for text in corpus for c in text} | set("QA:\n "))
        vocab = {t: i for i, t in enumerate(specials + chars)}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        tok.decoder = decoders.Fuse()
        template = CHAR_TEMPLATE
    else:
        raise ValueError(f"tiny.tokenizer: unknown kind {kind!r} (word or char)")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=ROLE_TOKENS, **SPECIAL)
    fast.chat_template = template
    return fast


def _llama_config(spec: TinyModel, tok: PreTrainedTokenizerFast, **extra) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
        **extra,
    )


def build_tiny_policy(spec: TinyModel, tok: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(_llama_config(spec, tok))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def build_tiny_rm(spec: TinyModel, tok: PreTrainedTokenizerFast) -> LlamaForSequenceClassification:
    torch.manual_seed(spec.seed)
    return LlamaForSequenceClassification(_llama_config(spec, tok, num_labels=1))
