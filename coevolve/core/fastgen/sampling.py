"""Sampling on the device, without a sort of the vocabulary and without a torch.Generator.

Candidates: the top `K` logits (64 by default), found by a two-stage top-k: the max of each 128-wide
chunk of the vocabulary, the K chunks with the largest maxima, then the top K inside those K*128
entries. Exact: every one of the K largest logits lies in one of those chunks. On CUDA one Triton
kernel reads the logits once for the chunk maxima and the log-sum-exp that normalises top-p.

Temperature scales the final hidden state (so the logits come out already divided by T). Top-p follows
HF's rule (keep a token while the probability mass before it, in descending order, is < top_p) on
probabilities normalised over the whole vocabulary (or over the top_k when top_k is set, as HF). The
nucleus is exact whenever it fits in the K candidates; a row whose nucleus does not (flat distributions,
e.g. a random-weight model) is counted in `truncated` and redrawn from the exact nucleus: a sort of its
whole row of logits, the same rule and the same uniform. Only the flagged rows are sorted. Eagerly that
is all of them (their count is read on the host). Under a CUDA graph, where nothing may depend on a
value the host reads, `fallback_rows` flagged rows of the step are sorted (a fixed shape, chosen on the
device), every step whether or not any row needs it: a device-side branch is not something a graph can
hold, and a sort of every row every step would cost many times the rest of the sampler on a 150K
vocabulary. Measured on one CPU thread over 151,936 fp32 logits: a sort of 16 rows 0.24 s, of 64 rows
0.84 s; the whole sampler at 512 rows 0.28 s. Flagged rows past that budget are held: they do not
advance this step, and the next step feeds them the same token at the same position (the same
distribution) with the same uniform, and draws them again, first in line (the rows held longest first).
Every draw is exact; the budget (64 by default) trades a step's time against the row-steps spent
waiting, counted in `Sampler.deferred` (the backend's `deferred_steps`). On SmolLM2 at T 0.8, top-p 0.95,
15% of draws needed the redraw (bench/RESULTS.md).
With top_k > K the candidates are the limit and the step is only counted.
With top_p = 1 and no top_k the draw is exact over the whole vocabulary (two-level inverse CDF).

Log-probs (when asked): each drawn token's log-probability under the untempered model, without top-p
or top-k: what a forward pass of the same model over the completion gives, so a DPO step whose
reference is the sampling policy can take them instead of running the reference. Computed from the
tempered logits (times T) with one more log-sum-exp in the same read of the logits.

Randomness: one uniform per row and step, a hash of (the sequence's key, the step's index in the
completion). The key is derived on the host from (seed, prompt index, sample index), so a sample does
not depend on which slot or batch it ran in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .fusion import eager
from .model import CHUNK

MASK32 = 0xFFFFFFFF
MASK64 = 2**64 - 1
MAX_EOS = 8


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # A 32-bit integer finaliser on int64 tensors holding values < 2**32. The multipliers are < 2**31, so
    # no product overflows int64.
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & MASK32
    return x ^ (x >> 16)


def uniform(key: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """A float32 in [0, 1) for each (key, step), the same on every device and in every batch."""
    x = _mix32((_mix32(key) + step * 0x9E3779B9) & MASK32)
    return (x >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def sequence_key(seed: int, prompt: int, sample: int) -> int:
    """The random key of sample `sample` of prompt `prompt` under `seed` (32 bits)."""
    return _splitmix64(_splitmix64(_splitmix64(seed & MASK64) ^ prompt) ^ sample) & MASK32


def top_candidates(logits: torch.Tensor, k: int, chunk_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits of each row (descending) and their token ids; logits [S, V], V % CHUNK == 0,
    chunk_max [S, V / CHUNK] the max of each chunk (see row_stats)."""
    S, V = logits.shape
    blocks = logits.view(S, V // CHUNK, CHUNK)
    n_chunks = min(k, V // CHUNK)
    chunks = chunk_max.topk(n_chunks, dim=-1, sorted=False).indices
    inside = blocks.gather(1, chunks[..., None].expand(S, n_chunks, CHUNK)).view(S, n_chunks * CHUNK)
    vals, j = inside.topk(min(k, n_chunks * CHUNK), dim=-1)
    return vals, chunks.gather(1, j // CHUNK) * CHUNK + j % CHUNK


def row_stats(logits: torch.Tensor, temp: torch.Tensor | None = None):
    """(max of each CHUNK-wide chunk [S, V / CHUNK], log-sum-exp in fp32 [S], and with `temp` the
    log-sum-exp of logits * temp [S], else None) of logits [S, V]. On CUDA one Triton kernel reads the
    logits once; elsewhere, torch ops."""
    if logits.is_cuda:
        try:
            from .kernels import row_stats as fused
        except ImportError:
            pass
        else:
            return fused(logits, CHUNK, temp)
    S, V = logits.shape
    raw = torch.logsumexp(logits.float() * temp, -1) if temp is not None else None
    return logits.view(S, V // CHUNK, CHUNK).amax(-1), torch.logsumexp(logits.float(), -1), raw


class Sampler:
    """Holds the sampling parameters as device tensors (inputs of captured graphs) and draws the next
    token of each row. `key` names what a captured graph depends on beyond those tensors."""

    def __init__(self, device, candidates: int = 64, fallback_rows: int = 64):
        if fallback_rows < 1:
            raise ValueError(f"fallback_rows must be >= 1 (rows past it wait for it), got {fallback_rows}")
        self.candidates, self.fallback_rows = candidates, fallback_rows
        self.deferred = torch.zeros((), device=device, dtype=torch.long)  # row-steps held past the budget
        self.inv_temp = torch.ones((), device=device)
        self.temp = torch.ones((), device=device)
        self.top_p = torch.ones((), device=device)
        self.eos = torch.full((MAX_EOS,), -1, device=device, dtype=torch.long)
        self.mode, self.top_k, self.logprobs = "greedy", 0, False

    def configure(
        self, temperature: float, top_p: float, top_k: int, eos_ids: list[int], logprobs: bool = False
    ) -> None:
        if len(eos_ids) > MAX_EOS:
            raise ValueError(f"at most {MAX_EOS} EOS ids, got {len(eos_ids)}")
        self.eos.fill_(-1)
        if eos_ids:
            self.eos[: len(eos_ids)] = torch.tensor(eos_ids, dtype=torch.long)
        greedy = temperature == 0.0
        self.inv_temp.fill_(1.0 if greedy else 1.0 / temperature)
        self.temp.fill_(1.0 if greedy else temperature)
        self.top_p.fill_(min(max(top_p, 0.0), 1.0))
        self.top_k = top_k if top_k and not greedy else 0
        self.logprobs = logprobs
        self.deferred.zero_()
        if greedy:
            self.mode = "greedy"
        elif self.top_k:
            self.mode = "top_k"
        elif top_p < 1.0:
            self.mode = "top_p"
        else:
            self.mode = "full"

    @property
    def key(self) -> tuple:
        return (self.mode, self.top_k, self.candidates, self.logprobs)

    def __call__(
        self, logits: torch.Tensor, st, S: int, op: Callable = eager
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Next token [S], whether the nucleus was cut by the candidate limit [S], the rows held back
        to draw again next step [S] (None: no row can be), and with `logprobs` the token's untempered
        log-prob [S] fp32 (else None). `logits` are the tempered ones; `op` runs the small pieces
        (fusion.py)."""
        stats = (
            row_stats(logits, self.temp if self.logprobs else None)
            if self.logprobs or self.mode in ("top_p", "top_k")
            else None
        )
        nxt, truncated, held = self._draw(logits, st, S, stats, op)
        if not self.logprobs:
            return nxt, truncated, held, None
        picked = logits.gather(1, nxt[:, None]).squeeze(1).float()
        return nxt, truncated, held, picked * self.temp - stats[2]

    def _draw(self, logits, st, S: int, stats, op) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self.mode == "greedy":
            return logits.argmax(-1), torch.zeros(S, device=logits.device, dtype=torch.bool), None
        u = op(uniform)(st.key[:S], st.step[:S])
        if self.mode == "full":
            full = _sample_full(torch.softmax(logits, -1, dtype=torch.float32), u)
            return full, torch.zeros(S, device=logits.device, dtype=torch.bool), None
        k = min(self.top_k, self.candidates) if self.mode == "top_k" else self.candidates
        chunk_max, lse, _ = stats
        vals, ids = top_candidates(logits, k, chunk_max)
        if self.mode == "top_k":
            probs = torch.softmax(vals.float(), -1)
            truncated = torch.full((S,), self.top_k > self.candidates, device=logits.device)
        else:
            probs, truncated = op(_candidate_probs)(vals, lse, self.top_p)
        nxt = ids.gather(1, op(_nucleus_index)(probs, self.top_p, u)[:, None]).squeeze(1)
        if self.mode == "top_p":
            nxt, held = self._exact_fallback(logits, lse, u, truncated & ~st.done[:S], nxt, st.waited[:S])
            return nxt, truncated, held
        return nxt, truncated, None

    def _exact_fallback(self, logits, lse, u, truncated, nxt, waited):
        """`nxt` with the rows flagged in `truncated` redrawn from their exact nucleus, and the flagged
        rows past the budget, held (see the module; None eagerly, where none is). Finished rows, whose
        draws are discarded, are not flagged: they would take the budget."""
        S = logits.shape[0]
        capturing = _capturing(logits)
        if capturing:
            R = min(self.fallback_rows, S)
        else:
            R = int(truncated.sum())
            if R == 0:
                return nxt, None
        # Flagged rows first, those held longest first among them.
        rows = torch.argsort(truncated * (waited + 1), descending=True, stable=True)[:R]
        flagged = truncated[rows]
        # The logits sorted, not their probabilities: the same order, in half the key bits when bf16.
        vals, ids = logits[rows].sort(-1, descending=True)
        probs = torch.exp(vals.float() - lse[rows, None])
        exact = ids.gather(1, _nucleus_index(probs, self.top_p, u[rows])[:, None]).squeeze(1)
        nxt = nxt.index_copy(0, rows, torch.where(flagged, exact, nxt[rows]))
        if not capturing:
            return nxt, None
        held = truncated.index_fill(0, rows, False)
        self.deferred.add_(held.sum())
        return nxt, held


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _candidate_probs(vals: torch.Tensor, lse: torch.Tensor, top_p) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidates' probabilities normalised over the whole vocabulary, and whether they hold less
    than the nucleus's mass (it does not fit in them)."""
    probs = torch.exp(vals.float() - lse[:, None])
    return probs, probs.sum(-1) < top_p


def _nucleus_index(probs: torch.Tensor, top_p, u: torch.Tensor) -> torch.Tensor:
    """Position of the draw in `probs` (each row descending): inverse CDF over HF's top-p nucleus. One
    cumulative sum serves both (a scan of a whole row of the vocabulary is the fallback's largest cost):
    the nucleus is a prefix, and past it the sum only grows beyond the nucleus's mass."""
    cum = probs.cumsum(-1)
    size = ((cum - probs) < top_p).sum(-1)  # HF's top-p rule: a prefix, the first always kept
    mass = cum.gather(1, (size - 1)[:, None])
    return torch.minimum((cum <= u[:, None] * mass).sum(-1), size - 1)


def _sample_full(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Exact draw from the whole distribution: pick a chunk by its mass, then a token inside it."""
    S, V = probs.shape
    blocks = probs.view(S, V // CHUNK, CHUNK)
    mass = blocks.sum(-1)
    cum = mass.cumsum(-1)
    target = u * cum[:, -1]
    c = (cum <= target[:, None]).sum(-1).clamp_(max=mass.shape[1] - 1)
    inside = blocks.gather(1, c[:, None, None].expand(S, 1, CHUNK)).squeeze(1)
    rest = (target - (cum - mass).gather(1, c[:, None]).squeeze(1)).clamp_(min=0)
    j = (inside.cumsum(-1) <= rest[:, None]).sum(-1).clamp_(max=CHUNK - 1)
    # Rounding can leave j on a zero-probability entry (say a padded id): fall back to the chunk's best.
    j = torch.where(inside.gather(1, j[:, None]).squeeze(1) > 0, j, inside.argmax(-1))
    return c * CHUNK + j
