"""Makes the registry's torchvision import beside a CPU build of torch (`make install` runs it).

Why: vLLM's Qwen2.5-VL model imports transformers' Qwen2-VL image processor, which imports
`torchvision.transforms.v2`. The registry's torchvision wheels for Linux are CUDA builds: their
compiled ops (`torchvision/_C.so`: nms, roi_align, ...) link against torch's CUDA libraries and
do not load beside `torch==2.13.0+cpu`. torchvision is written to run without them
(`torchvision.extension._has_ops()` is then False, and every other op registration checks it),
but two fake-tensor registrations in `_meta_registrations.py` (`torchvision::nms`, `::qnms`) do
not check, so `import torchvision` raises "operator torchvision::nms does not exist". The CPU
wheel (`torchvision==0.28.0+cpu` on download.pytorch.org/whl/cpu) does not have the problem; where
that index is not reachable, this script guards those two registrations the way torchvision
guards the others. Nothing that needs the compiled ops is used (the image and video transforms
are pure torch).

Usage: `python tools/torchvision_cpu.py` (idempotent; exits 0 when torchvision imports, prints
what it did). A CUDA machine with a matching CUDA torch needs nothing: the script sees the ops
load and changes nothing.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

GUARD = ("def _register_fake_if_ops(name):  # added by longrl_jax tools/torchvision_cpu.py\n"
         "    if torchvision.extension._has_ops():\n"
         "        return torch.library.register_fake(name)\n"
         "    return lambda fn: fn\n\n\n")
UNGUARDED = re.compile(r'^@torch\.library\.register_fake\((".*?")\)', re.M)


def imports() -> tuple[bool, str]:
    r = subprocess.run([sys.executable, "-c", "import torchvision.transforms.v2"],
                       capture_output=True, text=True)
    return r.returncode == 0, (r.stderr.strip().splitlines() or [""])[-1]


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        print("torchvision is not installed: nothing to do")
        return 0
    ok, err = imports()
    if ok:
        print("torchvision imports: nothing to do")
        return 0
    if "torchvision::" not in err or "does not exist" not in err:
        print(f"torchvision fails to import for another reason: {err}", file=sys.stderr)
        return 1
    path = os.path.join(os.path.dirname(spec.origin), "_meta_registrations.py")
    with open(path) as f:
        src = f.read()
    names = UNGUARDED.findall(src)
    if not names:
        print(f"{path} has no unguarded fake registration to guard; error: {err}", file=sys.stderr)
        return 1
    src = UNGUARDED.sub(r"@_register_fake_if_ops(\1)", src)
    anchor = "@functools.lru_cache(None)\ndef get_meta_lib():"
    if anchor not in src:
        print(f"{path}: unexpected layout, not patched", file=sys.stderr)
        return 1
    src = src.replace(anchor, GUARD + anchor, 1)
    with open(path, "w") as f:
        f.write(src)
    ok, err = imports()
    print(f"guarded {len(names)} registration(s) in {path} ({', '.join(names)}): "
          f"{'torchvision imports' if ok else 'still failing: ' + err}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
