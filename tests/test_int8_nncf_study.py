"""studies/int8_nncf.py: the bias transplant moves exactly the Conv biases by node name, NNCF on ONNX
(`export.ir.quantize_nncf`) keeps the float tail, the kernel count reads ONNX Runtime's optimised graph, and a
run without its export gets one line."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_quantize import _tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def study(load_study):
    return load_study("int8_nncf")


def _biases(model: bytes) -> dict:
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_from_string(model)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    return {n.name: inits[n.input[2]] for n in proto.graph.node if n.op_type == "Conv"}


def test_transplant_moves_each_conv_bias_by_node_name(study):
    import onnx
    from onnx import numpy_helper

    pre = _tiny_model()
    src = onnx.load_from_string(pre)
    for init in src.graph.initializer:  # the source names its initializers differently, as NNCF may
        if init.name == "b2":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 0.5, "b2"))
    src = src.SerializeToString()
    out, done = study.transplant_biases(pre, src)
    before, after = _biases(pre), _biases(out)
    assert done == 3
    np.testing.assert_allclose(after["conv2"], before["conv2"] + 0.5)
    for name in ("conv1", "conv3"):
        np.testing.assert_array_equal(after[name], before[name])
    assert len(out) > 0 and _biases(study.transplant_biases(pre, pre)[0]).keys() == before.keys()


def test_nncf_on_onnx_keeps_the_tail_float_and_the_kernel_count_reads_ort(study):
    pytest.importorskip("nncf")
    import onnx

    from mineralnet.export.ir import quantize_nncf
    from mineralnet.quantize import graph as g
    from mineralnet.quantize import recipe as rc

    pre = rc.preprocess(_tiny_model())
    images = np.random.default_rng(0).uniform(0, 1, (8, 3, 16, 16)).astype(np.float32)
    q = onnx.load_from_string(quantize_nncf(pre, images, None, reduce_range=True))
    producer = {o: n.op_type for n in q.graph.node for o in n.output}
    tail = set(g.tail_nodes(onnx.load_from_string(pre)))
    tail_inputs = [i for n in q.graph.node if n.name in tail for i in n.input]
    assert not [i for i in tail_inputs if producer.get(i) == "DequantizeLinear"]
    convs = [n for n in q.graph.node if n.op_type == "Conv"]
    assert any(producer.get(n.input[0]) == "DequantizeLinear" for n in convs)
    counts = study.ort_int8_kernels(q.SerializeToString())
    assert counts["int8_convs"] + counts["float_convs"] == 3
    qdq = study.ort_int8_kernels(rc.quantize(pre, images, rc.Recipe()))
    assert qdq == {"int8_convs": 3, "float_convs": 0}


def test_a_run_without_its_export_gets_one_line_naming_the_file(study, tmp_path):
    with pytest.raises(SystemExit, match=r"model\.int8\.report\.json not found: export the run first with "
                                         r"`mineralnet-export .* --int8 --report`"):
        study.main([str(tmp_path)])
