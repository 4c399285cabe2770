"""timm's Mixup/CutMix (mode 'batch') on fixed random draws, for the Rust test
`train::mixup::tests::issue5_mixup_cutmix_matches_timm`.

    $CONMIM_PYTHON tools/reference/mixup_check.py CASES.json IN.npz OUT.npz

CASES.json: {"num_classes": N, "smoothing": s,
             "batch": [{"lam": raw Beta draw, "use_cutmix": bool, "cy": int, "cx": int}, ...],
             "bbox": [[h, w, lam, cy, cx], ...]}
IN.npz: `x` [B,C,H,W] float32, `target` [B] int64, `logits` [B,N] float32.

timm's own code runs with its randomness replaced by the given draws:
`Mixup._params_per_batch` returns (lam, use_cutmix) and `np.random.randint` (the box
centre in `rand_bbox`) returns cy then cx. OUT.npz gets `x_i` (the mixed images) and
`t_i` (the soft targets) and `loss_i` (timm's SoftTargetCrossEntropy of `logits`
against `t_i`) for every batch case i; stdout gets JSON
{"batch_lam": [lam after correction...], "bbox": [[yl, yh, xl, xh, lam], ...]}, the
lams as repr() strings (exact; serde_json's default float parsing may be 1 ulp off).
"""

import json
import sys


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    cases_path, inp, out = sys.argv[1:]
    try:
        import numpy as np
        import timm
        import timm.data.mixup as m
        import torch
        from timm.loss import SoftTargetCrossEntropy
    except ImportError as e:
        print(
            f"mixup_check: {e}: this Python lacks torch/timm/numpy "
            "(run tools/setup.sh; it installs tools/requirements.txt)",
            file=sys.stderr,
        )
        return 3

    with open(cases_path) as f:
        cases = json.load(f)
    data = np.load(inp)
    x0 = torch.from_numpy(np.ascontiguousarray(data["x"]))
    target = torch.from_numpy(np.ascontiguousarray(data["target"])).long()
    logits = torch.from_numpy(np.ascontiguousarray(data["logits"]))

    real_randint = m.np.random.randint
    queue = []

    def fake_randint(low, high=None, size=None, **kw):
        assert size is None, "batch mode draws scalars"
        v = queue.pop(0)
        assert low <= v < high, (low, v, high)
        return v

    result = {"batch_lam": [], "bbox": [], "timm": timm.__version__}
    outs = {}
    try:
        m.np.random.randint = fake_randint
        for i, c in enumerate(cases["batch"]):
            mix = m.Mixup(
                mixup_alpha=0.8, cutmix_alpha=1.0, cutmix_minmax=None, prob=1.0,
                switch_prob=0.5, mode="batch", label_smoothing=cases["smoothing"],
                num_classes=cases["num_classes"],
            )
            mix._params_per_batch = lambda c=c: (float(c["lam"]), bool(c["use_cutmix"]))
            queue[:] = [int(c["cy"]), int(c["cx"])]
            x = x0.clone()
            lam = mix._mix_batch(x)
            t = m.mixup_target(target, cases["num_classes"], lam, cases["smoothing"])
            # The full __call__ must agree with the two pieces.
            queue[:] = [int(c["cy"]), int(c["cx"])]
            x2, t2 = mix(x0.clone(), target)
            assert torch.equal(x2, x) and torch.equal(t2, t)
            result["batch_lam"].append(repr(float(lam)))
            outs[f"x_{i}"] = x.numpy()
            outs[f"t_{i}"] = t.numpy()
            outs[f"loss_{i}"] = SoftTargetCrossEntropy()(logits, t).reshape(1).numpy()
        for h, w, lam, cy, cx in cases["bbox"]:
            queue[:] = [int(cy), int(cx)]
            (yl, yh, xl, xh), lam2 = m.cutmix_bbox_and_lam((1, 3, h, w), lam, correct_lam=True)
            result["bbox"].append([int(yl), int(yh), int(xl), int(xh), repr(float(lam2))])
    finally:
        m.np.random.randint = real_randint
    np.savez(out, **outs)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
