"""``precision: auto``: bf16 where the hardware has it natively, explicit precisions win, one line says why."""

from __future__ import annotations

import logging
from pathlib import Path
from unittest import mock

import pytest

from lightning_ft.precision import cpu_bf16_flags, resolve_precision

ROOT = Path(__file__).resolve().parents[1]
AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"
AMX = "processor\t: 0\nflags\t\t: avx512f amx_tile amx_bf16\n"


@pytest.fixture
def cpuinfo(tmp_path):
    def write(text):
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        return path
    return write


def test_cpu_flags_decide(cpuinfo):
    with mock.patch("torch.cuda.is_available", return_value=False):
        assert resolve_precision(cpuinfo=cpuinfo(AVX2)).precision == "32-true"
        choice = resolve_precision(cpuinfo=cpuinfo(AVX512_BF16))
        assert choice.precision == "bf16-mixed" and "avx512_bf16" in choice.reason
        assert resolve_precision("cpu", cpuinfo=cpuinfo(AMX)).precision == "bf16-mixed"
        assert resolve_precision(cpuinfo=cpuinfo(AVX2)).reason.startswith("CPU without native bf16")
        assert resolve_precision("mps", cpuinfo=cpuinfo(AMX)).precision == "32-true"
    assert cpu_bf16_flags(Path("/nonexistent/cpuinfo")) == []


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bf16-mixed"), (False, "16-mixed")])
def test_cuda_gpus(cpuinfo, bf16, expected):
    with mock.patch("torch.cuda.is_available", return_value=True), \
            mock.patch("torch.cuda.is_bf16_supported", return_value=bf16), \
            mock.patch("torch.cuda.get_device_name", return_value="Tesla T4"):
        assert resolve_precision("auto", cpuinfo=cpuinfo(AVX2)).precision == expected
        assert resolve_precision("gpu", cpuinfo=cpuinfo(AVX2)).precision == expected
        assert resolve_precision("cpu", cpuinfo=cpuinfo(AVX2)).precision == "32-true"  # the accelerator asked for


def test_cli_resolves_auto_in_the_quickstart_and_explicit_wins(tiny_model_dir, caplog):
    from lightning_ft.cli import main

    base = ["--config", str(ROOT / "configs/quickstart.yaml"), "--model.model_name", tiny_model_dir]
    expected = resolve_precision("auto").precision
    with caplog.at_level(logging.INFO):
        cli = main(base, run=False)
    assert cli.trainer.precision == expected
    assert f"precision: auto -> {expected}" in caplog.text
    assert main([*base, "--trainer.precision", "32-true"], run=False).trainer.precision == "32-true"
    with mock.patch("lightning_ft.cli.resolve_precision", return_value=type(resolve_precision())("16-mixed", "x")):
        assert main([*base, "--trainer.precision", "bf16-mixed"], run=False).trainer.precision == "bf16-mixed"
    with pytest.raises(SystemExit):
        main([*base, "--trainer.precision", "fast"], run=False)
