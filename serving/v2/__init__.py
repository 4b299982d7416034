"""The Open Inference Protocol (KServe V2) face of the server: `inference.GRPCInferenceService`."""
