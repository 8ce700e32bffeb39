"""The application: CLI, HTTP + WebSocket signalling, sessions, media tracks, VAD segmenter, GPU worker."""
