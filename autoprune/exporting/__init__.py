"""The export stage: a physically smaller model as safe files (`model.pt`, manifest, ONNX) and, for
`transformers` models, a `save_pretrained` directory."""
