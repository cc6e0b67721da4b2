"""TVM backend (Apache TVM 0.27, Relax). Imported lazily: ``import sculpt`` does not load TVM."""

from sculpt.backends.tvm.relax_import import build, import_to_relax, run_relax

__all__ = ["build", "import_to_relax", "run_relax"]
