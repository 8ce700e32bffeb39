"""The `liveavatar` backend: the diffusion model as a block-by-block generator on one device
(`generator`) or over the GPUs of one set (`pipelined`)."""
