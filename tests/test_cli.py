"""The `seqpar` command line (verify runs a real local gloo world)."""
import pytest

from seqpar.cli import main


def test_verify_passes_for_an_exact_strategy(capsys):
    assert main(["verify", "--strategy", "usp", "--world", "4", "--ulysses", "2", "--layout", "zigzag",
                 "--causal", "--kv-heads", "2", "--seq", "32"]) == 0
    assert "-> OK" in capsys.readouterr().out


def test_verify_wallfacer_with_topology_placement(capsys):
    assert main(["verify", "--strategy", "wallfacer", "--world", "4", "--team-size", "2", "--placement", "rings_intra",
                 "--ranks-per-node", "2", "--layout", "zigzag", "--causal", "--seq", "32"]) == 0
    assert "-> OK" in capsys.readouterr().out


def test_bad_configuration_is_a_clear_error_not_a_traceback(capsys):
    assert main(["verify", "--strategy", "usp", "--world", "2", "--ulysses", "4"]) == 2
    err = capsys.readouterr().err
    assert "seqpar verify: error: usp needs ulysses x ring" in err and "Traceback" not in err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_unknown_strategy_rejected_by_parser():
    with pytest.raises(SystemExit):
        main(["verify", "--strategy", "nope"])
