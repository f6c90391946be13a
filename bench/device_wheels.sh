#!/usr/bin/env bash
# The wheels a lent GPU machine lacks, for bench/gpu_checks.sh there. Its image holds Python 3.12 with torch,
# transformers, typer, pytest and most of what Ray needs, but no package registry; what it lacks travels with the
# working tree, whose limit is 64 MiB. So: the locked versions (requirements/lock.txt) for CPython 3.12 on
# x86-64 into .whl/ (ignored by git), with Ray's Java jars and the libraries qvlm never imports (data, train,
# tune, serve, rllib, llm, the dashboard's web client) and botocore's service models other than S3 and STS taken
# out of their wheels: 43 MB in all instead of 96.
# usage, here:   bash bench/device_wheels.sh
#   there (the device tool's run, carrying .whl):
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#     python3 -m pip install -q --no-deps --no-build-isolation -e . && bash bench/gpu_checks.sh $OUT python3
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo "/.whl/" >> .git/info/exclude; }
rm -rf .whl
mkdir .whl
names="ray compressed-tensors loguru pydantic pydantic_core annotated-types typing-inspection boto3 botocore
s3transfer jmespath jsonschema jsonschema-specifications referencing rpds-py"
for name in $names; do
  pin=$(grep -i -m1 "^${name}==" requirements/lock.txt) || { echo "no pin for $name in requirements/lock.txt"; exit 1; }
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl "$pin" \
    2> >(grep -v "^WARNING: Location" >&2)
done
python3 - <<'EOF'
import glob, os, re, zipfile

def trim(wheel, dropped):
    """Rewrite ``wheel`` without the files whose names match ``dropped``, and without their lines in RECORD."""
    kept_wheel = wheel + ".tmp"
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(kept_wheel, "w", zipfile.ZIP_DEFLATED) as dst:
        kept = [i for i in src.infolist() if not re.match(dropped, i.filename)]
        names = {i.filename for i in kept}
        for info in kept:
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = ("\n".join(l for l in lines if l.split(",")[0] in names) + "\n").encode()
            dst.writestr(info, data)
    os.replace(kept_wheel, wheel)

trim(glob.glob(".whl/ray-*.whl")[0], r"ray/(jars|rllib|tune|train|serve|llm|data|dashboard/client)/")
trim(glob.glob(".whl/botocore-*.whl")[0], r"botocore/data/(?!s3/|sts/)[^/]+/")
EOF
du -sh .whl
