"""The README's run-directory tree and DONE.json example are made from a real tiny run (tests/tiny_run.py),
so they cannot drift from what the steps write. After a change to what a run writes, refresh them with

    REFRESH_README=1 .venv/bin/python -m pytest tests/test_readme.py

and read the diff: a note below whose folder is gone fails the test until it is moved or dropped."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from tiny_run import tiny_run  # noqa: F401  (the fixture)

from coevolve.core.steps import STEPS, position

README = Path(__file__).resolve().parents[1] / "README.md"

# What the tree says of a path (as the tree shows it: iterations 1+ as iter_K).
NOTES = {
    "config.yaml": "the resolved config (schema: coevolve/core/config.py)",
    "iter_0/": "the starting point: models and data, materialised once",
    "iter_0/init/data/prompts/": "(dataset) prompt_id, prompt, split (policy | rm | select | eval)",
    "iter_0/init/data/pairs/": "(dataset) prompt_id, prompt, chosen, rejected: the original preferences",
    "iter_0/init/data/demos/": "(dataset) prompt_id, prompt, completion: SFT demonstrations",
    "iter_0/init/policy/": "(model) save_pretrained folders (safetensors) with their tokenizers",
    "iter_0/rm-init/before/": "phases that only measure (the RM's accuracy before and after) keep no files",
    "iter_0/sft-warmup/": "optional (steps.sft_warmup)",
    "iter_0/rm-init/": "optional (steps.rm_init)",
    "iter_0/evaluate/": "optional (steps.evaluate), as in iteration K",
    "iter_K/": "K = 1, 2, ...: turns policy_{K-1}, rm_{K-1} into policy_K, rm_K",
    "iter_K/e-step/train/checkpoints/": "the DPO candidates; the selected one is policy_K",
    "iter_K/m-step/pseudo/": "pseudo pairs kept and dropped by the epsilon filter",
    "iter_K/evaluate/": "metrics eval/* in its DONE.json",
    "stores/": "retrospective stores, one dataset per kind and iteration (revisions too, with the reviser)",
    "wandb/": "W&B's own files, with tracking offline",
}
# In every step folder; the tree shows them once, in its first line.
STEP_FILES = ("DONE.json", "log.txt", "provenance.json", "phases")
# Not written by `coevolve run`: the fixture's console log and `coevolve report`'s page.
NOT_THE_RUN = {"coevolve-run.log", "report"}
# The E-step's metrics in the example: a few that say what it did.
EXAMPLE_METRICS = ("generate/length_mean", "score/mean", "pairs/count", "dpo/loss_last", "select/best_win_rate")


def shown(name: str) -> str:
    """Iterations and checkpoints past the first look alike: 1, 2, ... show as K."""
    return re.sub(r"[1-9]\d*", "K", name)


def kind(folder: Path) -> str | None:
    if (folder / "dataset_info.json").exists():
        return "(dataset)"
    if (folder / "config.json").exists():
        return "(model)"
    return None


def run_tree(run: Path) -> str:
    lines = ["RUN/"]
    noted: set[str] = set()

    def add(entry: str, depth: int, note: str | None) -> None:
        text = "  " * depth + entry
        lines.append(f"{text:<34} {note}" if note else text)

    def walk(folder: Path, prefix: str, depth: int) -> None:
        children: dict[str, Path] = {}
        # Files first, then folders; steps in run order.
        for child in sorted(
            folder.iterdir(), key=lambda p: (p.is_dir(), position(p.name) if p.name in STEPS else -1, p.name)
        ):
            if not child.name.startswith(".") and child.name not in NOT_THE_RUN:
                children.setdefault(shown(child.name) + ("/" if child.is_dir() else ""), child)
        is_step = depth == 2 and prefix.startswith("iter_")
        for entry, child in children.items():
            if is_step and entry.rstrip("/") in STEP_FILES:
                continue
            path = prefix + entry
            noted.add(path)
            opaque = kind(child) if child.is_dir() else None
            note = NOTES.get(path) or opaque
            if depth == 1 and child.is_dir() and prefix.startswith("iter_"):  # a step folder
                assert all((child / name).exists() for name in STEP_FILES), child
            add(entry, depth + 1, note)
            if child.is_dir() and opaque is None and child.name not in ("wandb", "trainer"):
                walk(child, path, depth + 1)

    walk(run, "", 0)
    missing = set(NOTES) - noted
    assert not missing, f"notes on folders the run no longer has: {sorted(missing)}"
    lines.insert(1, f"  (each step folder also holds {', '.join(STEP_FILES)}/)")
    return "\n".join(lines)


def _round(value):
    if isinstance(value, float):
        return float(f"{value:.3g}")
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    return value


def _first(mapping: dict, n: int) -> str:
    """The first n entries as JSON, then an ellipsis for the rest."""
    shown = json.dumps(dict(list(mapping.items())[:n]))
    return shown if len(mapping) <= n else shown[:-1] + ", …}"


def done_example(run: Path) -> str:
    done = json.loads((run / "iter_1" / "e-step" / "DONE.json").read_text())
    run_id = (run / ".wandb-id").read_text().strip()
    metrics = {key: _round(done["metrics"][key]) for key in EXAMPLE_METRICS}
    wandb = {key: value.replace(run_id, "<id>") for key, value in done["wandb"].items() if key != "dir"}
    lines = [
        '{"step": "e-step", "iteration": 1, "config_hash": "…", "started": "…", "finished": "…",',
        f' "inputs":  {json.dumps(done["inputs"])},',
        f' "outputs": {json.dumps(done["outputs"])},',
        f' "metrics": {json.dumps(metrics)[:-1]}, …}},',
        f' "timings": {json.dumps(_round(done["timings"]))},',
        f' "io": {_first(_round(done["io"]), 1)},',
        f' "stop": {json.dumps(done["stop"])},',
        f' "provenance": {{"config": {_first(done["provenance"]["config"], 3)},',
        f'                "built_on": {_first(dict.fromkeys(done["provenance"]["built_on"], "<its finished>"), 2)}}},',
        f' "wandb": {json.dumps({**wandb, "dir": "…"}, ensure_ascii=False)}}}',
    ]
    assert set(done) == {
        "step",
        "iteration",
        "config_hash",
        "started",
        "finished",
        "inputs",
        "outputs",
        "metrics",
        "timings",
        "io",
        "stop",
        "provenance",
        "wandb",
    }, sorted(done)
    return "\n".join(lines)


def between(text: str, name: str) -> tuple[int, int]:
    start = text.index(f"<!-- {name}: made by tests/test_readme.py -->\n") + len(
        f"<!-- {name}: made by tests/test_readme.py -->\n"
    )
    return start, text.index(f"<!-- /{name} -->", start)


def _numbers_masked(text: str) -> str:
    # Losses, rates and seconds move from machine to machine; the shape of the example does not.
    return re.sub(r"(?<=[:\[] )-?\d[\d.e+-]*", "#", text)


def test_the_readme_shows_the_run_directory_as_a_run_writes_it(tiny_run):
    text = README.read_text()
    made = {"run-tree": f"```\n{run_tree(tiny_run)}\n```\n", "done-json": f"```json\n{done_example(tiny_run)}\n```\n"}
    if os.environ.get("REFRESH_README"):
        for name, block in made.items():
            start, end = between(text, name)
            text = text[:start] + block + text[end:]
        README.write_text(text)
    for name, block in made.items():
        start, end = between(text, name)
        assert _numbers_masked(text[start:end]) == _numbers_masked(block), (
            f"README's {name} is out of date: REFRESH_README=1 (see {__file__})"
        )
