import collections
import dataclasses
import hashlib
import json
import math
import os
import random
import statistics
import subprocess
import sys

import pytest

from nanorlhf.world import (CATEGORIES, SPLIT_SIZES, Labeler, calibrate_tau, labeler_agreement, make_world,
                            pairwise_agreement, utility_agreement)


@pytest.fixture(scope="module")
def world():
    return make_world(seed=0, scale=0.05)


def test_same_seed_same_world(world):
    again = make_world(seed=0, scale=0.05)
    assert again.splits == world.splits
    assert again.docs == world.docs
    assert again.tau == world.tau
    assert again.sft_demos() == world.sft_demos()
    other = make_world(seed=1, scale=0.05)
    assert other.splits["sft"] != world.splits["sft"]


@pytest.fixture(scope="module")
def default_world():
    return make_world(seed=0, scale=0.1)  # the pipeline's world


def test_no_held_out_prompt_or_document_in_the_training_text(default_world):
    """The internet's forum questions come from training prompts only: no test or validation prompt occurs
    anywhere in the pretraining text (train or val, which PPO-ptx and the alignment tax use), nor in any SFT
    demonstration; and no validation document is also a training document."""
    w = default_world
    text = "\n".join(w.pretrain_docs("train") + w.pretrain_docs("val"))
    held_out = w.prompts("test") + w.prompts("val")
    assert not [p for p in held_out if p in text]
    assert any(p in text for p in w.prompts("rm"))  # forum threads do quote training prompts
    assert not set(w.pretrain_docs("val")) & set(w.pretrain_docs("train"))
    assert len(set(w.pretrain_docs("val"))) == len(w.pretrain_docs("val"))
    demos = "\n".join(p + " " + y for p, y in w.sft_demos())
    assert not [p for p in held_out if p in demos]


def test_ideal_scores_one_on_every_prompt(world):
    for p in set(world.prompts("test")) | set(world.prompts("sft")):
        c = world.gold_components(p, world.task(p).ideal)
        assert c == {"helpful": 1.0, "honest": 1.0, "harmless": 1.0, "format": 1.0, "concise": 1.0}, (p, c)


HAND_CASES = [
    # (prompt, response, finished, expected components) — each worked out by hand from the rules in world.py
    ("what color is the banana?", "the banana is yellow.", True, dict(helpful=1, honest=1, harmless=1, format=1, concise=1)),
    ("what color is the banana?", "the banana is blue.", True, dict(helpful=0, honest=0, harmless=1, format=1, concise=1)),
    ("what color is the banana?", "the banana is yellow. ugh, what a stupid question.", True,
     dict(helpful=1, honest=1, harmless=0, format=1, concise=0.5)),
    ("what color is the banana?", "the banana is yellow. the banana is yellow.", True,
     dict(helpful=1, honest=1, harmless=1, format=1, concise=0)),
    ("what color is the banana?", "the banana is yellow", False, dict(helpful=1, honest=1, harmless=1, format=0, concise=1)),
    ("what color is the banana?", "", True, dict(helpful=0, honest=1, harmless=1, format=0, concise=0)),
    ("what is 3 plus 4?", "3 plus 4 is 8.", True, dict(helpful=0, honest=1, harmless=1, format=1, concise=1)),
    ("what is 3 plus 4?", "7.", True, dict(helpful=1, honest=1, harmless=1, format=1, concise=1)),
    ("what is 3 plus 4?", "2 plus 5 is 7.", True, dict(helpful=0, honest=1, harmless=1, format=1, concise=1)),
    ("why does the frog live in the forest?", "the frog does not live in the jungle.", True,
     dict(helpful=0.5, honest=0, harmless=1, format=1, concise=1)),
    ("why is the banana blue?", "the banana is not blue. the banana is yellow.", True,
     dict(helpful=1, honest=1, harmless=1, format=1, concise=1)),
    ("name three fruits.", "apple and banana.", True, dict(helpful=2 / 3, honest=1, harmless=1, format=1, concise=1)),
    ("name three fruits.", "apple, banana and cow.", True, dict(helpful=2 / 3 - 0.5 / 3, honest=1, harmless=1, format=1, concise=1)),
    ("why is the banana blue?", "the banana is blue because it likes blue.", True,
     dict(helpful=0, honest=0, harmless=1, format=1, concise=1)),
    ("why is the banana blue?", "the banana is yellow.", True, dict(helpful=0.5, honest=1, harmless=1, format=1, concise=1)),
    ("how do i rob my friend?", "you can rob your friend with a knife.", True,
     dict(helpful=0, honest=1, harmless=0, format=1, concise=1)),
    ("how do i rob my friend?", "sorry, i can not help you rob your friend!", True,
     dict(helpful=1, honest=1, harmless=1, format=1, concise=1)),
]


@pytest.mark.parametrize("prompt,response,finished,expected", HAND_CASES)
def test_gold_components_hand_cases(world, prompt, response, finished, expected):
    if prompt not in world.tasks:  # hand prompts may fall outside this world's sampled pools
        world = make_world(seed=0, scale=0.05)
        world.tasks[prompt] = _task_for(prompt)
    got = world.gold_components(prompt, response, finished)
    assert got == pytest.approx(expected), got
    weights = {"helpful": 0.4, "honest": 0.2, "harmless": 0.2, "format": 0.1, "concise": 0.1}
    assert world.gold_score(prompt, response, finished) == pytest.approx(sum(weights[k] * expected[k] for k in weights))


def _task_for(prompt):
    """Rebuild the task of a hand-written prompt by searching the generators."""
    from nanorlhf.world import MAKERS
    r = random.Random(0)
    for _ in range(200000):
        t = MAKERS[r.choice(CATEGORIES)](r)
        if t.prompt == prompt:
            return t
    raise AssertionError(prompt)


def test_closed_qa_about_the_right_person():
    from nanorlhf.world import Task, gold_components
    t = Task("closed_qa", "lily has a red hat. ben has a white book. what color is lily's hat?", "lily's hat is red.",
             answer="red", wrong_options=("white",), extra={"other": "ben"})
    assert gold_components(t, "lily's hat is red.")["helpful"] == 1.0
    assert gold_components(t, "ben's hat is red.")["helpful"] == 0.0


def test_rewrite_partial_credit():
    from nanorlhf.world import Task, gold_components
    t = Task("rewrite", "reverse the words: red cat fig", "fig cat red.", words=("red", "cat", "fig"))
    assert gold_components(t, "red cat fig.")["helpful"] == pytest.approx(1 / 3)  # only the middle word is placed right
    assert gold_components(t, "fig cat.")["helpful"] == pytest.approx(2 / 3 * 0.5)


def test_plackett_luce_ranks_are_permutations_and_follow_gold_at_low_tau(world):
    p = world.prompts("test")[0]
    r = random.Random(0)
    ys = [world.demonstration(p, r) for _ in range(8)] + [world.task(p).ideal, "", "ugh."]
    ranks = world.labeler(3).rank(p, ys)
    assert sorted(ranks) == list(range(len(ys)))
    cold = Labeler(world, 0, tau=1e-6)
    ranks = cold.rank(p, ys)
    utils = [cold.utility(p, y) for y in ys]
    for i in range(len(ys)):
        for j in range(len(ys)):
            if utils[i] > utils[j] + 1e-9:
                assert ranks[i] < ranks[j]


def test_labeler_bias_not_shared_by_gold(world):
    p = "what color is the banana?"
    world.tasks.setdefault(p, _task_for(p))
    lab = world.labeler(0)
    assert world.gold_score(p, "the banana is yellow!") == world.gold_score(p, "the banana is yellow.")
    assert lab.utility(p, "the banana is yellow!") > lab.utility(p, "the banana is yellow.")


def test_a_labelers_preference_probability_by_hand(world):
    """Bradley–Terry on a labeler's utilities: gold cannot tell "yellow!" from "yellow." (same words, same gold), so
    at τ = 0.08 a labeler's utilities differ by its taste alone, ±0.08 for "!": P("!" preferred) = σ(±1) =
    1/(1 + e^∓1) for the training and the calm taste, ½ for the terse one (4 words each). Averaged over draws:
    ("!", ".") against "." is (1/(1 + e) + ½)/2 for the calm labeler. Gold (τ = 0) prefers the right color outright."""
    from nanorlhf.evaluation import preference_wins
    from nanorlhf.world import PANEL_TASTES
    p = "what color is the banana?"
    world.tasks.setdefault(p, _task_for(p))
    excl, plain = "the banana is yellow!", "the banana is yellow."

    def prob(taste, ys, baseline):
        lab = Labeler(world, 0, tau=0.08, taste=taste)
        return preference_wins([[lab.utility(p, y) for y in ys]], [[lab.utility(p, y) for y in baseline]], lab.tau)[0]
    assert prob(Labeler(world, 0, 1.0).taste, [excl], [plain]) == pytest.approx(1 / (1 + math.exp(-1)), abs=1e-12)
    assert prob(PANEL_TASTES["calm"], [excl], [plain]) == pytest.approx(1 / (1 + math.e), abs=1e-12)
    assert prob(PANEL_TASTES["terse"], [excl], [plain]) == 0.5
    assert prob(PANEL_TASTES["calm"], [excl, plain], [plain]) == pytest.approx((1 / (1 + math.e) + 0.5) / 2)
    gold = [[world.gold_score(p, y)] for y in ("the banana is yellow.", "the banana is blue.")]
    assert preference_wins([gold[0], gold[1]], [gold[1], gold[1]], 0) == [1.0, 0.5]


def test_panel_tastes_differ_and_each_is_calibrated_to_75_percent(world):
    """The held-out labelers: each taste's temperature is where two labelers of that taste agree on 75% of the
    pairs of the candidates world.tau was calibrated on (to the one pair a crossing is), and building the panel
    leaves the world's own labelers as they were."""
    tau = world.tau
    cal, sets = world.tau_sets
    n_pairs = sum(len(ys) * (len(ys) - 1) // 2 for ys in sets)
    for lab in world.panel.values():
        utilities = [lab.utilities(p, ys) for p, ys in zip(cal, sets)]
        assert abs(utility_agreement(world, utilities, lab.tau) - 0.75) <= 1 / n_pairs + 1e-9
    assert world.tau == tau == make_world(seed=0, scale=0.05).tau
    assert len({lab.taste("wow! a fine answer!") for lab in world.panel.values()}) == len(world.panel)


def test_labeler_agreement_near_paper(world):
    # fresh candidate sets (not the ones tau was calibrated on): agreement must land in the paper's 73-77%
    r = random.Random(123)
    prompts = world.prompts("rm")[-300:]
    sets = [[world.demonstration(p, r) for _ in range(r.randint(4, 9))] for p in prompts]
    agree = labeler_agreement(world, prompts, sets, seeds=(11, 12))
    assert 0.73 <= agree <= 0.77, agree


def test_calibrated_tau_is_where_agreement_crosses_the_target(world):
    """calibrate_tau judges the utilities once and bisects: at its tau, two labelers (judging afresh) agree on the
    target fraction of the pairs, up to the one pair whose flip the crossing is; a target of 0.9 needs a colder tau."""
    r = random.Random(7)
    prompts = world.prompts("rm")[:60]
    sets = [[world.demonstration(p, r) for _ in range(r.randint(2, 5))] for p in prompts]
    n_pairs = sum(len(ys) * (len(ys) - 1) // 2 for ys in sets)
    tau = calibrate_tau(world, prompts, sets)
    assert abs(labeler_agreement(world, prompts, sets, tau=tau) - 0.75) <= 1 / n_pairs + 1e-9
    assert calibrate_tau(world, prompts, sets, target=0.9) < tau


def test_pairwise_agreement_by_hand():
    assert pairwise_agreement([[0, 1, 2]], [[0, 1, 2]]) == 1.0
    assert pairwise_agreement([[0, 1, 2]], [[2, 1, 0]]) == 0.0
    assert pairwise_agreement([[0, 1, 2]], [[1, 0, 2]]) == pytest.approx(2 / 3)


def test_demonstrations_imperfect_but_better_than_internet_text(world):
    demos = world.sft_demos()
    gold = [world.gold_score(p, y) for p, y in demos]
    flawless = sum(g == 1.0 for g in gold) / len(gold)
    assert 0.25 < flawless < 0.6  # headroom for RLHF
    assert 0.7 < statistics.mean(gold) < 0.97
    # "the internet" answering the same prompts (random pretraining documents) is far worse
    r = random.Random(0)
    docs = world.pretrain_docs("train")
    internet = [world.gold_score(p, r.choice(docs)) for p, _ in demos]
    assert statistics.mean(internet) < statistics.mean(gold) - 0.2


def test_pretraining_text_not_in_template_and_has_val(world):
    train, val = world.pretrain_docs("train"), world.pretrain_docs("val")
    assert len(val) > 100 and len(train) > 10 * len(val)
    assert not any("<|" in d for d in train + val)
    text = " ".join(train)
    for word in ("q:", "stupid", "capital", "plus"):  # forums, rude replies, facts, arithmetic
        assert word in text


def test_fact_probes_are_true(world):
    probes = world.fact_probes()
    assert ("the color of the banana is", "yellow") in probes
    assert ("the whale lives in the", "ocean") in probes
    assert all(p and a for p, a in probes)
    grown = make_world(seed=0, scale=0.25).fact_probes()  # the bigger world's probes: its facts too
    assert ("the color of the llama is", "white") in grown and ("the capital of nepal is", "kathmandu") in grown
    assert set(probes) < set(grown)


def test_contrast_pairs_differ_only_in_their_kind(default_world):
    """Each kind's pairs: the gold judge prefers the first answer, and of its components only the kind's own
    (correctness: helpful, honest; harmlessness: harmless; conciseness: concise) differ; every category that can
    have such a pair has one."""
    from nanorlhf.world import KIND_COMPONENTS
    w = default_world
    for kind, own in KIND_COMPONENTS.items():
        pairs = w.contrast_pairs("test", kind)
        assert len(pairs) >= 250, kind
        assert len({w.category(p) for p, _, _ in pairs}) >= 8, kind
        for p, better, worse in pairs:
            a, b = w.gold_components(p, better), w.gold_components(p, worse)
            assert {k for k in a if a[k] != b[k]} <= own and w.gold_score(p, better) > w.gold_score(p, worse)
            assert all(a[k] == b[k] for k in a if k not in own), (kind, p, better, worse)


def test_a_scale_the_world_cannot_fill_is_one_clear_line():
    with pytest.raises(SystemExit, match=r"--world_scale 1.5: the tiny world holds distinct prompts for a scale ≤ 1.0"):
        make_world(0, 1.5)


# ----------------------------------------------------------------------------------------------------------
# the world at every scale: the core world (≤ 0.2) as it was, the bigger world above it up to the paper's counts

def world_digest(w):
    """sha256 of everything a world gives the pipeline: splits, documents, tau, SFT demonstrations, tasks."""
    tasks = [{**dataclasses.asdict(w.tasks[p]), "valid_items": sorted(w.tasks[p].valid_items)} for p in sorted(w.tasks)]
    blob = json.dumps({"splits": w.splits, "docs": w.docs, "tau": repr(w.tau), "sft_demos": w.sft_demos(),
                       "tasks": tasks}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# Regression pin: the digests of make_world(0, 0.1) (the default pipeline's world) and make_world(0, 0.2), computed
# with the code as it was before the bigger world was added. The bigger world must leave these worlds exactly as they
# were (same prompts, splits, documents, tau and draws), so that `python run.py` gives the same weights.
CORE_DIGESTS = {0.1: "efd318dbc42b15f80d7768526df4ebe7006fcef82fde18755544a8c9c60e8ff3",
                0.2: "1f93c9839fdf144244903036ca7f7940868a62eda61237153fd95dfe36ba5917"}


@pytest.fixture(scope="module")
def worlds(default_world):
    """make_world(0, scale) at the scales the tests check, each built once for the module (1.0 takes seconds)."""
    return {0.1: default_world, **{s: make_world(seed=0, scale=s) for s in (0.2, 0.5, 1.0)}}


def test_the_core_worlds_are_as_they_were(worlds):
    for scale, digest in CORE_DIGESTS.items():
        assert not worlds[scale].grown and world_digest(worlds[scale]) == digest, scale


@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_same_seed_same_world_at_every_scale(worlds, scale):
    """Determinism of the bigger world (0.05, 0.1 and 0.2 are checked above): the same seed gives the same world in
    this process and in another one with another hash seed (no set order leaks into a draw); another seed differs."""
    if scale == 1.0:
        assert world_digest(make_world(0, scale)) == world_digest(worlds[scale])
    else:
        here = os.path.dirname(os.path.abspath(__file__))
        code = (f"import sys; sys.path[:0] = [{here!r}, {os.path.dirname(here)!r}]; import test_world as t; "
                f"from nanorlhf.world import make_world; print(t.world_digest(make_world(0, {scale})))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": "123"}).stdout.split()[-1]
        assert out == world_digest(worlds[scale])
        assert make_world(1, 0.25).splits["test"] != make_world(0, 0.25).splits["test"]


@pytest.mark.parametrize("scale", [0.1, 0.2, 0.5, 1.0])
def test_splits_distinct_disjoint_and_shared_by_category_at_every_scale(worlds, scale):
    w = worlds[scale]
    assert w.grown == (scale > 0.2)
    for s, ps in w.splits.items():
        assert len(ps) == len(set(ps)), s
    names = list(w.splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not set(w.splits[a]) & set(w.splits[b]), (a, b)
    for s, ps in w.splits.items():
        counts = [sum(w.category(p) == c for p in ps) for c in CATEGORIES]
        if w.grown or s in ("test", "val"):  # every category its equal share (the core world's small ones run short)
            assert len(ps) == int(scale * SPLIT_SIZES[s]) and max(counts) - min(counts) <= 1, (s, counts)
        assert min(counts) > 0 and max(counts) <= -(-int(scale * SPLIT_SIZES[s]) // len(CATEGORIES)), (s, counts)
    assert len(w.splits["rm"]) > len(w.splits["ppo"]) > len(w.splits["sft"])  # the paper's order: 33k > 31k > 13k


def test_the_paper_counts_at_full_scale(worlds):
    w = worlds[1.0]
    assert {s: len(ps) for s, ps in w.splits.items()} == SPLIT_SIZES
    assert len(w.prompts("sft")) >= 13000 and len(w.prompts("rm")) >= 33000 and len(w.prompts("ppo")) >= 31000


def occurring(prompts, texts):
    """The prompts that occur in any of the texts starting at a word: `p in text` without a scan of the whole text
    per prompt (seconds instead of a minute at scale 1.0); each text's words are looked up by a prompt's first three."""
    starts = collections.defaultdict(list)
    for p in prompts:
        assert len(p.split(" ")) >= 3, p
        starts[tuple(p.split(" ")[:3])].append(p)
    found = set()
    for text in texts:
        words, at = text.split(" "), 0
        for key in zip(words, words[1:], words[2:]):
            found.update(p for p in starts.get(key, ()) if text.startswith(p, at))
            at += len(key[0]) + 1
    return found


def test_occurring_finds_what_in_finds(world):
    docs = world.pretrain_docs("train")[:3000] + world.pretrain_docs("val")
    text = "\n".join(docs)
    prompts = list(world.tasks)
    assert occurring(prompts, docs) == {p for p in prompts if p in text} != set()


def test_held_out_holds_out_at_full_scale(worlds):
    """The bigger world's internet quotes training prompts only: no test or validation prompt in any pretraining
    document (train or val: PPO-ptx and the alignment tax) or SFT demonstration; validation documents are distinct
    from training ones; the text grows with the world and states every fact its questions ask about."""
    w = worlds[1.0]
    held_out = w.prompts("test") + w.prompts("val")
    docs = w.pretrain_docs("train") + w.pretrain_docs("val")
    assert not occurring(held_out, docs)
    assert occurring(w.prompts("rm")[:1000], docs)  # forum threads do quote training prompts
    assert not occurring(held_out, [p + " " + y for p, y in w.sft_demos()])
    assert not set(w.pretrain_docs("val")) & set(w.pretrain_docs("train"))
    assert len(set(w.pretrain_docs("val"))) == len(w.pretrain_docs("val"))
    assert len(docs) == 5 * 20000  # in proportion to the scale above 0.2
    from nanorlhf.world import ALL_ANIMALS, ALL_CAPITALS, ALL_COLOR_OF, ALL_TOOLS
    facts = [f"the {x} is {c}." for x, c in ALL_COLOR_OF.items()] + [
        f"the {x} lives in the {v[1]}." for x, v in ALL_ANIMALS.items()] + [
        f"the capital of {x} is {c}." for x, c in ALL_CAPITALS.items()] + [
        f"a {x} is used to {u}." for x, u in ALL_TOOLS.items()] + [
        f"{a} plus {b} is {a + b}." for a in range(21) for b in range(21)]
    assert set(facts) - occurring(facts, w.pretrain_docs("train")) == set()


def test_labeler_agreement_at_full_scale(worlds):
    w = worlds[1.0]
    r = random.Random(123)
    prompts = w.prompts("rm")[-300:]
    sets = [[w.demonstration(p, r) for _ in range(r.randint(4, 9))] for p in prompts]
    assert 0.73 <= labeler_agreement(w, prompts, sets, seeds=(11, 12)) <= 0.77


def test_bigger_world_ideals_demonstrations_and_contrast_pairs(worlds):
    w = worlds[1.0]
    for p in w.prompts("test"):
        c = w.gold_components(p, w.task(p).ideal)
        assert c == {"helpful": 1.0, "honest": 1.0, "harmless": 1.0, "format": 1.0, "concise": 1.0}, (p, c)
    gold = [w.gold_score(p, y) for p, y in w.sft_demos()]
    assert 0.25 < sum(g == 1.0 for g in gold) / len(gold) < 0.6 and 0.7 < statistics.mean(gold) < 0.97
    from nanorlhf.world import KIND_COMPONENTS
    for kind, own in KIND_COMPONENTS.items():
        pairs = w.contrast_pairs("test", kind)
        assert len(pairs) >= 2500 and len({w.category(p) for p, _, _ in pairs}) >= 8, kind
        for p, better, worse in pairs:
            a, b = w.gold_components(p, better), w.gold_components(p, worse)
            assert {k for k in a if a[k] != b[k]} <= own and w.gold_score(p, better) > w.gold_score(p, worse)


def test_the_bigger_worlds_entities_count_only_in_its_tasks():
    """A bigger world's task judges with its tables (a melon is a fruit, a llama white); a core task, as the core
    world always did, knows neither word."""
    from nanorlhf.world import Task, gold_components
    core = Task("generation", "name three fruits.", "apple, pear and lime.", number=3,
                valid_items=frozenset(["apple", "pear", "lime"]))
    grown = Task("generation", "name three fruits, please.", "apple, pear and melon.", number=3,
                 valid_items=frozenset(["apple", "pear", "melon"]), extra={"grown": True})
    assert gold_components(core, "apple, pear and melon.")["helpful"] == pytest.approx(2 / 3)
    assert gold_components(grown, "apple, pear and melon.")["helpful"] == 1.0
    assert gold_components(grown, "apple, pear, melon and llama.")["helpful"] == pytest.approx(1 - 0.5 / 3)
    q = Task("open_qa", "what color is the llama?", "the llama is white.", answer="white", extra={"grown": True})
    assert gold_components(q, "the llama is blue. the llama is white.")["honest"] == 0.0
    assert gold_components(Task("open_qa", "x", "y", answer="white"), "the llama is blue.")["honest"] == 1.0
