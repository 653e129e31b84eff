"""One batch run per output folder (or per shard of it), held with ``flock`` for the whole run.

Two runs on one OUT would both do all the work and race on every output. A run without
``--shard`` takes an exclusive lock on ``OUT/.ipv2-batch/locks/run.lock``. A shard ``K/N`` takes
a *shared* lock on that file (shards of one job run side by side, but never beside an unsharded
run) and an exclusive lock on ``shard-K-of-N.lock`` (the same shard never runs twice at once);
a shard of another N holding its lock refuses the run too.
The kernel releases a lock when its holder dies, even by ``kill -9``, so a stale lock never
blocks. Each lock file holds its holder's ``pid N on host H`` for the refusal message. On a
shared file system ``flock`` must reach across machines (NFS does; Lustre needs ``-o flock``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from IPv2DenoiseLib.app.batch.records import STATE_DIR
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.locks import lock_holder, open_lock_file, record_holder, try_lock, unlock

#: Folder inside OUT holding the lock files.
LOCK_DIR = f"{STATE_DIR}/locks"
#: The lock every run takes: exclusive without ``--shard``, shared by shards.
RUN_LOCK = "run.lock"


def shard_lock_name(shard: tuple[int, int]) -> str:
    return f"shard-{shard[0]}-of-{shard[1]}.lock"


_SHARD_LOCK = re.compile(r"^shard-(\d+)-of-(\d+)\.lock$")


def _live_shard_holders(lock_dir: Path, *, except_of: int | None = None) -> list[str]:
    """``pid N on host H`` of every shard lock that is held right now (probed, not guessed),
    leaving out the shards of ``except_of`` shards (one's own job)."""
    holders = []
    for path in sorted(lock_dir.glob("shard-*-of-*.lock")):
        match = _SHARD_LOCK.match(path.name)
        if not match or int(match.group(2)) == except_of:
            continue
        fd = open_lock_file(path)
        try:
            if try_lock(fd):
                unlock(fd)
            else:
                holders.append(f"{path.stem}: {lock_holder(path)}")
        finally:
            os.close(fd)
    return holders


def _refuse(out_root: Path, holder: str) -> UserError:
    return UserError(
        f"OUT {out_root} is in use by another batch run ({holder}); wait for it to end, "
        "or split the work with --shard K/N (shards of one job may share OUT)"
    )


@contextmanager
def batch_lock(out_root: str | os.PathLike, shard: tuple[int, int] | None = None) -> Iterator[None]:
    """Hold OUT (or one shard of it) for a batch run; refuse at once when another run holds it.

    Raises
    ------
    UserError
        Another live run holds the lock (its pid and host named), or the lock file cannot be opened.
    """
    out_root = Path(out_root)
    lock_dir = out_root / LOCK_DIR
    run_path = lock_dir / RUN_LOCK
    with ExitStack() as stack:
        run_fd = open_lock_file(run_path)
        stack.callback(os.close, run_fd)  # closing the descriptor releases its lock
        if shard is None:
            if not try_lock(run_fd):
                if try_lock(run_fd, shared=True):  # only shards hold it
                    unlock(run_fd)
                    raise _refuse(out_root, "; ".join(_live_shard_holders(lock_dir)) or "a shard run")
                raise _refuse(out_root, lock_holder(run_path))
            record_holder(run_fd)
        else:
            if not try_lock(run_fd, shared=True):
                raise _refuse(out_root, lock_holder(run_path))
            shard_path = lock_dir / shard_lock_name(shard)
            shard_fd = open_lock_file(shard_path)
            stack.callback(os.close, shard_fd)
            if not try_lock(shard_fd):
                raise _refuse(out_root, f"shard {shard[0]}/{shard[1]}: {lock_holder(shard_path)}")
            record_holder(shard_fd)
            # Shards of another N cover other case lists; checked after locking ours, so of two
            # such runs starting at once at least one sees the other.
            others = _live_shard_holders(lock_dir, except_of=shard[1])
            if others:
                raise _refuse(out_root, "; ".join(others))
        yield


__all__ = ["LOCK_DIR", "RUN_LOCK", "batch_lock", "shard_lock_name"]
