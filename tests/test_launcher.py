"""The server runs on vLLM's own launcher (setup_server + serve_http), so `vllm serve`'s serving flags mean what
they mean there: TLS, a Unix socket, parser plugins. And it stops as `vllm serve` does, on Ctrl-C as on SIGTERM:
exit status 0, no traceback, no process left behind. Each test starts its own server (vLLM's multiprocess layout)
and stops it with the signal under test."""

import json
import os
import signal
import socket
import subprocess

import openai
import psutil
import pytest
import requests

import support
from conftest import MP
from support import GREEDY, HANG_S, PROMPTS, ROOT, greedy_ids

PLUGIN = ROOT / "tests" / "plugins" / "echo_tool_parser.py"
TOOL = {"type": "function", "function": {"name": "probe", "description": "Look something up.",
                                         "parameters": {"type": "object", "properties": {"text": {"type": "string"}}}}}


def self_signed(directory):
    """(certificate, key) files of a self-signed certificate for 127.0.0.1."""
    cert, key = str(directory / "cert.pem"), str(directory / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def stopped_cleanly(server, signum, group=False):
    """Send `signum` (to the whole process group: Ctrl-C in a terminal), then: exit status 0, no traceback in
    the server's output, nothing of its tree left."""
    tree = psutil.Process(server.proc.pid).children(recursive=True)
    if group:
        os.killpg(server.proc.pid, signum)
    else:
        server.proc.send_signal(signum)
    assert server.proc.wait(HANG_S) == 0, server.log_tail()
    assert server.stop() == 0 and not server.left_behind, server.left_behind
    _, alive = psutil.wait_procs(tree, timeout=support.STOP_TIMEOUT_S)
    assert not alive, [(p.pid, p.name()) for p in alive]
    log = server.log_text()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]


def test_https_only_with_a_tool_parser_plugin_then_ctrl_c(models, start_server, tmp_path):
    """--ssl-certfile/--ssl-keyfile: HTTPS answers, plain HTTP on the same port does not. --tool-parser-plugin:
    the plugin file's parser (`echo`, unknown to vLLM otherwise) turns the chat's output into its tool call.
    Then Ctrl-C to the process group."""
    cert, key = self_signed(tmp_path)
    server = start_server(models["seed0"], "--enable-auto-tool-choice", "--tool-call-parser", "echo",
                          "--tool-parser-plugin", str(PLUGIN), env=MP, name="tls", tls=(cert, key))
    with server.http() as http:
        assert http.get("/health").json()["status"] == "ok"
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{server.port}/health", timeout=HANG_S)

    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", http_client=server.http())
    chat = sdk.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Look up Paris."}],
                                       tools=[TOOL], max_tokens=4, temperature=0)
    (call,) = chat.choices[0].message.tool_calls
    text = json.loads(call.function.arguments)["text"]
    assert call.function.name == "probe" and isinstance(text, str) and chat.usage.completion_tokens == 4, chat
    stopped_cleanly(server, signal.SIGINT, group=True)


def test_unix_socket_then_sigterm(models, start_server, reference_llm, tmp_path):
    """--uds: the server answers on the socket, with the reference's exact tokens, and binds no TCP port."""
    path = str(tmp_path / "server.sock")
    server = start_server(models["seed0"], env=MP, name="uds", uds=path)
    with server.http() as http:
        body = http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPTS[:2], "max_tokens": 8,
                                                  **GREEDY}).json()
    assert [c["token_ids"] for c in body["choices"]] == greedy_ids(reference_llm(models["seed0"]), PROMPTS[:2], 8)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=HANG_S).close()
    stopped_cleanly(server, signal.SIGTERM)
