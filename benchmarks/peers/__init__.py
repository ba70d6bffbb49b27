"""Scripts run inside the peer environments (.venv-bench-*): HF transformers, Optimum, onnxruntime-genai."""
