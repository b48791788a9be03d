"""Building the C++ kernels: a lock left by a killed build must not hang the next start."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from torch.utils import cpp_extension

from llmserve_kernels import cpu_ops


def make_lock(path: Path, age_s: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_only_an_old_lock_is_removed(tmp_path: Path) -> None:
    stale = make_lock(tmp_path / "a" / "lock", cpu_ops.STALE_LOCK_S + 60)
    fresh = make_lock(tmp_path / "b" / "lock", 5)  # a build running in another process
    assert cpu_ops.clear_stale_lock(stale) and not stale.exists()
    assert not cpu_ops.clear_stale_lock(fresh) and fresh.exists()
    assert not cpu_ops.clear_stale_lock(tmp_path / "c" / "lock")  # none at all


def test_build_clears_the_extension_lock_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = make_lock(Path(cpp_extension._get_build_directory("llmserve_lock_probe", verbose=False)) / "lock", 3600)
    assert lock.is_relative_to(tmp_path)
    seen: dict[str, Any] = {}

    def fake_load(**kwargs: Any) -> str:
        seen.update(kwargs, lock_present=lock.exists())
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    assert cpu_ops._build("llmserve_lock_probe", sources=["x.cpp"]) == "module"
    assert seen == {"name": "llmserve_lock_probe", "sources": ["x.cpp"], "lock_present": False}


def test_build_all_names_every_kernel_loader() -> None:
    # The session start builds cpu_ops.LOADERS two at a time: a loader left out of it would still
    # work, but build alone later, on the tests' clock.
    loaders = {name for name in vars(cpu_ops) if name.startswith("load")}
    assert set(cpu_ops.LOADERS) == loaders
    assert cpu_ops.build_all() == []  # all built here (the session start did it), none failed
