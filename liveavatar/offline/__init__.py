"""Offline generation: `liveavatar generate` / `liveavatar batch`, multi-role scripts, input checks, MP4 muxing."""
