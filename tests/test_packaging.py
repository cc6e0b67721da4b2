"""A wheel of sculpt carries the files it needs at run time that are not Python: the C++ sources of the
deploy runner and of the CPU thread pool, which sculpt compiles on the user's machine."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_the_runtime_sources(tmp_path):
    # a copy of the sources without the editable install's egg-info and build folders, whose file lists
    # setuptools would reuse (a wheel built from such a tree had the .cc files where a clean clone's had not)
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        "*.egg-info", "build", "dist", ".git", "__pycache__", ".pytest_cache", ".hypothesis", "out"))
    # no build isolation: the build backend (setuptools, wheel) is already installed with the test extras
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(src)], check=True, capture_output=True)
    wheels = list(tmp_path.glob("sculpt-*.whl"))
    assert len(wheels) == 1
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    sources = sorted(p.relative_to(src).as_posix() for p in (src / "sculpt").rglob("*.cc"))
    assert "sculpt/backends/tvm/runner/deploy_runner.cc" in sources
    assert "sculpt/backends/tvm/runner/work_pool.cc" in sources
    missing = [s for s in sources if s not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert "sculpt/backends/tvm/work_pool.py" in names
