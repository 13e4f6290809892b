#!/usr/bin/env bash
# Train finpipe's adapter on several GPUs of one machine: the same code path as the qlora_adapter asset
# (finpipe.training -> train_adapter: TRL SFTTrainer, QLoRA by default, checkpoints, early stopping), one process
# per GPU with DistributedDataParallel via `accelerate launch`. Each process loads the base onto its own GPU
# (LOCAL_RANK); only the first one writes TensorBoard logs and the adapter folder.
#
#   deploy/accelerate_multi_gpu.sh                          # every visible GPU, the lake's base model and split
#   NUM_GPUS=4 deploy/accelerate_multi_gpu.sh --max-steps 500 --batch-size 8 --learning-rate 1e-4
#
# Options after the script name go to `python -m finpipe.training` (every AdapterSpec field: --quantization none,
# --method dora, --lora-r 32, ...; see finpipe/training/__main__.py). The effective batch is
# NUM_GPUS x --batch-size x --grad-accum per optimizer step. Rerunning with the same RUN_ID resumes from the
# newest complete checkpoint in its job folder. The result is a standard PEFT folder:
#   finpipe ask "How did AAPL do?" --adapter "$FINPIPE_LAKE_DIR/models/adapters/<RUN_ID>"
# Prerequisites: `finpipe run --only-data` (the split) and a materialized base_model (models/base/current.json);
# HF_TOKEN only in the environment, never on this command line.
set -euo pipefail

LAKE="${FINPIPE_LAKE_DIR:-data_lake}"
NUM_GPUS="${NUM_GPUS:-$(nvidia-smi --list-gpus | wc -l)}"
RUN_ID="${RUN_ID:-$(date -u +%Y%m%dT%H%M%SZ)-multigpu}"
BASE="${BASE:-$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["path"])' "$LAKE/models/base/current.json")}"

if [ "$NUM_GPUS" -lt 1 ]; then
  echo "no GPU visible (nvidia-smi); on CPU run: python -m finpipe.training ..." >&2
  exit 2
fi
# one GPU: a plain single process; several: DDP
DISTRIBUTED=(--num_processes "$NUM_GPUS" --num_machines 1)
if [ "$NUM_GPUS" -gt 1 ]; then
  DISTRIBUTED+=(--multi_gpu)
fi

exec accelerate launch "${DISTRIBUTED[@]}" --mixed_precision no --dynamo_backend no \
  -m finpipe.training \
  --base "$BASE" \
  --train "$LAKE/datasets/split/train.jsonl" \
  --val "$LAKE/datasets/split/val.jsonl" \
  --out "$LAKE/models/adapters/$RUN_ID" \
  --job-dir "$LAKE/models/adapters/_jobs/$RUN_ID" \
  "$@"
