"""`mineralnet-export RUN [options]` (= `mineralnet export`): flags -> ExportOptions -> export()."""
from __future__ import annotations

from mineralnet.errors import MineralNetError

EXAMPLES = """\
examples:
  mineralnet-export runs/exp1                                   # model.onnx (fp32, batch 1)
  mineralnet-export runs/exp1 --int8                            # gated on the run's validation photos
  mineralnet-export runs/exp1 --int8 --int8-fallback auto --report
  mineralnet-export runs/exp1 --fp16 --trt --dynamic --max-batch 32   # on the GPU machine (TensorRT 10 or 11)
  mineralnet-export runs/exp1 --int8 --trt --calib-data photos/train   # int8 Q/DQ + fp16 ONNX -> int8 engine
  mineralnet-export runs/exp1 --openvino --int8 --calib-data photos/train   # OpenVINO IR fp32 + int8 for CPUs
  mineralnet-export runs/exp1 --dynamic --triton triton_models          # Triton model repository

TensorRT engines are strongly typed: each is built from the ONNX file of its precision
(model.onnx, model.fp16.onnx, model.int8.onnx) with no precision flags, on TensorRT 10 and 11 alike.
Without TensorRT the ONNX files are still written and checked, and the error names the trtexec
commands to run on the device.
"""


def add_arguments(parser) -> None:
    from mineralnet.export.formats import FORMATS
    from mineralnet.export.int8 import INT8_ACTIVATIONS, RANGE_METHODS
    from mineralnet.export.onnx import DEFAULT_OPSET, OUTPUT_NAMES
    from mineralnet.export.tensorrt import DEFAULT_WORKSPACE_MIB

    parser.epilog = EXAMPLES
    parser.add_argument("run", nargs="?", help="run directory (model.safetensors + model.json) or its "
                                               "model.safetensors")
    fmt = parser.add_argument_group("formats (fp32 ONNX is always written)")
    for name, f in FORMATS.items():
        if f.metavar:
            fmt.add_argument(f"--{name}", default=None, metavar=f.metavar, help=f"{f.files}: {f.help}")
        else:
            fmt.add_argument(f"--{name}", action="store_true", help=f"{f.files}: {f.help}")
    shape = parser.add_argument_group("batch (default: fixed batch 1)")
    shape.add_argument("--batch", type=int, default=None, help="fixed batch size N")
    shape.add_argument("--dynamic", action="store_true", help="dynamic batch; TensorRT profile from the next three")
    shape.add_argument("--min-batch", type=int, default=None, help="smallest batch with --dynamic (default 1)")
    shape.add_argument("--opt-batch", type=int, default=None, help="batch TensorRT tunes for (default 8, <= max)")
    shape.add_argument("--max-batch", type=int, default=None, help="largest batch with --dynamic (default 32)")
    q = parser.add_argument_group("int8 (the quantization photos; --calib-* and --quant-* are the same flags)")
    q.add_argument("--calib-data", "--quant-data", dest="quant_data", default=None, metavar="DIR",
                   help="quantization photos: the int8 ranges are measured on them; any folder layout "
                        "(e.g. the training set; default: the run's training photos)")
    q.add_argument("--calib-size", "--quant-size", dest="quant_size", type=int, default=None, metavar="N",
                   help="how many quantization photos, spread over DIR (default: all up to 512)")
    q.add_argument("--calib-method", "--quant-method", dest="quant_method", choices=RANGE_METHODS, default="minmax",
                   help="range estimation of the TensorRT flavour (the CPU flavour chooses among them by "
                        "measurement; default minmax)")
    q.add_argument("--int8-activations", choices=INT8_ACTIVATIONS, default=None,
                   help="uint8: fastest in ONNX Runtime on x86; int8: symmetric, needed by TensorRT and "
                        "preferred on ARM (default: int8 with --trt, and then the float parts are fp16 too; "
                        "else uint8)")
    q.add_argument("--int8-gate", default="drop=1,bound=2", metavar="SPEC",
                   help="acceptance of int8 on held-out photos: fp32-int8 top-1 accuracy drop <= drop points and its "
                        "upper 95%% bound (Newcombe, paired) <= bound points (default drop=1,bound=2; also "
                        "confidence=0.95, margin=0.2)")
    q.add_argument("--int8-fallback", choices=("off", "auto"), default="auto",
                   help="auto (default): return the nodes whose float copy most reduces the logit error on the ranking "
                        "photos to float; off: full int8")
    q.add_argument("--int8-min-share", type=float, default=0.8, metavar="FRACTION",
                   help="the fallback stops before under this share of the model's MACs would stay int8 (default 0.8): "
                        "a file that computes most of its work in float is as large and slow as fp32, so the gate "
                        "refuses int8 instead; 0 lets the fallback float as much as it needs")
    q.add_argument("--report", action="store_true",
                   help="add the per-node sensitivity ranking to model.int8.report.{json,md,png} (always written)")
    o = parser.add_argument_group("output")
    o.add_argument("--outputs", default="logits,probs",
                   help=f"model outputs, comma list of {', '.join(OUTPUT_NAMES)} (default logits,probs; "
                        f"embedding = the fused feature vector for similarity search)")
    o.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    o.add_argument("--out", default=None, metavar="DIR", help="output folder (default RUN/export)")
    o.add_argument("--val-data", default=None, metavar="DIR",
                   help="labelled held-out photos (class sub-folders): parity images and the int8 gate (default: the "
                        "run's validation photos)")
    t = parser.add_argument_group("TensorRT")
    t.add_argument("--workspace", type=int, default=DEFAULT_WORKSPACE_MIB, metavar="MIB",
                   help=f"builder workspace limit in MiB (default {DEFAULT_WORKSPACE_MIB})")
    t.add_argument("--timing-cache", default=None, metavar="FILE", help="timing cache file (default OUT/timing.cache)")
    v = parser.add_argument_group("OpenVINO, LiteRT and Triton")
    v.add_argument("--openvino-int8", choices=("qdq", "nncf"), default="qdq",
                   help="int8 IR from model.int8.onnx (qdq, default; needs --int8) or by NNCF on the quantization "
                        "photos (nncf: asks for the int8 IR by itself, float tail and fast bias correction like "
                        "model.int8.onnx's recipe, judged by its own int8 gate; with --int8 model.int8.onnx must "
                        "pass its gate first)")
    v.add_argument("--tflite-int8", choices=("float-tail", "full"), default="float-tail",
                   help="model.int8.tflite: int8 convolutions and adds with the fusion tail (pooling, concat, "
                        "linear, novelty) and the input/outputs in float, like model.int8.onnx (float-tail, "
                        "default; for CPUs and GPU delegates), or full integer with int8 input/outputs (full; "
                        "for NPUs and Edge-TPU-class accelerators)")
    v.add_argument("--triton-instances", type=int, default=1, help="instances per model in config.pbtxt (default 1)")
    v.add_argument("--triton-kind", choices=("gpu", "cpu"), default="gpu",
                   help="where Triton runs the ONNX models (default gpu; TensorRT engines always run on the GPU)")


def profile_from_args(args):
    """--batch N, or --dynamic [--min-batch --opt-batch --max-batch] -> BatchProfile."""
    from mineralnet.infer.tensorrt import BatchProfile

    range_flags = {k: getattr(args, k) for k in ("min_batch", "opt_batch", "max_batch")}
    given = [f"--{k.replace('_', '-')}" for k, v in range_flags.items() if v is not None]
    for k, v in (*range_flags.items(), ("batch", args.batch)):
        if v is not None and v < 1:
            raise MineralNetError(f"--{k.replace('_', '-')} {v} must be at least 1")
    if args.dynamic:
        if args.batch is not None:
            raise MineralNetError("--batch N fixes the batch and --dynamic frees it; pass one of them "
                                  "(--dynamic with --min-batch/--opt-batch/--max-batch for a range)")
        return BatchProfile.range(range_flags["min_batch"] or 1, range_flags["opt_batch"],
                                  range_flags["max_batch"] or 32)
    if given:
        raise MineralNetError(f"{', '.join(given)} only apply to a dynamic batch; add --dynamic "
                              f"(or use --batch N for a fixed batch)")
    return BatchProfile.static(1 if args.batch is None else args.batch)


def options_from_args(args):
    from mineralnet.export.context import ExportOptions
    from mineralnet.export.onnx import parse_outputs

    from mineralnet.quantize.stats import parse_gate

    parse_gate(args.int8_gate)
    if args.workspace < 1:
        raise MineralNetError(f"--workspace {args.workspace} must be a positive number of MiB")
    return ExportOptions(out_dir=args.out, outputs=parse_outputs(args.outputs), profile=profile_from_args(args),
                         opset=args.opset, quant_data=args.quant_data, quant_size=args.quant_size,
                         quant_method=args.quant_method, int8_activations=args.int8_activations,
                         int8_gate=args.int8_gate, int8_fallback=args.int8_fallback, report=args.report,
                         int8_min_share=args.int8_min_share,
                         val_data=args.val_data, workspace_mib=args.workspace,
                         timing_cache=args.timing_cache, openvino_int8=args.openvino_int8,
                         tflite_int8=args.tflite_int8,
                         triton_dir=args.triton, triton_instances=args.triton_instances,
                         triton_kind=args.triton_kind)


def formats_from_args(args) -> list[str]:
    from mineralnet.export.formats import FORMATS

    return [name for name in FORMATS if getattr(args, name)]


def run(args) -> int:
    from mineralnet.export.formats import export

    if not args.run:
        raise MineralNetError("say which run to export: mineralnet-export RUN (a run directory made by training)")
    options = options_from_args(args)
    export(args.run, formats_from_args(args), options, log=print)
    return 0
