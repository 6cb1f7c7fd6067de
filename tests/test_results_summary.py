"""The README's headline figures are the values in the result files they cite."""
from experiments.summary import main


def test_every_headline_figure_matches_its_result_file():
    assert main(["--check"]) == 0
