import pytest

from tf_secondorder.bench import runner, tasks


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if a task's data is loaded or a run starts."""

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(tasks, "get_task", refuse)
    monkeypatch.setattr(runner, "run", refuse)
