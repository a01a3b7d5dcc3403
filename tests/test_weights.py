"""The weights job against an independent float64 numpy computation of the SPEC, on every architecture."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from scipy import stats
from sqlalchemy import func, select
from transformers import AutoModelForCausalLM, AutoTokenizer

from atlas.registry import register_model
from atlas.store.schema import Job, Neuron, NeuronVocab
from ingest.weights import WeightsConfig, run

# Raw parameter names, written out here on purpose: the reference must not go through the adapters.
RAW = {
    "gpt2": dict(unembed="lm_head.weight", norm="transformer.ln_f.weight", w_out="transformer.h.{}.mlp.c_proj.weight",
                 w_out_transposed=False, w_in="transformer.h.{}.mlp.c_fc.weight", w_in_transposed=True,
                 b_in="transformer.h.{}.mlp.c_fc.bias", mlp_norm="transformer.h.{}.ln_2", w_gate=None, layernorm=True),
    "neox": dict(unembed="lm_head.weight", norm="gpt_neox.final_layer_norm.weight",
                 w_out="gpt_neox.layers.{}.mlp.dense_4h_to_h.weight", w_out_transposed=True,
                 w_in="gpt_neox.layers.{}.mlp.dense_h_to_4h.weight", w_in_transposed=False,
                 b_in="gpt_neox.layers.{}.mlp.dense_h_to_4h.bias", mlp_norm="gpt_neox.layers.{}.post_attention_layernorm",
                 w_gate=None, layernorm=True),
    "llama": dict(unembed="lm_head.weight", norm="model.norm.weight", w_out="model.layers.{}.mlp.down_proj.weight",
                  w_out_transposed=True, w_in="model.layers.{}.mlp.up_proj.weight", w_in_transposed=False,
                  b_in=None, mlp_norm="model.layers.{}.post_attention_layernorm",
                  w_gate="model.layers.{}.mlp.gate_proj.weight", layernorm=False),
    "phi": dict(unembed="lm_head.weight", norm="model.final_layernorm.weight", w_out="model.layers.{}.mlp.fc2.weight",
                w_out_transposed=True, w_in="model.layers.{}.mlp.fc1.weight", w_in_transposed=False,
                b_in="model.layers.{}.mlp.fc1.bias", mlp_norm="model.layers.{}.input_layernorm", w_gate=None,
                layernorm=True),
}


def _params(model_dir) -> tuple[dict[str, np.ndarray], int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    vocab = len(AutoTokenizer.from_pretrained(model_dir))
    return {k: v.detach().double().numpy() for k, v in model.state_dict().items()}, vocab


def transformer_lens_processing(params: dict[str, np.ndarray], arch: str, layer: int, vocab: int) -> dict:
    """TransformerLens's fold_ln + center_writing_weights + center_unembed, float64 numpy, in TL's own
    orientation (W_in [d_model, d_mlp], W_out [d_mlp, d_model], W_U [d_model, vocab]):
      W_in <- diag(ln2.w) W_in, b_in <- b_in + ln2.b W_in, then (LayerNorm) W_in -= mean over d_model;
      W_out -= mean over d_model (LayerNorm); W_U <- diag(ln_f.w) W_U, then (LayerNorm) W_U -= mean over
      d_model, and W_U -= mean over the vocabulary. RMSNorm (Llama): the scales are folded, nothing centred."""
    raw = RAW[arch]
    W_in = params[raw["w_in"].format(layer)]
    W_in = W_in if raw["w_in_transposed"] else W_in.T
    W_out = params[raw["w_out"].format(layer)]
    W_out = W_out.T if raw["w_out_transposed"] else W_out
    ln2_w = params[raw["mlp_norm"].format(layer) + ".weight"]
    ln2_b = params.get(raw["mlp_norm"].format(layer) + ".bias")
    b_in = params[raw["b_in"].format(layer)] if raw["b_in"] else None
    if ln2_b is not None:
        b_in = (0 if b_in is None else b_in) + ln2_b @ W_in
    W_in = ln2_w[:, None] * W_in
    W_gate = None
    if raw["w_gate"]:
        W_gate = ln2_w[:, None] * params[raw["w_gate"].format(layer)].T
    W_U = params[raw["norm"]][:, None] * params[raw["unembed"]].T[:, :vocab]
    if raw["layernorm"]:
        W_in = W_in - W_in.mean(axis=0, keepdims=True)
        W_out = W_out - W_out.mean(axis=1, keepdims=True)
        W_U = W_U - W_U.mean(axis=0, keepdims=True)
        W_U = W_U - W_U.mean(axis=1, keepdims=True)
    return dict(w_in=W_in.T, w_gate=None if W_gate is None else W_gate.T, b_in=b_in, w_out=W_out, W_U=W_U)


def reference(model_dir, arch: str, layer: int, top_k: int = 20, processed: bool = True, partition_scale: float = 5.12):
    """SPEC, float64 numpy: weight statistics on TransformerLens-processed (or raw) weights; v = cos(W_U[:, t],
    w_out) on processed weights; raw moments; classes with the partition threshold scale / d_model; top
    tokens by the product."""
    raw = RAW[arch]
    params, vocab = _params(model_dir)
    tl = transformer_lens_processing(params, arch, layer, vocab)
    W_U, w_out_c = tl["W_U"], tl["w_out"]
    if processed:
        w_in, w_out, b_in, w_gate = tl["w_in"], tl["w_out"], tl["b_in"], tl["w_gate"]
    else:
        w_in = params[raw["w_in"].format(layer)]
        w_in = w_in.T if raw["w_in_transposed"] else w_in
        w_out = params[raw["w_out"].format(layer)]
        w_out = w_out.T if raw["w_out_transposed"] else w_out
        b_in = params[raw["b_in"].format(layer)] if raw["b_in"] else None
        w_gate = params[raw["w_gate"].format(layer)] if raw["w_gate"] else None
    product = w_out_c @ W_U
    v = product / np.linalg.norm(w_out_c, axis=1)[:, None] / np.linalg.norm(W_U, axis=0)[None, :]
    mean, var = v.mean(axis=1), v.var(axis=1)
    z = (v - mean[:, None]) / np.sqrt(var)[:, None]
    skew, kurt = (z**3).mean(axis=1), (z**4).mean(axis=1)
    assert np.allclose(kurt, stats.kurtosis(v, axis=1, fisher=False))
    threshold = partition_scale / W_U.shape[0]
    cls = np.where((kurt > 10) & (skew > 0), "prediction",
                   np.where((kurt > 10) & (skew < 0), "suppression", np.where(var > threshold, "partition", "none")))
    return dict(
        w_in_norm=np.linalg.norm(w_in, axis=1), w_out_norm=np.linalg.norm(w_out, axis=1),
        in_out_cos=(w_in * w_out).sum(1) / np.linalg.norm(w_in, axis=1) / np.linalg.norm(w_out, axis=1),
        l2_penalty=(w_in**2).sum(1) + (w_out**2).sum(1), b_in=b_in,
        w_gate_norm=None if w_gate is None else np.linalg.norm(w_gate, axis=1),
        vocab_mean=mean, vocab_var=var, vocab_skew=skew, vocab_kurt=kurt, vocab_class=cls,
        top=np.argsort(-product, axis=1, kind="stable")[:, :top_k], top_values=-np.sort(-product, axis=1)[:, :top_k],
        bottom=np.argsort(product, axis=1, kind="stable")[:, :top_k], bottom_values=np.sort(product, axis=1)[:, :top_k],
    )


@pytest.mark.parametrize("weights", ["processed", "raw"])
@pytest.mark.parametrize("arch", sorted(RAW))
def test_weights_match_numpy_reference(store, tiny_models, arch, weights):
    model_dir = tiny_models[arch]
    model, _ = register_model(store, str(model_dir), family=f"tiny-{arch}", seed=0)
    run(WeightsConfig(model=model.name, weights=weights), store)
    with store.session() as session:
        job = session.scalars(select(Job).where(Job.kind == "weights", Job.status == "done")).one()
        assert job.config["weights"] == weights and job.config["partition_scale"] == 5.12
        for layer in range(model.n_layers):
            ref = reference(model_dir, arch, layer, processed=weights == "processed")
            rows = session.scalars(select(Neuron).where(Neuron.model_id == model.id, Neuron.layer == layer)
                                   .order_by(Neuron.neuron)).all()
            assert len(rows) == model.d_mlp
            for column in ("w_in_norm", "w_out_norm", "in_out_cos", "l2_penalty", "vocab_mean", "vocab_var",
                           "vocab_skew", "vocab_kurt"):
                got = np.array([getattr(r, column) for r in rows])
                np.testing.assert_allclose(got, ref[column], rtol=1e-6, atol=1e-9, err_msg=f"{arch} {column}")
            if ref["b_in"] is None:
                assert all(r.b_in is None for r in rows)
            else:
                np.testing.assert_allclose([r.b_in for r in rows], ref["b_in"], rtol=1e-6, atol=1e-9)
            if ref["w_gate_norm"] is None:
                assert all(r.w_gate_norm is None for r in rows)
            else:
                np.testing.assert_allclose([r.w_gate_norm for r in rows], ref["w_gate_norm"], rtol=1e-6)
            assert [r.vocab_class for r in rows] == list(ref["vocab_class"])
            for direction in ("top", "bottom"):
                vocab = session.execute(
                    select(NeuronVocab.neuron, NeuronVocab.rank, NeuronVocab.token_id, NeuronVocab.value)
                    .where(NeuronVocab.model_id == model.id, NeuronVocab.layer == layer,
                           NeuronVocab.direction == direction)
                    .order_by(NeuronVocab.neuron, NeuronVocab.rank)).all()
                ids = np.array([r.token_id for r in vocab]).reshape(model.d_mlp, -1)
                values = np.array([r.value for r in vocab]).reshape(model.d_mlp, -1)
                np.testing.assert_allclose(values, ref[f"{direction}_values"], rtol=1e-6, atol=1e-9)
                # ids agree wherever the values are not tied
                assert (ids == ref[direction]).mean() > 0.99


def test_classes_use_the_stored_thresholds(store, tiny_models):
    model, _ = register_model(store, str(tiny_models["gpt2"]), family="tiny", seed=0)
    run(WeightsConfig(model=model.name, partition_scale=1e-9), store)
    with store.session() as session:
        classes = set(session.scalars(select(Neuron.vocab_class).where(Neuron.model_id == model.id)))
        job = session.scalars(select(Job).where(Job.kind == "weights", Job.status == "done")).one()
    assert classes <= {"partition", "prediction", "suppression"} and "partition" in classes
    assert job.config["partition_scale"] == 1e-9 and job.config["fold_final_norm"] is True


def test_rerun_skips_and_overwrite_replaces(store, tiny_models, caplog):
    caplog.set_level(logging.INFO, logger="ingest.runner")  # whatever logging an earlier test configured
    model, _ = register_model(store, str(tiny_models["gpt2"]), family="tiny", seed=0)
    run(WeightsConfig(family="tiny"), store)
    with store.session() as session:
        before = session.execute(select(Neuron.layer, Neuron.neuron, Neuron.vocab_kurt).order_by(Neuron.layer, Neuron.neuron)).all()
    run(WeightsConfig(family="tiny"), store)
    assert "skipped" in caplog.text
    run(WeightsConfig(family="tiny", overwrite=True), store)
    with store.session() as session:
        after = session.execute(select(Neuron.layer, Neuron.neuron, Neuron.vocab_kurt).order_by(Neuron.layer, Neuron.neuron)).all()
        n_vocab = session.scalar(select(func.count()).select_from(NeuronVocab))
        statuses = session.scalars(select(Job.status).order_by(Job.id)).all()
    assert before == after
    assert n_vocab == model.n_layers * model.d_mlp * 2 * 20
    assert statuses == ["replaced", "done"]


def test_failed_job_leaves_nothing(store, tiny_models, monkeypatch):
    model, _ = register_model(store, str(tiny_models["gpt2"]), family="tiny", seed=0)
    import ingest.weights as weights

    calls = {"n": 0}
    real = weights.analyse_layer

    def failing_on_second_layer(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise MemoryError("simulated out-of-memory in layer 1")
        return real(*args, **kwargs)

    monkeypatch.setattr(weights, "analyse_layer", failing_on_second_layer)
    with pytest.raises(MemoryError):
        run(WeightsConfig(model=model.name), store)
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Neuron)) == 0
        assert session.scalar(select(func.count()).select_from(NeuronVocab)) == 0
        job = session.scalars(select(Job)).one()
    assert job.status == "failed" and "simulated out-of-memory" in job.error


def test_zero_weight_vectors_give_null_not_a_crash(store, tiny_models, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"])
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[:, 3] = 0.0   # w_in of neuron 3 (Conv1D: [d_model, d_mlp])
        model.transformer.h[0].mlp.c_proj.weight[5, :] = 0.0  # w_out of neuron 5
    model.save_pretrained(tmp_path / "dead")
    AutoTokenizer.from_pretrained(tiny_models["gpt2"]).save_pretrained(tmp_path / "dead")
    registered, _ = register_model(store, str(tmp_path / "dead"), family="dead", seed=0)
    run(WeightsConfig(model=registered.name), store)
    with store.session() as session:
        rows = {r.neuron: r for r in session.scalars(select(Neuron).where(Neuron.layer == 0))}
    assert rows[3].w_in_norm == 0.0 and rows[3].in_out_cos is None and rows[3].vocab_kurt is not None
    assert rows[5].w_out_norm == 0.0 and rows[5].in_out_cos is None
    assert rows[5].vocab_mean is None and rows[5].vocab_class == "none"
