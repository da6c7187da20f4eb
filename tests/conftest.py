import pytest

from services import redis_server  # noqa: F401 (a fixture: a real redis-server, for every test module)


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def tiny() -> tuple[object, object]:
    """A tiny random-weight Llama and its byte-level tokenizer (tests/local_models.py); skips without torch."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from local_models import build

    return build()
