"""Checks a `conmim export --format timm` file against timm (run by the Rust test
`train::export::tests::export_loads_strictly_in_timm_and_matches`).

    $CONMIM_PYTHON tools/reference/timm_check.py EXPORT.safetensors INPUT.safetensors OUT.safetensors

Runs the exact Python line recorded in EXPORT's metadata (`python`: builds the timm
model and `load_state_dict(..., strict=True)`), checks that it agrees with the recorded
model name and kwargs, then writes `forward_features(INPUT["x"])` (eval mode, fp32, CPU)
to OUT as `features`, and for a classifier (num_classes > 0) `model(INPUT["x"])` as
`logits`, for the Rust side to compare with its own forward.
"""

import json
import sys


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    export, inp, out = sys.argv[1:]
    try:
        import safetensors
        import safetensors.torch
        import timm
        import torch
    except ImportError as e:
        print(
            f"timm_check: {e}: this Python lacks torch/timm/safetensors "
            "(run tools/setup.sh; it installs tools/requirements.txt)",
            file=sys.stderr,
        )
        return 3

    with safetensors.safe_open(export, framework="pt") as f:
        meta = f.metadata() or {}
    for key in ("python", "timm_model", "timm_kwargs"):
        if key not in meta:
            print(f"timm_check: {export}: no `{key}` in the metadata", file=sys.stderr)
            return 1

    # The user-facing line, verbatim: strict load errors raise here.
    ns: dict = {}
    exec(meta["python"], ns)
    model = ns["model"]

    # The same model from the recorded name + kwargs (JSON) loads strictly too.
    kwargs = json.loads(meta["timm_kwargs"])
    twin = timm.create_model(meta["timm_model"], pretrained=False, **kwargs)
    missing, unexpected = twin.load_state_dict(
        safetensors.torch.load_file(export), strict=True
    )
    assert not missing and not unexpected, (missing, unexpected)
    assert type(twin) is type(model), (type(twin), type(model))

    torch.manual_seed(0)
    x = safetensors.torch.load_file(inp)["x"].float()
    model.eval()
    with torch.no_grad():
        result = {"features": model.forward_features(x).contiguous()}
        if kwargs.get("num_classes", 0) > 0:
            result["logits"] = model(x).contiguous()
    print(
        f"timm_check: {meta['timm_model']} ({type(model).__name__}, "
        f"{sum(p.numel() for p in model.parameters())} params) loaded strictly; "
        + ", ".join(f"{k} {tuple(v.shape)}" for k, v in result.items())
    )
    safetensors.torch.save_file(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
