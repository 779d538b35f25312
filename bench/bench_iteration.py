"""One full Mutual-Taught iteration (e-step with model selection, then m-step) on a 0.5B shape: ours
(`coevolve run`, each step its own process) against the same iteration as a naive sequence of plain
TRL scripts with HF `generate` (bench/naive_iteration.py), same model, prompts, splits and
hyper-parameters (issue 9, bench 3).

Reported: both wall times and their ratio; ours broken down by phase kind (generation, scoring,
training, selection, data, measurement) from the steps' DONE.json, less the phases' model and tokenizer
loads and saves (DONE.json's `io`), which are a part of their own; the rest of the wall time is outside
the phases, split by the steps' start and end times into the time until the first step starts (the
process, and the step server's imports when no server is up), the time inside the steps (their setup,
store appends, DONE.json) and the rest (step starts and exits, orchestration). `overhead_frac` is loads and
saves + outside phases, over ours' wall time; `ours_io`, per step, how many models and tokenizers its
phases loaded and saved and the seconds that took (the fixed cost of a step, issue 24). The naive one by
script; one save and one load of the policy checkpoint (safetensors), timed on their own.
Ours is timed on its second run of the iteration: the first fills the machine's compile caches, which
naive, run after it, shares; it is reported too (`ours_first_s`). Both find the step server up
(`core/stepserver.py`), started by the `coevolve run` that made their iteration 0, as every run of a
working session but its first does. `--profile` runs cold.

Workload: random weights of the named shape as a Llama (no download), a word-level tokenizer made here, prompts
of 32-128 random words; `--prompts` are split by `init` as the paper splits them (select set first,
then a third for the RM, two thirds for the policy).

On the GPU machine, with the wheels of `bash bench/carry.sh` carried in `.whl`:
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:. && bash bench/device_layout.sh
    python3 bench/bench_iteration.py --model qwen2-0.5b --out OUT
    python3 bench/bench_iteration.py --model qwen2-0.5b --profile --out OUT   # where ours' time goes: OUT/*.profile.json
    python3 bench/bench_iteration.py --model tiny --prompts 24 --select 4 --num-samples 3 --new-tokens 8   # CPU smoke run
    python3 bench/bench_iteration.py --record OUT/iteration.json --command "..."   # here: RESULTS.md, results.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_training import build_tokenizer, save_model  # noqa: E402
from common import MODELS, append_result, folders, log, record_args  # noqa: E402

# Phase names of the e-step and m-step (policy/e_step.py, reward/m_step.py) by what they spend time on.
PHASE_KINDS = {
    "generate": "generation",
    "score": "scoring",
    "train": "training",
    "select": "selection",
    "pairs": "data",
    "mix": "data",
    "pseudo": "data",
    "before": "measurement",
    "after": "measurement",
}
# Ours' wall time that is not the phases' work: their loads and saves of models and tokenizers, and the
# time outside them, in two parts: until the first step starts (the process, and the step server's
# imports if none is up), and the rest (each step's start, orchestration).
LOADS_SAVES = "loads and saves inside phases"
ONE_OFF = "outside phases: until the first step starts (process, step server)"
IN_STEPS = "outside phases: inside the steps (their setup, stores, DONE.json)"
OUTSIDE = "outside phases: between and after the steps (step starts and exits, orchestration)"
OVERHEAD = (LOADS_SAVES, ONE_OFF, IN_STEPS, OUTSIDE)
NAIVE_STAGES = ("generate", "score", "dpo", "select", "pseudo", "rm")


def timed(cmd: list[str], log_path: Path) -> float:
    t0 = time.perf_counter()
    with open(log_path, "a") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if code:
        # The log may stay on a machine that is gone by the time anyone looks: carry its end along.
        tail = "\n".join(log_path.read_text().splitlines()[-20:])
        raise RuntimeError(f"{' '.join(cmd[:5])} ... failed (exit {code}); end of {log_path}:\n{tail}")
    return time.perf_counter() - t0


def make_models(model: str, work: Path) -> tuple[int, dict]:
    """Policy and RM (the same shape with a score head) saved in bf16; one save and one load timed.
    Llama-typed: transformers maps a `qwen2` folder to Qwen2's own tokenizer class, which cannot read
    the word-level tokenizer made here (a real Qwen2 checkpoint ships its own)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tok = build_tokenizer(MODELS[model]["vocab_size"])
    params = save_model(model, tok, work / "policy", model_type="llama")
    rm = AutoModelForSequenceClassification.from_pretrained(work / "policy", num_labels=1, dtype=torch.bfloat16)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(work / "rm")
    tok.save_pretrained(work / "rm")
    del rm
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    policy = AutoModelForCausalLM.from_pretrained(work / "policy", dtype=torch.bfloat16).to(device)
    if device == "cuda":
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    policy.save_pretrained(work / "io_probe")
    save_s = time.perf_counter() - t0
    return params, {"load_s": round(load_s, 2), "save_s": round(save_s, 2)}


def write_prompts(n: int, vocab: int, path: Path) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(
                json.dumps({"prompt": " ".join(f"t{rng.randrange(vocab - 3)}" for _ in range(rng.randint(32, 128)))})
                + "\n"
            )


def ours_config(a, work: Path, backend: str, launch: dict | None = None) -> dict:
    def train(batch: int, lr: float) -> dict:
        return {
            "learning_rate": lr,
            "per_device_train_batch_size": batch,
            "gradient_accumulation_steps": 1,
            "max_length": a.max_length,
            "logging_steps": 10,
            "group_by_length": True,
        }

    return {
        "run_name": "bench-iteration",
        "iterations": 0,
        "policy": {"name_or_path": str(work / "policy")},
        "rm": {"name_or_path": str(work / "rm")},
        "data": {"prompts": {"path": str(work / "prompts.jsonl")}, "select_size": a.select},
        "sampling": {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": a.new_tokens},
        "generation": {"backend": backend, "batch_size": a.batch_rows},
        "steps": {"sft_warmup": False, "rm_init": False, "m_step": True, "evaluate": False},
        # tau 0: random weights win model selection by chance; the iteration must go on to the m-step.
        "e_step": {
            "num_samples": a.num_samples,
            "beta": 0.01,
            "save_steps": a.save_steps,
            "tau": 0.0,
            "train": train(a.dpo_batch, 7e-7),
        },
        "m_step": {"train": train(a.rm_batch, 2e-6)},
        "tracking": {"mode": "disabled"},
        **({"launch": launch} if launch else {}),
    }


def init_ours(a, work: Path, backend: str, name: str = "ours", launch: dict | None = None) -> Path:
    """Ours' run directory `work/name` with iteration 0 (init) done: not part of the iteration measured."""
    import yaml

    (work / "ours.yaml").write_text(yaml.safe_dump(ours_config(a, work, backend, launch)))
    run = work / name
    # A run left by an earlier call (a warm machine keeps /tmp) has iteration 1 done already.
    shutil.rmtree(run, ignore_errors=True)
    timed(
        [sys.executable, "-m", "coevolve", "run", "--config", str(work / "ours.yaml"), "--run-dir", str(run)],
        work / "ours.log",
    )
    return run


def run_ours(
    a, work: Path, backend: str, launch: dict | None = None, warmup: bool = True
) -> tuple[float, dict, float | None]:
    """Ours' iteration 1: its wall time, the time by kind, and the untimed first run's wall time (None
    without `warmup`); `launch` is the config's section."""
    # The first run leaves the machine's compile caches (the Triton kernels of trl's fused LM head and of
    # our decoder) as any earlier run on it would; measured cold, ours alone paid for them (~10 s on the
    # H200) and naive, which runs after it with the same caches, did not.
    first_s = None
    if warmup:
        first = init_ours(a, work, backend, "warmup", launch)
        first_s = timed(
            [sys.executable, "-m", "coevolve", "run", "--run-dir", str(first), "iterations=1"], work / "ours.log"
        )
    run = init_ours(a, work, backend, launch=launch)
    start = time.time()
    wall = timed([sys.executable, "-m", "coevolve", "run", "--run-dir", str(run), "iterations=1"], work / "ours.log")
    done = {step: json.loads((run / "iter_1" / step / "DONE.json").read_text()) for step in ("e-step", "m-step")}
    kinds: dict[str, float] = {LOADS_SAVES: 0.0}
    for step in done.values():
        for phase, seconds in step["timings"].items():
            moved = step["io"][phase]["load_s"] + step["io"][phase]["save_s"]
            kind = PHASE_KINDS.get(phase, "other")
            kinds[kind] = kinds.get(kind, 0.0) + seconds - moved
            kinds[LOADS_SAVES] += moved
    outside = wall - sum(kinds.values())
    # DONE.json's start and end of each step (to the millisecond) split the time outside the phases.
    when = lambda step, key: datetime.datetime.fromisoformat(done[step][key]).timestamp()  # noqa: E731
    kinds[ONE_OFF] = min(max(when("e-step", "started") - start, 0.0), outside)
    kinds[IN_STEPS] = sum(
        when(s, "finished") - when(s, "started") - sum(d["timings"].values()) for s, d in done.items()
    )
    kinds[OUTSIDE] = outside - kinds[ONE_OFF] - kinds[IN_STEPS]
    return wall, {k: round(v, 2) for k, v in kinds.items()}, first_s


def ours_io(run: Path) -> dict:
    """Per step of iteration 1, the loads and saves of its phases and their seconds (DONE.json's `io`)."""
    out = {}
    for step in ("e-step", "m-step"):
        phases = json.loads((run / "iter_1" / step / "DONE.json").read_text())["io"].values()
        out[step] = {key: round(sum(io[key] for io in phases), 3) for key in ("loads", "saves", "load_s", "save_s")}
    return out


def profile_ours(a, work: Path, backend: str, out: Path) -> None:
    """Where ours' time goes, for `--profile`: the step server's imports in a fresh interpreter
    (`-X importtime`), then the iteration's steps each under torch.profiler (bench/profile_step.py)."""
    preload = "from coevolve.core.steps import STEPS; import importlib; [importlib.import_module(s.module) for s in STEPS.values()]"
    t = timed([sys.executable, "-X", "importtime", "-c", preload], out / "importtime.log")
    log(f"preload imports: {t:.1f}s (interpreter included)")
    run = init_ours(a, work, backend)
    for step in ("e-step", "m-step"):
        timed(
            [
                sys.executable,
                str(ROOT / "bench" / "profile_step.py"),
                "--run-dir",
                str(run),
                "--step",
                step,
                "--iteration",
                "1",
                "--out",
                str(out),
            ],
            out / "profile.log",
        )
    log((out / "profile.log").read_text())


def run_naive(a, work: Path, stages: dict, save) -> None:
    """The same prompts, split as ours split them, through the naive scripts; each script's time goes
    into `stages` and is saved as soon as it is known (a device call may end before the last)."""
    import datasets

    naive = work / "naive"
    naive.mkdir(exist_ok=True)
    for model in ("policy", "rm"):
        (naive / model).symlink_to(work / model)
    prompts = datasets.load_from_disk(str(work / "ours" / "iter_0" / "init" / "data" / "prompts"))
    split = lambda name: [r["prompt"] for r in prompts if r["split"] == name]  # noqa: E731
    settings = {
        "policy_prompts": split("policy"),
        "rm_prompts": split("rm"),
        "select_prompts": split("select"),
        "num_samples": a.num_samples,
        "temperature": 0.8,
        "top_p": 0.95,
        "max_new_tokens": a.new_tokens,
        "batch_rows": a.batch_rows,
        "max_length": a.max_length,
        "beta": 0.01,
        "save_steps": a.save_steps,
        "dpo_lr": 7e-7,
        "dpo_batch": a.dpo_batch,
        "rm_lr": 2e-6,
        "rm_batch": a.rm_batch,
    }
    (naive / "settings.json").write_text(json.dumps(settings))
    for stage in NAIVE_STAGES:
        stages[stage] = round(
            timed(
                [sys.executable, str(ROOT / "bench" / "naive_iteration.py"), stage, "--work", str(naive)],
                work / "naive.log",
            ),
            2,
        )
        save()


def record(path: Path, command: str) -> None:
    r = json.loads(path.read_text())
    line = {
        k: r.get(k)
        for k in (
            "bench",
            "device",
            "date",
            "model",
            "params",
            "workload",
            "ours_s",
            "ours_first_s",
            "naive_s",
            "speedup",
            "overhead_frac",
            "ours_io",
            "io",
        )
    }
    rows = [f"| ours: {k} | {v:.1f} |" for k, v in r["ours_breakdown"].items()] + [
        f"| naive: {k} | {v:.1f} |" for k, v in r["naive_breakdown"].items()
    ]
    against = (
        f"naive TRL scripts {r['naive_s']:.1f} s: **{r['speedup']:.2f}x**"
        if r.get("naive_s")
        else "naive TRL scripts not run (--ours-only)"
    )
    first = (
        f"Ours' first run (compile caches cold): {r['ours_first_s']:.1f} s. "
        if r["ours_first_s"]
        else "Ours timed on its first run of this call (--no-warmup). "
    )
    md = [
        f"\n## iteration: {r['date']}, {r['device']}",
        f"`{command}`",
        f"Model: {r['model']} shape, random weights, {r['params'] / 1e6:.0f}M params. Workload: {json.dumps(r['workload'])}.",
        "",
        "| part | seconds |",
        "|---|---|",
        *rows,
        "",
        f"One Mutual-Taught iteration: ours {r['ours_s']:.1f} s, {against}. "
        f"Loads and saves, process start and orchestration: {100 * r['overhead_frac']:.1f}% of ours; "
        + ", ".join(f"{step} {io['loads']} loads and {io['saves']} saves" for step, io in r["ours_io"].items())
        + f". {first}"
        f"Policy checkpoint: save {r['io']['save_s']} s, load {r['io']['load_s']} s.",
        "",
    ]
    append_result(ROOT / "bench", line, md)
    log("\n".join(md))


def workload_args(ap: argparse.ArgumentParser, model: str = "qwen2-0.5b") -> None:
    """The iteration's workload, shared with bench_scaling.py."""
    ap.add_argument("--model", default=model, choices=sorted(MODELS))
    # Sized so that the naive side (HF generate at ~2K tokens/s on a 0.5B model) fits a 10-minute call.
    ap.add_argument("--prompts", type=int, default=400, help="all prompts, before init splits them")
    ap.add_argument("--select", type=int, default=48, help="model-selection prompts (D_MS)")
    ap.add_argument("--num-samples", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batch-rows", type=int, default=512)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--dpo-batch", type=int, default=16)
    ap.add_argument("--rm-batch", type=int, default=32)
    ap.add_argument("--save-steps", type=int, default=5, help="DPO steps between selection candidates")
    ap.add_argument("--backend", help="ours' generation backend (default: static on a GPU, hf elsewhere)")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, help="where the results and the logs go")


def workload(a, backend: str) -> dict:
    return {
        "prompts": a.prompts,
        "select": a.select,
        "num_samples": a.num_samples,
        "new_tokens": a.new_tokens,
        "batch_rows": a.batch_rows,
        "dpo_batch": a.dpo_batch,
        "rm_batch": a.rm_batch,
        "save_steps": a.save_steps,
        "backend": backend,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    workload_args(ap)
    ap.add_argument(
        "--profile", action="store_true", help="only ours' steps, each under torch.profiler (see profile_ours)"
    )
    ap.add_argument("--ours-only", action="store_true", help="leave the naive scripts out (no ratio)")
    ap.add_argument(
        "--no-warmup",
        action="store_true",
        help="time ours' first run: for a call whose earlier run filled the compile caches",
    )
    record_args(ap, "iteration.json", "bench_iteration.py")
    a = ap.parse_args()
    if a.record:
        record(a.record, a.command)
        return
    import torch

    work, out = folders(a, "iteration")
    cuda = torch.cuda.is_available()
    backend = a.backend or ("static" if cuda else "hf")
    params, io = make_models(a.model, work)
    write_prompts(a.prompts, MODELS[a.model]["vocab_size"], work / "prompts.jsonl")
    if a.profile:
        profile_ours(a, work, backend, out)
        return
    ours_s, ours_parts, first_s = run_ours(a, work, backend, warmup=not a.no_warmup)
    log(f"ours: {ours_s:.1f}s {ours_parts} (first run: {first_s and round(first_s, 1)}s)")
    result = {
        "bench": "iteration",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": a.model,
        "params": params,
        "workload": workload(a, backend),
        "ours_s": round(ours_s, 1),
        "ours_first_s": first_s and round(first_s, 1),
        "overhead_frac": round(sum(ours_parts[k] for k in OVERHEAD) / ours_s, 3),
        "ours_breakdown": ours_parts,
        "ours_io": ours_io(work / "ours"),
        "naive_breakdown": {},
        "io": io,
    }

    def save() -> None:
        naive = result["naive_breakdown"]
        if len(naive) == len(NAIVE_STAGES):
            result.update(naive_s=round(sum(naive.values()), 1), speedup=round(sum(naive.values()) / ours_s, 2))
        (out / "iteration.json").write_text(json.dumps(result, indent=1))
        for name in ("ours.log", "naive.log"):
            if (work / name).exists() and out != work:
                (out / name).write_text((work / name).read_text()[-200_000:])

    save()
    if not a.ours_only:
        run_naive(a, work, result["naive_breakdown"], save)
    log(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
