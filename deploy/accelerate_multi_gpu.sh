#!/usr/bin/env bash
# Train finpipe's adapter on several GPUs of one machine: a thin wrapper over `python -m finpipe.training
# --processes N`, the same launcher the qlora_adapter asset uses when its `processes` setting is above 1
# (finpipe.training.launch: torch.distributed.run, one DDP rank per GPU over NCCL; gloo ranks on a CPU). Each rank
# loads the base onto its own GPU (LOCAL_RANK); only rank 0 writes checkpoints, TensorBoard logs and the adapter.
#
#   deploy/accelerate_multi_gpu.sh                          # every visible GPU, the lake's base model and split
#   NUM_GPUS=4 deploy/accelerate_multi_gpu.sh --max-steps 500 --batch-size 8 --learning-rate 1e-4
#
# Options after the script name go to `python -m finpipe.training` (every AdapterSpec field: --quantization none,
# --method dora, --lora-r 32, ...; see finpipe/training/__main__.py). The effective batch is
# NUM_GPUS x --batch-size x --grad-accum per optimizer step. Rerunning with the same RUN_ID resumes from the
# newest complete checkpoint in its job folder, whichever rank died. The result is a standard PEFT folder:
#   finpipe ask "How did AAPL do?" --adapter "$FINPIPE_LAKE_DIR/models/adapters/<RUN_ID>"
# Prerequisites: `finpipe run --only-data` (the split) and a materialized base_model (models/base/current.json);
# HF_TOKEN only in the environment, never on this command line. (The name is historical: accelerate's multi-GPU
# launcher is torchrun underneath, and the Trainer's accelerator still runs each rank.)
set -euo pipefail

LAKE="${FINPIPE_LAKE_DIR:-data_lake}"
NUM_GPUS="${NUM_GPUS:-$(nvidia-smi --list-gpus | wc -l)}"
RUN_ID="${RUN_ID:-$(date -u +%Y%m%dT%H%M%SZ)-multigpu}"
BASE="${BASE:-$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["path"])' "$LAKE/models/base/current.json")}"

if [ "$NUM_GPUS" -lt 1 ]; then
  echo "no GPU visible (nvidia-smi); on CPU ranks run: python -m finpipe.training --processes 2 ..." >&2
  exit 2
fi

exec python -m finpipe.training \
  --processes "$NUM_GPUS" \
  --base "$BASE" \
  --train "$LAKE/datasets/split/train.jsonl" \
  --val "$LAKE/datasets/split/val.jsonl" \
  --out "$LAKE/models/adapters/$RUN_ID" \
  --job-dir "$LAKE/models/adapters/_jobs/$RUN_ID" \
  "$@"
