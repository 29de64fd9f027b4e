"""The web demo in a real headless Chromium (Selenium): load the page, ask about a synthetic
video, read the answer back; it must be the answer `tools/ask.py` gives for the same question.

Needs the Debian packages chromium and chromium-driver (`make test` installs them when it runs
as root, see the Makefile's `browser` target); without them this one test is skipped, saying so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = "Which appeared first in the video?"
OPTIONS = ["red circle", "blue square", "green circle", "white square"]

pytest.importorskip("gradio", reason="the web demo needs gradio (pip install -e '.[test]')")
pytest.importorskip("selenium", reason="the browser test needs selenium (pip install -e '.[test]')")
if not (shutil.which("chromedriver") and (shutil.which("chromium")
                                          or shutil.which("chromium-browser"))):
    pytest.skip("no headless browser: install the Debian packages chromium and chromium-driver "
                "(root: `make browser`, or apt-get install chromium chromium-driver)",
                allow_module_level=True)


def _env():
    return dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", JAX_PLATFORMS="cpu", XLA_FLAGS="",
                TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """(checkpoint dir, video dir): a tiny VLM in the HF layout with the suite's tokenizer, and
    synthetic mp4s."""
    import jax
    from flax import nnx
    from transformers import AutoTokenizer

    from longrl_jax.data import synthetic
    from longrl_jax.models import VLM, ModelConfig, hf
    from longrl_jax.prompts import Tokens
    root = tmp_path_factory.mktemp("webdemo")
    data = str(root / "data")
    synthetic.generate(data, num_train=2, num_eval=2, num_frames=48, size=32, tokenizer=True)
    tokens = Tokens.of(AutoTokenizer.from_pretrained(f"{data}/tokenizer"))
    cfg = ModelConfig.tiny(vocab_size=640).replace(video_token_id=tokens.video,
                                                   separator_token_id=tokens.separator)
    model = VLM(cfg, rngs=nnx.Rngs(0))
    # weights far from init: greedy decoding then writes text, not an immediate stop token
    nnx.update(model, jax.tree.map(lambda x: 5 * x, nnx.state(model, nnx.Param)))
    ckpt = str(root / "ckpt")
    hf.save_pretrained(model, ckpt, tokenizer_dir=f"{data}/tokenizer")
    return ckpt, f"{data}/videos"


@pytest.fixture(scope="module")
def server(policy):
    from longrl_jax.rl.connection import RolloutServerProcess
    ckpt, _ = policy
    srv = RolloutServerProcess(ckpt, args=["--max-model-len", "2048", "--dtype", "float32",
                                           "--block-size", "32"],
                               env={"VLLM_CPU_KVCACHE_SPACE": "1"},
                               log_path=os.path.join(ckpt, "..", "server.log")).start()
    yield srv.address
    srv.stop()


def _wait_for_page(url: str, proc, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert proc.poll() is None, "the web demo exited"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError("the web demo did not serve its page")


def test_ask_in_a_headless_browser(policy, server, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from longrl_jax.rl.connection import free_port
    ckpt, videos = policy
    port = free_port()
    log = open(tmp_path / "web_demo.log", "w")
    proc = subprocess.Popen([sys.executable, "tools/web_demo.py", f"--checkpoint={ckpt}",
                             f"--videos={videos}", f"--port={port}", "--max_tokens=24",
                             f"--rollout_address={server}"], cwd=ROOT, env=_env(),
                            stdout=log, stderr=subprocess.STDOUT)
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1100"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = None
    try:
        _wait_for_page(f"http://127.0.0.1:{port}/", proc)
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 300)
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#question textarea"))
        box.send_keys(QUESTION)
        driver.find_element(By.CSS_SELECTOR, "#options textarea").send_keys("\n".join(OPTIONS))
        driver.find_element(By.CSS_SELECTOR, "#ask").click()
        wait.until(lambda d: "Answered" in d.find_element(By.CSS_SELECTOR, "#status").text)
        answer = driver.find_element(By.CSS_SELECTOR, "#answer textarea").get_attribute("value")
        reasoning = driver.find_element(By.CSS_SELECTOR,
                                        "#reasoning textarea").get_attribute("value")
        shown = driver.find_elements(By.CSS_SELECTOR, "#frames img")
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(tmp_path / "web_demo.png"))
    finally:
        if driver is not None:
            driver.quit()
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    assert len(shown) >= 1                      # the sampled frames are on the page
    if os.environ.get("WEB_DEMO_SCREENSHOT"):   # where to keep the page's screenshot (README)
        shutil.copy(tmp_path / "web_demo.png", os.environ["WEB_DEMO_SCREENSHOT"])
    # the same question through the command line, on the video the page had picked
    first = sorted(os.listdir(videos))[0]
    r = subprocess.run([sys.executable, "tools/ask.py", f"--checkpoint={ckpt}",
                        f"--video={videos}/{first}", f"--question={QUESTION}",
                        f"--options={','.join(OPTIONS)}", "--max_tokens=24",
                        f"--rollout_address={server}"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert answer.strip()
    assert f"Answer: {answer}\n" in out + "\n"
    assert f"Reasoning: {reasoning or '(none)'}" in out
    assert "A. red circle\nB. blue square" in out
