"""COCO metrics, threshold calibration, reports and plots of a model on annotated images."""
