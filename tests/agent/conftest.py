"""The agent tests run real MiniWoB++ pages in headless Chromium. `make test` installs Chromium and
its driver (as root, as in CI): there a missing browser is a failure, elsewhere a skip that says
what to install."""
import os

import pytest

pytest.importorskip("miniwob")


@pytest.fixture(scope="session", autouse=True)
def chromium():
    from hybrid_lm.agent.env import find_chromium

    try:
        find_chromium()
    except RuntimeError as e:
        if os.geteuid() == 0:
            raise
        pytest.skip(str(e))
