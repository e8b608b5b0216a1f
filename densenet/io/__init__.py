"""Files: atomic writes and the checkpoint format (SHA-256 digest, ``weights_only`` reading)."""
from .atomic import atomic_open, atomic_write_bytes, atomic_write_text
from .checkpoint import CheckpointError, content_digest, load_checkpoint, read_torch_file, save_checkpoint, save_rotating

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_text", "CheckpointError", "content_digest",
           "load_checkpoint", "read_torch_file", "save_checkpoint", "save_rotating"]
