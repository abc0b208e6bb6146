"""A real tritonserver (PyPI's nvidia-pytriton wheel, Triton 2.51.0) with the zimage backend,
on loopback ports only, for the tests in this folder. scripts/test-triton.sh builds the
backend and the model repository and sets the environment read here:

  TRITONSERVER        the tritonserver binary
  ZIMAGE_BACKENDS     the backend directory (holds zimage/libtriton_zimage.so)
  ZIMAGE_REPOSITORY   the model repository (models "zimage", "zimage_reload", "zimage_control",
                      "zimage_lora", "zimage_omni")
  ZIMAGE_CLI          the zimage binary (reference images)
  ZIMAGE_PACKAGE      the model package both use
  ZIMAGE_CONTROL_PACKAGE  the package of "zimage_control" (with ControlNet union-v2.1)
  ZIMAGE_LORA_FILE    the LoRA "zimage_lora" merges at scale 0.8
  ZIMAGE_OMNI_PACKAGE the editing package of "zimage_omni"
  ZIMAGE_RESULTS      a folder for the load run's numbers (load.json)
"""

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest


def env_path(name):
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(f"{name} is not set: run the tests through scripts/test-triton.sh")
    return Path(value)


def free_ports(count):
    """Ports the kernel hands out on 127.0.0.1 right now (closed again before use)."""
    sockets, ports = [], []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


class Server:
    def __init__(self, process, http_port, grpc_port, metrics_port, log_path):
        self.process = process
        self.http_url = f"127.0.0.1:{http_port}"
        self.grpc_url = f"127.0.0.1:{grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.log_path = log_path

    @property
    def pid(self):
        return self.process.pid

    def alive(self):
        return self.process.poll() is None

    def ready(self):
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def log_tail(self, lines=60):
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def metrics(self):
        """The Prometheus text as {(name, sorted label items): value}."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
            text = r.read().decode()
        values = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            key, value = line.rsplit(" ", 1)
            if "{" in key:
                name, rest = key.split("{", 1)
                labels = []
                for item in rest.rstrip("}").split(","):
                    if item:
                        k, v = item.split("=", 1)
                        labels.append((k, v.strip('"')))
                key = (name, tuple(sorted(labels)))
            else:
                key = (key, ())
            values[key] = float(value)
        return values

    def rss_kib(self):
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")


def start_server(log_path, models=("zimage",), env=None):
    """Starts tritonserver with `models` loaded (explicit model control: the others in the
    repository load on request) and waits until it is ready."""
    tritonserver = env_path("TRITONSERVER")
    for attempt in range(3):
        http_port, grpc_port, metrics_port = free_ports(3)
        log = open(log_path, "w")
        command = [
            str(tritonserver),
            f"--model-repository={env_path('ZIMAGE_REPOSITORY')}",
            f"--backend-directory={env_path('ZIMAGE_BACKENDS')}",
            # Loopback only, every listener.
            "--http-address=127.0.0.1",
            f"--http-port={http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={grpc_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={metrics_port}",
            "--allow-sagemaker=false",
            "--allow-vertex-ai=false",
            "--model-control-mode=explicit",
            *[f"--load-model={m}" for m in models],
            "--exit-timeout-secs=20",
            "--log-verbose=1",
        ]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, **(env or {})})
        server = Server(process, http_port, grpc_port, metrics_port, log_path)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and server.alive() and not server.ready():
            time.sleep(0.25)
        if server.ready():
            return server
        stop_server(server)
        if "Address already in use" not in server.log_tail(200):
            raise RuntimeError(f"tritonserver did not become ready:\n{server.log_tail()}")
    raise RuntimeError("tritonserver found no free ports in three tries")


def stop_server(server):
    """SIGTERM, then Triton's own exit timeout; returns the exit code."""
    if server.alive():
        server.process.send_signal(signal.SIGTERM)
    try:
        return server.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=10)
        return None


def check_clean_exit(server):
    code = stop_server(server)
    log = server.log_path.read_text(errors="replace")
    # The backend's finalizers ran and the server exited on its own, within its exit timeout.
    assert code == 0, f"tritonserver exited with {code}:\n{server.log_tail()}"
    assert "panicked" not in log, server.log_tail()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("tritonserver") / "tritonserver.log")
    yield server
    check_clean_exit(server)


@pytest.fixture(scope="session")
def zimage_cli():
    return env_path("ZIMAGE_CLI")


@pytest.fixture(scope="session")
def package():
    return env_path("ZIMAGE_PACKAGE")


@pytest.fixture(scope="session")
def results_dir():
    path = env_path("ZIMAGE_RESULTS")
    path.mkdir(parents=True, exist_ok=True)
    return path
