"""Prompt generator over seven concept families, with negatives, multi-target, region and relational answers.

A sample is a *request* plus its answer as a set of object ids (or a region of free table). Masks are made
later from the frame. Every prompt comes from a phrase (knowledge-base vocab or a template below) put in a
wrapper (bare, polite request, question, robot command); `template_id` names both, and a deterministic
20 % of phrases are held out (`template_split`), so evaluation can test unseen phrasings.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import numpy as np

from .knowledge import KnowledgeBase

FAMILIES = ("entities", "spatial", "intent", "affordances", "functions", "safety", "physical")
HELDOUT_EVERY = 5  # crc32(phrase key) % 5 == 0 -> held out

# Wrappers: how the same request is said. {p} is a noun phrase or a "what ..." clause.
NP_WRAPPERS = (
    "{p}",
    "Please show me {p}.",
    "Could you point to {p}?",
    "Robot, segment {p}.",
    "Find {p}.",
    "Can you highlight {p} for me, please?",
    "Hey robot, find {p}.",
    "I'm looking for {p}.",
)
Q_WRAPPERS = (
    "{P}?",
    "Show me {p}.",
    "Can you show me {p}?",
    "Please highlight {p}.",
    "Robot, mark {p}.",
    "Tell me {p}.",
)
# A phrase that is itself a question ("what could burn me", "which things could roll away") keeps its
# word order: it only gets a greeting or a follow-up, never "Show me what could I ...".
DIRECT_Q_WRAPPERS = (
    "{P}?",
    "Robot, {p}?",
    "Hey robot, {p}?",
    "Quick question: {p}?",
    "{P}? Show me, please.",
)
QUESTION_WORDS = ("what", "which", "where", "how", "who")
INTENT_WRAPPERS = (
    "{P}.",
    "{P}. What can I use?",
    "{P}, can you help me?",
    "Hey robot, {p}.",
    "{P}. Show me what I need.",
)

ENTITY_SINGLE = (
    "the {name}",
    "the {syn}",
    "the {colour} {name}",
    "that {name}",
    "the {size} {name}",
    "the {name} that is {colour}",
    "the {name} in {colour}",
    "the {name} coloured {colour}",
    "the {name} on the table",
)
# Colour words of the scene graph (scene_graph.colour_name), and the ones an albedo near the border between
# two words may get instead: an attribute negative never asks for a neighbour of a colour that is there.
COLOURS = ("black", "white", "grey", "brown", "red", "orange", "yellow", "green", "blue", "purple", "pink")
NEAR_COLOURS = {
    "black": ("grey", "brown"),
    "white": ("grey",),
    "grey": ("white", "black"),
    "brown": ("black", "red", "orange"),
    "red": ("brown", "orange", "pink", "purple"),
    "orange": ("red", "brown", "yellow"),
    "yellow": ("orange", "green"),
    "green": ("yellow", "blue"),
    "blue": ("green", "purple"),
    "purple": ("blue", "pink", "red"),
    "pink": ("red", "purple"),
}
COLOUR_TEMPLATES = tuple(i for i, t in enumerate(ENTITY_SINGLE) if "{colour}" in t)
# Share of entity negatives that are attribute negatives (when the scene allows one).
ATTRIBUTE_NEGATIVE_RATE = 0.3
# Spatial kinds whose phrasing names an object, so that it can name an absent one, drawn about as often as
# their positives are (rel, side and near_cam requests are the common ones).
SPATIAL_NEGATIVE_KINDS = {
    "rel": 0.3,
    "side": 0.15,
    "near_cam": 0.15,
    "on": 0.1,
    "in": 0.1,
    "left_of": 0.1,
    "right_of": 0.1,
}
# Share of safety negatives asked as "the hot {name}" of an absent category (about as rare as its positives).
HOT_NEGATIVE_RATE = 0.1
ENTITY_ALL = ("all the {plural}", "every {name}", "each {name} on the table", "the {plural}")
SPATIAL_SIDE = ("the {name} on the {side}", "the {side}most {name}", "the {name} furthest to the {side}")
SPATIAL_NEAR_CAM = (
    "the {name} closest to me",
    "the nearest {name}",
    "the {name} closest to the camera",
    "the {name} nearest to me",
    "the {name} right in front of me",
    "the {name} nearest the camera",
)
SPATIAL_NEAREST_OBJ = (
    "the object nearest to the camera",
    "whatever is closest to me",
    "the closest thing",
    "the thing nearest to me",
    "the object closest to the camera",
    "whatever is nearest",
    "the item closest to me",
)
SPATIAL_REL = (
    "the {name} nearest the {ref}",
    "the {name} closest to the {ref}",
    "the {name} beside the {ref}",
    "the {name} next to the {ref}",
    "the {name} near the {ref}",
    "the {name} by the {ref}",
)
SPATIAL_ON = ("the thing on the {ref}", "what is lying on the {ref}", "the object on top of the {ref}")
# Containment (scene-graph relation "in"): a named thing in a named container, or whatever a container holds.
SPATIAL_IN = (
    "the {name} in the {ref}",
    "the {name} inside the {ref}",
    "the {name} that is in the {ref}",
    "the {name} sitting in the {ref}",
)
SPATIAL_IN_ANY = (
    "whatever is in the {ref}",
    "what is inside the {ref}",
    "the things in the {ref}",
    "everything inside the {ref}",
)
SPATIAL_LEFT_OF = (
    "everything to the left of the {ref}",
    "the things left of the {ref}",
    "the things to the left of the {ref}",
    "everything left of the {ref}",
    "whatever is left of the {ref}",
)
SPATIAL_RIGHT_OF = (
    "everything to the right of the {ref}",
    "the things right of the {ref}",
    "the things to the right of the {ref}",
    "everything right of the {ref}",
    "whatever is right of the {ref}",
)
REGION_FITS = (
    "a free spot on the table where the {name} fits",
    "somewhere I could put down the {name}",
    "an empty place on the table big enough for the {name}",
    "free table space for the {name}",
)
REGION_EMPTY = (
    "the free space on the table",
    "the empty part of the table",
    "where is there room on the table",
)
SAFE_KNIFE = (
    "where can I safely put the {name}",
    "a safe place to put the {name} down",
    "where should the {name} go",
    "where does the {name} belong",
    "a safe spot for the {name}",
    "where can the {name} go safely",
    "where should I store the {name}",
)
HOT_STATE = (
    "the {name} that is still hot",
    "the hot {name}",
    "the {name} that was just used",
    "the {name} that might still be hot",
    "the {name} that could burn me",
    "the {name} that is too hot to touch",
    "the warm {name}",
)

# Every fixed template list by the key prefix its requests carry ("{prefix}.t{i}").
TEMPLATES = {
    "entities.single": ENTITY_SINGLE,
    "entities.all": ENTITY_ALL,
    "spatial.side": SPATIAL_SIDE,
    "spatial.near_cam": SPATIAL_NEAR_CAM,
    "spatial.nearest_obj": SPATIAL_NEAREST_OBJ,
    "spatial.rel": SPATIAL_REL,
    "spatial.on": SPATIAL_ON,
    "spatial.in": SPATIAL_IN,
    "spatial.in_any": SPATIAL_IN_ANY,
    "spatial.left_of": SPATIAL_LEFT_OF,
    "spatial.right_of": SPATIAL_RIGHT_OF,
    "spatial.region_fits": REGION_FITS,
    "spatial.region_empty": REGION_EMPTY,
    "safety.safe_place": SAFE_KNIFE,
    "safety.hot_state": HOT_STATE,
}
# knowledge-base vocab section -> the family its requests belong to
VOCAB_FAMILIES = {
    "intents": "intent",
    "affordances": "affordances",
    "functions": "functions",
    "safety": "safety",
    "physical": "physical",
}


def phrase_groups(kb: KnowledgeBase) -> dict[str, list[str]]:
    """Every phrase key the generator can emit, grouped by what it expresses: a template list, or one
    concept of the vocab ("functions.cutting" -> ["functions.cutting.p0", ...])."""
    groups = {prefix: [f"{prefix}.t{i}" for i in range(len(t))] for prefix, t in TEMPLATES.items()}
    for section, fam in VOCAB_FAMILIES.items():
        for concept, phrases in kb.vocab[section].items():
            groups[f"{fam}.{concept}"] = [f"{fam}.{concept}.p{j}" for j in range(len(phrases))]
    return groups


@dataclass
class Request:
    """A prompt and its answer. targets: object ids; region: radius in m of the thing that must fit (or 0)."""

    prompt: str
    family: str
    template_id: str
    template_split: str
    targets: list[int]
    negative: bool
    answer_kind: str  # "object" | "region"
    concept: str
    region_radius_m: float | None = None
    region_safe_margin_m: float = 0.0
    ambiguous: bool = False
    # Negatives only: "absent" (nothing on the table answers the request) or "attribute" (the category is
    # there, not in the colour asked for).
    negative_kind: str | None = None
    extra: dict = field(default_factory=dict)


def template_split(phrase_key: str) -> str:
    return "heldout" if zlib.crc32(phrase_key.encode()) % HELDOUT_EVERY == 0 else "train"


def _head(phrase: str) -> str:
    """Head noun of a simple English noun phrase, singular: "wine glasses" -> "glass"."""
    w = phrase.split()[-1].lower()
    for suffix, repl in (("ives", "ife"), ("sses", "ss"), ("ches", "ch"), ("shes", "sh"), ("ies", "y")):
        if w.endswith(suffix):
            return w[: -len(suffix)] + repl
    if w.endswith("s") and not w.endswith("ss"):
        return w[:-1]
    return w


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _wrap(rng, wrappers, phrase: str, wkind: str) -> tuple[str, str]:
    i = int(rng.integers(len(wrappers)))
    text = wrappers[i].replace("{P}", _cap(phrase)).replace("{p}", phrase)
    return _cap(text), f"{wkind}{i}"


class PromptGenerator:
    """Draws requests for a scene graph: one per family and a share of negatives, deterministically per rng."""

    def __init__(
        self,
        *,
        kb: KnowledgeBase,
        category_sizes: dict[str, tuple[float, float]] | None = None,
        negative_rate: float = 0.2,
    ):
        self.kb = kb
        self.category_sizes = category_sizes or {}
        self.negative_rate = negative_rate

    def generate(self, graph: dict, rng: np.random.Generator, per_family: int = 1) -> list[Request]:
        out: list[Request] = []
        makers = {
            "entities": self._entities,
            "spatial": self._spatial,
            "intent": lambda g, r, neg: self._concept(g, r, neg, "intent", "intents", INTENT_WRAPPERS, "i"),
            "affordances": lambda g, r, neg: self._concept(
                g, r, neg, "affordances", "affordances", NP_WRAPPERS, "n"
            ),
            "functions": lambda g, r, neg: self._concept(
                g, r, neg, "functions", "functions", Q_WRAPPERS, "q"
            ),
            "safety": self._safety,
            "physical": self._physical,
        }
        for fam in FAMILIES:
            for _ in range(per_family):
                neg = bool(rng.random() < self.negative_rate)
                req = makers[fam](graph, rng, neg)
                if req is not None:
                    out.append(req)
        return out

    # ------------------------------------------------------------------ helpers
    def _visible(self, g):
        return [o for o in g["objects"] if o["pixel_area"] > 0]

    def _make(self, rng, fam, key, phrase, wrappers, wkind, targets, neg, concept, **kw) -> Request:
        if wrappers is not INTENT_WRAPPERS and phrase.split()[0].lower() in QUESTION_WORDS:
            wrappers, wkind = DIRECT_Q_WRAPPERS, "d"
        text, wid = _wrap(rng, wrappers, phrase, wkind)
        return Request(
            prompt=text,
            family=fam,
            template_id=f"{key}.{wid}",
            template_split=template_split(key),
            targets=sorted(targets),
            negative=neg,
            answer_kind=kw.pop("answer_kind", "object"),
            concept=concept,
            negative_kind=kw.pop("negative_kind", "absent" if neg else None),
            **kw,
        )

    def _present_words(self, g) -> set[str]:
        """Every name, plural and synonym of the objects in the scene, and their head nouns ("glass" of
        "wine glass"): a request built on any of them is not a negative."""
        words = set()
        for o in g["objects"]:
            c = self.kb.categories[o["category"]]
            for w in (c.name, c.plural, *c.synonyms):
                words.add(w)
                words.add(_head(w))
        return words

    def _name_clash(self, g, cat: str, ref: dict | None = None) -> bool:
        """True if another object in the scene also answers to this category's name (or to the reference's)."""
        names = [(cat, self.kb.categories[cat].name)]
        if ref is not None:
            names.append((ref["category"], ref["name"]))
        for k, name in names:
            others = self._present_words({"objects": [x for x in g["objects"] if x["category"] != k]})
            if name in others:
                return True
        return False

    def _absent_category(self, g, rng) -> str | None:
        """A category that is not in the scene and that nothing in the scene also answers to: its name's
        head noun is not shared ("the glass" is no negative next to a wine glass, "the coffee cup" none next
        to a mug, which is also called a cup)."""
        present = {o["category"] for o in g["objects"]}
        words = self._present_words(g)
        absent = sorted(
            k
            for k, c in self.kb.categories.items()
            if k not in present and not ({c.name, c.plural, _head(c.name), _head(c.plural)} & words)
        )
        return absent[int(rng.integers(len(absent)))] if absent else None

    # ------------------------------------------------------------------ families
    def _entities(self, g, rng, neg):
        objs = self._visible(g)
        if neg or not objs:
            if objs and rng.random() < ATTRIBUTE_NEGATIVE_RATE:
                req = self._entity_attribute_negative(g, rng, objs)
                if req is not None:
                    return req
            return self._entity_absent_negative(g, rng)
        o = objs[int(rng.integers(len(objs)))]
        c = self.kb.categories[o["category"]]
        same = [x for x in g["objects"] if x["category"] == o["category"]]
        # words the *other* objects answer to, head nouns included: "the glass" is ambiguous next to a wine glass
        others = self._present_words({"objects": [x for x in g["objects"] if x["category"] != o["category"]]})
        if len(same) > 1:
            i = int(rng.integers(len(ENTITY_ALL)))
            phrase = ENTITY_ALL[i].format(name=c.name, plural=c.plural)
            return self._make(
                rng,
                "entities",
                f"entities.all.t{i}",
                phrase,
                NP_WRAPPERS,
                "n",
                [x["id"] for x in same],
                False,
                o["category"],
                ambiguous=c.name in others,
            )
        i = int(rng.integers(len(ENTITY_SINGLE)))
        syn = c.synonyms[int(rng.integers(len(c.synonyms)))] if c.synonyms else c.name
        # a synonym shared with a category in the scene ("cup" for mug and coffee cup) would be ambiguous
        if i == 4 and o["size"] == "medium":  # "the medium stapler" is not how people talk
            i = 0
        if i == 1 and (syn in others or _head(syn) in others):
            i = 0
        phrase = ENTITY_SINGLE[i].format(name=c.name, syn=syn, colour=o["colour"], size=o["size"])
        ambiguous = c.name in others  # even the category's own name is another object's head noun
        return self._make(
            rng,
            "entities",
            f"entities.single.t{i}",
            phrase,
            NP_WRAPPERS,
            "n",
            [o["id"]],
            False,
            o["category"],
            ambiguous=ambiguous,
        )

    def _entity_absent_negative(self, g, rng):
        """Something that is not on the table, asked for in any entity phrasing: a negative must sound like
        a positive, or the phrasing alone tells the model the answer (before 2026-12-03 only "the {name}"
        and "the {syn}" were ever negative, and the model learned to doubt exactly those: docs/TRAINING_RUNS.md, Run S)."""
        cat = self._absent_category(g, rng)
        if cat is None:
            return None
        c = self.kb.categories[cat]
        if rng.random() < len(ENTITY_ALL) / (len(ENTITY_ALL) + len(ENTITY_SINGLE)):
            i = int(rng.integers(len(ENTITY_ALL)))
            key, phrase = f"entities.all.t{i}", ENTITY_ALL[i].format(name=c.name, plural=c.plural)
        else:
            i = int(rng.integers(len(ENTITY_SINGLE)))
            syn = c.synonyms[int(rng.integers(len(c.synonyms)))] if c.synonyms else c.name
            size = ("small", "large")[int(rng.integers(2))]
            if i == 1 and {syn, _head(syn)} & self._present_words(g):
                i = 0  # a mug is a cup: "the cup" next to a mug is no negative
            colour = COLOURS[int(rng.integers(len(COLOURS)))]
            key = f"entities.single.t{i}"
            phrase = ENTITY_SINGLE[i].format(name=c.name, syn=syn, colour=colour, size=size)
        return self._make(rng, "entities", key, phrase, NP_WRAPPERS, "n", [], True, cat)

    def _entity_attribute_negative(self, g, rng, objs):
        """A hard negative: the category is on the table, but not in the colour asked for ("the red mug"
        next to a blue one). The colour is one that no object of the category has, nor a neighbouring colour
        word (albedo -> word is coarse: a dark red mug may be called brown). None if no colour qualifies."""
        cats = sorted({o["category"] for o in objs})
        cat = cats[int(rng.integers(len(cats)))]
        c = self.kb.categories[cat]
        # every object answering to the name, whatever its category ("the glass": wine glasses too)
        named = [o for o in g["objects"] if c.name in self._present_words({"objects": [o]})]
        near = set()
        for o in named:
            near |= {o["colour"], *NEAR_COLOURS[o["colour"]]}
        free = [k for k in COLOURS if k not in near]
        if not free:
            return None
        colour = free[int(rng.integers(len(free)))]
        i = COLOUR_TEMPLATES[int(rng.integers(len(COLOUR_TEMPLATES)))]
        key, phrase = f"entities.single.t{i}", ENTITY_SINGLE[i].format(name=c.name, colour=colour)
        return self._make(
            rng, "entities", key, phrase, NP_WRAPPERS, "n", [], True, cat, negative_kind="attribute"
        )

    def _spatial(self, g, rng, neg):
        objs = self._visible(g)
        kinds = ["region", "region_empty", "nearest_obj", "rel", "side", "near_cam", "on", "in", "left_right"]
        by_cat: dict[str, list[dict]] = {}
        for o in objs:
            by_cat.setdefault(o["category"], []).append(o)
        if neg:
            return self._spatial_negative(g, rng, objs)
        # try the kinds in a random order; the first that this scene supports wins
        for k in rng.permutation(len(kinds)):
            req = self._spatial_kind(kinds[int(k)], g, rng, objs, by_cat)
            if req is not None:
                return req
        return None  # unreachable: the region kinds always apply

    def _spatial_negative(self, g, rng, objs):
        """A spatial request about something that is not there, in the phrasing of any spatial kind that
        names an object (a relation to a present reference, the leftmost / nearest of an absent category,
        what lies on or beside an absent reference). Kinds that name no object (free space, the nearest
        thing) always have an answer."""
        cat = self._absent_category(g, rng)
        if cat is None or not objs:
            return None
        name = self.kb.categories[cat].name
        kinds = list(SPATIAL_NEGATIVE_KINDS)
        kind = kinds[int(rng.choice(len(kinds), p=list(SPATIAL_NEGATIVE_KINDS.values())))]
        if kind == "rel":
            ref = objs[int(rng.integers(len(objs)))]["name"]
            i = int(rng.integers(len(SPATIAL_REL)))
            phrase, concept = SPATIAL_REL[i].format(name=name, ref=ref), "nearest_to_object"
        elif kind == "side":
            side = "left" if rng.random() < 0.5 else "right"
            i = int(rng.integers(len(SPATIAL_SIDE)))
            phrase, concept = SPATIAL_SIDE[i].format(name=name, side=side), f"{side}most"
        elif kind == "near_cam":
            i = int(rng.integers(len(SPATIAL_NEAR_CAM)))
            phrase, concept = SPATIAL_NEAR_CAM[i].format(name=name), "nearest_camera"
        elif kind == "on":
            i = int(rng.integers(len(SPATIAL_ON)))
            phrase, concept = SPATIAL_ON[i].format(ref=name), "on"
        elif kind == "in":
            return self._in_negative(g, rng, name)
        else:  # left_of / right_of an absent reference
            tpl = SPATIAL_LEFT_OF if kind == "left_of" else SPATIAL_RIGHT_OF
            i = int(rng.integers(len(tpl)))
            phrase, concept = tpl[i].format(ref=name), kind
        return self._make(rng, "spatial", f"spatial.{kind}.t{i}", phrase, NP_WRAPPERS, "n", [], True, concept)

    def _answering(self, g, name: str) -> list[dict]:
        """Every object that answers to a name (its own, a synonym, or their head noun)."""
        return [o for o in g["objects"] if name in self._present_words({"objects": [o]})]

    def _inside_of(self, g, name: str, ref: str) -> list[int]:
        """Ids of the objects answering to `name` that the scene graph puts in an object answering to `ref`."""
        things = {o["id"] for o in self._answering(g, name)}
        holders = {o["id"] for o in self._answering(g, ref)}
        return sorted({a for a, r, b in g["relations"] if r == "in" and a in things and b in holders})

    def _in_negative(self, g, rng, absent_name: str):
        """ "The {name} in the {ref}" with nothing of the kind in it. Hard when the thing and the container
        are both on the table (the mug beside the bowl, not in it): a negative only if the graph puts no such
        thing in any such container. Otherwise the thing is absent. The thing named is always smaller than
        the container (never "the bowl in the mug": an absurd request would tell the answer by itself)."""
        holders = [o for o in g["objects"] if self.kb.categories[o["category"]].is_container]
        i = int(rng.integers(len(SPATIAL_IN)))
        if holders and rng.random() < 0.6:
            h = holders[int(rng.integers(len(holders)))]
            ref = h["name"]
            small = sorted(
                {
                    o["name"]
                    for o in g["objects"]
                    if max(o["size_m"][:2]) < min(h["size_m"][:2]) and o["name"] != ref
                }
            )
            name = small[int(rng.integers(len(small)))] if small else None
            if name is not None and not self._inside_of(g, name, ref):
                phrase = SPATIAL_IN[i].format(name=name, ref=ref)
                return self._make(
                    rng,
                    "spatial",
                    f"spatial.in.t{i}",
                    phrase,
                    NP_WRAPPERS,
                    "n",
                    [],
                    True,
                    "in",
                    negative_kind="relation",
                )
        if not holders:
            return None
        ref = holders[int(rng.integers(len(holders)))]["name"]
        phrase = SPATIAL_IN[i].format(name=absent_name, ref=ref)
        return self._make(rng, "spatial", f"spatial.in.t{i}", phrase, NP_WRAPPERS, "n", [], True, "in")

    def _spatial_kind(self, kind, g, rng, objs, by_cat):
        """One kind of spatial request, or None if this scene cannot support it."""
        if kind == "region_empty":
            i = int(rng.integers(len(REGION_EMPTY)))
            return self._make(
                rng,
                "spatial",
                f"spatial.region_empty.t{i}",
                REGION_EMPTY[i],
                NP_WRAPPERS,
                "n",
                [],
                False,
                "free_space",
                answer_kind="region",
                region_radius_m=0.04,
            )
        if kind == "region":
            cat = sorted(self.kb.categories)[int(rng.integers(len(self.kb.categories)))]
            if rng.random() < 0.5 and objs:
                cat = objs[int(rng.integers(len(objs)))]["category"]
            c = self.kb.categories[cat]
            size = self._size_of(cat)
            i = int(rng.integers(len(REGION_FITS)))
            return self._make(
                rng,
                "spatial",
                f"spatial.region_fits.t{i}",
                REGION_FITS[i].format(name=c.name),
                NP_WRAPPERS,
                "n",
                [],
                False,
                "free_space",
                answer_kind="region",
                region_radius_m=0.5 * math.hypot(size[0], size[1]) + 0.01,
            )
        if kind == "nearest_obj" and g["nearest_to_camera"] is not None:
            dists = sorted(o["distance_to_camera"] for o in objs)
            i = int(rng.integers(len(SPATIAL_NEAREST_OBJ)))
            return self._make(
                rng,
                "spatial",
                f"spatial.nearest_obj.t{i}",
                SPATIAL_NEAREST_OBJ[i],
                NP_WRAPPERS,
                "n",
                [g["nearest_to_camera"]],
                False,
                "nearest_camera",
                ambiguous=len(dists) > 1 and dists[1] - dists[0] < 0.03,
            )
        if kind == "rel" and len(by_cat) >= 2:
            refs = [c for c, v in by_cat.items() if len(v) == 1]
            if refs:
                ref = by_cat[refs[int(rng.integers(len(refs)))]][0]
                cands = [c for c in by_cat if c != ref["category"]]
                cat = cands[int(rng.integers(len(cands)))]
                pr = np.array(ref["position_3d"][:2])
                ds = sorted(
                    (float(np.linalg.norm(np.array(o["position_3d"][:2]) - pr)), o["id"]) for o in by_cat[cat]
                )
                i = int(rng.integers(len(SPATIAL_REL)))
                phrase = SPATIAL_REL[i].format(name=self.kb.categories[cat].name, ref=ref["name"])
                return self._make(
                    rng,
                    "spatial",
                    f"spatial.rel.t{i}",
                    phrase,
                    NP_WRAPPERS,
                    "n",
                    [ds[0][1]],
                    False,
                    "nearest_to_object",
                    ambiguous=(len(ds) > 1 and ds[1][0] - ds[0][0] < 0.05) or self._name_clash(g, cat, ref),
                )
        if kind == "side":
            multi = [v for v in by_cat.values() if len(v) > 1]
            if multi:
                group = multi[int(rng.integers(len(multi)))]
                side = "left" if rng.random() < 0.5 else "right"
                xs = sorted((o["camera_xyz"][0], o["id"]) for o in group)
                pick = xs[0] if side == "left" else xs[-1]
                other = xs[1] if side == "left" else xs[-2]
                i = int(rng.integers(len(SPATIAL_SIDE)))
                phrase = SPATIAL_SIDE[i].format(name=group[0]["name"], side=side)
                return self._make(
                    rng,
                    "spatial",
                    f"spatial.side.t{i}",
                    phrase,
                    NP_WRAPPERS,
                    "n",
                    [pick[1]],
                    False,
                    f"{side}most",
                    ambiguous=abs(pick[0] - other[0]) < 0.03 or self._name_clash(g, group[0]["category"]),
                )
        if kind == "near_cam":
            multi = [v for v in by_cat.values() if len(v) > 1]
            if multi:
                group = multi[int(rng.integers(len(multi)))]
                ds = sorted((o["distance_to_camera"], o["id"]) for o in group)
                i = int(rng.integers(len(SPATIAL_NEAR_CAM)))
                phrase = SPATIAL_NEAR_CAM[i].format(name=group[0]["name"])
                return self._make(
                    rng,
                    "spatial",
                    f"spatial.near_cam.t{i}",
                    phrase,
                    NP_WRAPPERS,
                    "n",
                    [ds[0][1]],
                    False,
                    "nearest_camera",
                    ambiguous=ds[1][0] - ds[0][0] < 0.04 or self._name_clash(g, group[0]["category"]),
                )
        if kind == "on":
            ons = [r for r in g["relations"] if r[1] == "on"]
            if ons:
                a, _, b = ons[int(rng.integers(len(ons)))]
                sup = g["objects"][b]
                if len(by_cat.get(sup["category"], [])) == 1:
                    i = int(rng.integers(len(SPATIAL_ON)))
                    return self._make(
                        rng,
                        "spatial",
                        f"spatial.on.t{i}",
                        SPATIAL_ON[i].format(ref=sup["name"]),
                        NP_WRAPPERS,
                        "n",
                        [a],
                        False,
                        "on",
                    )
        if kind == "in":
            ins = [r for r in g["relations"] if r[1] == "in"]
            if ins:
                a, _, b = ins[int(rng.integers(len(ins)))]
                thing, holder = g["objects"][a], g["objects"][b]
                if len(self._answering(g, holder["name"])) == 1:  # "the bowl" names one container
                    if rng.random() < 0.5:
                        i = int(rng.integers(len(SPATIAL_IN_ANY)))
                        key, phrase = f"spatial.in_any.t{i}", SPATIAL_IN_ANY[i].format(ref=holder["name"])
                        tg = [x for x, r, y in g["relations"] if r == "in" and y == b]
                    else:
                        i = int(rng.integers(len(SPATIAL_IN)))
                        key = f"spatial.in.t{i}"
                        phrase = SPATIAL_IN[i].format(name=thing["name"], ref=holder["name"])
                        tg = self._inside_of(g, thing["name"], holder["name"])
                    return self._make(
                        rng,
                        "spatial",
                        key,
                        phrase,
                        NP_WRAPPERS,
                        "n",
                        tg,
                        False,
                        "in",
                        # "the mug in the bowl" with two mugs in it names one of two: ambiguous
                        ambiguous=key.startswith("spatial.in.") and len(tg) > 1,
                    )
        if kind == "left_right" and len(by_cat) >= 3:
            refs = [c for c, v in by_cat.items() if len(v) == 1]
            if refs:
                ref = by_cat[refs[int(rng.integers(len(refs)))]][0]
                left = rng.random() < 0.5
                rel = "left_of" if left else "right_of"
                if left:
                    tg = [r[0] for r in g["relations"] if r[1] == "left_of" and r[2] == ref["id"]]
                else:
                    tg = [r[2] for r in g["relations"] if r[1] == "left_of" and r[0] == ref["id"]]
                tg = [t for t in tg if g["objects"][t]["pixel_area"] > 0]
                if tg:
                    tpl = SPATIAL_LEFT_OF if left else SPATIAL_RIGHT_OF
                    i = int(rng.integers(len(tpl)))
                    return self._make(
                        rng,
                        "spatial",
                        f"spatial.{rel}.t{i}",
                        tpl[i].format(ref=ref["name"]),
                        NP_WRAPPERS,
                        "n",
                        tg,
                        False,
                        rel,
                    )
        return None

    def _size_of(self, cat: str) -> tuple[float, float]:
        return self.category_sizes.get(cat, (0.1, 0.1))

    def _concept(self, g, rng, neg, fam, vocab_key, wrappers, wkind):
        vocab = self.kb.vocab[vocab_key]
        concepts = sorted(vocab)
        # intents are keyed by function: an intent's answer is every object serving that function
        present = {
            c: [o["id"] for o in self._visible(g) if self.kb.categories[o["category"]].has(c)]
            for c in concepts
        }
        pos_c = [c for c in concepts if present[c]]
        neg_c = [
            c for c in concepts if not any(self.kb.categories[o["category"]].has(c) for o in g["objects"])
        ]
        pool = neg_c if (neg and neg_c) or not pos_c else pos_c
        if not pool:
            return None
        concept = pool[int(rng.integers(len(pool)))]
        phrases = vocab[concept]
        j = int(rng.integers(len(phrases)))
        targets = present[concept]
        is_neg = not targets
        return self._make(
            rng, fam, f"{fam}.{concept}.p{j}", phrases[j], wrappers, wkind, targets, is_neg, concept
        )

    def _safety(self, g, rng, neg):
        objs = self._visible(g)
        knives = [o for o in objs if o["category"] in ("kitchen_knife", "table_knife", "scissors")]
        if knives and not neg and rng.random() < 0.35:
            k = knives[int(rng.integers(len(knives)))]
            holders = [o["id"] for o in objs if o["category"] in ("knife_stand", "chopping_board")]
            i = int(rng.integers(len(SAFE_KNIFE)))
            phrase = SAFE_KNIFE[i].format(name=k["name"])
            if holders:  # the knife block or the board is the safe answer
                return self._make(
                    rng,
                    "safety",
                    f"safety.safe_place.t{i}",
                    phrase,
                    Q_WRAPPERS,
                    "q",
                    holders,
                    False,
                    "safe_place",
                )
            size = k["size_m"]
            return self._make(
                rng,
                "safety",
                f"safety.safe_place.t{i}",
                phrase,
                Q_WRAPPERS,
                "q",
                [],
                False,
                "safe_place",
                answer_kind="region",
                region_radius_m=0.5 * math.hypot(size[0], size[1]),
                region_safe_margin_m=0.1,
            )
        hot = [o for o in objs if o["states"].get("hot")]
        if neg and rng.random() < HOT_NEGATIVE_RATE:  # "the hot kettle" with no kettle on the table
            cat = self._absent_category(g, rng)
            if cat is not None:
                i = int(rng.integers(len(HOT_STATE)))
                return self._make(
                    rng,
                    "safety",
                    f"safety.hot_state.t{i}",
                    HOT_STATE[i].format(name=self.kb.categories[cat].name),
                    Q_WRAPPERS,
                    "q",
                    [],
                    True,
                    "hot",
                )
        if hot and not neg and rng.random() < 0.3:
            o = hot[int(rng.integers(len(hot)))]
            same = [x for x in objs if x["category"] == o["category"]]
            if len(same) == 1:
                i = int(rng.integers(len(HOT_STATE)))
                return self._make(
                    rng,
                    "safety",
                    f"safety.hot_state.t{i}",
                    HOT_STATE[i].format(name=o["name"]),
                    Q_WRAPPERS,
                    "q",
                    [o["id"]],
                    False,
                    "hot",
                    ambiguous=self._name_clash(g, o["category"]),
                )
        return self._concept(g, rng, neg, "safety", "safety", Q_WRAPPERS, "q")

    def _physical(self, g, rng, neg):
        objs = self._visible(g)
        vocab = self.kb.vocab["physical"]
        superl = ("heaviest", "lightest", "tallest", "largest", "smallest")
        if not neg and objs and rng.random() < 0.5:
            concept = superl[int(rng.integers(len(superl)))]
            key = {
                "heaviest": lambda o: -o["mass_kg"],
                "lightest": lambda o: o["mass_kg"],
                "tallest": lambda o: -o["size_m"][2],
                "largest": lambda o: -o["size_m"][0] * o["size_m"][1] * o["size_m"][2],
                "smallest": lambda o: o["size_m"][0] * o["size_m"][1] * o["size_m"][2],
            }[concept]
            ranked = sorted(objs, key=key)
            tie = len(ranked) > 1 and abs(key(ranked[0]) - key(ranked[1])) <= 0.1 * abs(key(ranked[0])) + 1e-9
            j = int(rng.integers(len(vocab[concept])))
            return self._make(
                rng,
                "physical",
                f"physical.{concept}.p{j}",
                vocab[concept][j],
                NP_WRAPPERS,
                "n",
                [ranked[0]["id"]],
                False,
                concept,
                ambiguous=tie,
            )
        flags = tuple(c for c in sorted(vocab) if c not in superl)
        present = {c: [o["id"] for o in objs if self.kb.categories[o["category"]].has(c)] for c in flags}
        absent = [c for c in flags if not any(self.kb.categories[o["category"]].has(c) for o in g["objects"])]
        pool = absent if neg and absent else [c for c in flags if present[c]]
        if not pool:
            return None
        concept = pool[int(rng.integers(len(pool)))]
        j = int(rng.integers(len(vocab[concept])))
        t = present[concept]
        return self._make(
            rng,
            "physical",
            f"physical.{concept}.p{j}",
            vocab[concept][j],
            NP_WRAPPERS,
            "n",
            t,
            not t,
            concept,
        )
