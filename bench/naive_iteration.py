"""The baseline of bench_iteration.py: one Mutual-Taught iteration as plain scripts glued together by
hand, the way users do it before coevolve: HF `generate` (left padding, fixed batches, n samples per
prompt through `num_return_sequences`), the RM scoring fixed batches, trl's DPOTrainer and
RewardTrainer at their defaults apart from the hyper-parameters both pipelines share. Each stage is
its own process and hands files on disk to the next, as separate scripts would.

    python3 bench/naive_iteration.py STAGE --work W     (stages in order: generate score dpo select pseudo rm)

W/naive/settings.json (written by bench_iteration.py) holds the shared settings and the prompt splits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from coevolve.policy.pairs import length_controlled

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def read(path: Path):
    return json.loads(path.read_text())


def write(path: Path, value) -> None:
    path.write_text(json.dumps(value))


def generate(model_path: Path, prompts: list[str], n: int, s: dict) -> list[list[tuple[str, int]]]:
    """n (text, token count) samples per prompt."""
    tok = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPE).to(DEVICE).eval()
    per_batch = max(1, s["batch_rows"] // n)
    out = []
    for i in range(0, len(prompts), per_batch):
        enc = tok([p + "\n" for p in prompts[i : i + per_batch]], return_tensors="pt", padding=True).to(DEVICE)
        with torch.no_grad():
            ids = model.generate(
                **enc,
                do_sample=True,
                temperature=s["temperature"],
                top_p=s["top_p"],
                max_new_tokens=s["max_new_tokens"],
                num_return_sequences=n,
                pad_token_id=tok.pad_token_id,
            )
        completions = ids[:, enc["input_ids"].shape[1] :]
        samples = list(
            zip(
                tok.batch_decode(completions, skip_special_tokens=True),
                (completions != tok.pad_token_id).sum(1).tolist(),
            )
        )
        out += [samples[j * n : (j + 1) * n] for j in range(len(samples) // n)]
    return out


def score(rm_path: Path, prompts: list[str], responses: list[str], s: dict) -> list[float]:
    tok = AutoTokenizer.from_pretrained(rm_path)
    model = AutoModelForSequenceClassification.from_pretrained(rm_path, dtype=DTYPE).to(DEVICE).eval()
    texts = [p + "\n" + r + tok.eos_token for p, r in zip(prompts, responses)]
    scores = []
    for i in range(0, len(texts), s["batch_rows"]):
        enc = tok(
            texts[i : i + s["batch_rows"]],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=s["max_length"],
        ).to(DEVICE)
        with torch.no_grad():
            scores += model(**enc).logits[:, 0].float().tolist()
    return scores


def stage_generate(w: Path, s: dict) -> None:
    write(w / "samples.json", generate(w / "policy", s["policy_prompts"], s["num_samples"], s))


def stage_score(w: Path, s: dict) -> None:
    """The paper's pairs (the same rule as ours: chosen = the shortest response scoring above the
    prompt's mean, rejected = the lowest scoring)."""
    samples = read(w / "samples.json")
    flat_p = [p for p, rs in zip(s["policy_prompts"], samples) for _ in rs]
    flat_s = score(w / "rm", flat_p, [text for rs in samples for text, _ in rs], s)
    n, pairs = s["num_samples"], []
    for i, (prompt, rs) in enumerate(zip(s["policy_prompts"], samples)):
        texts, lengths = [t for t, _ in rs], [c for _, c in rs]
        picked = length_controlled(texts, flat_s[i * n : (i + 1) * n], lengths)
        if isinstance(picked, tuple):  # else the reason there is no pair
            pairs.append({"prompt": prompt, "chosen": texts[picked[0]], "rejected": texts[picked[1]]})
    write(w / "pairs.json", pairs)


def stage_dpo(w: Path, s: dict) -> None:
    import datasets
    from trl import DPOConfig, DPOTrainer

    rows = [
        {"prompt": r["prompt"] + "\n", "chosen": r["chosen"], "rejected": r["rejected"]} for r in read(w / "pairs.json")
    ]
    args = DPOConfig(
        output_dir=str(w / "dpo"),
        learning_rate=s["dpo_lr"],
        beta=s["beta"],
        per_device_train_batch_size=s["dpo_batch"],
        num_train_epochs=1,
        max_length=s["max_length"],
        bf16=DEVICE == "cuda",
        use_cpu=DEVICE == "cpu",
        save_strategy="steps",
        save_steps=s["save_steps"],
        report_to="none",
        logging_steps=10,
    )
    trainer = DPOTrainer(
        model=str(w / "policy"),
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(w / "policy"),
    )
    trainer.train()
    trainer.save_model(str(w / "dpo" / "final"))


def stage_select(w: Path, s: dict) -> None:
    """Each candidate and the starting policy answer the selection prompts once; the RM judges."""
    prompts = s["select_prompts"]
    base = score(w / "rm", prompts, [r[0][0] for r in generate(w / "policy", prompts, 1, s)], s)
    best = (-1.0, None)
    for ckpt in sorted((w / "dpo").glob("checkpoint-*")) + [w / "dpo" / "final"]:
        cand = score(w / "rm", prompts, [r[0][0] for r in generate(ckpt, prompts, 1, s)], s)
        rate = statistics.mean(1.0 if c > b else 0.5 if c == b else 0.0 for c, b in zip(cand, base))
        best = max(best, (rate, str(ckpt)))
    (w / "selected.txt").write_text(best[1])


def stage_pseudo(w: Path, s: dict) -> None:
    """M-step pairs: the new policy's response preferred over the old one's, unless the old RM finds it
    confidently worse (margin under minus the std of the old policy's scores)."""
    prompts = s["rm_prompts"]
    new = [r[0][0] for r in generate(Path((w / "selected.txt").read_text()), prompts, 1, s)]
    old = [r[0][0] for r in generate(w / "policy", prompts, 1, s)]
    new_s, old_s = score(w / "rm", prompts, new, s), score(w / "rm", prompts, old, s)
    eps = statistics.pstdev(old_s)
    write(
        w / "pseudo.json",
        [
            {"prompt": p, "chosen": a, "rejected": b}
            for p, a, b, sa, sb in zip(prompts, new, old, new_s, old_s)
            if a != b and sa - sb > -eps
        ],
    )


def stage_rm(w: Path, s: dict) -> None:
    import datasets
    from trl import RewardConfig, RewardTrainer

    rows = [
        {"chosen": r["prompt"] + "\n" + r["chosen"], "rejected": r["prompt"] + "\n" + r["rejected"]}
        for r in read(w / "pseudo.json") + read(w / "pairs.json")
    ]
    args = RewardConfig(
        output_dir=str(w / "rm_train"),
        learning_rate=s["rm_lr"],
        per_device_train_batch_size=s["rm_batch"],
        num_train_epochs=1,
        max_length=s["max_length"],
        bf16=DEVICE == "cuda",
        use_cpu=DEVICE == "cpu",
        save_strategy="no",
        report_to="none",
        logging_steps=10,
    )
    trainer = RewardTrainer(
        model=str(w / "rm"),
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(w / "rm"),
    )
    trainer.train()
    trainer.save_model(str(w / "rm_new"))


STAGES = {
    "generate": stage_generate,
    "score": stage_score,
    "dpo": stage_dpo,
    "select": stage_select,
    "pseudo": stage_pseudo,
    "rm": stage_rm,
}

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=list(STAGES))
    ap.add_argument("--work", type=Path, required=True)
    a = ap.parse_args()
    STAGES[a.stage](a.work, read(a.work / "settings.json"))
