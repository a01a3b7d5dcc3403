"""Scale-aware vocabulary classes: an untrained model has (near) none; planted neurons get their class.

The partition threshold is 5.12 / d_model: a random direction already has a cosine variance of about
1 / d_model against the vocabulary, so the paper's fixed 0.005 (GPT-2 medium, d_model 1024) would
class every neuron of a d_model 48 model as partition.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from sqlalchemy import select
from transformers import AutoModelForCausalLM, AutoTokenizer

from atlas.registry import register_model
from atlas.store.schema import Neuron
from ingest.weights import WeightsConfig, run
from tests.tiny import ARCHITECTURES

PREDICTED = [7, 11, 19, 23, 31, 37, 41, 43]   # a token set a prediction neuron promotes
SUPPRESSED = [53, 59, 61, 67, 71, 73, 79, 83]  # a token set a suppression neuron demotes


def _classes(store, model_id: int) -> dict[tuple[int, int], str]:
    with store.session() as session:
        rows = session.execute(select(Neuron.layer, Neuron.neuron, Neuron.vocab_class)
                               .where(Neuron.model_id == model_id)).all()
    return {(r.layer, r.neuron): r.vocab_class for r in rows}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_an_untrained_model_has_no_vocabulary_classes(store, tiny_models, arch):
    model, _ = register_model(store, str(tiny_models[arch]), family=f"untrained-{arch}", seed=0)
    run(WeightsConfig(model=model.name), store)
    counts = Counter(_classes(store, model.id).values())
    assert counts["prediction"] == counts["suppression"] == 0, counts
    assert counts["partition"] <= 0.01 * sum(counts.values()), counts
    # ... while the paper's fixed 0.005 would call nearly every neuron of this width a partition neuron
    run(WeightsConfig(model=model.name, partition_scale=0.005 * model.d_model, overwrite=True), store)
    fixed = Counter(_classes(store, model.id).values())
    assert fixed["partition"] >= 0.9 * sum(fixed.values()), fixed


def _plant(source, target):
    """The tiny GPT-2 with three neurons of its last layer edited on purpose (lm_head is tied to wte):
    neuron 0 writes along a direction shared by the PREDICTED tokens, neuron 1 against the one shared
    by the SUPPRESSED tokens, neuron 2 along a direction that splits the vocabulary in two halves."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    generator = torch.Generator().manual_seed(11)
    wte, c_proj = model.transformer.wte.weight, model.transformer.h[-1].mlp.c_proj.weight  # c_proj [d_mlp, d_model]
    d_model, row_norm = wte.shape[1], float(wte.detach().norm(dim=1).mean())

    def direction():
        u = torch.randn(d_model, generator=generator)
        u = u - u.mean()  # centred: LayerNorm processing keeps it
        return u / u.norm()

    shared_up, shared_down, split = direction(), direction(), direction()
    signs = torch.where(torch.rand(wte.shape[0], generator=generator) < 0.5, -1.0, 1.0)
    with torch.no_grad():
        wte[PREDICTED] = 0.3 * wte[PREDICTED] + 3 * row_norm * shared_up
        wte[SUPPRESSED] = 0.3 * wte[SUPPRESSED] + 3 * row_norm * shared_down
        wte += 0.7 * row_norm * signs[:, None] * split
        c_proj[0] = shared_up * c_proj[0].norm()
        c_proj[1] = -shared_down * c_proj[1].norm()
        c_proj[2] = split * c_proj[2].norm()
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target, model.config.n_layer - 1


def test_planted_neurons_get_their_class(store, tiny_models, tmp_path):
    directory, last = _plant(tiny_models["gpt2"], tmp_path / "planted")
    model, _ = register_model(store, str(directory), family="planted", seed=0)
    run(WeightsConfig(model=model.name), store)
    classes = _classes(store, model.id)
    assert [classes[(last, n)] for n in range(3)] == ["prediction", "suppression", "partition"]
    others = Counter(value for key, value in classes.items() if key not in {(last, 0), (last, 1), (last, 2)})
    assert others["prediction"] == others["suppression"] == 0, others
    assert others["partition"] <= 0.02 * sum(others.values()), others
