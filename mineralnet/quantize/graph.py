"""ONNX graph helpers shared by the recipe, the report and the fallback: sessions, batched runs, the float
tail, the feature maps before pooling, which compute nodes run in int8, their MACs, and `float_nodes`, the
surgery that leaves chosen nodes of a QDQ model in float without recalibrating the others."""
from __future__ import annotations

import os
import time
from typing import Iterable, Sequence

import numpy as np

from mineralnet.errors import MineralNetError

COMPUTE_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
POOL_OPS = ("ReduceMean", "GlobalAveragePool")
QUANT_SUFFIX = "_quantized"  # onnxruntime.quantization.quant_utils.TENSOR_NAME_QUANT_SUFFIX


def load(model):
    """bytes / path / ModelProto -> ModelProto."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (bytes, bytearray)):
        return onnx.load_from_string(bytes(model))
    return onnx.load(os.fspath(model))


def session(model, threads: int | None = None, optimization: str = "all"):
    """An ONNX Runtime CPU session of bytes / path / ModelProto."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                     "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[optimization]
    if threads:
        opts.intra_op_num_threads = int(threads)
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    data = os.fspath(model) if isinstance(model, (str, os.PathLike)) else model
    try:
        return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise MineralNetError(f"ONNX Runtime cannot load the model ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}); re-export it with `mineralnet-export RUN`") from None


def fixed_batch(sess) -> int | None:
    dim = sess.get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) and dim > 0 else None


def batches(images: np.ndarray, step: int, fixed: int | None):
    """(chunk padded to the fixed batch, real length) over `images`."""
    for start in range(0, len(images), step):
        x = np.ascontiguousarray(images[start:start + step], dtype=np.float32)
        n = len(x)
        if fixed and n < fixed:
            x = np.concatenate([x, np.repeat(x[-1:], fixed - n, axis=0)])
        yield x, n


def logits(sess, images: np.ndarray, batch: int = 16) -> np.ndarray:
    """The `logits` output (else the first output) for all `images` (N, 3, S, S)."""
    names = [o.name for o in sess.get_outputs()]
    name = "logits" if "logits" in names else names[0]
    fixed = fixed_batch(sess)
    inp = sess.get_inputs()[0].name
    parts = [sess.run([name], {inp: x})[0][:n] for x, n in batches(images, fixed or batch, fixed)]
    if not parts:
        raise MineralNetError("no images to run the model on")
    return np.concatenate(parts).astype(np.float64)


def latency_ms(sess, image: np.ndarray, seconds: float = 2.0, min_runs: int = 10) -> float:
    """Median ms of one batch (the model's fixed batch, else 1) of `image` repeated."""
    fixed = fixed_batch(sess) or 1
    x = np.ascontiguousarray(np.repeat(image[None], fixed, axis=0), dtype=np.float32)
    inp = sess.get_inputs()[0].name
    for _ in range(3):
        sess.run(None, {inp: x})
    times, start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        sess.run(None, {inp: x})
        times.append(1000 * (time.perf_counter() - t0))
    return float(np.median(times))


class CalibrationReader:
    """onnxruntime.quantization.CalibrationDataReader over preprocessed images (N, 3, S, S)."""

    def __init__(self, images: np.ndarray, input_name: str, batch: int, fixed: bool):
        self.images, self.name, self.step, self.fixed = images, input_name, batch, fixed
        self.pos, self.end = 0, len(images)

    def __len__(self) -> int:
        return -(-len(self.images) // self.step)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.pos, self.end = start_index * self.step, min(len(self.images), end_index * self.step)

    def get_next(self):
        if self.pos >= self.end:
            return None
        x = self.images[self.pos:min(self.pos + self.step, self.end)]
        self.pos += self.step
        if self.fixed and len(x) < self.step:
            x = np.concatenate([x, np.repeat(x[-1:], self.step - len(x), axis=0)])
        return {self.name: np.ascontiguousarray(x, dtype=np.float32)}

    def rewind(self) -> None:
        self.pos = 0

    def __iter__(self):
        self.rewind()
        while (item := self.get_next()) is not None:
            yield item


def _consumers(graph) -> dict[str, list]:
    out: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def tail_nodes(proto) -> list[str]:
    """The global pooling nodes and everything after them (fusion, head, softmax, novelty)."""
    consumers = _consumers(proto.graph)
    todo = [n for n in proto.graph.node if n.op_type in POOL_OPS]
    seen: dict[str, object] = {}
    while todo:
        node = todo.pop()
        if node.name in seen:
            continue
        seen[node.name] = node
        for out in node.output:
            todo += consumers.get(out, [])
    if "" in seen:
        raise MineralNetError("the ONNX graph has unnamed nodes after the pooling; they cannot be kept float")
    return sorted(seen)


def map_nodes(proto) -> list[str]:
    """The nodes that make the feature maps the pooling reads (F2, F4, ...): walking back from each pooling
    node through non-compute ops (Add, Relu, Clip, BatchNorm, Identity) to the first compute node on every
    path, inclusive. Leaving them float keeps the un-activated maps out of 8 bits right before pooling."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    found: dict[str, object] = {}
    todo = [producer[n.input[0]] for n in proto.graph.node if n.op_type in POOL_OPS and n.input[0] in producer]
    while todo:
        node = todo.pop()
        if node.name in found or node.op_type in POOL_OPS:
            continue
        found[node.name] = node
        if node.op_type in COMPUTE_OPS:
            continue
        todo += [producer[i] for i in node.input if i in producer]
    return sorted(found)


def compute_nodes(proto) -> list[str]:
    """Compute nodes (Conv/Gemm/MatMul) in graph order."""
    return [n.name for n in proto.graph.node if n.op_type in COMPUTE_OPS]


def int8_nodes(qdq) -> list[str]:
    """Compute nodes whose data and weight inputs both come from DequantizeLinear (they run as int8 kernels)."""
    producer = {o: n.op_type for n in qdq.graph.node for o in n.output}
    return [n.name for n in qdq.graph.node if n.op_type in COMPUTE_OPS
            and all(producer.get(i) == "DequantizeLinear" for i in n.input[:2])]


def macs(float_proto) -> dict[str, int]:
    """Multiply-accumulates per image of every compute node of a float model with inferred shapes."""
    from onnx import shape_inference

    proto = shape_inference.infer_shapes(float_proto)
    shapes = {}
    for v in list(proto.graph.value_info) + list(proto.graph.output) + list(proto.graph.input):
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in v.type.tensor_type.shape.dim]
        shapes[v.name] = dims
    inits = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    out = {}
    for n in proto.graph.node:
        if n.op_type not in COMPUTE_OPS:
            continue
        w = inits.get(n.input[1]) or shapes.get(n.input[1])
        y = shapes.get(n.output[0])
        if not w or not y:
            out[n.name] = 0
            continue
        per_image_out = int(np.prod(y[1:])) if len(y) > 1 else int(np.prod(y))
        if n.op_type.startswith("Conv"):
            out[n.name] = per_image_out * int(np.prod(w[1:]))
        else:  # Gemm/MatMul: every output element sums over K = the weight's reduction dimension
            trans_b = any(a.name == "transB" and a.i for a in n.attribute)
            k = w[-1] if trans_b else w[0]
            out[n.name] = per_image_out * int(k)
    return out


def int8_mac_share(qdq, mac_table: dict[str, int]) -> float:
    """Share of all compute MACs done by int8 kernels."""
    total = sum(mac_table.values())
    done = sum(mac_table.get(n, 0) for n in int8_nodes(qdq))
    return done / total if total else 0.0


def float_nodes(qdq, float_proto, names: Iterable[str]):
    """A copy of the QDQ model where each node in `names` computes in float: its activation inputs are
    read before their QuantizeLinear/DequantizeLinear pair and its weights/bias are the float tensors of
    `float_proto` (the model that was quantized). The rest keeps its calibrated Q/DQ; a node's output pair
    stays where a quantized node consumes it. Unused Q/DQ nodes and initializers are dropped."""
    import copy

    model = copy.deepcopy(load(qdq))
    graph = model.graph
    wanted = set(names)
    known = {n.name for n in graph.node}
    missing = sorted(wanted - known)
    if missing:
        raise MineralNetError(f"nodes {missing[:3]} are not in the quantized model; pass names from its report")
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name: t for t in graph.initializer}
    float_graph = load(float_proto).graph
    float_inits = {t.name: t for t in float_graph.initializer}
    float_producer = {o: n for n in float_graph.node for o in n.output}
    for node in graph.node:
        if node.name not in wanted:
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            src = dq.input[0]
            if src in inits:  # a quantized weight or bias: take the float original
                original = src[:-len(QUANT_SUFFIX)] if src.endswith(QUANT_SUFFIX) else src
                if original not in float_inits:
                    raise MineralNetError(f"float tensor {original!r} of node {node.name!r} is missing from the "
                                          f"float model; pass the model that was quantized")
                # ORT names a bias's DequantizeLinear output after the float bias: store the float copy as NAME_float
                target = original if original not in producer else f"{original}_float"
                if target not in inits:
                    tensor = copy.deepcopy(float_inits[original])
                    tensor.name = target
                    graph.initializer.append(tensor)
                    inits[target] = tensor
                node.input[i] = target
            elif src in producer and producer[src].op_type == "QuantizeLinear":
                node.input[i] = _float_value(graph, producer, float_graph, float_producer, inits, float_inits,
                                             producer[src].input[0])
    prune(model)
    return model


FOLDED_ACTIVATIONS = ("Relu", "Clip")


def _float_value(graph, producer, float_graph, float_producer, inits, float_inits, name: str) -> str:
    """The float value of tensor `name` as the float model computes it. ONNX Runtime folds a Relu/Clip into
    the QuantizeLinear after a Conv (the uint8 range does the clipping) and gives the Conv its output name;
    reading before the QuantizeLinear would then skip the activation, so it is put back (a copy of the
    float model's node, once per tensor)."""
    import copy

    want, have = float_producer.get(name), producer.get(name)
    if want is None or want.op_type not in FOLDED_ACTIVATIONS or (have is not None and have.op_type == want.op_type):
        return name
    out = f"{name}_float_activation"
    if out not in producer:
        node = copy.deepcopy(want)
        node.name = f"{want.name}_float_activation"
        node.input[0] = name
        del node.output[:]
        node.output.append(out)
        for extra in node.input[1:]:  # Clip's min/max
            if extra and extra not in inits and extra in float_inits:
                graph.initializer.append(copy.deepcopy(float_inits[extra]))
                inits[extra] = graph.initializer[-1]
        at = next((i for i, n in enumerate(graph.node) if name in n.output), -1)  # keep the graph sorted
        graph.node.insert(at + 1, node)
        producer[out] = node
    return out


def prune(model) -> None:
    """Drop nodes whose outputs nobody reads (repeatedly) and initializers nobody reads."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input} | outputs
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)


def names_in(proto, names: Sequence[str]) -> list[str]:
    known = {n.name for n in proto.graph.node}
    return [n for n in names if n in known]


def module_names(proto) -> dict[str, str]:
    """ONNX node name -> the PyTorch module it was exported from, read from torch.onnx's `name_scopes` metadata
    (the enclosing module paths, then the traced op's own name), e.g. "head". A conv with its batch norm folded
    in carries the norm's scope and op: it reads "conv before backbone.blocks.0.0.bn1". Nodes
    without the metadata (other exporters, graph rewrites) are left out."""
    import ast

    out = {}
    for node in proto.graph.node:
        meta = {m.key: m.value for m in node.metadata_props}
        try:
            scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        except (ValueError, SyntaxError):
            continue
        module = ""
        for s in scopes[:-1]:  # the last entry is the op, not a module
            if s and (not module or s.startswith(module + ".")):
                module = s
        if not module:
            continue
        module = module.removeprefix("model.")  # the export wrapper's attribute
        if node.op_type.startswith("Conv") and "batch_norm" in str(scopes[-1]):
            module = f"conv before {module}"  # a Conv traced from a batch norm op: the norm was folded into it
        out[node.name] = module
    return out
