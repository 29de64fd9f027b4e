"""Transport security off loopback: a token on every RPC and TLS, on a real server bound to a
non-loopback address of this machine (or to 0.0.0.0, which the off-loopback rules also cover,
when the machine has none). Certificates are made here with the openssl CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import grpc
import numpy as np
import pytest
from rollout_fixtures import TOKEN, server_env, write_served_qwen2
from safetensors.numpy import load_file

from longrl_jax.rl.connection import RolloutServerProcess
from longrl_jax.rl.rollout_client import RolloutClient, RolloutError

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def _own_address() -> tuple[str, str]:
    """(bind host, host to connect to): a non-loopback IPv4 address of this machine if any."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    except OSError:
        out = []
    ips = [a for a in out if "." in a and not a.startswith("127.")]
    return (ips[0], ips[0]) if ips else ("0.0.0.0", "127.0.0.1")


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _certs(d, ip: str, name: str = "ca") -> dict:
    """A CA and a server certificate it signs, valid for `ip` and 127.0.0.1."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             f"/CN=test-{name}", "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=rollout", "-keyout",
             f"{name}-server.key", "-out", f"{name}-server.csr", cwd=d)
    (d / f"{name}-san.ext").write_text(f"subjectAltName=IP:{ip},IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", f"{name}-server.csr", "-CA", f"{name}.pem", "-CAkey",
             f"{name}.key", "-CAcreateserial", "-days", "2", "-extfile", f"{name}-san.ext",
             "-out", f"{name}-server.pem", cwd=d)
    return {"ca": str(d / f"{name}.pem"), "cert": str(d / f"{name}-server.pem"),
            "key": str(d / f"{name}-server.key")}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(certificates, folder): a CA, a server certificate for this machine, a tiny model."""
    d = tmp_path_factory.mktemp("tls")
    certs = _certs(d, _own_address()[1])
    write_served_qwen2(str(d / "qwen2"))
    return certs, d


@pytest.fixture(scope="module")
def tls_server(made):
    certs, d = made
    bind, connect = _own_address()
    path = str(d / "qwen2")
    # a 0.0.0.0 bind is reached through loopback; the server still applies off-loopback rules
    server = RolloutServerProcess(path, host=bind, connect_host=connect, token=TOKEN,
                                  env=server_env(), log_path=str(d / "server.log"),
                                  tls_cert=certs["cert"], tls_key=certs["key"],
                                  ca_file=certs["ca"], args=["--max-model-len", "256"])
    with server:
        yield server, certs, d, load_file(f"{path}/model.safetensors")


PROMPT = [9, 20, 31, 42]


def _code(fn):
    with pytest.raises(RolloutError) as err:
        fn()
    return err.value.code


def test_right_ca_and_token_work(tls_server):
    server, certs, _, weights = tls_server
    with RolloutClient(server.address, TOKEN, ca_file=certs["ca"]) as c:
        info = c.info()
        assert c.update_weights(weights, info.weight_version + 1).weight_version == \
            info.weight_version + 1     # off loopback: the streamed transport
        [[s]] = c.generate([PROMPT], max_tokens=4, temperature=0.0, ignore_eos=True)
        assert len(s.token_ids) == 4 and s.weight_version == info.weight_version + 1
    assert "TLS" in open(server.log_path).read()


def test_refused_without_token_or_tls(tls_server, tmp_path):
    server, certs, d, weights = tls_server
    v = server.client.info().weight_version
    rpcs = [lambda c: c.health(), lambda c: c.info(), lambda c: c.has_embeddings(["k"]),
            lambda c: c.put_embeddings("k", np.zeros((1, 64), np.float32)),
            lambda c: c.generate([PROMPT], max_tokens=2),
            lambda c: c.update_weights(weights, v + 1, transport="stream"),
            lambda c: c.shutdown()]
    # TLS right, token missing or wrong: every RPC, Shutdown and UpdateWeights included
    for token in (None, "wrong"):
        with RolloutClient(server.address, token, ca_file=certs["ca"], timeout_s=30) as c:
            for rpc in rpcs:
                assert _code(lambda rpc=rpc: rpc(c)) == grpc.StatusCode.UNAUTHENTICATED
    # token right, but plaintext, or a CA that did not sign the server's certificate
    other = _certs(d, "127.0.0.1", name="other")
    for ca in (None, other["ca"]):
        with RolloutClient(server.address, TOKEN, ca_file=ca, timeout_s=10) as c:
            for rpc in rpcs:
                assert _code(lambda rpc=rpc: rpc(c)) == grpc.StatusCode.UNAVAILABLE
    assert server.alive() and server.client.info().weight_version == v


def _start(args, cwd):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # this checkout's server
    env = dict(os.environ, PYTHONPATH=repo)
    return subprocess.run([sys.executable, "-m", "rollout_server", *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=cwd)


def test_bad_secret_files_fail_startup_with_one_line(made, tmp_path):
    certs, d = made
    bind, _ = _own_address()
    token = tmp_path / "token"
    token.write_text(TOKEN)
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    model = ["--model_dir", str(d / "qwen2"), "--host", bind, "--port", "0"]
    tls = ["--tls-cert", certs["cert"], "--tls-key", certs["key"]]
    cases = {
        "refusing to serve without --token-file": model,
        f"--token-file {empty} is empty": model + ["--token-file", str(empty)] + tls,
        "--token-file " + str(tmp_path / "missing"):
            model + ["--token-file", str(tmp_path / "missing")] + tls,
        f"--tls-cert {empty} is empty": model + ["--token-file", str(token), "--tls-cert",
                                              str(empty), "--tls-key", certs["key"]],
        "--tls-key " + str(tmp_path / "nokey"): model + [
            "--token-file", str(token), "--tls-cert", certs["cert"], "--tls-key",
            str(tmp_path / "nokey")],
        "--tls-cert and --tls-key go together": model + ["--token-file", str(token),
                                                         "--tls-cert", certs["cert"]],
        "not a PEM file": model + ["--token-file", str(token), "--tls-cert", str(junk),
                                   "--tls-key", certs["key"]],
    }
    for want, args in cases.items():
        r = _start(args, tmp_path)
        assert r.returncode == 2, (want, r.stderr[-500:])
        assert want in r.stderr and r.stderr.strip().count("\n") == 0, (want, r.stderr)
