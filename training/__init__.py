"""Training and ONNX export of the CIFAR-10 classifier (needs the `training` extra)."""
