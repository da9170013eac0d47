"""`python -m model.benchmark NAME` reaches every benchmark script."""

import pytest

from model.benchmark import SCRIPTS, main


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_each_benchmark_answers_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert "usage" in capsys.readouterr().out.lower()


def test_unknown_benchmark_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown benchmark 'nope'"):
        main(["nope"])
