"""Request anchoring: the phrasing memory file, the Segmenter's substitution, its cache, and its copies."""

import gzip

import numpy as np
import pytest
import torch

from converseg_core import Segmenter, build_model
from converseg_core.anchoring import (
    Phrasings,
    PhrasingsError,
    copy_sidecar,
    sidecar_path,
)
from converseg_core.checkpoint import save_checkpoint
from tests.toy_data import write_toy_dataset
from training.phrasings import main as phrasings_main
from training.phrasings import training_phrasings

SMALL = 64
DRINK = "something I can drink from"
MUG = "the red mug left of the plate"
MEMORY = Phrasings((DRINK, MUG, "whatever can cut"), (True, False, True), min_cosine=0.0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("converseg_edge", img_size=SMALL)


@pytest.fixture()
def rgb():
    return np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("CONVERSEG_CACHE", str(folder))
    return folder


def test_a_new_wording_of_a_concept_is_decoded_as_the_trained_phrasing(model, rgb):
    seg = Segmenter(model, phrasings=MEMORY)
    seg.set_image(rgb)
    anchored, own = seg.predict(["a cup I could drink from", DRINK])
    assert anchored.anchor == DRINK and own.anchor is None
    assert anchored.query == "a cup I could drink from"  # the answer still names the request
    assert anchored.presence == pytest.approx(own.presence, abs=1e-6)
    assert np.array_equal(anchored.mask, own.mask) and anchored.peak == own.peak


def test_requests_that_name_objects_keep_their_words(model, rgb):
    seg = Segmenter(model, phrasings=MEMORY)
    plain = Segmenter(model)
    for s in (seg, plain):
        s.set_image(rgb)
    got, want = (
        seg.predict(["the blue mug left of the plate"])[0],
        plain.predict(["the blue mug left of the plate"])[0],
    )
    assert got.anchor is None  # its nearest phrasing names objects: a substitute would change the names
    assert got.presence == pytest.approx(want.presence, abs=1e-6)


def test_min_cosine_keeps_distant_wordings_unanchored(model, rgb):
    strict = Phrasings(MEMORY.texts, MEMORY.concept, min_cosine=0.999)
    seg = Segmenter(model, phrasings=strict)
    seg.set_image(rgb)
    assert seg.predict(["a cup I could drink from"])[0].anchor is None


def test_the_memory_is_embedded_once_per_text_encoder(model, cache):
    first = Segmenter(model, phrasings=MEMORY)
    assert len(list(cache.glob("phrasings-*.npy"))) == 1
    second = Segmenter.__new__(Segmenter)
    calls = []
    original = first.backend.encode_text

    def counting(ids, mask):
        calls.append(ids.shape[0])
        return original(ids, mask)

    first.backend.encode_text = counting
    try:
        Segmenter.__init__(second, first.backend, phrasings=MEMORY)
    finally:
        first.backend.encode_text = original
    assert calls == [1]  # only the probe request that fingerprints the text encoder
    assert np.allclose(second._memory.embeddings, first._memory.embeddings, atol=1e-3)


def test_a_damaged_cache_file_is_embedded_again(model, cache, rgb):
    Segmenter(model, phrasings=MEMORY)
    (cached,) = cache.glob("phrasings-*.npy")
    cached.write_bytes(b"not numpy")
    seg = Segmenter(model, phrasings=MEMORY)
    seg.set_image(rgb)
    assert seg.predict(["a cup I could drink from"])[0].anchor == DRINK
    assert np.load(cached).shape == (3, 384)


def test_the_memory_file_round_trips_and_refuses_damage(tmp_path):
    path = MEMORY.save(tmp_path / "m.phrasings.json.gz")
    assert Phrasings.load(path) == MEMORY
    assert path.read_bytes() == MEMORY.to_bytes()  # the same memory, the same bytes (the cache key)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(PhrasingsError, match="training.phrasings build"):
        Phrasings.load(path)
    path.write_bytes(gzip.compress(b'{"format": "something else"}'))
    with pytest.raises(PhrasingsError, match="not a phrasing memory"):
        Phrasings.load(path)
    with pytest.raises(PhrasingsError, match="no such"):
        Phrasings.load(tmp_path / "missing.json.gz")
    with pytest.raises(PhrasingsError, match="concept flags"):
        Phrasings((DRINK,), (True, False), 0.0)
    with pytest.raises(PhrasingsError, match="repeat"):
        Phrasings((DRINK, DRINK), (True, True), 0.0)


def test_from_checkpoint_finds_the_memory_beside_the_checkpoint(model, tmp_path, rgb):
    ckpt = tmp_path / "m.pt"
    save_checkpoint(model, ckpt)
    assert Segmenter.from_checkpoint(ckpt).phrasings is None
    MEMORY.save(sidecar_path(ckpt))
    assert sidecar_path(ckpt).name == "m.phrasings.json.gz"
    seg = Segmenter.from_checkpoint(ckpt)
    seg.set_image(rgb)
    assert seg.predict(["a cup I could drink from"])[0].anchor == DRINK
    assert Segmenter.from_checkpoint(ckpt, anchoring=False).phrasings is None
    with pytest.raises(PhrasingsError, match="no such"):
        Segmenter.from_checkpoint(ckpt, anchoring=tmp_path / "other.json.gz")


def test_copies_follow_the_source_and_stale_memories_go(tmp_path):
    src, dst = tmp_path / "a.pt", tmp_path / "b.pt"
    MEMORY.save(sidecar_path(src))
    assert copy_sidecar(src, dst) == sidecar_path(dst)
    assert Phrasings.load(sidecar_path(dst)) == MEMORY
    folder = tmp_path / "onnx"
    folder.mkdir()
    assert copy_sidecar(dst, folder) == folder / "phrasings.json.gz"
    sidecar_path(src).unlink()
    assert copy_sidecar(src, dst) is None and not sidecar_path(dst).exists()
    sidecar_path(src).write_bytes(b"broken")
    with pytest.raises(PhrasingsError):
        copy_sidecar(src, dst)


def test_the_memory_holds_the_training_side_phrasings_only(tmp_path):
    data = write_toy_dataset(tmp_path / "toy", num_scenes=12)
    memory = training_phrasings([data], val_fraction=0.0, min_cosine=0.5)
    flags = dict(zip(memory.texts, memory.concept, strict=True))
    assert "the object on the right" not in flags  # a held-out template never enters it
    assert flags["the object on the left"] is False  # spatial requests name objects
    assert all(flags[t] for t in flags if t.startswith("the ") and "object" not in t)
    out = tmp_path / "m.phrasings.json.gz"
    assert phrasings_main(["build", "--data", str(data), "--out", str(out), "--min-cosine", "0.5"]) == 0
    assert Phrasings.load(out) == memory
    assert phrasings_main(["build", "--data", str(tmp_path / "nothing"), "--out", str(out)]) == 2


def test_the_cli_names_the_anchor_and_can_switch_it_off(model, tmp_path, rgb, capsys):
    import json

    from PIL import Image

    from converseg_core.cli import main as cli_main

    ckpt, image = tmp_path / "m.pt", tmp_path / "in.png"
    save_checkpoint(model, ckpt)
    MEMORY.save(sidecar_path(ckpt))
    Image.fromarray(rgb).save(image)
    common = [
        "segment",
        "--image",
        str(image),
        "--query",
        "a cup I could drink from",
        "--checkpoint",
        str(ckpt),
    ]
    assert cli_main([*common, "--out", str(tmp_path / "a.png")]) == 0
    assert json.loads(capsys.readouterr().out)[0]["anchor"] == DRINK
    assert cli_main([*common, "--out", str(tmp_path / "b.png"), "--no-anchoring"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["anchor"] is None


def test_an_export_carries_the_memory_and_anchors_through_onnx_runtime(model, tmp_path, rgb):
    from converseg_export.export_onnx import main as export_main

    ckpt = save_checkpoint(model, tmp_path / "m.pt")
    MEMORY.save(sidecar_path(ckpt))
    out = tmp_path / "onnx"
    assert export_main(["--checkpoint", str(ckpt), "--out", str(out), "--threads", "1"]) == 0
    assert Phrasings.load(out / "phrasings.json.gz") == MEMORY
    seg = Segmenter.from_checkpoint(out, backend="onnxruntime")
    seg.set_image(rgb)
    assert seg.predict(["a cup I could drink from"])[0].anchor == DRINK
    sidecar_path(ckpt).unlink()  # exporting again from a checkpoint without one leaves no stale memory
    assert export_main(["--checkpoint", str(ckpt), "--out", str(out), "--threads", "1"]) == 0
    assert not (out / "phrasings.json.gz").exists()
