# Shared set-up for scripts/*.sh: a Python 3.11 venv in .venv with the CPU build of torch.
# torch is pinned here to the CPU wheel (pyproject states the supported range) so pip
# never pulls a multi-GB CUDA build.
PYTHON_BIN="${PYTHON_BIN:-python3.11}"
command -v "$PYTHON_BIN" >/dev/null 2>&1 || PYTHON_BIN=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON_BIN" -m venv .venv
fi
PY=.venv/bin/python
stamp=.venv/.verifier-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q -c constraints.txt "torch==2.13.0"
  "$PY" -m pip install -q -c constraints.txt -e ".[dev,demo,ray]"
  # test reference for Grad-CAM++ / Score-CAM; --no-deps: its torchvision cannot load beside this torch
  "$PY" -m pip install -q -c constraints.txt --no-deps "grad-cam==1.5.7"
  touch "$stamp"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
