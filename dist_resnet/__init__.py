"""Distributed ResNet training on MNIST with Hugging Face Accelerate."""

__version__ = "0.1.0"
