"""The A1111 stand-in fixture, shared by the A1111 host's test modules."""

from tests.webui.test_a1111_host import webui  # noqa: F401 - a fixture, found by name
