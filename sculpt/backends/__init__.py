"""Backends: TVM (compile for ARM CPU / mobile GPU); `ort` is the old name of `sculpt.runtime` (onnxruntime)."""
