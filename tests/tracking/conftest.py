"""Fixtures of the tracking tests: a tiny Robot-DIFT package (the published layout, the tiny SD 2.1-topology
base) and an Engine on it."""

from __future__ import annotations

import pytest

from robot_package import student_unet, write_package


@pytest.fixture(scope="session")
def robot_package(tmp_path_factory, tiny_base):
    return write_package(tmp_path_factory.mktemp("robot") / "robot-dift-encoder", student_unet(tiny_base.unet))


@pytest.fixture(scope="session")
def robot_engine(robot_package, tiny_base_dir):
    from cleandift_rt import Engine

    return Engine(robot_package, base=str(tiny_base_dir), size=(64, 64))
