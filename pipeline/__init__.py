"""Gradient flow in deep networks, tracked in MLflow. See README.md."""

__version__ = "0.1.0"
