"""The CleanDIFT training loop: models, optimiser, checkpoints with exact resume, logging, validation.

Output folder layout::

    OUT/metrics.jsonl                one JSON object per optimiser step (step, loss, cosine, lr, ...; "val" when validated)
    OUT/checkpoints/step-0000100.safetensors   training state (every N steps and at the end; last K kept)
    OUT/student_unet.safetensors     release '_unet' format (student U-Net, diffusers keys)
    OUT/student_full.safetensors     release '_full' format (student, heads, mapping, timestep, teacher, VAE)

With ``encoder=DIR`` (a fast encoder, ``models.fast_encoder``) the student sees that encoder's latents
of the clean image and the teacher the VAE's of the noisy one; both student files record the
encoder's name and hash, and every checkpoint its identity (a resume with another encoder is refused).

Every source of randomness of a step (posterior sample, timesteps, noise) comes from one
``torch.Generator`` whose state is checkpointed with the student, heads, timestep, Adam moments and
the data position, so a resumed run produces the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..checkpoint import check_state_dict, tensor_fingerprint
from ..features.preprocess import check_model_size
from ..models import BaseModel, load_base, save_student_full, save_student_unet
from ..models.fast_encoder import FastEncoder, check_pairing, encoder_reference, load_fast_encoder
from ..models.heads import build_heads
from ..runs.checkpoints import restore_rng, rng_tensors
from ..runs.loop import ResumableRun, set_deterministic
from ..runs.skips import SkipLog
from .config import LORA_TARGETS, OBJECTIVE_FIELDS, VALIDATION_TIMESTEPS, TrainConfig, upgrade_saved_config
from .data import BatchSampler, ImageFolder, load_pixels
from .objective import distillation_step
from .validation import ValidationSet, format_validation, mean_over_taps, validate

CHECKPOINT_FORMAT = "cleandift_train_checkpoint"
UNET_FILE = "student_unet.safetensors"
FULL_FILE = "student_full.safetensors"
VAE_CHUNK = 2  # images per VAE encode: at 768 px its activations would otherwise outgrow the U-Nets'


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup from 0 over ``warmup_steps`` optimiser steps, then constant (paper and release)."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    return config.lr


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available here: use --device cpu")
    return device


def add_lora(unet: nn.Module, rank: int) -> None:
    """LoRA of ``rank`` on every attention projection and feed-forward layer (B zero-init: identity at start)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS)))


def plain_unet(unet: nn.Module) -> nn.Module:
    """The student as a plain ``UNet2DConditionModel`` (LoRA merged into a copy), for the release formats."""
    if not getattr(unet, "_hf_peft_config_loaded", False):
        return unet
    merged = copy.deepcopy(unet)
    merged.fuse_lora()
    merged.unload_lora()
    return merged


class Trainer(ResumableRun):
    """Build everything from a config, then :meth:`run` (the loop, resume and checkpoints are
    ``runs.loop.ResumableRun``'s).

    ``resume``: ``None`` starts fresh (refusing an ``out`` that already holds checkpoints), ``True``
    continues from the newest readable checkpoint in ``out/checkpoints``, a path continues from that
    checkpoint file (or the newest one in that folder). ``on_step(step, record)`` is called after
    every optimiser step (after checkpointing), e.g. to stop a run early.
    """

    kind = "training"
    checkpoint_format = CHECKPOINT_FORMAT
    objective_fields = OBJECTIVE_FIELDS
    free_fields = ("steps", "device")  # a resumed run may train longer, or on another device

    def __init__(self, config: TrainConfig, base: str | Path | BaseModel, data: str | Path, out: str | Path,
                 resume: bool | str | Path | None = None, progress: bool = True,
                 on_step: Callable[[int, dict], None] | None = None, log: Callable[[str], None] = print):
        self.config = config.check()
        self.open_run(out, resume=resume, keep_checkpoints=config.keep_checkpoints, progress=progress, log=log,
                      on_step=on_step)
        self.device = pick_device(config.device)
        if config.deterministic:
            set_deterministic(self.device)
        torch.manual_seed(config.seed)  # head init (Fourier buffer) and LoRA init draw from the global RNG

        self.base = base if isinstance(base, BaseModel) else load_base(base, device=self.device)
        self.base.to(device=self.device)
        parts = {"unet": self.base.unet, "vae": self.base.vae, "text_encoder": self.base.text_encoder}
        self.base_identity = tensor_fingerprint({f"{part}.{k}": v for part, m in parts.items() if m is not None
                                                 for k, v in m.state_dict().items()})
        self.size = check_model_size(config.size or self.base.resolution)[0]  # square, as the release trains
        self.fast_encoder = self._fast_encoder(config.encoder)
        self.teacher = self.base.unet.eval().requires_grad_(False)

        self.read_captions = config.text_conditioning != "none"
        # distill: the student's text is the empty prompt whatever the caption (encoded once here)
        with torch.no_grad():
            self.student_prompt = self.base.encode_prompt([""]) if config.text_conditioning == "distill" else None
        folder = ImageFolder(data, captions=self.read_captions, min_side=config.min_side)
        self.scan_skipped = folder.skipped
        train_samples, held_out = self._split(folder)
        self.runtime_skipped = SkipLog("image")
        self.sampler = BatchSampler(train_samples, config.seed, self.size, config.resize, self.runtime_skipped)

        self.student = copy.deepcopy(self.teacher).train()
        if config.lora_rank:
            add_lora(self.student, config.lora_rank)
        else:
            self.student.requires_grad_(True)
        if config.gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
        self.heads = build_heads(self.base.block_out_channels, config.taps,
                                 config.head_conditioning).to(self.device).train()
        self.timestep = nn.Parameter(torch.tensor(float(config.student_timestep), device=self.device),
                                     requires_grad=config.learn_timestep)

        self.named_params = self._trainable_parameters()
        self.optimizer = torch.optim.Adam([p for _, p in self.named_params], lr=config.lr, betas=config.adam_betas,
                                          eps=config.adam_eps, weight_decay=config.weight_decay,
                                          fused=True)  # one kernel for all tensors: 30x faster than the loop on CPU
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        self.val_set = self._validation_set(held_out) if held_out else None
        self.resume(resume)

    # ------------------------------------------------------------------------------------------
    # setup helpers

    def _split(self, folder: ImageFolder):
        c = self.config
        if c.validate_every == 0 or c.val_images == 0:
            return folder.samples, []
        if c.val_data is not None:
            val = ImageFolder(c.val_data, captions=self.read_captions, min_side=c.min_side)
            return folder.samples, val.samples[:c.val_images]
        if len(folder) < 2 * c.val_images:
            self.log(f"note: {len(folder)} usable images are too few to hold out {c.val_images} for validation "
                     "(need twice as many): validation is off; pass val_data=DIR or val_images=N")
            return folder.samples, []
        return folder.split(c.val_images, c.seed)

    def _fast_encoder(self, folder: str | None) -> FastEncoder | None:
        """The fast encoder whose latents the student sees (None: the VAE's), checked against the base."""
        if folder is None:
            return None
        encoder = load_fast_encoder(folder)
        for warning in check_pairing(encoder, self.base):
            self.log(f"warning: {warning}")
        return encoder.to(self.device).eval().requires_grad_(False)

    def _student_latents(self, pixels: torch.Tensor, x0: torch.Tensor) -> torch.Tensor | None:
        """The fast encoder's latents of ``pixels`` (None without one: the student sees ``x0``)."""
        if self.fast_encoder is None:
            return None
        return torch.cat([self.fast_encoder(chunk.to(self.device)) for chunk in pixels.split(VAE_CHUNK)]).to(x0.dtype)

    def _trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        named = [(f"student.{n}", p) for n, p in self.student.named_parameters() if p.requires_grad]
        named += [(f"heads.{n}", p) for n, p in self.heads.named_parameters()]
        if self.timestep.requires_grad:
            named.append(("timestep", self.timestep))
        return named

    def _encode_text(self, captions: list[str]) -> torch.Tensor:
        """The teacher's text embeddings of ``captions``."""
        cond = self.base.encode_prompt(captions)
        if self.read_captions:
            # encode_prompt caches per prompt: fine for "", unbounded over a captioned dataset
            self.base._prompt_cache.clear()
        return cond

    def _student_text(self, cond: torch.Tensor) -> torch.Tensor:
        """The student's text embeddings for a batch whose teacher sees ``cond``: the same, or in
        distill mode the empty prompt's."""
        if self.student_prompt is None:
            return cond
        return self.student_prompt.to(cond).expand(cond.shape[0], -1, -1)

    @torch.no_grad()
    def _validation_set(self, samples) -> ValidationSet | None:
        skipped = SkipLog("image")
        pixels, captions = load_pixels(samples, self.size, self.config.resize, skipped)
        if skipped.total:
            self.log(f"validation: {skipped.summary()}")
        if pixels is None:
            self.log("validation: no decodable held-out images, validation is off")
            return None
        latents, conds = [], []
        for start in range(0, len(captions), VAE_CHUNK):
            latents.append(self.base.encode_images(pixels[start:start + VAE_CHUNK].to(self.device)))
            conds.append(self._encode_text(captions[start:start + VAE_CHUNK]))
        latents, conds = torch.cat(latents), torch.cat(conds)
        gen = torch.Generator(self.device).manual_seed(self.config.seed + 1)
        noise = torch.randn(latents.shape, generator=gen, device=self.device)
        return ValidationSet(latents, conds, noise, self._student_text(conds), self._student_latents(pixels, latents))

    # ------------------------------------------------------------------------------------------
    # checkpoints (what runs.loop adds: format, step, config, the Adam moments)

    def checkpoint_state(self) -> tuple[dict, dict]:
        tensors: dict[str, torch.Tensor] = {name: p for name, p in self.named_params}
        tensors.update({f"heads_buffer.{n}": b for n, b in self.heads.named_buffers()})
        tensors["student_timestep"] = self.timestep.detach()
        tensors["rng.generator"] = self.generator.get_state()
        tensors.update(rng_tensors(self.device))
        metadata = {"param_names": json.dumps([n for n, _ in self.named_params]),
                    "sampler": json.dumps(self.sampler.state()),
                    "skipped": json.dumps(self.runtime_skipped.to_json())}
        return tensors, metadata

    def saved_config(self, metadata: dict, path: Path) -> dict:
        return upgrade_saved_config(json.loads(metadata["config"]), str(path))

    def identities(self) -> dict[str, str]:
        encoder = "the base VAE" if self.fast_encoder is None else self.fast_encoder.identity
        return {"base model": self.base_identity, "latent encoder": encoder}

    def load_checkpoint_state(self, path: Path, state: dict, meta: dict) -> None:
        names = [n for n, _ in self.named_params]
        if json.loads(meta["param_names"]) != names:
            raise ValueError(f"{path} holds a different set of trainable parameters (other base model, taps or LoRA "
                             "setting?): cannot resume")
        params = {n: state[n] for n in names if n in state}
        check_state_dict(dict(self.named_params), params, f"trainable parameters in {path}")
        with torch.no_grad():
            for name, p in self.named_params:
                p.copy_(state[name])
            self.timestep.copy_(state["student_timestep"])
        buffers = {n: state[f"heads_buffer.{n}"] for n, _ in self.heads.named_buffers()}
        for n, b in self.heads.named_buffers():
            b.copy_(buffers[n])
        self.generator.set_state(state["rng.generator"])
        restore_rng(state, self.device)
        self.sampler.load_state(json.loads(meta["sampler"]))
        restored = SkipLog.from_json(json.loads(meta["skipped"]))  # in place: the sampler counts into it
        self.runtime_skipped.counts, self.runtime_skipped.examples = restored.counts, restored.examples

    # ------------------------------------------------------------------------------------------
    # the loop

    def train_step(self) -> dict:
        """One optimiser step (``grad_accum`` micro-batches); returns its metrics record."""
        c = self.config
        lr = learning_rate(self.step, c)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        loss_sum, cosine_sum = 0.0, {}
        for _ in range(c.grad_accum):
            pixels, captions = self.sampler.next_batch(c.batch_size)
            with torch.no_grad():
                x0 = torch.cat([self.base.encode_images(chunk.to(self.device), sample=True, generator=self.generator)
                                for chunk in pixels.split(VAE_CHUNK)])
                student_x0 = self._student_latents(pixels, x0)
                cond = self._encode_text(captions)
            out = distillation_step(self.student, self.teacher, self.heads, self.timestep, x0, cond,
                                    self.base.alphas_cumprod, c.timesteps_per_image, self.generator, c.loss,
                                    bf16=c.bf16, student_cond=self._student_text(cond), student_x0=student_x0)
            (out.loss / c.grad_accum).backward()
            loss_sum += float(out.loss.detach())
            for tap, v in out.cosine.items():
                cosine_sum[tap] = cosine_sum.get(tap, 0.0) + v
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"loss is {loss_sum} at step {self.step + 1}: lower the learning rate "
                                     "or disable bf16; the last checkpoint is still valid")
        if c.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for _, p in self.named_params], c.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        cosine = {tap: v / c.grad_accum for tap, v in cosine_sum.items()}
        return {"step": self.step, "loss": loss_sum / c.grad_accum, "cosine": mean_over_taps(cosine),
                "cos": cosine, "lr": lr, "timestep": float(self.timestep.detach()),
                "seconds": time.perf_counter() - started}

    def run_validation(self) -> dict | None:
        if self.val_set is None:
            return None
        return validate(self.val_set, self.student, self.teacher, self.heads, self.timestep,
                        self.base.alphas_cumprod, VALIDATION_TIMESTEPS, self.config.batch_size, self.config.bf16)

    def validation(self) -> tuple[dict, str] | None:
        val = self.run_validation()
        return None if val is None else ({"val": val}, format_validation(self.step, val))

    def postfix(self, record: dict) -> dict:
        return {"loss": f"{record['loss']:.4f}", "cos": f"{record['cosine']:.4f}", "lr": f"{record['lr']:.2e}"}

    def run(self) -> dict:
        """Train up to ``config.steps`` optimiser steps, then write the student in both release formats."""
        c = self.config
        record = self.run_steps(c.steps, c.validate_every, c.checkpoint_every)
        self.save_release_files()
        skipped = SkipLog("image").merge(self.scan_skipped, self.runtime_skipped)
        summary = {"steps": self.step, "final_loss": record["loss"] if record else None,
                   "final_cosine": record["cosine"] if record else None, "timestep": float(self.timestep.detach()),
                   "images": len(self.sampler.samples), "skipped": skipped.to_json(),
                   "encoder": encoder_reference(self.fast_encoder),
                   "files": [str(self.out / UNET_FILE), str(self.out / FULL_FILE)]}
        self.log(f"done: {self.step} steps"
                 + (f", loss {record['loss']:.4f}, mean cosine {record['cosine']:.4f}" if record else "")
                 + f"; {len(self.sampler.samples)} training images, {skipped.summary()}; "
                 f"wrote {self.out / UNET_FILE} and {self.out / FULL_FILE}")
        return summary

    def save_release_files(self) -> None:
        """The student in the release's ``_unet`` and ``_full`` formats (docs/method.md, projection heads)."""
        unet = plain_unet(self.student)
        timestep = float(self.timestep.detach())
        mode, encoder = self.config.text_conditioning, encoder_reference(self.fast_encoder)
        save_student_unet(self.out / UNET_FILE, unet, timestep, text_conditioning=mode, encoder=encoder)
        save_student_full(self.out / FULL_FILE, unet, self.heads, timestep, teacher=self.teacher, vae=self.base.vae,
                          text_conditioning=mode, encoder=encoder)

