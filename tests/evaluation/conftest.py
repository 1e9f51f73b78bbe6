"""The tab tests' tiny model, dataset and stand-alone services, for the scoring job's tests."""

from tests.ui.conftest import dataset, jobs, services, tiny_host  # noqa: F401
