#!/usr/bin/env python3
"""Validate every DeepSeekV3Deployment in the given manifests against the CRD's own schema.

Strict: the CRD's openAPIV3Schema is turned into a JSON Schema in which objects reject unknown
fields (the API server would silently prune them, which hides typos), int-or-string and nullable
are honoured, and each served version is checked. CEL rules (x-kubernetes-validations) are not
evaluated here; the Rust tests evaluate them client-side (cargo test -p dsv3-operator).

usage: validate_samples.py CRD.yaml MANIFEST.yaml...
"""
import copy
import sys

import jsonschema
import yaml


def strict(schema):
    s = copy.deepcopy(schema)
    s.pop("x-kubernetes-validations", None)
    if s.pop("x-kubernetes-int-or-string", False):
        s.pop("type", None)
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    nullable = s.pop("nullable", False)
    for k in list(s):
        if k.startswith("x-kubernetes-") and k != "x-kubernetes-preserve-unknown-fields":
            s.pop(k)
    preserve = s.pop("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in s:
        s["properties"] = {k: strict(v) for k, v in s["properties"].items()}
        if "additionalProperties" not in s and not preserve:
            s["additionalProperties"] = False
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = strict(s["additionalProperties"])
    if "items" in s:
        s["items"] = strict(s["items"])
    for key in ("anyOf", "oneOf", "allOf"):
        if key in s:
            s[key] = [strict(x) for x in s[key]]
    if nullable:
        if "type" in s:
            s["type"] = [s["type"], "null"]
        elif "anyOf" in s:
            s["anyOf"].append({"type": "null"})
    return s


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        crds = [d for d in yaml.safe_load_all(f) if d]
    if len(crds) != 1 or crds[0].get("kind") != "CustomResourceDefinition":
        print(f"{argv[1]}: expected exactly one CustomResourceDefinition", file=sys.stderr)
        return 2
    crd = crds[0]
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    schemas = {}
    for v in crd["spec"]["versions"]:
        root = strict(v["schema"]["openAPIV3Schema"])
        # metadata is validated by the API server's ObjectMeta rules, not the CRD schema.
        root.setdefault("properties", {})["metadata"] = {"type": "object"}
        root["properties"]["apiVersion"] = {"type": "string"}
        root["properties"]["kind"] = {"type": "string"}
        root["required"] = sorted(set(root.get("required", [])) | {"spec"})
        schemas[f"{group}/{v['name']}"] = root
    failures = checked = 0
    for path in argv[2:]:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for doc in docs:
            if doc.get("kind") != kind:
                continue
            name = doc.get("metadata", {}).get("name", "?")
            schema = schemas.get(doc.get("apiVersion"))
            if schema is None:
                print(f"FAIL {path}: {kind}/{name}: apiVersion {doc.get('apiVersion')} is not served by the CRD")
                failures += 1
                continue
            errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
            checked += 1
            if errors:
                failures += 1
                for e in errors:
                    where = "/".join(str(p) for p in e.path) or "<root>"
                    print(f"FAIL {path}: {kind}/{name}: {where}: {e.message}")
            else:
                print(f"ok   {path}: {kind}/{name} matches the CRD schema")
    if checked == 0:
        print(f"no {kind} found in {argv[2:]}", file=sys.stderr)
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
