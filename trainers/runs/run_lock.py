"""One process at a time per run folder: an exclusive lock on `<run dir>/.lock`.

The lock is the kernel's (flock) and lives as long as the process: a run killed with SIGKILL
leaves no stale lock behind, and the next run into the folder takes it at once.
"""

import fcntl
import os

from ..errors import UserFacingError

LOCK_NAME = ".lock"


def lock_run_dir(run_dir):
    """Takes the run folder's lock for the rest of the process (returns the open lock file), or
    stops with a message when another process holds it."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK_NAME)
    handle = open(path, "a+")  # noqa: SIM115 - held open until the process ends
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserFacingError(
            f"{run_dir} is in use by {holder}: one run per folder at a time. Wait for it to finish (or stop it), "
            "or give this run another --output-dir."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()}\n")
    handle.flush()
    return handle
