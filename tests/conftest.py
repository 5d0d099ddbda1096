from __future__ import annotations

import pytest

# Every test marked with pytest.mark.anyio runs on asyncio and on trio unless it
# overrides this fixture (anyio's and starlette's conftest do the same).


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="asyncio"),
        pytest.param("trio", id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# The real redis-server fixtures (``redis_server``, ``private_redis``) and the
# Chromium ones (``chromium``, ``browser``) for every test module that asks for them.
pytest_plugins = ["tests.support.browser", "tests.support.redis_server"]
