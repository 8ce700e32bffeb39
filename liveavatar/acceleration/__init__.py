"""What the generic engines (`engines/`) accelerate in the LiveAvatar model, and how: FP8 linears,
torch.compile regions, the attention kernel choice and the multi-GPU pipeline's stages (`accelerate`),
and the export-ready functional forms of the per-block steps for ONNX / TensorRT (`export`)."""
