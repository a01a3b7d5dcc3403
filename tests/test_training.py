"""Seed-family training on a miniature GPT-2 and real standard-library docstrings."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, GPT2LMHeadModel

from atlas.data.docstrings import collect_docstrings
from atlas.devices import resolve_device
from atlas.errors import AtlasError
from atlas.training.train import lr_at
from atlas.training import (
    TrainConfig,
    pack_rows,
    prepare_corpus,
    split_documents,
    train_bpe_tokenizer,
    train_seed,
    unigram_entropy,
)

CORPUS_BYTES = 120_000
VOCAB_SIZE = 400
MINI = TrainConfig(
    layers=2, d_model=32, d_mlp=48, n_heads=2, ctx=32, steps=24, batch_size=8, lr=3e-3,
    warmup_steps=4, eval_every=8, heldout_tokens=1024, max_seconds=None,
)


def stdlib_docstrings(max_bytes: int) -> list[str]:
    """The first documents of builtin:docstrings (the standard library comes first), not cached."""
    return collect_docstrings(max_bytes=max_bytes, use_cache=False).documents


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return stdlib_docstrings(CORPUS_BYTES)


@pytest.fixture(scope="module")
def tokenizer(texts, tmp_path_factory):
    return train_bpe_tokenizer(texts, VOCAB_SIZE, tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def corpus(texts, tokenizer):
    return prepare_corpus(texts, tokenizer, ctx=MINI.ctx, heldout_fraction=0.1)


@pytest.fixture(scope="module")
def family(corpus, tokenizer, tmp_path_factory):
    """Seed 1 twice and seed 2 once, on the same rows."""
    root = tmp_path_factory.mktemp("family")
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        result = train_seed(MINI, seed, corpus.train_rows, corpus.heldout_rows, root / name, tokenizer)
        runs[name] = (result, load_file(root / name / "model.safetensors"), root / name)
    return runs


def test_tokenizer_is_deterministic_and_saved(texts, tokenizer, tmp_path):
    again = train_bpe_tokenizer(texts, VOCAB_SIZE, tmp_path)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    sample = texts[3]
    assert loaded.decode(loaded(sample)["input_ids"]) == sample  # byte-level: lossless


def test_tokenizer_rejects_a_vocabulary_smaller_than_the_bytes(texts, tmp_path):
    with pytest.raises(AtlasError, match="vocab_size"):
        train_bpe_tokenizer(texts, 100, tmp_path)


def test_split_is_disjoint_and_independent_of_anything_but_the_texts(texts):
    train, heldout = split_documents(texts, 0.1)
    assert len(train) + len(heldout) == len(texts)
    assert set(train).isdisjoint(heldout)
    assert 0.05 < len(heldout) / len(texts) < 0.15
    assert split_documents(texts, 0.1) == (train, heldout)
    # a document's side depends on its text alone: not on the rest of the corpus, not on repeats
    _, heldout_of_half = split_documents(texts[::2], 0.1)
    assert set(heldout_of_half) == set(heldout) & set(texts[::2])
    train_with_repeats, heldout_with_repeats = split_documents(texts + texts[:50], 0.1)
    assert set(train_with_repeats).isdisjoint(heldout_with_repeats)


def test_pack_rows_separates_documents_and_drops_the_tail():
    documents = [np.array([5, 6, 7]), np.array([8, 9])]
    rows = pack_rows(documents, ctx=3, separator_id=0)
    np.testing.assert_array_equal(rows, [[0, 5, 6], [7, 0, 8]])


def test_unigram_entropy_matches_a_direct_count():
    train = np.array([[0, 1, 1, 2]])
    heldout = np.array([[1, 2, 3]])
    counts = np.array([1, 2, 1, 0]) + 1.0
    expected = -np.mean(np.log(counts[[1, 2, 3]] / counts.sum()))
    assert unigram_entropy(train, heldout, vocab_size=4) == pytest.approx(expected, rel=1e-12)


def test_same_seed_gives_identical_weights(family):
    _, weights_a, _ = family["a"]
    _, weights_b, _ = family["b"]
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name
    assert family["a"][0].curve == family["b"][0].curve


def test_an_explicit_cpu_device_trains_exactly_as_the_default(family, corpus, tokenizer, tmp_path):
    """device="cpu" (and "auto" where it resolves to the CPU) repeats the default run bit for bit, and the
    saved files are byte for byte the same: the device option changes nothing on the CPU."""
    default, weights_default, default_dir = family["a"]  # seed 1, no device argument
    devices = ["cpu", "CPU"] + (["auto"] if resolve_device("auto").type == "cpu" else [])
    for name in devices:
        result = train_seed(MINI, 1, corpus.train_rows, corpus.heldout_rows, tmp_path / name, tokenizer,
                            device=name)
        weights = load_file(tmp_path / name / "model.safetensors")
        assert weights.keys() == weights_default.keys()
        assert all(torch.equal(weights[key], weights_default[key]) for key in weights), name
        assert (result.curve, result.heldout_loss) == (default.curve, default.heldout_loss)
        assert ((tmp_path / name / "model.safetensors").read_bytes()
                == (default_dir / "model.safetensors").read_bytes())
        assert result.device == default.device == "cpu"
        assert json.loads((tmp_path / name / "training.json").read_text())["result"]["device"] == "cpu"


def test_bf16_autocast_only_where_the_device_has_it_natively(family, monkeypatch, corpus, tokenizer, tmp_path):
    """A CPU without AVX512-BF16 or AMX emulates bf16 (measured 11x slower than float32): it trains in float32
    and training.json says so; with native bf16 the same recipe trains under autocast, and differently."""
    from atlas.training import train as training

    default, weights_default, default_dir = family["a"]
    native = training.native_bf16(torch.device("cpu"))
    assert default.bf16_autocast == (MINI.bf16 and native)
    saved = json.loads((default_dir / "training.json").read_text())
    assert saved["config"]["bf16"] == saved["result"]["bf16_autocast"] == default.bf16_autocast
    monkeypatch.setattr(training, "native_bf16", lambda device: not native)
    flipped = train_seed(MINI, 1, corpus.train_rows, corpus.heldout_rows, tmp_path / "flipped", tokenizer)
    assert flipped.bf16_autocast == (MINI.bf16 and not native)
    weights = load_file(tmp_path / "flipped" / "model.safetensors")
    assert not all(torch.equal(weights[key], weights_default[key]) for key in weights)


def test_an_unknown_device_is_refused_in_one_line_naming_the_option(corpus, tokenizer, tmp_path):
    for name, message in (("gpu0", "is not a torch device"), ("cuda:99", "GPU")):
        with pytest.raises(AtlasError, match=message) as error:
            train_seed(MINI, 1, corpus.train_rows, corpus.heldout_rows, tmp_path, tokenizer, device=name)
        assert str(error.value).startswith("--device ") and name in str(error.value)
        assert "\n" not in str(error.value)
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_run_saves_what_a_cpu_run_saves(family, corpus, tokenizer, tmp_path):
    """On cuda: checkpoints and model saved as on the CPU (CPU tensors, same files, names, shapes and
    dtypes), the device recorded, and a held-out loss close to the CPU run's (same seed and batches)."""
    cpu_result, cpu_weights, cpu_dir = family["a"]
    config = replace(MINI, checkpoints=(MINI.steps // 2,))
    result = train_seed(config, 1, corpus.train_rows, corpus.heldout_rows, tmp_path, tokenizer, device="cuda")
    assert result.device == "cuda"
    gpu_weights = load_file(tmp_path / "model.safetensors")
    assert {k: (v.shape, v.dtype, v.device) for k, v in gpu_weights.items()} == \
        {k: (v.shape, v.dtype, v.device) for k, v in cpu_weights.items()}
    assert abs(result.heldout_loss - cpu_result.heldout_loss) < 0.1
    checkpoint = tmp_path / f"step-{MINI.steps // 2}"
    assert load_file(checkpoint / "model.safetensors").keys() == cpu_weights.keys()
    assert json.loads((checkpoint / "training.json").read_text())["device"] == "cuda"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == \
        sorted(p.name for p in cpu_dir.iterdir() if p.is_file())
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path)
    assert next(reloaded.parameters()).device.type == "cpu"


def test_different_seeds_give_different_weights(family):
    _, weights_a, _ = family["a"]
    _, weights_c, _ = family["c"]
    mlp_in = "transformer.h.0.mlp.c_fc.weight"
    assert not torch.allclose(weights_a[mlp_in], weights_c[mlp_in])
    assert family["a"][0].final_train_loss != family["c"][0].final_train_loss


def test_loss_decreases_and_the_model_reloads(family, corpus, tokenizer):
    result, _, directory = family["a"]
    assert result.steps_done == MINI.steps and not result.hit_time_cap
    assert [step for step, _, _ in result.curve] == [8, 16, 24]
    first_heldout = result.curve[0][2]
    assert result.heldout_loss < first_heldout
    assert result.heldout_loss < np.log(len(tokenizer))  # better than uniform
    assert result.tokens_per_second > 0
    model = GPT2LMHeadModel.from_pretrained(directory)
    assert model.config.n_inner == MINI.d_mlp and model.config.n_embd == MINI.d_model
    assert AutoTokenizer.from_pretrained(directory).get_vocab() == tokenizer.get_vocab()


def test_initial_loss_is_near_uniform_and_training_beats_it(family, tokenizer, corpus):
    """The untrained model is near log(vocab); the trained one is well below its first eval."""
    result, _, _ = family["c"]
    uniform = np.log(len(tokenizer))
    train_losses = [train for _, train, _ in result.curve]
    assert train_losses[0] < uniform + 0.5
    assert train_losses[-1] < train_losses[0] - 0.3


def test_wall_clock_cap_stops_training(corpus, tokenizer, tmp_path):
    capped = replace(MINI, steps=10_000, max_seconds=1.0)
    result = train_seed(capped, 3, corpus.train_rows, corpus.heldout_rows, tmp_path, tokenizer)
    assert result.hit_time_cap
    assert 0 < result.steps_done < capped.steps
    assert result.curve[-1][0] == result.steps_done


def test_rows_of_the_wrong_width_are_rejected(corpus, tokenizer, tmp_path):
    with pytest.raises(AtlasError, match="ctx"):
        train_seed(MINI, 1, corpus.train_rows[:, :16], corpus.heldout_rows, tmp_path, tokenizer)


def test_schedule_warms_up_then_decays_by_step_or_by_the_time_budget():
    config = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1, max_seconds=50.0)
    assert lr_at(config, 0, 0.0) == pytest.approx(0.1)
    assert lr_at(config, 9, 40.0) == pytest.approx(1.0)  # warmup follows the step alone
    assert lr_at(config, 10, 0.0) == pytest.approx(1.0)
    assert lr_at(config, 55, 0.0) == pytest.approx(0.55)  # half-way: mid-point of the cosine
    assert lr_at(config, 99, 0.0) == pytest.approx(0.1, abs=1e-3)
    # a run behind its time budget follows the clock: 55% of max_seconds = step 55's rate
    assert lr_at(config, 20, 27.5) == pytest.approx(0.55)
    assert lr_at(config, 20, 60.0) == pytest.approx(0.1)
    untimed = replace(config, max_seconds=None)
    assert lr_at(untimed, 20, 1e9) == lr_at(config, 20, 0.0)
