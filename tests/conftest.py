import pytest

from tests.meshharness import Mesh
from tests.proxy_harness import Sidecar, Upstream
from tests.tlspeers import make_ca


@pytest.fixture
def mesh(tmp_path):
    m = Mesh(tmp_path)
    try:
        yield m
    finally:
        m.cleanup()


@pytest.fixture
def mesh_factory(tmp_path):
    meshes = []

    def make(name: str) -> Mesh:
        d = tmp_path / name
        d.mkdir()
        m = Mesh(d)
        meshes.append(m)
        return m

    try:
        yield make
    finally:
        for m in meshes:
            m.cleanup()


@pytest.fixture
def upstream():
    up = Upstream("app")
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture
def sidecars():
    """Start real sidecar processes (tests/proxy_harness.py); all are stopped at the end."""
    started: list[Sidecar] = []

    def start(*args, **kwargs) -> Sidecar:
        sidecar = Sidecar(*args, **kwargs)
        started.append(sidecar)
        return sidecar

    try:
        yield start
    finally:
        for sidecar in started:
            sidecar.stop()


@pytest.fixture
def cleanup():
    """Register anything with a .stop(); all are stopped in reverse order at the end."""
    things = []
    try:
        yield things.append
    finally:
        for thing in reversed(things):
            thing.stop()


@pytest.fixture
def ca(tmp_path):
    """A fresh certificate authority of the mesh's own kind (meshctl/agent/ca.py)."""
    return make_ca(tmp_path / "ca")
