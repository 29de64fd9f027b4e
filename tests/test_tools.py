"""The import/export command-line tools, run as a user would run them."""

import os
import subprocess
import sys

import numpy as np
import torch
from hf_fixtures import projector_torch, qwen2_hf, siglip_hf, write_longvila
from transformers import AutoModelForCausalLM

from longrl_jax.models import hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_import_then_export_vlm(tmp_path):
    tower, llm = siglip_hf(head=False), qwen2_hf(hidden=40, heads=4, kv=2, inter=48, vocab=64)
    write_longvila(str(tmp_path / "src"), llm, tower, projector_torch(tower.config.hidden_size, 40))
    r = _run("tools/import_hf.py", f"--hf_dir={tmp_path / 'src'}", f"--out={tmp_path / 'params'}")
    assert r.returncode == 0, r.stderr
    assert "VLM" in r.stdout and os.path.isdir(tmp_path / "params" / "params")
    r = _run("tools/export_hf.py", f"--model_dir={tmp_path / 'params'}",
             f"--out={tmp_path / 'out'}")
    assert r.returncode == 0, r.stderr
    for part in ("llm", "vision_tower", "mm_projector"):
        src = {hf._strip(k, ("mm_projector.",)): v
               for k, v in hf.read_tensors(str(tmp_path / "src" / part)).items()}
        out = hf.read_tensors(str(tmp_path / "out" / part))
        assert sorted(src) == sorted(out)
        for k in src:
            np.testing.assert_array_equal(src[k], out[k])
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "llm", dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3]])
    np.testing.assert_array_equal(back(ids).logits.detach().numpy(),
                                  llm(ids).logits.detach().numpy())


def test_import_of_a_broken_checkpoint_is_one_clear_line(tmp_path):
    qwen2_hf().save_pretrained(tmp_path / "src")
    os.remove(tmp_path / "src" / "config.json")
    r = _run("tools/import_hf.py", f"--hf_dir={tmp_path / 'src'}", f"--out={tmp_path / 'p'}")
    assert r.returncode != 0
    assert "no config.json" in r.stderr and "Traceback" not in r.stderr
