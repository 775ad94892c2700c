"""The crop exporter: every annotated or detected object as an image file, plus metadata."""
