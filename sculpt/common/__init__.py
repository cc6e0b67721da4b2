"""What every layer of sculpt may use (it imports nothing of sculpt but ``sculpt.errors``): files written
atomically with the usual permissions, output-path checks, error messages on one line, plain JSON."""

from sculpt.common.files import (atomic_write_bytes, check_output_file, existing_ancestor, give_default_mode,
                                 same_path)
from sculpt.common.messages import one_line
from sculpt.common.plain_json import to_plain_json

__all__ = ["atomic_write_bytes", "check_output_file", "existing_ancestor", "give_default_mode", "one_line",
           "same_path", "to_plain_json"]
