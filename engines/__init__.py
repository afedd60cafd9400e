"""LineInspect engines: ONNX export, FP16/INT8 artefacts, TensorRT build, parity checks."""
