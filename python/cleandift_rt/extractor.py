"""Kept for ``cleandift_rt.extractor`` users: the PyTorch extractors now live in ``cleandift_rt.features``."""

from .features.extractor import DiftExtractor, ReferenceExtractor, check_prompt_embeds

__all__ = ["DiftExtractor", "ReferenceExtractor", "check_prompt_embeds"]
