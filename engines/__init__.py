"""Generic acceleration for PyTorch modules: compile/CUDA graphs, FP8, ONNX/TensorRT, multi-GPU pipelines.

Knows nothing of avatars: it is handed modules, example inputs and a device plan.
"""
