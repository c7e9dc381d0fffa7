"""How close are the held-out phrasings to the training phrasings? A check for new knowledge-base phrases.

For every held-out phrase of the vocab (`prompts.template_split`), the cosine similarity of its MiniLM
sentence embedding (mean of the token features) to the nearest *training* phrase of the same concept.
Given a baseline knowledge base as well, it compares the two per held-out phrase of the baseline, so a
change that adds phrasings shows whether it also made the held-out test easier (a new training phrase that
nearly repeats a held-out one), and names the phrase responsible:

    git show HEAD~1:training/dataengine/knowledge_base.json > /tmp/kb_old.json
    python -m training.dataengine.phrase_similarity --baseline-kb /tmp/kb_old.json --families functions intent

The comparison needs append-only edits (a phrase's key is its index): a baseline phrase whose key now holds
other text is an error. `--counts` prints how many distinct phrasings (template and vocab phrase keys) each
family has in each split, without loading MiniLM:

    python -m training.dataengine.phrase_similarity --counts
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .knowledge import load_knowledge_base
from .prompts import FAMILIES, VOCAB_FAMILIES, phrase_groups, template_split

Embed = Callable[[Sequence[str]], np.ndarray]  # texts -> N x D unit vectors


@dataclass
class Neighbour:
    key: str  # "intent.drinking.p0"
    phrase: str
    baseline: float | None  # nearest training phrase's cosine in the baseline vocab
    current: float  # ... in the current vocab
    nearest: str  # that training phrase, in the current vocab


def _phrases(vocab: dict, families: Sequence[str]) -> dict[str, dict[str, str]]:
    """concept group ("intent.drinking") -> {phrase key: phrase} for the chosen families."""
    out = {}
    for section, fam in VOCAB_FAMILIES.items():
        if fam in families:
            for concept, phrases in vocab[section].items():
                out[f"{fam}.{concept}"] = {f"{fam}.{concept}.p{j}": p for j, p in enumerate(phrases)}
    return out


def heldout_neighbours(
    vocab: dict, embed: Embed, families: Sequence[str], baseline_vocab: dict | None = None
) -> list[Neighbour]:
    """One row per held-out phrase (of the baseline when given, else of `vocab`)."""
    cur = _phrases(vocab, families)
    base = _phrases(baseline_vocab, families) if baseline_vocab is not None else cur
    rows = []
    for group, keyed in base.items():
        if group not in cur:
            raise SystemExit(f"{group}: in the baseline vocab, not in the current one")
        for key, phrase in keyed.items():
            if cur[group].get(key) != phrase:
                raise SystemExit(
                    f"{key}: {phrase!r} in the baseline, {cur[group].get(key)!r} now; phrases must be "
                    "appended, never inserted, removed or edited (a key is an index)"
                )
        held = {k: p for k, p in keyed.items() if template_split(k) == "heldout"}
        if not held:
            continue
        train_cur = [p for k, p in cur[group].items() if template_split(k) == "train"]
        train_base = [p for k, p in keyed.items() if template_split(k) == "train"]
        e_held = embed(list(held.values()))  # each text embedded once per concept
        sim_cur = e_held @ embed(train_cur).T
        sim_base = e_held @ embed(train_base).T if baseline_vocab is not None else None
        for n, (key, phrase) in enumerate(held.items()):
            i = int(sim_cur[n].argmax())
            before = float(sim_base[n].max()) if sim_base is not None else None
            rows.append(Neighbour(key, phrase, before, float(sim_cur[n, i]), train_cur[i]))
    return rows


def minilm_embedder() -> Embed:
    import torch

    from converseg_core.modeling.text_encoder import build_text_encoder
    from converseg_core.tokenizer import QueryTokenizer

    tok, enc = QueryTokenizer.default(), build_text_encoder().eval()

    def embed(texts: Sequence[str]) -> np.ndarray:
        t = tok.encode(list(texts), 64)
        mask = torch.as_tensor(t.attention_mask)
        with torch.no_grad():
            h = enc(torch.as_tensor(t.input_ids), mask)
        m = mask[..., None].float()
        e = (h * m).sum(1) / m.sum(1)
        return torch.nn.functional.normalize(e, dim=-1).numpy()

    return embed


def report(rows: list[Neighbour], raised_above: float) -> str:
    lines = [f"{len(rows)} held-out phrases"]
    cur = [r.current for r in rows]
    if rows and rows[0].baseline is not None:
        base = [r.baseline for r in rows]
        lines.append(
            f"median nearest-training cosine: baseline {statistics.median(base):.3f}, "
            f"now {statistics.median(cur):.3f}; max now {max(cur):.3f}"
        )
        raised = [r for r in rows if r.current > raised_above and r.current > r.baseline + 1e-6]
        lines.append(f"raised above {raised_above} by the change: {len(raised)}")
        lines += [
            f"  {r.key} {r.phrase!r}: {r.baseline:.3f} -> {r.current:.3f} by {r.nearest!r}" for r in raised
        ]
    elif rows:
        lines.append(f"median nearest-training cosine {statistics.median(cur):.3f}; max {max(cur):.3f}")
    return "\n".join(lines)


def phrasing_counts(kb_path: Path) -> dict[str, dict[str, int]]:
    """family -> {"train": n, "heldout": n}: distinct phrase keys (prompts.py templates and vocab phrases)."""
    out = {f: {"train": 0, "heldout": 0} for f in FAMILIES}
    for group, keys in phrase_groups(load_knowledge_base(kb_path)).items():
        for k in keys:
            out[group.split(".")[0]][template_split(k)] += 1
    return out


def counts_report(counts: dict[str, dict[str, int]]) -> str:
    lines = ["| family | seen | held-out |", "|---|---:|---:|"]
    lines += [f"| {f} | {c['train']} | {c['heldout']} |" for f, c in counts.items()]
    tr, ho = (sum(c[s] for c in counts.values()) for s in ("train", "heldout"))
    return "\n".join([*lines, f"| all | {tr} | {ho} |"])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_kb = Path(__file__).with_name("knowledge_base.json")
    ap.add_argument("--kb", type=Path, default=default_kb, help="knowledge base to measure (default: ours)")
    ap.add_argument(
        "--baseline-kb", type=Path, help="an earlier knowledge base: compare its held-out phrases in both"
    )
    ap.add_argument(
        "--families",
        nargs="+",
        default=sorted(VOCAB_FAMILIES.values()),
        choices=sorted(VOCAB_FAMILIES.values()),
        help="vocab families to measure (default: all five vocab families)",
    )
    ap.add_argument(
        "--raised-above",
        type=float,
        default=0.85,
        help="list held-out phrases the change brought above this cosine to a training phrase",
    )
    ap.add_argument("--json", type=Path, help="also write every row here")
    ap.add_argument(
        "--counts",
        action="store_true",
        help="only print distinct phrasings per family and split (templates and vocab of --kb; no MiniLM)",
    )
    return ap


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.counts:
        print(counts_report(phrasing_counts(args.kb)))
        return
    vocab = json.loads(args.kb.read_text())["vocab"]
    base = json.loads(args.baseline_kb.read_text())["vocab"] if args.baseline_kb else None
    rows = heldout_neighbours(vocab, minilm_embedder(), args.families, base)
    print(report(rows, args.raised_above))
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1))


if __name__ == "__main__":
    main()
