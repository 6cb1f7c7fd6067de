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


def test_each_representation_gets_the_format_of_nearest_bits_whose_groups_divide_the_layers():
    from experiments.representations import choose_formats

    ref_llama = [(384, 384)] * 4 + [(1024, 384)] * 2 + [(384, 1024)]
    smollm2 = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    got = {w: {r: f for r, (f, _) in reps.items()} for w, reps in choose_formats(ref_llama).items()}
    assert got["about 2 bits"] == {"scalar": "int2g128", "vector": "vq8g4", "additive": "2x8g8"}
    assert got["about 1.5 bits"] == {"scalar": "int1g64", "vector": "vq9g8", "additive": "2x6g8"}
    assert choose_formats(smollm2)["about 2 bits"]["scalar"][0] == "int2g192"  # 128 does not divide 576


def test_the_representations_table_has_a_row_per_strategy_and_a_column_per_format():
    import json
    from pathlib import Path

    from experiments.representations import markdown, table

    folder = Path(__file__).resolve().parents[1] / "experiments" / "results"
    summaries = [json.loads((folder / f).read_text()) for f in
                 ("representations/ref-llama_int2g128.json", "representations/ref-llama_vq8g4.json")]
    t = table(summaries)
    assert set(t["about 2 bits"]) == {"scalar", "vector"}
    assert t["about 2 bits"]["vector"]["rows"]["pv"] == summaries[1]["runs"]["pv"]["ppl"]
    lines = markdown(t).splitlines()
    assert len(lines) == 2 + 6 and "int2g128" in lines[0] and "vq8g4" in lines[0]
