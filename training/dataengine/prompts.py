"""Prompt generator over seven concept families, with negatives, multi-target, region and relational answers.

A sample is a *request* plus its answer as a set of object ids (or a region of free table). Masks are made
later from the frame. Every prompt comes from a phrase (knowledge-base vocab or a template below) put in a
wrapper (bare, polite or hedged request, hand-over, existence question, robot command); `template_id` names
both, and a deterministic 20 % of phrases are held out (`template_split`), so evaluation can test unseen
phrasings. Entity requests also come as two things at once ("the mug and the spoon": both), as a contrast
("the other mug, not the red one": the one not described) and as a description without a name ("the red
plastic thing"). A share of requests (`noise_rate`) carries one human error: a typo, a dropped small word, a
wrong plural or no final punctuation.
"""

from __future__ import annotations

import math
import re
import string
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
    "Could you show me {p}?",
    "Would you mind pointing out {p}?",
    "Where's {p}?",
    "Um, {p}, please.",
    "Please find {p} for me.",
    "Can you see {p}?",
)
# How people ask for a thing to be handed over; only for answers that are objects (no one passes a free spot).
HANDOVER_WRAPPERS = (
    "Could you pass me {p}?",
    "Would you mind grabbing {p}?",
    "Can you hand me {p}, please?",
    "Please bring me {p}.",
    "Could I have {p}?",
    "Pick up {p}.",
    "Would you get me {p}?",
    "Grab {p} for me, will you?",
    "I'd like {p}, please.",
)
# Existence questions for a phrase that starts with an indefinite ("something I can cut with", "a mug").
EXIST_WRAPPERS = (
    "Is there {p} here?",
    "Is there {p} on the table?",
    "Do you see {p}?",
    "Have we got {p}?",
    "Do we have {p} around?",
)
INDEFINITE_WORDS = ("something", "anything", "a", "an", "some")
Q_WRAPPERS = (
    "{P}?",
    "Show me {p}.",
    "Can you show me {p}?",
    "Please highlight {p}.",
    "Robot, mark {p}.",
    "Tell me {p}.",
    "Could you show me {p}?",
    "Would you mind pointing out {p}?",
    "Can you find {p} for me?",
    "I'd like to see {p}, please.",
)
# A phrase that is itself a question ("what could burn me", "which things could roll away") keeps its
# word order: it only gets a greeting or a follow-up, never "Show me what could I ...".
DIRECT_Q_WRAPPERS = (
    "{P}?",
    "Robot, {p}?",
    "Hey robot, {p}?",
    "Quick question: {p}?",
    "{P}? Show me, please.",
    "Could you tell me {p}?",
    "Sorry to bother you, but {p}?",
    "{P}? Just point to it.",
    "Um, {p}?",
)
QUESTION_WORDS = ("what", "which", "where", "how", "who", "is", "are", "do")
INTENT_WRAPPERS = (
    "{P}.",
    "{P}. What can I use?",
    "{P}, can you help me?",
    "Hey robot, {p}.",
    "{P}. Show me what I need.",
    "{P}. Could you bring me something?",
    "{P}. Is there anything here for that?",
    "Sorry, {p}.",
    "{P}. Any ideas?",
    "Robot, {p}. Help?",
    "{P}, what have we got?",
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
    "the {name} made of {material}",
    "the {material} {name}",
    "{a_name}",
    "my {name}",
    "the {shape} {name}",
    "the {name}, the {colour} one",
    "that {colour} {name} there",
    "the {size} {colour} {name}",
    "is there {a_name} on the table",
    "do you see {a_name} anywhere",
    "that {syn}",
    "the {name} over there",
)
# The words people use for a category's material (knowledge base `material`); "organic" (food) has none.
MATERIAL_WORDS = {
    "steel": "metal",
    "aluminium": "metal",
    "glass": "glass",
    "ceramic": "ceramic",
    "plastic": "plastic",
    "wood": "wooden",
    "paper": "paper",
    "cardboard": "cardboard",
    "cotton": "cloth",
    "foam": "foam",
    "wax": "wax",
}
# Shape words from a model's size (x, y footprint and z height in metres): (ratio, says, clearly not). A shape is
# said of an object whose ratio passes `says`; an object that neither passes it nor is clearly not of that
# shape is borderline, and a description that would have to include or exclude it is not drawn.
SHAPES = {
    "tall": (lambda s: s[2] / max(s[0], s[1]), 1.6, 1.1),
    "flat": (lambda s: max(s[0], s[1]) / max(s[2], 1e-3), 5.0, 3.0),
    "long": (lambda s: max(s[0], s[1]) / max(min(s[0], s[1]), 1e-3), 3.0, 2.0),
}
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
ENTITY_ALL = (
    "all the {plural}",
    "every {name}",
    "each {name} on the table",
    "the {plural}",
    "all of the {plural}",
    "the {plural} on the table",
    "are there any {plural} here",
    "every single {name}",
    "all {plural}",
)
# Several objects at once: the union of two categories, each one instance in the scene.
ENTITY_PAIR = (
    "the {a} together with the {b}",
    "both the {a} and the {b}",
    "the {a} and {b}",
    "the {a} as well as the {b}",
    "the {a} plus the {b}",
    "{a_a} and {a_b}",
    "the {a} and the {b}",
    "the {a}, and the {b} too",
    "the {a} and also the {b}",
)
# Contrast between the two instances of a category: {ex} names the one that is *not* meant ("the red one",
# "the one on the left"); the answer is the other.
ENTITY_CONTRAST = (
    "not {ex}, the other {name}",
    "the other {name}, not {ex}",
    "the {name} that isn't {ex}",
    "the {name} that is not {ex}",
    "any {name} except {ex}",
    "the {name}, but not {ex}",
    "I mean the other {name}, not {ex}",
    "the second {name}, not {ex}",
    "the {name} other than {ex}",
    "the {name} that's not {ex}",
    "not {ex} but the other {name}",
    "that other {name}, not {ex}",
    "the {name} which isn't {ex}",
    "the {name} besides {ex}",
)
# A thing described without its name: by colour, material and shape, as people do with things they cannot name.
ENTITY_DESCRIBE = (
    "the {colour} thing",
    "the {colour} object",
    "the {material} thing",
    "the thing made of {material}",
    "the {colour} {material} thing",
    "something {colour}",
    "the {shape} {colour} thing",
    "the {colour} {material} object",
    "that {colour} thing",
    "the {shape} {material} thing",
)
# Excluded-instance descriptions for contrast requests, by what tells the two apart.
CONTRAST_COLOUR = "the {colour} one"
CONTRAST_SIZE = {
    "big": ("the big one", "the bigger one", "the large one"),
    "small": ("the small one", "the smaller one", "the little one"),
}
CONTRAST_SIDE = ("the one on the {side}", "the {side} one")
CONTRAST_NEAR = {
    "near": ("the one closest to me", "the nearer one"),
    "far": ("the one further away", "the one at the back"),
}
# Shares of entity requests in each form (the rest name a category: ENTITY_SINGLE / ENTITY_ALL); a form the scene
# cannot support falls back to naming.
ENTITY_FORMS = {"pair": 0.15, "contrast": 0.1, "describe": 0.12}
SPATIAL_SIDE = (
    "the {name} on the {side}",
    "the {side}most {name}",
    "the {name} furthest to the {side}",
    "the {name} over on the {side}",
    "the {name} on the {side} side",
    "the {name} that's more to the {side}",
)
SPATIAL_NEAR_CAM = (
    "the {name} closest to me",
    "the nearest {name}",
    "the {name} closest to the camera",
    "the {name} nearest to me",
    "the {name} right in front of me",
    "the {name} nearest the camera",
    "the {name} in front",
    "the {name} right by me",
    "the nearer {name}",
    "the {name} that's closest",
)
SPATIAL_NEAREST_OBJ = (
    "the object nearest to the camera",
    "whatever is closest to me",
    "the closest thing",
    "the thing nearest to me",
    "the object closest to the camera",
    "whatever is nearest",
    "the item closest to me",
    "the thing right in front of me",
    "whatever is nearest to me",
    "the closest object to me",
)
SPATIAL_REL = (
    "the {name} nearest the {ref}",
    "the {name} closest to the {ref}",
    "the {name} beside the {ref}",
    "the {name} next to the {ref}",
    "the {name} near the {ref}",
    "the {name} by the {ref}",
    "the {name} sitting next to the {ref}",
    "the {name} right by the {ref}",
    "the {name} close to the {ref}",
    "the {name} that's beside the {ref}",
)
SPATIAL_ON = (
    "the thing on the {ref}",
    "what is lying on the {ref}",
    "the object on top of the {ref}",
    "whatever is sitting on the {ref}",
    "the thing resting on the {ref}",
    "the thing that's on top of the {ref}",
)
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
    "a spot where I can set the {name} down",
    "room on the table for the {name}",
    "where would the {name} fit",
)
REGION_EMPTY = (
    "the free space on the table",
    "the empty part of the table",
    "where is there room on the table",
    "an empty spot on the table",
    "the part of the table with nothing on it",
    "some clear space on the table",
    "a clear area of the table",
    "the bare part of the table",
)
SAFE_KNIFE = (
    "where can I safely put the {name}",
    "a safe place to put the {name} down",
    "where should the {name} go",
    "where does the {name} belong",
    "a safe spot for the {name}",
    "where can the {name} go safely",
    "where should I store the {name}",
    "somewhere safe for the {name}",
    "where can I leave the {name} so nobody gets cut",
    "a safe place for the {name}",
)
HOT_STATE = (
    "the {name} that is still hot",
    "the hot {name}",
    "the {name} that was just used",
    "the {name} that might still be hot",
    "the {name} that could burn me",
    "the {name} that is too hot to touch",
    "the warm {name}",
    "the {name} that's still warm",
    "the {name} I shouldn't touch because it's hot",
    "the {name} that just came off the heat",
)

# Every fixed template list by the key prefix its requests carry ("{prefix}.t{i}").
TEMPLATES = {
    "entities.single": ENTITY_SINGLE,
    "entities.all": ENTITY_ALL,
    "entities.pair": ENTITY_PAIR,
    "entities.contrast": ENTITY_CONTRAST,
    "entities.describe": ENTITY_DESCRIBE,
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


def _wrap(rng, kinds: list[tuple[tuple[str, ...], str]], phrase: str) -> tuple[str, str]:
    """Put a phrase in one wrapper drawn from all of `kinds` ((wrappers, id prefix) pairs); returns the text
    and the wrapper id ("h3": HANDOVER_WRAPPERS[3])."""
    flat = [(w, k, i) for ws, k in kinds for i, w in enumerate(ws)]
    w, k, i = flat[int(rng.integers(len(flat)))]
    return _cap(w.replace("{P}", _cap(phrase)).replace("{p}", phrase)), f"{k}{i}"


def _indefinite(name: str, plural: str) -> str:
    """ "a mug", "an oil and vinegar set"; "some bread" for a mass or plural noun (its plural is "loaves of
    bread", or the name itself ends in s: "apples", "keys")."""
    if plural.endswith(" of " + name) or (name.endswith("s") and not name.endswith("ss")):
        return f"some {name}"
    return ("an " if name[:1] in "aeiou" else "a ") + name


def _fields_of(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


def _shape_state(size_m, shape: str) -> str:
    """ "yes", "no" or "borderline": whether an object of this size is said to be of the shape (SHAPES)."""
    ratio, says, clearly_not = SHAPES[shape]
    r = ratio(size_m)
    return "yes" if r >= says else ("no" if r < clearly_not else "borderline")


# Human errors (PromptGenerator noise_rate): a typo, a dropped small word, a wrong plural, no final punctuation.
NOISE_KINDS = ("typo", "drop_word", "plural", "no_punctuation")
DROPPABLE_WORDS = ("the", "a", "an", "please", "that", "is", "of", "me", "just", "for", "to")
# Words a typo never touches: the ones that turn a request around (negation, contrast, image side).
PROTECTED_WORDS = ("not", "except", "other", "besides", "but", "left", "right", "leftmost", "rightmost")
KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def _keyboard_neighbours(ch: str) -> str:
    for row in KEYBOARD_ROWS:
        k = row.find(ch)
        if k >= 0:
            return row[max(k - 1, 0) : k] + row[k + 1 : k + 2]
    return ""


def _typo(word: str, rng) -> str:
    """One slip of the fingers inside a word: two letters swapped, one dropped, doubled or hit next to."""
    k = 1 + int(rng.integers(len(word) - 1))  # never the first letter: people rarely miss it
    op = int(rng.integers(4))
    if op == 0 and k < len(word) - 1:
        return word[:k] + word[k + 1] + word[k] + word[k + 2 :]
    if op == 1:
        return word[:k] + word[k + 1 :]
    if op == 2:
        return word[: k + 1] + word[k:]
    near = _keyboard_neighbours(word[k].lower())
    return word[:k] + near[int(rng.integers(len(near)))] + word[k + 1 :] if near else word[:k] + word[k + 1 :]


class PromptGenerator:
    """Draws requests for a scene graph: one per family and a share of negatives, deterministically per rng.

    noise_rate: share of requests that get one human error (NOISE_KINDS). A typo or a dropped word never
    makes a word the generator uses elsewhere nor a name of another category (`_noise`)."""

    def __init__(
        self,
        *,
        kb: KnowledgeBase,
        category_sizes: dict[str, tuple[float, float]] | None = None,
        negative_rate: float = 0.2,
        noise_rate: float = 0.0,
    ):
        if not 0.0 <= noise_rate <= 1.0:
            raise ValueError(f"noise_rate must be in [0, 1], got {noise_rate}")
        self.kb = kb
        self.category_sizes = category_sizes or {}
        self.negative_rate = negative_rate
        self.noise_rate = noise_rate
        # every category name, plural and synonym -> the categories it names, matched longest first
        self._names: dict[str, set[str]] = {}
        for k, c in kb.categories.items():
            for w in (c.name, c.plural, *c.synonyms):
                self._names.setdefault(w.lower(), set()).add(k)
        alts = sorted(self._names, key=len, reverse=True)
        self._name_re = re.compile(r"\b(?:" + "|".join(re.escape(a) for a in alts) + r")\b")
        # every word the generator can say: a typo must never make one of them
        texts = [w for ws in self._names for w in (ws, _head(ws))]
        texts += [t for ts in TEMPLATES.values() for t in ts]
        texts += [*NP_WRAPPERS, *HANDOVER_WRAPPERS, *EXIST_WRAPPERS, *Q_WRAPPERS, *DIRECT_Q_WRAPPERS]
        texts += [
            *INTENT_WRAPPERS,
            *COLOURS,
            *MATERIAL_WORDS.values(),
            *SHAPES,
            CONTRAST_COLOUR,
            *CONTRAST_SIDE,
        ]
        texts += [w for ws in (*CONTRAST_SIZE.values(), *CONTRAST_NEAR.values()) for w in ws]
        texts += [p for concepts in kb.vocab.values() for ps in concepts.values() for p in ps]
        self._known_words = {w for t in texts for w in re.findall(r"[a-z]+", t.lower())}

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
        # the noise has its own stream, drawn once: the requests are the same whatever the noise rate
        noise_rng = np.random.default_rng(int(rng.integers(2**63)))
        for fam in FAMILIES:
            for _ in range(per_family):
                neg = bool(rng.random() < self.negative_rate)
                req = makers[fam](graph, rng, neg)
                if req is not None:
                    if noise_rng.random() < self.noise_rate:
                        self._noise(req, noise_rng)
                    out.append(req)
        return out

    # ------------------------------------------------------------------ human errors
    def mentions(self, text: str) -> set[str]:
        """The categories a text names (longest name first: "wine glass" is not also "glass")."""
        return {k for m in self._name_re.finditer(text.lower()) for k in self._names[m.group(0)]}

    def _noise(self, req: Request, rng) -> None:
        """Put one human error into req.prompt (recorded in req.extra["noise"]); a draw that would name another
        category, or make a word the generator uses, leaves the prompt as it was."""
        text, kind = req.prompt, NOISE_KINDS[int(rng.integers(len(NOISE_KINDS)))]
        words = list(re.finditer(r"[A-Za-z]+", text))
        new = None
        if kind == "typo":
            cands = [m for m in words if len(m.group(0)) >= 4 and m.group(0).lower() not in PROTECTED_WORDS]
            if cands:
                m = cands[int(rng.integers(len(cands)))]
                w = _typo(m.group(0), rng)
                if w.lower() not in self._known_words:
                    new = text[: m.start()] + w + text[m.end() :]
        elif kind == "drop_word":
            cands = [m for m in words if m.group(0).lower() in DROPPABLE_WORDS]
            if cands:
                m = cands[int(rng.integers(len(cands)))]
                end = m.end() + 1 if text[m.end() : m.end() + 1] == " " else m.end()
                new = text[: m.start()] + text[end:]
        elif kind == "plural":
            swaps = []
            for m in self._name_re.finditer(text.lower()):
                cats = self._names[m.group(0)]
                c = self.kb.categories[next(iter(cats))]
                if len(cats) == 1 and m.group(0) in (c.name, c.plural) and c.name != c.plural:
                    swaps.append((m, c.plural if m.group(0) == c.name else c.name))
            if swaps:
                m, w = swaps[int(rng.integers(len(swaps)))]
                new = text[: m.start()] + w + text[m.end() :]
        else:
            new = text.rstrip(".?!")
        if not new or not new.strip() or new == text or not self.mentions(new) <= self.mentions(text):
            return
        req.prompt = _cap(new.strip())
        req.extra["noise"] = kind

    # ------------------------------------------------------------------ helpers
    def _visible(self, g):
        return [o for o in g["objects"] if o["pixel_area"] > 0]

    def _make(self, rng, fam, key, phrase, wrappers, wkind, targets, neg, concept, **kw) -> Request:
        answer_kind = kw.pop("answer_kind", "object")
        first = phrase.split()[0].lower()
        if wrappers is not INTENT_WRAPPERS and first in QUESTION_WORDS:
            kinds = [(DIRECT_Q_WRAPPERS, "d")]
        else:
            # a thing can be asked for, handed over, or asked about ("is there something ...")
            kinds = [(wrappers, wkind)]
            if wrappers is not INTENT_WRAPPERS and answer_kind == "object":
                kinds.append((HANDOVER_WRAPPERS, "h"))
            if wrappers is not INTENT_WRAPPERS and first in INDEFINITE_WORDS:
                kinds.append((EXIST_WRAPPERS, "e"))
        text, wid = _wrap(rng, kinds, phrase)
        return Request(
            prompt=text,
            family=fam,
            template_id=f"{key}.{wid}",
            template_split=template_split(key),
            targets=sorted(targets),
            negative=neg,
            answer_kind=answer_kind,
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

    def _absent_category(self, g, rng, exclude: set[str] = frozenset()) -> str | None:
        """A category that is not in the scene and that nothing in the scene also answers to: its name's
        head noun is not shared ("the glass" is no negative next to a wine glass, "the coffee cup" none next
        to a mug, which is also called a cup)."""
        present = {o["category"] for o in g["objects"]}
        words = self._present_words(g)
        absent = sorted(
            k
            for k, c in self.kb.categories.items()
            if k not in present
            and k not in exclude
            and not ({c.name, c.plural, _head(c.name), _head(c.plural)} & words)
        )
        return absent[int(rng.integers(len(absent)))] if absent else None

    # ------------------------------------------------------------------ families
    def _entities(self, g, rng, neg):
        objs = self._visible(g)
        u, form = rng.random(), None
        for name, share in ENTITY_FORMS.items():
            if u < share:
                form = name
                break
            u -= share
        if form is not None and objs:
            maker = {
                "pair": self._entity_pair,
                "contrast": self._entity_contrast,
                "describe": self._entity_describe,
            }
            req = maker[form](g, rng, objs, neg)
            if req is not None:
                return req
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
        fields = self._entity_fields(c, rng, others, o)
        i = self._fillable(ENTITY_SINGLE, fields, rng)
        phrase = ENTITY_SINGLE[i].format(**fields)
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

    def _entity_fields(self, c, rng, avoid: set[str], o: dict | None = None) -> dict:
        """What ENTITY_SINGLE's placeholders say of category c: of object o, or made up for a negative (o None).
        None where there is nothing to say: a synonym or a material word that `avoid` (words other objects
        answer to) holds, a "medium" size, a shape the object does not clearly have."""
        syn = c.synonyms[int(rng.integers(len(c.synonyms)))] if c.synonyms else c.name
        material = MATERIAL_WORDS.get(c.material)
        if material is not None and (material in c.name.split() or {material, _head(material)} & avoid):
            material = None
        shapes = sorted(SHAPES)
        if o is None:
            size = ("small", "large")[int(rng.integers(2))]
            colour = COLOURS[int(rng.integers(len(COLOURS)))]
            shape = shapes[int(rng.integers(len(shapes)))]
        else:
            size = None if o["size"] == "medium" else o["size"]  # "the medium stapler" is not how people talk
            colour = o["colour"]
            said = [k for k in shapes if _shape_state(o["size_m"], k) == "yes"]
            shape = said[int(rng.integers(len(said)))] if said else None
        return {
            "name": c.name,
            "plural": c.plural,
            "a_name": _indefinite(c.name, c.plural),
            # a synonym shared with a category in the scene ("cup" for mug and coffee cup) would be ambiguous
            "syn": None if {syn, _head(syn)} & avoid else syn,
            "colour": colour,
            "size": size,
            "material": material,
            "shape": shape,
        }

    @staticmethod
    def _fillable(templates, fields: dict, rng, among=None) -> int:
        """Index of a template (of `among`, default all) whose every placeholder has a value in `fields`."""
        among = range(len(templates)) if among is None else among
        ok = [i for i in among if all(fields.get(f) is not None for f in _fields_of(templates[i]))]
        return ok[int(rng.integers(len(ok)))]  # never empty: "the {name}", "the {colour} {name}" always fill

    def _entity_absent_negative(self, g, rng):
        """Something that is not on the table, asked for in any entity phrasing: a negative must sound like
        a positive, or the phrasing alone tells the model the answer: a model whose negatives come in a few
        phrasings learns to doubt exactly those."""
        cat = self._absent_category(g, rng)
        if cat is None:
            return None
        c = self.kb.categories[cat]
        if rng.random() < len(ENTITY_ALL) / (len(ENTITY_ALL) + len(ENTITY_SINGLE)):
            i = int(rng.integers(len(ENTITY_ALL)))
            key, phrase = f"entities.all.t{i}", ENTITY_ALL[i].format(name=c.name, plural=c.plural)
        else:
            # a mug is a cup: "the cup" next to a mug is no negative (_entity_fields leaves such a synonym out)
            fields = self._entity_fields(c, rng, self._present_words(g))
            i = self._fillable(ENTITY_SINGLE, fields, rng)
            key, phrase = f"entities.single.t{i}", ENTITY_SINGLE[i].format(**fields)
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
        fields = self._entity_fields(c, rng, self._present_words(g))
        fields["colour"] = free[int(rng.integers(len(free)))]
        i = self._fillable(ENTITY_SINGLE, fields, rng, among=COLOUR_TEMPLATES)
        key, phrase = f"entities.single.t{i}", ENTITY_SINGLE[i].format(**fields)
        return self._make(
            rng, "entities", key, phrase, NP_WRAPPERS, "n", [], True, cat, negative_kind="attribute"
        )

    def _single_instances(self, g, objs) -> list[dict]:
        """Visible objects that are the only one of their category and whose name no other object answers to."""
        count: dict[str, int] = {}
        for o in g["objects"]:
            count[o["category"]] = count.get(o["category"], 0) + 1
        return [o for o in objs if count[o["category"]] == 1 and not self._name_clash(g, o["category"])]

    def _entity_pair(self, g, rng, objs, neg):
        """Two things at once ("the mug and the spoon"): the union of both. A negative names two absent
        categories (with one of them present the request would be half right)."""
        if neg:
            a = self._absent_category(g, rng)
            b = self._absent_category(g, rng, exclude={a}) if a is not None else None
            if b is None:
                return None
            cats, targets = [a, b], []
        else:
            singles = self._single_instances(g, objs)
            if len(singles) < 2:
                return None
            pick = rng.choice(len(singles), size=2, replace=False)
            cats = [singles[int(k)]["category"] for k in pick]
            targets = [singles[int(k)]["id"] for k in pick]
        ca, cb = (self.kb.categories[k] for k in cats)
        i = int(rng.integers(len(ENTITY_PAIR)))
        phrase = ENTITY_PAIR[i].format(
            a=ca.name, b=cb.name, a_a=_indefinite(ca.name, ca.plural), a_b=_indefinite(cb.name, cb.plural)
        )
        return self._make(
            rng,
            "entities",
            f"entities.pair.t{i}",
            phrase,
            NP_WRAPPERS,
            "n",
            targets,
            neg,
            "+".join(cats),
            extra={"named": cats},
        )

    def _contrast_descriptions(self, e: dict, t: dict) -> list[str]:
        """Ways to name e, the instance that is not meant, that t (the other one) does not fit."""
        out = []
        if e["colour"] != t["colour"] and t["colour"] not in NEAR_COLOURS[e["colour"]]:
            out.append(CONTRAST_COLOUR.format(colour=e["colour"]))
        ve, vt = (float(np.prod(x["size_m"])) for x in (e, t))
        if ve >= 1.6 * vt or vt >= 1.6 * ve:
            out += CONTRAST_SIZE["big" if ve > vt else "small"]
        dx = e["camera_xyz"][0] - t["camera_xyz"][0]  # image left = smaller camera x, as in spatial "side"
        if abs(dx) >= 0.05:
            out += [d.format(side="left" if dx < 0 else "right") for d in CONTRAST_SIDE]
        dd = e["distance_to_camera"] - t["distance_to_camera"]
        if abs(dd) >= 0.06:
            out += CONTRAST_NEAR["near" if dd < 0 else "far"]
        return out

    def _entity_contrast(self, g, rng, objs, neg):
        """ "the other mug, not the red one": of the two instances of a category, the one not described. Drawn
        in scenes that hold two of a kind, positive or negative (an absent category), so the phrasing says
        nothing about presence."""
        by_cat: dict[str, list[dict]] = {}
        for o in g["objects"]:
            by_cat.setdefault(o["category"], []).append(o)
        pairs = [
            v
            for k, v in sorted(by_cat.items())
            if len(v) == 2 and all(o["pixel_area"] > 0 for o in v) and not self._name_clash(g, k)
        ]
        if not pairs:
            return None
        i = int(rng.integers(len(ENTITY_CONTRAST)))
        if neg:
            cat = self._absent_category(g, rng)
            if cat is None:
                return None
            fake = [
                CONTRAST_COLOUR.format(colour=COLOURS[int(rng.integers(len(COLOURS)))]),
                *CONTRAST_SIZE["big"],
                *CONTRAST_SIZE["small"],
                *(d.format(side=side) for d in CONTRAST_SIDE for side in ("left", "right")),
                *CONTRAST_NEAR["near"],
                *CONTRAST_NEAR["far"],
            ]
            ex = fake[int(rng.integers(len(fake)))]
            phrase = ENTITY_CONTRAST[i].format(name=self.kb.categories[cat].name, ex=ex)
            return self._make(
                rng, "entities", f"entities.contrast.t{i}", phrase, NP_WRAPPERS, "n", [], True, cat
            )
        pair = pairs[int(rng.integers(len(pairs)))]
        k = int(rng.integers(2))
        e, t = pair[k], pair[1 - k]
        ways = self._contrast_descriptions(e, t)
        if not ways:
            return None
        phrase = ENTITY_CONTRAST[i].format(name=e["name"], ex=ways[int(rng.integers(len(ways)))])
        return self._make(
            rng,
            "entities",
            f"entities.contrast.t{i}",
            phrase,
            NP_WRAPPERS,
            "n",
            [t["id"]],
            False,
            e["category"],
            extra={"excluded": [e["id"]]},
        )

    @staticmethod
    def _describes(o: dict, fields: dict) -> str:
        """ "yes" if object o fits a description ({colour, material, shape}), "no" if it clearly does not,
        "borderline" if a person might say either (a neighbouring colour word, a shape near its threshold)."""
        state = "yes"
        if "colour" in fields and o["colour"] != fields["colour"]:
            if o["colour"] not in NEAR_COLOURS[fields["colour"]]:
                return "no"
            state = "borderline"
        if "material" in fields and MATERIAL_WORDS.get(o["material"]) != fields["material"]:
            return "no"
        if "shape" in fields:
            s = _shape_state(o["size_m"], fields["shape"])
            if s == "no":
                return "no"
            if s == "borderline":
                state = "borderline"
        return state

    def _entity_describe(self, g, rng, objs, neg):
        """A thing described without its name ("the red plastic thing"). A positive's description fits one
        visible object and no other even borderline; a negative's fits no object in the scene, hidden or not."""
        i = int(rng.integers(len(ENTITY_DESCRIBE)))
        need = _fields_of(ENTITY_DESCRIBE[i])
        words = {
            "colour": list(COLOURS),
            "material": sorted(set(MATERIAL_WORDS.values())),
            "shape": sorted(SHAPES),
        }
        answer = None  # (fields, targets, concept)
        if neg:
            for _ in range(8):
                fields = {f: words[f][int(rng.integers(len(words[f])))] for f in need}
                if all(self._describes(o, fields) == "no" for o in g["objects"]):
                    answer = fields, [], "description"
                    break
        else:
            for k in rng.permutation(len(objs)):
                o = objs[int(k)]
                said = [s for s in sorted(SHAPES) if _shape_state(o["size_m"], s) == "yes"]
                have = {
                    "colour": o["colour"],
                    "material": MATERIAL_WORDS.get(o["material"]),
                    "shape": said[int(rng.integers(len(said)))] if said else None,
                }
                fields = {f: have[f] for f in need}
                if None in fields.values():
                    continue
                fits = [self._describes(x, fields) for x in objs]
                if fits.count("yes") == 1 and "borderline" not in fits:
                    answer = fields, [o["id"]], o["category"]
                    break
        if answer is None:
            return None
        fields, targets, concept = answer
        phrase = ENTITY_DESCRIBE[i].format(**fields)
        key = f"entities.describe.t{i}"
        return self._make(rng, "entities", key, phrase, NP_WRAPPERS, "n", targets, neg, concept)

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
