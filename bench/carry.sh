#!/usr/bin/env bash
# Wheels for the GPU machine (the device tool): the Python packages our training steps need that its
# image lacks (KINDS.md lists what it has), downloaded here into .whl/ (git-ignored through
# .git/info/exclude; never commit wheels) for Python 3.12 on x86-64 Linux, one version of each.
#
#   bash bench/carry.sh                 # the training set: trl, datasets, dill, multiprocess, pydantic
#   bash bench/carry.sh liger           # + liger-kernel (Triton kernels for RMSNorm, SwiGLU, RoPE)
#   bash bench/carry.sh deepspeed       # + deepspeed (an sdist: its wheel is built here) and hjson
#
# Then name `.whl` in the run's carry and start the device command with the line this prints.
# Not carried: pyarrow and fsspec (the image's pyarrow 25 works with datasets 5.2; a carried pyarrow
# 24 broke it), xxhash, peft, accelerate, transformers, torch (all there). wandb and prefect are not
# carried: a step started directly needs neither (tracking is off unless a W&B run is started).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl

# Pinned to what the project's own environment resolves (datasets 5.2 wants dill<0.4.2 and
# multiprocess<0.70.20; pydantic 2.14.3 wants pydantic-core 2.50.4 and typing-extensions>=4.16).
TRAIN=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
       pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
       typing-extensions==4.16.0)
LIGER=(liger-kernel==0.8.5)
DEEPSPEED_VERSION=0.19.8
EXTRA=()
BUILD_DEEPSPEED=0
for group in "$@"; do
    case "$group" in
        liger) EXTRA+=("${LIGER[@]}") ;;
        deepspeed) EXTRA+=(hjson==3.1.0); BUILD_DEEPSPEED=1 ;;
        *) echo "unknown group: $group (liger, deepspeed)" >&2; exit 2 ;;
    esac
done

PIP=(python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl)
"${PIP[@]}" "${TRAIN[@]}" "${EXTRA[@]}"

if [ "$BUILD_DEEPSPEED" = 1 ] && ! ls .whl/deepspeed-${DEEPSPEED_VERSION}-*.whl >/dev/null 2>&1; then
    # DeepSpeed's setup.py imports torch, so the build runs without isolation in an environment that
    # has one (the project's .venv, CPU torch is enough); DS_BUILD_OPS=0 leaves every op to be
    # JIT-compiled on the GPU machine (nvcc and ninja are there), so the wheel is pure Python.
    py=.venv/bin/python
    [ -x "$py" ] || py=python3
    DS_BUILD_OPS=0 "$py" -m pip wheel --quiet --no-deps --no-build-isolation -w .whl "deepspeed==${DEEPSPEED_VERSION}"
fi

# One version of each package: two stop the whole install there.
dups=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dups" ]; then echo "more than one wheel of: $dups (remove the stale ones from .whl/)" >&2; exit 1; fi

du -ch .whl/*.whl | tail -1 | sed 's/total/in .whl (counts toward the 64 MiB a device call carries)/'
ls .whl
cat <<'EOF'
On the device (carry: [".whl"]), start the command with:
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. || exit;
EOF
