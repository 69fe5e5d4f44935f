"""`lightning_ft plot`: TensorBoard scalars of several runs into one PNG, with clear errors."""

from __future__ import annotations

from torch.utils.tensorboard import SummaryWriter

from lightning_ft.commands.plot import run
from lightning_ft.plotting import read_scalars


def _run(directory, values):
    writer = SummaryWriter(str(directory))
    for step, value in enumerate(values):
        writer.add_scalar("forgetting/acc", value, step * 5)
        writer.add_scalar("val/loss", 2.0 - value, step * 5)
    writer.close()
    return directory


def test_read_scalars_and_plot_two_runs(tmp_path, capsys):
    full = _run(tmp_path / "full" / "version_0", [0.6, 0.5, 0.4])
    lora = _run(tmp_path / "lora" / "version_0", [0.6, 0.61, 0.6])
    assert read_scalars(tmp_path / "full") == {
        "forgetting/acc": [(0, 0.6000000238418579), (5, 0.5), (10, 0.4000000059604645)],
        "val/loss": [(0, 1.399999976158142), (5, 1.5), (10, 1.600000023841858)],
    }
    out = tmp_path / "plots" / "demo.png"
    assert run([f"full={full}", str(tmp_path / "lora"), "--tags", "forgetting/acc", "val/loss",
                "--hline", "forgetting/acc=0.55", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.parent.iterdir() if p.name != "demo.png"]  # no temporary file left


def test_plot_errors_name_the_problem(tmp_path, capsys):
    _run(tmp_path / "a" / "version_0", [0.5])
    _run(tmp_path / "a" / "version_1", [0.5])
    out = tmp_path / "x.png"
    assert run([str(tmp_path / "a"), "--out", str(out)]) == 1
    assert "holds 2 runs" in capsys.readouterr().err
    assert run([str(tmp_path / "a" / "version_0"), "--tags", "nope", "--out", str(out)]) == 1
    assert "No run logged nope; logged tags: forgetting/acc, val/loss" in capsys.readouterr().err
    assert run([str(tmp_path / "missing"), "--out", str(out)]) == 1
    assert "no such run directory" in capsys.readouterr().err
    assert not out.exists()
