"""Files on disk: writes that never leave a half-written file, and the prompt-file reader.

Every file or folder sfvideo writes (checkpoints' exports, trajectories, prompt embeddings, videos, contact sheets,
benchmark JSON) goes through :class:`AtomicFile` or :func:`atomic_folder`: the content is written under a hidden
temporary name next to the target (``.<name>.<pid>-<random>.partial``) and renamed onto it in one ``os.replace``, so the
target is either absent, the previous version, or complete. Temporaries honour the umask like ordinary files.

Bottom layer: imports nothing from sfvideo.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

PARTIAL_SUFFIX = ".partial"
"""Suffix of every temporary file or folder (``.<name>.<pid>-<random>.partial``); :func:`clean_stale_partials`
removes those of writers that were killed."""


def _temporary_name(path: Path) -> Path:
    # The writer's pid is in the name, so a later run can tell a killed writer's leftover from a live one's.
    return path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{PARTIAL_SUFFIX}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_partials(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of ``path`` left by writers that no longer run (a SIGKILLed ``generate``); returns
    them. A temporary of a running process is kept."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    prefix = f".{path.name}."
    for tmp in path.parent.iterdir():
        name = tmp.name
        if not (name.startswith(prefix) and name.endswith(PARTIAL_SUFFIX)):
            continue
        token = name[len(prefix) : -len(PARTIAL_SUFFIX)]
        pid = token.split("-", 1)[0]
        if "-" in token and pid.isdigit() and _alive(int(pid)):
            continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


class AtomicFile:
    """A file that appears under ``path`` only when committed.

    ``tmp`` (created empty, in the target's folder) takes the content; :meth:`commit` renames it onto ``path``,
    :meth:`discard` removes it. As a context manager it yields ``tmp`` and commits on success, discards on an
    exception::

        with AtomicFile("out.json") as tmp:
            tmp.write_text(text)

    Args:
        path: The target file.
        make_parents: Create missing parent folders first.
    """

    def __init__(self, path: str | os.PathLike, *, make_parents: bool = False) -> None:
        self.path = Path(path)
        if make_parents:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = _temporary_name(self.path)
        self.tmp.open("xb").close()  # "x": never reuse a name; ordinary open: the umask applies
        self.done = False

    def commit(self) -> Path:
        """Rename the temporary onto the target; returns the target."""
        os.replace(self.tmp, self.path)
        self.done = True
        return self.path

    def discard(self) -> None:
        """Remove the temporary (the target is left as it was)."""
        self.tmp.unlink(missing_ok=True)
        self.done = True

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


@contextmanager
def atomic_folder(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it becomes ``path`` (replacing it with ``overwrite``).

    The swap of an existing folder is two renames (the old folder is moved aside first, then removed).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False (checked before anything is written).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = _temporary_name(path)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """Prompts of a text file, one per line, blank lines skipped.

    Raises:
        FileNotFoundError: no such file (message names it).
        ValueError: a line is not UTF-8 (message names the file and line number), or there is no prompt.
    """
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"prompt file {path} is a directory, not a file of prompts")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    prompts = []
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start} of the line)") from None
        line = line.strip()
        if line:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"{path}: no prompts (the file is empty or blank)")
    return prompts
