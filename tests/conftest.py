"""Suite-wide settings and fixtures."""

import contextlib
import os

import pytest

# every answer of the graph index is checked against a scan of the graph (sculpt.ir.graph_index): an
# edit that bypasses the index fails the test that makes it; subprocesses (the CLI tests) inherit it
os.environ["SCULPT_CHECK_INDEX"] = "1"

import sculpt.ir.graph_index  # noqa: E402

sculpt.ir.graph_index.CHECK = True


@pytest.fixture
def register_pass():
    """``register_pass(cls)``: the test pass ``cls`` is known by name (create_pass, pipelines, the
    CLI) until the test ends (``sculpt.passes.base.registered_temporarily``)."""
    from sculpt.passes.base import registered_temporarily

    with contextlib.ExitStack() as stack:
        yield lambda cls: stack.enter_context(registered_temporarily(cls))


@pytest.fixture
def winograd_rewrites(monkeypatch):
    """The convs compiled by Winograd F(2x2, 3x3) while the test runs, as (ConvShape, nchw_input,
    nchw_output), whatever their size (the policy's multiply-add floor and its channel floor for
    two-unit cores set to 0)."""
    from sculpt.backends.tvm.kernels import tiling, winograd_conv

    monkeypatch.setattr(tiling, "WINOGRAD_MIN_MACS", 0)
    monkeypatch.setattr(tiling, "WINOGRAD_MIN_CHANNEL_PRODUCT_FULL_RATE", 0)
    made = []
    original = winograd_conv.WinogradBuilder.rewrite

    def counting(self, x, weight, shape, *args, **kwargs):
        made.append((shape, kwargs.get("nchw_input", False), kwargs.get("nchw_output", False)))
        return original(self, x, weight, shape, *args, **kwargs)

    monkeypatch.setattr(winograd_conv.WinogradBuilder, "rewrite", counting)
    return made
