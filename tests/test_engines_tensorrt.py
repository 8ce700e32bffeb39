"""TensorRT: where the package is missing, every entry point says how to install it; where it exists
(with a GPU), an engine built from the exported DiT step reproduces PyTorch."""

import importlib.util

import pytest
import torch

from engines import tensorrt as trt_engine

HAS_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here; the missing-package path cannot be shown")
def test_missing_tensorrt_raises_engine_unavailable_with_install_hint(tmp_path):
    with pytest.raises(trt_engine.EngineUnavailable, match="pip install"):
        trt_engine.build_engine(tmp_path / "missing.onnx")
    with pytest.raises(trt_engine.EngineUnavailable):
        trt_engine.TensorRTRunner(tmp_path / "missing.plan")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not importable here (needs `pip install tensorrt-cu12` and a GPU)")
def test_tensorrt_engine_matches_pytorch(tmp_path):
    from engines.cache import EngineCache, EngineKey
    from engines.onnx_export import export_onnx
    from liveavatar.acceleration.export import (
        DIT_INPUT_NAMES,
        DIT_OUTPUT_NAMES,
        DiTBlockStep,
        dit_step_inputs,
    )
    from liveavatar.models.config import DiTConfig
    from liveavatar.models.transformer_liveavatar import LiveAvatarDiT

    torch.manual_seed(0)
    dit = LiveAvatarDiT(DiTConfig.tiny()).cuda().eval()
    step, inputs = DiTBlockStep(dit), dit_step_inputs(dit, 8, 8)
    onnx_path = export_onnx(step, inputs, tmp_path / "dit.onnx", DIT_INPUT_NAMES, DIT_OUTPUT_NAMES)
    plan = trt_engine.cached_engine(EngineCache(tmp_path), EngineKey.of("trt", step, inputs), onnx_path)
    got = trt_engine.TensorRTRunner(plan)(*inputs)
    with torch.no_grad():
        want = step(*inputs)
    for g, w in zip(got, want, strict=True):
        assert ((g.float() - w.float()).norm() / w.float().norm()).item() < 1e-3
