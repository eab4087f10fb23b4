{{/*
Names. fullname is cut to 40 characters so that the longest derived name
(<fullname>-minio-bucket-<revision>, and the StatefulSets' pod and PVC names) stays within
the 63-character label limit.
*/}}
{{- define "fastslow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "fastslow.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains (include "fastslow.name" .) .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "fastslow.name" .) | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Cluster-scoped objects are shared by all namespaces: the release namespace is in the name. */}}
{{- define "fastslow.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "fastslow.fullname" .) -}}
{{- end -}}

{{/*
Labels. `app.kubernetes.io/instance` is the release: the tests (and `kubectl get -l`) find
everything of a release by it.
*/}}
{{- define "fastslow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fastslow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "fastslow.labels" -}}
{{ include "fastslow.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fastslow
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels of one component: include with (dict "ctx" $ "component" "operator"). */}}
{{- define "fastslow.componentLabels" -}}
{{ include "fastslow.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "fastslow.componentSelector" -}}
{{ include "fastslow.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "fastslow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (printf "%s-operator" (include "fastslow.fullname" .)) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name: the ServiceAccount to use when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
The namespaces the operator serves in namespaced mode: the release namespace first, then
watchNamespaces (duplicates dropped). One per line, for `splitList "\n"`.
*/}}
{{- define "fastslow.namespaces" -}}
{{- $all := list .Release.Namespace -}}
{{- range .Values.watchNamespaces -}}
{{- if not (has . $all) -}}{{- $all = append $all . -}}{{- end -}}
{{- end -}}
{{- join "\n" $all -}}
{{- end -}}

{{/* FST_WATCH_NAMESPACES: empty in cluster-wide mode (the operator then watches all). */}}
{{- define "fastslow.watchNamespacesEnv" -}}
{{- if .Values.clusterWide -}}{{- else -}}{{- include "fastslow.namespaces" . | splitList "\n" | join "," -}}{{- end -}}
{{- end -}}

{{/* ------------------------------------------------------------------ S3 */}}

{{/* "bundled", "inline" (external endpoint + keys: the chart makes the Secret), "existing", or "". */}}
{{- define "fastslow.s3.mode" -}}
{{- $ext := .Values.s3.external -}}
{{- if .Values.minio.enabled -}}
{{- if or $ext.endpoint $ext.accessKey $ext.secretKey $ext.existingSecret -}}
{{- fail "minio.enabled and s3.external.* are exclusive: use the bundled MinIO or an external S3, not both" -}}
{{- end -}}
bundled
{{- else if $ext.existingSecret -}}
{{- if or $ext.endpoint $ext.accessKey $ext.secretKey -}}
{{- fail "s3.external.existingSecret holds the endpoint and keys: leave s3.external.endpoint/accessKey/secretKey empty" -}}
{{- end -}}
existing
{{- else if or $ext.endpoint $ext.accessKey $ext.secretKey -}}
{{- if not (and $ext.endpoint $ext.accessKey $ext.secretKey) -}}
{{- fail "s3.external needs endpoint, accessKey and secretKey together (or existingSecret)" -}}
{{- end -}}
inline
{{- end -}}
{{- end -}}

{{/* The Secret with the S3 environment (operator envFrom, FST_DEFAULT_S3_SECRET); "" if none. */}}
{{- define "fastslow.s3.secretName" -}}
{{- $mode := include "fastslow.s3.mode" . -}}
{{- if eq $mode "existing" -}}
{{- .Values.s3.external.existingSecret -}}
{{- else if $mode -}}
{{- printf "%s-s3" (include "fastslow.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "fastslow.minio.name" -}}
{{- printf "%s-minio" (include "fastslow.fullname" .) -}}
{{- end -}}

{{/* In-cluster URL of the bundled MinIO; <svc>.<ns>.svc resolves from every namespace. */}}
{{- define "fastslow.minio.endpoint" -}}
{{- printf "http://%s.%s.svc:9000" (include "fastslow.minio.name" .) .Release.Namespace -}}
{{- end -}}

{{- define "fastslow.checkpointUri" -}}
{{- if .Values.defaults.checkpointUri -}}
{{- .Values.defaults.checkpointUri -}}
{{- else if .Values.minio.enabled -}}
{{- printf "s3://%s/checkpoints" .Values.minio.bucket -}}
{{- end -}}
{{- end -}}

{{/* The tenants' s3:// prefix: each served namespace gets <prefix>/<namespace>/. */}}
{{- define "fastslow.tenantPrefix" -}}
{{- if .Values.tenancy.prefix -}}
{{- .Values.tenancy.prefix -}}
{{- else if .Values.minio.enabled -}}
{{- printf "s3://%s/tenants" .Values.minio.bucket -}}
{{- end -}}
{{- end -}}

{{/* ------------------------------------------------------------------ database */}}

{{/* "bundled", "inline" (external url: the chart makes the Secret), "existing", or "". */}}
{{- define "fastslow.database.mode" -}}
{{- $ext := .Values.database.external -}}
{{- if .Values.postgres.enabled -}}
{{- if or $ext.url $ext.existingSecret.name -}}
{{- fail "postgres.enabled and database.external.* are exclusive: use the bundled PostgreSQL or an external database, not both" -}}
{{- end -}}
bundled
{{- else if $ext.existingSecret.name -}}
{{- if $ext.url -}}
{{- fail "database.external.url and database.external.existingSecret are exclusive" -}}
{{- end -}}
existing
{{- else if $ext.url -}}
inline
{{- end -}}
{{- end -}}

{{/* name/key of the Secret holding the database URL (FST_DEFAULT_DATABASE_SECRET); "" if none. */}}
{{- define "fastslow.database.secretRef" -}}
{{- $mode := include "fastslow.database.mode" . -}}
{{- if eq $mode "existing" -}}
{{- printf "%s/%s" .Values.database.external.existingSecret.name (.Values.database.external.existingSecret.key | default "url") -}}
{{- else if $mode -}}
{{- printf "%s-database/url" (include "fastslow.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "fastslow.postgres.name" -}}
{{- printf "%s-postgres" (include "fastslow.fullname" .) -}}
{{- end -}}

{{/*
A generated credential that survives upgrades: the value already stored under `key` of the
Secret `name` in the release namespace (looked up in the cluster), else a new random one.
Call it ONCE per render and reuse the result: every call draws a new random value.
(`helm template` and `helm lint` cannot look up, so they always show a random value.)
Args: dict "ctx" $ "name" secretName "key" dataKey "length" n
*/}}
{{- define "fastslow.generatedSecret" -}}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .name -}}
{{- $stored := "" -}}
{{- if $existing -}}{{- $stored = index ($existing.data | default dict) .key | default "" -}}{{- end -}}
{{- if $stored -}}
{{- $stored | b64dec -}}
{{- else -}}
{{- randAlphaNum (int .length) -}}
{{- end -}}
{{- end -}}

{{/* ------------------------------------------------------------------ pod security */}}

{{/*
The restricted Pod Security Standard, for every pod of the chart: non-root with a numeric
UID (so the kubelet can check it without reading the image), no privilege escalation, no
capabilities, the runtime's default seccomp profile, a read-only root filesystem (writable
paths are emptyDirs or volumes).
*/}}
{{- define "fastslow.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .uid }}
{{- if .fsGroup }}
fsGroup: {{ .uid }}
fsGroupChangePolicy: OnRootMismatch
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "fastslow.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .uid }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
