#!/usr/bin/env python3
"""PyTorch reference for the ConMIM loss (and the model around it), straight from the
spec (/work/shared/CONMIM_SPEC.md) and the official ConMIM code's behaviour, in float64.

The Rust side (src/train/pretrain_tests.rs) writes weights and inputs to an .npz, runs
this script, and compares what it writes back within 1e-4. The script needs torch and
numpy only (the project venv: `source tools/env.sh; $CONMIM_PYTHON ...`).

Subcommands
  loss   IN.npz OUT.npz --temperature T
         IN: student [B,N,C], teacher [B,N,C] (head outputs for the patch tokens; any
         float dtype), mask [B,N] (u1, 1 = masked).
         OUT: loss (the vectorised official form), loss_formula (the spec's formula as
         loops), accuracy.
  model  IN.npz OUT.npz --config CFG.json
         IN: student.<name> / teacher.<name> weights under the timm / official names
         (see src/train/vit.rs and head.rs), weak, strong (u1 [B,S,S,3] NHWC views),
         mask (u1 [B,N]).
         OUT: weak_normalized, strong_normalized, student_features, teacher_features
         ([B,1+N,D] after the final norm), student_proj, teacher_proj ([B,1+N,C] head
         outputs), loss, accuracy, and grad.<name> for every student parameter.
  selftest
         Random features: the vectorised loss equals the loop formula; the reference
         attention equals softmax(q k^T / sqrt(d) + bias) v.
  timm-check IN.npz --config CFG.json
         If timm is installed: loads the student weights into timm's Beit
         (use_shared_rel_pos_bias=True) or VisionTransformer by their names (strict) and
         checks that timm's forward_features equals this reference (no mask). Not needed
         by the tests; documents that the names are timm's.

CFG.json: {"variant": "Beit"|"Timm", "image_size", "patch_size", "embed_dim", "depth",
"num_heads", "mlp_ratio", "norm_eps", "layer_scale": bool, "qkv_bias": bool,
"head_layers", "bn_eps", "temperature"}.
"""

import argparse
import json
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DTYPE = torch.float64


# ----------------------------------------------------------------------------- loss
def conmim_loss(student, teacher, mask, temperature):
    """Official form: logits = q @ k^T / t (B x N x N), rows of masked positions, cross
    entropy with target = own position, mean over all masked tokens of the batch."""
    q = F.normalize(student, p=2, dim=-1)
    k = F.normalize(teacher.detach(), p=2, dim=-1)
    logits = torch.matmul(q, k.transpose(1, 2)) / temperature
    b, n = mask.shape
    labels = torch.arange(n, device=mask.device).unsqueeze(0).expand(b, -1)[mask]
    rows = logits[mask]
    loss = F.cross_entropy(rows, labels)
    accuracy = (rows.argmax(-1) == labels).to(rows.dtype).mean()
    return loss, accuracy


def conmim_loss_formula(student, teacher, mask, temperature):
    """The spec's formula, literally: for every image and every masked position j,
    -log(exp(<q_j,k_j>/t) / sum_i exp(<q_j,k_i>/t)), i over all N patches of the SAME
    image; averaged over all masked tokens."""
    q = F.normalize(student.double(), p=2, dim=-1)
    k = F.normalize(teacher.double(), p=2, dim=-1)
    total, count = 0.0, 0
    b, n = mask.shape
    for bi in range(b):
        for j in range(n):
            if not bool(mask[bi, j]):
                continue
            sims = [float(q[bi, j] @ k[bi, i]) / temperature for i in range(n)]
            m = max(sims)
            denom = sum(math.exp(s - m) for s in sims)
            total += -((sims[j] - m) - math.log(denom))
            count += 1
    return total / count


# ---------------------------------------------------------------------------- input
def normalize_u8_nhwc(x):
    """torchvision ToTensor + Normalize(ImageNet) on a u8 [B,S,S,3] batch."""
    x = x.to(DTYPE).permute(0, 3, 1, 2) / 255.0
    mean = torch.tensor(IMAGENET_MEAN, dtype=DTYPE).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=DTYPE).view(1, 3, 1, 1)
    return (x - mean) / std


# ---------------------------------------------------------------------------- model
def relative_position_index(g):
    """BEiT's index for a g x g window plus CLS (as in the official RelativePositionBias)."""
    coords = torch.stack(torch.meshgrid([torch.arange(g), torch.arange(g)], indexing="ij"))
    flat = torch.flatten(coords, 1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += g - 1
    rel[:, :, 1] += g - 1
    rel[:, :, 0] *= 2 * g - 1
    nrd = (2 * g - 1) * (2 * g - 1) + 3
    idx = torch.zeros((g * g + 1,) * 2, dtype=rel.dtype)
    idx[1:, 1:] = rel.sum(-1)
    idx[0, 0:] = nrd - 3
    idx[0:, 0] = nrd - 2
    idx[0, 0] = nrd - 1
    return idx


def attention(p, pre, x, cfg, bias):
    b, t, d = x.shape
    h = cfg["num_heads"]
    if cfg["variant"] == "Beit":
        qkv_bias = None
        if cfg.get("qkv_bias", True):
            qb, vb = p[pre + "q_bias"], p[pre + "v_bias"]
            qkv_bias = torch.cat((qb, torch.zeros_like(vb), vb))
    else:
        qkv_bias = p.get(pre + "qkv.bias")
    qkv = F.linear(x, p[pre + "qkv.weight"], qkv_bias)
    qkv = qkv.reshape(b, t, 3, h, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * (d // h) ** -0.5
    attn = q @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias.unsqueeze(0)
    attn = attn.softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(b, t, d)
    return F.linear(out, p[pre + "proj.weight"], p[pre + "proj.bias"])


def vit_features(p, cfg, x, mask):
    """[B,3,S,S] normalised images, optional bool [B,N] mask -> [B,1+N,D] (eval mode: no
    drop path). The masked student input: x*(1-w) + mask_token*w before CLS/positions."""
    d, eps = cfg["embed_dim"], cfg["norm_eps"]
    ps = cfg["patch_size"]
    x = F.conv2d(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=ps)
    x = x.flatten(2).transpose(1, 2)
    b, n, _ = x.shape
    if mask is not None:
        w = mask.unsqueeze(-1).to(x.dtype)
        x = x * (1 - w) + p["mask_token"].expand(b, n, -1) * w
    x = torch.cat((p["cls_token"].expand(b, -1, -1), x), dim=1)
    bias = None
    if cfg["variant"] == "Beit":
        g = cfg["image_size"] // ps
        idx = relative_position_index(g)
        given = p.get("rel_pos_bias.relative_position_index")
        if given is not None:
            assert torch.equal(given.long().view(-1), idx.view(-1)), "relative_position_index differs"
        table = p["rel_pos_bias.relative_position_bias_table"]
        bias = table[idx.view(-1)].view(n + 1, n + 1, -1).permute(2, 0, 1).contiguous()
    else:
        x = x + p["pos_embed"]
    for i in range(cfg["depth"]):
        pre = f"blocks.{i}."
        if cfg["layer_scale"]:
            g1 = p[pre + "gamma_1"] if cfg["variant"] == "Beit" else p[pre + "ls1.gamma"]
            g2 = p[pre + "gamma_2"] if cfg["variant"] == "Beit" else p[pre + "ls2.gamma"]
        else:
            g1 = g2 = 1.0
        y = F.layer_norm(x, (d,), p[pre + "norm1.weight"], p[pre + "norm1.bias"], eps)
        x = x + g1 * attention(p, pre + "attn.", y, cfg, bias)
        y = F.layer_norm(x, (d,), p[pre + "norm2.weight"], p[pre + "norm2.bias"], eps)
        y = F.linear(y, p[pre + "mlp.fc1.weight"], p[pre + "mlp.fc1.bias"])
        y = F.linear(F.gelu(y), p[pre + "mlp.fc2.weight"], p[pre + "mlp.fc2.bias"])
        x = x + g2 * y
    return F.layer_norm(x, (d,), p["norm.weight"], p["norm.bias"], eps)


def projector(p, cfg, x):
    """The official _build_mlp(3, D, 4096, 256) on all B*(1+N) rows, BN in train mode."""
    b, t, d = x.shape
    h = x.flatten(0, 1)
    layers = cfg.get("head_layers", 3)
    eps = cfg.get("bn_eps", 1e-5)
    for l in range(layers):
        h = F.linear(h, p[f"projectors.{3 * l}.weight"])
        bn = f"projectors.{3 * l + 1}."
        last = l == layers - 1
        h = F.batch_norm(
            h,
            None,
            None,
            None if last else p[bn + "weight"],
            None if last else p[bn + "bias"],
            training=True,
            eps=eps,
        )
        if not last:
            h = F.relu(h)
    return h.reshape(b, t, -1)


# ---------------------------------------------------------------------------- io
def load_npz(path):
    with np.load(path) as z:
        return {k: torch.from_numpy(np.array(z[k])) for k in z.files}


def save_npz(path, tensors):
    np.savez(path, **{k: v.detach().to(torch.float32).contiguous().numpy() for k, v in tensors.items()})


def params(arrays, prefix):
    out = {}
    for k, v in arrays.items():
        if k.startswith(prefix):
            name = k[len(prefix):]
            if name.endswith("relative_position_index"):
                out[name] = v
            else:
                buffer = name.endswith(("running_mean", "running_var"))
                out[name] = v.to(DTYPE).clone().requires_grad_(prefix == "student." and not buffer)
    return out


# ---------------------------------------------------------------------------- commands
def cmd_loss(args):
    a = load_npz(args.inputs)
    s, t = a["student"].to(DTYPE), a["teacher"].to(DTYPE)
    mask = a["mask"].bool()
    loss, acc = conmim_loss(s, t, mask, args.temperature)
    formula = conmim_loss_formula(s, t, mask, args.temperature)
    assert abs(float(loss) - formula) < 1e-9, (float(loss), formula)
    save_npz(args.out, {"loss": loss.reshape(1), "loss_formula": torch.tensor([formula]), "accuracy": acc.reshape(1)})


def cmd_model(args):
    cfg = json.load(open(args.config))
    a = load_npz(args.inputs)
    ps, pt = params(a, "student."), params(a, "teacher.")
    weak = normalize_u8_nhwc(a["weak"])
    strong = normalize_u8_nhwc(a["strong"])
    mask = a["mask"].bool()
    with torch.no_grad():
        tf = vit_features(pt, cfg, strong, None)
        tp = projector(pt, cfg, tf)
    sf = vit_features(ps, cfg, weak, mask)
    sp = projector(ps, cfg, sf)
    loss, acc = conmim_loss(sp[:, 1:], tp[:, 1:], mask, cfg["temperature"])
    formula = conmim_loss_formula(sp[:, 1:].detach(), tp[:, 1:], mask, cfg["temperature"])
    assert abs(float(loss) - formula) < 1e-9, (float(loss), formula)
    loss.backward()
    out = {
        "weak_normalized": weak,
        "strong_normalized": strong,
        "student_features": sf,
        "teacher_features": tf,
        "student_proj": sp,
        "teacher_proj": tp,
        "loss": loss.reshape(1),
        "accuracy": acc.reshape(1),
    }
    for k, v in ps.items():
        if v.requires_grad:
            out["grad." + k] = v.grad if v.grad is not None else torch.zeros_like(v)
    save_npz(args.out, out)


def cmd_selftest(_args):
    torch.manual_seed(0)
    b, n, c = 3, 10, 7
    s, t = torch.randn(b, n, c, dtype=DTYPE), torch.randn(b, n, c, dtype=DTYPE)
    mask = torch.rand(b, n) < 0.6
    mask[:, 0] = True
    for temp in (0.1, 0.07):
        loss, _ = conmim_loss(s, t, mask, temp)
        assert abs(float(loss) - conmim_loss_formula(s, t, mask, temp)) < 1e-10
    cfg = {"variant": "Beit", "num_heads": 2, "qkv_bias": True}
    d = 8
    p = {
        "a.qkv.weight": torch.randn(3 * d, d, dtype=DTYPE),
        "a.q_bias": torch.randn(d, dtype=DTYPE),
        "a.v_bias": torch.randn(d, dtype=DTYPE),
        "a.proj.weight": torch.randn(d, d, dtype=DTYPE),
        "a.proj.bias": torch.randn(d, dtype=DTYPE),
    }
    x = torch.randn(2, 5, d, dtype=DTYPE)
    bias = torch.randn(2, 5, 5, dtype=DTYPE)
    got = attention(p, "a.", x, cfg, bias)
    qkv = F.linear(x, p["a.qkv.weight"], torch.cat((p["a.q_bias"], torch.zeros(d, dtype=DTYPE), p["a.v_bias"])))
    q, k, v = qkv.reshape(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))
    want = F.linear(want.transpose(1, 2).reshape(2, 5, d), p["a.proj.weight"], p["a.proj.bias"])
    assert torch.allclose(got, want, atol=1e-10)
    idx = relative_position_index(2)
    assert idx.tolist() == [[11, 9, 9, 9, 9], [10, 4, 3, 1, 0], [10, 5, 4, 2, 1], [10, 7, 6, 4, 3], [10, 8, 7, 5, 4]]
    print("selftest ok")


def cmd_timm_check(args):
    try:
        import timm  # noqa: F401
        from timm.models.beit import Beit
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        print("timm not installed: skipped")
        return
    cfg = json.load(open(args.config))
    a = load_npz(args.inputs)
    sd = {k[len("student."):]: v for k, v in a.items() if k.startswith("student.")}
    sd = {k: v for k, v in sd.items() if not k.startswith("projectors.")}
    common = dict(
        img_size=cfg["image_size"], patch_size=cfg["patch_size"], embed_dim=cfg["embed_dim"],
        depth=cfg["depth"], num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"],
        num_classes=0, global_pool="token", qkv_bias=cfg.get("qkv_bias", True),
    )
    from functools import partial
    norm = partial(torch.nn.LayerNorm, eps=cfg["norm_eps"])
    if cfg["variant"] == "Beit":
        model = Beit(use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                     init_values=0.1 if cfg["layer_scale"] else None, norm_layer=norm, **common)
    else:
        model = VisionTransformer(init_values=0.1 if cfg["layer_scale"] else None, norm_layer=norm, **common)
    sd.pop("mask_token", None)
    sd.pop("rel_pos_bias.relative_position_index", None)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    missing = [m for m in missing if not m.endswith("k_bias") and not m.endswith("relative_position_index")]
    assert not missing and not unexpected, (missing, unexpected)
    model = model.double().eval()
    weak = normalize_u8_nhwc(a["weak"])
    with torch.no_grad():
        got = model.forward_features(weak)
        want = vit_features({k: v.to(DTYPE) if v.is_floating_point() else v for k, v in sd.items()}, cfg, weak, None)
    err = (got - want).abs().max().item()
    assert err < 1e-9, err
    print(f"timm {timm.__version__} {type(model).__name__}: names load strictly, features match (max err {err:.2e})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("loss")
    p.add_argument("inputs")
    p.add_argument("out")
    p.add_argument("--temperature", type=float, default=0.1)
    p = sub.add_parser("model")
    p.add_argument("inputs")
    p.add_argument("out")
    p.add_argument("--config", required=True)
    sub.add_parser("selftest")
    p = sub.add_parser("timm-check")
    p.add_argument("inputs")
    p.add_argument("--config", required=True)
    args = ap.parse_args(argv)
    {"loss": cmd_loss, "model": cmd_model, "selftest": cmd_selftest, "timm-check": cmd_timm_check}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
