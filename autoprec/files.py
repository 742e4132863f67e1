"""Files autoprec reads and writes: typed errors, atomic writes, locked result directories.

A result directory is written whole or not at all: :func:`write_directory`
fills a temporary sibling and then swaps it into place (``renameat2`` with
``RENAME_EXCHANGE`` on Linux, two renames elsewhere), so readers see the
complete old result or the complete new one, never a mix, and an
interrupted save leaves the previous result intact. :class:`DirectoryLock`
holds an exclusive lock beside the directory for a whole run, so a second
writer fails at once instead of after its search.

>>> import tempfile, os
>>> root = tempfile.mkdtemp()
>>> with write_directory(os.path.join(root, "run")) as tmp:
...     _ = open(os.path.join(tmp, "a.txt"), "w").write("new")
>>> sorted(os.listdir(os.path.join(root, "run")))
['a.txt']
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from autoprec.errors import AutoprecError, OutputError

_RENAME_EXCHANGE = 2  # linux/fs.h


def read_text(path: str | os.PathLike, *, what: str, error: type[AutoprecError]) -> str:
    """The text of a file autoprec reads, with ``error`` naming the file and the fix."""
    text = os.fspath(path)
    if not os.path.exists(text):
        raise error(f"Expected a {what}. Received: {text!r}, which does not exist.")
    if os.path.isdir(text):
        raise error(f"Expected a {what}. Received: {text!r}, which is a directory; name the file inside it.")
    try:
        with open(text, encoding="utf-8") as fh:
            return fh.read()
    except UnicodeDecodeError:
        raise error(
            f"Expected a {what} (UTF-8 text). Received: {text!r}, which is binary or another encoding."
        ) from None
    except OSError as exc:
        raise error(f"Could not read the {what} {text!r}: {exc.strerror}.") from None


def check_parent(path: str | os.PathLike, *, what: str) -> str:
    """Raise :class:`OutputError` unless ``path`` could be created: its parent is a writable directory."""
    text = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(text)
    probe = parent
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe and not os.path.isdir(probe):
        raise OutputError(
            f"Cannot write the {what} {os.fspath(path)!r}: {probe!r} is a file, not a directory. Choose another path."
        )
    if not os.path.isdir(parent):
        raise OutputError(
            f"Cannot write the {what} {os.fspath(path)!r}: its directory {parent!r} does not exist. Create it first."
        )
    if not os.access(parent, os.W_OK):
        raise OutputError(f"Cannot write the {what} {os.fspath(path)!r}: its directory {parent!r} is not writable.")
    return text


def write_text_atomic(path: str | os.PathLike, text: str, *, what: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling and an atomic rename."""
    target = check_parent(path, what=what)
    if os.path.isdir(target):
        raise OutputError(f"Cannot write the {what} {os.fspath(path)!r}: a directory of that name is in the way.")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=os.path.dirname(target))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_output_directory(directory: str | os.PathLike) -> str:
    """Raise :class:`OutputError` unless ``directory`` can hold a result (new, or an existing directory)."""
    target = check_parent(directory, what="output directory")
    if os.path.exists(target) and not os.path.isdir(target):
        raise OutputError(f"Cannot write results into {os.fspath(directory)!r}: it is a file. Choose a directory path.")
    return target


class DirectoryLock:
    """An exclusive, non-blocking lock on a result directory, held in a sibling ``.NAME.lock`` file.

    A second holder fails at once with :class:`OutputError`. The lock is the
    kernel's (``flock``): it goes away with the process, even on SIGKILL.

    Example:
        >>> import tempfile, os
        >>> with DirectoryLock(os.path.join(tempfile.mkdtemp(), "run")):
        ...     pass
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = check_output_directory(directory)
        self.path = os.path.join(os.path.dirname(self.directory), f".{os.path.basename(self.directory)}.lock")
        self._fd: int | None = None

    def acquire(self) -> DirectoryLock:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise OutputError(
                    f"Cannot write results into {self.directory!r}: another autoprec run is writing there now "
                    f"(it holds {self.path!r}). Wait for it, or choose another output directory."
                ) from None
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def write_directory(directory: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary directory to fill; on success it replaces ``directory`` as a whole.

    On any exception (Ctrl-C included) the temporary directory is removed and
    ``directory`` is left as it was. Leftovers of a killed run are removed on the next call.
    """
    target = check_output_directory(directory)
    parent, name = os.path.dirname(target), os.path.basename(target)
    _remove_stale(parent, name)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=parent)
    try:
        yield tmp
        _swap_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_into_place(tmp: str, target: str) -> None:
    """Make ``tmp`` be ``target``; the old ``target``, if any, ends at ``tmp`` (removed by the caller)."""
    if not os.path.exists(target):
        os.rename(tmp, target)
        return
    if _exchange(tmp, target):
        return
    # No atomic exchange on this system: two renames, the old result kept until the new one is in place.
    old = tmp + ".old"
    os.rename(target, old)
    os.rename(tmp, target)
    os.rename(old, tmp)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically with Linux's renameat2(RENAME_EXCHANGE); False where unavailable."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    result = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def _remove_stale(parent: str, name: str) -> None:
    """Remove temporary directories left by runs that were killed (their process is gone)."""
    prefix = f".{name}.tmp-"
    for entry in os.listdir(parent):
        if not entry.startswith(prefix):
            continue
        pid = entry[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def process_alive(pid: int) -> bool:
    """True while a process of this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_model_file(path: str | os.PathLike, *, safe_mode: bool = True) -> Any:
    """Load a Keras model file with ``safe_mode`` (a model file is untrusted), every failure a typed error.

    Example:
        >>> model = load_model_file("model.keras")  # doctest: +SKIP
    """
    path = os.fspath(path)
    from autoprec.errors import DataError

    check_model_file(path)
    import keras  # only once the file is known to be there: the import costs seconds

    try:
        # safe_mode refuses lambda layers and arbitrary code in the file: a model file is untrusted input.
        return keras.models.load_model(path, safe_mode=safe_mode)
    except Exception as exc:  # Keras raises many kinds for a bad file; name the file and the likely fix
        text = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        if "safe_mode" in str(exc) or "lambda" in str(exc).lower():
            hint = (
                " It holds a Lambda layer or custom code; if you trust its source, pass --unsafe "
                "(safe_mode=False in Python)."
            )
        elif "could not locate" in str(exc).lower() or "register_keras_serializable" in str(exc):
            hint = (
                " It uses a custom layer that is not registered: import the module that defines it first "
                "(the CLI's --import my_module or --import my_layers.py; in Python, import it before loading), "
                "with the class decorated by @keras.saving.register_keras_serializable()."
            )
        else:
            hint = " The file may be damaged: save the model again."
        raise DataError(f"Could not load the Keras model {path!r}: {text}.{hint}") from None


def import_modules(specs: list[str] | tuple[str, ...]) -> None:
    """Import the user's modules (dotted names or ``.py`` paths) so the custom layers they register can load.

    A ``.keras`` file names its custom classes; Keras finds them only once the
    module that decorates them with ``@keras.saving.register_keras_serializable``
    has run. This is the CLI's ``--import``: code the user names, run on purpose.

    >>> import_modules(["my_project.layers", "extra_layers.py"])  # doctest: +SKIP
    """
    import importlib
    import importlib.util
    import sys

    from autoprec.errors import ArgumentError

    for spec in specs:
        try:
            if spec.endswith(".py"):
                if not os.path.isfile(spec):
                    raise FileNotFoundError(f"no file {spec!r}")
                name = os.path.splitext(os.path.basename(spec))[0]
                found = importlib.util.spec_from_file_location(name, spec)
                if found is None or found.loader is None:
                    raise ImportError(f"cannot import {spec!r}")
                module = importlib.util.module_from_spec(found)
                sys.modules[name] = module
                found.loader.exec_module(module)
            else:
                importlib.import_module(spec)
        except Exception as exc:
            raise ArgumentError(
                f"Expected --import to name a Python module or .py file that defines the model's custom layers. "
                f"Received {spec!r}, which failed to import ({type(exc).__name__}: {exc})."
            ) from None


def check_model_file(path: str) -> None:
    """A model path that cannot be a Keras model file fails here, before Keras is imported."""
    import zipfile

    from autoprec.errors import DataError

    if not os.path.exists(path):
        raise DataError(f"Expected a saved Keras model file. Received: {path!r}, which does not exist.")
    if os.path.isdir(path) or not path.endswith((".keras", ".h5", ".hdf5")):
        raise DataError(
            f"Expected a Keras model file (.keras, or legacy .h5). Received: {path!r}. Save the model with "
            "model.save('model.keras')."
        )
    if path.endswith(".keras") and not zipfile.is_zipfile(path):
        raise DataError(
            f"Expected a .keras model file (a zip archive). Received {path!r}, which is truncated or not a "
            "Keras file. Save the model again with model.save(...)."
        )
