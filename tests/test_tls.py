"""TLS and mTLS on both servers: real handshakes over loopback with certificates the test
generates (lmforge_server.certs), a wrong CA, a missing or foreign client certificate,
and `lmforge up --tls`."""

from __future__ import annotations

import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from conftest import make_settings

from lmforge import Client, RetryPolicy, errors
from lmforge_server.certs import issue, make_ca
from lmforge_server.stack import Stack

# A failed handshake is UNAVAILABLE, which the SDK retries with backoff: once is enough here.
ONE_TRY = RetryPolicy(max_attempts=1)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, other_ca, client_ca = make_ca("test CA"), make_ca("someone else's CA"), make_ca("clients")
    files = {
        "ca": ca.cert,
        "other_ca": other_ca.cert,
        "client_ca": client_ca.cert,
    }
    server = issue(ca, "localhost", ("localhost", "127.0.0.1"))
    client = issue(client_ca, "svc-a", client=True)
    foreign_client = issue(other_ca, "svc-b", client=True)
    for name, pem in (("server", server), ("client", client), ("foreign", foreign_client)):
        files[f"{name}_cert"], files[f"{name}_key"] = pem.cert, pem.key
    paths = {}
    for name, data in files.items():
        (d / f"{name}.pem").write_bytes(data)
        paths[name] = str(d / f"{name}.pem")
    return paths


def _probe(pki, client=True):
    return grpc.ssl_channel_credentials(
        root_certificates=open(pki["ca"], "rb").read(),
        private_key=open(pki["client_key"], "rb").read() if client else None,
        certificate_chain=open(pki["client_cert"], "rb").read() if client else None,
    )


def _models(client: Client) -> list:
    return list(client.models.list())


def test_tls_on_both_servers_trusts_only_the_right_ca(tmp_path, pki):
    settings = make_settings(
        tmp_path, tls_cert_file=pki["server_cert"], tls_key_file=pki["server_key"]
    )
    with Stack(settings, worker=False, probe_credentials=_probe(pki, client=False)) as s:
        addrs = dict(api_addr=s.api_addr, inference_addr=s.inference_addr, timeout=5)
        with Client(**addrs, tls_ca_file=pki["ca"]) as client:
            assert _models(client) == []
            with pytest.raises(errors.NotFoundError):  # the inference server, over TLS too
                client.generate("nope", "x", max_tokens=1)
        for wrong in (dict(tls_ca_file=pki["other_ca"]), {}):  # a wrong CA; plaintext
            with Client(**addrs, **wrong, retry=ONE_TRY) as client:
                with pytest.raises(errors.APIError) as e:
                    _models(client)
                assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_mtls_requires_a_client_certificate_from_the_client_ca(tmp_path, pki):
    settings = make_settings(
        tmp_path,
        tls_cert_file=pki["server_cert"],
        tls_key_file=pki["server_key"],
        tls_client_ca_file=pki["client_ca"],
    )
    with Stack(settings, inference=False, worker=False, probe_credentials=_probe(pki)) as s:
        addrs = dict(api_addr=s.api_addr, timeout=5, tls_ca_file=pki["ca"])
        with Client(
            **addrs, tls_client_cert_file=pki["client_cert"], tls_client_key_file=pki["client_key"]
        ) as client:
            assert _models(client) == []
        foreign = dict(
            tls_client_cert_file=pki["foreign_cert"], tls_client_key_file=pki["foreign_key"]
        )
        for bad in ({}, foreign):  # no client certificate; one from another CA
            with Client(**addrs, **bad, retry=ONE_TRY) as client:
                with pytest.raises(errors.APIError) as e:
                    _models(client)
                assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_http_gateway_serves_mtls_with_the_servers_certificate_and_reaches_them_over_tls(
    tmp_path, pki
):
    settings = make_settings(
        tmp_path,
        tls_cert_file=pki["server_cert"],
        tls_key_file=pki["server_key"],
        tls_client_ca_file=pki["client_ca"],
        # The gateway is the servers' client: it trusts their CA and shows its certificate.
        tls_ca_file=pki["ca"],
        tls_client_cert_file=pki["client_cert"],
        tls_client_key_file=pki["client_key"],
    )
    stack = Stack(settings, inference=False, worker=False, http=True, probe_credentials=_probe(pki))
    with stack as s:
        url = f"https://{s.settings.http_addr}/v1/models"
        me = (pki["client_cert"], pki["client_key"])
        # A 200 with the (empty) list: the handshake held and the gateway reached the API
        # server over mTLS.
        with urllib.request.urlopen(url, context=ssl_context(pki["ca"], me), timeout=10) as r:
            assert r.status == 200 and json.load(r)["data"] == []
        foreign = (pki["foreign_cert"], pki["foreign_key"])
        wrong = [
            ssl_context(pki["ca"]),  # no client certificate
            ssl_context(pki["ca"], foreign),  # one from another CA
            ssl_context(pki["other_ca"], me),  # the server's certificate is not trusted
        ]
        for context in wrong:
            with pytest.raises((OSError, http.client.HTTPException)):  # ssl.SSLError, reset
                urllib.request.urlopen(url, context=context, timeout=10).read()
        with pytest.raises((OSError, http.client.HTTPException)):  # plaintext to the TLS port
            urllib.request.urlopen(f"http://{s.settings.http_addr}/v1/models", timeout=10).read()


def ssl_context(ca: str, cert: tuple[str, str] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca)
    if cert:
        context.load_cert_chain(*cert)
    return context


@pytest.mark.slow  # the whole stack with a worker, through the CLI
def test_lmforge_up_tls_generates_a_ca_prints_it_and_serves_tls(tmp_path):
    data = tmp_path / "data"
    env = {**os.environ, "LMFORGE_TORCH_THREADS": "1", "LMFORGE_DEVICE": "cpu"}
    env.pop("LMFORGE_API_KEYS", None)
    cmd = [sys.executable, "-m", "lmforge.cli", "up", "--tls", "--data-dir", str(data)]
    cmd += ["--api-addr", "127.0.0.1:0", "--inference-addr", "127.0.0.1:0"]
    cmd += ["--http-addr", "127.0.0.1:0"]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        out = "".join(lines)
        assert "-----BEGIN CERTIFICATE-----" in out, out
        ca_file = data / "tls" / "ca.pem"
        assert ca_file.read_text() in out
        api_addr = next(ln.split()[1] for ln in lines if ln.strip().startswith("api "))
        with Client(api_addr=api_addr, tls_ca_file=str(ca_file), timeout=10) as client:
            assert _models(client) == []
        with Client(api_addr=api_addr, timeout=5, retry=ONE_TRY) as client:  # plaintext: refused
            with pytest.raises(errors.APIError):
                _models(client)
        # The console and the OpenAI API: https with the same CA, and it reaches the servers.
        console = next(ln.split()[1] for ln in lines if ln.strip().startswith("console "))
        assert console.startswith("https://127.0.0.1:"), console
        context = ssl.create_default_context(cafile=str(ca_file))
        with urllib.request.urlopen(console + "v1/models", context=context, timeout=10) as r:
            assert r.status == 200 and json.load(r)["data"] == []
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
