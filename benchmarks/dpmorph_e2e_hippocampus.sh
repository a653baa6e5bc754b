#!/usr/bin/env bash
# DP-Morph end to end on Dataset902_Hippocampus (3 labels, 3D): plan + preprocess 2d, train a deliberately brief
# normal nnU-Net on fold 0 (CPU, ragged predictions), search DP-Morph on the fold's validation folder in both modes,
# apply with nnU-Net's own nnUNetv2_apply_postprocessing, evaluate with nnUNetv2_evaluate_folder, print the table.
#
#   bash benchmarks/dpmorph_e2e_hippocampus.sh          # WORK=/tmp/dpmorph_work, NP=2; ~20 min of CPU for training
#
# Every step is skipped when its output exists, so a rerun only repeats the DP-Morph part.
set -euo pipefail
WORK=${WORK:-/tmp/dpmorph_work}
DATA=${DATA:-/work/shared/datasets/Dataset902_Hippocampus}
NP=${NP:-2}
export nnUNet_raw=$WORK/nnUNet_raw nnUNet_preprocessed=$WORK/nnUNet_preprocessed nnUNet_results=$WORK/nnUNet_results
export nnUNet_extTrainer=$WORK/trainers nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-2} nnUNet_compile=f
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results" "$nnUNet_extTrainer"
ln -sfn "$DATA" "$nnUNet_raw/Dataset902_Hippocampus"

if [ ! -d "$nnUNet_preprocessed/Dataset902_Hippocampus/nnUNetPlans_2d" ]; then
  nnUNetv2_plan_and_preprocess -d 902 -c 2d -np "$NP"
fi

cat > "$nnUNet_extTrainer/nnUNetTrainer_dpmorphbrief.py" <<'PY'
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_dpmorphbrief(nnUNetTrainer):
    """A deliberately brief normal nnU-Net run (ragged predictions for the DP-Morph end-to-end check).

    300 steps of batch 32: the plans' 2d batch of 366 costs ~13 s a step on 2 CPU cores, and 100 such steps
    (4 epochs x 25) still predicted background only.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 6
        self.num_iterations_per_epoch = 50
        self.num_val_iterations_per_epoch = 2

    def _set_batch_size_and_oversample(self):
        super()._set_batch_size_and_oversample()
        self.batch_size = 32
PY

MODEL=$nnUNet_results/Dataset902_Hippocampus/nnUNetTrainer_dpmorphbrief__nnUNetPlans__2d
if [ ! -f "$MODEL/fold_0/validation/summary.json" ]; then
  nnUNetv2_train 902 2d 0 -tr nnUNetTrainer_dpmorphbrief -device cpu
fi

VAL=$MODEL/fold_0/validation
GT=$nnUNet_preprocessed/Dataset902_Hippocampus/gt_segmentations
for MODE in global adaptive; do
  # plans.json and dataset.json are found in the model folder (the validation folder's grandparent)
  nnUNetv2_dp_determine_postprocessing -i "$VAL" -ref "$GT" -np "$NP" -mode "$MODE" -o "$WORK/pp_$MODE"
  nnUNetv2_apply_postprocessing -i "$VAL" -o "$WORK/validation_pp_$MODE" \
    -pp_pkl_file "$WORK/pp_$MODE/postprocessing.pkl" -np "$NP" \
    -plans_json "$MODEL/plans.json" -dataset_json "$MODEL/dataset.json"
  nnUNetv2_evaluate_folder "$GT" "$WORK/validation_pp_$MODE" -djfile "$MODEL/dataset.json" -pfile "$MODEL/plans.json" \
    -np "$NP" --chill
done

python - "$VAL" "$WORK" <<'PY'
import json
import sys

val, work = sys.argv[1], sys.argv[2]
before = json.load(open(f"{val}/summary.json"))
print("\nDice from nnU-Net's own summary.json (nnUNetv2_evaluate_folder), fold 0 validation,",
      len(before["metric_per_case"]), "cases")
print(f"{'':10s}{'before':>10s}{'global':>10s}{'adaptive':>10s}")
after = {m: json.load(open(f"{work}/validation_pp_{m}/summary.json")) for m in ("global", "adaptive")}
for key in ("1", "2"):
    print(f"class {key:4s}{before['mean'][key]['Dice']:10.4f}" + "".join(
        f"{after[m]['mean'][key]['Dice']:10.4f}" for m in after))
print(f"{'mean':10s}{before['foreground_mean']['Dice']:10.4f}" + "".join(
    f"{after[m]['foreground_mean']['Dice']:10.4f}" for m in after))
for m in after:
    choice = json.load(open(f"{work}/pp_{m}/postprocessing.json"))["dp_morph"]["choice"]
    print(f"{m} choice: {json.dumps(choice)}")
PY
