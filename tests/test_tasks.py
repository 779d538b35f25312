"""Sandbox tasks: gold rewards on hand-written responses, prompt streams, demos, BT label noise, specs."""

import math
from pathlib import Path

import pytest
import yaml
from coevolve.data.tasks import Task, load_task
from coevolve.data.tasks.task import BUILTIN_DIR, sigmoid, tokens

from coevolve.core.config import ConfigError


@pytest.fixture(scope="module")
def toy():
    return load_task("toy")


# --- toy: gold ------------------------------------------------------------------------------------
# toy.yaml: weights count 0.2, category 0.3, order 0.2, repeats 0.15, stop 0.15; each violation halves
# a constraint's credit; order counts only when the prompt asks for one (weights then sum to 0.8).
ALPHA = "list three animals in alphabetical order"
ANY = "name three animals without repeats"
REVERSE = "give four fruits in reverse alphabetical order all different"


@pytest.mark.parametrize(
    "prompt, response, gold",
    [
        (ALPHA, "cat dog fox", 1.0),
        (ANY, "fox cat dog", 1.0),
        (REVERSE, "plum peach mango apple", 1.0),
        (ALPHA, "fox dog cat", 1 - 0.2 * 0.75),  # two adjacent pairs out of order
        (REVERSE, "apple mango peach plum", 1 - 0.2 * 0.875),
        (ALPHA, "cat dog", 1 - 0.2 * 0.5),  # one short
        (ALPHA, "cat dog fox owl", 1 - 0.2 * 0.5),  # one too many
        (ALPHA, "cat dog red", 1 - 0.2 * 0.5 - 0.3 * 0.5),  # red: off category, so also one animal short
        (ALPHA, "cat cat fox", 1 - 0.15 * 0.5),  # one repeat
        (ALPHA, "cat dog fox ok", 1 - 0.15 * 0.5),  # junk after the list
        (ALPHA, "cat dog fox ok done", 1 - 0.15 * 0.75),
        (ANY, "red", (0.2 * 0.125 + 0.3 * 0.5 + 0.15 + 0.15) / 0.8),  # no order asked: weights sum to 0.8
        (ALPHA, "ok done", 0.0),
        (ALPHA, "", 0.0),
    ],
)
def test_toy_gold(toy, prompt, response, gold):
    assert toy.gold(prompt, response) == pytest.approx(gold)


def test_toy_parse_reads_prompt_text(toy):
    request = toy.parse("write six sports in reverse alphabetical order")
    assert (request.count, request.category, request.order) == (6, "sports", "reverse")
    assert toy.parse("list two colors all different").order == "none"
    with pytest.raises(ValueError):
        toy.gold("tell me a story", "cat")


# --- shared behaviour, both builtin tasks ----------------------------------------------------------
def test_prompts_deterministic_and_varied(toy):
    first = toy.prompts(300, seed=0)
    assert first == toy.prompts(300, seed=0)
    assert first != toy.prompts(300, seed=1)
    assert len(set(first)) == 300  # distinct while the prompt space (960 toy prompts) allows
    assert toy.prompts(50, seed=0) == first[:50]
    assert len({p.split()[2] for p in first}) == 8  # every category shows up


def test_demonstrations_mixed_quality(toy):
    demos = toy.demonstrations(400, seed=0)
    golds = [d["gold"] for d in demos]
    perfect = sum(g == 1.0 for g in golds) / len(golds)
    assert 0.25 < perfect < 0.5  # spec: 0.35 perfect, plus flaws that happen to be no-ops
    assert min(golds) < 0.8
    assert len(set(golds)) > 10
    assert all(d["gold"] == toy.gold(d["prompt"], d["completion"]) for d in demos)
    assert max(len(d["completion"].split()) for d in demos) <= 16
    assert demos == toy.demonstrations(400, seed=0)


def test_toy_corpus_covers_demonstrations_and_prompts(toy):
    corpus = set(toy.corpus())
    assert 100 <= len(corpus) <= 200
    for demo in toy.demonstrations(500, seed=3):
        assert set(demo["prompt"].split()) <= corpus
        assert set(demo["completion"].split()) == set(tokens(demo["completion"])) <= corpus


# --- Bradley-Terry labels ------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.3])
def test_label_noise_matches_bradley_terry(toy, temperature):
    better, worse = "cat dog fox", "cat dog red"  # gold gap 0.25
    gap = toy.gold(ALPHA, better) - toy.gold(ALPHA, worse)
    n = 4000
    pairs = toy.label_pairs([ALPHA] * n, [[better, worse]] * n, temperature, seed=0)
    assert len(pairs) == n
    share = sum(p["chosen"] == better for p in pairs) / n
    # 4 standard errors of a binomial share at n = 4000 is at most 0.032
    assert share == pytest.approx(sigmoid(gap / temperature), abs=0.032)
    assert share < 1.0


def test_label_temperature_zero_always_right_and_skips_ties(toy):
    responses = [
        ["cat dog fox", "fox dog cat"],
        ["cat dog", "cat dog fox"],
        ["cat dog", "dog fox"],
        ["cat dog fox", "cat dog fox"],
    ]
    pairs = toy.label_pairs([ALPHA] * 4, responses, temperature=0, seed=0)
    assert [p["chosen"] for p in pairs] == ["cat dog fox", "cat dog fox"]  # tie and one-response skipped
    assert all(p["chosen_gold"] > p["rejected_gold"] for p in pairs)
    many = toy.synthetic_pairs(300, seed=0, temperature=0)
    assert all(p["chosen_gold"] > p["rejected_gold"] for p in many)


def test_synthetic_pairs_format_and_noise(toy):
    pairs = toy.synthetic_pairs(300, seed=0, temperature=0.1)
    assert len(pairs) >= 290  # only pairs whose redraws never left a gold tie may be coin flips
    assert set(pairs[0]) == {"prompt", "chosen", "rejected", "chosen_gold", "rejected_gold"}
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    wrong = sum(p["chosen_gold"] < p["rejected_gold"] for p in pairs)
    assert 0 < wrong < 0.3 * len(pairs)
    assert all(p["chosen_gold"] == toy.gold(p["prompt"], p["chosen"]) for p in pairs)
    assert pairs == toy.synthetic_pairs(300, seed=0, temperature=0.1)


def test_label_temperature_defaults_to_spec(toy):
    responses = [["cat dog fox", "cat dog red"]] * 2000
    by_default = toy.label_pairs([ALPHA] * 2000, responses, seed=5)
    assert by_default == toy.label_pairs([ALPHA] * 2000, responses, toy.spec["noise"]["temperature"], seed=5)


# --- specs ---------------------------------------------------------------------------------------
def write_spec(tmp_path: Path, builtin: str, change) -> Path:
    spec = yaml.safe_load((BUILTIN_DIR / f"{builtin}.yaml").read_text())
    change(spec)
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_toy_spec_dropped_in_changes_behaviour(tmp_path, toy):
    def change(spec):
        spec["name"] = "toy-planets"
        spec["categories"] = {"planets": ["earth", "mars", "venus"], "moons": ["io", "titan", "luna"]}
        spec["counts"] = {2: "two"}
        spec["weights"]["stop"] = 0.0
        spec["demonstrations"]["mix"] = {"perfect": 1.0}

    custom = load_task(write_spec(tmp_path, "toy", change))
    assert isinstance(custom, Task) and custom.name == "toy-planets"
    prompts = custom.prompts(20, seed=0)
    assert all(p.split()[1:3] in (["two", "planets"], ["two", "moons"]) for p in prompts)
    assert all(d["gold"] == 1.0 for d in custom.demonstrations(50, seed=0))
    # junk no longer costs anything
    assert custom.gold("list two planets", "earth mars ok ok") == 1.0
    assert toy.gold("list two animals", "cat dog ok ok") < 1.0
    assert "titan" in custom.corpus() and "cat" not in custom.corpus()


def test_spec_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.task: no task spec 'no-such-task'"):
        load_task("no-such-task")
    bad_kind = write_spec(tmp_path, "toy", lambda s: s.update(kind="nope"))
    with pytest.raises(ValueError, match="kind"):
        load_task(bad_kind)
    bad_flaw = write_spec(tmp_path, "toy", lambda s: s["demonstrations"].update(mix={"typo": 1.0}))
    with pytest.raises(ValueError, match="typo"):
        load_task(bad_flaw)


def test_sigmoid_is_stable():
    assert sigmoid(1e9) == 1.0 and sigmoid(-1e9) == 0.0
    assert sigmoid(0.7) == pytest.approx(1 / (1 + math.exp(-0.7)))


# --- instruct: gold --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def instruct():
    return load_task("instruct")


CAT = "Write a diary entry about a lost cat. "


@pytest.mark.parametrize(
    "constraint, response, met",
    [
        ("Use at most 10 words.", "My cat is lost.", True),
        ("Use at most 10 words.", "one two three four five six seven eight nine ten eleven", False),
        ("Keep your answer to 4 words or fewer.", "My cat's gone, sadly.", True),  # "cat's" is one word
        ("Use at least 5 words.", "My cat has been lost since Monday.", True),
        ("Write 5 words or more.", "Cat lost.", False),
        ("Use between 3 and 5 words.", "My cat is lost again.", True),
        ("Answer in 3 to 5 words.", "Lost.", False),
        ("Use exactly 2 bullet points.", "- one\n- two", True),
        ("Use exactly 2 bullet points.", "Intro\n* one\n  * two", True),
        ("Format the answer as exactly 2 bullet points.", "- one\n- two\n- three", False),
        ("Use exactly 2 bullet points.", "1. one\n2. two", False),
        ("Write exactly 2 sentences.", "It costs 3.5 pounds. Help?", True),
        ("Answer in exactly 2 sentences.", "My cat is lost.", False),
        ("Include the word 'garden'.", "The Garden is big.", True),
        ("Mention the word 'garden' at least once.", "The gardens are big.", False),
        ("Do not use the word 'very'.", "Everything is fine.", True),
        ("Avoid the word 'very'.", "I am Very sad.", False),
        ("Write everything in lowercase letters.", "my cat is lost.", True),
        ("Use no capital letters at all.", "My cat is lost.", False),
        ("End your answer with the phrase 'see you soon'.", "Bye. See you soon!", True),
        ("Finish with the exact words 'see you soon'.", "See you soon, bye.", False),
        ("Give it a title wrapped in double angular brackets such as <<my title>>.", "<<Lost Cat>>\nGone.", True),
        ("Start with a title in double angular brackets like <<title>>.", "Lost Cat\nGone.", False),
        ("Start with a title in double angular brackets like <<title>>.", "<<>> Gone.", False),
        ("Do not use any commas.", "My cat is lost.", True),
        ("Avoid commas entirely.", "Sadly, my cat is lost.", False),
    ],
)
def test_instruct_each_constraint(instruct, constraint, response, met):
    assert instruct.gold(CAT + constraint, response) == (1.0 if met else 0.0)


def test_instruct_gold_is_weighted_share(instruct):
    # instruct.yaml weights: words_between 1.5, include_word 1.0, bullets 1.0, exclude_word 1.0
    prompt = CAT + "Use between 3 and 5 words and include the word 'garden'."
    assert instruct.gold(prompt, "My garden is lost.") == 1.0
    assert instruct.gold(prompt, "My cat is lost.") == pytest.approx(1.5 / 2.5)
    assert instruct.gold(prompt, "Garden.") == pytest.approx(1.0 / 2.5)
    assert instruct.gold(prompt, "") == 0.0
    prompt = CAT + "Use exactly 3 bullet points and do not use the word 'very'."
    assert instruct.gold(prompt, "- Mittens is gone\n- I searched\n- Call me") == 1.0
    assert instruct.gold(prompt, "- Mittens is very gone\n- I searched\n- Call me") == 0.5
    assert instruct.gold(prompt, "I am very sad.") == 0.0
    with pytest.raises(ValueError):
        instruct.gold("Write a diary entry about a lost cat.", "Dear diary.")


def test_instruct_prompts_parse_back(instruct):
    import random

    rng = random.Random(0)
    seen_kinds = set()
    for _ in range(400):
        prompt, constraints = instruct.compose(rng)
        assert instruct.parse(prompt) == constraints
        kinds = [kind for kind, _ in constraints]
        assert not set(kinds) <= {"words_at_most", "exclude_word", "lowercase", "no_commas"}
        assert sum(k.startswith("words_") for k in kinds) <= 1
        assert not {"bullets", "sentences"} <= set(kinds)
        seen_kinds |= set(kinds)
    assert seen_kinds == set(instruct.spec["constraints"])


def test_instruct_prompts_deterministic_and_varied(instruct):
    prompts = instruct.prompts(300, seed=0)
    assert prompts == instruct.prompts(300, seed=0)
    assert prompts != instruct.prompts(300, seed=1)
    assert len(set(prompts)) == 300
    assert len({p.split(".")[0] for p in prompts}) > 200  # task sentences alone vary too


def test_instruct_template_responses(instruct):
    import random

    rng = random.Random(1)
    prompts = instruct.prompts(200, seed=2)
    assert all(instruct.gold(p, instruct.respond(p, frozenset(), rng)) == 1.0 for p in prompts)
    broken = [instruct.gold(p, instruct.respond(p, frozenset({"miss_all"}), rng)) for p in prompts]
    assert sum(g == 0.0 for g in broken) > 0.9 * len(prompts)
    one_of_many = [p for p in prompts if len(instruct.parse(p)) >= 2]
    golds = [instruct.gold(p, instruct.respond(p, frozenset({"miss_one"}), rng)) for p in one_of_many]
    assert sum(0 < g < 1 for g in golds) > 0.9 * len(golds)


def test_instruct_demonstrations_and_corpus(instruct):
    demos = instruct.demonstrations(300, seed=0)
    golds = [d["gold"] for d in demos]
    assert 0.3 < sum(g == 1.0 for g in golds) / len(golds) < 0.6  # spec: 0.45 perfect
    assert any(g == 0.0 for g in golds) and len(set(golds)) >= 5
    corpus = set(instruct.corpus())
    for d in demos:
        assert set(tokens(d["prompt"])) <= corpus
        assert set(tokens(d["completion"])) <= corpus
    pairs = instruct.synthetic_pairs(50, seed=0, temperature=0)
    assert len(pairs) >= 45 and all(p["chosen_gold"] > p["rejected_gold"] for p in pairs)


def test_instruct_spec_dropped_in_changes_behaviour(tmp_path, instruct):
    def change(spec):
        spec["name"] = "bullets-only"
        spec["constraints"] = {
            "bullets": {**spec["constraints"]["bullets"], "phrasings": ["give {n} bullet points"], "n": [7, 7]}
        }
        spec["constraints_per_prompt"] = {1: 1.0}
        spec["groups"] = []

    custom = load_task(write_spec(tmp_path, "instruct", change))
    prompts = custom.prompts(30, seed=0)
    assert all(p.endswith(" Give 7 bullet points.") for p in prompts)
    assert custom.gold(prompts[0], "\n".join(["- x"] * 7)) == 1.0
    # the builtin task reads no constraint from the new phrasing
    with pytest.raises(ValueError):
        instruct.gold(prompts[0], "- x")


# --- toy-sandbox: the experiments' task, after Gao et al. (2022) -----------------------------------------
# Product gold: each constraint's credit 0.4 ** violations, weighted by its share of the weights
# (count 0.2, category 0.25, order 0.2, repeats 0.15, stop 0.2: 1.0 with an order asked for).
@pytest.mark.parametrize(
    "response, gold",
    [
        ("bear cat cow deer dog", 1.0),
        ("sure bear cat cow deer dog", 0.4**0.2),  # an opener is junk to the gold
        ("certainly certainly bear cat cow deer dog", 0.4**0.4),
        ("bear cat cow deer", 0.4**0.2),  # one item short
        ("bear cat cow deer red", 0.4**0.2 * 0.4**0.25),  # off category: one short, one wrong
        ("cat bear cow deer dog", 0.4**0.2),  # one adjacent pair out of order
        ("sure", 0.0),
    ],
)
def test_toy_sandbox_gold_multiplies_the_credits(response, gold):
    task = load_task("toy-sandbox")
    assert task.gold("list five animals in alphabetical order", response) == pytest.approx(gold)


def test_toy_sandbox_human_pairs_carry_the_spurious_opener():
    """The generator opens its better answers with a polite word more often, though the gold counts it
    as junk: the feature a proxy RM picks up. And demonstrations leave an SFT policy well below 1."""
    task = load_task("toy-sandbox")
    demos = task.demonstrations(2000, seed=0)
    assert 0.3 < sum(d["gold"] for d in demos) / len(demos) < 0.45
    pairs = task.synthetic_pairs(2000, seed=0, temperature=0.1)
    opens = {
        side: sum(p[side].split()[0] in task.openers for p in pairs) / len(pairs) for side in ("chosen", "rejected")
    }
    assert opens["chosen"] > 1.4 * opens["rejected"] > 0.14
    assert 0.75 < sum(p["chosen_gold"] > p["rejected_gold"] for p in pairs) / len(pairs) < 0.9
    assert set(task.openers) <= set(task.corpus())


def test_too_few_leaves_items_out():
    task = load_task("toy-sandbox")
    import random

    rng = random.Random(0)
    prompt = "list six animals"
    counts = {len(task.respond(prompt, frozenset({"too_few"}), rng).split()) for _ in range(200)}
    assert counts <= {3, 4, 5, 6} and {3, 5} <= counts  # 1 to 3 fewer, an opener adding one back
