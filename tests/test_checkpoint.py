import pytest
import torch

from converseg_core import (
    CheckpointError,
    build_model,
    load_checkpoint,
    load_official_weights,
    save_checkpoint,
)

SMALL = 64


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("converseg_edge", img_size=SMALL, pretrained_text=False)
    path = tmp_path_factory.mktemp("ckpt") / "edge.pt"
    save_checkpoint(model, path, meta={"note": "test"})
    return model, path


def test_round_trip_restores_config_and_weights(edge):
    model, path = edge
    ckpt = load_checkpoint(path)
    assert ckpt.config == model.config
    assert ckpt.meta == {"note": "test"}
    assert not any(k.startswith("text_encoder.") for k in ckpt.state_dict), "frozen MiniLM must not be stored"
    rebuilt = build_model(checkpoint=path, pretrained_text=False)
    for key, value in model.state_dict().items():
        if not key.startswith("text_encoder."):
            assert torch.equal(value, rebuilt.state_dict()[key]), key


def test_checkpoint_of_another_variant_is_refused(edge):
    _, path = edge
    with pytest.raises(CheckpointError, match=r"edge\.pt.*'converseg_edge'.*not 'converseg_mobilesam'"):
        build_model("converseg_mobilesam", path)


def test_architecture_overrides_on_a_checkpoint_are_refused(edge):
    _, path = edge
    with pytest.raises(ValueError, match="img_size"):
        build_model(checkpoint=path, img_size=128, pretrained_text=False)
    model = build_model(checkpoint=path, presence_threshold=0.7, pretrained_text=False)
    assert model.config.presence_threshold == 0.7


def test_corrupted_and_missing_files_name_the_file(edge, tmp_path):
    _, path = edge
    broken = tmp_path / "broken.pt"
    broken.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="broken.pt.*corrupted"):
        load_checkpoint(broken)
    with pytest.raises(CheckpointError, match="nope.pt.*no such"):
        load_checkpoint(tmp_path / "nope.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt.*not a ConverSeg checkpoint"):
        load_checkpoint(foreign)


def test_tampered_weights_are_reported_with_the_keys(edge, tmp_path):
    _, path = edge
    data = torch.load(path, weights_only=True)
    key = next(k for k in data["model"] if k.startswith("fusion."))
    data["model"][key] = torch.zeros(3, 3)
    data["model"].pop(next(k for k in data["model"] if k.startswith("mask_decoder.")))
    bad = tmp_path / "tampered.pt"
    torch.save(data, bad)
    with pytest.raises(
        CheckpointError, match=r"tampered.pt.*missing keys: mask_decoder.*shape mismatches: fusion"
    ):
        build_model(checkpoint=bad, pretrained_text=False)


def test_official_style_state_dict_loads_and_mismatch_is_explained(tmp_path):
    torch.manual_seed(0)
    source = build_model("converseg_edge", img_size=SMALL, pretrained_text=False)
    official = {
        k: v
        for k, v in source.state_dict().items()
        if k.startswith(("image_encoder.", "prompt_encoder.", "mask_decoder."))
    }
    path = tmp_path / "sam_like.pth"
    torch.save(official, path)
    target = build_model("converseg_edge", img_size=SMALL, pretrained_text=False)
    loaded = load_official_weights(target, path)
    assert len(loaded) == len(official)
    for k in official:
        assert torch.equal(target.state_dict()[k], official[k])
    other = build_model("converseg_mobilesam", img_size=SMALL, pretrained_text=False)
    with pytest.raises(CheckpointError, match="sam_like.pth.*does not match converseg_mobilesam"):
        load_official_weights(other, path)


def test_config_survives_a_json_round_trip():
    import json

    from converseg_core import ConverSegConfig, get_config, list_models

    for name in list_models():
        config = get_config(name)
        assert ConverSegConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown ConverSegConfig fields"):
        ConverSegConfig.from_dict({**get_config("converseg_edge").to_dict(), "warp_drive": True})


def test_trained_minilm_layers_are_stored_and_restored_the_rest_comes_from_the_wheel(tmp_path):
    """text_trainable_layers=1: the checkpoint holds MiniLM's last layer (and no other MiniLM weight), and a
    model rebuilt from it runs that layer's trained weights; a file without the layer is refused."""
    torch.manual_seed(0)
    model = build_model("converseg_edge", img_size=SMALL, pretrained_text=False, text_trainable_layers=1)
    with torch.no_grad():
        for p in model.text_encoder.encoder.layer[5].parameters():
            p.add_(0.5)
    path = save_checkpoint(model, tmp_path / "text1.pt")
    state = load_checkpoint(path).state_dict
    text_keys = {k for k in state if k.startswith("text_encoder.")}
    assert text_keys and all(k.startswith("text_encoder.encoder.layer.5.") for k in text_keys)
    torch.manual_seed(1)  # another random MiniLM underneath: only layer 5 may come from the file
    rebuilt = build_model(checkpoint=path, pretrained_text=False)
    for k in text_keys:
        assert torch.equal(rebuilt.state_dict()[k], model.state_dict()[k]), k
    assert not torch.equal(
        rebuilt.text_encoder.encoder.layer[4].attention.self.query.weight,
        model.text_encoder.encoder.layer[4].attention.self.query.weight,
    )
    ckpt = load_checkpoint(path)
    for k in text_keys:
        del ckpt.state_dict[k]
    from converseg_core.checkpoint import write_checkpoint

    write_checkpoint(ckpt, tmp_path / "without_layer.pt")
    with pytest.raises(CheckpointError, match="missing keys: text_encoder.encoder.layer.5"):
        build_model(checkpoint=tmp_path / "without_layer.pt", pretrained_text=False)


def test_text_trainable_layers_outside_minilm_is_refused():
    with pytest.raises(ValueError, match="text_trainable_layers"):
        build_model("converseg_edge", img_size=SMALL, pretrained_text=False, text_trainable_layers=7)


class RunsCode:
    """Unpickling this creates a file: the stand-in for a checkpoint that runs code when loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture()
def pickled(tmp_path):
    path, marker = tmp_path / "untrusted.pt", tmp_path / "code_ran"
    torch.save({"format": "converseg-checkpoint", "version": 1, "model": {}, "hook": RunsCode(marker)}, path)
    return path, marker


def test_a_checkpoint_holding_pickled_code_is_refused_without_torchs_advice(pickled):
    path, marker = pickled
    with pytest.raises(CheckpointError, match=r"untrusted.pt: refused.*\(io.open\).*arbitrary code") as info:
        load_checkpoint(path)
    assert "weights_only" not in str(info.value) and info.value.__cause__ is None
    assert not marker.exists()


@pytest.mark.parametrize("script", ["train", "evaluate", "calibrate"])
def test_training_scripts_refuse_such_a_checkpoint_with_a_message_not_a_traceback(
    script, pickled, tmp_path, capsys
):
    import importlib

    from toy_data import write_toy_dataset

    path, marker = pickled
    data = str(write_toy_dataset(tmp_path / "toy", num_scenes=2, size=(40, 30)))
    argv = {
        "train": ["--data", data, "--init", str(path), "--random-text-encoder", "--num-workers", "0"],
        "evaluate": ["--data", data, "--checkpoint", str(path), "--num-panels", "0"],
        "calibrate": ["--data", data, "--checkpoint", str(path), "--split", "all"],
    }[script] + (
        ["--out-dir", str(tmp_path / "o")] if script != "calibrate" else ["--out", str(tmp_path / "o.pt")]
    )
    assert importlib.import_module(f"training.{script}").main(argv) == 1
    err = capsys.readouterr().err
    assert "untrusted.pt: refused" in err and "weights_only" not in err and "Traceback" not in err
    assert not marker.exists()
