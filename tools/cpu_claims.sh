#!/usr/bin/env bash
# The paper's claims at CPU scale (docs/RESULTS.md, "Small-scale CPU reproduction"), in order, on ONE core:
# time to accuracy (make compare-demo's command), the patch-count ablation, the test-patch ablation and t-SNE map
# of the EMP-SSL run, and what JPEG costs it. Finished steps are skipped when the script is run again.
#   bash tools/cpu_claims.sh            (about 35 min on one core; prefix with `taskset -c N` to pin it)
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
EMPSSL=${EMPSSL:-empssl}  # e.g. EMPSSL="python -m empssl.cli" from a checkout
OUT=${OUT:-runs}

$EMPSSL compare --recipes compare-demo --methods emp-ssl,simclr,vicreg,byol --width 8 --patch-size 16 \
    --budget-seconds 300 --device cpu --monitor-bank 1000 --monitor-test 500 --targets 25,30,35,40 \
    --out $OUT/compare-demo --no-progress

$EMPSSL ablate-patches --preset compare-demo-emp-ssl --patches 2,4,8,16,32 --epochs 2 --device cpu \
    --out $OUT/ablate-patches-demo --no-progress

$EMPSSL ablate-test-patches --checkpoint $OUT/compare-demo/emp-ssl --counts 1,2,4,8,16,32,64 --no-progress
$EMPSSL tsne --checkpoint $OUT/compare-demo/emp-ssl --max-points 1000 --no-progress

${PYTHON:-python} tools/jpeg_twin.py --out .data/cifar10-jpeg75-5k
$EMPSSL eval --checkpoint $OUT/compare-demo/emp-ssl --data ${EMPSSL_SHARED_DATA:-../shared/data}/cifar10-lossless-5k.tar.gz \
    --test-patches 16 --out $OUT/compare-demo/emp-ssl/results-lossless-5k.json --no-progress
$EMPSSL eval --checkpoint $OUT/compare-demo/emp-ssl --data .data/cifar10-jpeg75-5k \
    --test-patches 16 --out $OUT/compare-demo/emp-ssl/results-jpeg-5k.json --no-progress

# The random-initialisation references: one step, then the untrained encoder under the same protocol.
for m in emp-ssl simclr; do
  $EMPSSL train --preset compare-demo-$m --device cpu --epochs 0.02 --warmup-epochs 0 --compare-random-init \
      --out $OUT/random-init-$m --no-progress
done
