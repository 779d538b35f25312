"""Triton kernels of the decode step (CUDA only; the torch versions in model.py and sampling.py are the
reference and the CPU path).

- Decode attention: each program takes one (row, KV head), loads the G query heads that share that KV
  head as a [G, d] tile, and streams the row's keys and values up to its own position (online
  softmax). It reads each valid key/value once and nothing past the row's position, where the
  matrix-product version reads the whole attended length L of every row.
- Row statistics of the logits for sampling: chunk maxima and log-sum-exp in one read, instead of a
  reduction plus an fp32 softmax that writes the whole [rows, vocab] tensor; in the same read, when
  asked, the log-sum-exp of the untempered logits, which normalises the sampled tokens' log-probs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_attention(
    Q,
    K,
    V,
    OUT,
    POS,
    scale,
    stride_qs,
    stride_qh,
    max_len,
    N_KV: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    s = pid // N_KV
    h = pid % N_KV
    pos = tl.load(POS + s)
    g = tl.arange(0, BLOCK_G)
    dd = tl.arange(0, D)
    heads = h * G + g
    q = tl.load(Q + s * stride_qs + heads[:, None] * stride_qh + dd[None, :], mask=(g < G)[:, None], other=0.0)
    base = (s * N_KV + h).to(tl.int64) * max_len * D
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for start in range(0, pos + 1, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        valid = n <= pos
        offs = base + n[:, None] * D + dd[None, :]
        k = tl.load(K + offs, mask=valid[:, None], other=0.0)
        v = tl.load(V + offs, mask=valid[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k)) * scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(
        OUT + s * (N_KV * G * D) + heads[:, None] * D + dd[None, :], out.to(OUT.dtype.element_ty), mask=(g < G)[:, None]
    )


def attend_triton(
    q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, pos: torch.Tensor, L: int, scale: float, mask=None
) -> torch.Tensor:
    """Same contract as model.attend_bmm, but reads each row's keys/values only up to its position
    (L and the mask are not needed)."""
    S, nq, d = q.shape
    nkv, max_len = kc.shape[1], kc.shape[2]
    assert q.stride(2) == 1 and kc.is_contiguous() and vc.is_contiguous() and d & (d - 1) == 0
    out = torch.empty(S, nq * d, device=q.device, dtype=q.dtype)
    G = nq // nkv
    _decode_attention[(S * nkv,)](
        q,
        kc,
        vc,
        out,
        pos,
        scale,
        q.stride(0),
        q.stride(1),
        max_len,
        N_KV=nkv,
        G=G,
        D=d,
        BLOCK_G=max(16, triton.next_power_of_2(G)),
        BLOCK_N=64,
        num_warps=4,
        num_stages=2,
    )
    return out


attend_triton.needs_mask = False  # type: ignore[attr-defined]  # mypy knows no attributes set on a function


@triton.jit
def _row_stats(X, LSE, CMAX, TEMP, LSE_RAW, n_chunks, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, RAW: tl.constexpr):
    """One pass over a row of logits: the max of each CHUNK-wide chunk and the row's log-sum-exp; with
    RAW, also the log-sum-exp of the logits times TEMP (the untempered ones)."""
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, CHUNK)
    m = tl.full([1], float("-inf"), tl.float32)
    s = tl.zeros([1], tl.float32)
    s_raw = tl.zeros([1], tl.float32)
    t = 1.0
    if RAW:
        t = tl.load(TEMP).to(tl.float32)
    for c0 in range(0, n_chunks, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        live = c < n_chunks
        x = tl.load(
            X + row * n_chunks * CHUNK + c[:, None] * CHUNK + j[None, :], mask=live[:, None], other=float("-inf")
        ).to(tl.float32)
        cmax = tl.max(x, 1)
        tl.store(CMAX + row * n_chunks + c, cmax, mask=live)
        m_new = tl.maximum(m, tl.max(cmax, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.sum(tl.exp(x - m_new[:, None]), 1), 0)
        if RAW:  # t > 0, so t * m_new is the max of the scaled row too
            s_raw = s_raw * tl.exp(t * (m - m_new)) + tl.sum(tl.sum(tl.exp(t * (x - m_new[:, None])), 1), 0)
        m = m_new
    tl.store(LSE + row + tl.arange(0, 1), m + tl.log(s))
    if RAW:
        tl.store(LSE_RAW + row + tl.arange(0, 1), t * m + tl.log(s_raw))


def row_stats(logits: torch.Tensor, chunk: int, temp: torch.Tensor | None = None):
    """(chunk maxima [S, V/chunk] fp32, log-sum-exp [S] fp32, log-sum-exp of logits * temp [S] fp32 or
    None without temp) of contiguous logits [S, V], in one read."""
    S, V = logits.shape
    n_chunks = V // chunk
    cmax = torch.empty(S, n_chunks, device=logits.device, dtype=torch.float32)
    lse = torch.empty(S, device=logits.device, dtype=torch.float32)
    lse_raw = torch.empty(S, device=logits.device, dtype=torch.float32) if temp is not None else lse
    _row_stats[(S,)](
        logits,
        lse,
        cmax,
        temp if temp is not None else lse,
        lse_raw,
        n_chunks,
        CHUNK=chunk,
        BLOCK_C=8,
        RAW=temp is not None,
        num_warps=8,
    )
    return cmax, lse, lse_raw if temp is not None else None
