#!/usr/bin/env bash
# Evaluate RPL's released RPL+CoroCL checkpoint with the paper's protocol (see README "Reproducing the paper").
#
#   experiments/reproduce_paper.sh RPL_CHECKPOINT DATA_ROOT [OUT_DIR]
#
# RPL_CHECKPOINT  RPL's released .pth (the whole network: segmenter + residual_block.*); an add-on
#                 trained here (work_dirs/.../best.safetensors) can be evaluated with the rpl-eval lines alone
# DATA_ROOT       fishyscapes/LostAndFound, fishyscapes/Static (images|original + labels_masks|labels, 0/1/255),
#                 road_anomaly (frame_list.json + frames/, or images + labels_masks),
#                 dataset_AnomalyTrack, dataset_ObstacleTrack (SMIYC: images + labels_masks; validation frames),
#                 optionally cityscapes (leftImg8bit/val + gtFine/val) for the closed-set mIoU
# OUT_DIR         converted weights and results (default work_dirs/paper)
#
# Protocol (as the paper's code): one forward per image at native resolution, no resizing or test-time
# augmentation; score = free energy -logsumexp of the perturbed logits, Gaussian blur kernel 7 sigma 1;
# AUROC / AP / FPR@95 pooled over all valid pixels of each dataset, computed exactly (sklearn-equal).
# RPL's code takes FPR@95 at the threshold whose recall is closest to 0.95 (--fpr-rule closest): that run
# is the one to compare with the paper; the second run uses the official evaluators' rule (first threshold
# with TPR >= 0.95) and adds the SMIYC component metrics.
set -euo pipefail

if [ "$#" -lt 2 ]; then
  echo "usage: $0 RPL_CHECKPOINT DATA_ROOT [OUT_DIR]" >&2
  exit 2
fi
CHECKPOINT=$1
DATA_ROOT=$2
OUT_DIR=${3:-work_dirs/paper}
DATASETS=fs-laf,fs-static,road-anomaly,smiyc-anomaly,smiyc-obstacle

python -m rpl.models.reference "$CHECKPOINT" --out-dir "$OUT_DIR/rpl_corocl"

# 1. the paper's protocol (FPR@95 rule of RPL's code)
rpl-eval --checkpoint "$OUT_DIR/rpl_corocl/rpl_addon.safetensors" --datasets "$DATASETS" \
  --data-root "$DATA_ROOT" --methods rpl,energy,msp,maxlogit,entropy --pixel-mode exact --fpr-rule closest \
  --json "$OUT_DIR/paper_protocol.json" --markdown "$OUT_DIR/paper_protocol.md"

# 2. the official FPR@95 rule, with SMIYC component metrics (sIoU, PPV, mean F1)
rpl-eval --checkpoint "$OUT_DIR/rpl_corocl/rpl_addon.safetensors" --datasets "$DATASETS" \
  --data-root "$DATA_ROOT" --methods rpl --pixel-mode exact --fpr-rule first --components \
  --json "$OUT_DIR/official_rule.json" --markdown "$OUT_DIR/official_rule.md"

# 3. closed-set check: the wrapped model's logits are the segmenter's own, so its mIoU is unchanged
if [ -d "$DATA_ROOT/cityscapes" ]; then
  rpl-eval --checkpoint "$OUT_DIR/rpl_corocl/rpl_addon.safetensors" --datasets cityscapes-val \
    --data-root "$DATA_ROOT" --methods rpl --pixel-mode exact \
    --json "$OUT_DIR/cityscapes_val.json" --markdown "$OUT_DIR/cityscapes_val.md"
fi
