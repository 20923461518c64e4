"""Output folders that cannot destroy a user's data.

Every folder stalecast writes holds a marker file (`MARKER`). `--out DIR` may replace DIR only when DIR does not
exist, is empty, or holds the marker (an earlier stalecast output); anything else is an `OutputError` unless the
user passes `--force`. The current folder and the folders above it are never replaced, forced or not.

Two ways to write:
- `staged(out)`: everything is written into a scratch folder beside `out`, which replaces `out` in one rename at
  the end (a reader sees the old folder or the new one, never a mix); on any error the scratch folder is removed.
  Scratch folders of a process killed outright (SIGKILL) are removed by the next command writing to the same
  `out`.
- `claim(out)`: for outputs written in place as work finishes (studies, plans and training runs, which resume
  from what a killed run left): the folder is created, or kept if it is stalecast's, and marked.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sim.errors import OutputError

MARKER = ".stalecast-output"
_SCRATCH = ".stalecast-tmp-"  # in scratch folder names: `.NAME.stalecast-tmp-PID-XXXX`


def is_stalecast_output(path: Path) -> bool:
    return (path / MARKER).is_file()


def check_out(out: Path, force: bool = False, option: str = "--out") -> None:
    """Raise OutputError unless `out` may be (re)written: absent, an empty folder, or a stalecast output; with
    `force`, any folder. Never the current folder or one above it."""
    try:
        resolved, here = out.resolve(), Path.cwd().resolve()
    except OSError as exc:
        raise OutputError(f"{option} {out}: cannot resolve the path: {exc.strerror or exc}") from None
    if resolved == here or resolved in here.parents:
        raise OutputError(f"{option} {out}: is the current folder or a folder above it; name a new folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"{option} {out}: exists and is not a folder")
    if force or is_stalecast_output(out) or not any(out.iterdir()):
        return
    raise OutputError(f"{option} {out}: the folder exists and was not written by stalecast (it has no {MARKER} "
                      f"file); name another folder, empty it, or pass --force to replace it and everything in it")


def _mark(folder: Path, kind: str) -> None:
    (folder / MARKER).write_text(json.dumps({"written_by": "stalecast", "kind": kind}) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_scratch(out: Path) -> None:
    """Scratch and set-aside folders of `out` left by processes that no longer run (killed outright)."""
    if not out.parent.is_dir():
        return
    for path in out.parent.glob(f".{out.name}.stalecast-*-*"):
        pid = path.name[len(f".{out.name}.stalecast-"):].split("-")[1]
        if path.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _make_parent(out: Path, option: str) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{option} {out}: cannot create its parent folder: {exc.strerror or exc}") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {out}: no permission to write in {out.parent}")


def replace_dir(new: Path, target: Path) -> None:
    """Put folder `new` at `target`, moving any old one aside first so `target` is never missing or mixed.
    Callers check `target` with `check_out` first."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.stalecast-old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged(out: Path, kind: str, force: bool = False, option: str = "--out") -> Iterator[Path]:
    """A scratch folder to write `out`'s content into; it becomes `out` (marked) when the block ends without
    error, and is removed otherwise."""
    out = Path(out)
    check_out(out, force, option)
    _make_parent(out, option)
    remove_stale_scratch(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{_SCRATCH}{os.getpid()}-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the output gets the user's usual permissions
    try:
        yield tmp
        _mark(tmp, kind)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def claim(out: Path, kind: str, force: bool = False, option: str = "--out", fresh: bool = False) -> Path:
    """Make `out` a marked stalecast folder to write into in place. fresh: empty it first (a new run, not a
    resumed one). Returns `out`."""
    out = Path(out)
    check_out(out, force, option)
    _make_parent(out, option)
    remove_stale_scratch(out)
    if fresh and out.exists():
        # Set aside in one rename, then delete: a crash leaves the old content or nothing, never a mix.
        old = out.with_name(f".{out.name}.stalecast-old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        out.mkdir(exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{option} {out}: cannot create the folder: {exc.strerror or exc}") from None
    if not is_stalecast_output(out):
        _mark(out, kind)
    return out
