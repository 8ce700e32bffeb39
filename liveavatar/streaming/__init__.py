"""Streaming inference of the LiveAvatar model: the block-by-block DiT over per-session state (`dit`)
and the flow-matching sampler it steps with (`sampler`)."""
