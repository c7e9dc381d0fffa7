"""Dataset readers, runtime-identical pre-processing, augmentation, splits and bad-input handling."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from toy_data import write_toy_dataset

from converseg_core import get_config
from converseg_core.processing import preprocess
from training.augment import AugmentConfig, augment, swap_left_right
from training.datasets import ConverSegDataset, StepSampler, collate
from training.records import DatasetError, Record, SampleError, read_records
from training.sample_io import load_mask
from training.splits import split_records, unused_records

CFG = get_config("converseg_edge").replace(img_size=64)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("toy"), num_scenes=6, size=(80, 60))


def _write_pair(tmp_path, name, size=(40, 30), box=(5, 5, 20, 15)):
    img = np.full((size[1], size[0], 3), 100, np.uint8)
    mask = np.zeros((size[1], size[0]), np.uint8)
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = (200, 30, 30)
    mask[y0:y1, x0:x1] = 255
    Image.fromarray(img).save(tmp_path / f"{name}.png")
    Image.fromarray(mask).save(tmp_path / f"{name}_mask.png")
    return mask > 0


def test_data_engine_reader(toy):
    recs = read_records(toy)
    assert len(recs) == 6 * 5
    r = recs[0]
    assert r.image.is_file() and r.mask.is_file()
    assert {x.family for x in recs} == {"attribute", "spatial"}
    assert sum(x.negative for x in recs) == 6
    assert {x.template_split for x in recs} == {"seen", "heldout"}


def test_data_engine_needs_index_unless_partial(tmp_path):
    root = write_toy_dataset(tmp_path / "d", num_scenes=2)
    (root / "index.json").unlink()
    with pytest.raises(DatasetError, match="index.json"):
        read_records(root)
    with pytest.warns(UserWarning, match="index.json"):
        assert len(read_records(root, allow_partial=True)) == 10


def test_data_engine_reads_the_shards_its_index_lists(tmp_path):
    import shutil

    root = write_toy_dataset(tmp_path / "d", num_scenes=2)
    shutil.copytree(root / "shard-00000", root / "shard-00001")  # e.g. a bigger run still going
    with pytest.warns(UserWarning, match="not listed"):
        assert len(read_records(root)) == 10
    shutil.rmtree(root / "shard-00001")
    (root / "shard-00000" / "DONE").unlink()
    with pytest.raises(DatasetError, match="DONE"):
        read_records(root)


def test_jsonl_and_items_json(tmp_path):
    _write_pair(tmp_path, "a")
    line = {"image": "a.png", "mask_merged": "a_mask.png", "prompt": "the red box"}
    (tmp_path / "data.jsonl").write_text(
        json.dumps(line) + "\n\n" + json.dumps({**line, "template_split": "train"})
    )
    (tmp_path / "items.json").write_text(json.dumps({"items": [line, {**line, "prompt": "the box"}]}))
    recs = read_records(tmp_path / "data.jsonl")
    assert [r.prompt for r in recs] == ["the red box"] * 2
    assert [r.template_split for r in recs] == [
        None,
        "seen",
    ]  # the data engine's "train" phrasings are "seen"
    recs = read_records(tmp_path / "items.json")
    assert len(recs) == 2 and recs[1].mask == tmp_path / "a_mask.png"
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "prompt": "x"}\n')
    with pytest.raises(DatasetError, match="mask_merged"):
        read_records(tmp_path / "bad.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DatasetError, match="empty"):
        read_records(tmp_path / "empty.jsonl")


def _rle_string(counts):
    """pycocotools' rleToString, for a round trip through our decoder."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def test_coco_polygon_rle_and_negative(tmp_path):
    expected = _write_pair(tmp_path, "c", size=(40, 30), box=(5, 5, 20, 15))
    flat = np.zeros(30 * 40, bool)
    col_major = np.zeros((30, 40), bool)
    col_major[2:4, 30:33] = True  # a small second object, encoded column-major as COCO does
    flat = col_major.T.reshape(-1)
    counts, val, run = [], False, 0
    for v in flat:
        if v != val:
            counts.append(run)
            val, run = v, 0
        run += 1
    counts.append(run)
    coco = {
        "images": [{"id": 7, "file_name": "c.png", "width": 40, "height": 30}],
        "annotations": [
            {"id": 1, "image_id": 7, "segmentation": [[5, 5, 20, 5, 20, 15, 5, 15]]},
            {"id": 2, "image_id": 7, "segmentation": {"size": [30, 40], "counts": _rle_string(counts)}},
            {"id": 3, "image_id": 7, "segmentation": {"size": [30, 40], "counts": counts}},
        ],
        "prompts": [
            {"image_id": 7, "prompt": "the red box", "annotation_ids": [1], "template_split": "train"},
            {"image_id": 7, "prompt": "both things", "annotation_ids": [2]},
            {"image_id": 7, "prompt": "uncompressed", "annotation_ids": [3]},
            {"image_id": 7, "prompt": "the giraffe", "annotation_ids": []},
        ],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    recs = read_records(tmp_path / "coco.json")
    poly = recs[0].mask(30, 40)
    # PIL fills polygon edges inclusively: the box plus its border row/column.
    assert poly[5:15, 5:20].all() and poly.sum() <= (expected.sum() + 16 + 11)
    assert np.array_equal(recs[1].mask(30, 40), col_major)
    assert np.array_equal(recs[2].mask(30, 40), col_major)
    assert recs[3].negative and recs[3].mask is None
    # the data engine's "train" phrasings are "seen" in every reader, so held-out gaps are computed
    assert recs[0].template_split == "seen" and recs[1].template_split is None


def test_item_is_preprocessed_like_the_runtime(toy):
    recs = read_records(toy)
    ds = ConverSegDataset(recs, CFG, full_res=True)
    item = ds[0]
    raw = np.asarray(Image.open(recs[0].image).convert("RGB"))
    ref = preprocess(raw, img_size=64, pixel_mean=CFG.pixel_mean, pixel_std=CFG.pixel_std)
    assert torch.equal(item["image"], torch.from_numpy(ref.tensor[0]))
    assert item["mask_low"].shape == (1, 1, CFG.low_res_size, CFG.low_res_size)
    assert item["mask_full"].shape == (1, 1, 64, 64)
    assert item["valid_hw"] == ref.input_size == (48, 64)
    assert item["mask_full"][0, 0, 48:].sum() == 0  # padding is background
    assert item["presence"].tolist() == [1.0] and item["prompt"] == [recs[0].prompt]
    neg = next(i for i, r in enumerate(recs) if r.negative)
    assert ds[neg]["presence"].tolist() == [0.0] and ds[neg]["mask_low"].sum() == 0


def test_several_queries_per_image_share_one_image(toy):
    recs = read_records(toy)
    ds = ConverSegDataset(recs, CFG, queries_per_image=3, augment_cfg=AugmentConfig(flip_prob=1.0))
    assert len(ds) == 6  # one item per scene
    batch = collate([ds[(0, 0)], ds[(1, 0)]])
    assert batch["image"].shape == (2, 3, 64, 64)
    assert batch["image_index"].tolist() == [0, 0, 0, 1, 1, 1]
    assert batch["mask_low"].shape == (6, 1, 16, 16) and len(batch["prompt"]) == 6
    assert all(recs[i].image == recs[batch["index"][0]].image for i in batch["index"][:3])
    # flipped: every request about the image is mirrored consistently
    assert batch["prompt"] == [swap_left_right(recs[i].prompt) for i in batch["index"]]
    assert ds[(0, 0)]["index"] == ds[(0, 0)]["index"]  # same draw, same requests


def test_token_ids_from_the_query_tokenizer(toy):
    from converseg_core.tokenizer import QueryTokenizer

    tok = QueryTokenizer.default()
    recs = read_records(toy)
    ds = ConverSegDataset(recs, CFG, queries_per_image=2, tokenizer=tok)
    batch = collate([ds[0], ds[1]])
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].dtype == torch.int64
    ref = tok.encode(batch["prompt"], CFG.max_query_tokens)
    assert torch.equal(batch["attention_mask"], torch.from_numpy(ref.attention_mask))
    assert torch.equal(batch["input_ids"], torch.from_numpy(ref.input_ids))


def test_flip_swaps_left_and_right():
    assert (
        swap_left_right("the cup LEFT of the Right plate, leftmost")
        == "the cup RIGHT of the Left plate, rightmost"
    )
    assert swap_left_right("left-hand drawer") == "right-hand drawer"
    assert swap_left_right("the bright lamp") == "the bright lamp"
    img = np.zeros((4, 6, 3), np.uint8)
    mask = np.zeros((4, 6), bool)
    mask[:, 0] = True
    cfg = AugmentConfig(crop_prob=0, flip_prob=1, brightness=0, contrast=0, saturation=0)
    _, (m2,), (p2,) = augment(np.random.default_rng(0), img, [mask], ["the thing on the left"], cfg)
    assert m2[:, -1].all() and not m2[:, 0].any() and p2 == "the thing on the right"


def test_crop_keeps_the_target():
    rng = np.random.default_rng(0)
    img = np.zeros((50, 60, 3), np.uint8)
    mask = np.zeros((50, 60), bool)
    mask[40:48, 50:58] = True
    cfg = AugmentConfig(crop_prob=1, min_crop=0.5, flip_prob=0)
    for _ in range(20):
        i2, (m2,), _ = augment(rng, img, [mask], ["x"], cfg)
        assert m2.shape == i2.shape[:2] and m2.sum() >= 0.9 * mask.sum()


def test_bad_samples_are_counted_or_raised(tmp_path):
    _write_pair(tmp_path, "ok")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "small_mask.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    lines = [
        {"image": "ok.png", "mask_merged": "ok_mask.png", "prompt": "fine"},
        {"image": "corrupt.png", "mask_merged": "ok_mask.png", "prompt": "corrupt image"},
        {"image": "ok.png", "mask_merged": "small_mask.png", "prompt": "size mismatch"},
        {"image": "ok.png", "mask_merged": "missing.png", "prompt": "missing mask"},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    recs = read_records(tmp_path / "d.jsonl")
    batch = collate([ConverSegDataset(recs, CFG)[i] for i in range(4)])
    assert batch["num_skipped"] == 3 and batch["image"].shape[0] == 1
    # grouped by image: the bad masks of ok.png are dropped and counted, the good request stays
    grouped = ConverSegDataset(recs, CFG, queries_per_image=4)
    batch = collate([grouped[i] for i in range(len(grouped))])
    assert batch["prompt"] == ["fine"] and batch["num_skipped"] == 3
    strict = ConverSegDataset(recs, CFG, on_bad="error")
    with pytest.raises(SampleError, match="differs from image"):
        strict[2]
    with pytest.raises(SampleError, match="cannot be read as an image"):
        strict[1]
    assert collate([None, None]) == {"num_skipped": 2, "empty": True}
    with pytest.raises(DatasetError, match="empty"):
        ConverSegDataset([], CFG)


def test_split_by_scene_and_heldout_templates(toy):
    recs = read_records(toy)
    train, val = split_records(recs, val_fraction=0.4, heldout_templates=["t1"])
    assert {r.scene_id for r in train}.isdisjoint({r.scene_id for r in val})
    assert all(r.template_id not in ("t1", "t2") for r in train)
    assert train and val
    # what neither side holds: held-out-template requests of training scenes, for `evaluate --split unused`
    unused = unused_records(recs, val_fraction=0.4, heldout_templates=["t1"])
    assert unused and {r.template_id for r in unused} <= {"t1", "t2"}
    assert {r.scene_id for r in unused} <= {r.scene_id for r in train}
    assert sorted(map(id, train + val + unused)) == sorted(map(id, recs))


def test_split_without_scene_ids_does_not_depend_on_how_the_data_path_was_typed(tmp_path, monkeypatch):
    """A ConverSeg JSONL has no scene ids: images decide. `data/x.jsonl`, `./data/../data/x.jsonl` and the
    absolute path must split alike, or a calibration typed differently from training uses trained images."""
    monkeypatch.chdir(tmp_path)
    names = [f"img{i:03d}.png" for i in range(200)]

    def split_with(base):
        recs = [Record(image=Path(base) / "images" / n, prompt="a cup", mask=None) for n in names]
        _, val = split_records(recs, val_fraction=0.3)
        return sorted(r.image.name for r in val)

    val = split_with("data")
    assert 20 < len(val) < 100
    assert split_with("./data/../data") == val
    assert split_with(tmp_path / "data") == val


def test_step_sampler_resumes_and_shards():
    full = StepSampler(10, batch_size=3, seed=1)
    it = iter(full)
    seq = [next(it) for _ in range(30)]
    resumed = iter(StepSampler(10, batch_size=3, seed=1, start_step=4))
    assert [next(resumed) for _ in range(18)] == seq[12:]
    r0 = iter(StepSampler(10, batch_size=1, seed=1, rank=0, world=2))
    r1 = iter(StepSampler(10, batch_size=1, seed=1, rank=1, world=2))
    a, b = {next(r0)[0] for _ in range(5)}, {next(r1)[0] for _ in range(5)}
    assert a.isdisjoint(b) and len(a | b) == 10


@pytest.mark.parametrize("value", [1, 100, 127, 128, 255])
def test_every_non_zero_mask_value_is_target(tmp_path, value):
    """docs/TRAINING.md: non-zero is target, whatever the mask's maximum (a 0/100 mask is not an "empty
    positive" to skip)."""
    want = _write_pair(tmp_path, "a")
    Image.fromarray(want.astype(np.uint8) * value).save(tmp_path / "a_mask.png")
    (tmp_path / "d.jsonl").write_text(
        json.dumps({"image": "a.png", "mask_merged": "a_mask.png", "prompt": "x"})
    )
    (record,) = read_records(tmp_path / "d.jsonl")
    assert np.array_equal(load_mask(record, *want.shape), want)
    item = ConverSegDataset([record], CFG, on_bad="error")[0]
    assert item["num_bad"] == 0 and item["presence"].tolist() == [1.0]
