"""Knowledge base: what each category is, affords, is for, and why it may be unsafe (data in knowledge_base.json)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import KnowledgeBaseError

KNOWLEDGE_BASE = Path(__file__).with_name("knowledge_base.json")
_REQUIRED = (
    "name",
    "plural",
    "synonyms",
    "group",
    "material",
    "mass_kg",
    "affordances",
    "functions",
    "safety",
    "physical",
    "placement",
    "recolourable",
)
# where the scene builder puts a category: on the tabletop, or standing on the floor of the room around it
PLACEMENTS = ("table", "room")
_PHYSICAL = ("rigid", "rolls", "stackable", "holds_liquid", "fits_in_hand", "support_surface")
# What makes a category hold other objects, read from its facts here and nowhere else: a support surface
# (physical flag) carries things on its top; a category that affords putting or pouring into it has an open
# inside (whether a model's inside is wide enough is measured from its mesh: scene.measure_cavity).
SUPPORT_FLAG = "support_surface"
CONTAINER_AFFORDANCES = ("put_in", "pour_into")


@dataclass(frozen=True)
class Category:
    key: str
    name: str
    plural: str
    synonyms: tuple[str, ...]
    group: str
    material: str
    mass_kg: float
    affordances: tuple[str, ...]
    functions: tuple[str, ...]
    safety: tuple[str, ...]
    physical: dict
    states: tuple[str, ...]
    placement: str  # one of PLACEMENTS
    recolourable: bool  # a material colour may be randomised and the object still looks real

    @property
    def is_support(self) -> bool:
        """Other objects may rest on top of it."""
        return bool(self.physical.get(SUPPORT_FLAG, False))

    @property
    def is_container(self) -> bool:
        """Objects may go inside it (an open top)."""
        return any(a in self.affordances for a in CONTAINER_AFFORDANCES)

    def has(self, concept: str) -> bool:
        """True if the category carries this affordance, function, safety fact or physical flag."""
        if concept == "deformable":
            return not self.physical["rigid"]
        return (
            concept in self.affordances
            or concept in self.functions
            or concept in self.safety
            or bool(self.physical.get(concept, False))
        )


@dataclass(frozen=True)
class KnowledgeBase:
    categories: dict[str, Category]
    vocab: dict[str, dict[str, list[str]]]

    def restricted_to(self, keep: set[str]) -> KnowledgeBase:
        """The same knowledge base less the categories not in `keep` (e.g. those left with no usable model
        for a run). The vocab stays whole: a concept no category carries is simply never present."""
        missing = set(self.categories) - set(keep)
        if not missing:
            return self
        cats = {k: c for k, c in self.categories.items() if k in keep}
        if not cats:
            raise KnowledgeBaseError("no knowledge-base category is left for this run")
        return KnowledgeBase(categories=cats, vocab=self.vocab)


def load_knowledge_base(path: Path = KNOWLEDGE_BASE) -> KnowledgeBase:
    """Load and check the knowledge base; a bad entry raises KnowledgeBaseError naming it."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise KnowledgeBaseError(f"cannot read knowledge base {path}: {exc}") from exc
    cats = {}
    for key, d in raw.get("categories", {}).items():
        missing = [f for f in _REQUIRED if f not in d]
        if missing:
            raise KnowledgeBaseError(f"knowledge base category {key!r} lacks fields {missing}")
        miss_phys = [f for f in _PHYSICAL if f not in d["physical"]]
        if miss_phys:
            raise KnowledgeBaseError(f"knowledge base category {key!r} lacks physical flags {miss_phys}")
        if not isinstance(d["mass_kg"], (int, float)) or d["mass_kg"] <= 0:
            raise KnowledgeBaseError(f"knowledge base category {key!r} has a bad mass_kg {d['mass_kg']!r}")
        if d["placement"] not in PLACEMENTS:
            raise KnowledgeBaseError(
                f"knowledge base category {key!r} has placement {d['placement']!r}, not one of {PLACEMENTS}"
            )
        if not isinstance(d["recolourable"], bool):
            raise KnowledgeBaseError(f"knowledge base category {key!r}: recolourable must be true or false")
        if not d["synonyms"] or not d["name"] or not d["plural"]:
            raise KnowledgeBaseError(f"knowledge base category {key!r} needs a name, a plural and a synonym")
        cats[key] = Category(
            key=key,
            name=d["name"],
            plural=d["plural"],
            synonyms=tuple(d["synonyms"]),
            group=d["group"],
            material=d["material"],
            mass_kg=float(d["mass_kg"]),
            affordances=tuple(d["affordances"]),
            functions=tuple(d["functions"]),
            safety=tuple(d["safety"]),
            physical=dict(d["physical"]),
            states=tuple(d.get("states", ())),
            placement=d["placement"],
            recolourable=d["recolourable"],
        )
    if not cats:
        raise KnowledgeBaseError(f"knowledge base {path} has no categories")
    vocab = raw.get("vocab", {})
    for fam in ("affordances", "functions", "intents", "safety", "physical"):
        if fam not in vocab:
            raise KnowledgeBaseError(f"knowledge base {path} lacks vocab section {fam!r}")
    used = set()
    for c in cats.values():
        used |= (
            set(c.affordances) | set(c.functions) | set(c.safety) | {k for k, v in c.physical.items() if v}
        )
    used |= {"deformable", "heaviest", "lightest", "tallest", "largest", "smallest"}
    for fam in ("affordances", "functions", "intents", "safety", "physical"):
        for concept in vocab[fam]:
            if concept not in used:
                raise KnowledgeBaseError(
                    f"vocab {fam}.{concept} is carried by no category in the knowledge base"
                )
    return KnowledgeBase(categories=cats, vocab=vocab)
