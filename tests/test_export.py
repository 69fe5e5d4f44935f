"""Export: checkpoints and adapters to PEFT adapters or merged standalone models, written atomically."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
from peft import PeftModel
from test_module import fit, logits
from transformers import AutoModelForCausalLM

from lightning_ft import FineTuneModule, FullFineTune, LoRA
from lightning_ft.adapters import QLoRA
from lightning_ft.atomic import atomic_directory
from lightning_ft.cli import console_main
from lightning_ft.export import export


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_run")
    module = FineTuneModule(tiny_model_dir, adapter=LoRA(r=4, dropout=0.0), learning_rate=5e-3)
    trainer, _ = fit(module, tmp, steps=3)
    ckpt = tmp / "run.ckpt"
    trainer.save_checkpoint(ckpt)
    return module, ckpt, module.save_pretrained(tmp / "hf_model")


def test_checkpoint_to_adapter_directory(lora_run, tiny_model_dir, tmp_path, capsys):
    module, ckpt, _ = lora_run
    assert console_main(["export", "--checkpoint", str(ckpt), "--output_dir", str(tmp_path / "adapter")]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "adapter"
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    assert torch.equal(logits(reloaded), logits(module.model))


@pytest.mark.parametrize("source", ["checkpoint", "adapter_dir"])
def test_merge_gives_a_plain_model_with_matching_logits(lora_run, tmp_path, source):
    module, ckpt, adapter_dir = lora_run
    out = tmp_path / "merged"
    result = export(ckpt if source == "checkpoint" else adapter_dir, out, merge_adapter=True)
    assert result["kind"] == "merged" and result["max_logit_diff"] < 1e-4
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= names
    assert "adapter_config.json" not in names
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged), logits(module.model), atol=1e-4, rtol=1e-4)


def test_qlora_checkpoint_merges_onto_the_full_precision_base(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    module = FineTuneModule(tiny_model_dir, adapter=QLoRA(r=4, dropout=0.0, compute_dtype="float32"),
                            learning_rate=5e-3)
    trainer, _ = fit(module, tmp_path, steps=2)
    trainer.save_checkpoint(tmp_path / "q.ckpt")
    result = export(tmp_path / "q.ckpt", tmp_path / "merged", merge_adapter=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert result["kind"] == "merged" and all(p.dtype == torch.float32 for p in merged.parameters())
    # The same adapter weights on the un-quantised base give the merged model's logits.
    plain = FineTuneModule(tiny_model_dir, adapter=LoRA(r=4, dropout=0.0))
    plain.configure_model()
    plain.load_state_dict(torch.load(tmp_path / "q.ckpt", weights_only=True)["state_dict"], strict=False)
    torch.testing.assert_close(logits(merged), logits(plain.model), atol=1e-4, rtol=1e-4)


def test_full_fine_tune_checkpoint_exports_a_model(tiny_model_dir, tmp_path):
    module = FineTuneModule(tiny_model_dir, adapter=FullFineTune(), learning_rate=1e-4)
    trainer, _ = fit(module, tmp_path, steps=2)
    trainer.save_checkpoint(tmp_path / "full.ckpt")
    result = export(tmp_path / "full.ckpt", tmp_path / "out", merge_adapter=True)
    assert result["kind"] == "model"
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out")), logits(module.model))


def test_existing_output_is_refused_and_left_untouched(lora_run, tmp_path, capsys):
    _, ckpt, _ = lora_run
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert console_main(["export", "--checkpoint", str(ckpt), "--output_dir", str(out)]) == 1
    assert "already exists and is not empty: pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_failed_write_leaves_the_old_directory_and_no_staging(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(target) as staging:
            (staging / "half.bin").write_bytes(b"x")
            raise RuntimeError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in target.iterdir()] == ["old.txt"]


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    assert console_main(["export", "--checkpoint", str(tmp_path / "nope.ckpt"), "--output_dir", str(tmp_path / "o")]) == 1
    assert "nope.ckpt" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def other_base_dir(tmp_path_factory):
    """Same architecture and tokenizer as the tiny model, other weights: a different base."""
    from conftest import TINY_TOKENIZER_DIR
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target = tmp_path_factory.mktemp("other_base")
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig.from_pretrained(TINY_TOKENIZER_DIR)).save_pretrained(target)
    AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR).save_pretrained(target)
    return str(target)


def test_adapter_onto_a_foreign_base_is_refused_everywhere(lora_run, other_base_dir, tiny_model_dir, tmp_path, capsys):
    from lightning_ft.loading import load_for_generation

    _, _, adapter_dir = lora_run
    assert (adapter_dir / "lightning_ft_base.json").is_file()
    out = tmp_path / "merged"
    assert console_main(["export", "--checkpoint", str(adapter_dir), "--output_dir", str(out), "--merge",
                         "--model", other_base_dir]) == 1
    error = capsys.readouterr().err
    assert f"was trained on base model '{tiny_model_dir}', which differs from the base '{other_base_dir}'" in error
    assert not out.exists()
    with pytest.raises(ValueError, match="was trained on base model .* which differs"):
        load_for_generation(model=other_base_dir, adapter=str(adapter_dir))  # generate --adapter and chat
    model, _ = load_for_generation(adapter=str(adapter_dir), dtype="bfloat16")  # same base, other dtype: fine
    assert isinstance(model, PeftModel)


def test_exported_adapter_carries_the_base_record_and_a_foreign_adapter_only_warns(lora_run, tmp_path):
    import shutil

    from lightning_ft.loading import load_for_generation

    _, ckpt, adapter_dir = lora_run
    export(ckpt, tmp_path / "exported")
    record = json.loads((tmp_path / "exported" / "lightning_ft_base.json").read_text())
    assert record["base_fingerprint"] == json.loads((adapter_dir / "lightning_ft_base.json").read_text())[
        "base_fingerprint"]
    foreign = shutil.copytree(adapter_dir, tmp_path / "foreign")
    (foreign / "lightning_ft_base.json").unlink()
    with pytest.warns(UserWarning, match="has no lightning_ft_base.json .* cannot check"):
        load_for_generation(adapter=str(foreign))


def test_overwrite_replaces_only_an_earlier_export(lora_run, tmp_path, capsys):
    _, ckpt, _ = lora_run
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["export", "--checkpoint", str(ckpt), "--output_dir", str(out), "--overwrite"]
    assert console_main(args) == 1
    assert "holds files an export did not write (notes.txt): --overwrite only replaces an earlier export" in \
        capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (out / "notes.txt").unlink()
    assert console_main(args) == 0  # empty: fine
    assert console_main(args) == 0  # an earlier export: replaced
    (out / "my_notes.md").write_text("added by hand")
    assert console_main(args) == 1
    assert "(my_notes.md)" in capsys.readouterr().err
    assert (out / "my_notes.md").read_text() == "added by hand" and (out / "adapter_model.safetensors").is_file()
