"""A Llama/Qwen2-family decoder run by hand: prefill into a prompt store, one decode step over a slot cache.

The weights are read from the HF module (fused qkv and gate/up copies; everything else by reference), so
the math is HF's: RMSNorm in fp32, RoPE from the model's own rotary module (rope_theta and static
scalings), GQA attention without copying KV heads, SwiGLU MLP, tied or untied LM head.

KV cache: k and v of shape [layers, slots, kv_heads, max_len, head_dim]. Slot s holds one sequence; its
token at position p has its keys at [:, s, :, p]. The decode step is written so that it can be captured
as a CUDA graph: fixed shapes per (rows, attended length), no host syncs, every persistent update in
place.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .fusion import eager

SUPPORTED = ("llama", "qwen2")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
CHUNK = 128  # vocabulary chunk of the top-k prefilter; the LM head is padded to a multiple of it


class UnsupportedModel(ValueError):
    pass


def check_supported(model) -> None:
    cfg = model.config
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED:
        raise UnsupportedModel(
            f"generation backend 'static' runs Llama/Qwen2-family decoders ({', '.join(SUPPORTED)}); "
            f"this model is {kind!r}: use generation.backend: hf"
        )
    if "sliding_attention" in (getattr(cfg, "layer_types", None) or ()):
        raise UnsupportedModel("generation backend 'static': sliding-window attention layers are not supported; use hf")
    rope_type = getattr(model.model.rotary_emb, "rope_type", "default")
    if rope_type not in STATIC_ROPE:
        raise UnsupportedModel(f"generation backend 'static': rope type {rope_type!r} is not supported ({STATIC_ROPE})")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"generation backend 'static': activation {cfg.hidden_act!r} is not supported (silu)")


class Weights:
    """Views of an HF LlamaForCausalLM/Qwen2ForCausalLM's weights in the shapes the decode step uses.

    `refresh()` copies the fused tensors again from the module (cheap: one pass over the weights) and
    reports whether any referenced tensor moved, in which case captured graphs must be dropped.

    `dtype`: the dtype to compute in when it is not the module's. A trainer keeps fp32 weights and runs
    its forward under bf16 autocast, and HF generate samples it that way too; the engine then reads a
    cast of every weight, made on the device at each refresh into buffers that stay where they are."""

    def __init__(self, model, dtype: torch.dtype | None = None):
        check_supported(model)
        cfg = model.config
        self.model = model
        self.layers = list(model.model.layers)
        attn = self.layers[0].self_attn
        self.n_layers = len(self.layers)
        self.head_dim = attn.head_dim
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.hidden = cfg.hidden_size
        self.eps = self.layers[0].input_layernorm.variance_epsilon
        self.vocab = model.lm_head.weight.shape[0]
        self.padded_vocab = math.ceil(self.vocab / CHUNK) * CHUNK
        self.scale = attn.scaling
        p = model.lm_head.weight
        self.device, self.dtype = p.device, dtype or p.dtype
        self._ptrs: list[int] = []
        self._buffers: dict[str, torch.Tensor] = {}
        self.refresh()

    def _fuse(self, name: str, weights: list[torch.Tensor], biases: list | None = None) -> torch.Tensor | None:
        """Concatenate weights (or, with `biases`, their biases, zeros where one has none) into a buffer
        kept across refreshes, so captured graphs keep pointing at it."""
        if biases is not None:
            if all(b is None for b in biases):
                return None
            weights = [
                b if b is not None else torch.zeros(w.shape[0], device=self.device, dtype=self.dtype)
                for w, b in zip(weights, biases)
            ]
        parts = [t.detach() for t in weights]
        shape = (sum(t.shape[0] for t in parts), *parts[0].shape[1:])
        out = self._buffers.get(name)
        if out is None or out.shape != shape:
            out = self._buffers[name] = torch.empty(shape, device=self.device, dtype=self.dtype)
        torch.cat(parts, dim=0, out=out)  # casts to the buffer's dtype
        return out

    def _read(self, name: str, t: torch.Tensor | None) -> torch.Tensor | None:
        """The module's tensor itself, or its cast when the engine computes in another dtype."""
        if t is None:
            return None
        return t.detach() if t.dtype == self.dtype else self._fuse(name, [t])

    def _per_layer(self, name: str, get) -> list:
        return [self._read(f"{name}{i}", get(layer)) for i, layer in enumerate(self.layers)]

    @torch.no_grad()
    def refresh(self) -> bool:
        """Re-read the module's weights; True when a referenced tensor is no longer where it was."""
        self.qkv_w, self.qkv_b, self.gu_w, self.gu_b = [], [], [], []
        for i, layer in enumerate(self.layers):
            a, m = layer.self_attn, layer.mlp
            qkv = [a.q_proj, a.k_proj, a.v_proj]
            self.qkv_w.append(self._fuse(f"qkv_w{i}", [p.weight for p in qkv]))
            self.qkv_b.append(self._fuse(f"qkv_b{i}", [p.weight for p in qkv], [p.bias for p in qkv]))
            gu = [m.gate_proj, m.up_proj]
            self.gu_w.append(self._fuse(f"gu_w{i}", [p.weight for p in gu]))
            self.gu_b.append(self._fuse(f"gu_b{i}", [p.weight for p in gu], [p.bias for p in gu]))
        self.o_w = self._per_layer("o_w", lambda layer: layer.self_attn.o_proj.weight)
        self.o_b = self._per_layer("o_b", lambda layer: layer.self_attn.o_proj.bias)
        self.down_w = self._per_layer("down_w", lambda layer: layer.mlp.down_proj.weight)
        self.down_b = self._per_layer("down_b", lambda layer: layer.mlp.down_proj.bias)
        self.ln1 = self._per_layer("ln1", lambda layer: layer.input_layernorm.weight)
        self.ln2 = self._per_layer("ln2", lambda layer: layer.post_attention_layernorm.weight)
        self.norm = self._read("norm", self.model.model.norm.weight)
        self.embed = self._read("embed", self.model.model.embed_tokens.weight)
        lm = self.model.lm_head.weight
        if self.padded_vocab == self.vocab:  # a tied head is the embedding's tensor, or its one cast
            tied = lm is self.model.model.embed_tokens.weight
            self.lm_w, self.lm_b = self.embed if tied else self._read("lm_w", lm), None
        else:  # zero rows scored -inf: the padded logits never win, and all chunks have CHUNK entries
            pad = self.padded_vocab - self.vocab
            self.lm_w = self._fuse("lm_w", [lm, torch.zeros(pad, self.hidden, device=self.device, dtype=self.dtype)])
            bias = torch.zeros(self.padded_vocab, device=self.device, dtype=self.dtype)
            bias[self.vocab :] = float("-inf")
            self.lm_b = self._fuse("lm_b", [bias])
        ptrs = [t.data_ptr() for t in (*self.o_w, *self.down_w, *self.ln1, *self.ln2, self.norm, self.embed, self.lm_w)]
        ptrs += [b.data_ptr() for b in (*self.o_b, *self.down_b) if b is not None]
        moved = bool(self._ptrs) and ptrs != self._ptrs
        self._ptrs = ptrs
        return moved

    @torch.no_grad()
    def rope_tables(self, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (first half negated) of shape [max_len, head_dim] in the model dtype, from
        the model's own rotary module."""
        pos = torch.arange(max_len, device=self.device)[None]
        probe = torch.empty(0, device=self.device, dtype=self.dtype)
        cos, sin = self.model.model.rotary_emb(probe, pos)
        sin = sin[0].clone()
        sin[:, : self.head_dim // 2].neg_()
        return cos[0].contiguous(), sin


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # As HF's RMSNorm: normalise in fp32, round to the model dtype, then scale by the weight.
    return w * F.rms_norm(x, (x.shape[-1],), eps=eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's x * cos + rotate_half(x) * sin, with `sin` signed (its first half negated, see
    Weights.rope_tables) so that rotate_half is a swap of the two halves."""
    half = x.shape[-1] // 2
    swapped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)
    return (x * cos).addcmul_(swapped, sin)


def add_linear_(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """x += a @ w.T + b, the residual add folded into the matrix product."""
    x.addmm_(a, w.t())
    if b is not None:
        x.add_(b)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_into_cache(qkv, cos, sin, kc, vc, rows, pos, nq: int, nkv: int) -> torch.Tensor:
    """The rotated queries of one decode step [S, nq, d], from its qkv [S, nq + 2 nkv, d]; the rotated
    keys and the values written into one layer's cache (kc, vc) at each row's slot and position."""
    qk = rope(qkv[:, : nq + nkv], cos, sin)
    kc[rows, :, pos] = qk[:, nq:]
    vc[rows, :, pos] = qkv[:, nq + nkv :]
    return qk[:, :nq]


class KVCache:
    def __init__(self, w: Weights, slots: int, max_len: int):
        shape = (w.n_layers, slots, w.n_kv, max_len, w.head_dim)
        self.k = torch.zeros(shape, device=w.device, dtype=w.dtype)
        self.v = torch.zeros(shape, device=w.device, dtype=w.dtype)
        self.slots, self.max_len = slots, max_len

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


@torch.no_grad()
def prefill(w: Weights, ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of right-padded prompts `ids` [P, T]: two tensors [layers, P, kv_heads, T, head_dim].

    Right padding needs no mask: a causal token never sees the pads after it, and a slot's positions past
    its prompt are written by decode before anything reads them."""
    P, T = ids.shape
    x = F.embedding(ids, w.embed)
    c, s = cos[:T, None, :], sin[:T, None, :]
    ks = torch.empty(w.n_layers, P, w.n_kv, T, w.head_dim, device=w.device, dtype=w.dtype)
    vs = torch.empty_like(ks)
    nq, nkv, d = w.n_heads, w.n_kv, w.head_dim
    for i in range(w.n_layers):
        a = rms_norm(x, w.ln1[i], w.eps)
        qkv = F.linear(a, w.qkv_w[i], w.qkv_b[i]).view(P, T, nq + 2 * nkv, d)
        qk = rope(qkv[:, :, : nq + nkv], c, s)
        q = qk[:, :, :nq].transpose(1, 2)
        ks[i] = qk[:, :, nq:].transpose(1, 2)
        vs[i] = qkv[:, :, nq + nkv :].transpose(1, 2)
        if i == w.n_layers - 1:
            break  # the last layer's output feeds nothing we keep
        o = F.scaled_dot_product_attention(q, ks[i], vs[i], is_causal=True, scale=w.scale, enable_gqa=True)
        add_linear_(x.view(P * T, -1), o.transpose(1, 2).reshape(P * T, nq * d), w.o_w[i], w.o_b[i])
        add_linear_(
            x.view(P * T, -1),
            swiglu(F.linear(rms_norm(x, w.ln2[i], w.eps), w.gu_w[i], w.gu_b[i])).view(P * T, -1),
            w.down_w[i],
            w.down_b[i],
        )
    return ks, vs


class DecodeState:
    """Per-slot buffers the decode step reads and updates in place (graph inputs and outputs)."""

    def __init__(self, slots: int, max_new: int, device):
        z = lambda *shape, dtype=torch.long: torch.zeros(shape, device=device, dtype=dtype)  # noqa: E731
        self.tokens = z(slots)  # the token to feed next
        self.pos = z(slots)  # its position
        self.step = z(slots)  # index of the token the step will produce, within the completion
        self.max_new = z(slots)
        self.key = z(slots)  # per-sequence random key (see sampling.uniform)
        self.done = torch.ones(slots, device=device, dtype=torch.bool)
        self.truncated = z(slots)  # steps whose nucleus did not fit in the candidates
        self.waited = z(slots)  # steps a row has been held for the exact redraw (sampling.py)
        self.out = z(slots, max_new + 1)  # produced tokens; column `step` of a finished row is scratch
        self.logp = z(slots, max_new + 1, dtype=torch.float32)  # their log-probs, when the sampler takes them
        self.slot_ids = torch.arange(slots, device=device)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}


def attend_bmm(q, kc, vc, pos, L, scale, mask=None):
    """Attention of one new query per row over cache positions [0, L), masked past each row's position.

    q [S, nq, d]; kc/vc one layer of the cache [slots, nkv, max_len, d]; mask [S, L] additive (from
    mask_bias, computed once per step). Heads are grouped, not copied: the G = nq/nkv query heads of a
    KV head form the M dimension of one small matrix product."""
    S, nq, d = q.shape
    nkv, max_len = kc.shape[1], kc.shape[2]
    G = nq // nkv
    k = kc.view(-1, max_len, d)[: S * nkv, :L]
    v = vc.view(-1, max_len, d)[: S * nkv, :L]
    mask = mask_bias(pos, L, q.dtype) if mask is None else mask
    bias = mask[:, None, None, :].expand(S, nkv, G, L).reshape(S * nkv, G, L)
    scores = torch.baddbmm(bias, q.reshape(S * nkv, G, d), k.transpose(1, 2), alpha=scale)
    return torch.bmm(torch.softmax(scores, dim=-1), v).view(S, nq * d)


def attend_sdpa(q, kc, vc, pos, L, scale, mask=None):
    S, nq, d = q.shape
    nkv = kc.shape[1]
    mask = mask_bias(pos, L, q.dtype) if mask is None else mask
    o = F.scaled_dot_product_attention(
        q.view(S, nkv, nq // nkv, d), kc[:S, :, :L], vc[:S, :, :L], attn_mask=mask[:, None, None, :], scale=scale
    )
    return o.reshape(S, nq * d)


def mask_bias(pos, L, dtype):
    """[S, L]: 0 where a row may attend (positions <= its own), -inf after."""
    keep = torch.arange(L, device=pos.device)[None, :] <= pos[:, None]
    return torch.zeros(keep.shape, device=pos.device, dtype=dtype).masked_fill_(~keep, float("-inf"))


def decode_step(
    w: Weights, cache: KVCache, st: DecodeState, S: int, L: int, cos, sin, attend, sampler, op: Callable = eager
) -> None:
    """One token for rows [0, S): feed st.tokens at st.pos, write its K/V, attend over [0, L), sample.

    Finished rows run too (their results are discarded); only live rows that the sampler did not hold
    advance."""
    nq, nkv, d = w.n_heads, w.n_kv, w.head_dim
    tok, pos, rows = st.tokens[:S], st.pos[:S], st.slot_ids[:S]
    x = F.embedding(tok, w.embed)
    c, s = cos[pos][:, None, :], sin[pos][:, None, :]
    mask = mask_bias(pos, L, x.dtype) if getattr(attend, "needs_mask", True) else None
    for i in range(w.n_layers):
        qkv = F.linear(op(rms_norm)(x, w.ln1[i], w.eps), w.qkv_w[i], w.qkv_b[i]).view(S, nq + 2 * nkv, d)
        kc, vc = cache.k[i], cache.v[i]
        q = op(rope_into_cache)(qkv, c, s, kc, vc, rows, pos, nq, nkv)
        add_linear_(x, attend(q, kc, vc, pos, L, w.scale, mask), w.o_w[i], w.o_b[i])
        gate_up = F.linear(op(rms_norm)(x, w.ln2[i], w.eps), w.gu_w[i], w.gu_b[i])
        add_linear_(x, op(swiglu)(gate_up), w.down_w[i], w.down_b[i])
    logits = F.linear(op(rms_norm)(x, w.norm * sampler.inv_temp, w.eps), w.lm_w, w.lm_b)
    nxt, truncated, held, logp = sampler(logits, st, S, op)
    if held is None:
        # Eagerly no row is held, under a graph some may be. One compiled form must serve both: a graph
        # is captured right after an eager step, and a compilation inside the capture would break it.
        held = torch.zeros_like(truncated)
    op(record_draws)(st, S, nxt, truncated, held, logp, sampler.eos)


def record_draws(st: DecodeState, S: int, nxt, truncated, held, logp, eos: torch.Tensor) -> None:
    """The step's draws into the state of rows [0, S): the next token to feed, positions, outputs, and
    which rows finished (an id in `eos`, or their length). Finished rows ran too and keep what they had;
    rows the sampler `held` stay where they are, to draw again next step (sampling.py)."""
    st.waited[:S].copy_(torch.where(held, st.waited[:S] + 1, 0))
    advance = ~st.done[:S] & ~held
    st.out[:S].scatter_(1, st.step[:S, None], nxt[:, None])
    if logp is not None:
        st.logp[:S].scatter_(1, st.step[:S, None], logp[:, None])
    st.tokens[:S].copy_(torch.where(advance, nxt, st.tokens[:S]))
    st.truncated[:S].add_(truncated & advance)
    finished = (nxt[:, None] == eos[None, :]).any(-1) | (st.step[:S] + 1 >= st.max_new[:S])
    st.pos[:S].add_(advance)
    st.step[:S].add_(advance)
    st.done[:S].logical_or_(finished & advance)
