"""Language breadth of the data engine's requests: new forms answer what they say, human errors stay honest.

Every test draws from the prompt generator over hand-made scene graphs (no rendering), so all of them run
without the Sweet Home 3D models.
"""

from __future__ import annotations

import collections
import difflib
import json
import re
import zlib
from pathlib import Path

import numpy as np
import pytest

from training.dataengine import prompts as P
from training.dataengine.knowledge import load_knowledge_base
from training.dataengine.prompts import PromptGenerator

REAL_PHOTOS = Path(__file__).parent / "data" / "real_photos" / "samples.jsonl"

# Every phrase list as it stood before the language-breadth change: (phrase count, crc32 of the phrases joined
# by newlines). Phrases are only ever appended, so these stay true and each old key keeps its text and split.
OLD_GROUPS = {
    "entities.single": (9, 3606328474),
    "entities.all": (4, 3934068262),
    "spatial.side": (3, 3341656811),
    "spatial.near_cam": (6, 1485042272),
    "spatial.nearest_obj": (7, 1884551077),
    "spatial.rel": (6, 1016530858),
    "spatial.on": (3, 2838848228),
    "spatial.left_of": (5, 692394488),
    "spatial.right_of": (5, 3066692906),
    "spatial.region_fits": (4, 3648502235),
    "spatial.region_empty": (3, 1406524138),
    "safety.safe_place": (7, 2438639552),
    "safety.hot_state": (7, 3238215388),
    "affordances.grasp_handle": (5, 4022897725),
    "affordances.hold_liquid": (5, 4021876101),
    "affordances.pour_from": (6, 3494596561),
    "affordances.pour_into": (5, 1136283443),
    "affordances.cut_with": (5, 386539816),
    "affordances.put_on": (5, 651661832),
    "affordances.drink_from": (5, 2076502773),
    "affordances.wipe_with": (5, 1618538630),
    "affordances.stir_with": (5, 3239015182),
    "affordances.put_in": (5, 1716259472),
    "affordances.eat": (5, 642523713),
    "affordances.switch_on": (5, 1761953731),
    "functions.cutting": (10, 3853737317),
    "functions.eating_with": (10, 2179848920),
    "functions.food": (10, 1178841257),
    "functions.drinking": (10, 4037290701),
    "functions.boiling_water": (10, 2001622437),
    "functions.brewing_coffee": (10, 3260167385),
    "functions.making_tea": (10, 120182869),
    "functions.cooking": (10, 2537932569),
    "functions.serving": (10, 2075330352),
    "functions.weighing": (10, 2268297849),
    "functions.toasting": (10, 3915476145),
    "functions.cleaning": (10, 2507669682),
    "functions.seasoning": (10, 2344898955),
    "functions.storing_knives": (10, 2735284057),
    "functions.repairing": (10, 3466762488),
    "functions.writing": (10, 3153188103),
    "functions.lighting": (10, 788878799),
    "functions.blending": (10, 3494948350),
    "functions.communicating": (10, 2847734202),
    "functions.decorating": (10, 2029897988),
    "functions.preparing_food": (10, 4027252752),
    "intent.cutting": (10, 1997906112),
    "intent.drinking": (10, 15979393),
    "intent.boiling_water": (10, 1532805900),
    "intent.brewing_coffee": (10, 3424460299),
    "intent.food": (10, 2975813680),
    "intent.eating_with": (10, 250006961),
    "intent.cleaning": (10, 1200883244),
    "intent.weighing": (10, 2550187001),
    "intent.toasting": (10, 3255690470),
    "intent.seasoning": (10, 3442395763),
    "intent.repairing": (10, 1690090065),
    "intent.writing": (10, 2578388914),
    "intent.lighting": (10, 3566851487),
    "intent.communicating": (10, 690433768),
    "intent.serving": (10, 1205103567),
    "intent.carrying": (10, 773057119),
    "intent.storing_knives": (10, 1834045120),
    "safety.sharp": (10, 2886895748),
    "safety.can_be_hot": (10, 593827372),
    "safety.fragile": (10, 2750048023),
    "safety.electrical": (10, 2429846168),
    "safety.child_unsafe": (10, 1633212567),
    "safety.heavy": (10, 3987306627),
    "safety.perishable": (10, 1653394848),
    "physical.rolls": (5, 1565488981),
    "physical.holds_liquid": (5, 2845630468),
    "physical.support_surface": (5, 3243993976),
    "physical.deformable": (5, 2760765707),
    "physical.fits_in_hand": (5, 1932735765),
    "physical.heaviest": (5, 75102401),
    "physical.lightest": (5, 2172316197),
    "physical.tallest": (5, 2919804828),
    "physical.largest": (5, 2953960111),
    "physical.smallest": (5, 425023019),
}
# Wrapper counts before the change ("n0".."n7" were NP_WRAPPERS, ...): the bare old wrappers.
OLD_WRAPPERS = {"n": 8, "q": 6, "d": 5, "i": 5}


@pytest.fixture(scope="module")
def kb():
    return load_knowledge_base()


def obj(i, category, kb, *, colour="white", size_m=(0.1, 0.1, 0.1), x=0.0, dist=1.0, area=2000):
    """One scene-graph object with the fields the generator reads."""
    c = kb.categories[category]
    m = max(size_m)
    return {
        "id": i,
        "category": category,
        "name": c.name,
        "colour": colour,
        "material": c.material,
        "size": "small" if m < 0.1 else ("medium" if m < 0.25 else "large"),
        "size_m": list(size_m),
        "mass_kg": c.mass_kg,
        "states": {},
        "position_3d": [x, 0.1 * i, 0.0],
        "camera_xyz": [x, 0.0, dist],
        "distance_to_camera": dist,
        "pixel_area": area,
        "visible_fraction": 1.0,
        "on": None,
    }


def graph(*objects):
    near = min(objects, key=lambda o: o["distance_to_camera"])["id"]
    return {"objects": list(objects), "relations": [], "nearest_to_camera": near}


def draws(gen, g, n=300, per_family=2):
    for k in range(n):
        yield from gen.generate(g, np.random.default_rng(k), per_family=per_family)


def key_of(r) -> str:
    return r.template_id.rsplit(".", 1)[0]


# ------------------------------------------------------------------------------------ several things at once
def test_two_things_at_once_answer_both_and_never_a_kind_with_two_instances(kb):
    g = graph(
        obj(0, "mug", kb), obj(1, "spoon", kb, x=0.2), obj(2, "kettle", kb, x=-0.2), obj(3, "mug", kb, x=0.4)
    )
    gen = PromptGenerator(kb=kb)
    pos = neg = 0
    for r in draws(gen, g):
        if not key_of(r).startswith("entities.pair."):
            continue
        if r.negative:
            neg += 1
            assert r.targets == [] and not {o["category"] for o in g["objects"]} & set(r.extra["named"])
            continue
        pos += 1
        assert len(r.targets) == 2, r.prompt
        named = {g["objects"][t]["category"] for t in r.targets}
        assert named == set(r.extra["named"]) and "mug" not in named, (
            r.prompt
        )  # two mugs: "the mug" is which?
        for t in r.targets:
            assert g["objects"][t]["name"] in r.prompt.lower(), r.prompt
    assert pos > 20 and neg > 0


# ------------------------------------------------------------------------------------------------- contrast
def _excluded_by_words(prompt: str, red: dict, blue: dict) -> dict | None:
    """Which of two mugs the contrast names as *not* meant, read from the words (red is left and nearer)."""
    p = prompt.lower()
    for words, ex in (
        (("the red one",), red),
        (("the blue one",), blue),
        (("on the left", "the left one"), red),
        (("on the right", "the right one"), blue),
        (("closest to me", "the nearer one"), red),
        (("further away", "at the back"), blue),
    ):
        if any(w in p for w in words):
            return ex
    return None


def test_contrast_answers_the_instance_that_is_not_described(kb):
    red = obj(0, "mug", kb, colour="red", x=-0.2, dist=0.9)
    blue = obj(1, "mug", kb, colour="blue", x=0.2, dist=1.1)
    g = graph(red, blue, obj(2, "plate", kb, size_m=(0.25, 0.25, 0.02)))
    gen = PromptGenerator(kb=kb)
    pos = 0
    for r in draws(gen, g):
        if key_of(r).startswith("entities.contrast.") and not r.negative:
            pos += 1
            ex = _excluded_by_words(r.prompt, red, blue)
            assert ex is not None, r.prompt  # same size: never "the big one"
            assert r.extra["excluded"] == [ex["id"]] and r.targets == [1 - ex["id"]], r.prompt
    assert pos > 10


def test_contrast_is_not_asked_between_two_look_alikes_but_stays_a_negative_phrasing(kb):
    """Two white mugs side by side at the same distance: no words tell them apart, so no contrast positive;
    contrast negatives (an absent kind) are still drawn there, so the phrasing alone does not say "absent"."""
    g = graph(obj(0, "mug", kb, x=0.0), obj(1, "mug", kb, x=0.02, dist=1.01), obj(2, "plate", kb, x=0.3))
    rs = [r for r in draws(PromptGenerator(kb=kb), g) if key_of(r).startswith("entities.contrast.")]
    assert rs and all(r.negative and r.targets == [] for r in rs)
    assert all(r.concept not in ("mug", "plate") for r in rs)


# ---------------------------------------------------------------------------------- description, no name
def test_a_description_without_a_name_fits_its_target_and_no_other_object(kb):
    """The kettle is brown, a neighbour of red: "the red thing" could mean it, so only a description that
    also says the mug's material ("the red ceramic thing") may pick the red mug."""
    g = graph(
        obj(0, "mug", kb, colour="red"),
        obj(1, "spoon", kb, colour="grey", size_m=(0.17, 0.03, 0.02), x=0.2),
        obj(2, "kettle", kb, colour="brown", x=-0.2),
        obj(3, "book", kb, colour="blue", size_m=(0.2, 0.15, 0.03), x=0.4),
    )
    gen = PromptGenerator(kb=kb)
    pos = neg = 0
    for r in draws(gen, g, n=400):
        if not key_of(r).startswith("entities.describe."):
            continue
        words = set(re.findall(r"[a-z]+", r.prompt.lower()))
        colour = words & set(P.COLOURS)
        material = words & set(P.MATERIAL_WORDS.values())
        shape = words & set(P.SHAPES)
        assert colour or material, r.prompt
        for o in g["objects"]:
            states = [
                *(
                    "yes" if o["colour"] == c else "border" if o["colour"] in P.NEAR_COLOURS[c] else "no"
                    for c in colour
                ),
                *("yes" if P.MATERIAL_WORDS.get(o["material"]) == m else "no" for m in material),
                *(P._shape_state(o["size_m"], s) for s in shape),
            ]
            if r.negative or o["id"] != r.targets[0]:
                assert "no" in states, (r.prompt, o["name"])  # clearly not meant, not even borderline
            else:
                assert set(states) == {"yes"}, (r.prompt, o["name"])
        if r.negative:
            neg += 1
        else:
            pos += 1
            assert not (r.targets == [0] and not material), r.prompt  # "the red thing" next to a brown kettle
    assert pos > 10 and neg > 0


# --------------------------------------------------------------------------------------------- indirect needs
def test_an_indirect_need_answers_every_object_serving_the_concept(kb):
    g = graph(
        obj(0, "sponge", kb),
        obj(1, "towel", kb, x=0.2),
        obj(2, "mug", kb, x=-0.2),
        obj(3, "kettle", kb, x=0.4),
    )
    sticky = f"intent.cleaning.p{kb.vocab['intents']['cleaning'].index('my hands are sticky')}"
    found = 0
    for r in draws(PromptGenerator(kb=kb), g, n=600):
        if r.family != "intent":
            continue
        want = [o["id"] for o in g["objects"] if kb.categories[o["category"]].has(r.concept)]
        assert r.targets == want and r.negative == (not want), (r.prompt, r.targets)
        if key_of(r) == sticky:
            found += 1
            assert "my hands are sticky" in r.prompt.lower() and r.targets == [0, 1]
    assert found > 0


# ------------------------------------------------------------------------------------------------- wrappers
def test_hand_over_only_for_objects_and_existence_questions_only_for_indefinite_phrases(kb):
    g = graph(obj(0, "mug", kb), obj(1, "spoon", kb, x=0.2), obj(2, "kettle", kb, x=-0.2))
    kinds = collections.Counter()
    for r in draws(PromptGenerator(kb=kb), g):
        wid = r.template_id.rsplit(".", 1)[1]
        kinds[wid[0]] += 1
        if wid[0] == "h":
            assert r.answer_kind == "object", r.prompt
        if wid[0] == "e":
            assert re.match(
                r"(is there|do you see|have we got|do we have) (something|anything|an?|some) ",
                r.prompt.lower(),
            )
    assert kinds["h"] > 0 and kinds["e"] > 0 and kinds["d"] > 0


# ---------------------------------------------------------------------------------------------- human errors
def _scenes(kb):
    return [
        graph(obj(0, "wine_glass", kb), obj(1, "bowl", kb, x=0.2), obj(2, "fruit_bowl", kb, x=-0.2)),
        graph(
            obj(0, "mug", kb, colour="red"), obj(1, "mug", kb, colour="blue", x=0.3), obj(2, "scissors", kb)
        ),
        graph(obj(0, "kitchen_knife", kb), obj(1, "knife_stand", kb, x=0.2), obj(2, "apples", kb, x=-0.3)),
    ]


def test_noise_changes_words_only_and_a_typo_never_names_another_thing(kb):
    clean, noisy = PromptGenerator(kb=kb), PromptGenerator(kb=kb, noise_rate=1.0)
    name_words = {
        w for c in kb.categories.values() for n in (c.name, c.plural, *c.synonyms) for w in n.split()
    }
    kinds = collections.Counter()
    for g in _scenes(kb):
        for k in range(150):
            a = clean.generate(g, np.random.default_rng(k), per_family=2)
            b = noisy.generate(g, np.random.default_rng(k), per_family=2)
            assert [(r.template_id, r.targets, r.negative) for r in a] == [
                (r.template_id, r.targets, r.negative) for r in b
            ]
            for ra, rb in zip(a, b, strict=True):
                kind = rb.extra.get("noise")
                kinds[kind] += 1
                if kind is None:
                    assert rb.prompt == ra.prompt
                    continue
                assert rb.prompt != ra.prompt and rb.prompt[0].isupper()
                assert noisy.mentions(rb.prompt) <= noisy.mentions(ra.prompt), (ra.prompt, rb.prompt)
                if kind == "typo":
                    wa, wb = ra.prompt.split(), rb.prompt.split()
                    changed = [
                        (x, y)
                        for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=wa, b=wb).get_opcodes()
                        if op != "equal"
                        for x, y in zip(wa[i1:i2], wb[j1:j2], strict=False)
                    ]
                    assert len(changed) == 1, (ra.prompt, rb.prompt)
                    typo = re.sub(r"[^a-z]", "", changed[0][1].lower())
                    assert typo not in name_words and typo not in P.COLOURS, (ra.prompt, rb.prompt)
                    assert changed[0][0].strip("?.,!").lower() not in P.PROTECTED_WORDS
    assert all(kinds[k] > 20 for k in P.NOISE_KINDS), kinds


def test_noise_is_deterministic_and_near_its_rate(kb):
    gen = PromptGenerator(kb=kb, noise_rate=0.08)
    runs = [[r.prompt for g in _scenes(kb) for r in draws(gen, g, n=200)] for _ in range(2)]
    assert runs[0] == runs[1]
    rs = [r for g in _scenes(kb) for r in draws(gen, g, n=200)]
    share = sum("noise" in r.extra for r in rs) / len(rs)
    assert 0.04 < share < 0.09, share  # some draws leave a prompt as it was (no word to drop, a typo refused)
    assert not any("noise" in r.extra for g in _scenes(kb) for r in draws(PromptGenerator(kb=kb), g, n=50))


def test_prompt_noise_out_of_range_is_refused(tmp_path):
    from training.dataengine.__main__ import build_parser, run
    from training.dataengine.errors import DataEngineError
    from training.dataengine.pipeline import EngineConfig

    assert 0 < EngineConfig().prompt_noise <= 0.2  # on by default, at a small rate
    args = build_parser().parse_args(["--out", str(tmp_path / "x"), "--scenes", "1", "--prompt-noise", "1.5"])
    with pytest.raises(DataEngineError, match="prompt-noise"):
        run(args)
    with pytest.raises(ValueError, match="noise_rate"):
        PromptGenerator(kb=load_knowledge_base(), noise_rate=-0.1)


# ------------------------------------------------------------------------------------------ held-out split
def test_old_phrases_keep_their_text_so_their_keys_keep_their_split(kb):
    groups = {g: None for g in P.phrase_groups(kb)}
    texts = dict(P.TEMPLATES)
    for section, fam in P.VOCAB_FAMILIES.items():
        texts.update({f"{fam}.{c}": ps for c, ps in kb.vocab[section].items()})
    for group, (n, crc) in OLD_GROUPS.items():
        assert group in groups, f"{group} was removed or renamed"
        assert zlib.crc32("\n".join(texts[group][:n]).encode()) == crc, (
            f"{group}: an old phrase was edited, inserted or removed; append new phrases at the end"
        )
    # the rule itself, on keys whose split every trained model so far was measured with
    assert P.HELDOUT_EVERY == 5
    keys = ("intent.drinking.p0", "intent.drinking.p1", "entities.single.t2")
    assert [P.template_split(k) for k in keys] == ["heldout", "train", "heldout"]


def test_every_new_form_has_seen_and_held_out_phrasings():
    for prefix in ("entities.pair", "entities.contrast", "entities.describe"):
        splits = [P.template_split(f"{prefix}.t{i}") for i in range(len(P.TEMPLATES[prefix]))]
        assert splits.count("train") >= 2 and "heldout" in splits, (prefix, splits)


def test_no_new_phrasing_repeats_a_real_photo_request(kb):
    """tests/data/real_photos is a test set: its requests must never become training phrasings. A request
    may equal one only through phrasings that were there before it was written (the bare "the {name}")."""
    real = {
        json.loads(line)["prompt"].lower().rstrip("?.! ") for line in REAL_PHOTOS.read_text().splitlines()
    }
    texts = dict(P.TEMPLATES)
    for section, fam in P.VOCAB_FAMILIES.items():
        texts.update({f"{fam}.{c}": ps for c, ps in kb.vocab[section].items()})
    for group, phrases in texts.items():
        for p in phrases[OLD_GROUPS.get(group, (0, 0))[0] :]:
            assert p.lower().rstrip("?.! ") not in real, (group, p)
    cats = ["scissors", "book", "kettle", "mug", "kitchen_knife", "apples", "teapot", "stapler", "hammer"]
    gen = PromptGenerator(kb=kb, noise_rate=0.08)
    for s in range(0, len(cats), 3):
        g = graph(*(obj(i, c, kb, x=0.2 * i) for i, c in enumerate(cats[s : s + 3])))
        for r in draws(gen, g):
            if r.prompt.lower().rstrip("?.! ") in real:
                group, j = key_of(r).rsplit(".", 1)
                wid = r.template_id.rsplit(".", 1)[1]
                assert int(j[1:]) < OLD_GROUPS[group][0], r.template_id
                assert int(wid[1:]) < OLD_WRAPPERS.get(wid[0], 0) and "noise" not in r.extra, r.template_id


def _request(prompt: str) -> P.Request:
    return P.Request(prompt, "entities", "entities.single.t0.n0", "train", [0], False, "object", "mug")


def test_an_error_that_would_name_another_thing_is_refused(kb, monkeypatch):
    gen = PromptGenerator(kb=kb, noise_rate=1.0)
    # dropping "of" from "the bowl of fruit" would ask for a bowl and fruit: never done, other words may go
    out = collections.Counter()
    for k in range(300):
        r = _request("The bowl of fruit.")
        gen._noise(r, np.random.default_rng(k))
        out[r.prompt] += 1
        assert gen.mentions(r.prompt) == {"fruit_bowl"}, r.prompt
    assert out["Bowl of fruit."] > 0 and out["The bowl fruit."] == 0
    # a typo that happens to spell a word the generator uses (here a category's name) leaves the prompt alone
    monkeypatch.setattr(P, "_typo", lambda word, rng: "kettle")
    for k in range(100):
        r = _request("Please find the mug.")
        gen._noise(r, np.random.default_rng(k))
        assert "kettle" not in r.prompt.lower() and r.extra.get("noise") != "typo", r.prompt
