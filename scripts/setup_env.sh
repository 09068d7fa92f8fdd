#!/usr/bin/env bash
# Creates .venv (once) with torch and the test/bench extras, and (re)builds qembed._C.
# QEMBED_TORCH picks the torch release (default: the CPU build 2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
torch_spec="torch==${QEMBED_TORCH:-2.13.0}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --quiet "$torch_spec"
fi
# numpy, the test and experiments extras of pyproject.toml, and the build tools
.venv/bin/pip install --quiet numpy pytest pytest-xdist hypothesis tqdm matplotlib setuptools wheel ninja
# Triton runs the qembed.triton kernels' tests in its interpreter (no GPU needed). Pinned: a
# version known to work with the CPU torch above.
.venv/bin/pip install --quiet "triton==${QEMBED_TRITON:-3.9.0}"
# TorchRec and FBGEMM's CPU build (the torchrec-cpu extra) for qembed.fbgemm, qembed.torchrec
# and their tests; 1.8.0 is the release built for torch 2.13 (with another torch those tests
# skip). TorchRec itself goes in with --no-deps: its metadata asks for the CUDA fbgemm-gpu,
# which would overwrite the CPU build in the same folder. Skipped when already in place.
torchrec_missing="import importlib.metadata as m, sys
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return None
sys.exit(not (version('torch').startswith('2.13.')
              and (version('torchrec'), version('fbgemm-gpu-cpu')) != ('1.8.0', '1.8.0')))"
torchrec_works="import torch, torchrec, fbgemm_gpu
ebc = torchrec.EmbeddingBagCollection(tables=[torchrec.EmbeddingBagConfig(
    name='t', num_embeddings=10, embedding_dim=8, feature_names=['f'])], device=torch.device('cpu'))
kjt = torchrec.KeyedJaggedTensor.from_lengths_sync(['f'], torch.tensor([1, 2, 3]), torch.tensor([2, 1]))
assert ebc(kjt)['f'].shape == (2, 8)"
if .venv/bin/python -c "$torchrec_missing"; then
  .venv/bin/pip install --quiet "fbgemm-gpu-cpu==1.8.0" tensordict "torchmetrics==1.0.3" \
    pyre-extensions tqdm
  .venv/bin/pip install --quiet --no-deps "torchrec==1.8.0"
  .venv/bin/python -W ignore -c "$torchrec_works"
fi
# Build in place: CPU kernels always, CUDA ones where torch has CUDA and nvcc exists. The
# editable install happens once; later runs rebuild with build_ext, whose ninja files under
# build/ recompile only the sources that changed.
export MAX_JOBS="${MAX_JOBS:-2}"
if ! .venv/bin/pip show --quiet qembed 2>/dev/null; then
  .venv/bin/pip install --quiet --no-build-isolation --no-deps -e .
else
  .venv/bin/python setup.py --quiet build_ext --inplace
fi
