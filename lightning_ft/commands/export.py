"""``lightning_ft export``: a checkpoint or adapter -> a PEFT adapter directory or a merged standalone model.

::

    lightning_ft export --checkpoint runs/quickstart/lightning_logs/version_0/checkpoints/last.ckpt \\
        --output_dir exports/triage-adapter
    lightning_ft export --checkpoint runs/quickstart/lightning_logs/version_0/hf_model \\
        --output_dir exports/triage-merged --merge

The merged directory loads with plain ``AutoModelForCausalLM.from_pretrained``; its logits are checked
against base+adapter before it is moved into place. Exit code 1 on any error, with nothing written.
"""

from __future__ import annotations

import argparse
import json
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning_ft export", allow_abbrev=False, description=__doc__.split("::")[0])
    parser.add_argument("--checkpoint", required=True, help="a Lightning .ckpt from fit, or a PEFT adapter directory")
    parser.add_argument("--output_dir", required=True, help="where the Hugging Face directory is written")
    parser.add_argument("--merge", action="store_true", help="fold the adapter into the base: a standalone model")
    parser.add_argument("--model", default=None, help="base model spec, when it differs from the recorded one")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in output_dir (refused if it holds other files)")
    parser.add_argument("--atol", type=float, default=1e-3, help="largest logit difference accepted after merging")
    return parser


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from lightning_ft.export import export

    try:
        result = export(args.checkpoint, args.output_dir, merge_adapter=args.merge, model=args.model,
                        overwrite=args.overwrite, atol=args.atol)
    except (OSError, ValueError, ImportError) as error:
        print(f"lightning_ft export: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0
