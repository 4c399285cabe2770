#!/usr/bin/env python3
"""PyTorch reference of ONE ConMIM pretraining step, to benchmark training img/s.

    python tools/bench/torch_train.py --model small --batch 256 --steps 30 --warmup 10 --device cuda
    python tools/bench/torch_train.py --model small --batch 256 --steps 30 --warmup 10 --device cuda --compile
    python tools/bench/torch_train.py --model tiny --image-size 64 --batch 8 --steps 5 --warmup 1 --device cpu

(use the project venv: `source tools/env.sh; $CONMIM_PYTHON tools/bench/torch_train.py ...`)

What it measures: the steady-state throughput (images/s) of the training step of our
Rust trainer (src/train/trainer.rs), written the usual PyTorch way, on synthetic input
that is already on the device (no data loading, no decoding, no augmentation). Per step:

  * inputs: u8 NHWC weak + strong views [B,S,S,3] and a bool mask [B,N] (exactly
    int(0.75*N) random patches per image); a few batches are made once before timing and
    cycled through. Normalised on the device (/255, ImageNet mean/std, NCHW).
  * student: timm ViT (--variant timm: vit_{tiny,small,base,large}_patch16_224, abs.
    position embedding; --variant beit: timm Beit with the ConMIM/BEiT backbone, shared
    relative position bias, layer scale, q/v biases, LN eps 1e-6 = our Rust default)
    with a learned mask token replacing the masked patch embeddings (before CLS and
    position terms), drop path as the Rust presets (small 0.1, others 0; --drop-path);
    all tokens -> final norm -> projection head.
  * teacher: same architecture, initialised as a copy of the student, no mask, drop
    path as the student (the official teacher stays in training mode; --no-teacher-drop-path
    as the Rust `teacher_drop_path = false`), torch.no_grad, on the strong view.
  * projection head (each net its own), on all B*(1+N) token rows, as src/train/head.rs
    and the spec: Linear(D,4096,no bias)-BN-ReLU-Linear(4096,4096,no bias)-BN-ReLU-
    Linear(4096,256,no bias)-BN(no affine), BN in train mode (batch statistics) for both.
  * loss (fp32, outside autocast): L2-normalise, per-image patch InfoNCE over the masked
    positions, CLS excluded, t = 0.1, computed as src/train/loss.rs does
    (mask-weighted logsumexp - diagonal, no boolean gather, so no host sync); equals the
    official cross-entropy form of tools/reference/conmim_loss.py.
  * AdamW (betas 0.9/0.98, eps 1e-8, wd 0.05; no decay on 1-D params, *.bias, cls_token,
    pos_embed - the Rust `no_weight_decay` rule), fused=True on CUDA; lr = linear warmup
    + cosine (peak = preset lr * B / 2048 unless --lr); clip_grad_norm_ (3.0 S/B, 1.0 L,
    as the Rust presets) without a host sync; EMA teacher update with
    torch._foreach_mul_/_foreach_add_ over all trainable student parameters (backbone,
    mask token, head), momentum cosine 0.996 -> 1 over all steps.
  * CUDA: bf16 autocast around the forward passes, TF32 matmul/cudnn on. CPU: fp32.
  * --compile: torch.compile (default mode) of the student and teacher forward
    (normalisation + backbone + head). A compile failure is reported in the JSON
    ("compile_error") and the run goes on eagerly.

Timing: W warmup steps, synchronize, S timed steps, synchronize. The loss of every step
is printed to stderr (one .item() per step, after the EMA update; --no-sync keeps the
losses on the device and prints them at the end instead). stdout gets ONE JSON line:
{"impl", "model", "batch", "steps", "img_per_s", "step_ms", "peak_mem_bytes",
 "loss_first", "loss_last", "device", "torch", ...}.
"""

import argparse
import json
import math
import sys
import time
import traceback
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import timm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MASK_RATIO = 0.75
TEMPERATURE = 0.1
REFERENCE_BATCH = 2048
# name -> (embed_dim, depth, heads, Rust preset lr, clip, drop path, layer-scale init)
PRESETS = {
    "tiny": (192, 12, 3, 5e-4, 3.0, 0.0, 0.1),
    "small": (384, 12, 6, 5e-4, 3.0, 0.1, 0.1),
    "base": (768, 12, 12, 5e-4, 3.0, 0.0, 0.1),
    "large": (1024, 24, 16, 7.5e-4, 1.0, 0.0, 1e-5),
}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ model
def build_backbone(args, drop_path):
    dim, depth, heads, _, _, _, ls = PRESETS[args.model]
    if args.variant == "timm":
        return timm.create_model(
            f"vit_{args.model}_patch16_224", pretrained=False, num_classes=0,
            drop_path_rate=drop_path, img_size=args.image_size)
    from timm.models.beit import Beit
    return Beit(
        img_size=args.image_size, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads,
        mlp_ratio=4.0, qkv_bias=True, init_values=ls, use_abs_pos_emb=False,
        use_rel_pos_bias=False, use_shared_rel_pos_bias=True, num_classes=0,
        global_pool="token", drop_path_rate=drop_path, norm_layer=partial(nn.LayerNorm, eps=1e-6))


def build_head(dim, hidden=4096, out=256):
    """The official _build_mlp(3, D, 4096, 256) (src/train/head.rs)."""
    return nn.Sequential(
        nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, out, bias=False), nn.BatchNorm1d(out, affine=False))


class ConMIMNet(nn.Module):
    """Backbone + mask token + projection head. forward(u8 NHWC views, mask or None) ->
    head projections of the PATCH tokens [B, N, 256] (BN statistics over all 1+N tokens)."""

    def __init__(self, vit, variant):
        super().__init__()
        self.vit = vit
        self.variant = variant
        dim = vit.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = build_head(dim)
        for m in self.head.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0, persistent=False)

    def features(self, x, mask):
        m = self.vit
        t = m.patch_embed(x)  # [B, N, D]
        if mask is not None:
            t = torch.where(mask.unsqueeze(-1), self.mask_token.to(t.dtype), t)
        if self.variant == "timm":
            t = m._pos_embed(t)  # cat CLS, + pos_embed
            t = m.patch_drop(t)
            t = m.norm_pre(t)
            t = m.blocks(t)
        else:
            # fp32 CLS: cat promotes the stream to fp32, as timm's Beit.forward_features.
            t = torch.cat((m.cls_token.expand(t.shape[0], -1, -1), t), dim=1)
            t = m.pos_drop(t)
            bias = m.rel_pos_bias()
            for blk in m.blocks:
                t = blk(t, shared_rel_pos_bias=bias)
        return m.norm(t)  # [B, 1+N, D]

    def forward(self, x_u8, mask=None):
        x = (x_u8.permute(0, 3, 1, 2).float() - self.mean) / self.std
        f = self.features(x, mask)
        b, t, d = f.shape
        p = self.head(f.reshape(b * t, d)).reshape(b, t, -1)
        return p[:, 1:]


def conmim_loss(student, teacher, mask, temperature=TEMPERATURE):
    """src/train/loss.rs: mean over masked (b, j) of logsumexp_i(<q_j,k_i>/t) - <q_j,k_j>/t,
    in fp32, teacher detached. Same number as the official cross-entropy form."""
    q = F.normalize(student.float(), p=2, dim=-1)
    k = F.normalize(teacher.detach().float(), p=2, dim=-1)
    logits = torch.matmul(q, k.transpose(1, 2)) / temperature
    per_token = torch.logsumexp(logits, dim=-1) - torch.diagonal(logits, 0, 1, 2)
    w = mask.float()
    return (per_token * w).sum() / w.sum().clamp_min(1.0)


def no_weight_decay(name, p):
    """src/train/optim.rs no_weight_decay (the name's last component, as Rust)."""
    base = name.rsplit(".", 1)[-1]
    return p.ndim <= 1 or name.endswith(".bias") or base in ("cls_token", "pos_embed")


def cosine(step, peak, final, total, warmup, start=0.0):
    """src/train/schedule.rs CosineSchedule.at."""
    if step < warmup:
        if warmup == 1:
            return peak
        return start + (peak - start) * step / (warmup - 1)
    n = max(total - warmup, 0)
    if n == 0:
        return final
    i = min(step - warmup, n)
    return final + 0.5 * (peak - final) * (1.0 + math.cos(math.pi * i / n))


def momentum_at(step, base, total):
    if total == 0:
        return 1.0
    i = min(step, total)
    return 1.0 - (1.0 - base) * (1.0 + math.cos(math.pi * i / total)) / 2.0


# ------------------------------------------------------------------------------- data
def make_batches(count, b, size, n, device, gen):
    out = []
    k = int(MASK_RATIO * n)
    for _ in range(count):
        weak = torch.randint(0, 256, (b, size, size, 3), dtype=torch.uint8, generator=gen)
        # "strong" view: same pixels with a photometric change + noise (stands in for the
        # colour augmentation; the content is irrelevant to the timing).
        noise = torch.randint(-20, 21, weak.shape, dtype=torch.int16, generator=gen)
        strong = (weak.to(torch.int16) * 3 // 4 + 32 + noise).clamp_(0, 255).to(torch.uint8)
        order = torch.rand(b, n, generator=gen).argsort(dim=1)
        mask = torch.zeros(b, n, dtype=torch.bool)
        mask.scatter_(1, order[:, :k], True)
        assert int(mask.sum(1).min()) == k and int(mask.sum(1).max()) == k
        out.append((weak.to(device), strong.to(device), mask.to(device)))
    return out


# ------------------------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(PRESETS), default="small")
    p.add_argument("--variant", choices=["timm", "beit"], default="timm",
                   help="timm ViT (abs. pos. embed, default) or timm Beit (the Rust trainer's default backbone)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--compile", action="store_true", help="torch.compile the student/teacher forward")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-batches", type=int, default=4, help="distinct synthetic batches to cycle (1 = fixed batch)")
    p.add_argument("--lr", type=float, default=None, help="peak lr (default: preset lr * batch / 2048)")
    p.add_argument("--drop-path", type=float, default=None, help="student drop path (default: Rust preset)")
    p.add_argument("--no-teacher-drop-path", dest="teacher_drop_path", action="store_false",
                   help="teacher without drop path (default: as the student, as the official code)")
    p.add_argument("--no-sync", action="store_true", help="no per-step .item(); print the losses at the end")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", default=None,
                   help="after timing, profile 3 more steps with torch.profiler and write a Chrome trace here")
    a = p.parse_args(argv)
    if a.image_size % 16 or a.image_size < 16:
        p.error("--image-size must be a positive multiple of 16")
    if a.batch < 1 or a.steps < 1 or a.warmup < 0 or a.num_batches < 1:
        p.error("--batch, --steps, --num-batches >= 1, --warmup >= 0")
    return a


def main(argv=None):
    args = parse_args(argv)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available():
        log("CUDA requested but not available")
        return 2
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    dim, depth, heads, preset_lr, clip, preset_dp, _ = PRESETS[args.model]
    drop_path = preset_dp if args.drop_path is None else args.drop_path
    n = (args.image_size // 16) ** 2
    total = args.warmup + args.steps
    peak_lr = preset_lr * args.batch / REFERENCE_BATCH if args.lr is None else args.lr
    min_lr = 1e-5 * args.batch / REFERENCE_BATCH if args.lr is None else args.lr * 0.02

    student = ConMIMNet(build_backbone(args, drop_path), args.variant).to(dev)
    # The teacher as the official code builds it: the student's architecture (drop path
    # included), kept in training mode (head BN with batch statistics, drop path on), as
    # the Rust default (`teacher_drop_path`).
    teacher_dp = drop_path if args.teacher_drop_path else 0.0
    teacher = ConMIMNet(build_backbone(args, teacher_dp), args.variant).to(dev)
    teacher.load_state_dict(student.state_dict())  # params + BN buffers: a copy
    teacher.requires_grad_(False)
    student.train()
    teacher.train()

    named = [(k, v) for k, v in student.named_parameters() if v.requires_grad]
    decay = [v for k, v in named if not no_weight_decay(k.removeprefix("vit."), v)]
    no_decay = [v for k, v in named if no_weight_decay(k.removeprefix("vit."), v)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=peak_lr, betas=(0.9, 0.98), eps=1e-8, **({"fused": True} if cuda else {}))
    s_params = [v for _, v in named]
    t_named = dict(teacher.named_parameters())
    t_params = [t_named[k] for k, _ in named]
    n_params = sum(v.numel() for v in s_params)
    log(f"model {args.model} ({args.variant}) dim {dim} depth {depth} heads {heads}, N {n}, "
        f"trainable student params {n_params / 1e6:.2f}M (decay {len(decay)} / no-decay {len(no_decay)} tensors), "
        f"drop path {drop_path}, peak lr {peak_lr:.3g}, clip {clip}, device {dev}")

    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = make_batches(args.num_batches, args.batch, args.image_size, n, dev, gen)

    s_fwd, t_fwd = student, teacher
    compile_error = None
    compiled = False
    if args.compile:
        try:
            s_fwd, t_fwd = torch.compile(student), torch.compile(teacher)
            compiled = True
        except Exception as e:  # noqa: BLE001
            compile_error = f"{type(e).__name__}: {e}"
            log("torch.compile failed, running eagerly:", compile_error)

    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else (
        lambda: torch.autocast("cpu", enabled=False))

    def step(i):
        weak, strong, mask = batches[i % len(batches)]
        lr = cosine(i, peak_lr, min_lr, total, args.warmup)
        m = momentum_at(i, 0.996, total)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.no_grad(), amp():
            target = t_fwd(strong, None)
        with amp():
            proj = s_fwd(weak, mask)
        loss = conmim_loss(proj, target, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s_params, clip, foreach=True)
        opt.step()
        with torch.no_grad():
            # One pass, as the Rust side's lerp_ per flat group: m * t + (1 - m) * s.
            torch._foreach_lerp_(t_params, s_params, 1.0 - m)
        return loss.detach()

    losses = []  # floats (sync mode) or tensors (--no-sync)
    state = {"checked": not compiled}

    def run_step(i):
        nonlocal s_fwd, t_fwd, compiled, compile_error
        if state["checked"]:
            loss = step(i)
        else:
            try:
                loss = step(i)
                if cuda:
                    torch.cuda.synchronize()
                state["checked"] = True
            except Exception as e:  # noqa: BLE001 - compile errors surface on first call
                compile_error = f"{type(e).__name__}: {e}"
                log("torch.compile failed on the first step, falling back to eager:\n"
                    + traceback.format_exc())
                s_fwd, t_fwd, compiled = student, teacher, False
                opt.zero_grad(set_to_none=True)
                state["checked"] = True
                loss = step(i)
        if args.no_sync:
            losses.append(loss)
        else:
            v = loss.item()
            losses.append(v)
            log(f"step {i:4d} {'warmup' if i < args.warmup else 'timed '} loss {v:.5f}")
            if not math.isfinite(v):
                raise FloatingPointError(f"loss is {v} at step {i}")

    t_start = time.perf_counter()
    for i in range(args.warmup):
        run_step(i)
    if cuda:
        torch.cuda.synchronize()
    log(f"warmup ({args.warmup} steps) took {time.perf_counter() - t_start:.2f} s")
    if not state["checked"]:  # no warmup step: compile check inside the timed loop
        log("note: --compile with --warmup 0 times the compilation too")
    t0 = time.perf_counter()
    for i in range(args.warmup, total):
        run_step(i)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0

    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            for i in range(3):
                run_step(total + i)
            if cuda:
                torch.cuda.synchronize()
        prof.export_chrome_trace(args.profile)
        log(f"profile of 3 steps written to {args.profile}")

    if args.no_sync:
        losses = [float(v) for v in torch.stack(losses).cpu()]
        for i, v in enumerate(losses):
            log(f"step {i:4d} loss {v:.5f}")
    bad = [v for v in losses if not math.isfinite(v)]
    if bad:
        log(f"non-finite losses: {len(bad)}")
    result = {
        "impl": "pytorch-compiled" if compiled else "pytorch-eager",
        "model": args.model,
        "variant": args.variant,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "image_size": args.image_size,
        "img_per_s": args.batch * args.steps / elapsed,
        "step_ms": 1000.0 * elapsed / args.steps,
        "peak_mem_bytes": torch.cuda.max_memory_allocated(dev) if cuda else None,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "precision": "bf16-autocast+tf32" if cuda else "fp32",
        "compile_requested": args.compile,
        "compile_error": compile_error,
        "drop_path": drop_path,
        "teacher_drop_path": teacher_dp,
        "peak_lr": peak_lr,
        "trainable_params": n_params,
    }
    print(json.dumps(result), flush=True)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
