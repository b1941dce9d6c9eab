"""The small command lines on jsonargparse: ``--help`` of each, one spelling per option, old spellings accepted
with a note for one release."""

from __future__ import annotations

import pytest

from dime_lightning import compare, reproduce, tracking_queue
from dime_lightning.small_cli import respell


@pytest.mark.parametrize(("main", "argv", "options"), [
    (compare.main, ["--help"], ["--experiment", "--group_by", "--tracking_uri", "--config"]),
    (reproduce.main, ["--help"], ["--tasks", "--first_seed", "--tracking_uri", "--dry_run", "--slurm_time",
                                  "--slurm_max_requeues", "--config"]),
    (tracking_queue.main, ["--help"], ["replay"]),
    (tracking_queue.main, ["replay", "--help"], ["--tracking_uri", "target"]),
], ids=["compare", "reproduce", "tracking_queue", "tracking_queue-replay"])
def test_every_small_cli_has_help_with_one_spelling(main, argv, options, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(option in out for option in options), out
    assert "--tracking-uri" not in out and "--dry-run" not in out and "--slurm-" not in out


def test_an_old_spelling_still_works_with_a_deprecation_note(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert reproduce.main(["--tasks", "pendulum", "--seeds", "1", "--first-seed", "3", "--dry-run",
                           "--reference", "none", "--workdir", str(tmp_path / "runs"), "--tracking-uri", uri]) == 0
    captured = capsys.readouterr()
    assert "--dry-run is deprecated, use --dry_run" in captured.err
    assert "--first-seed is deprecated, use --first_seed" in captured.err
    (command,) = captured.out.strip().splitlines()  # --dry_run: the one fit command, with the old flags' values
    assert "--seed_everything 3" in command and uri in command


def test_arguments_for_the_fits_are_left_as_they_are():
    assert respell(["--dry-run", "--tracking-uri=x", "--", "--dry-run"], ("--dry_run", "--tracking_uri"), "p") == [
        "--dry_run", "--tracking_uri=x", "--", "--dry-run"]
