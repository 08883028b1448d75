"""Real components the tests start for themselves: an S3 server (moto in server mode, in its
own process), used through the ``s3_server`` and ``s3`` fixtures of conftest.py; and
``needed``, which imports the package a component needs."""

import importlib
import os
import socket
import subprocess
import sys
import time

import pytest


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def needed(name):
    """The module ``name``. Where it is missing, the test skips, except in CI (``CI`` set),
    which installs the test extra: there a missing component is the test's failure."""
    if os.environ.get("CI"):
        return importlib.import_module(name)
    return pytest.importorskip(name)


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server in its own process; the environment points every S3 client at it."""
    needed("moto")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "moto did not start"
            time.sleep(0.1)
    environment = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                   "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    yield endpoint
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    server.terminate()
    server.wait()


@pytest.fixture
def s3(s3_server, request):
    """A fresh bucket (named after the test) and an s3fs client of the server."""
    s3fs = needed("s3fs")
    fs = s3fs.S3FileSystem(endpoint_url=s3_server, key="testing", secret="testing")
    bucket = "t-" + request.node.name.replace("_", "-")[:40].lower().strip("-")
    fs.mkdir(bucket)
    return fs, bucket
