"""Bad input fails before any training starts, with one clear error naming the file, row or field."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import datasets
import pytest
from coevolve.data.sources import DataError
from conftest import TINY

from coevolve.cli import run_step
from coevolve.core import rundir
from coevolve.core.config import ConfigError, load_config, prepare_run


def write_config(tmp_path, extra: str) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(TINY.read_text() + "\n" + extra)
    return str(path)


def test_config_typo_names_field_and_suggests(tmp_path):
    with pytest.raises(
        ConfigError, match=r"cfg.yaml: unknown config field 'e_step.betta' \(did you mean 'e_step.beta'\?\)"
    ):
        load_config(write_config(tmp_path, "e_step: {betta: 0.1}"))
    with pytest.raises(ConfigError, match=r"unknown config field 'sampling.temprature'"):
        load_config(str(TINY), ["sampling.temprature=0.5"])


def test_config_wrong_type_names_field(tmp_path):
    with pytest.raises(ConfigError, match=r"tiny.yaml.*e_step.beta: .*valid number.*'high'"):
        load_config(str(TINY), ["e_step.beta=high"])
    with pytest.raises(ConfigError, match=r"e_step.pair_rule"):
        load_config(str(TINY), ["e_step.pair_rule=longest"])


def test_overrides_are_typed_and_saved(tmp_path):
    run = tmp_path / "run"
    cfg = prepare_run(str(TINY), ["e_step.beta=0.25", "steps.m_step=false", "e_step.train.learning_rate=1e-4"], run)
    assert cfg.e_step.beta == 0.25 and cfg.steps.m_step is False
    # Fields the override did not name keep the schema's defaults for that section.
    assert cfg.e_step.train.learning_rate == 1e-4 and cfg.e_step.train.lr_scheduler_type == "cosine"
    assert load_config(None, [], run).hash() == cfg.hash()
    assert cfg.policy.trust_remote_code is False and cfg.rm.trust_remote_code is False


def _init(tmp_path, overrides):
    run = tmp_path / "run"
    cfg = prepare_run(str(TINY), overrides, run)
    run_step("init", run, 0, cfg)
    return run


@pytest.mark.parametrize(
    "rows, columns, message",
    [
        ([{"question": "a"}], {}, r"missing column\(s\) \['prompt'\]"),
        ([{"prompt": "ok"}, {"prompt": "  "}], {}, r"row 1, column 'prompt': empty text"),
        ([{"q": "ok"}, {"q": ""}], {"prompt_column": "q"}, r"row 1, column 'q': empty text"),
    ],
)
def test_bad_prompts_name_file_row_and_column(tmp_path, rows, columns, message):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = json.dumps({"path": str(data), **columns})
    with pytest.raises(DataError, match=f"prompts.jsonl.*{message}"):
        _init(tmp_path, [f"data.prompts={source}"])
    assert not rundir.is_done(tmp_path / "run", 0, "init")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "p", "chosen": 3, "rejected": "r"}, r"row 1, column 'chosen': expected a string, got int 3"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, r"row 1: chosen equals rejected"),
    ],
)
def test_bad_pairs_name_row(tmp_path, row, message):
    data = tmp_path / "pairs.jsonl"
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    data.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=f"pairs.jsonl.*{message}"):
        _init(tmp_path, [f"data.pairs={json.dumps({'path': str(data)})}", "data.pair_source=generator"])


def test_unknown_model_path_fails_at_init(tmp_path):
    with pytest.raises(ConfigError, match=r"policy.name_or_path: '/nowhere/model': no such folder"):
        _init(tmp_path, ['policy={"name_or_path": "/nowhere/model"}'])


def test_cli_prints_one_clear_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "coevolve",
            "step",
            "init",
            "--run-dir",
            str(tmp_path / "r"),
            "--iteration",
            "0",
            "--config",
            str(TINY),
            "e_step.betta=1",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    # The override after the options reaches the config check, which names the field.
    assert proc.stderr.strip().splitlines()[-1].startswith("coevolve: error: ")
    assert "unknown config field 'e_step.betta'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_shipped_config_validates():
    configs = sorted((TINY.parent).glob("*.yaml"))
    assert len(configs) >= 4
    for path in configs:
        load_config(str(path))


def test_conversational_columns_take_the_last_turn(tmp_path):
    from coevolve.data.sources import load_source, select_columns

    data = tmp_path / "uf.jsonl"

    def turns(answer: str) -> list[dict]:
        return [{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer}]

    data.write_text(json.dumps({"prompt": "hi", "chosen": turns("hello"), "rejected": turns("go away")}) + "\n")
    row = select_columns(
        load_source(str(data)), "uf", {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
    )[0]
    assert row == {"prompt": "hi", "chosen": "hello", "rejected": "go away"}


@pytest.mark.parametrize(
    "override, field",
    [
        ("iterations=-2", "iterations"),
        ("e_step.num_samples=-1", "e_step.num_samples"),
        ("e_step.num_samples=1", "e_step.num_samples"),
        ("data.rm_fraction=1.5", "data.rm_fraction"),
        ("data.select_size=-5", "data.select_size"),
        ("e_step.beta=-1", "e_step.beta"),
        ("e_step.beta=0", "e_step.beta"),
        ("sampling.top_p=0", "sampling.top_p"),
        ("sampling.top_p=1.2", "sampling.top_p"),
        ("sampling.temperature=-0.5", "sampling.temperature"),
        ("e_step.train.learning_rate=0", "e_step.train.learning_rate"),
        ("m_step.train.per_device_train_batch_size=0", "m_step.train.per_device_train_batch_size"),
        ("data.num_prompts=0", "data.num_prompts"),
        ("e_step.tau=1.5", "e_step.tau"),
    ],
)
def test_out_of_range_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=r"tiny.yaml.*" + re.escape(field) + ": "):
        load_config(str(TINY), [override])


def test_splits_must_fit_the_generated_prompts():
    with pytest.raises(ConfigError, match=r"data.select_size \+ data.eval_size.*data.num_prompts=100"):
        load_config(str(TINY), ["data.num_prompts=100", "data.select_size=60", "data.eval_size=40"])


def test_greedy_sampling_is_refused_where_several_samples_per_prompt_are_drawn():
    # Temperature 0 is greedy decoding: one response per prompt, fine for looking at a model, but the
    # E-step draws num_samples of them to pair up (transformers refuses several greedy sequences).
    with pytest.raises(ConfigError, match=r"sampling.temperature: 0 is greedy decoding.*e_step.num_samples"):
        load_config(str(TINY), ["sampling.temperature=0"])
    # tiny.yaml's rm-init samples two answers per prompt for its "human" pairs; the generator's need none.
    with pytest.raises(ConfigError, match=r"sampling.temperature: 0 is greedy decoding.*data.pair_source: policy"):
        load_config(str(TINY), ["sampling.temperature=0", "iterations=0"])
    greedy = ["sampling.temperature=0", "iterations=0", "data.pair_source=generator"]
    assert load_config(str(TINY), greedy).sampling.temperature == 0


def test_e_step_mode_names_its_choices_and_online_batches_hold_whole_groups():
    assert load_config(str(TINY)).e_step.mode == "dpo"
    assert load_config(str(TINY), ["e_step.mode=rloo"]).e_step.mode == "rloo"
    bad = [
        (
            ["e_step.mode=ppo"],
            r"e_step.mode: Input should be 'dpo', 'seft', 'dpo\+seft', 'grpo' or 'rloo' \(got 'ppo'\)",
        ),
        # tiny.yaml's 24 rollouts a step are no whole number of groups of 5.
        (
            ["e_step.mode=grpo", "e_step.num_samples=5"],
            r"e_step.online.train: .* \(24 x 1\) must be a multiple of e_step.num_samples \(5\)",
        ),
        (
            ["e_step.mode=rloo", "e_step.reference=initial", "e_step.online.kl=0.1"],
            r"e_step.reference: the online modes' KL is to the iteration's start",
        ),
        (["e_step.online.kl=-1"], r"e_step.online.kl: "),
    ]
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=r"tiny.yaml.*" + message) as err:
            load_config(str(TINY), overrides)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("override", ["data.prompts={path: x.jsonl", "e_step.beta.x=1", "data.task.x=1"])
def test_malformed_overrides_are_one_line_errors(tmp_path, override):
    with pytest.raises(ConfigError, match=re.escape(repr(override))):
        load_config(str(TINY), [override])


def test_cli_refuses_a_bad_value_at_once_and_leaves_the_run_dir_alone(tmp_path):
    run = tmp_path / "r"
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "coevolve", "run", "--run-dir", str(run), "--config", str(TINY), "iterations=-2"],
        capture_output=True,
        text=True,
    )
    assert time.monotonic() - start < 5
    assert proc.returncode == 2 and not run.exists()
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "iterations: " in proc.stderr and "Traceback" not in proc.stderr


def only_config(run) -> bool:
    # prepare_run has saved the config; the failed init wrote nothing else (no step folder, log or store).
    return sorted(p.name for p in run.iterdir()) == ["config.yaml"]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        (b'{"prompt": "caf\xff"}\n', r"prompts.jsonl: line 2, column 16: not UTF-8 text \(byte 0xff\)"),
        (
            b'{"prompt": "unclosed}\n',
            r"prompts.jsonl: line 2, column 12: not valid JSON \(Unterminated string starting\)",
        ),
    ],
)
def test_unreadable_lines_name_file_and_line(tmp_path, bad_line, message):
    data = tmp_path / "prompts.jsonl"
    data.write_bytes(b'{"prompt": "ok"}\n' + bad_line + b'{"prompt": "fine"}\n')
    with pytest.raises(DataError, match=message):
        _init(tmp_path, [f"data.prompts={json.dumps({'path': str(data)})}"])
    assert only_config(tmp_path / "run")


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """A causal LM and a 2-output classifier saved as local folders, as a user's own models would be."""
    from transformers import LlamaForSequenceClassification

    from coevolve.core.config import TinyModel
    from coevolve.core.tiny import _llama_config, build_tiny_policy, build_tokenizer

    root = tmp_path_factory.mktemp("models")
    tok = build_tokenizer("word", ["list three animals"])
    for name, model in (
        ("causal", build_tiny_policy(TinyModel(), tok)),
        ("two_labels", LlamaForSequenceClassification(_llama_config(TinyModel(), tok, num_labels=2))),
    ):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


@pytest.mark.parametrize(
    "model, message",
    [
        ("two_labels", r"rm.name_or_path: '.*two_labels' has 2 outputs; an RM needs exactly 1"),
        (
            "causal",
            r"rm.name_or_path: '.*causal' is not a sequence classifier \(LlamaForCausalLM\); set rm.new_head: true",
        ),
    ],
)
def test_an_rm_without_one_output_is_refused_before_anything_is_written(tmp_path, saved_models, model, message):
    with pytest.raises(ConfigError, match=message):
        _init(tmp_path, [f"rm={json.dumps({'name_or_path': str(saved_models / model)})}"])
    assert only_config(tmp_path / "run")


def test_a_causal_lm_as_rm_is_taken_when_asked_for(tmp_path, saved_models):
    run = _init(tmp_path, [f"rm={json.dumps({'name_or_path': str(saved_models / 'causal'), 'new_head': True})}"])
    assert rundir.is_done(run, 0, "init")


@pytest.mark.parametrize(
    "name, message",
    [
        ("models/mypolicy", r"policy.name_or_path: 'models/mypolicy': no such folder"),
        ("./mypolicy", r"policy.name_or_path: './mypolicy': no such folder"),
        (
            "someone/no-such-model",
            r"policy.name_or_path: 'someone/no-such-model': no such local folder, and no such model in the local "
            r"Hugging Face cache, with the hub offline",
        ),
        (
            "no-such-model-xyz",
            r"policy.name_or_path: 'no-such-model-xyz': no such model in the local Hugging Face cache, with the hub offline",
        ),
    ],
)
def test_a_missing_model_fails_at_once(tmp_path, monkeypatch, name, message):
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=message):
        _init(tmp_path, [f"policy={json.dumps({'name_or_path': name})}"])
    assert time.monotonic() - start < 5
    assert only_config(tmp_path / "run")


def write_prompts(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return [f"data.prompts={json.dumps({'path': str(path)})}"]


PROMPTS = [f"list {n} animals in order" for n in range(1, 80)]


@pytest.mark.parametrize("rule", ["drop", "truncate"])
def test_over_long_prompts_are_dropped_or_truncated_and_counted(tmp_path, rule):
    huge = "animals " * 50_000
    data = write_prompts(tmp_path / "prompts.jsonl", PROMPTS + [huge])
    run = _init(tmp_path, data + [f"data.long_prompts={rule}"])
    done = rundir.read_done(run, 0, "init")
    assert done["metrics"][f"data/prompts_long_{'truncated' if rule == 'truncate' else 'dropped'}"] == 1
    kept = datasets.load_from_disk(str(run / "iter_0/init/data/prompts"))["prompt"]
    # The tiny policy reads 256 positions, 16 of them left for the response (sampling.max_new_tokens).
    assert huge not in kept and len(kept) == len(PROMPTS) + (rule == "truncate")
    assert all(len(p.split()) < 240 for p in kept)
    assert "1 rows with a prompt over 240 tokens" in (run / "iter_0/init/log.txt").read_text()


def test_an_over_long_prompt_can_be_an_error(tmp_path):
    data = write_prompts(tmp_path / "prompts.jsonl", PROMPTS[:5] + ["animals " * 50_000] + PROMPTS[5:])
    start = time.monotonic()
    with pytest.raises(
        DataError, match=r"prompts.jsonl: row 5: prompt of 5000\d tokens, over data.max_prompt_tokens=240"
    ):
        _init(tmp_path, data + ["data.long_prompts=error"])
    assert time.monotonic() - start < 5
    assert only_config(tmp_path / "run")


def test_a_data_file_fixed_after_init_is_picked_up(tmp_path):
    file = tmp_path / "prompts.jsonl"
    data = write_prompts(file, PROMPTS)
    run = _init(tmp_path, data)
    write_prompts(file, PROMPTS[:-1] + ["list two birds"])
    cfg = prepare_run(None, [], run)
    run_step("init", run, 0, cfg)
    kept = datasets.load_from_disk(str(run / "iter_0/init/data/prompts"))["prompt"]
    assert "list two birds" in kept and PROMPTS[-1] not in kept
    # Once a later step has used init's outputs, a changed file is refused, naming it.
    (run / "iter_0/sft-warmup").mkdir()
    (run / "iter_0/sft-warmup/DONE.json").write_text("{}")
    write_prompts(file, PROMPTS)
    before = sorted(str(p) for p in run.rglob("*"))
    with pytest.raises(
        ConfigError,
        match=r"prompts.jsonl: changed since init read it, and iter_0/sft-warmup was made from the old content",
    ):
        run_step("init", run, 0, cfg)
    assert sorted(str(p) for p in run.rglob("*")) == before


def test_splits_that_do_not_fit_the_file_fail_before_any_model_loads(tmp_path):
    data = write_prompts(tmp_path / "prompts.jsonl", PROMPTS[:10])
    with pytest.raises(
        DataError, match=r"prompts.jsonl: 10 unique prompts; data.select_size=8 and data.eval_size=1 leave 1, too few"
    ):
        _init(tmp_path, data + ["data.select_size=8", "data.eval_size=1"])
    assert only_config(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"data.select_size: e_step.select picks"):
        load_config(str(TINY), ["data.select_size=0"])


@pytest.mark.integration
def test_run_stops_at_bad_data_with_the_steps_one_line(tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xff"}\n')
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "coevolve",
            "run",
            "--config",
            str(TINY),
            "--run-dir",
            str(run),
            "launch.preload=false",
            f"data.prompts={json.dumps({'path': str(bad)})}",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip().splitlines()[-1] == f"coevolve: error: {bad}: line 2, column 16: not UTF-8 text (byte 0xff)"
    )
    assert not run.exists()  # the command made it, and leaves it as it found it: not there


def test_an_unreachable_hub_fails_at_once_without_retries(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.monotonic()
    with pytest.raises(
        ConfigError,
        match=r"'no-such-model-xyz': no such model in the local Hugging Face cache, with the hub offline or unreachable",
    ):
        _init(tmp_path, ['policy={"name_or_path": "no-such-model-xyz"}'])
    assert time.monotonic() - start < 5
    assert only_config(tmp_path / "run")


@pytest.mark.parametrize(
    "spec, message",
    [
        (None, r"data.task: no task spec '.*nowhere.yaml' \(builtins: .*toy"),
        ("kind: nosuch\n", r"data.task: .*bad.yaml: unknown task kind 'nosuch'"),
        (
            "kind: toy\ndemonstrations: {mix: {perfect: 1, typo: 1}}\n",
            r"data.task: .*bad.yaml: unknown flaw\(s\) \['typo'\]",
        ),
    ],
)
def test_a_bad_task_spec_is_named(tmp_path, spec, message):
    path = tmp_path / ("bad.yaml" if spec else "nowhere.yaml")
    if spec:
        path.write_text(spec)
    with pytest.raises(ConfigError, match=message):
        _init(tmp_path, [f"data.task={path}"])
    assert only_config(tmp_path / "run")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["data.max_prompt_tokens=250"],
            r"data.max_prompt_tokens=250 \+ sampling.max_new_tokens=16 exceed the policy's context \(256 tokens\)",
        ),
        (["sampling.max_new_tokens=300"], r"^sampling.max_new_tokens=300 exceed the policy's context \(256 tokens\)"),
    ],
)
def test_prompt_and_response_lengths_must_fit_the_policys_context(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _init(tmp_path, overrides)
    assert only_config(tmp_path / "run")


@pytest.mark.parametrize(
    "path, message",
    [
        ("./nowhere/prompts", r"\./nowhere/prompts: no such file or folder"),
        (
            "someone/no-such-dataset",
            r"someone/no-such-dataset: not in the local datasets cache, with the hub offline or unreachable",
        ),
    ],
)
def test_a_missing_dataset_fails_at_once(tmp_path, monkeypatch, path, message):
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.monotonic()
    with pytest.raises(DataError, match=message):
        _init(tmp_path, [f"data.prompts={json.dumps({'path': path})}"])
    assert time.monotonic() - start < 5
    assert only_config(tmp_path / "run")


def test_a_config_given_for_an_existing_run_is_compared_field_by_field(tmp_path):
    run = tmp_path / "r"
    prepare_run(str(TINY), ["data.num_prompts=120"], run)
    other = write_config(tmp_path, "serve: {schedules: [{cron: '0 2 * * *'}]}")
    proc = subprocess.run(
        [sys.executable, "-m", "coevolve", "run", "--run-dir", str(run), "--config", other],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert (
        "differs from it in data.num_prompts (120 in the run, 900 given), serve.schedules ([] in the run, "
        in proc.stderr
    )
    assert "leave out --config to continue the run as it is" in proc.stderr and "a new --run-dir" in proc.stderr
    # The same file as the run's own, or none, continues it.
    assert prepare_run(str(TINY), ["data.num_prompts=120"], run).data.num_prompts == 120
    assert prepare_run(None, [], run).data.num_prompts == 120


@pytest.mark.parametrize(
    "override, message",
    [
        ("serve.schedules=[{cron: '61 * * * *'}]", "serve.schedules.0: cron '61 * * * *' is not a cron line"),
        ("serve.schedules=[{}]", "serve.schedules.0: give one of cron"),
        ("serve.schedules=[{interval_s: 0}]", "serve.schedules.0.interval_s: Input should be greater than 0"),
    ],
)
def test_bad_schedules_name_the_field(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(str(TINY), [override])


def test_serve_refuses_a_bad_schedule_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "coevolve", "serve", "--run-dir", str(tmp_path / "r"), "--cron", "61 * * * *"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr[-2000:]
    assert "--cron: cron '61 * * * *' is not a cron line" in proc.stderr
