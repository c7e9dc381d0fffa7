"""training.average: weighted means of checkpoints of one architecture, uncalibrated, loud on mismatches."""

import pytest
import torch

from converseg_core import CheckpointError, build_model, load_checkpoint, save_checkpoint
from training.average import AverageConfig, average, main

SMALL = 64


def _save(tmp_path, name, seed, **overrides):
    torch.manual_seed(seed)
    model = build_model("converseg_edge", img_size=SMALL, pretrained_text=False, **overrides)
    # Give BatchNorm counters distinct values, as two training runs would.
    for value in model.state_dict().values():
        if not value.is_floating_point():
            value.fill_(seed + 1)
    path = tmp_path / f"{name}.pt"
    save_checkpoint(model, path, meta={"presence_calibration": {"presence_threshold": 0.8}})
    return path


@pytest.fixture
def pair(tmp_path):
    return _save(tmp_path, "a", 0, presence_threshold=0.8), _save(tmp_path, "b", 1, presence_threshold=0.75)


def test_weighted_mean_of_every_float_tensor_and_counters_from_the_first(pair, tmp_path):
    a, b = pair
    out = average(
        AverageConfig(checkpoints=[str(a), str(b)], out=str(tmp_path / "ab.pt"), weights=[0.25, 0.75])
    )
    sa, sb, avg = (load_checkpoint(p) for p in (a, b, out))
    floats = [k for k, v in sa.state_dict.items() if v.is_floating_point()]
    ints = [k for k, v in sa.state_dict.items() if not v.is_floating_point()]
    assert floats and ints
    differing = 0
    for key in floats:
        expected = 0.25 * sa.state_dict[key] + 0.75 * sb.state_dict[key]
        torch.testing.assert_close(avg.state_dict[key], expected, rtol=1e-6, atol=1e-7)
        differing += not torch.equal(sa.state_dict[key], sb.state_dict[key])
    assert differing > len(floats) // 2, "the two inputs should differ, or the test proves nothing"
    for key in ints:
        assert torch.equal(avg.state_dict[key], sa.state_dict[key])
        assert not torch.equal(avg.state_dict[key], sb.state_dict[key])
    # The presence rule of neither input carries over; the average loads as a model.
    assert avg.config.presence_threshold == 0.5 and avg.config.presence_score_weight == 0.0
    assert "presence_calibration" not in avg.meta
    assert [m["weight"] for m in avg.meta["averaged_from"]] == [0.25, 0.75]
    model = build_model(checkpoint=out, pretrained_text=False)
    assert model.config.img_size == SMALL


def test_equal_weights_by_default(pair, tmp_path):
    a, b = pair
    out = average(AverageConfig(checkpoints=[str(a), str(b)], out=str(tmp_path / "ab.pt")))
    sa, sb, avg = (load_checkpoint(p) for p in (a, b, out))
    key = next(k for k, v in sa.state_dict.items() if v.is_floating_point() and v.numel() > 1)
    torch.testing.assert_close(avg.state_dict[key], (sa.state_dict[key] + sb.state_dict[key]) / 2)


def test_another_architecture_is_refused_by_name(pair, tmp_path):
    a, _ = pair
    other = _save(tmp_path, "wide", 2, mask_presence=True)
    with pytest.raises(CheckpointError, match=r"wide\.pt.*mask_presence"):
        average(AverageConfig(checkpoints=[str(a), str(other)], out=str(tmp_path / "x.pt")))
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize(
    "weights, message",
    [
        ([0.5], "1 weights for 2 checkpoints"),
        ([0.7, 0.7], "sum to 1"),
        ([1.5, -0.5], "non-negative"),
        ([float("nan"), 1.0], "finite"),
    ],
)
def test_bad_weights_are_refused(pair, tmp_path, weights, message):
    a, b = pair
    with pytest.raises(ValueError, match=message):
        average(AverageConfig(checkpoints=[str(a), str(b)], out=str(tmp_path / "x.pt"), weights=weights))


def test_non_finite_weights_in_an_input_are_refused(pair, tmp_path):
    a, b = pair
    ckpt = torch.load(b, weights_only=True)
    key = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][key].view(-1)[0] = float("nan")
    torch.save(ckpt, b)
    with pytest.raises(CheckpointError, match="not finite"):
        average(AverageConfig(checkpoints=[str(a), str(b)], out=str(tmp_path / "x.pt")))


def test_cli_errors_are_one_line_and_inputs_are_never_overwritten(pair, tmp_path, capsys):
    a, b = pair
    before = a.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoints", str(a), str(b), "--out", str(a)])
    assert exit_info.value.code == 2
    assert "is one of the inputs" in capsys.readouterr().err
    assert a.read_bytes() == before
    with pytest.raises(SystemExit):
        main(["--checkpoints", str(a), "--out", str(tmp_path / "one.pt")])
    assert "at least two checkpoints" in capsys.readouterr().err
