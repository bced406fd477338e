import pytest

from tests.meshharness import Mesh


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
