"""The in-flight count a model reads: from the server that started it, or none at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from postsim.model_repository.in_flight import IN_FLIGHT_FILE_ENV, InFlightCount, create_in_flight_file


def test_a_model_reads_the_count_of_the_server_that_started_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "in-flight"
    create_in_flight_file(path)
    front_end = InFlightCount(path, writable=True)
    monkeypatch.setenv(IN_FLIGHT_FILE_ENV, str(path))
    model = InFlightCount.from_environment()
    assert model is not None
    assert model.read() == 0
    front_end.write(5)
    assert model.read() == 5
    front_end.write(1)
    assert model.read() == 1
    with pytest.raises(TypeError):
        model.write(2)  # a model only reads
    model.close()
    front_end.close()


def test_a_model_outside_postsim_serve_has_no_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(IN_FLIGHT_FILE_ENV, raising=False)
    assert InFlightCount.from_environment() is None
    monkeypatch.setenv(IN_FLIGHT_FILE_ENV, str(tmp_path / "gone"))  # a server that stopped took its file along
    assert InFlightCount.from_environment() is None
