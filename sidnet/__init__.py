"""SIDNet: a YOLOv2-derived human detector, from training to a TensorRT engine.

Importing the package is cheap: no optional dependency (TensorRT, pycuda, Hydra, albumentations) is imported here.
"""

__version__ = "0.1.0"
