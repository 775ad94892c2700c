"""Everything that talks to a CVAT server through cvat-sdk: download, upload, the auto-annotation function."""
