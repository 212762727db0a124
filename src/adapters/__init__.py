"""Adapters for the systems gpusnap talks to: the GPU host over SSH, the object store, vast.ai.
Each turns its library's exceptions into ours (`src.errors.ExternalError` subclasses)."""
