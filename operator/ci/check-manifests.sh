#!/usr/bin/env bash
# Offline checks of every Kubernetes manifest dsv3-operator ships or produces:
#   1. deploy/crd.yaml equals `dsv3-operator crd` (the generated CRD);
#   2. `kubernetes-validate --strict` over deploy/*.yaml, deploy/samples/*.yaml, the generated CRD,
#      and every object the planner produces for each sample, for each Kubernetes version below;
#   3. each sample DeepSeekV3Deployment validates against the CRD's own (strict) schema.
# Needs: cargo, python3 with venv, network access to PyPI on the first run.
# Env: CARGO_TARGET_DIR (default <repo>/target), K8S_VERSIONS (default "1.33.0 1.37.0").
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
WORK="$TARGET/dsv3-operator-manifests"
VENV="$WORK/venv"
K8S_VERSIONS=${K8S_VERSIONS:-"1.33.0 1.37.0"}
KV_VERSION=${KV_VERSION:-1.37.0}

mkdir -p "$WORK"
if [ ! -x "$VENV/bin/kubernetes-validate" ]; then
    echo "== installing kubernetes-validate $KV_VERSION into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "kubernetes-validate==$KV_VERSION"
fi

echo "== generating the CRD"
cargo run --quiet --locked -p dsv3-operator -- crd > "$WORK/crd.generated.yaml"
if ! diff -u deploy/crd.yaml "$WORK/crd.generated.yaml"; then
    echo "deploy/crd.yaml is stale: cargo run -p dsv3-operator -- crd > deploy/crd.yaml" >&2
    exit 1
fi

echo "== rendering the planner's objects for every sample"
rm -rf "$WORK/planned"
DSV3_PLANNED_DIR="$WORK/planned" cargo test --quiet --locked -p dsv3-operator --lib \
    planner_tests::dump_planned_objects_for_offline_validation -- --exact >/dev/null
planned=("$WORK"/planned/*.yaml)
if [ ! -e "${planned[0]}" ]; then
    echo "the planner dump produced no files" >&2
    exit 1
fi
echo "   ${#planned[@]} objects"

for v in $K8S_VERSIONS; do
    echo "== kubernetes-validate --strict (Kubernetes $v)"
    "$VENV/bin/kubernetes-validate" --strict --quiet -k "$v" \
        deploy/*.yaml deploy/samples/*.yaml "$WORK/crd.generated.yaml" "${planned[@]}" 2>&1 \
        | grep -v "Couldn't find schema for kind DeepSeekV3Deployment" || true
    # grep hides the expected warning for our own kind; the exit status comes from a second,
    # silent run so that a failure is never masked by the filter.
    "$VENV/bin/kubernetes-validate" --strict --quiet --no-warn -k "$v" \
        deploy/*.yaml deploy/samples/*.yaml "$WORK/crd.generated.yaml" "${planned[@]}" >/dev/null
done

echo "== samples against the CRD schema"
"$VENV/bin/python" operator/ci/validate_samples.py deploy/crd.yaml deploy/samples/*.yaml

echo "== manifests OK"
