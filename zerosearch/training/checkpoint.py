"""Atomic checkpoints: written under a temporary name, flushed to disk, renamed into place, last k kept."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def begin(run_dir: Path, step: int) -> Path:
    """A fresh temporary folder to write step `step` into."""
    tmp = checkpoint_root(run_dir) / f".tmp_step_{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (the names created or renamed in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file under `root`, then each folder: after this a power cut cannot leave them empty."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def commit(run_dir: Path, tmp: Path, step: int, trainer_state: dict, keep_last: int) -> Path:
    """Write the trainer state last, flush the folder to disk, rename it into place, then drop all but the
    newest `keep_last` (never the one just written, even when older than checkpoints already there)."""
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    # without the flush a crash shortly after the rename can leave step_N with empty or missing files
    fsync_tree(tmp)
    final = checkpoint_root(run_dir) / f"step_{step}"
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(final.parent)
    others = [path for _, path in list_checkpoints(run_dir) if path != final]
    for old in others[: max(len(others) - (keep_last - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer_state.json").read_text())
