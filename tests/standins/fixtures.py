"""pytest fixtures for the push stand-ins (registered in tests/conftest.py through pytest_plugins).

    settings = fcm_standin.settings(test_settings)              # FCM_CREDENTIALS + FCM_ENDPOINT at the stand-in
    settings = apns_standin.settings(fcm_standin.settings(...)) # and APNs VoIP too
    env = {**fcm_standin.env(), **apns_standin.env()}           # the same for a server process
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.settings import Settings
from tests.standins.apns import ApnsStandin
from tests.standins.fcm import FcmStandin


class FcmFixture(FcmStandin):
    """An FCM stand-in that knows where to write its service-account file."""

    def __init__(self, directory: Path, tls: bool = False) -> None:
        super().__init__(tls=tls, directory=directory)
        self.credentials_path = directory / "fcm-service-account.json"

    def settings(self, base: Settings, credentials_path: Path | None = None, **extra: Any) -> Settings:
        return super().settings(base, credentials_path or self.credentials_path, **extra)

    def env(self, credentials_path: Path | None = None) -> dict[str, str]:
        return super().env(credentials_path or self.credentials_path)


@pytest.fixture
def fcm_standin(tmp_path: Path) -> Iterator[FcmFixture]:
    standin = FcmFixture(tmp_path)
    standin.start()
    try:
        yield standin
    finally:
        standin.stop()


@pytest.fixture
def apns_standin(tmp_path: Path) -> Iterator[ApnsStandin]:
    standin = ApnsStandin(tmp_path).start()
    try:
        yield standin
    finally:
        standin.stop()


def fcm_settings(base: Settings, fcm: FcmFixture, apns: ApnsStandin | None = None, **extra: Any) -> Settings:
    """`base` sending its pushes to the stand-ins."""
    settings = fcm.settings(base, **extra)
    return apns.settings(settings) if apns else settings
