"""Model code whose module trees match the original checkpoints (DiT, VAE, text and audio encoders).

Submodules are imported where needed (`from liveavatar.models.transformer_liveavatar import
LiveAvatarDiT`) so that importing one model does not pull in the others.
"""
