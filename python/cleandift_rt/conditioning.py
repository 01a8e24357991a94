"""How a student was trained to be conditioned: its text and its projection heads (docs/method.md).

One table each, read by training, the student files, the exported artefacts and ``info``:

- text conditioning (paper appendix B), what the two U-Nets see during training:
  ``"captions"`` both see the image's caption (the release, and the default);
  ``"none"`` both see the empty prompt (a prompt-free student);
  ``"distill"`` the teacher sees the caption, the student the empty prompt, so the student learns
  caption-quality features that need no prompt at inference.
- head conditioning (paper appendix E), how each head layer takes ``cond(t)``:
  ``"adarms"`` RMS-normalise, then scale by ``1 + linear(cond)`` (the release, and the default);
  ``"film"`` no normalisation: ``x * (1 + scale(cond)) + shift(cond)`` (the paper's main configuration).
"""

from __future__ import annotations

TEXT_CONDITIONINGS = ("captions", "none", "distill")
DEFAULT_TEXT_CONDITIONING = "captions"
HEAD_CONDITIONINGS = ("adarms", "film")
DEFAULT_HEAD_CONDITIONING = "adarms"


def check_text_conditioning(value, what: str = "text_conditioning") -> str:
    if value not in TEXT_CONDITIONINGS:
        raise ValueError(f"{what} {value!r:.40} is not one of {', '.join(TEXT_CONDITIONINGS)}")
    return value


def check_head_conditioning(value, what: str = "head_conditioning") -> str:
    if value not in HEAD_CONDITIONINGS:
        raise ValueError(f"{what} {value!r:.40} is not one of {', '.join(HEAD_CONDITIONINGS)}")
    return value


def text_conditioning_from_captions(captions, given: str | None = None, source: str = "config") -> str:
    """The mode an old config's boolean ``captions`` meant: True -> "captions", False -> "none";
    ``given``: a ``text_conditioning`` set beside it, refused when it says otherwise."""
    if not isinstance(captions, bool):
        raise ValueError(f"captions must be true or false, got {captions!r:.40} (or use text_conditioning="
                         f"{'|'.join(TEXT_CONDITIONINGS)})")
    mode = "captions" if captions else "none"
    if given not in (None, mode):
        raise ValueError(f"{source}: captions={str(captions).lower()} and text_conditioning={given!r} contradict "
                         "each other: give text_conditioning alone")
    return mode
