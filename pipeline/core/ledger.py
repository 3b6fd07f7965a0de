"""What the pipeline wrote: a ledger in each output folder, so that it overwrites and deletes only its own files.

Every folder the pipeline writes into holds a ledger, `.mat-pipeline`: JSON lines, each appended with one
`write` on a descriptor opened with O_APPEND (parallel workers do not interleave) and O_NOFOLLOW (a planted link
is refused, and so is a FIFO or a hard link under the name). The lines:

- `{"created": true}`: the pipeline created the folder (`make_dirs`), so it may remove it once nothing else is in it;
- `{"claim": "<owner>"}`: a command took the folder as its own (`make export` takes only a new or empty folder);
- `{"wrote": "<name>", ...}`: a file (with its size, and its sha256 when small) or, with
  `"tree": true`, a whole folder written by another library (a model's `save_pretrained`, TensorBoard, a checkpoint);
- `{"removed": "<name>"}`: the pipeline removed it.

The rules every writer and remover follows:

- A file or folder may be replaced or removed only if it is not a link and the ledger records its name as written
  (and not removed since). Its content is not compared: a shard damaged on disk is still ours to redo (the stats
  files' digests tell that). Anything else raises ForeignFileError naming the file and how to proceed.
- Temporary files are created exclusively (`tempfile.mkstemp`: O_EXCL, so never through a planted link) beside
  their target as `.<name>.<random>.tmp`; the rename onto the target happens only after the check above. The
  ones a killed write leaves are removed by the resumable commands as they start and by `make clean`
  (`remove_own_temps`: files of that pattern, in folders holding a ledger).

Outputs of versions before the ledger have none: the pipeline neither overwrites nor deletes them, and says so.
To go on, move or remove such a folder yourself (`rm -r <folder>`) and run the command again; `make clean`
leaves them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from stat import S_ISREG
from typing import Any

LEDGER = ".mat-pipeline"
TEMP_SUFFIX = ".tmp"
_OWN_TEMP = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")  # what temp_path's mkstemp/mkdtemp names look like


class ForeignFileError(ValueError):
    """The pipeline was asked to replace or remove something it cannot prove it wrote."""


def foreign(path: Path, action: str, advice: str = "move it away (or remove it) yourself and run again") -> ForeignFileError:
    what = "a symbolic link" if path.is_symlink() else f"not recorded as written by the pipeline in {path.parent / LEDGER}"
    return ForeignFileError(f"refusing to {action} {path}: it is {what}; {advice}")


class _State:
    def __init__(self) -> None:
        self.offset = 0
        self.inode = 0
        self.created = False
        self.claim: str | None = None
        self.written: dict[str, dict[str, Any]] = {}

    def apply(self, entry: dict[str, Any]) -> None:
        for key in ("wrote", "removed"):  # one name inside this folder, never a path out of it
            if key in entry and not _is_entry_name(entry[key]):
                return
        if entry.get("created"):
            self.created = True
        if "claim" in entry:
            self.claim = entry["claim"]
        if "wrote" in entry:
            self.written[entry["wrote"]] = entry
        if "removed" in entry:
            self.written.pop(entry["removed"], None)


_cache: dict[str, _State] = {}


def _is_entry_name(name: object) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..", LEDGER) and "/" not in name and "\0" not in name


def read(folder: Path) -> _State:
    """The folder's ledger as it stands (an empty state when it has none); only new lines are parsed again."""
    path = folder / LEDGER
    try:  # not through a link, and not blocking on a FIFO planted under the name
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        _cache.pop(str(path), None)
        return _State()
    with os.fdopen(fd, "rb") as handle:
        stat = os.fstat(fd)
        if not S_ISREG(stat.st_mode):
            return _State()
        state = _cache.get(str(path))
        if state is None or stat.st_ino != state.inode or stat.st_size < state.offset:
            state = _State()
            state.inode = stat.st_ino
        handle.seek(state.offset)
        data = handle.read()
    end = data.rfind(b"\n") + 1  # a line still being appended is read next time
    for line in data[:end].splitlines():
        try:
            state.apply(json.loads(line))
        except (ValueError, AttributeError):
            continue
    state.offset += end
    _cache[str(path)] = state
    return state


def _append(folder: Path, entry: dict[str, Any]) -> None:
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    problem = None
    try:
        fd = os.open(folder / LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as error:
        problem = error.strerror
    else:
        stat = os.fstat(fd)
        if not S_ISREG(stat.st_mode) or stat.st_nlink != 1:  # a FIFO, or a hard link to someone's file
            os.close(fd)
            problem = "not a plain file of its own"
    if problem:
        raise ForeignFileError(f"cannot write the ledger {folder / LEDGER} ({problem}): "
                               "remove whatever is there under that name and run again")
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def make_dirs(folder: Path) -> None:
    """`folder` and its missing parents; each one created here is marked as the pipeline's."""
    missing = []
    for parent in [folder, *folder.parents]:
        if parent.is_dir():
            break
        missing.append(parent)
    for parent in reversed(missing):
        try:
            parent.mkdir()
        except FileExistsError:
            if not parent.is_dir():
                raise
            continue  # made meanwhile by another worker, which marks it
        _append(parent, {"created": True})


def record(path: Path, *, tree: bool = False, size: int | None = None, sha256: str | None = None) -> None:
    entry: dict[str, Any] = {"wrote": path.name}
    if tree:
        entry["tree"] = True
    if size is not None:
        entry["size"] = size
    if sha256 is not None:
        entry["sha256"] = sha256
    _append(path.parent, entry)


def is_recorded(path: Path) -> bool:
    """True when `path` is no link and its folder's ledger says the pipeline wrote it."""
    return not path.is_symlink() and path.name in read(path.parent).written


def check_replaceable(path: Path) -> None:
    """ForeignFileError unless `path` is absent or the pipeline's own (see the module docstring)."""
    if (path.is_symlink() or path.exists()) and not is_recorded(path):
        raise foreign(path, "overwrite")


def claim_file(path: Path) -> None:
    """Before a library writes `path` in place (a plot, an appended log): check it may, then record it."""
    make_dirs(path.parent)
    check_replaceable(path)
    if not is_recorded(path):
        record(path)


def own_tree(directory: Path) -> Path:
    """A folder another library writes into (a model, TensorBoard): absent, empty or already ours, else
    ForeignFileError; recorded as the pipeline's."""
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise foreign(directory, "write into")
    if directory.is_dir() and not is_recorded(directory):
        if any(directory.iterdir()):
            raise foreign(directory, "write into", "choose another folder, or move this one away and run again")
    make_dirs(directory.parent)
    if not is_recorded(directory):
        record(directory, tree=True)
    directory.mkdir(exist_ok=True)  # no ledger inside: the whole tree is recorded in its parent's
    return directory


def remove_own(path: Path) -> bool:
    """Remove a file or folder the ledger records (False when there is nothing); ForeignFileError otherwise."""
    if not (path.is_symlink() or path.exists()):
        return False
    if not is_recorded(path):
        raise foreign(path, "remove")
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    _append(path.parent, {"removed": path.name})
    return True


def temp_path(target: Path, directory: bool = False) -> Path:
    """A new, exclusively created temporary file (or folder) beside `target`: `.<name>.<random>.tmp`."""
    make_dirs(target.parent)
    if directory:
        return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=TEMP_SUFFIX))
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    return Path(name)


def is_own_temp(path: Path) -> bool:
    """True for a name `temp_path` gives: a temporary file the pipeline left (a killed write)."""
    return _OWN_TEMP.fullmatch(path.name) is not None


def own_temps(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if is_own_temp(p)) if folder.is_dir() else []


def remove_own_temps(folder: Path) -> list[Path]:
    """Remove the temporary files (and checkpoint folders) killed writes left in a folder the pipeline wrote
    into; return them. Resumable commands call it as they start."""
    removed = own_temps(folder) if (folder / LEDGER).is_file() else []
    for tmp in removed:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp)
        else:
            tmp.unlink()
    return removed


def remove_if_emptied(folder: Path) -> bool:
    """Remove a folder the pipeline created once only its ledger is left in it; True if removed."""
    if folder.is_symlink() or not folder.is_dir() or not read(folder).created:
        return False
    if any(p.name != LEDGER for p in folder.iterdir()):
        return False
    (folder / LEDGER).unlink(missing_ok=True)
    _cache.pop(str(folder / LEDGER), None)
    folder.rmdir()
    return True


def remove_own_below(folder: Path) -> tuple[list[Path], list[Path]]:
    """Below `folder`, never through a link: remove what the ledgers record and the temporary files killed writes
    left, then each folder the pipeline created that this empties. Returns (removed, kept), kept being the files
    found in the pipeline's folders that it did not write."""
    removed: list[Path] = []
    kept: list[Path] = []
    if folder.is_symlink() or not folder.is_dir():
        return removed, kept
    has_ledger = (folder / LEDGER).is_file()
    for name in sorted(read(folder).written):
        if is_recorded(folder / name) and remove_own(folder / name):
            removed.append(folder / name)
    removed += remove_own_temps(folder)
    for sub in sorted(folder.iterdir()):
        if sub.is_dir() and not sub.is_symlink():
            more, other = remove_own_below(sub)
            removed += more
            kept += other
    if not remove_if_emptied(folder) and has_ledger:
        kept.extend(p for p in sorted(folder.iterdir()) if p.name != LEDGER and not p.is_dir())
    return removed, kept


def claim(folder: Path, owner: str) -> None:
    _append(folder, {"claim": owner})
