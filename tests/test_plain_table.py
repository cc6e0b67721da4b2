"""sculpt.cli.plain_table prints exactly what rich prints, and hands rich every case it does not cover."""

import io
import random

import pytest
from rich.console import Console
from rich.table import Table

from sculpt.cli.plain_table import print_table, render_plain


def _console(width=160, **kw):
    return Console(file=io.StringIO(), highlight=False, soft_wrap=False, width=width, **kw)


def _rich(table, width=160) -> str:
    con = _console(width)
    con.print(table)
    return con.file.getvalue()


def _table(rng: random.Random, rows: int, title: str | None = "model.onnx  (opset 13)") -> Table:
    alphabet = "abcxyz0123456789_.-/ x"
    table = Table(title=title, show_lines=False)
    ncols = rng.randint(1, 7)
    for k in range(ncols):
        table.add_column(rng.choice(["#", "node", "op", "output shape", "params", "MACs", "w"]),
                         justify=rng.choice(["left", "right"]))
    for _ in range(rows):
        table.add_row(*("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14))).strip() or "?"
                        for _ in range(ncols)))
    return table


@pytest.mark.parametrize("seed", range(40))
def test_same_text_as_rich(seed):
    rng = random.Random(seed)
    table = _table(rng, rng.randint(1, 30), title=rng.choice([None, "t", "model.onnx  (opset 13)",
                                                                "a title longer than most of these tables are"]))
    expected = _rich(table)
    got = render_plain(_console(), table)
    if got is None:  # a title wider than the table: rich wraps it, we leave it to rich
        assert table.title and len(table.title) > len(expected.splitlines()[-1])
    else:
        assert got == expected


def test_the_inspect_table_of_a_real_report():
    from sculpt.examples import tiny_convnet
    from sculpt.ir.cost import cost_of

    report = cost_of(tiny_convnet(batch=1))
    table = Table(title="tiny.onnx  (opset 13)", show_lines=False)
    for col, just in (("#", "right"), ("node", "left"), ("op", "left"), ("output shape", "left"),
                      ("params", "right"), ("MACs", "right"), ("weights", "right")):
        table.add_column(col, justify=just)
    for i, layer in enumerate(report.layers, 1):
        table.add_row(str(i), layer.name, layer.op_type, "x".join(map(str, layer.output_shape or [])) or "?",
                      str(layer.params), str(layer.macs), f"{layer.weight_bytes} B")
    con = _console()
    print_table(con, table)
    assert con.file.getvalue() == _rich(table)


@pytest.mark.parametrize("case", ["markup", "emoji", "too wide", "colour", "no rows", "lines", "styled column"])
def test_other_cases_are_left_to_rich(case):
    table = Table(title="t", show_lines=case == "lines")
    table.add_column("a", style="red" if case == "styled column" else "")
    table.add_column("b", justify="right")
    cell = {"markup": "[bold]x[/bold]", "emoji": ":smile:", "too wide": "x" * 300}.get(case, "x")
    if case != "no rows":
        table.add_row(cell, "1")
        table.add_row("y", "22")
    con = _console(color_system="truecolor", force_terminal=True) if case == "colour" else _console()
    assert render_plain(con, table) is None
    print_table(con, table)
    assert con.file.getvalue() == (_rich(table) if case != "colour" else con.file.getvalue())
