"""`llmx list` and `llmx show` as a user meets them: one line per recipe in 80 columns, filters, full description."""

import pytest

from llmx.catalog import describe, paper_group, render_list, select
from llmx.config.compose import list_recipes
from llmx.utils import LlmxError


@pytest.fixture(scope="module")
def rows():
    return list_recipes()


def test_list_fits_80_columns_with_one_line_per_recipe(rows):
    text = render_list(rows, width=80)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 80
    recipe_lines = [line for line in lines if line.startswith("  ")]
    assert sorted(line.split()[0] for line in recipe_lines) == sorted(r["name"] for r in rows)
    headings = [line for line in lines if not line.startswith(" ")]
    assert len(lines) == len(rows) + len(headings)
    assert "GaLore 2" in headings and "R-Sparse" in headings
    assert "GaLore 2 (AdamW baseline)" not in headings  # qualifiers list under their paper
    assert any(line.endswith("…") for line in recipe_lines)  # long descriptions are cut, not wrapped
    # Without a width nothing is cut: the whole description is on the recipe's line.
    full = render_list(rows, width=None)
    for r in rows:
        assert any(line.split()[0] == r["name"] and line.endswith(r["description"])
                   for line in full.splitlines() if line.startswith("  ")), r["name"]


def test_columns_align_within_a_group_and_names_are_never_cut(rows):
    text = render_list(rows, width=40, ellipsis="...")
    group = None
    starts = {}
    for line in text.splitlines():
        if not line.startswith(" "):
            group = line
            continue
        name, kind = line.split()[:2]
        assert any(r["name"] == name for r in rows)
        starts.setdefault(group, set()).add(line.index(kind, 2 + len(name)))
    assert all(len(s) == 1 for s in starts.values())


def test_filters_and_grouping_by_kind(rows):
    cpu = select(rows, cpu=True)
    assert cpu and all(r["fits_cpu"] for r in cpu) and len(cpu) < len(rows)
    sparsify = select(rows, kind="sparsify", paper="r-sparse")
    assert {r["name"] for r in sparsify} >= {"rsparse_smollm2", "teal_smollm2", "rsparse_llama3_8b"}
    assert all(r["paper"] == "R-Sparse" for r in sparsify)
    by_kind = render_list(select(rows, kind="merge"), by="kind").splitlines()
    assert by_kind[0] == "merge" and all(line.startswith("  ") for line in by_kind[1:])
    assert paper_group("GaLore 2 (AdamW baseline)") == "GaLore 2"


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "pretrian"}, "kinds: eval, generate_bench, merge, pretrain"),
    ({"paper": "no such paper"}, "papers: CoCoMix"),
])
def test_bad_filters_name_the_valid_values(rows, kwargs, message):
    with pytest.raises(LlmxError, match=message):
        select(rows, **kwargs)
    with pytest.raises(LlmxError, match="--by 'recipe'; valid: paper, kind"):
        render_list(rows, by="recipe")


def test_every_cpu_recipe_says_how_long_it_takes(rows):
    missing = [r["name"] for r in rows if r["fits_cpu"] and not r["cpu_time"]]
    assert not missing, f"fits_cpu recipes without a measured cpu_time: {missing}"


def test_show_header_has_the_recipe_file_comment_and_time(rows):
    row = next(r for r in rows if r["name"] == "cocomix_tiny")
    text = describe(row)
    assert text.startswith("# cocomix_tiny: pretrain, CoCoMix, fits 2 CPU cores\n# measured time on CPU: 7 min")
    assert "llmx run recipe=sae_smollm2" in text  # from the YAML's comment block
    assert all(line.startswith("#") for line in text.splitlines())  # still parses as YAML
    gpu = describe(next(r for r in rows if r["name"] == "rsparse_llama3_8b"))
    assert "needs GPUs" in gpu
