"""The fast-encoder side of bench/extract.py: the encoder on disk and the ratios of issue 31.

A contender named ``<engine contender>-fast`` is that engine (same backend, same precision) with a
fast encoder (diffusers ``AutoencoderTiny``, TAESD's architecture, random weights: never downloaded)
in place of the VAE encoder: ``export_onnx(..., encoder=DIR)`` for ``.onnx`` engines,
``Engine(..., encoder=DIR)`` for the PyTorch backend. Its ratio is the VAE engine's time over its own,
on the same point (size, batch, taps).
"""

from __future__ import annotations

from pathlib import Path

FAST_SUFFIX = "-fast"
FAST_ENGINES = ("engine-ort", "engine-openvino-fp32", "engine-openvino-bf16", "engine-torch-fp32", "engine-torch-bf16")
FAST_CONTENDERS = tuple(c + FAST_SUFFIX for c in FAST_ENGINES)
ROBOT_TAPS = ["us3", "us6", "us8"]
# (size, tap set, minimum ratio of the VAE engine's time to the fast engine's): issue 31, batch 1
TARGETS = ((512, "all", 1.8), (256, "robot", 2.2))


def split(contender: str) -> tuple[str, bool]:
    """(the engine contender, whether it runs the fast encoder)."""
    if contender.endswith(FAST_SUFFIX):
        return contender[: -len(FAST_SUFFIX)], True
    return contender, False


def ensure_fast_encoder(model_dir: Path, cache: Path, tag: str) -> Path:
    """A TAESD-architecture encoder with random weights, recorded as imitating ``model_dir``'s VAE."""
    folder = cache / f"{tag}-taesd-random"
    from cleandift_rt.models.fast_encoder import (base_reference, is_fast_encoder_folder, new_autoencoder,
                                                  save_fast_encoder)

    if not is_fast_encoder_folder(folder):
        from cleandift_rt.models import load_base

        base = load_base(model_dir, text_encoder=False)
        model = new_autoencoder(int(base.vae.config.latent_channels), seed=0)
        save_fast_encoder(folder, model, {"base": base_reference(base), "init": None,
                                          "decoder": "untrained (random weights: a benchmark stand-in)"})
    return folder


def designated(native_bf16: bool) -> str:
    """The pair the targets are read on: OpenVINO bf16 on a native-bf16 CPU, ONNX Runtime fp32 elsewhere."""
    return "engine-openvino-bf16" if native_bf16 else "engine-ort"


def ratios(rows: list[dict], native_bf16: bool) -> tuple[list[str], list[dict]]:
    """Each fast contender against its VAE twin on the same point; the targets on the designated pair."""
    keyed = {(r["contender"], r["size"], r["batch"], r["taps"]): r for r in rows}
    lines, checks = [], []
    fast_rows = sorted((r for r in rows if r["contender"].endswith(FAST_SUFFIX)),
                       key=lambda r: (r["size"], r["batch"], r["taps"], r["contender"]))
    if fast_rows:
        lines.append("\nfast encoder (TAESD architecture) vs the VAE encoder, same backend and precision:")
    for fast in fast_rows:
        twin, _ = split(fast["contender"])
        vae = keyed.get((twin, fast["size"], fast["batch"], fast["taps"]))
        if vae is None:
            continue
        per_frame = fast["best_seconds"] / fast["batch"]
        ratio = vae["best_seconds"] / fast["best_seconds"]
        line = (f"  {fast['size']} px b{fast['batch']} {fast['taps']:5s} {twin:20s} [{fast.get('precision', '?')}]: "
                f"VAE {vae['best_seconds']:.3f} s, fast {fast['best_seconds']:.3f} s ({per_frame:.3f} s per frame, "
                f"{1 / per_frame:.1f} Hz): {ratio:.2f}x")
        target = next((t for s, taps, t in TARGETS if (s, taps) == (fast["size"], fast["taps"])), None)
        if target is not None and twin == designated(native_bf16) and fast["batch"] == 1:
            met = ratio >= target
            checks.append({"size": fast["size"], "batch": 1, "taps": fast["taps"], "ours": fast["contender"],
                           "baseline": twin, "ratio": ratio, "target": target, "met": met,
                           "seconds_per_frame": per_frame})
            line += f" (target {target}x: {'met' if met else 'MISSED'})"
        lines.append(line)
    return lines, checks
