#!/usr/bin/env bash
# GPU readiness in one short run (< 10 minutes on one CUDA GPU): lightning_ft against TRL's padding-free
# SFTTrainer on the variable-length chat data, in the GPU's native precision (bf16-mixed on Ampere and newer).
# Rows: our defaults (precision auto, batching auto: per-sequence SDPA packing), flash_attention_2 when
# flash-attn is installed (ours and TRL's), QLoRA 4-bit (bitsandbytes), and a 1-GPU FSDP run; one table.
#   bash benchmarks/gpu_check.sh            # STEPS=8 WARMUP=2 by default
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STEPS="${STEPS:-8}"
WARMUP="${WARMUP:-2}"

python - <<'EOF'
import torch
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA GPU (torch.cuda.is_available() is False)"
from lightning_ft.precision import resolve_precision
print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, {resolve_precision('cuda')}")
EOF
PRECISION="$(python -c "from lightning_ft.precision import resolve_precision; print(resolve_precision('cuda').precision)")"

CONTENDERS=(--only lightning_ft --only trl_padding_free --only trl_padding_free_no_checkpointing)
if python -c "import flash_attn" 2>/dev/null; then
  CONTENDERS+=(--only lightning_ft_flash --only trl_padding_free_flash)
else
  echo "flash-attn not installed: flash_attention_2 rows skipped (pip install flash-attn --no-build-isolation)"
fi
if python -c "import bitsandbytes" 2>/dev/null; then
  CONTENDERS+=(--only lightning_ft_qlora)
else
  echo "bitsandbytes not installed: QLoRA row skipped (pip install \"lightning_ft[qlora]\")"
fi
CONTENDERS+=(--only lightning_ft_fsdp)

timeout 570 python benchmarks/sft_throughput.py --device cuda --data chat --precision "$PRECISION" \
  --steps "$STEPS" --warmup "$WARMUP" --workdir runs/gpu_check "${CONTENDERS[@]}"
