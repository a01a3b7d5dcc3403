"""Head statistics (subjoiner score, attention to the first position and to the previous token).

The reference reads attention probabilities from Hugging Face's output_attentions, one unpadded row
at a time, finds each word by walking back over the decoded token strings in plain Python, and
averages in float64 numpy. A planted GPT-2 head (learned positions built to point at the previous
token) and a hand-built probability tensor with scores worked out by hand check the definition.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sqlalchemy import func, select
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

from atlas.metrics.heads import HeadStatsAccumulator, head_sums, word_flags, word_positions
from atlas.modeling import load_model
from atlas.registry import register_dataset, register_model
from atlas.store.schema import HeadStat, Job
from ingest.datasets import tokenize
from ingest.heads import HeadsConfig, measure, run, vocabulary_flags
from ingest.next_token import ScoredBatch
from tests.tiny import ARCHITECTURES, CONTEXT, build_tiny_model, docstring_texts, write_docs_jsonl

N_TOKENS, CTX = 900, CONTEXT + 64
COLUMNS = ("subjoiner", "subjoiner_attn", "subjoiner_baseline", "attn_first", "attn_prev")


# -- the independent reference -----------------------------------------------------------------------

def reference_sums(attentions: list[np.ndarray], strings: list[str], counted: list[bool]) -> dict:
    """Per layer, lists of per-head values (arrays [heads]) of one row, from probs [heads, q, k] per layer."""
    def alpha(t):
        body = strings[t][1:] if strings[t].startswith(" ") else strings[t]
        return counted[t] and body.isalpha()

    def starts(t):
        return counted[t] and strings[t].startswith(" ") and strings[t][1:].isalpha()

    n = len(strings)
    words = {}  # continuation q -> its earlier same-word positions
    for q in range(1, n):
        if counted[q] and strings[q].isalpha() and alpha(q - 1):
            j = q - 1
            earlier = [j]
            while not starts(j) and j >= 1 and alpha(j - 1):
                j -= 1
                earlier.append(j)
            words[q] = earlier
    out = []
    for probs in attentions:
        layer = {"cont": [(len(e), probs[:, q, e].sum(-1)) for q, e in words.items()], "starts": {},
                 "first": [probs[:, q, 0] for q in range(n) if counted[q]],
                 "prev": [probs[:, q, q - 1] for q in range(1, n) if counted[q]]}
        for p in range(n):
            for m in range(1, p + 1):
                if starts(p) and all(counted[p - m: p]):
                    layer["starts"].setdefault(m, []).append(probs[:, p, p - m: p].sum(-1))
        out.append(layer)
    return out


def reference_means(rows: list[list[dict]]) -> list[dict[str, np.ndarray]]:
    """Per layer, the five statistics per head, pooling the rows' values."""
    means = []
    for layer in range(len(rows[0])):
        cont = [c for row in rows for c in row[layer]["cont"]]
        starts: dict[int, list] = {}
        for row in rows:
            for m, values in row[layer]["starts"].items():
                starts.setdefault(m, []).extend(values)
        attn = np.mean([v for _, v in cont], axis=0)
        baseline = np.mean([np.mean(starts[m], axis=0) for m, _ in cont], axis=0)
        means.append({"subjoiner": attn - baseline, "subjoiner_attn": attn, "subjoiner_baseline": baseline,
                      "attn_first": np.mean([v for row in rows for v in row[layer]["first"]], axis=0),
                      "attn_prev": np.mean([v for row in rows for v in row[layer]["prev"]], axis=0),
                      "n_continuations": len(cont)})
    return means


def reference_row(model, tokenizer, ids: np.ndarray) -> list[dict]:
    ids = ids[:CONTEXT]
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids)[None], output_attentions=True)
    special = set(tokenizer.all_special_ids)
    strings = [tokenizer.decode([int(i)]) for i in ids]
    return reference_sums([a[0].double().numpy() for a in out.attentions], strings, [int(i) not in special for i in ids])


def eager(directory):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()


# -- pure parts --------------------------------------------------------------------------------------

def test_word_flags_read_leading_spaces_and_letters():
    starts, continues = word_flags([" the", "ing", " 12", ".", "the", " ", "  a", "é", " Über"])
    assert starts.tolist() == [True, False, False, False, False, False, False, False, True]
    assert continues.tolist() == [False, True, False, False, True, False, False, True, False]
    assert not word_flags(["the", "ing"])[1].any()  # no visible word starts: no boundaries, no continuation


def test_hand_built_attention_gives_the_scores_worked_out_by_hand():
    # position: 0 BOS, 1 " un", 2 "believ", 3 "able", 4 " dog", 5 "s", 6 "."
    starts, continues = word_flags(["<|endoftext|>", " un", "believ", "able", " dog", "s", "."])
    ids = torch.arange(7)[None]
    counted = ids != 0
    words = word_positions(torch.from_numpy(starts)[ids], torch.from_numpy(continues)[ids], counted)
    assert words.prefix.tolist() == [[0, 0, 1, 2, 0, 1, 0]] and words.longest_prefix == 2
    n = 7
    subjoiner = torch.zeros(n, n, dtype=torch.float64)  # continuations spread over their word's earlier tokens, the rest on BOS
    for q in range(n):
        earlier = {2: [1], 3: [1, 2], 5: [4]}.get(q, [0])
        subjoiner[q, earlier] = 1 / len(earlier)
    previous = torch.eye(n, dtype=torch.float64).roll(-1, dims=1).tril()
    previous[0, 0] = 1
    uniform = torch.ones(n, n, dtype=torch.float64).tril() / torch.arange(1, n + 1)[:, None]
    probs = torch.stack([subjoiner, previous, uniform])[None]
    sums = HeadStatsAccumulator(words.longest_prefix)
    sums.add_positions(words)
    sums.add_layer(0, head_sums(probs, words, words.longest_prefix))
    got = sums.results()
    # continuations m = 1, 2, 1; the only word start with room is p = 4 (p = 1 follows BOS)
    harmonic = sum(1 / (q + 1) for q in range(1, 7)) / 6
    expected = {
        "subjoiner_attn": [1, 1, (1 / 3 + 2 / 4 + 1 / 6) / 3],
        "subjoiner_baseline": [0, 1, (2 * (1 / 5) + 2 / 5) / 3],
        "subjoiner": [1, 0, 1 / 3 - 4 / 15],
        "attn_first": [3 / 6, 1 / 6, harmonic],
        "attn_prev": [3.5 / 6, 1, harmonic],
    }
    for name, values in expected.items():
        np.testing.assert_allclose(got[name], values, rtol=1e-12, atol=1e-15, err_msg=name)
    assert got["n_continuations"] == [3, 3, 3]


def test_planted_previous_token_head_scores_no_subjoining(tiny_tokenizer_dir, tmp_path):
    """Layer 0 head 0 of a tiny GPT-2 is built to attend to the previous token: its attention at position p
    matches learned position embeddings rotated by one step (six frequencies), tokens carry no signal."""
    directory = build_tiny_model("gpt2", tmp_path / "planted", tokenizer_dir=tiny_tokenizer_dir)
    model = GPT2LMHeadModel.from_pretrained(directory)
    d, d_head = model.config.n_embd, model.config.n_embd // model.config.n_head
    omegas = 2 * math.pi / torch.tensor([3.0, 5.0, 7.0, 11.0, 13.0, 17.0])
    positions = torch.arange(model.config.n_positions, dtype=torch.float32)[:, None]
    with torch.no_grad():
        code = torch.stack([torch.cos(omegas * positions), torch.sin(omegas * positions)], -1).reshape(-1, d_head)
        model.transformer.wte.weight.zero_()
        model.transformer.wpe.weight.zero_()
        model.transformer.wpe.weight[:, :d_head] = code
        model.transformer.wpe.weight[:, d_head: 2 * d_head] = -code  # mean zero: LayerNorm only rescales
        block = model.transformer.h[0]
        block.ln_1.weight.fill_(1.0)
        block.ln_1.bias.zero_()
        attn = block.attn.c_attn  # Conv1D: x @ W, columns q | k | v
        attn.bias.zero_()
        attn.weight[:, : 2 * d].zero_()
        rotation = torch.zeros(d_head, d_head)
        for f, omega in enumerate(omegas):  # (cos wp, sin wp) -> (cos w(p-1), sin w(p-1))
            c, s = math.cos(omega), math.sin(omega)
            rotation[2 * f: 2 * f + 2, 2 * f: 2 * f + 2] = torch.tensor([[c, -s], [s, c]])
        attn.weight[:d_head, :d_head] = 20.0 * rotation
        attn.weight[:d_head, d: d + d_head] = torch.eye(d_head)
    model.save_pretrained(directory)
    loaded = load_model(str(directory), attn_implementation="eager")
    rows, batches = padded_batches(loaded.tokenizer, docstring_texts()[3:6], length=120)
    got = measure_rows(loaded, batches)
    head = 0  # layer 0, head 0
    assert got["attn_prev"][head] > 0.99
    assert got["n_continuations"][head] > 20
    assert abs(got["subjoiner"][head]) < 0.01 < got["subjoiner_attn"][head]
    expected = reference_means([reference_row(eager(directory), loaded.tokenizer, row) for row in rows])
    for name in COLUMNS:
        np.testing.assert_allclose(got[name][:4], expected[0][name], rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_measure_equals_float64_numpy_on_every_architecture(tiny_models, arch):
    """Two padded batches of rows of different lengths, BOS first, against the reference row by row."""
    loaded = load_model(str(tiny_models[arch]), attn_implementation="eager")
    rows, batches = padded_batches(loaded.tokenizer, docstring_texts()[10:15], length=90)
    got = measure_rows(loaded, batches)
    expected = reference_means([reference_row(eager(tiny_models[arch]), loaded.tokenizer, row) for row in rows])
    n_heads = loaded.model.config.num_attention_heads
    assert got["layer"] == [l for l in range(len(expected)) for _ in range(n_heads)]
    for name in COLUMNS:
        np.testing.assert_allclose(got[name], np.concatenate([e[name] for e in expected]), rtol=1e-5, atol=1e-8,
                                   err_msg=name)
    assert set(got["n_continuations"]) == {expected[0]["n_continuations"]}


def padded_batches(tokenizer, texts: list[str], length: int) -> tuple[list[np.ndarray], list[ScoredBatch]]:
    """Rows BOS + up to `length` tokens of each text, in batches of two (right-padded), counted: non-BOS."""
    rows = [np.array([tokenizer.bos_token_id] + tokenizer(text)["input_ids"][:length]) for text in texts]
    batches = []
    for start in range(0, len(rows), 2):
        chunk = rows[start: start + 2]
        width = max(map(len, chunk))
        ids = torch.tensor(np.stack([np.pad(r, (0, width - len(r))) for r in chunk]))
        mask = (torch.arange(width)[None] < torch.tensor([len(r) for r in chunk])[:, None]).long()
        counted = mask.bool() & (ids != tokenizer.bos_token_id)
        batches.append(ScoredBatch(ids, mask, counted, torch.zeros(0), counted))
    return rows, batches


def measure_rows(loaded, batches: list[ScoredBatch]) -> dict[str, list]:
    flags = vocabulary_flags(loaded.tokenizer, "cpu")
    window = max(flags.words(b.input_ids, b.counted).longest_prefix for b in batches)
    return measure(loaded, batches, flags, window).results()


# -- the job through the store (SQLite and PostgreSQL) ---------------------------------------------

@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory):
    return write_docs_jsonl(tmp_path_factory.mktemp("docs") / "docs.jsonl")


def test_job_rows_equal_float64_numpy_and_rerun_skips(store, trained_tiny_models, docs_file):
    directory = trained_tiny_models["gpt2"]
    model_row, _ = register_model(store, str(directory), family="tiny", seed=0, name="tiny")
    dataset, _ = register_dataset(store, "docs", str(docs_file), n_tokens=N_TOKENS, ctx_len=CTX, sample_seed=1)
    config = HeadsConfig(model="tiny", dataset="docs", batch_size=3)
    run(config, store)
    with store.session() as session:
        rows = session.scalars(select(HeadStat).order_by(HeadStat.layer, HeadStat.head)).all()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    token_rows = tokenize(dataset, tokenizer)
    assert int(token_rows.lengths.max()) > CONTEXT  # rows were cut to the context
    model = eager(directory)
    n_heads = model.config.num_attention_heads
    assert [(r.layer, r.head) for r in rows] == [(l, h) for l in range(model_row.n_layers) for h in range(n_heads)]
    expected = reference_means([reference_row(model, tokenizer, token_rows.row(i)) for i in range(token_rows.n_rows)])
    for row in rows:
        for name in COLUMNS:
            np.testing.assert_allclose(getattr(row, name), expected[row.layer][name][row.head], rtol=1e-5,
                                       atol=1e-8, err_msg=f"{name} layer {row.layer} head {row.head}")
        assert row.n_continuations == expected[row.layer]["n_continuations"] > 0
    best = max(rows, key=lambda r: r.subjoiner)
    print(f"highest subjoiner {best.subjoiner:.4f} at layer {best.layer} head {best.head}; per layer max",
          [round(max(r.subjoiner for r in rows if r.layer == l), 4) for l in range(model_row.n_layers)])
    run(config, store)  # done: skipped, nothing rewritten
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Job).where(Job.kind == "heads")) == 1
        assert session.scalar(select(func.count()).select_from(HeadStat)) == len(rows)
