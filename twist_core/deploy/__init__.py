"""Export a run to one ONNX file with its model card, and run it with onnxruntime."""
