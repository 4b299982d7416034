"""The CIFAR-10 gRPC classification service (onnxruntime; never TensorFlow)."""
