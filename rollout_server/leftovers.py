"""Shared-memory files a SIGKILLed server leaves behind, removed when the next one starts.

/dev/shm is memory: a server killed while it received a streamed update leaves its
`rollout-upd-<pid>-*` file, and vLLM's engine leaves its ring buffers (`psm_*`) and
multiprocessing semaphores (`sem.mp-*`), because the processes that would unlink them died with
it. Update files carry their writer's pid; vLLM's names do not, so one of those is removed only
when it is ours (same uid), older than a minute, and no live process holds it open or mapped.
"""

from __future__ import annotations

import os
import re
import time

UPDATE_FILE_PREFIX = "rollout-upd-"
_UPDATE_FILE = re.compile(re.escape(UPDATE_FILE_PREFIX) + r"(\d+)-\w+")
_ENGINE_FILE = re.compile(r"psm_[0-9a-f]+|sem\.mp-\w+")
MIN_AGE_S = 60.0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def files_in_use(shm_dir: str, pids=None) -> set[str]:
    """Names in `shm_dir` that a process we can see (of `pids`, default all) has open or
    mapped."""
    shm_dir = os.path.realpath(shm_dir) + os.sep
    used = set()
    for pid in pids if pids is not None else os.listdir("/proc"):
        pid = str(pid)
        if not pid.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith(shm_dir):
                    used.add(target[len(shm_dir):].split(" ")[0])
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    i = line.find(shm_dir)
                    if i >= 0:
                        used.add(line[i + len(shm_dir):].split(" ")[0].strip())
        except OSError:   # gone, or not ours to read
            continue
    return used


def sweep(shm_dir: str) -> list[str]:
    """Removes what dead servers left in `shm_dir`; returns the names removed."""
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return []
    stale = []
    candidates = []
    for name in names:
        m = _UPDATE_FILE.fullmatch(name)
        if m:
            if not pid_alive(int(m.group(1))):
                stale.append(name)
        elif _ENGINE_FILE.fullmatch(name):
            candidates.append(name)
    if candidates:
        now, uid, used = time.time(), os.getuid(), files_in_use(shm_dir)
        for name in candidates:
            try:
                st = os.stat(os.path.join(shm_dir, name))
            except OSError:
                continue
            if st.st_uid == uid and now - st.st_mtime > MIN_AGE_S and name not in used:
                stale.append(name)
    removed = []
    for name in stale:
        try:
            os.remove(os.path.join(shm_dir, name))
            removed.append(name)
        except OSError:
            pass
    return removed
