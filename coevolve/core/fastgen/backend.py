"""`StaticGraphBackend`: continuous batching over a slot KV cache, decode steps replayed as CUDA graphs.

The loop, per window of `sync_every` decode steps:
  1. free slots take the next sequences: their prompt's keys/values (prefilled a group of prompts at a
     time, once per prompt whatever n is) are copied into the slot, and the slot's state is set;
  2. the window runs on rows [0, S) attending over positions [0, L): S and L are the smallest buckets
     that hold the live rows, and each (S, L, sampling mode) is one graph, captured on first use;
  3. one host sync reads which rows finished (EOS, their length, or a stop string); their tokens are
     copied out and their slots freed. When no sequence waits and the live rows fill at most half of
     S, they are moved to the lowest slots so that a smaller graph runs.
The prompt's last token is fed by the first decode step, so prefill computes keys and values only and
every sampled token, the first included, comes out of the same graph.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from coevolve.core.generation import Generations, SamplingParams, truncate_at_stop

from .fusion import eager, fused
from .model import (
    DecodeState,
    KVCache,
    UnsupportedModel,
    Weights,
    attend_bmm,
    attend_sdpa,
    check_supported,
    decode_step,
    prefill,
)
from .sampling import Sampler, sequence_key

LEN_BUCKET = 64  # granularity of the attended length (and of max_len)
MIN_ROWS = 8  # smallest row bucket


@dataclass
class _Seq:
    prompt: int
    sample: int
    max_new: int
    tokens: list[int] | None = None
    logprobs: list[float] | None = None


class StaticGraphBackend:
    """Generation backend "static" (Llama/Qwen2-family decoders; see coevolve/core/fastgen/model.py).

    batch_size: rows decoded together (KV-cache slots). max_len: smallest cache length (positions); the
    cache grows to fit each call's longest prompt plus max_new_tokens. candidates: how many of the
    highest logits top-p/top-k choose from (see sampling.py). fallback_rows: under CUDA graphs, how many
    rows a step may redraw from their exact nucleus when it does not fit the candidates (a sort of that
    many rows of logits each step; more wait a step for it, see sampling.py); default a quarter of the
    slots, at most 64. sync_every: decode steps between host syncs. attention: "auto" (Triton on CUDA
    when available, else "bmm"), "bmm", "sdpa" or "triton". cuda_graphs: default on for CUDA models.
    compile_ops: the step's small pieces fused by torch.compile (fusion.py); default on for CUDA
    models where Triton is installed. dtype: compute in this dtype rather than the model's (see
    model.Weights)."""

    supports_logprobs = True

    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int = 256,
        max_len: int = 0,
        candidates: int = 64,
        fallback_rows: int | None = None,
        sync_every: int = 16,
        attention: str = "auto",
        cuda_graphs: bool | None = None,
        compile_ops: bool | None = None,
        prefill_tokens: int = 16384,
        progress: Callable[[int, int], None] | None = None,
        dtype: torch.dtype | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.w = Weights(model, dtype)
        self.slots = batch_size
        self.min_len = max_len
        self.sync_every = max(1, sync_every)
        self.prefill_tokens = prefill_tokens
        self.progress = progress
        cuda = self.w.device.type == "cuda"
        self.use_graphs = cuda if cuda_graphs is None else cuda_graphs
        self.attention = _pick_attention(attention, cuda)
        if compile_ops is None:
            compile_ops = cuda and _has_triton()  # Inductor compiles for a GPU through Triton
        self.op = fused if compile_ops else eager
        self.sampler = Sampler(self.w.device, candidates, fallback_rows or min(64, max(1, batch_size // 4)))
        self.cache: KVCache | None = None
        self.state: DecodeState | None = None
        self.cos = self.sin = None
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._pool = None

    # -- the public interface -------------------------------------------------------------------------
    @staticmethod
    def unsupported_because(model) -> str | None:
        """Why this backend cannot run `model` (its architecture, attention or rope), or None."""
        try:
            check_supported(model)
        except UnsupportedModel as err:
            return str(err)
        return None

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        # Copied into the module's own tensors: each call re-reads them (Weights.refresh), and the captured
        # graphs, which point at them, stay valid.
        self.model.load_state_dict(state_dict)

    @torch.no_grad()
    def generate(self, prompts: list[str], params: SamplingParams) -> Generations:
        tok = self.tokenizer
        start = time.perf_counter()
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        tokens, logprobs, stats = self.generate_ids(ids, params)
        texts = [
            [truncate_at_stop(t.strip(), params.stop) for t in tok.batch_decode(rows, skip_special_tokens=True)]
            for rows in tokens
        ]
        counts = [[len(t) for t in rows] for rows in tokens]
        sampled = dict(prompt_ids=ids, token_ids=tokens, logprobs=logprobs) if params.logprobs else {}
        return Generations(texts, counts, time.perf_counter() - start, stats, **sampled)

    @torch.no_grad()
    def generate_ids(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        max_new: list[list[int]] | None = None,
        ignore_eos: bool = False,
    ) -> tuple[list[list[list[int]]], list[list[list[float]]] | None, dict]:
        """Completions as token ids: out[i][j] is sample j of prompt i (EOS included when produced); with
        params.logprobs, each token's untempered log-prob in the same layout (else None); stats.

        max_new[i][j] overrides params.max_new_tokens for one sample (benchmarks impose lengths this way);
        ignore_eos keeps sampling past EOS."""
        if any(len(p) == 0 for p in prompts):
            raise ValueError("generation backend 'static': empty prompt")
        n = params.n
        lengths = [
            [(max_new[i][j] if max_new else params.max_new_tokens) for j in range(n)] for i in range(len(prompts))
        ]
        if any(m < 1 for row in lengths for m in row):
            raise ValueError("max_new_tokens must be >= 1")
        stats = {
            "backend": "static",
            "attention": self.attention,
            "cuda_graphs": self.use_graphs,
            "compiled_ops": self.op is fused,
            "slots": self.slots,
        }
        if self.w.refresh():
            self._graphs.clear()  # a weight the graphs point at was replaced
        need = max(len(p) - 1 + max(m) for p, m in zip(prompts, lengths)) + 1
        self._ensure_cache(max(need, self.min_len), max(max(m) for m in lengths))
        eos = [] if ignore_eos else _eos_ids(self.model, self.tokenizer)
        self.sampler.configure(params.temperature, params.top_p, params.top_k, eos, params.logprobs)
        run = _Run(self, prompts, lengths, params, stats)
        run.loop()
        # Row-steps held for the exact redraw under graphs (see sampling.py): the budget's cost.
        stats.update(
            deferred_steps=int(self.sampler.deferred),
            max_len=self.cache.max_len,
            kv_cache_gib=round(self.cache.nbytes / 2**30, 3),
            graphs=len(self._graphs),
        )
        logprobs = [[s.logprobs for s in row] for row in run.seqs] if params.logprobs else None
        return run.outputs(), logprobs, stats

    # -- cache, graphs ---------------------------------------------------------------------------------
    def _ensure_cache(self, need_len: int, max_new: int) -> None:
        max_len = math.ceil(need_len / LEN_BUCKET) * LEN_BUCKET
        if self.cache is None or self.cache.max_len < max_len:
            self.cache = None  # free the old one first
            self._graphs.clear()
            self.cache = KVCache(self.w, self.slots, max_len)
            self.cos, self.sin = self.w.rope_tables(max_len)
        if self.state is None or self.state.out.shape[1] < max_new + 1:
            self._graphs.clear()
            self.state = DecodeState(self.slots, max_new, self.w.device)

    @torch.no_grad()
    def step(self, S: int, L: int) -> None:
        decode_step(self.w, self.cache, self.state, S, L, self.cos, self.sin, self.attention_fn, self.sampler, self.op)

    @property
    def attention_fn(self):
        if self.attention == "triton":
            from .kernels import attend_triton

            return attend_triton
        return attend_sdpa if self.attention == "sdpa" else attend_bmm

    def run_steps(self, S: int, L: int, steps: int) -> None:
        if not self.use_graphs:
            for _ in range(steps):
                self.step(S, L)
            return
        key = (S, L, self.attention, *self.sampler.key)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._capture(S, L)
        for _ in range(steps):
            graph.replay()

    def _capture(self, S: int, L: int) -> torch.cuda.CUDAGraph:
        # One eager step first (library handles, kernel choice); it changes the state, so the state is put
        # back after it. The keys/values it writes are the ones the real step writes again.
        saved = {k: v.clone() for k, v in self.state.tensors().items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.step(S, L)
        torch.cuda.current_stream().wait_stream(stream)
        for k, v in saved.items():
            getattr(self.state, k).copy_(v)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self.step(S, L)
        return graph


class _Run:
    """One call's scheduling: which sequence sits in which slot, prompt groups, outputs."""

    def __init__(self, be: StaticGraphBackend, prompts, lengths, params, stats):
        self.be, self.prompts, self.params, self.stats = be, prompts, params, stats
        n = params.n
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a prefill
        self.seqs = [[_Seq(i, j, lengths[i][j]) for j in range(n)] for i in range(len(prompts))]
        self.pending = deque(s for i in order for s in self.seqs[i])
        # Prompt groups, prefilled when their first sequence is loaded and dropped after their last.
        per_group = max(1, be.slots // n)
        self.group_of: dict[int, int] = {}
        self.groups: list[list[int]] = []
        for i in order:
            g = self.groups[-1] if self.groups else None
            longest = max([len(prompts[j]) for j in g] + [len(prompts[i])]) if g else len(prompts[i])
            if g is None or len(g) >= per_group or (len(g) + 1) * longest > be.prefill_tokens:
                g = []
                self.groups.append(g)
            self.group_of[i] = len(self.groups) - 1
            g.append(i)
        self.group_kv: dict[int, tuple] = {}
        self.group_left = [len(g) * n for g in self.groups]
        self.slot_seq: list[_Seq | None] = [None] * be.slots
        self.slot_pos = [0] * be.slots  # host's bound on each live slot's position
        self.slot_left = [0] * be.slots  # steps each live slot may still run
        self.prompts_done = 0
        self.cut_at: dict[int, int] = {}  # slot -> tokens to keep, for rows stopped by a stop string
        self.left_per_prompt = [n] * len(prompts)
        stats.update(decode_steps=0, windows=0, prefill_tokens=0, compactions=0, stop_string_hits=0, truncated_steps=0)

    def outputs(self):
        return [[s.tokens for s in row] for row in self.seqs]

    def loop(self) -> None:
        be, st = self.be, self.be.state
        st.done.fill_(True)
        rows = be.slots
        timer = _Timer(be.w.device)
        while self.pending or any(s is not None for s in self.slot_seq):
            with timer("load_s"):
                self._load()
            live = [i for i, s in enumerate(self.slot_seq) if s is not None]
            if not self.pending and rows > MIN_ROWS and len(live) <= rows // 2:
                with timer("compact_s"):
                    live = self._compact(live)
            rows = _bucket_rows(live[-1] + 1, be.slots)
            steps = min(be.sync_every, max(self.slot_left[i] for i in live))
            L = be.cache.max_len  # the Triton kernel stops at each row's position: one graph per row bucket
            if be.attention != "triton":  # the matrix-product attentions read all of [0, L)
                L = min(L, math.ceil((max(self.slot_pos[i] for i in live) + steps) / LEN_BUCKET) * LEN_BUCKET)
            captured = len(be._graphs)
            with timer("decode_s"):
                be.run_steps(rows, L, steps)
            if len(be._graphs) > captured:
                self.stats["captures"] = self.stats.get("captures", 0) + 1
            self.stats["decode_steps"] += steps
            self.stats["windows"] += 1
            with timer("harvest_s"):
                self._harvest(rows)
        self.stats.update(timer.totals())

    def _load(self) -> None:
        be, st = self.be, self.be.state
        free = [i for i, s in enumerate(self.slot_seq) if s is None]
        take = [self.pending.popleft() for _ in range(min(len(free), len(self.pending)))]
        if not take:
            return
        slots = free[: len(take)]
        by_group: dict[int, list[tuple[int, _Seq]]] = {}
        for slot, seq in zip(slots, take):
            by_group.setdefault(self.group_of[seq.prompt], []).append((slot, seq))
        for g, items in by_group.items():
            if g not in self.group_kv:
                self.group_kv[g] = self._prefill(self.groups[g])
            ks, vs, row_of = self.group_kv[g]
            dst = torch.tensor([slot for slot, _ in items], device=be.w.device)
            src = torch.tensor([row_of[seq.prompt] for _, seq in items], device=be.w.device)
            T = ks.shape[3]
            be.cache.k[:, dst, :, :T] = ks[:, src]
            be.cache.v[:, dst, :, :T] = vs[:, src]
            self.group_left[g] -= len(items)
            if self.group_left[g] == 0:
                del self.group_kv[g]
        seed, first = self.params.seed, self.params.first_prompt
        init = torch.tensor(
            [
                [
                    self.prompts[s.prompt][-1],
                    len(self.prompts[s.prompt]) - 1,
                    s.max_new,
                    sequence_key(seed, first + s.prompt, s.sample),
                ]
                for s in take
            ],
            dtype=torch.long,
        ).to(be.w.device)
        idx = torch.tensor(slots, device=be.w.device)
        st.tokens[idx], st.pos[idx], st.max_new[idx], st.key[idx] = init.unbind(1)
        st.step[idx] = 0
        st.truncated[idx] = 0
        st.waited[idx] = 0
        st.done[idx] = False
        for slot, seq in zip(slots, take):
            self.slot_seq[slot] = seq
            self.slot_pos[slot] = len(self.prompts[seq.prompt]) - 1
            self.slot_left[slot] = seq.max_new

    def _prefill(self, group: list[int]):
        be = self.be
        T = max(1, max(len(self.prompts[i]) - 1 for i in group))
        ids = torch.zeros(len(group), T, dtype=torch.long)
        for r, i in enumerate(group):
            body = self.prompts[i][:-1]
            ids[r, : len(body)] = torch.tensor(body, dtype=torch.long)
            self.stats["prefill_tokens"] += len(body)
        ks, vs = prefill(be.w, ids.to(be.w.device), be.cos, be.sin)
        return ks, vs, {i: r for r, i in enumerate(group)}

    def _harvest(self, rows: int) -> None:
        be, st = self.be, self.be.state
        done, step, trunc = torch.stack([st.done[:rows].long(), st.step[:rows], st.truncated[:rows]]).cpu().tolist()
        live = [i for i in range(rows) if self.slot_seq[i] is not None]
        for i in live:  # from the device: a row held for the exact redraw ran fewer steps than the window
            seq = self.slot_seq[i]
            self.slot_pos[i] = len(self.prompts[seq.prompt]) - 1 + step[i]
            self.slot_left[i] = seq.max_new - step[i]
        finished = [i for i in live if done[i]]
        if self.params.stop:
            finished += self._stop_strings([i for i in live if not done[i]], step)
        if not finished:
            return
        width = max(step[i] for i in finished)
        rows_out = torch.tensor(finished, device=be.w.device)
        out = st.out[rows_out, :width].cpu().tolist()
        logps = st.logp[rows_out, :width].cpu().tolist() if self.params.logprobs else [None] * len(finished)
        for slot, toks, lp in zip(finished, out, logps):
            seq = self.slot_seq[slot]
            keep = self.cut_at.pop(slot, step[slot])
            seq.tokens = toks[:keep]
            seq.logprobs = lp[:keep] if lp is not None else None
            self.stats["truncated_steps"] += trunc[slot]
            self.slot_seq[slot] = None
            self.left_per_prompt[seq.prompt] -= 1
            if self.left_per_prompt[seq.prompt] == 0:
                self.prompts_done += 1
        if be.progress:
            be.progress(self.prompts_done, len(self.prompts))

    def _stop_strings(self, live: list[int], step: list[int]) -> list[int]:
        """Rows whose text now holds a stop string: marked done, to be cut after the token that completed it."""
        if not live:
            return []
        be, st, tok, stop = self.be, self.be.state, self.be.tokenizer, self.params.stop
        width = max(step[i] for i in live)
        out = st.out[torch.tensor(live, device=be.w.device), :width].cpu().tolist()
        hits = []
        for slot, toks in zip(live, out):
            toks = toks[: step[slot]]
            if not any(s in tok.decode(toks, skip_special_tokens=True) for s in stop):
                continue
            cut = next(
                c
                for c in range(1, len(toks) + 1)
                if any(s in tok.decode(toks[:c], skip_special_tokens=True) for s in stop)
            )
            self.cut_at[slot] = cut
            hits.append(slot)
        if hits:
            st.done[torch.tensor(hits, device=be.w.device)] = True
            self.stats["stop_string_hits"] += len(hits)
        return hits

    def _compact(self, live: list[int]) -> list[int]:
        """Move the live rows to slots [0, len(live))."""
        be, st = self.be, self.be.state
        n = len(live)
        movers = [i for i in live if i >= n]
        holes = [i for i in range(n) if self.slot_seq[i] is None]
        if not movers:
            return live
        src = torch.tensor(movers, device=be.w.device)
        dst = torch.tensor(holes[: len(movers)], device=be.w.device)
        L = min(be.cache.max_len, max(self.slot_pos[i] for i in movers) + 1)
        be.cache.k[:, dst, :, :L] = be.cache.k[:, src, :, :L]
        be.cache.v[:, dst, :, :L] = be.cache.v[:, src, :, :L]
        for name, t in st.tensors().items():
            if name != "slot_ids":
                t[dst] = t[src]
        st.done[src] = True
        for a, b in zip(movers, holes):
            self.slot_seq[b], self.slot_seq[a] = self.slot_seq[a], None
            self.slot_pos[b], self.slot_left[b] = self.slot_pos[a], self.slot_left[a]
        self.stats["compactions"] += 1
        return list(range(n))


def _bucket_rows(needed: int, slots: int) -> int:
    rows = slots
    while rows // 2 >= max(needed, MIN_ROWS):
        rows //= 2
    return rows


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _pick_attention(name: str, cuda: bool) -> str:
    if name == "auto":
        return "triton" if cuda and _has_triton() else "bmm"
    if name not in ("bmm", "sdpa", "triton"):
        raise ValueError(f"attention: {name!r} is not one of auto, bmm, sdpa, triton")
    if name == "triton" and not cuda:
        raise ValueError("attention 'triton' needs a CUDA model")
    return name


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


class _Timer:
    """Wall time per phase, synchronising the device at each phase's end (a few syncs per window)."""

    def __init__(self, device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.t: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.sync()
                timer.t[name] = timer.t.get(name, 0.0) + time.perf_counter() - self.t0

        return _Phase()

    def totals(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.t.items()}
