#!/usr/bin/env bash
# The GPU figures of issue 10, in one run of under 9 minutes on one CUDA GPU (BUDGET seconds in
# all; each command also has its own cap, and what runs out of time is reported, not fatal):
#   1. pytest -m gpu (the tests that need CUDA);
#   2. SAE-activations/s of the training step for 1 and 8 ReLU SAEs and for TopK k=32 (d_model
#      1024, d_sae 16384, batch 16384, bf16-mixed, torch.compile), each beside the bf16 matmul
#      floor measured in the same process, and 8 SAEs batched against one by one;
#   3. the shuffled loader's bandwidth into the GPU, and cold and cached for 1, 2, 4 and 8
#      reader threads (issues 12, 22: scaling with cores, which a 2-core machine cannot show);
#   4. recording against the bare ViT forward pass;
#   5. the spliced evaluation (issue 20) against three bare forwards.
#
#     bash benchmarks/gpu.sh            # DEVICE=cpu bash benchmarks/gpu.sh: same commands on CPU
#
# Every command takes --device, so on CPU only the device differs (CPU runs use smaller sizes
# only if SIZES=small). Written without a GPU: it has been run on CPU, never yet on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}  # the lent GPU machine's python3 holds its PyTorch
DEVICE=${DEVICE:-cuda}
# Nothing can be fetched on the lent GPU machine, and its image lacks hydra-core, omegaconf,
# antlr4 and open_clip (+ ftfy, wcwidth): they travel as wheels in the git-ignored .whl/ (the
# device tool's `carry: [".whl"]`; made with `pip download`/`pip wheel`, see the closing notes).
if ! $PY -c "import hydra, omegaconf, open_clip" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null
then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # saev and hydra_plugins from this checkout
$PY -c "import saev.train.job, torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
if [[ ${SIZES:-full} == small ]]; then
    SAE=(--d-model 256 --d-sae 2048 --batch 2048)
    LOADER=(--gb 0.2 --d-model 256 --batch-size 4096)
else
    SAE=(--d-model 1024 --d-sae 16384 --batch 16384)
    LOADER=(--gb 2 --d-model 768 --batch-size 16384)
fi
STEP=(--device "$DEVICE" "${SAE[@]}" --precision bf16-mixed --compile --repeats 1 --steps 10 --warmup 3)
t0=$SECONDS
BUDGET=${BUDGET:-520}  # seconds for all of it: under a device call's 10 minutes, with start-up
# run CAP CMD...: CMD with at most CAP seconds, and never past the budget; a command that fails
# or runs out of time is reported and the script goes on to the next figure.
run() {
    local cap=$1 left=$((BUDGET - (SECONDS - t0)))
    shift
    ((left < cap)) && cap=$left
    if ((cap < 10)); then echo "(skipped, out of time: $*)"; return 0; fi
    timeout "$cap" "$@" || echo "(exit $? after $cap s at most: $*)"
}
echo "== pytest -m gpu"
run 120 $PY -m pytest -m gpu -q -p no:cacheprovider  # exit 5 (none collected) is reported too
echo "== SAE training step (bf16-mixed, compiled)"
run 100 $PY benchmarks/train.py "${STEP[@]}" --kinds relu --n-saes 1 8 --skip sparsify batched
run 60 $PY benchmarks/train.py "${STEP[@]}" --kinds topk --n-saes 1 --skip sparsify batched
# The issue's figures first; the extras (batching, reader scaling) get what time is left.
echo "== loader into $DEVICE"
run 75 $PY benchmarks/loader.py --device "$DEVICE" "${LOADER[@]}" --dtypes float32 --passes 1
echo "== recording against the bare forward pass"
run 40 $PY benchmarks/record.py --device "$DEVICE" --repeats 2
echo "== spliced evaluation against three bare forwards (issue 20)"
run 60 $PY benchmarks/splice.py --device "$DEVICE" --ckpt vit_base_patch16_224 --n-images 512 --batch-size 64
echo "== 8 same-shape SAEs as one batched group against one by one (the job setting batched)"
run 100 $PY benchmarks/train.py "${STEP[@]}" --skip sparsify module --batched-kinds relu topk
echo "== loader, cold page cache and cached, by reader threads (issue 22: 1, 2, 4, 8)"
run 80 $PY benchmarks/loader.py --cold --n-workers 1,2,4,8 "${LOADER[@]}" --dtypes float32 --passes 1
run 50 $PY benchmarks/loader.py --n-workers 1,2,4,8 "${LOADER[@]}" --dtypes float32 --passes 1
echo "gpu.sh done in $((SECONDS - t0)) s"
