"""Engine cache: keys change with weights, shapes and dtype; writes are atomic and listed."""

import torch
import torch.nn as nn

from engines.cache import EngineCache, EngineKey, model_hash


def test_model_hash_changes_with_weights_not_with_identity():
    torch.manual_seed(0)
    a = nn.Linear(8, 8)
    b = nn.Linear(8, 8)
    b.load_state_dict(a.state_dict())
    assert model_hash(a) == model_hash(b)
    with torch.no_grad():
        b.weight[0, 0] += 1.0
    assert model_hash(a) != model_hash(b)


def test_key_depends_on_shapes_and_dtype():
    m = nn.Linear(8, 8)
    k1 = EngineKey.of("trt", m, [torch.zeros(2, 8)])
    k2 = EngineKey.of("trt", m, [torch.zeros(3, 8)])
    k3 = EngineKey.of("trt", m, [torch.zeros(2, 8, dtype=torch.bfloat16)])
    assert len({k1.digest, k2.digest, k3.digest}) == 3
    assert EngineKey.of("trt", m, [torch.ones(2, 8)]).digest == k1.digest


def test_cache_put_get_and_list(tmp_path):
    cache = EngineCache(tmp_path)
    key = EngineKey.of("onnx", nn.Linear(4, 4), [torch.zeros(1, 4)])
    assert cache.get(key, "onnx") is None
    path = cache.put(key, "onnx", b"graph")
    assert cache.get(key, "onnx") == path and path.read_bytes() == b"graph"
    [entry] = cache.entries()
    assert entry["kind"] == "onnx" and entry["bytes"] == 5 and entry["file"] == path.name
    assert not list(tmp_path.glob("*.tmp*"))
