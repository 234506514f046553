{{/*
The operator's RBAC rules. They must equal the rules of deploy/rbac.yaml (ClusterRole
dsv3-operator and Role dsv3-operator-leader-election); charts/check.sh renders the chart and
fails on any difference. Change both together.
*/}}
{{- define "dsv3-operator.rules" -}}
# The custom resource: watch it, add/remove the finalizer (JSON patch), write its status.
- apiGroups: ["dsv3.io"]
  resources: ["deepseekv3deployments"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["dsv3.io"]
  resources: ["deepseekv3deployments/status"]
  verbs: ["patch"]
# Owner references with blockOwnerDeletion need update on the owner's finalizers.
- apiGroups: ["dsv3.io"]
  resources: ["deepseekv3deployments/finalizers"]
  verbs: ["update"]
# Workloads: watched (their status drives ours), applied, deleted in order on teardown.
- apiGroups: ["apps"]
  resources: ["statefulsets", "deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Services, the ServiceAccount of the fleet pods: watched (by label) to undo drift, applied.
- apiGroups: [""]
  resources: ["services", "serviceaccounts"]
  verbs: ["list", "watch", "create", "patch"]
# ConfigMaps: fleet config and versioned placement plans (old versions are deleted; the
# serving one is read during a partitioned rollout).
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Model download Jobs (hub sources): read for ModelReady, created once, other revisions' deleted.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete"]
# Gang scheduling: the workers' PodGroup (Volcano or scheduler-plugins), listed to tell
# whether the kind is installed, deleted when the gang is switched off.
- apiGroups: ["scheduling.volcano.sh", "scheduling.x-k8s.io", "scheduling.run.ai"]
  resources: ["podgroups"]
  verbs: ["list", "create", "patch", "delete"]
# Pods: read for the scheduler's reason when one cannot be placed.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
# Existence checks only: the model PVC; secrets are read as metadata (no data is fetched).
- apiGroups: [""]
  resources: ["persistentvolumeclaims", "secrets"]
  verbs: ["get"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["list", "watch", "create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{- define "dsv3-operator.leaderElectionRules" -}}
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  resourceNames: [{{ include "dsv3-operator.leaseName" . | quote }}]
  verbs: ["get", "update"]
# create cannot be limited by name.
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["create"]
{{- end }}
