{{/*
Names, labels and the settings document. Everything here is a pure function of .Values,
.Release and .Chart: no lookup, no random values, no timestamps (Argo CD must see no drift).
*/}}

{{- define "nocturne.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "nocturne.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Standard labels; pass (dict "ctx" $ "component" "operator"). */}}
{{- define "nocturne.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "nocturne.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: nocturne
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "nocturne.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nocturne.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "nocturne.operatorServiceAccount" -}}
{{- default (printf "%s-operator" (include "nocturne.fullname" .)) .Values.operator.serviceAccount.name }}
{{- end }}

{{- define "nocturne.runnerServiceAccount" -}}
{{- default (printf "%s-runner" (include "nocturne.fullname" .)) .Values.runner.serviceAccount.name }}
{{- end }}

{{/* An image reference: repository@digest, else repository:tag (tag defaults to appVersion). */}}
{{- define "nocturne.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{- define "nocturne.postgresqlHost" -}}
{{- printf "%s-postgresql.%s.svc" (include "nocturne.fullname" .) .Release.Namespace }}
{{- end }}

{{- define "nocturne.postgresqlSecretName" -}}
{{- default (printf "%s-postgresql" (include "nocturne.fullname" .)) .Values.postgresql.auth.existingSecret }}
{{- end }}

{{/*
NOCTURNE_DATABASE_URL for the operator and the migration Job: from database.existingSecret, or,
with the bundled PostgreSQL, composed by the kubelet from the password Secret ($(VAR) expansion),
so the password never appears in the rendered manifest unless it was given in values.
*/}}
{{- define "nocturne.databaseEnv" -}}
{{- if .Values.postgresql.enabled }}
- name: NOCTURNE_POSTGRES_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "nocturne.postgresqlSecretName" . }}
      key: {{ .Values.postgresql.auth.secretKey }}
- name: NOCTURNE_DATABASE_URL
  value: {{ printf "postgresql+psycopg://%s:$(NOCTURNE_POSTGRES_PASSWORD)@%s:5432/%s" .Values.postgresql.auth.username (include "nocturne.postgresqlHost" .) .Values.postgresql.auth.database | quote }}
{{- else }}
- name: NOCTURNE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret }}
      key: {{ .Values.database.secretKey }}
{{- end }}
{{- end }}

{{/* The run API's Service DNS name, the host runner pods connect to (in its certificate). */}}
{{- define "nocturne.runApiHost" -}}
{{- printf "%s-run-api.%s.svc" (include "nocturne.fullname" .) .Release.Namespace }}
{{- end }}

{{/*
The operator's settings file (NOCTURNE_CONFIG_FILE): field names of
nocturne_operator.settings.Settings, which forbids unknown keys (a unit test loads this file).
*/}}
{{- define "nocturne.settings" -}}
{{- $runnerSA := "" }}
{{- /* Only an account that exists in the schedule's namespace: one the chart created in each
watched namespace, or one named explicitly (created by you). Else the namespace's default. */}}
{{- if or (and .Values.operator.watchNamespaces .Values.runner.serviceAccount.create) .Values.runner.serviceAccount.name }}
{{- $runnerSA = include "nocturne.runnerServiceAccount" . }}
{{- end -}}
max_schedules_per_namespace: {{ .Values.limits.maxSchedulesPerNamespace }}
min_interval_minutes: {{ .Values.limits.minIntervalMinutes }}
max_per_run_usd: {{ .Values.limits.maxPerRunUSD | quote }}
runner_image: {{ include "nocturne.image" (dict "ctx" . "image" .Values.runner.image) | quote }}
runner_image_pull_policy: {{ .Values.runner.image.pullPolicy }}
runner_service_account: {{ $runnerSA | quote }}
runner_resources:
  cpu_request: {{ .Values.runner.resources.requests.cpu | quote }}
  memory_request: {{ .Values.runner.resources.requests.memory | quote }}
  cpu_limit: {{ .Values.runner.resources.limits.cpu | quote }}
  memory_limit: {{ .Values.runner.resources.limits.memory | quote }}
runner_token_expiration_seconds: {{ .Values.runner.tokenExpirationSeconds }}
run_api_port: {{ .Values.runApi.port }}
run_api_url: {{ .Values.runApi.url | default (printf "https://%s:%d" (include "nocturne.runApiHost" .) (int .Values.runApi.port)) | quote }}
run_api_hostnames:
  {{- range (concat (list (printf "%s-run-api" (include "nocturne.fullname" .)) (printf "%s-run-api.%s" (include "nocturne.fullname" .) .Release.Namespace) (printf "%s-runs-api.%s.svc" (include "nocturne.fullname" .) .Release.Namespace)) .Values.runApi.extraHostnames) }}
  - {{ . | quote }}
  {{- end }}
run_api_tls_secret: {{ printf "%s-run-api-tls" (include "nocturne.fullname" .) | quote }}
run_api_tls_namespace: {{ .Release.Namespace | quote }}
webhook_port: {{ ternary (int .Values.webhook.port) 0 .Values.webhook.enabled }}
webhook_host: {{ printf "%s-webhook.%s.svc" (include "nocturne.fullname" .) .Release.Namespace | quote }}
webhook_failure_policy: {{ .Values.webhook.failurePolicy | quote }}
webhook_configuration: {{ printf "%s.validate.nocturne.dev" (include "nocturne.fullname" .) | quote }}
runs_api_port: {{ ternary (int .Values.runsApi.port) 0 .Values.runsApi.enabled }}
runs_api_apiservice: {{ ternary "v1alpha1.runs.nocturne.dev" "" .Values.runsApi.enabled | quote }}
web_fetch_allow_private: {{ .Values.runner.webFetchAllowPrivate }}
successful_jobs_history_limit: {{ .Values.runner.jobs.successfulJobsHistoryLimit }}
failed_jobs_history_limit: {{ .Values.runner.jobs.failedJobsHistoryLimit }}
job_ttl_seconds_after_finished: {{ .Values.runner.jobs.ttlSecondsAfterFinished }}
reconcile_interval_seconds: {{ .Values.operator.reconcileIntervalSeconds }}
resync_interval_seconds: {{ .Values.operator.resyncIntervalSeconds }}
next_runs_count: {{ .Values.operator.nextRunsCount }}
notifications_enabled: {{ .Values.notifications.enabled }}
notification_max_attempts: {{ .Values.notifications.maxAttempts }}
notification_retry_base_seconds: {{ .Values.notifications.retryBaseSeconds }}
notification_retry_cap_seconds: {{ .Values.notifications.retryCapSeconds }}
notification_timeout_seconds: {{ .Values.notifications.timeoutSeconds }}
notification_max_age_seconds: {{ .Values.notifications.maxAgeSeconds }}
notification_retention_days: {{ .Values.notifications.retentionDays }}
history_retention_days: {{ .Values.retention.historyDays }}
audit_retention_days: {{ .Values.retention.auditDays }}
retention_batch_size: {{ .Values.retention.batchSize }}
{{- /* Secrets and endpoints schedules may use; lists as JSON flow sequences. In this helper so
the Deployment's checksum/settings rolls the operator when they change. */}}
llm_secrets: {{ .Values.llm.secrets | toJson }}
llm_base_urls: {{ .Values.llm.baseURLs | toJson }}
webhook_secrets: {{ .Values.notifications.webhookSecrets | toJson }}
webhook_allow_private: {{ .Values.notifications.webhookAllowPrivate }}
leader_lease_name: {{ printf "%s-operator" (include "nocturne.fullname" .) | quote }}
leader_lease_seconds: {{ .Values.operator.leaderElection.leaseSeconds }}
leader_renew_deadline_seconds: {{ .Values.operator.leaderElection.renewDeadlineSeconds }}
leader_retry_seconds: {{ .Values.operator.leaderElection.retryPeriodSeconds }}
shutdown_drain_seconds: {{ .Values.operator.shutdownDrainSeconds }}
{{- end }}

{{- define "nocturne.priceTable" -}}
{{- if .Values.priceTable.override }}
{{- .Values.priceTable.override }}
{{- else }}
{{- .Files.Get "files/prices.yaml" }}
{{- end }}
{{- end }}

{{/* Hardened container securityContext shared by every container the chart runs. */}}
{{- define "nocturne.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end }}

{{- define "nocturne.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Validation that the schema cannot express across keys; fails rendering with the fix. */}}
{{- define "nocturne.validate" -}}
{{- if and .Values.postgresql.enabled (not .Values.postgresql.auth.password) (not .Values.postgresql.auth.existingSecret) }}
{{- fail "postgresql.enabled is true: set postgresql.auth.password or postgresql.auth.existingSecret (the chart never generates a password)" }}
{{- end }}
{{- if and (not .Values.postgresql.enabled) (not .Values.database.existingSecret) }}
{{- fail "database.existingSecret is empty: name the Secret holding the PostgreSQL URL, or set postgresql.enabled" }}
{{- end }}
{{- end }}
