"""Shared test set-up."""

from __future__ import annotations

import os

import pytest
from mlflow_server import Server


@pytest.fixture(autouse=True)
def _isolated_tracking_uri():
    """MLflow's ``set_tracking_uri`` (also called by Lightning's MLFlowLogger) exports ``MLFLOW_TRACKING_URI`` to
    the process: restore it after each test, so that a test in the same worker never inherits another test's
    (possibly deleted) store."""
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    """A local ``mlflow server`` (sqlite backend) for the tests of one module."""
    server = Server(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()
