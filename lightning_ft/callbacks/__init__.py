"""Lightning callbacks of lightning_ft: each file one purpose."""

from lightning_ft.callbacks.export import SaveHFModel

__all__ = ["SaveHFModel"]
