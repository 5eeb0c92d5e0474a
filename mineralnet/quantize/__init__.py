"""int8 a deployment engineer can trust (issue 28): the gate's statistics (`stats`), the quantization
recipe chosen by measurement (`recipe`), the per-tensor report and sensitivity ranking (`report`), and
the automatic float fallback of the most sensitive nodes (`fallback`).

The modules work on ONNX files/bytes, preprocessed image arrays (N, 3, S, S) and label arrays, so every
int8 form (ONNX Runtime QDQ, OpenVINO, TensorRT QDQ) can be judged by the same gate.
"""
