"""The README's headline figures are the values in the result files they cite."""
from experiments.summary import main


def test_every_headline_figure_matches_its_result_file():
    assert main(["--check"]) == 0


def test_plots_of_the_main_table_and_training_curves_are_written(tmp_path):
    import json
    from pathlib import Path

    from experiments.plots import plot_curves, plot_main_table

    folder = Path(__file__).resolve().parents[1] / "experiments" / "results" / "main_table"
    summaries = [s for s in (json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))) if "runs" in s]
    plot_main_table(summaries, tmp_path / "table.png")
    plot_curves(summaries[0], tmp_path / "curves.png")
    assert (tmp_path / "table.png").stat().st_size > 10_000 and (tmp_path / "curves.png").stat().st_size > 10_000


def test_reproduce_names_what_a_part_needs(capsys):
    import pytest

    from experiments.reproduce import main as reproduce

    with pytest.raises(SystemExit) as e:
        reproduce(["main-table", "--out", "unused"])
    assert e.value.code == 2 and "main-table needs --model and --corpus" in capsys.readouterr().err
