"""The "static" generation backend on tiny random models (CPU, fp32): greedy output equals HF generate
token for token; seeded sampling is reproducible and independent of batching; the sampler draws from
the top-p distribution; EOS, stop strings and n per prompt behave as in the HF backend."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from pydantic import ValidationError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from coevolve.core.config import ConfigError, GenerationConfig
from coevolve.core.fastgen import StaticGraphBackend, UnsupportedModel, backend, sampling
from coevolve.core.fastgen.model import CHUNK
from coevolve.core.fastgen.sampling import Sampler, row_stats, sequence_key, top_candidates, uniform
from coevolve.core.generation import (
    SamplingParams,
    backend_class,
    backend_for,
    choose_backend,
    make_backend,
    with_logprobs,
)

PROMPTS = ["hello there", "a", "the quick brown fox jumps over", "1 + 1 =", "zz", "once upon a time in a land far away"]


@pytest.fixture(scope="module")
def tok():
    # A byte-level tokenizer with no merges: 256 byte tokens plus <eos> and <pad> (258: not a multiple
    # of 128, so the padded LM head is exercised too).
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"], vocab["<pad>"] = len(vocab), len(vocab) + 1
    t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", pad_token="<pad>")


def tiny(kind: str, tok, **extra):
    torch.manual_seed(0)
    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=512,
        initializer_range=0.2,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    common.update(extra)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **common)).eval()
    return LlamaForCausalLM(LlamaConfig(**common)).eval()


def hf_greedy(model, tok, prompt: str, max_new: int) -> list[int]:
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]], device=model.device)
    out = model.generate(
        ids, do_sample=False, max_new_tokens=max_new, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
    )
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize(
    "kind, extra",
    [
        ("qwen2", {}),
        ("llama", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False}),
        (
            "llama",
            {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}, "num_key_value_heads": 1},
        ),
    ],
)
def test_greedy_matches_hf_generate_token_for_token(tok, kind, extra, monkeypatch):
    monkeypatch.setattr(backend, "MIN_ROWS", 1)
    model = tiny(kind, tok, **extra)
    # 5 slots for 6 prompts x 2 samples of different lengths: slots are refilled as rows finish, and
    # the long rows left at the end are moved into a smaller batch. (Prompts are taken shortest first:
    # "1 + 1 =" sample 0 is the 5th sequence, in slot 4.)
    be = StaticGraphBackend(model, tok, batch_size=5, sync_every=4)
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=24)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    lengths = [[3, 3] for _ in PROMPTS]
    lengths[3][0] = lengths[5][1] = 24
    lengths[0][1] = 9
    out, _, stats = be.generate_ids(ids, params, max_new=lengths)
    for prompt, samples, m in zip(PROMPTS, out, lengths):
        ref = hf_greedy(model, tok, prompt, 24)
        assert samples == [ref[: m[0]], ref[: m[1]]], prompt
    assert stats["compactions"] >= 1


def test_compiled_pieces_sample_what_eager_ones_sample_and_compile_once(tok, monkeypatch):
    # Inductor's fused pieces (fusion.py; on by default on CUDA) against the eager ones, here through
    # Inductor's CPU code; the GPU lane runs them under graphs. Compiled with dynamic shapes, they must
    # serve every row count and cache length without compiling again (they did not while a first step's
    # rows equal to the slots fused the two into one symbol). And a graph is captured right after one
    # eager step (StaticGraphBackend._capture): under the capture the sampler may hold rows, eagerly it
    # never does; were the pieces to see a difference (a None for a tensor), the capture would compile,
    # which breaks it on a GPU (seen on an H100).
    from torch._dynamo.utils import counters

    compiled = lambda: sum(counters["stats"].values())  # noqa: E731
    model = tiny("llama", tok, attention_bias=True, tie_word_embeddings=False)
    params = SamplingParams(n=2, temperature=0.8, top_p=0.9, max_new_tokens=12, seed=3, logprobs=True)
    engines = {c: StaticGraphBackend(model, tok, batch_size=16, compile_ops=c, fallback_rows=2) for c in (True, False)}
    runs = {c: be.generate(PROMPTS, params) for c, be in engines.items()}
    assert runs[True].stats["compiled_ops"] is True and runs[False].stats["compiled_ops"] is False
    assert runs[True].token_ids == runs[False].token_ids
    for a, b in zip(runs[True].logprobs, runs[False].logprobs):
        torch.testing.assert_close([torch.tensor(x) for x in a], [torch.tensor(x) for x in b])
    after_first, be = compiled(), engines[True]
    be.generate(PROMPTS * 3, replace(params, max_new_tokens=40))
    assert be.cache.max_len > 64 and compiled() == after_first
    st = be.state
    st.done[:8], st.step[:8], st.pos[:8] = False, 0, 4  # eight live rows, at their first token
    be.step(8, be.cache.max_len)
    monkeypatch.setattr(sampling, "_capturing", lambda t: True)
    be.step(8, be.cache.max_len)
    assert compiled() == after_first


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["bmm", "sdpa", "triton"])
def test_greedy_on_cuda_under_graphs_matches_hf_generate_token_for_token(tok, attention, monkeypatch):
    monkeypatch.setattr(backend, "MIN_ROWS", 1)
    # tl.dot takes fp32 as tf32 unless told otherwise, and greedy then parts from HF's fp32 within 24
    # tokens (seen on an H200); in ieee fp32 it is exact. Read when the kernel compiles, in this test.
    monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")
    model = tiny("llama", tok, attention_bias=True).cuda()
    be = StaticGraphBackend(model, tok, batch_size=5, sync_every=4, attention=attention, cuda_graphs=True)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    out, _, stats = be.generate_ids(ids, SamplingParams(n=2, temperature=0.0, max_new_tokens=24))
    assert stats["cuda_graphs"] is True and stats["attention"] == attention and stats["graphs"] >= 1
    for prompt, samples in zip(PROMPTS, out):
        ref = hf_greedy(model, tok, prompt, 24)
        assert samples == [ref, ref], prompt


@pytest.mark.gpu
@pytest.mark.parametrize("candidates, fallback_rows", [(64, 64), (16, 1)])
def test_cuda_graphs_change_no_sample_and_no_logprob(tok, candidates, fallback_rows):
    # With 16 candidates and a budget of one redraw a step, most rows wait for theirs under the graphs.
    # The graphs run the compiled pieces (CUDA's default), the reference neither graphs nor compilation.
    model = tiny("qwen2", tok).cuda()
    params = SamplingParams(n=3, temperature=0.8, top_p=0.9, max_new_tokens=20, seed=7, logprobs=True)
    settings = dict(batch_size=8, sync_every=4, candidates=candidates, fallback_rows=fallback_rows)
    graphs = StaticGraphBackend(model, tok, cuda_graphs=True, **settings).generate(PROMPTS, params)
    eager = StaticGraphBackend(model, tok, cuda_graphs=False, compile_ops=False, **settings).generate(PROMPTS, params)
    assert graphs.stats["graphs"] >= 1 and eager.stats["graphs"] == 0
    assert graphs.stats["compiled_ops"] is True and eager.stats["compiled_ops"] is False
    assert (graphs.stats["deferred_steps"] > 0) == (fallback_rows == 1) and eager.stats["deferred_steps"] == 0
    assert graphs.token_ids == eager.token_ids and graphs.texts == eager.texts
    for a, b in zip(graphs.logprobs, eager.logprobs):
        torch.testing.assert_close([torch.tensor(x) for x in a], [torch.tensor(x) for x in b])


def test_greedy_texts_and_counts_match_hf_backend(tok):
    model = tiny("qwen2", tok)
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=16)
    ours = make_backend("static", model, tok, batch_size=4).generate(PROMPTS, params)
    ref = make_backend("hf", model, tok, batch_size=1).generate(PROMPTS, params)
    assert ours.texts == ref.texts
    assert ours.num_tokens == ref.num_tokens


def test_eos_ends_a_row_and_is_counted(tok):
    model = tiny("qwen2", tok)
    ids = tok("hello there", add_special_tokens=False)["input_ids"]
    free = StaticGraphBackend(model, tok).generate_ids([ids], SamplingParams(temperature=0.0, max_new_tokens=12))[0][0][
        0
    ]
    model.generation_config.eos_token_id = free[4]  # the 5th greedy token now ends the row
    first = free.index(free[4])
    out = StaticGraphBackend(model, tok).generate_ids([ids], SamplingParams(temperature=0.0, max_new_tokens=12))[0][0][
        0
    ]
    assert out == free[: first + 1]
    assert out == hf_greedy(model, tok, "hello there", 12)[: len(out)]


def test_same_seed_same_samples_whatever_the_batching(tok):
    model = tiny("llama", tok)
    params = SamplingParams(n=3, temperature=0.8, top_p=0.9, max_new_tokens=20, seed=7)
    a = StaticGraphBackend(model, tok, batch_size=16).generate(PROMPTS, params)
    b = StaticGraphBackend(model, tok, batch_size=2, sync_every=3).generate(PROMPTS, params)
    assert a.texts == b.texts
    # a prompt's samples do not depend on the other prompts of the call
    alone = StaticGraphBackend(model, tok, batch_size=4).generate(PROMPTS[:1], params)
    assert alone.texts[0] == a.texts[0]
    other = StaticGraphBackend(model, tok, batch_size=16).generate(
        PROMPTS, SamplingParams(n=3, temperature=0.8, top_p=0.9, max_new_tokens=20, seed=8)
    )
    assert other.texts != a.texts
    assert len({t for row in a.texts for t in row}) > len(PROMPTS)  # samples of a prompt differ


def test_stop_strings_end_rows_early(tok):
    model = tiny("qwen2", tok)
    be = StaticGraphBackend(model, tok, batch_size=4, sync_every=2)
    free = be.generate(PROMPTS, SamplingParams(n=1, temperature=0.0, max_new_tokens=30))
    text = free.texts[2][0]
    stop = text[5:7]  # a string the greedy completion of prompt 2 holds
    out = be.generate(PROMPTS, SamplingParams(n=1, temperature=0.0, max_new_tokens=30, stop=(stop,)))
    assert out.texts[2][0] == text[: text.find(stop)]
    assert out.num_tokens[2][0] < free.num_tokens[2][0]
    assert out.stats["stop_string_hits"] >= 1


def test_weights_are_reread_each_call(tok):
    model = tiny("qwen2", tok)
    be = StaticGraphBackend(model, tok)
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    before = be.generate(PROMPTS[:2], params).texts
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight.mul_(-1.0)  # a fused weight: the backend must see the change
    after = be.generate(PROMPTS[:2], params).texts
    assert after != before
    assert after == make_backend("hf", model, tok).generate(PROMPTS[:2], params).texts


@pytest.mark.parametrize(
    "kind, extra",
    # An untied head padded to whole chunks; a tied head of whole chunks, read as the embedding's one cast.
    [("llama", {"attention_bias": True, "tie_word_embeddings": False}), ("qwen2", {"vocab_size": 3 * CHUNK})],
)
def test_fp32_weights_computed_in_bf16_sample_as_the_bf16_model_and_follow_its_updates(tok, kind, extra):
    # A trainer's fp32 weights sampled as its bf16 autocast would: the same samples as a bf16 copy.
    model = tiny(kind, tok, **extra)
    params = SamplingParams(n=2, temperature=0.8, top_p=0.9, max_new_tokens=12, seed=3, logprobs=True)
    be = StaticGraphBackend(model, tok, dtype=torch.bfloat16)
    assert be.w.qkv_w[0].dtype == be.w.o_w[0].dtype == be.w.embed.dtype == be.w.lm_w.dtype == torch.bfloat16
    assert (be.w.lm_w is be.w.embed) == (kind == "qwen2")
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]

    def as_bf16():
        ref = copy.deepcopy(model).to(torch.bfloat16)
        ref.model.rotary_emb = model.model.rotary_emb  # .to() rounds its fp32 frequencies; autocast does not
        return StaticGraphBackend(ref, tok).generate_ids(ids, params)

    before = be.generate_ids(ids, params)
    assert before[:2] == as_bf16()[:2]
    with torch.no_grad():  # the optimizer's in-place step on an unfused weight: the cast must follow it
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(-1.0)
    after = be.generate_ids(ids, params)
    assert after[0] != before[0] and after[:2] == as_bf16()[:2]
    assert not be.w.refresh()  # the casts stay where captured graphs point


@pytest.mark.parametrize("name", ["hf", "static"])
def test_update_weights_samples_from_the_new_checkpoint(tok, name):
    model, other = tiny("qwen2", tok), tiny("qwen2", tok, initializer_range=0.3)
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    be = make_backend(name, model, tok)
    before = be.generate(PROMPTS[:3], params).texts
    be.update_weights(other.state_dict())
    after = be.generate(PROMPTS[:3], params).texts
    assert after != before
    assert after == make_backend(name, other, tok).generate(PROMPTS[:3], params).texts


def test_backends_are_registered_by_name_and_say_what_they_give():
    assert backend_class("static") is StaticGraphBackend
    assert with_logprobs() == ["static"]
    with pytest.raises(ConfigError, match="unknown backend 'vllm'; choose one of \\['hf', 'static'\\]"):
        backend_class("vllm")


@pytest.mark.parametrize("temperature, top_p", [(0.8, 0.9), (1.3, 1.0), (0.0, 1.0)])
def test_sampled_logprobs_are_the_untempered_logprobs_of_a_forward_pass(tok, temperature, top_p, monkeypatch):
    # What DPO's reference would compute over the same tokens: log_softmax of the plain logits (no
    # temperature, no top-p), here with slots refilled and rows compacted along the way.
    monkeypatch.setattr(backend, "MIN_ROWS", 1)
    model = tiny("qwen2", tok)
    be = StaticGraphBackend(model, tok, batch_size=5, sync_every=4)
    params = SamplingParams(n=2, temperature=temperature, top_p=top_p, max_new_tokens=20, seed=3, logprobs=True)
    gens = be.generate(PROMPTS, params)
    assert gens.prompt_ids == [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    for prompt_ids, samples, logps, counts in zip(gens.prompt_ids, gens.token_ids, gens.logprobs, gens.num_tokens):
        for ids, lp, n in zip(samples, logps, counts):
            assert len(ids) == len(lp) == n
            with torch.no_grad():
                logits = model(torch.tensor([prompt_ids + ids])).logits[0, len(prompt_ids) - 1 : -1]
            want = torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(ids)[:, None]).squeeze(1)
            assert torch.allclose(torch.tensor(lp, dtype=torch.float64), want, atol=1e-4), (ids, lp, want)
    # Asking for them changes no sample.
    assert be.generate(PROMPTS, replace(params, logprobs=False)).texts == gens.texts


def test_top_candidates_equal_topk():
    torch.manual_seed(1)
    logits = torch.stack([torch.randperm(40 * CHUNK) for _ in range(5)]).float()  # no ties
    vals, ids = top_candidates(logits, 64, row_stats(logits)[0])
    ref_vals, ref_ids = logits.topk(64, dim=-1)
    assert torch.equal(vals, ref_vals) and torch.equal(ids, ref_ids)


class _State:
    def __init__(self, n):
        self.key = torch.tensor([sequence_key(0, i, 0) for i in range(n)])
        self.step = torch.zeros(n, dtype=torch.long)
        self.done = torch.zeros(n, dtype=torch.bool)
        self.waited = torch.zeros(n, dtype=torch.long)


@pytest.mark.parametrize("top_p, top_k", [(0.8, 0), (0.95, 5), (1.0, 0)])
def test_sampler_draws_from_the_nucleus_distribution(top_p, top_k):
    torch.manual_seed(2)
    V, n = 3 * CHUNK, 40000
    row = torch.randn(V) * 3
    sampler = Sampler(torch.device("cpu"), candidates=64)
    sampler.configure(temperature=0.7, top_p=top_p, top_k=top_k, eos_ids=[])
    draws, truncated, _, _ = sampler(row.expand(n, V) * sampler.inv_temp, _State(n), n)
    # the exact distribution, as HF's temperature -> top-k -> top-p warpers define it
    logits = row / 0.7
    if top_k:
        logits = logits.masked_fill(logits < logits.topk(top_k).values[-1], float("-inf"))
    probs = torch.softmax(logits.double(), -1)
    sorted_p, order = probs.sort(descending=True)
    keep = (sorted_p.cumsum(0) - sorted_p) < top_p
    want = torch.zeros(V, dtype=torch.float64)
    want[order[keep]] = sorted_p[keep] / sorted_p[keep].sum()
    got = torch.bincount(draws, minlength=V).double() / n
    assert (got - want).abs().sum() / 2 < 0.03  # total variation; sampling noise is ~0.01 here
    assert got[want == 0].sum() == 0
    assert not truncated.any()


def _exact_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    probs = torch.softmax(logits.double(), -1)
    sorted_p, order = probs.sort(descending=True)
    keep = (sorted_p.cumsum(0) - sorted_p) < top_p
    want = torch.zeros_like(probs)
    want[order[keep]] = sorted_p[keep] / sorted_p[keep].sum()
    return want


@pytest.mark.parametrize("capturing", [False, True])
def test_a_nucleus_wider_than_the_candidates_is_drawn_exactly(capturing, monkeypatch):
    # A flat row (a nucleus of ~230 tokens, >> 64 candidates) next to a peaked one that fits. Eagerly every
    # flagged row is redrawn; under a graph only `fallback_rows` of them, the rest held for the next step.
    monkeypatch.setattr(sampling, "_capturing", lambda t: capturing)
    torch.manual_seed(3)
    V, n, top_p = 2 * CHUNK, 40000, 0.95
    flat, peaked = torch.randn(V) * 0.3, torch.randn(V) * 6
    rows = torch.stack([flat, peaked]).repeat(n, 1)
    sampler = Sampler(torch.device("cpu"), candidates=64, fallback_rows=n // 2 if capturing else 16)
    sampler.configure(temperature=1.0, top_p=top_p, top_k=0, eos_ids=[])
    draws, truncated, held, _ = sampler(rows, _State(2 * n), 2 * n)
    assert truncated[0::2].all() and not truncated[1::2].any()
    want = _exact_top_p(flat, top_p)
    assert (want > 0).sum() > 3 * 64
    if capturing:  # the budget covers half the flagged rows: those are drawn, the others held
        assert int(sampler.deferred) == n // 2 and torch.equal(held.nonzero().squeeze(1), torch.arange(n, 2 * n, 2))
        draws = draws[0:n:2]
    else:
        assert int(sampler.deferred) == 0 and held is None
        draws = draws[0::2]
    got = torch.bincount(draws, minlength=V).double() / len(draws)
    assert got[want == 0].sum() == 0
    assert (got - want).abs().sum() / 2 < 0.08  # total variation; sampling noise is ~0.04 at this support
    # The rows that fit are drawn as without the fallback: the same tokens from the same uniforms.
    alone = Sampler(torch.device("cpu"), candidates=64)
    alone.configure(temperature=1.0, top_p=top_p, top_k=0, eos_ids=[])
    state = _State(2 * n)
    state.key, state.step = state.key[1::2], state.step[1::2]
    assert torch.equal(alone(peaked.expand(n, V), state, n)[0], sampler(rows, _State(2 * n), 2 * n)[0][1::2])


def test_rows_past_the_fallback_budget_wait_and_every_draw_is_exact(tok, monkeypatch):
    # A random model's flat rows rarely fit 16 candidates. Eagerly every flagged row is redrawn at once;
    # under a graph's budget of one row a step, the others wait a step (same token, position, uniform) and
    # are redrawn when their turn comes: the samples are the eager ones, token for token.
    model = tiny("llama", tok)
    params = SamplingParams(n=3, temperature=1.0, top_p=0.95, max_new_tokens=24, seed=5)
    eager = StaticGraphBackend(model, tok, batch_size=8, candidates=16).generate(PROMPTS, params)
    monkeypatch.setattr(sampling, "_capturing", lambda t: True)
    budget = StaticGraphBackend(model, tok, batch_size=8, candidates=16, fallback_rows=1).generate(PROMPTS, params)
    assert eager.stats["truncated_steps"] > 100 and eager.stats["deferred_steps"] == 0
    assert budget.stats["deferred_steps"] > 50
    assert budget.texts == eager.texts and budget.stats["truncated_steps"] == eager.stats["truncated_steps"]


def test_uniform_is_uniform_and_keyed():
    keys = torch.tensor([sequence_key(3, i, j) for i in range(100) for j in range(8)])
    u = torch.cat([uniform(keys, torch.full_like(keys, s)) for s in range(50)])
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    assert len(set(keys.tolist())) == len(keys)


def test_unsupported_architecture_is_refused(tok):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tok)))
    with pytest.raises(UnsupportedModel, match="use generation.backend: hf"):
        make_backend("static", gpt2, tok)


def test_auto_takes_static_on_a_gpu_for_the_decoders_it_runs(tok):
    llama, qwen = tiny("llama", tok), tiny("qwen2", tok)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tok)))
    assert (
        StaticGraphBackend.unsupported_because(llama) is None and StaticGraphBackend.unsupported_because(qwen) is None
    )
    assert "this model is 'gpt2'" in StaticGraphBackend.unsupported_because(gpt2)
    # A backend named in the config is taken as is; auto on a CPU is HF generate.
    assert choose_backend("static", llama) == ("static", "generation.backend")
    assert choose_backend("auto", gpt2) == ("hf", "auto: no CUDA")
    if torch.cuda.is_available():
        assert choose_backend("auto", llama.cuda()) == ("static", "auto")
        assert choose_backend("auto", gpt2.cuda())[0] == "hf"
    else:
        assert choose_backend("auto", llama) == ("hf", "auto: no CUDA")


def test_the_config_settings_block_reaches_the_backend_that_runs(tok):
    llama = tiny("llama", tok)
    static = GenerationConfig(
        backend="static", batch_size=32, static={"candidates": 16, "fallback_rows": 2, "sync_every": 4}
    )
    engine, which = backend_for(static, llama, tok)
    assert which == "static (generation.backend)"
    assert (engine.slots, engine.sampler.candidates, engine.sampler.fallback_rows, engine.sync_every) == (32, 16, 2, 4)
    # Unset, the redraw's budget is a quarter of the slots, at most 64.
    budgets = [
        backend_for(GenerationConfig(backend="static", batch_size=b), llama, tok)[0].sampler.fallback_rows
        for b in (2, 128, 512)
    ]
    assert budgets == [1, 32, 64]
    assert (
        engine.w.dtype == torch.float32 and backend_for(static, llama, tok, torch.bfloat16)[0].w.dtype == torch.bfloat16
    )
    # hf has no settings block: the static one is not passed to it.
    engine, which = backend_for(static.model_copy(update={"backend": "hf"}), llama, tok)
    assert which == "hf (generation.backend)" and engine.batch_size == 32
    with pytest.raises(ValidationError, match="candidats"):
        GenerationConfig(static={"candidats": 16})
