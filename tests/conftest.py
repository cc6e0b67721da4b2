"""Suite-wide settings."""

import os

# every answer of the graph index is checked against a scan of the graph (sculpt.ir.graph_index): an
# edit that bypasses the index fails the test that makes it; subprocesses (the CLI tests) inherit it
os.environ["SCULPT_CHECK_INDEX"] = "1"

import sculpt.ir.graph_index  # noqa: E402

sculpt.ir.graph_index.CHECK = True
