"""Device placement: `--device auto`, and accumulators that keep their state on the job's device.

CI has no GPU: the same functions run here on the CPU; on a machine with CUDA the cuda cases run too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atlas.devices import _malloc_trim, release_free_host_memory, resolve_device
from atlas.errors import AtlasError
from atlas.metrics.correlation import CorrelationAccumulator
from atlas.metrics.moments import StreamingMoments
from atlas.metrics.topk import StreamingTopK

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_auto_picks_the_best_device_here():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("CPU") == torch.device("cpu")


@pytest.mark.parametrize("name, message", [
    ("gpu0", "is not a torch device"),
    ("cuda:99", "GPU"),
    ("xla", "cpu, cuda or mps"),
])
def test_unusable_devices_are_refused_in_one_line(name, message):
    with pytest.raises(AtlasError, match=message) as error:
        resolve_device(name)
    assert "\n" not in str(error.value)


def _tensors(accumulator) -> list[torch.Tensor]:
    found = []
    for value in vars(accumulator).values():
        values = value if isinstance(value, (list, tuple)) else list(value.values()) if isinstance(value, dict) else [value]
        found += [item for item in values if isinstance(item, torch.Tensor)]
        found += [t for item in values if hasattr(item, "__dataclass_fields__")
                  for t in vars(item).values() if isinstance(t, torch.Tensor)]
    return found


def _activations(seed: int, n: int, width: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, generator=generator) * 2 + 5  # |mean| > std, as real activations


@pytest.mark.parametrize("device", DEVICES)
def test_correlation_state_lives_on_the_device_and_matches_float64(device):
    xa, xb = _activations(0, 300, 6), _activations(1, 300, 8)
    accumulator = CorrelationAccumulator(6, [3, 5], device=device)
    for start in range(0, 300, 64):  # batches arrive on the device, as the family pass gives them
        accumulator.update(xa[start:start + 64].to(device), xb[start:start + 64].to(device))
    state = _tensors(accumulator)
    assert len(state) >= 12 and all(t.device.type == device for t in state)
    reference = np.corrcoef(xa.double().numpy().T, xb.double().numpy().T)[:6, 6:]
    np.testing.assert_allclose(accumulator.correlations(), reference, atol=1e-6)
    restored = CorrelationAccumulator.from_state_dict(accumulator.state_dict(), device=device)
    assert all(t.device.type == device for t in _tensors(restored))
    np.testing.assert_array_equal(restored.correlations(), accumulator.correlations())


@pytest.mark.parametrize("device", DEVICES)
def test_moments_and_top_k_live_on_the_device(device):
    x = _activations(2, 200, 5)
    moments, top = StreamingMoments(5, device), StreamingTopK(5, 3, device=device)
    for start in range(0, 200, 50):
        batch = x[start:start + 50].to(device)
        moments.update(batch)
        top.update(batch, torch.arange(start, start + 50, device=device))
    assert all(t.device.type == device for t in _tensors(moments) + _tensors(top))
    values = x.double().numpy()
    result = moments.result()
    np.testing.assert_allclose(result["mean"], values.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(result["var"], values.var(axis=0), rtol=1e-10)
    top_values, top_keys, _ = top.result()
    np.testing.assert_array_equal(top_keys, np.argsort(-x.numpy(), axis=0, kind="stable")[:3])
    restored = StreamingMoments.from_state_dict(moments.state_dict(), device)
    assert all(t.device.type == device for t in _tensors(restored))


def _resident_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(_malloc_trim() is None, reason="the C library here has no malloc_trim (not glibc)")
def test_free_host_memory_held_by_the_allocator_goes_back() -> None:
    """Memory freed below a live allocation stays resident under glibc until the budgeted pass trims it."""
    chunks = [bytearray(100 * 1024) for _ in range(2000)]  # 200 MiB in heap-sized pieces (below mmap's threshold)
    keeper = bytearray(100 * 1024)  # allocated above them: the heap's top cannot shrink past it
    del chunks
    held = _resident_mib()
    release_free_host_memory()
    assert _resident_mib() < held - 100
    del keeper
