"""Turning a bundle into something that serves it: the Nuclio function directory."""
