"""Backends: onnxruntime (reference runs, equivalence) and TVM (compile for ARM CPU / mobile GPU)."""
