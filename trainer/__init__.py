"""Train, evaluate and package torchvision detectors from CVAT annotations."""

__version__ = "0.1.0"
