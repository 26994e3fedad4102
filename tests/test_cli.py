"""The `mmrank` command line itself: parsing that argparse alone would get wrong."""

import pytest

from mmrank.cli import parse_args


@pytest.mark.parametrize(
    "history, candidates",
    [("-3", "-1,2"), ("3,9", "-1,2"), ("-3,-4", "1,-2"), ("", "-1, 2"), ("-3", "-1")],
)
def test_id_lists_may_start_with_a_negative_id(history, candidates):
    args = parse_args(["rank", "--history", history, "--candidates", candidates])
    assert (args.history, args.candidates) == (history, candidates)


def test_an_option_after_an_id_list_option_is_still_an_option(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["rank", "--history", "--candidates", "1"])
    assert e.value.code == 2 and "--history: expected one argument" in capsys.readouterr().err
    args = parse_args(["loadtest", "--out", "o", "--candidates", "-5", "--users", "1,2"])
    assert args.candidates == -5 and args.users == "1,2"
