#!/usr/bin/env bash
# The GPU check (issues 26 and 25): on a CUDA machine with PyTorch and no network, run the GPU tests, the embedding and
# training benchmarks against BertModel at the Geneformer V2 shape, and `scgene.perturb(genes="all")` against its naive
# one-forward-per-copy loop, in about 8 minutes. It installs nothing from the network: the few wheels such an image
# may lack (anndata and what it needs; scgene itself runs from src/) are fetched beforehand into .whl/ and carried in.
#
#   bench/gpu_check.sh --fetch      # here, with the package index: the wheels into .whl/ (about 2.3 MB)
#   bench/gpu_check.sh [LOG_DIR]    # there: logs and the three benchmark tables into LOG_DIR (default outputs/gpu_check)
#
# Measured to run on the packages of the GPU image this project is lent (torch 2.11 + CUDA 13, transformers 5.17,
# huggingface_hub 1.33): the CPU suite's GPU, inference and embedding tests pass with that transformers and hub.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=(anndata==0.12.19 array-api-compat==1.16.0 legacy-api-wrap==1.5 natsort==8.4.0 scverse-misc==0.1.7
        zarr==3.4.2 numcodecs==0.17.1 donfig==0.8.1.post1 crc32c==2.9.post0)

if [[ "${1:-}" == "--fetch" ]]; then
    mkdir -p .whl
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
fi

LOGS="${1:-outputs/gpu_check}"
mkdir -p "$LOGS"
python3 -c "import torch" 2>/dev/null || { echo "python3 has no torch: run this where python3 is the GPU's PyTorch"; exit 1; }
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this check needs a GPU')" \
    || exit 1
if ! python3 -c "import anndata" 2>/dev/null; then
    ls .whl/*.whl >/dev/null 2>&1 || { echo "anndata is missing and .whl/ is empty: run bench/gpu_check.sh --fetch \
where pip can reach the package index, and carry .whl"; exit 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/scgene-site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/scgene-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to LOGS/NAME.log, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$LOGS/$name.log" | tail -n 40
    local code=${PIPESTATUS[0]}
    [[ $code -eq 0 ]] || { echo "== $name FAILED (exit $code)"; status=1; }
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOGS/device.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__)" | tee -a "$LOGS/device.txt"
step tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_embed_at_scale.py \
    -k "not torchrun"
step embed 180 python3 bench/embed.py --device cuda --dtype bfloat16 --shape v2 --n-cells 1024 --repeats 2 \
    --no-memory
step train 120 python3 bench/train.py --device cuda --dtype bfloat16 --hidden 512 --layers 12 --heads 8 \
    --intermediate 1024 --length 4096 --batch 8 --steps 3 --repeats 3
step perturb 60 python3 bench/perturb.py --device cuda --n-cells 200 --expression-cells 20 --naive-cells 3
exit $status
