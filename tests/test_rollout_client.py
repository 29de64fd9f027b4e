"""Client-side housekeeping that needs no server: stale weight files in /dev/shm."""

import os
import subprocess
import sys
import uuid

from longrl_jax.rl import rollout_client


def test_sweep_removes_only_files_of_dead_writers(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    names = {
        "dead": f"{rollout_client.WEIGHT_FILE_PREFIX}{dead_pid}-{uuid.uuid4().hex}",
        "alive": f"{rollout_client.WEIGHT_FILE_PREFIX}{os.getpid()}-{uuid.uuid4().hex}",
        "other": f"psm_{uuid.uuid4().hex[:8]}",
        "not_ours": f"{rollout_client.WEIGHT_FILE_PREFIX}{dead_pid}-notahexsuffix",
    }
    for n in names.values():
        (tmp_path / n).write_bytes(b"x" * 16)
    removed = rollout_client.sweep_stale_weight_files(str(tmp_path))
    assert removed == [names["dead"]]
    assert sorted(os.listdir(tmp_path)) == sorted(v for k, v in names.items() if k != "dead")
    assert rollout_client.sweep_stale_weight_files(str(tmp_path / "missing")) == []
