"""Registering a model never materializes its weights: the peak resident memory of `register_model` on a
model with ~170 MB of float32 weights grows by a small fraction of that, and from_pretrained is never called.

Each measurement runs in a fresh subprocess and reads its peak resident set (VmHWM, Linux): not
getrusage's ru_maxrss, which a forked child inherits from its parent (here the pytest process, already
past the weights' size). Torch, transformers and atlas are imported and a tiny model is registered
first, so imports and lazily loaded modules are not counted. A control run measures the old way
(load_model, then reading every parameter) and must see the weights: memory-mapped pages that were
read count in the resident set too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import build_tiny_model

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")

MEASURE = r"""
import json, re, sys

import torch, transformers
from transformers import AutoModelForCausalLM

from atlas.modeling import load_model, quiet_loading
from atlas.registry import register_model
from atlas.store import Store

mode, big, tiny, url = sys.argv[1:]
store = Store(url)
register_model(store, tiny, family="warm-up", seed=0)  # imports and lazy modules, before measuring


def peak_rss_kib():
    return int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1))


def refuse(*args, **kwargs):
    raise AssertionError("registration called AutoModelForCausalLM.from_pretrained")


before = peak_rss_kib()
if mode == "register":
    AutoModelForCausalLM.from_pretrained = refuse
    register_model(store, big, family="big", seed=0)
else:  # the old registration: from_pretrained (weights memory-mapped), then a pass over every parameter
    with quiet_loading():
        loaded = load_model(big)
    total = sum(float(parameter.detach().sum()) for parameter in loaded.model.parameters())
after = peak_rss_kib()
print(json.dumps({"before_kib": before, "after_kib": after}))
"""


@pytest.fixture(scope="module")
def big_model(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A GPT-2 of 8 layers with d_mlp 20,000: about 170 MB of float32 weights in model.safetensors."""
    directory = tmp_path_factory.mktemp("big-model") / "gpt2-wide"
    return build_tiny_model("gpt2", directory, seed=0, tokenizer_dir=tiny_tokenizer_dir,
                            n_layer=8, n_embd=128, n_inner=20_000)


def peak_growth_mib(mode: str, big: Path, tiny: Path, url: str) -> float:
    result = subprocess.run([sys.executable, "-c", MEASURE, mode, str(big), str(tiny), url],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rss = json.loads(result.stdout.strip().splitlines()[-1])
    return (rss["after_kib"] - rss["before_kib"]) / 1024


def test_registration_streams_the_weights_instead_of_loading_them(big_model, tiny_family, tmp_path):
    weights_mib = (big_model / "model.safetensors").stat().st_size / 2**20
    assert weights_mib > 150
    registered = peak_growth_mib("register", big_model, tiny_family[0], f"sqlite:///{tmp_path / 'register.db'}")
    loaded = peak_growth_mib("load", big_model, tiny_family[0], f"sqlite:///{tmp_path / 'load.db'}")
    numbers = (f"weights {weights_mib:.0f} MiB; peak RSS growth: register_model {registered:.1f} MiB "
               f"({registered / weights_mib:.0%}), load_model {loaded:.1f} MiB ({loaded / weights_mib:.0%})")
    assert loaded > 0.8 * weights_mib, f"the measurement does not see loaded weights: {numbers}"
    assert registered < 0.35 * weights_mib, numbers
