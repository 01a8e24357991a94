"""Distil the base VAE's encoder into a fast encoder (``cleandift-rt distill-encoder``; docs/fast_encoder.md).

The target is exactly what the engine feeds the U-Net: the base VAE's posterior mean times its
scaling factor, computed on the same pixels the student gets (random crops of the user's images,
randomly flipped, after the engine's size policy). The student is a diffusers ``AutoencoderTiny``
encoder (TAESD's architecture; ``models.fast_encoder``), new or initialised from a TAESD folder
(``init``).

Loss: mean squared error on the latents. The U-Net is a smooth function of its input, so the
feature error a latent error causes grows with its size, and the largest latent errors push the
U-Net furthest from the inputs it was trained on: a squared loss weights them most. It is also the
numerator of the reported metric, so training lowers exactly what is reported.

Metric: ``val_latent_error`` = sum over held-out images of ``|encoder(x) - target|^2`` over the sum of
``|target|^2`` (0: exact; 1: no better than all-zero latents), on whole held-out images at the
engine's size, in ``metrics.jsonl`` before the first step, every ``validate_every`` steps and at the
end. A run resumes exactly (``runs.loop.ResumableRun``: the encoder, Adam's moments, the crop
generator, torch's RNG and the data position are in every checkpoint).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..checks import check_float, check_int, check_size
from ..features.preprocess import MIN_SIDE, RESIZE_POLICIES, SIZE_MULTIPLE, check_model_size
from ..models import BaseModel, load_base
from ..models.base import VAE_DOWNSCALE
from ..models.fast_encoder import (FastEncoder, base_reference, encoder_hash, is_fast_encoder_folder, new_autoencoder,
                                   read_autoencoder, save_fast_encoder, vae_hash)
from ..runs.checkpoints import restore_rng, rng_tensors
from ..runs.loop import ResumableRun, set_deterministic
from ..runs.skips import SkipLog
from .data import BatchSampler, ImageFolder, load_pixels
from .trainer import VAE_CHUNK, pick_device

CHECKPOINT_FORMAT = "cleandift_encoder_checkpoint"
LR_FROM_INIT, LR_FROM_SCRATCH = 1e-4, 1e-3
MAX_SIZE = 4096
# a changed value makes a checkpoint another experiment: --resume refuses it
OBJECTIVE_FIELDS = ("batch_size", "size", "crop", "resize", "width", "seed")


@dataclass
class EncoderDistillConfig:
    steps: int = 2000
    batch_size: int = 8
    lr: float | None = None  # None: 1e-4 from --init weights, 1e-3 from a new encoder
    size: int | None = None  # images are prepared at this side first (the engine's input size); None: the base's
    crop: int = 256  # side of the random crops trained on (a multiple of 8; at most size)
    resize: str = "stretch"  # the engine's size policy
    width: int | None = None  # channels of a new encoder (None: TAESD's 64); --init brings its own
    val_data: str | None = None  # held-out folder; None: hold out val_images of the training folder
    val_images: int = 4
    validate_every: int = 100  # 0: only before the first step and at the end
    checkpoint_every: int = 100  # 0: only at the end
    keep_checkpoints: int = 2
    seed: int = 0
    device: str | None = None
    deterministic: bool = False

    def check(self) -> "EncoderDistillConfig":
        for name, lo in (("steps", 0), ("batch_size", 1), ("val_images", 1), ("validate_every", 0),
                         ("checkpoint_every", 0), ("keep_checkpoints", 1), ("seed", 0)):
            setattr(self, name, check_int(getattr(self, name), name, lo))
        if self.lr is not None:
            self.lr = check_float(self.lr, "lr", 0.0, lo_open=True)
        if self.size is not None:
            self.size = check_size(self.size, "size", SIZE_MULTIPLE, MAX_SIZE)
        self.crop = check_size(self.crop, "crop", VAE_DOWNSCALE, MAX_SIZE)
        if self.crop < MIN_SIDE:
            raise ValueError(f"crop {self.crop} is below {MIN_SIDE} px: crops that small show the encoder too little")
        if self.width is not None:
            self.width = check_int(self.width, "width", 1, 1024)
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"unknown resize policy {self.resize!r}: use one of {', '.join(RESIZE_POLICIES)}")
        if not isinstance(self.deterministic, bool):
            raise TypeError(f"deterministic must be true or false, got {self.deterministic!r:.40}")
        return self


def random_crops(pixels: torch.Tensor, crop: int, generator: torch.Generator) -> torch.Tensor:
    """One ``crop`` x ``crop`` window per image at a random place, each flipped left-right with
    probability 1/2 (offsets, then the flip, drawn per image from ``generator``)."""
    _, _, h, w = pixels.shape
    out = []
    for image in pixels:
        y = int(torch.randint(0, h - crop + 1, (), generator=generator))
        x = int(torch.randint(0, w - crop + 1, (), generator=generator))
        window = image[:, y:y + crop, x:x + crop]
        out.append(window.flip(-1) if bool(torch.rand((), generator=generator) < 0.5) else window)
    return torch.stack(out)


@torch.no_grad()
def latent_error(encoder: torch.nn.Module, pixels: torch.Tensor, targets: torch.Tensor,
                 batch: int = VAE_CHUNK) -> float:
    """``sum |encoder(pixels) - targets|^2 / sum |targets|^2`` (float64 sums), ``batch`` images at a time."""
    squared = energy = 0.0
    for start in range(0, len(pixels), batch):
        target = targets[start:start + batch].double()
        pred = encoder(pixels[start:start + batch]).double()
        squared += float(((pred - target) ** 2).sum())
        energy += float((target ** 2).sum())
    return squared / energy if energy else math.inf


class EncoderDistiller(ResumableRun):
    """Build from a config, then :meth:`run`: train, then write the fast-encoder folder into ``out``
    (beside ``checkpoints/`` and ``metrics.jsonl``). ``init``: an ``AutoencoderTiny`` folder (TAESD)."""

    kind = "encoder distillation"
    checkpoint_format = CHECKPOINT_FORMAT
    objective_fields = OBJECTIVE_FIELDS
    free_fields = ("steps", "device")
    progress_desc = "distill-encoder"
    validate_first = True  # the held-out error of the starting encoder

    def __init__(self, config: EncoderDistillConfig, base: str | Path | BaseModel, data: str | Path, out: str | Path,
                 init: str | Path | None = None, resume: bool | str | Path | None = None, progress: bool = True,
                 on_step: Callable[[int, dict], None] | None = None, log: Callable[[str], None] = print):
        self.config = c = config.check()
        if c.steps == 0 and init is None:
            raise ValueError("--steps 0 records the --init encoder as it is; without --init there is nothing to "
                             "record: give --init TAESD_DIR or train (--steps N)")
        if init is not None and c.width is not None:
            raise ValueError("--width sets the channels of a new encoder; the --init encoder brings its own: drop one")
        self.open_run(out, resume=resume, keep_checkpoints=c.keep_checkpoints, progress=progress, log=log,
                      on_step=on_step)
        if not resume and is_fast_encoder_folder(self.out):
            raise ValueError(f"{self.out} already holds a fast encoder: choose another --out (or --resume its run)")
        self.device = pick_device(c.device)
        if c.deterministic:
            set_deterministic(self.device)
        self.base = base if isinstance(base, BaseModel) else load_base(base, device=self.device, text_encoder=False)
        self.base.to(device=self.device)
        self.size = check_model_size(c.size or self.base.resolution)[0]
        self.crop = min(c.crop, self.size)
        channels = int(self.base.vae.config.latent_channels)
        if init is not None:
            self.autoencoder = read_autoencoder(init, "--init encoder")
            got = int(self.autoencoder.config.latent_channels)
            if got != channels:
                raise ValueError(f"--init encoder {init} gives {got} latent channels, the VAE of base "
                                 f"{Path(self.base.source).name} {channels}: use a TAESD for this model family "
                                 "(SD 1.x / 2.x: 4 channels), or train a new encoder (no --init)")
            self.init = {"name": Path(init).name, "hash": encoder_hash(self.autoencoder.encoder)}
        else:
            self.autoencoder = new_autoencoder(channels, width=c.width, seed=c.seed)
            self.init = None
        self.lr = c.lr or (LR_FROM_INIT if init is not None else LR_FROM_SCRATCH)
        self.encoder = FastEncoder(self.autoencoder, source=str(self.out)).to(self.device)
        self.encoder.encoder.train().requires_grad_(True)
        self.base_identity = vae_hash(self.base)
        self.optimizer = torch.optim.Adam(self.encoder.encoder.parameters(), lr=self.lr)
        self.generator = torch.Generator().manual_seed(c.seed)  # crops and flips, on the CPU where the pixels are

        folder = ImageFolder(data, captions=False)
        self.scan_skipped = folder.skipped
        train, held_out = self._split(folder)
        self.runtime_skipped = SkipLog("image")
        self.sampler = BatchSampler(train, c.seed, self.size, c.resize, self.runtime_skipped)
        self.val_pixels, self.val_targets = self._validation_set(held_out)
        self.errors: dict[int, float] = {}  # step -> held-out latent error
        self.resume(resume)

    def _split(self, folder: ImageFolder):
        c = self.config
        if c.val_data is not None:
            return folder.samples, ImageFolder(c.val_data, captions=False).samples[:c.val_images]
        if len(folder) < 2 * c.val_images:
            raise ValueError(f"{len(folder)} usable images in {folder.root} are too few to hold out {c.val_images} "
                             "for the held-out latent error (need twice as many): add images, pass --val-data DIR "
                             "or a smaller --val-images")
        return folder.split(c.val_images, c.seed)

    @torch.no_grad()
    def _validation_set(self, samples) -> tuple[torch.Tensor, torch.Tensor]:
        skipped = SkipLog("image")
        pixels, _ = load_pixels(samples, self.size, self.config.resize, skipped)
        if skipped.total:
            self.log(f"validation: {skipped.summary()}")
        if pixels is None:
            raise ValueError("none of the held-out images can be decoded: the latent error cannot be measured; "
                             "check --val-data or the images of --data")
        pixels = pixels.to(self.device)
        targets = torch.cat([self.base.encode_images(chunk) for chunk in pixels.split(VAE_CHUNK)])
        return pixels, targets

    # -- what runs.loop asks of a run ------------------------------------------------------------

    def identities(self) -> dict[str, str]:
        return {"base VAE": self.base_identity, "--init encoder": self.init["hash"] if self.init else "new"}

    def checkpoint_state(self) -> tuple[dict, dict]:
        tensors = {f"encoder.{n}": p for n, p in self.encoder.encoder.named_parameters()}
        tensors["rng.generator"] = self.generator.get_state()
        tensors.update(rng_tensors(self.device))
        return tensors, {"sampler": json.dumps(self.sampler.state()),
                         "skipped": json.dumps(self.runtime_skipped.to_json())}

    def load_checkpoint_state(self, path: Path, tensors: dict, metadata: dict) -> None:
        params = dict(self.encoder.encoder.named_parameters())
        missing = [n for n in params if f"encoder.{n}" not in tensors]
        if missing:
            raise ValueError(f"{path} does not hold this encoder's weights ({missing[:3]}): another architecture?")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[f"encoder.{name}"])
        self.generator.set_state(tensors["rng.generator"])
        restore_rng(tensors, self.device)
        self.sampler.load_state(json.loads(metadata["sampler"]))
        restored = SkipLog.from_json(json.loads(metadata["skipped"]))  # in place: the sampler counts into it
        self.runtime_skipped.counts, self.runtime_skipped.examples = restored.counts, restored.examples

    def keep_metric(self, record: dict) -> None:
        if "val_latent_error" in record:
            self.errors[record["step"]] = record["val_latent_error"]

    def train_step(self) -> dict:
        started = time.perf_counter()
        crops = random_crops(self.sampler.next_batch(self.config.batch_size)[0], self.crop, self.generator)
        crops = crops.to(self.device)
        with torch.no_grad():
            target = torch.cat([self.base.encode_images(chunk) for chunk in crops.split(VAE_CHUNK)])
        pred = self.encoder(crops)
        value = self.optimizer_step(F.mse_loss(pred.float(), target.float()), advice="lower --lr")
        with torch.no_grad():
            error = float(((pred.detach() - target) ** 2).sum() / (target ** 2).sum())
        return {"step": self.step, "loss": value, "latent_error": error, "lr": self.lr,
                "seconds": time.perf_counter() - started}

    def validation(self) -> tuple[dict, str]:
        error = latent_error(self.encoder, self.val_pixels, self.val_targets)
        self.errors[self.step] = error
        return ({"val_latent_error": error},
                f"step {self.step}: held-out latent error {error:.5f} (0: the VAE's latents exactly; 1: no better "
                "than all-zero latents)")

    def postfix(self, record: dict) -> dict:
        return {"loss": f"{record['loss']:.3g}", "err": f"{record['latent_error']:.4f}"}

    # -- the run ---------------------------------------------------------------------------------

    def run(self) -> dict:
        """Train ``config.steps`` steps, then write the fast-encoder folder (diffusers ``AutoencoderTiny``
        files and ``cleandift_encoder.json``) into ``out``."""
        c = self.config
        self.run_steps(c.steps, c.validate_every, c.checkpoint_every)
        initial, final = self.errors.get(0), self.errors.get(self.step)
        if final is None:  # a resumed run that had already finished: measure what it holds
            final = self.validation()[0]["val_latent_error"]
        if c.steps == 0 and final >= 1.0:
            raise ValueError(f"the --init encoder's latents are not this base's: held-out latent error {final:.3g} "
                             "(no better than all-zero latents: a TAESD of another model family, or latents on "
                             "another scale); train it on your images (--steps N) or use the TAESD of this base")
        images = {"training_images": len(self.sampler.samples), "held_out_images": len(self.val_pixels)}
        record = {"base": base_reference(self.base), "init": self.init,
                  "decoder": f"from --init {self.init['name']}" if self.init else "untrained (only the encoder runs)",
                  "training": {"steps": self.step, **images, "size": self.size, "crop": self.crop,
                               "batch_size": c.batch_size, "lr": self.lr, "loss": "mse on latents",
                               "val_latent_error": {"initial": initial, "final": final}}}
        self.encoder.encoder.eval().requires_grad_(False)
        save_fast_encoder(self.out, self.autoencoder, record)
        skipped = SkipLog("image").merge(self.scan_skipped, self.runtime_skipped)
        start = f"{initial:.5f} -> " if initial is not None else ""
        self.log(f"done: {self.step} steps; held-out latent error {start}{final:.5f} on "
                 f"{images['held_out_images']} images; {images['training_images']} training images, "
                 f"{skipped.summary()}; wrote the encoder to {self.out}")
        return {"steps": self.step, "val_latent_error": {"initial": initial, "final": final}, **images,
                "skipped": skipped.to_json(), "out": str(self.out)}


__all__ = ["EncoderDistillConfig", "EncoderDistiller", "latent_error", "random_crops"]
