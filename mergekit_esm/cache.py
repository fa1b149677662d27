"""Content-keyed on-disk cache for expert-written samples and merged updates.

An entry is a directory named by a hash of everything that determines its content; it is
written under a temporary name and renamed when complete, so an interrupted run never
leaves an entry that looks usable.
"""

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

# Bumped whenever the merged updates a key stands for change: 2 leaves null directions
# out of the merge (algebra.merge.carrying_directions); 3 flattens eigenvalues keeping each
# expert's norm under preserve_norm with TSV-M's combination; 4 leaves out directions below
# the checkpoint's rounding level (algebra.merge.storage_rounding_level); 5 keeps no more of
# an expert's directions than ΔW has above that level (algebra.merge.rank_above_rounding); 6
# measures the whitened factors' size with eigenvalue flattening undone under preserve_norm
# (algebra.merge.with_unflattened_sigma); 7 writes each expert's factors in singular form
# before TSV-M's combination (algebra.merge.in_singular_form: `whiten_factors: false`, `basis: svd`).
CACHE_VERSION = 7


def cache_root(configured: str | None) -> Path:
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("MERGEKIT_ESM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mergekit-esm"


def fingerprint(*parts: Any) -> str:
    blob = json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def files_fingerprint(directory: str, names: list[str]) -> list:
    """Identity of a model's files by name, size and modification time (not by content:
    hashing tens of GB on every merge would cost more than the merge)."""
    out = []
    for name in sorted(set(names)):
        stat = os.stat(os.path.join(directory, name))
        out.append((name, stat.st_size, stat.st_mtime_ns))
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(folder: Path, prefix: str) -> None:
    """Remove the folders `prefix<pid>` and `prefix<pid>-<suffix>` whose process is gone:
    what a killed run left."""
    for stale in folder.glob(prefix + "*"):
        pid = stale.name.removeprefix(prefix).split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def process_temporary_directory(kind: str) -> tempfile.TemporaryDirectory:
    """A temporary folder `mergekit-esm-<kind>-<pid>-<random>` in the system's temp folder,
    after removing those of processes that are gone: SIGKILL runs no cleanup, and without the
    owner's pid in the name a later run could not tell a left-over folder from a live one."""
    prefix = f"mergekit-esm-{kind}-"
    remove_stale(Path(tempfile.gettempdir()), prefix)
    return tempfile.TemporaryDirectory(prefix=f"{prefix}{os.getpid()}-")


class CacheEntry:
    def __init__(self, root: Path, kind: str, key: str):
        self.path = root / kind / key

    @property
    def complete(self) -> bool:
        return (self.path / "complete").is_file()

    @contextmanager
    def writing(self) -> Iterator[Path]:
        """Yield a scratch directory that becomes this entry only if the block succeeds."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(self.path.parent, self.path.name + ".tmp-")
        scratch = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        try:
            yield scratch
            (scratch / "complete").touch()
            if self.path.exists():  # a concurrent run finished the same entry first
                shutil.rmtree(scratch)
            else:
                os.replace(scratch, self.path)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
