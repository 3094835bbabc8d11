"""Deployment: ONNX export, the ONNX Runtime model and the HTTP service with its page."""
