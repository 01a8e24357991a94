"""Training step cost: ours (student once per image, teacher pruned after the last tap) against a step
written like the public release (student on the I-times repeated batch, teacher run to the end).

Both variants use the same models, heads, latents, captions, timesteps and noise in the same run, and
compute the same loss value (checked). Reported per variant: seconds per step (forward + backward, plus
the Adam step for the tiny model), peak resident memory of the step, and the bytes autograd saves for
backward (the activation memory a GPU would hold). The SD 2.1 part also extrapolates those activation
bytes to 768 px, batch 8 (docs/training.md explains the GPU memory estimate built on them).

    python bench/train_step.py            # tiny model + one SD2.1-size step at 256 px (minutes on CPU)
    python bench/train_step.py --quick    # tiny model only
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from cleandift_rt.features.capture import unet_taps
from cleandift_rt.models.heads import build_heads
from cleandift_rt.models import build_models
from cleandift_rt.training.objective import add_noise, autocast, distillation_step, tap_loss

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 1024 ** 3


def release_style_step(student, teacher, heads, student_timestep, x0, cond, alphas_cumprod, per_image, generator,
                       loss_kind="cosine", bf16=False):
    """The release's step: the batch is repeated I times *before* both U-Nets; full teacher forward.

    Draws timesteps and noise from ``generator`` exactly as ``distillation_step`` does, so both give
    the same loss on the same inputs.
    """
    from cleandift_rt.training.objective import stratified_timesteps

    b = x0.shape[0]
    t_rows = stratified_timesteps(b, per_image, generator, x0.device).reshape(-1)
    x0_rows = x0.repeat_interleave(per_image, dim=0)
    cond_rows = cond.repeat_interleave(per_image, dim=0)
    noise = torch.randn(x0_rows.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    taps = heads.taps
    with autocast(x0.device, bf16):
        with torch.no_grad():
            x_t = add_noise(x0_rows, t_rows, alphas_cumprod, noise)
            target = _full_forward_taps(teacher, x_t, t_rows, cond_rows, taps)
        feats = unet_taps(student, x0_rows, student_timestep.expand(b * per_image), cond_rows, taps)
        total = x0.new_zeros((), dtype=torch.float32)
        for tap in taps:
            total = total + tap_loss(heads(tap, feats[tap], t_rows), target[tap], loss_kind)
    return total


def _full_forward_taps(unet, sample, t, cond, taps):
    """Hook capture that runs the whole U-Net (conv_out included), as a hook-based extractor without pruning does."""
    from cleandift_rt.taps import TAP_TABLE

    got = {}
    handles = [unet.get_submodule(TAP_TABLE[n].module).register_forward_hook(
        lambda _m, _i, out, n=n: got.__setitem__(n, out if torch.is_tensor(out) else out[0])) for n in taps]
    try:
        unet(sample, t, encoder_hidden_states=cond, return_dict=False)
    finally:
        for h in handles:
            h.remove()
    return got


def peak_rss_reset() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def saved_activation_gib(fn, params) -> float:
    """Bytes autograd keeps for backward while ``fn()`` runs (unique storages, parameters excluded), in GiB.

    Under autocast this still counts the bf16 copies of the weights; per-image figures therefore come
    from the difference between two batch sizes (see ``per_image_activation_gib``).
    """
    weights = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    del loss
    return sum(seen.values()) / GIB


class Setup:
    def __init__(self, variant: str, size: int, batch: int, per_image: int, seed: int = 0):
        unet, vae, text_encoder = build_models(variant, seed)
        self.n_vae = sum(p.numel() for p in vae.parameters())
        self.n_text = sum(p.numel() for p in text_encoder.parameters())
        del vae, text_encoder
        from cleandift_rt.models import configs
        from cleandift_rt.models import schedule_alphas_cumprod

        self.teacher = unet.eval().requires_grad_(False)
        self.student = copy.deepcopy(unet).train().requires_grad_(True)
        self.heads = build_heads(unet.config.block_out_channels)
        self.timestep = torch.nn.Parameter(torch.tensor(261.0))
        self.alphas = schedule_alphas_cumprod(configs.SCHEDULER)
        gen = torch.Generator().manual_seed(seed)
        latent = size // 8
        self.batch = batch
        self.x0 = torch.randn(batch + 1, 4, latent, latent, generator=gen)  # one spare row for per-image figures
        self.cond = torch.randn(batch + 1, 77, unet.config.cross_attention_dim, generator=gen)
        self.per_image = per_image
        self.params = [*self.student.parameters(), *self.heads.parameters(), self.timestep]
        self.n_student = sum(p.numel() for p in self.student.parameters())
        self.n_heads = sum(p.numel() for p in self.heads.parameters())

    def loss(self, variant: str, seed: int, bf16: bool = False, batch: int | None = None):
        fn = distillation_step if variant == "ours" else release_style_step
        b = batch or self.batch
        out = fn(self.student, self.teacher, self.heads, self.timestep, self.x0[:b], self.cond[:b], self.alphas,
                 self.per_image, torch.Generator().manual_seed(seed), bf16=bf16)
        return out.loss if variant == "ours" else out


def time_variant(setup: Setup, variant: str, steps: int, optimizer=None) -> dict:
    times = []
    peak_rss_reset()
    value = None
    for i in range(steps):
        start = time.perf_counter()
        loss = setup.loss(variant, seed=i)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        for p in setup.params:  # keep the buffers, as a GPU caching allocator does: on CPU, freeing 3.5 GB
            if p.grad is not None:  # of SD2.1 grads each step costs seconds of page faults in both variants
                p.grad.zero_()
        times.append(time.perf_counter() - start)
        value = float(loss.detach()) if i == 0 else value
    return {"seconds_per_step": min(times), "all_seconds": times, "peak_rss_gib": peak_rss_gib(), "first_loss": value}


def bench(variant_name: str, size: int, batch: int, per_image: int, steps: int, with_adam: bool) -> dict:
    setup = Setup(variant_name, size, batch, per_image)
    optimizer = torch.optim.Adam(setup.params, lr=0.0, fused=True) if with_adam else None  # lr 0: same weights each step
    result = {"model": variant_name, "size": size, "batch": batch, "I": per_image, "adam": with_adam,
              "student_params": setup.n_student, "head_params": setup.n_heads}
    # interleave the variants so load changes on shared cores hit both alike; first round is warm-up
    rounds = {"ours": [], "release": []}
    for _ in range(2):
        for v in ("ours", "release"):
            rounds[v].append(time_variant(setup, v, steps, optimizer))
    for v in ("ours", "release"):
        best = min(rounds[v], key=lambda r: r["seconds_per_step"])
        best["peak_rss_gib"] = max(r["peak_rss_gib"] for r in rounds[v])
        best["activation_gib"] = saved_activation_gib(lambda: setup.loss(v, seed=0), setup.params)
        result[v] = best
    assert abs(result["ours"]["first_loss"] - result["release"]["first_loss"]) < 1e-3 * per_image * 11, \
        "the two steps must compute the same loss"
    result["speedup"] = result["release"]["seconds_per_step"] / result["ours"]["seconds_per_step"]
    result["activation_ratio"] = result["release"]["activation_gib"] / result["ours"]["activation_gib"]
    if variant_name == "sd21":
        scale = (768 / size) ** 2  # activations grow with pixels (SDPA keeps no attention matrix)
        result["activation_gib_per_image_at_768"] = per_image_activation_gib(setup, bf16=False) * scale
        result["activation_gib_per_image_at_768_bf16"] = per_image_activation_gib(setup, bf16=True) * scale
        result["static_gib"] = static_training_gib(setup)
    return result


def per_image_activation_gib(setup: "Setup", bf16: bool) -> float:
    """Saved-for-backward bytes of one more image in the batch (ours), in GiB."""
    b = setup.batch
    more = saved_activation_gib(lambda: setup.loss("ours", 0, bf16=bf16, batch=b + 1), setup.params)
    return more - saved_activation_gib(lambda: setup.loss("ours", 0, bf16=bf16, batch=b), setup.params)


def static_training_gib(setup: "Setup") -> dict:
    """Memory that does not depend on the batch: fp32 weights, grads and Adam moments of what trains,
    fp32 weights of the frozen teacher, VAE and text encoder (SD 2.1 sizes from build_models)."""
    return {"student_weights_grads_adam": setup.n_student * 16 / GIB, "heads_weights_grads_adam": setup.n_heads * 16 / GIB,
            "teacher_weights": setup.n_student * 4 / GIB, "vae_weights": setup.n_vae * 4 / GIB,
            "text_encoder_weights": setup.n_text * 4 / GIB}


def report(r: dict) -> None:
    print(f"\n{r['model']} at {r['size']} px, batch {r['batch']}, I={r['I']}"
          f" ({r['student_params'] / 1e6:.1f}M student + {r['head_params'] / 1e6:.1f}M head parameters"
          f"{', fwd+bwd+Adam' if r['adam'] else ', fwd+bwd'})")
    print(f"  {'':10} {'s/step':>9} {'peak RSS':>10} {'saved activations':>18}")
    for v in ("ours", "release"):
        x = r[v]
        print(f"  {v:10} {x['seconds_per_step']:9.3f} {x['peak_rss_gib']:8.2f} G {x['activation_gib']:16.3f} G")
    print(f"  speedup ours vs release-style: {r['speedup']:.2f}x; activation memory {r['activation_ratio']:.2f}x less")
    if "activation_gib_per_image_at_768" in r:
        per = r["activation_gib_per_image_at_768"]
        per16 = r["activation_gib_per_image_at_768_bf16"]
        static = sum(r["static_gib"].values())
        print(f"  extrapolated activations at 768 px (ours): {per:.2f} GiB per image fp32, {per16:.2f} GiB bf16 autocast")
        print(f"  static training memory (fp32 weights, grads, Adam; frozen teacher, VAE, text encoder): {static:.1f} GiB")
        print(f"  estimate at 768 px, batch 8: {static + 8 * per:.1f} GiB fp32, {static + 8 * per16:.1f} GiB bf16 autocast "
              "(+ CUDA context, allocator slack, transient teacher/VAE activations)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model only, few steps")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--per-image", type=int, default=3, help="I, timesteps per image")
    ap.add_argument("--sd21-size", type=int, default=256)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor(),
               "runs": []}
    tiny = bench("tiny", 128, 2, args.per_image, 3 if args.quick else 8, with_adam=True)
    report(tiny)
    results["runs"].append(tiny)
    if not args.quick:
        big = bench("sd21", args.sd21_size, 1, args.per_image, 1, with_adam=False)
        report(big)
        results["runs"].append(big)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "train_step.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
